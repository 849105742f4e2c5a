"""Helpers for parameter trees (TensorDicts keyed by dotted paths such as ``layers.3.attn.wq``).

Serialisation is msgpack of (dtype name, shape, raw little-endian bytes) per leaf: loading parses
data and never executes code (no pickle anywhere).
"""

from __future__ import annotations

import sys

import msgpack
import torch
from tensordict import TensorDict, TensorDictBase

__all__ = ["TreeFormatError", "cast", "count", "flatten", "from_bytes", "to_bytes", "unflatten"]

_FORMAT = "lumina.tree/1"
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


class TreeFormatError(ValueError):
    """The bytes are not a tree this module wrote (wrong format, dtype, or size)."""


def flatten(tree: TensorDict) -> dict[str, torch.Tensor]:
    """``{"layers.0.attn.wq": tensor, ...}`` — the dict ``torch.func.functional_call`` wants, in
    ``tree.flatten_keys(".")``'s order (depth first, insertion order). A plain walk: the train step
    flattens several trees a step, and ``flatten_keys`` builds a whole TensorDict to do it (~3x the
    time)."""
    return _walk(tree, "", {})


def _walk(tree: TensorDictBase, prefix: str, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key, value in tree.items():
        if isinstance(value, TensorDictBase):
            _walk(value, f"{prefix}{key}.", out)
        else:
            out[prefix + key] = value
    return out


def unflatten(flat: dict[str, torch.Tensor]) -> TensorDict:
    return TensorDict(flat, batch_size=[]).unflatten_keys(".")


def count(tree: TensorDict) -> int:
    return sum(t.numel() for t in flatten(tree).values())


def cast(tree: TensorDict, dtype: torch.dtype) -> TensorDict:
    """A copy with floating-point leaves cast to ``dtype`` (integer leaves such as steps untouched)."""
    return tree.apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


def to_bytes(tree: TensorDict) -> bytes:
    leaves = {}
    for path, t in flatten(tree).items():
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise TypeError(f"{path}: dtype {t.dtype} cannot be serialised")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        leaves[path] = [name, list(t.shape), data]
    return msgpack.packb({"format": _FORMAT, "byteorder": sys.byteorder, "leaves": leaves}, use_bin_type=True)


def from_bytes(blob: bytes, device: torch.device | str = "cpu") -> TensorDict:
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as e:  # parsing executes nothing; any failure means "not our bytes"
        raise TreeFormatError(f"not a msgpack tree ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise TreeFormatError(f"unknown format {doc.get('format') if isinstance(doc, dict) else type(doc)}")
    if doc.get("byteorder") != sys.byteorder:
        raise TreeFormatError(
            f"written on a {doc.get('byteorder')}-endian machine; this one is {sys.byteorder}"
        )
    leaves = doc.get("leaves")
    if not isinstance(leaves, dict):
        raise TreeFormatError("no table of leaves")
    flat = {}
    for path, leaf in leaves.items():
        try:
            name, shape, data = leaf
            dtype = _DTYPES[name]
            if not data:  # frombuffer rejects an empty buffer
                flat[path] = torch.empty(shape, dtype=dtype, device=device)
                continue
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            flat[path] = raw.view(dtype).reshape(shape).to(device)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise TreeFormatError(f"leaf {path!r} is malformed ({e})") from None
    return unflatten(flat)
