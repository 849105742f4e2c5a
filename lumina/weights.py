"""Starting a run from trained weights: ``train.init_from=PATH`` (a Lumina checkpoint folder, or a run
folder: its newest complete checkpoint).

Only the checkpoint's ``params`` are read (``lumina.checkpoint``: safetensors shards, any world
size, never pickle);
the optimizer, step, RNG, data position and schedule of the new run start fresh. Weights of a run
that trained LoRA adapters on a (quantized) base are merged first (``lumina.quant.merge``), so a
fine-tune's result is itself a starting point. The params must have exactly the shapes this run's
model config gives (use the same preset and model settings as the run that wrote them); then
``init_train_state`` quantizes / adapts them as ``model.quant`` and ``train.lora`` say — the QLoRA
recipe is ``--train.init_from=runs/base --model.quant=nf4 --train.lora.rank=16``.

This is the minimum a fine-tune needs; issue 15's ``--init-from`` generalises it (Hugging Face
folders). Every problem with the path or its contents is a ``CheckpointError``: one line naming the
file, exit status 2 from the CLI.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tensordict import TensorDict

from lumina import checkpoint, quant, tree
from lumina.checkpoint import CheckpointError
from lumina.config import ModelConfig

__all__ = ["load_params", "resolve"]


def resolve(spec: str | Path) -> Path:
    """The checkpoint folder ``spec`` names: itself, or a run folder's newest complete checkpoint."""
    path = Path(spec)
    if (path / checkpoint.META_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        return checkpoint.latest(path)
    what = "does not exist" if not path.exists() else "is neither a checkpoint folder nor a run folder"
    raise CheckpointError(f"{path}: {what} (train.init_from wants a Lumina checkpoint or run folder)")


def load_params(
    spec: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu"
) -> tuple[TensorDict, Path]:
    """(fp32 params in the layout ``lumina.model.init(cfg)`` makes, the checkpoint folder read)."""
    path = resolve(spec)
    try:  # a foreign or malformed folder fails here, naming its file
        loaded, _ = checkpoint.load_checkpoint(path, prefix="params.")
    except CheckpointError as e:
        if "holds no tensors" not in str(e):
            raise
        raise CheckpointError(f"{path}: holds no params") from None
    flat = tree.flatten(loaded["params"])
    got = tree.flatten(quant.merge(tree.unflatten(flat)))
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
        raise CheckpointError(
            f"{path}: its params do not fit this run's model ({problem}); "
            "train.init_from needs the model settings of the run that wrote them"
        )
    return tree.unflatten({k: got[k].to(device) for k in want}), path


def _meta_init(cfg: ModelConfig) -> TensorDict:
    from lumina.model import init

    return init(cfg, device="meta")
