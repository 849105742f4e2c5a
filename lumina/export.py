"""``python -m lumina.run export RUN|CHECKPOINT OUT``: a trained model as a folder
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)``
load (docs/export.md).

    OUT/config.json                  LlamaForCausalLM (dense), MixtralForCausalLM (MoE) or
                                     Qwen2MoeForCausalLM (MoE with shared experts; lumina.hf)
    OUT/model.safetensors            (above --max-shard-size: model-0000i-of-0000n.safetensors + index)
    OUT/generation_config.json       <|endoftext|> as EOS / pad
    OUT/tokenizer.json               byte-level BPE with exactly tiktoken's ids, specials included
    OUT/tokenizer_config.json        the generic fast tokenizer, ChatML chat template
    OUT/lumina.json                  which tiktoken encoding, source checkpoint, step (read back by
                                     --init-from / generate)

Experts are written per expert (Mixtral: ``block_sparse_moe.experts.<e>.w1/w2/w3``), the key layout
``save_pretrained`` writes (transformers 4.x and 5.x alike; 5.x fuses them when loading). A model
with no exact transformers equivalent (Mixture-of-Depths, a balance bias, MoE in only some layers
without shared experts) is refused with one line before anything is read. A run that trained LoRA adapters
needs ``--merge-lora`` (W + alpha/rank A B in full precision). MoE exports are dropless, as
Mixtral is (and as Lumina generates); a router temperature is folded into the router weights.

The folder is written as ``OUT``'s hidden sibling and renamed into place at the end: an error (or
``--verify`` failing) leaves nothing behind. ``--verify`` loads that folder with transformers
before the rename and compares its logits with Lumina's on the same tokens, and its tokenizer's ids
with tiktoken's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lumina import checkpoint, hf, quant, tree, weights
from lumina.checkpoint import CheckpointError
from lumina.config import ConfigError, ModelConfig, RunConfig, from_dict

__all__ = ["DTYPES", "ExportError", "export", "verify"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Sample texts for --verify's tokenizer check: digits (the {1,3} split), contractions, whitespace
# runs, newlines, non-ASCII, and the special tokens.
SAMPLES = (
    "ROMEO: But, soft! what light through yonder window breaks?",
    "In 2024, 1234567 people paid $3.50 each; 3.14159 ≈ π.",
    "I'll say it's fine, you're sure? We've THEY'LL DON'T",
    "tabs\tand  double  spaces   \n\n  trailing   ",
    "naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi!<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x**2  # comment\r\n",
)


class ExportError(RuntimeError):
    """The export did not reproduce the model (``--verify``): a bug, not bad input (exit 1)."""


def _adapted(params) -> bool:
    """Whether a params tree has quantized / adapted sub-trees (``lumina.quant``)."""
    return any(quant.is_projection(k.rpartition(".")[0]) for k in tree.flatten(params))


def _source(spec: str | Path) -> tuple[Path, ModelConfig, str | None, int | None, RunConfig | None]:
    """(folder, model config, tokenizer name, step, run config) — from metadata only."""
    path = weights.resolve(spec)
    if hf.is_hf_dir(path):
        record = hf.read_record(path) or {}
        return path, hf.model_config_of_dir(path), record.get("tokenizer"), record.get("step"), None
    meta = checkpoint.read_meta(path)
    try:
        run_cfg = from_dict(RunConfig, meta["config"])
    except Exception as e:  # an old or foreign config: one line
        raise CheckpointError(f"{path}: its config does not load ({e})") from None
    return path, run_cfg.model, run_cfg.data.tokenizer, int(meta["step"]), run_cfg


def _refuse_adapters(path: Path, run_cfg: RunConfig | None) -> None:
    lora = f"train.lora.rank={run_cfg.train.lora.rank}" if run_cfg else "LoRA"
    q = run_cfg.model.quant if run_cfg else "none"
    base = f" on a model.quant={q} base" if q != "none" else ""
    raise ConfigError(
        f"{path}: trained LoRA adapters ({lora}{base}); add --merge-lora to export the merged "
        "full-precision weights W + (alpha/rank) A B"
    )


def export(
    spec: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp32",
    verify_logits: bool = False,
    merge_lora: bool = False,
    max_shard_size: str = "5GB",
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``spec``'s model as a Hugging Face folder at ``out``; returns ``out``."""
    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    limit = hf.parse_size(max_shard_size)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"{out}: already exists (export writes a new folder; remove it or choose another)")
    path, cfg, tok_name, step, run_cfg = _source(spec)
    if (problem := hf.export_problem(cfg)) is not None:
        raise ConfigError(f"{path}: cannot export: {problem}")
    if tok_name is None:
        raise CheckpointError(f"{path}: records no tokenizer (not a Lumina checkpoint or export)")
    lora_run = run_cfg is not None and quant.frozen_base(run_cfg)
    if lora_run and not merge_lora:  # refused from the config, before reading any tensor
        _refuse_adapters(path, run_cfg)
    t0 = time.perf_counter()
    log(f"[export] reading {path}")
    if run_cfg is None:
        params = hf.load_dir(path)[1]
    else:
        params = checkpoint.load_checkpoint(path, prefix="params.")[0]["params"]
    adapted = _adapted(params)
    if adapted and not merge_lora:
        _refuse_adapters(path, run_cfg)
    if adapted:
        log("[export] merging the LoRA adapters into full-precision weights")
    params = quant.merge(params) if adapted else tree.cast(params, torch.float32)

    from lumina.data.tokenizer import get_tokenizer

    tok = get_tokenizer(tok_name)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer {tok_name} needs {tok.vocab_size} ids, the model has {cfg.vocab_size}"
        )
    state_dict, config = hf.to_hf(cfg, params, expert_layout=hf.FILE_EXPERT_LAYOUT)
    state_dict = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
    name = str(DTYPES[dtype]).removeprefix("torch.")
    config.update(dtype=name, torch_dtype=name, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    config.update(pad_token_id=tok.eot_id, use_cache=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_json(tmp / hf.CONFIG_FILE, config)
        generation = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
        _write_json(tmp / "generation_config.json", generation)
        hf.write_weights(tmp, state_dict, limit, log)
        log(f"[export] writing tokenizer.json ({tok_name}: {tok.pad_id} ids incl. specials)")
        _write_json(tmp / "tokenizer.json", hf.tokenizer_json(tok.encoding), indent=None)
        _write_json(tmp / "tokenizer_config.json", hf.tokenizer_config(tok, cfg.max_seq_len))
        record = {"format": hf.RECORD_FORMAT, "tokenizer": tok_name, "source": str(path), "step": step,
                  "dtype": dtype, "merged_lora": adapted}  # fmt: skip
        _write_json(tmp / hf.RECORD_FILE, record)
        if verify_logits:
            rounded = params.apply(lambda t: t.to(DTYPES[dtype]).float())  # the values written
            verify(tmp, rounded, cfg, tok, log)
        for f in tmp.iterdir():
            checkpoint.fsync_path(f)
        os.replace(tmp, out)  # an empty OUT is replaced; nothing else is ever overwritten
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    arch = config["architectures"][0]
    log(f"[export] {out}: {arch}, {dtype}, tokenizer {tok_name} ({time.perf_counter() - t0:.1f}s)")
    return out


def _write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _from_pretrained_kwargs(transformers) -> dict[str, Any]:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    return {key: torch.float32}


def verify(
    folder: Path, params, cfg: ModelConfig, tok, log: Callable[[str], None] = print, atol: float = 1e-4
) -> float:
    """Load ``folder`` with transformers and compare its logits with ``apply(params)`` (fp32, both
    dropless) on two rows of tokens, and its tokenizer's ids with tiktoken's on ``SAMPLES``. Raises
    ``ExportError`` on a difference; returns the largest logit difference."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("--verify needs transformers (pip install transformers)") from None
    from lumina.generate import inference_config
    from lumina.model import apply

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **_from_pretrained_kwargs(transformers))
    model.eval()
    T = min(cfg.max_seq_len, 64)
    text = tok.encode(" ".join(SAMPLES))[:T]
    text += [tok.eot_id] * (T - len(text))
    noise = torch.randint(0, tok.pad_id, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = torch.tensor([text, noise])
    with torch.no_grad():
        theirs = model(tokens).logits.float()
        ours = apply(params, tokens, inference_config(cfg), train=False)[0].float()
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    if not diff <= atol * max(1.0, scale):
        raise ExportError(
            f"verify: {folder}: transformers' logits differ from Lumina's by {diff:.3g} "
            f"(max |logit| {scale:.3g}, allowed {atol:g} relative)"
        )
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for s in SAMPLES:
        want = tok.encoding.encode(s, allowed_special="all")
        got = hf_tok(s, add_special_tokens=False)["input_ids"]
        if got != want:
            raise ExportError(f"verify: {folder}: tokenizer ids differ from tiktoken's on {s[:30]!r}")
    log(
        f"[export] verified with transformers {transformers.__version__}: {type(model).__name__} logits "
        f"max |diff| {diff:.2e} (max |logit| {scale:.2f}) on {list(tokens.shape)} tokens; tokenizer ids "
        f"equal tiktoken's on {len(SAMPLES)} texts"
    )
    return diff
