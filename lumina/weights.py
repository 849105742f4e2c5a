"""Starting a run from trained weights: ``--init-from PATH`` (= ``train.init_from``): a Lumina
checkpoint folder, a run folder (its newest complete checkpoint), or a Hugging Face model folder
(Llama / Mixtral: config.json + safetensors, e.g. what ``save_pretrained`` or ``lumina.run export``
wrote).

Only the weights are read (``lumina.checkpoint``: safetensors shards, any world size; a Hugging Face
folder: safetensors only, a pickle ``pytorch_model.bin`` is refused — never executed); the optimizer,
step, RNG, data position and schedule of the new run start fresh. Weights of a run that trained
LoRA adapters on a (quantized) base are merged first (``lumina.quant.merge``), so a fine-tune's
result is itself a starting point. The params must have exactly the shapes this run's model config
gives; then ``init_train_state`` quantizes / adapts them as ``model.quant`` and ``train.lora`` say
— the QLoRA recipe is ``--init-from=runs/base --model.quant=nf4 --train.lora.rank=16``.

**Which config** (``start_config``): from a Lumina checkpoint, the run's own preset and flags (use
the model settings of the run that wrote it). From a Hugging Face folder, the model section *is*
its config.json (``lumina.hf.from_hf``: dimensions, RoPE theta, norm eps, tied embeddings, Mixtral's
experts) in place of the preset's model; ``--model.*`` flags still apply on top (``model.quant``, the
attention backend); ``train.seq_len`` is capped at the model's context. **Which tokenizer**: a
folder ``lumina.run export`` wrote records its tiktoken encoding (lumina.json), which becomes
``data.tokenizer``; for any other folder ``data.tokenizer`` is what you set (default gpt2). Its ids
must fit the embedding, and when the folder has a tokenizer.json, it must encode sample text exactly
as that encoding does (``check_tokenizer``); each is one line otherwise.

Every problem with the path or its contents is a ``CheckpointError``: one line naming the file,
exit status 2 from the CLI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from lumina import checkpoint, hf, quant, tree
from lumina.checkpoint import CheckpointError
from lumina.config import ModelConfig, RunConfig, to_dict

__all__ = ["check_tokenizer", "hf_run_config", "load_params", "resolve", "start_config"]


def resolve(spec: str | Path) -> Path:
    """The folder ``spec`` names: a checkpoint or Hugging Face folder itself, or a run folder's
    newest complete checkpoint."""
    path = Path(spec)
    if (path / checkpoint.META_FILE).is_file() or hf.is_hf_dir(path):
        return path
    if (path / "checkpoints").is_dir():
        return checkpoint.latest(path)
    want = "a Hugging Face model folder (config.json + safetensors), a Lumina checkpoint or run folder"
    what = "does not exist" if not path.exists() else "is neither a checkpoint folder nor a run folder"
    raise CheckpointError(f"{path}: {what} (wanted: {want})")


def load_params(
    spec: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu"
) -> tuple[TensorDict, Path]:
    """(fp32 params in the layout ``lumina.model.init(cfg)`` makes, the folder read)."""
    path = resolve(spec)
    if hf.is_hf_dir(path):
        got = tree.flatten(hf.load_dir(path)[1])
        hint = "the model settings come from its config.json: drop the --model.* flags that change shapes"
    else:
        try:  # a foreign or malformed folder fails here, naming its file
            loaded, _ = checkpoint.load_checkpoint(path, prefix="params.")
        except CheckpointError as e:
            if "holds no tensors" not in str(e):
                raise
            raise CheckpointError(f"{path}: holds no params") from None
        got = tree.flatten(quant.merge(loaded["params"]))
        hint = "train.init_from needs the model settings of the run that wrote them"
    want = tree.flatten(_meta_init(cfg))
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    problem = None
    if missing or unexpected:
        problem = (
            f"missing {', '.join(missing[:2])}" if missing else f"unexpected {', '.join(unexpected[:2])}"
        )
    else:
        k = next((k for k in want if got[k].shape != want[k].shape), None)
        if k is not None:
            problem = f"{k} is {list(got[k].shape)}, this run's model has {list(want[k].shape)}"
    if problem is not None:
        raise CheckpointError(f"{path}: its params do not fit this run's model ({problem}); {hint}")
    return tree.unflatten({k: got[k].to(device) for k in want}), path


# Plain text (no special tokens) a foreign tokenizer.json must encode as the chosen tiktoken encoding.
_PROBE_TEXTS = (
    "ROMEO: But, soft! what light through yonder window breaks? It is the east.",
    "In 2024, 1234567 people paid $3.50; naïve café 日本語 🙂\n\n  indented\tcode()",
)


def check_tokenizer(spec: str | Path, tok, field: str = "data.tokenizer") -> None:
    """For a Hugging Face folder that does not record its tiktoken encoding but has a tokenizer.json:
    refuse (one line) when that tokenizer encodes sample text differently from ``tok``, the one this
    run would use — training a model on another vocabulary's ids is silent garbage. Needs the
    ``tokenizers`` library (a transformers dependency); without it, or without tokenizer.json,
    nothing can be checked."""
    path = Path(spec)
    if not hf.is_hf_dir(path) or hf.read_record(path) is not None or not (path / "tokenizer.json").is_file():
        return
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    try:
        theirs = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # the library's errors are plain Exceptions
        raise CheckpointError(f"{path / 'tokenizer.json'}: not readable ({str(e).splitlines()[0]})") from None
    for text in _PROBE_TEXTS:
        if theirs.encode(text, add_special_tokens=False).ids != tok.encode(text):
            raise CheckpointError(
                f"{path / 'tokenizer.json'}: encodes text differently from {field}={tok.name} (Lumina uses "
                f"tiktoken encodings only); set {field} to the encoding this model was trained with"
            )


def _meta_init(cfg: ModelConfig) -> TensorDict:
    from lumina.model import init

    return init(cfg, device="meta")


def _hf_start(cfg: RunConfig, path: Path) -> RunConfig:
    """``cfg`` with a Hugging Face folder's model, its recorded tokenizer, seq_len within its context."""
    model = hf.model_config_of_dir(path)
    record = hf.read_record(path) or {}
    data = cfg.data
    if record.get("tokenizer"):
        data = dataclasses.replace(data, tokenizer=str(record["tokenizer"]))
    train = dataclasses.replace(cfg.train, seq_len=min(cfg.train.seq_len, model.max_seq_len))
    return dataclasses.replace(cfg, model=model, data=data, train=train)


def start_config(probe: RunConfig) -> dict[str, Any] | None:
    """The starting config (``to_dict`` form, in place of the preset) of a run whose
    ``train.init_from`` is a Hugging Face folder; None otherwise (the preset stays)."""
    if not probe.train.init_from or not hf.is_hf_dir(probe.train.init_from):
        return None
    return to_dict(_hf_start(probe, Path(probe.train.init_from)))


def hf_run_config(path: str | Path, tokenizer: str | None = None) -> RunConfig:
    """A RunConfig for reading a Hugging Face folder (``generate``): the folder's model, the default
    preset's everything else; the tokenizer: ``tokenizer``, else the recorded one, else gpt2."""
    from lumina import presets

    cfg = _hf_start(presets.get("debug"), Path(path))
    if tokenizer:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))
    return cfg
