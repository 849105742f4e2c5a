"""Counter-based random numbers for the pure train step: a key in, the same numbers out, everywhere.

A key is a 0-dim int64 tensor holding a 32-bit value. ``fold_in(key, *ints)`` derives a new key
(per step, micro-batch, layer, purpose) and ``uniform(key, shape)`` hashes (key, element index) into
U[0, 1) floats. Nothing reads or advances a global generator, so a step is a function of its inputs
(the key lives in the train state and is checkpointed), and the numbers are identical in eager mode,
under ``torch.compile`` and on any device: every intermediate fits in int64 without overflow (32-bit
multiplies are split into 16-bit halves), so no backend's wrap-around behaviour matters.

The mixing function is Wellons' "lowbias32" integer hash (two multiply-xorshift rounds); the hash and
the draw are defined in ``lumina_kernels.reference`` (``hash32``, ``fold_in``, ``hash_uniform``), and
``fold_in`` and ``uniform`` run the native CPU kernels, bit-identical to those expressions, when they
are built (``lumina.ops``).
"""

from __future__ import annotations

import torch

from lumina import ops
from lumina_kernels import reference

__all__ = ["fold_in", "key_from_seed", "uniform"]

_MASK32 = 0xFFFFFFFF
_hash32 = reference.hash32


def key_from_seed(seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device) ^ 0x9E3779B9)


def fold_in(key: torch.Tensor, *data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``key`` and integers (Python ints or int64 tensors), order-sensitive. Each int
    folds in through ``lumina.ops.fold_in`` (one native op on CPU), a tensor through the reference."""
    for d in data:
        key = ops.fold_in(key, d) if isinstance(d, int) else reference.fold_in(key, d)
    return key


def uniform(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) of ``shape`` (24-bit resolution) from ``key``; element i hashes (key, i)."""
    n = 1
    for s in shape:
        n *= s
    return ops.hash_uniform(key, n).reshape(shape).to(dtype)
