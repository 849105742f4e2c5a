"""The tensor part of a checkpoint: one safetensors file per rank plus an index of flat chunks, so a
checkpoint written at any world size loads at any other, 1 included, and loading never runs code.

    shard_00000.safetensors   rank 0's pieces: 1-D tensors, one per checkpoint tensor it holds
    shard_00001.safetensors   rank 1's ...
    index (in meta.msgpack)   {name: {"shape", "dtype", "chunks": [{"file", "offset", "numel"}]}}

Every tensor is seen flattened (row-major). A rank holds one contiguous range of it:
- a plain or replicated tensor: rank 0 writes it whole (offset 0), the other ranks nothing;
- an FSDP2 parameter or moment (a DTensor sharded on dim 0, ``torch.chunk``'s rule): the local rows,
  which are one flat range;
- a ``Piece``: a range an engine that partitions flattened tensors (DeepSpeed ZeRO) reports itself.

The index is built without ever pickling: each rank contributes its (offset, numel) per tensor in
one int64 ``all_gather`` (numbers only; ``all_gather_object`` pickles and is never used), and every
rank derives the same index from it. Reading checks that the chunks of each tensor tile it exactly
(no gap, no overlap) with the indexed dtype, then reshapes to the global shape.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist

__all__ = [
    "Piece",
    "ShardError",
    "assign",
    "copy_into",
    "dist_info",
    "is_dtensor",
    "local_rows",
    "owned",
    "placed_like",
    "read_index",
    "read_tensors",
    "row_range",
    "shard_file",
    "whole",
    "write_shard",
]


class ShardError(ValueError):
    """Shards that cannot be read as indexed; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """This rank's elements ``[offset, offset + local.numel())`` of a tensor of ``shape`` seen flat."""

    shape: tuple[int, ...]
    offset: int
    local: torch.Tensor  # 1-D, the tensor's dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, end) rank ``rank`` of ``world`` holds of a dim-0 sharded tensor (torch.chunk)."""
    per = math.ceil(rows / world) if rows else 0
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def _is_sharded(t: torch.Tensor) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(getattr(p, "dim", None) == 0 for p in placements)


def shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


def _local(
    name: str, t: torch.Tensor | Piece, rank: int, world: int
) -> tuple[list[int], torch.dtype, int, torch.Tensor | None]:
    """(global shape, dtype, flat offset, this rank's flat elements or None)."""
    if isinstance(t, Piece):
        return list(t.shape), t.dtype, t.offset, t.local.detach().reshape(-1)
    shape = list(t.shape)
    if not _is_sharded(t):
        return shape, t.dtype, 0, t.detach().reshape(-1) if rank == 0 else None
    start, end = row_range(shape[0], rank, world)
    local = t.to_local()
    if local.shape[0] != end - start:
        raise ShardError(
            f"{name}: this rank holds {local.shape[0]} rows, torch.chunk's rule gives {end - start}"
        )
    row = math.prod(shape[1:])
    return shape, t.dtype, start * row, local.detach().reshape(-1)


def write_shard(folder: Path, tensors: dict[str, torch.Tensor | Piece]) -> dict[str, Any]:
    """Write this rank's pieces of ``tensors`` (every rank passes the same names) to
    ``folder/shard_<rank>.safetensors``, fsync it, and return the index (the same on every rank).
    Collective when a process group is up: every rank calls it."""
    from lumina.checkpoint import fsync_path  # checkpoint imports this module

    rank, world = dist_info()
    names = sorted(tensors)
    mine, spans, info = {}, torch.zeros(len(names), 2, dtype=torch.int64), {}
    for i, name in enumerate(names):
        shape, dtype, offset, local = _local(name, tensors[name], rank, world)
        info[name] = (shape, dtype)
        if local is not None and local.numel():
            mine[name] = local.contiguous().cpu()
            spans[i] = torch.tensor([offset, local.numel()])
    file = folder / shard_file(rank)
    safetensors.torch.save_file(mine, str(file))
    fsync_path(file)
    gathered = [spans]
    if world > 1:  # numbers only: each rank's (offset, numel) per tensor
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        out = [torch.empty_like(spans, device=dev) for _ in range(world)]
        dist.all_gather(out, spans.to(dev))
        gathered = [g.cpu() for g in out]
    index = {}
    for i, name in enumerate(names):
        shape, dtype = info[name]
        chunks = sorted((int(g[i, 0]), int(g[i, 1]), r) for r, g in enumerate(gathered) if int(g[i, 1]) > 0)
        index[name] = {
            "shape": shape,
            "dtype": str(dtype).removeprefix("torch."),
            "chunks": [{"file": shard_file(r), "offset": o, "numel": n} for o, n, r in chunks],
        }
    return index


def read_index(index: object, where: Path) -> dict[str, Any]:
    """``index`` checked for the shape the readers rely on (plain data from msgpack)."""
    ok = isinstance(index, dict) and all(
        isinstance(spec, dict)
        and isinstance(spec.get("shape"), list)
        and isinstance(spec.get("chunks"), list)
        and all(isinstance(c, dict) and {"file", "offset", "numel"} <= c.keys() for c in spec["chunks"])
        for spec in index.values()
    )
    if not ok:
        raise ShardError(f"{where}: the tensor index is not a table of shapes and chunks")
    return index


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    try:  # a length-prefixed JSON header and raw bytes: parsing cannot run code
        return safetensors.torch.load_file(str(file))
    except FileNotFoundError:
        raise ShardError(f"{file}: missing") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for foreign bytes
        raise ShardError(f"{file}: not a safetensors shard ({type(e).__name__})") from None


def read_tensors(folder: Path, index: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full tensors (CPU) of every indexed name, assembled from the shard files of ``folder``."""
    files = sorted({str(c["file"]) for spec in index.values() for c in spec["chunks"]})
    if any(Path(f).name != f for f in files):
        raise ShardError(f"{folder}: the index names a shard outside the checkpoint folder")
    shards = {f: _load_file(folder / f) for f in files}
    out = {}
    for name, spec in index.items():
        dtype = getattr(torch, str(spec.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ShardError(f"{folder}: {name}: unknown dtype {spec.get('dtype')!r}")
        shape = [int(x) for x in spec["shape"]]
        parts, expect = [], 0
        for c in spec["chunks"]:
            part = shards[c["file"]].get(name)
            if (
                part is None
                or part.dtype != dtype
                or part.dim() != 1
                or int(c["offset"]) != expect
                or part.numel() != int(c["numel"])
            ):
                raise ShardError(
                    f"{folder / c['file']}: {name}: chunk at element {c['offset']} missing or not as indexed"
                )
            parts.append(part)
            expect += part.numel()
        if expect != math.prod(shape):
            raise ShardError(
                f"{folder}: {name}: its chunks hold {expect} elements, shape {shape} needs {math.prod(shape)}"
            )
        flat = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(shape)
    return out


def owned(t: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """``t`` copied onto ``device`` into a fresh allocation of its own: what a loader hands a run.
    ``read_tensors`` returns views into the files (a distributed rank then copies only its rows); a
    safetensors tensor starts wherever the format put it, where every tensor a running step makes
    starts on the allocator's 64-byte boundary, and some kernels round by where their operands start:
    on the AMD EPYC of the CI type, torch's one-row matmul (an expert holding one token) gave other
    last bits for a weight 28 bytes past a boundary, so a run resumed from a checkpoint left a
    straight run's bits at its first step. On CUDA this is the copy ``.to(device)`` made anyway."""
    return t.to(device, copy=True)


def local_rows(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What ``target`` (a tensor of the running world: a dim-0 sharded DTensor, or a full tensor)
    holds of the full tensor ``full``."""
    if not _is_sharded(target):
        return full
    rank, world = dist_info()
    start, end = row_range(full.shape[0], rank, world)
    return full[start:end]


def is_dtensor(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is a DTensor (FSDP's leaves and their gradients and moments)."""
    return hasattr(t, "device_mesh")


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's whole tensor (a collective when it is sharded or partial: every rank calls it);
    any other tensor, or None, as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def placed_like(local: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``local`` as this rank's part of a DTensor placed like the DTensor ``ref`` (same mesh,
    placements, global shape and stride; no collective)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride())


@torch.no_grad()
def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``target`` (a full tensor, or this rank's dim-0 shard of a DTensor) from the full tensor."""
    rows = local_rows(full, target)
    (target.to_local() if _is_sharded(target) else target).copy_(rows)


@torch.no_grad()
def assign(target: torch.Tensor, src: torch.Tensor) -> None:
    """Set ``target`` from ``src``: a tensor of the same layout (a DTensor like it, or a plain one
    like it) or the full tensor of a sharded ``target``."""
    if is_dtensor(src):
        target.copy_(src)
    else:
        copy_into(target, src)
