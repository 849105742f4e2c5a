"""Sharded checkpoints: one safetensors file per rank plus a msgpack index; they load at any world
size, 1 included, and loading never executes code.

    DIR/index.msgpack           {"format", "world_size", "tensors": {name: {"shape", "dtype", "chunks":
                                 [{"file", "start", "rows"}]}}, "meta": {...}}: plain data
    DIR/shard_00000.safetensors rank 0's rows of every tensor it holds (a JSON header + raw bytes)
    DIR/shard_00001.safetensors ...

Each tensor is split along its first dimension into consecutive chunks of rows. An FSDP2 parameter
(a DTensor sharded on dim 0, ``torch.chunk``'s rule: ceil(n / W) rows per rank, the last ranks
shorter or empty) is written by each rank as its local shard. A replicated or plain tensor is written
whole by rank 0. The index is computed from the global shapes and the world size, the same rule on
every rank, so no object is ever gathered: collectives that pickle (``broadcast_object_list``,
``all_gather_object``) are never used.

Writing is atomic. Rank 0 creates a hidden temporary folder, every rank writes and fsyncs its shard
into it, a barrier waits for all of them, then rank 0 writes the index and renames the folder into
place.

Loading reads the index (msgpack) and the shard files (safetensors), checks every chunk against
the index, and assembles full tensors. ``local_rows`` then cuts out what a rank of another world
size holds. A file that is not what ``save_sharded`` wrote raises ``ShardError`` with one line
naming it: a pickle payload, foreign bytes, a missing or overlapping chunk, a wrong dtype.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import msgpack
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist

from lumina.checkpoint import fsync_path

__all__ = [
    "FORMAT",
    "INDEX",
    "ShardError",
    "copy_into",
    "load_sharded",
    "local_rows",
    "row_range",
    "save_sharded",
]

FORMAT = "lumina.shards/1"
INDEX = "index.msgpack"


class ShardError(ValueError):
    """A sharded checkpoint that cannot be loaded; the message is one line naming the file."""


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, end) rank ``rank`` of ``world`` holds of a dim-0 sharded tensor (torch.chunk)."""
    per = math.ceil(rows / world) if rows else 0
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def _is_sharded(t: torch.Tensor) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(getattr(p, "dim", None) == 0 for p in placements)


def _shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


def save_sharded(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` (name -> full tensor or dim-0 sharded DTensor; every rank passes the same
    names) and the plain-data ``meta`` to the folder ``path``. Collective: every rank calls it.
    Without a process group it writes a one-rank checkpoint."""
    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if on:
        dist.barrier()
    mine, index = {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        sharded = _is_sharded(t)
        shape = list(t.shape)
        dtype = str(t.dtype).removeprefix("torch.")
        chunks = []
        for r in range(world if sharded else 1):
            if not sharded:  # whole, from rank 0 (a 0-dim tensor is one chunk of "0 rows")
                chunks.append({"file": _shard_file(0), "start": 0, "rows": shape[0] if shape else 0})
                continue
            start, end = row_range(shape[0], r, world)
            if end > start:
                chunks.append({"file": _shard_file(r), "start": start, "rows": end - start})
        index[name] = {"shape": shape, "dtype": dtype, "chunks": chunks}
        local = t.to_local() if sharded else t
        if sharded:
            start, end = row_range(shape[0], rank, world)
            if local.shape[0] != end - start:
                raise ShardError(
                    f"{name}: this rank holds {local.shape[0]} rows, torch.chunk's rule gives {end - start}"
                )
            if end > start:
                mine[name] = local.detach().contiguous().cpu()
        elif rank == 0:
            mine[name] = t.detach().contiguous().cpu()
    shard = tmp / _shard_file(rank)
    safetensors.torch.save_file(mine, str(shard))
    fsync_path(shard)
    if on:
        dist.barrier()
    if rank == 0:
        body = {"format": FORMAT, "world_size": world, "tensors": index, "meta": meta}
        (tmp / INDEX).write_bytes(msgpack.packb(body, use_bin_type=True))
        fsync_path(tmp / INDEX)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    if on:
        dist.barrier()
    return path


def _format_of(body: object) -> object:
    return body.get("format") if isinstance(body, dict) else None


def _read_index(path: Path) -> dict[str, Any]:
    file = path / INDEX
    try:
        body = msgpack.unpackb(file.read_bytes(), raw=False, strict_map_key=True)
    except FileNotFoundError:
        raise ShardError(f"{file}: missing (not a sharded lumina checkpoint)") from None
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError) as e:
        raise ShardError(f"{file}: not a msgpack index ({type(e).__name__})") from None
    if (
        not isinstance(body, dict)
        or body.get("format") != FORMAT
        or not isinstance(body.get("tensors"), dict)
    ):
        raise ShardError(f"{file}: not a lumina shard index (format {_format_of(body)!r}, want {FORMAT!r})")
    return body


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(file))
    except FileNotFoundError:
        raise ShardError(f"{file}: missing") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for foreign bytes
        raise ShardError(f"{file}: not a safetensors shard ({type(e).__name__})") from None


def load_sharded(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full tensors (name -> tensor, on CPU) and the meta of a sharded checkpoint, at any world size."""
    path = Path(path)
    body = _read_index(path)
    files = {c["file"] for spec in body["tensors"].values() for c in spec["chunks"]}
    shards = {f: _load_shard(path / f) for f in sorted(files)}
    out = {}
    for name, spec in body["tensors"].items():
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ShardError(f"{path / INDEX}: {name}: unknown dtype {spec['dtype']!r}")
        shape = [int(x) for x in spec["shape"]]
        parts, expect = [], 0
        for c in spec["chunks"]:
            part = shards[c["file"]].get(name)
            rows = part.shape[0] if part is not None and part.dim() else 0
            if part is None or part.dtype != dtype or int(c["start"]) != expect or rows != int(c["rows"]):
                raise ShardError(
                    f"{path / c['file']}: {name}: chunk at row {c['start']} missing or not as indexed"
                )
            parts.append(part)
            expect += rows
        full = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.empty(shape, dtype=dtype)
        if list(full.shape) != shape:
            raise ShardError(
                f"{path / INDEX}: {name}: its chunks give shape {list(full.shape)}, the index says {shape}"
            )
        out[name] = full
    return out, body["meta"]


def local_rows(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What ``target`` (a parameter of the running world: a dim-0 sharded DTensor, or a full tensor)
    holds of the full tensor ``full``."""
    if not _is_sharded(target):
        return full
    start, end = row_range(full.shape[0], dist.get_rank(), dist.get_world_size())
    return full[start:end]


@torch.no_grad()
def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``target`` (a full tensor, or this rank's dim-0 shard of a DTensor) from the full tensor."""
    rows = local_rows(full, target)
    (target.to_local() if _is_sharded(target) else target).copy_(rows)
