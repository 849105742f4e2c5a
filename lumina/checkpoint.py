"""Checkpoints: one directory per save, written atomically, loaded without ever executing code.

    runs/<name>/checkpoints/step_00000300/     (newest ``keep_last`` kept)
    runs/<name>/checkpoints/best -> best_00000250/   (a symlink: the best eval loss so far)
        shard_00000.safetensors   the train-state tree flattened to dotted keys, rank 0's part
        shard_00001.safetensors   ... one file per rank of the run that wrote it (``lumina.shards``)
        meta.msgpack        {"format", "step", "config", "data", "extra", "world_size", "tensors"}:
                            plain data only; ``tensors`` indexes every tensor's flat chunks

A checkpoint written at any world size loads at any other, 1 included (``lumina.shards``). Under a
process group saving is collective: every rank writes its shard into the temporary folder, a
barrier waits for all, then rank 0 writes the metadata, renames, and applies retention. Format
``lumina.checkpoint/2`` (one ``state.safetensors``, written by older versions) still loads.

Crash safety (a ``kill -9`` at any instant leaves every complete checkpoint loadable):
- a checkpoint is written into a hidden ``.tmp-*`` directory, its files fsynced, and renamed into place,
  so a crash leaves either no checkpoint or a whole one;
- retention never deletes a checkpoint in place: it renames it to ``.trash-*`` first (one atomic
  step), so no half-deleted folder ever looks like a checkpoint;
- ``best`` is a symlink swapped atomically (``os.replace``) to a newly written ``best_<step>``: it
  is never absent while it is replaced;
- ``clean`` (called when a run starts) removes what a crash left: ``.tmp-*`` / ``.trash-*``
  folders, ``best_*`` folders ``best`` does not point to, and step folders missing a file;
- ``checkpoints`` / ``latest`` list complete checkpoints only, ordered by step (never by mtime:
  deleting inside a folder touches its mtime).

Loading parses a JSON header, raw bytes and msgpack — no pickle anywhere — and anything that is not
exactly what ``save_checkpoint`` wrote (a missing file, foreign bytes, a pickle payload, a wrong
format tag, a state whose keys, shapes or dtypes differ from the run's) raises ``CheckpointError``
with one line naming the file.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import msgpack
import safetensors.torch
import torch
import torch.distributed as dist
from tensordict import TensorDict

from lumina import shards, tree

__all__ = [
    "CheckpointError",
    "ahead_of",
    "check_compatible",
    "checkpoints",
    "clean",
    "latest",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
]

FORMAT = "lumina.checkpoint/3"
FORMAT_V2 = "lumina.checkpoint/2"  # one state.safetensors; still loaded
STATE_FILE, META_FILE = "state.safetensors", "meta.msgpack"  # STATE_FILE: format /2 only
BEST = "best"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_BEST_DIR = re.compile(r"best_(\d{8,})(?:\.(\d+))?")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file."""


def _complete(path: Path) -> bool:
    tensors = (path / shards.shard_file(0)).is_file() or (path / STATE_FILE).is_file()
    return (path / META_FILE).is_file() and tensors


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete step checkpoints of a run, oldest (lowest step) first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and not p.is_symlink() and p.is_dir() and _complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path:
    """The complete checkpoint of ``run_dir`` with the highest step."""
    found = checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint to resume from")
    return found[-1]


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so a rename or a new entry in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving it half-deleted under its own name."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _shared_pid() -> int:
    """Rank 0's process id on every rank (it names the temporary folder all ranks write into)."""
    pid = torch.tensor([os.getpid()], dtype=torch.int64)
    if shards.dist_info()[1] > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        pid = pid.to(dev)
        dist.broadcast(pid, src=0)
    return int(pid.item())


def _flat(state: TensorDict | dict[str, Any]) -> dict[str, Any]:
    return tree.flatten(state) if isinstance(state, TensorDict) else dict(state)


def _write_dir(root: Path, name: str, state: TensorDict | dict[str, Any], meta: dict[str, Any]) -> Path:
    """``root/name`` holding ``state`` and ``meta``, written into a temporary folder and renamed
    into place (an existing ``root/name`` is discarded first). Collective under a process group."""
    rank, world = shards.dist_info()
    final = root / name
    tmp = root / f".tmp-{name}-{_shared_pid()}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        index = shards.write_shard(tmp, _flat(state))
        _barrier()  # every shard is on disk
        if rank == 0:
            body = msgpack.packb(meta | {"world_size": world, "tensors": index})
            with open(tmp / META_FILE, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
            if final.exists():
                _discard(final)
            os.replace(tmp, final)
            fsync_path(root)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _point_best(root: Path, target: Path) -> None:
    """Swap the ``best`` symlink to ``target`` in one atomic step, then drop the old best."""
    link = root / BEST
    old = link.resolve() if link.is_symlink() else None
    if link.exists() and not link.is_symlink():  # a real folder (written by an older lumina)
        _discard(link)
    tmp = root / f".tmp-link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)
    fsync_path(root)
    if old is not None and old != target.resolve() and old.parent == root.resolve():
        _discard(old)


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
    """Write ``state`` (a train-state tree, or a flat mapping of dotted names to tensors, DTensor
    shards or ``shards.Piece``s) and plain-data metadata atomically; keep the newest ``keep_last``
    step checkpoints. Step checkpoints past ``step`` go first: a run is only ever behind its
    checkpoints after a rollback, so they hold steps it abandoned, and ``latest`` (the highest
    step) must name where it is now — deleted once this one is in place, never before, so that a
    run always keeps one to resume from. ``name="best"`` writes the best checkpoint instead
    (outside retention); the returned path is then ``checkpoints/best``. Under a process group
    every rank calls it; rank 0 alone touches the folder structure, and all ranks return once the
    checkpoint is in place."""
    if name not in (None, BEST):
        raise ValueError(f"checkpoint name must be None (a step checkpoint) or {BEST!r}, got {name!r}")
    root = Path(run_dir) / "checkpoints"
    rank = shards.dist_info()[0]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "step": step, "config": config, "data": data, "extra": extra or {}}
    if name == BEST:
        base, n = f"best_{step:08d}", 0
        current = (root / BEST).resolve() if (root / BEST).is_symlink() else None
        dirname = base
        while (root / dirname).exists() and (root / dirname).resolve() == current:
            n += 1  # never overwrite the folder ``best`` points to: write beside it, then swap
            dirname = f"{base}.{n}"
        written = _write_dir(root, dirname, state, meta)
        if rank == 0:
            _point_best(root, written)
        _barrier()
        return root / BEST
    final = _write_dir(root, f"step_{step:08d}", state, meta)
    if rank == 0:
        for old in ahead_of(run_dir, step):  # see the docstring
            _discard(old)
        for old in checkpoints(run_dir)[:-keep_last]:
            _discard(old)
    _barrier()
    return final


def ahead_of(run_dir: str | Path, step: int) -> list[Path]:
    """The run's step checkpoints past ``step`` (after a rollback: the steps it abandoned)."""
    return [p for p in checkpoints(run_dir) if int(_STEP_DIR.fullmatch(p.name).group(1)) > step]


def clean(run_dir: str | Path) -> list[str]:
    """Remove what an interrupted save or deletion left in ``run_dir/checkpoints``; returns one
    description per removed folder (for the run's log)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    link = root / BEST
    best = link.resolve() if link.is_symlink() else None
    removed = []
    for p in sorted(root.iterdir()):
        if p.name.startswith((".tmp-", ".trash-")):
            why = "an interrupted save" if p.name.startswith(".tmp-") else "an interrupted deletion"
        elif _BEST_DIR.fullmatch(p.name) and p.resolve() != best:
            why = "a best checkpoint that was being replaced"
        elif _STEP_DIR.fullmatch(p.name) and p.is_dir() and not _complete(p):
            why = "an incomplete checkpoint"
        else:
            continue
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(f"{p.name} ({why})")
    return removed


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
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_V2):
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{meta_file}: not lumina checkpoint metadata (format {got!r}, want {FORMAT!r})"
        )
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_file}: metadata lacks an integer 'step' and a 'config' table")
    return meta


def load_checkpoint(
    path: str | Path, device: str = "cpu", *, prefix: str = ""
) -> tuple[TensorDict, dict[str, Any]]:
    """(state, meta) of a checkpoint directory written by ``save_checkpoint``; with ``prefix`` (e.g.
    ``"params."``) only the tensors whose names start with it (format /3 reads nothing else)."""
    path = Path(path)
    meta = read_meta(path)
    if meta["format"] == FORMAT_V2:
        flat = {k: v for k, v in _load_v2(path / STATE_FILE).items() if k.startswith(prefix)}
    else:
        try:
            index = shards.read_index(meta.get("tensors"), path / META_FILE)
            flat = shards.read_tensors(path, {k: v for k, v in index.items() if k.startswith(prefix)})
        except shards.ShardError as e:
            raise CheckpointError(str(e)) from None
    if not flat:
        raise CheckpointError(f"{path}: holds no tensors")
    # fresh allocations on the device, aligned as a running state's tensors (shards.owned)
    return tree.unflatten({k: shards.owned(v, device) for k, v in flat.items()}), meta


def _load_v2(state_file: Path) -> dict[str, torch.Tensor]:
    raw = _read(state_file)
    try:  # safetensors parses a length-prefixed JSON header and raw bytes; it cannot run code
        return safetensors.torch.load(raw)
    except Exception as e:
        raise CheckpointError(f"{state_file}: not a safetensors state ({type(e).__name__}: {e})") from None


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
