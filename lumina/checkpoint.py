"""Checkpoints: one directory per save, written atomically, loaded without ever executing code.

    runs/<name>/checkpoints/step_00000300/     (and checkpoints/best/: the best eval loss so far)
        state.safetensors   the train-state tree, flattened to dotted keys (safetensors: a JSON
                            header plus raw tensor bytes)
        meta.msgpack        {"format", "step", "config", "data", "extra"}: plain data only

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash leaves
either no checkpoint or a whole one. Loading parses a JSON header, raw bytes and msgpack — no pickle
anywhere — and anything that is not exactly what ``save_checkpoint`` wrote (a missing file, foreign
bytes, a pickle payload, a wrong format tag, a state whose keys, shapes or dtypes differ from the
run's) raises ``CheckpointError`` with one line naming the file.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import msgpack
import safetensors.torch
from tensordict import TensorDict

from lumina import tree

__all__ = [
    "CheckpointError",
    "check_compatible",
    "checkpoints",
    "latest",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
]

FORMAT = "lumina.checkpoint/2"
STATE_FILE, META_FILE = "state.safetensors", "meta.msgpack"
_STEP_DIR = re.compile(r"step_(\d{8})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file."""


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name))


def latest(run_dir: str | Path) -> Path:
    found = checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint to resume from")
    return found[-1]


def save_checkpoint(
    run_dir: str | Path,
    state: TensorDict,
    *,
    step: int,
    config: dict[str, Any],
    data: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep_last: int = 3,
    name: str | None = None,
) -> Path:
    """Write ``state`` and plain-data metadata atomically; keep the newest ``keep_last`` step
    checkpoints. ``name`` (e.g. "best") writes ``checkpoints/<name>`` instead, outside retention."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"step_{step:08d}")
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"format": FORMAT, "step": step, "config": config, "data": data, "extra": extra or {}}
        tensors = {k: v.detach().contiguous().cpu() for k, v in tree.flatten(state).items()}
        for fname, payload in (
            (STATE_FILE, safetensors.torch.save(tensors)),
            (META_FILE, msgpack.packb(meta)),
        ):
            with open(tmp / fname, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete lumina checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The validated metadata of a checkpoint directory (without reading its tensors)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    meta_file = path / META_FILE
    try:
        meta = msgpack.unpackb(_read(meta_file), raw=False, strict_map_key=True)
    except CheckpointError:
        raise
    except Exception as e:  # parsing executes nothing; any failure means "not our bytes"
        raise CheckpointError(f"{meta_file}: not lumina checkpoint metadata ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{meta_file}: not lumina checkpoint metadata (format {got!r}, want {FORMAT!r})"
        )
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_file}: metadata lacks an integer 'step' and a 'config' table")
    return meta


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[TensorDict, dict[str, Any]]:
    """(state, meta) of a checkpoint directory written by ``save_checkpoint``."""
    path = Path(path)
    meta = read_meta(path)
    state_file = path / STATE_FILE
    raw = _read(state_file)
    try:  # safetensors parses a length-prefixed JSON header and raw bytes; it cannot run code
        flat = safetensors.torch.load(raw)
    except Exception as e:
        raise CheckpointError(f"{state_file}: not a safetensors state ({type(e).__name__}: {e})") from None
    if not flat:
        raise CheckpointError(f"{state_file}: holds no tensors")
    return tree.unflatten({k: v.to(device) for k, v in flat.items()}), meta


def check_compatible(state: TensorDict, template: TensorDict, where: str | Path) -> None:
    """Raise ``CheckpointError`` naming ``where`` unless ``state`` has exactly the keys, shapes and
    dtypes of ``template`` (e.g. a fresh ``init_train_state`` of the run's config)."""
    got, want = tree.flatten(state), tree.flatten(template)
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        parts = [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        ]
        raise CheckpointError(
            f"{where}: state does not match this run's model ({'; '.join(p for p in parts if p)})"
        )
    for k, t in want.items():
        g = got[k]
        if g.shape != t.shape or g.dtype != t.dtype:
            raise CheckpointError(
                f"{where}: {k} is {g.dtype} {list(g.shape)}, this run needs {t.dtype} {list(t.shape)}"
            )
