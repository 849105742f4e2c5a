"""Counter-based random numbers for the pure train step: a key in, the same numbers out, everywhere.

A key is a 0-dim int64 tensor holding a 32-bit value. ``fold_in(key, *ints)`` derives a new key
(per step, micro-batch, layer, purpose) and ``uniform(key, shape)`` hashes (key, element index) into
U[0, 1) floats. Nothing reads or advances a global generator, so a step is a function of its inputs
(the key lives in the train state and is checkpointed), and the numbers are identical in eager mode,
under ``torch.compile`` and on any device: every intermediate fits in int64 without overflow (32-bit
multiplies are split into 16-bit halves), so no backend's wrap-around behaviour matters.

The mixing function is Wellons' "lowbias32" integer hash (two multiply-xorshift rounds).
"""

from __future__ import annotations

import torch

__all__ = ["fold_in", "key_from_seed", "uniform"]

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 without int64 overflow (hi * c < 2^48)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def key_from_seed(seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device) ^ 0x9E3779B9)


def fold_in(key: torch.Tensor, *data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``key`` and integers (Python ints or int64 tensors), order-sensitive."""
    for d in data:
        key = _hash32(_hash32(key) ^ (d & _MASK32 if isinstance(d, int) else d.to(torch.int64) & _MASK32))
    return key


def uniform(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) of ``shape`` (24-bit resolution) from ``key``; element i hashes (key, i)."""
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, dtype=torch.int64, device=key.device)
    bits = _hash32(_hash32(idx ^ key) + key)  # two rounds: neighbouring indices decorrelate fully
    return ((bits >> 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(shape).to(dtype)
