"""Python side of the native CPU MoE ops (``kernels/csrc/moe_ops.cpp``, namespace ``lumina_native``).

Legend: N tokens, K top-k, A = N*K assignments, S rows of the expert-side buffer, D model dim.
``perm`` maps each buffer row to an assignment or -1 (an empty row): a permutation in the dropless case,
a partial map for capacity buffers and MoD selections (see ``reference.moe_dispatch``).

The C++ library defines and implements the ops (``torch.ops.lumina_native.*``); this module adds what
torch needs to trace and differentiate them: a fake (meta) kernel for every op, and the dispatch and
combine gradient formulas every provider shares (``lumina_kernels._autograd``), as ``autograd.Function``
wrappers (the form ``torch.func.grad`` can differentiate in torch 2.13) and registered on the ops (so
``opcheck`` and direct callers get gradients). Each backward is written with the same Functions, so it
is itself differentiable. Semantics are those of ``lumina_kernels.reference``.

When the library is not built (or is stale), ``available()`` is False and the public functions raise
with ``lumina_kernels.native_status()``; choosing a fallback is the caller's decision.
"""

from __future__ import annotations

import torch

from lumina_kernels import load_native, native_status
from lumina_kernels._autograd import apply, op_functions

__all__ = ["available", "fold_in", "grouped_mm", "has_op", "hash_uniform", "moe_combine", "moe_dispatch"]

_NATIVE = load_native()  # importing lumina_kernels._C runs its TORCH_LIBRARY registrations


def available() -> bool:
    """True when the native op library is built against this torch and its MoE ops are registered."""
    return _NATIVE is not None and hasattr(torch.ops.lumina_native, "moe_combine")


def has_op(name: str) -> bool:
    """True when the library is usable and defines ``name`` (a library built from older sources may
    lack an op added since: callers then fall back per op)."""
    return _NATIVE is not None and hasattr(torch.ops.lumina_native, name)


def _require(op: str | None = None) -> None:
    """Raise naming ``op`` (default: the MoE ops) when the library cannot run it."""
    if op is None and not available():
        raise RuntimeError(f"lumina native ops unavailable: {native_status()}")
    if op is not None and not has_op(op):
        raise RuntimeError(f"lumina native op {op} unavailable: {native_status()}")


if available():

    @torch.library.register_fake("lumina_native::moe_dispatch")
    def _(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
        return x.new_empty(perm.shape[0], x.shape[1])

    @torch.library.register_fake("lumina_native::moe_dispatch_backward")
    def _(grad: torch.Tensor, perm: torch.Tensor, top_k: int, num_tokens: int) -> torch.Tensor:
        return grad.new_empty(num_tokens, grad.shape[1])

    @torch.library.register_fake("lumina_native::moe_combine")
    def _(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return y.new_empty(weights.shape[0], y.shape[1])

    @torch.library.register_fake("lumina_native::moe_combine_backward")
    def _(
        grad: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return y.new_empty(y.shape), weights.new_empty(weights.shape)


if has_op("grouped_mm"):

    @torch.library.register_fake("lumina_native::grouped_mm")
    def _(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[-1])

    @torch.library.register_fake("lumina_native::grouped_mm_weight_grad")
    def _(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return x.new_empty(counts.shape[0], x.shape[1], g.shape[1])

    # the grouped-matmul formulas every provider shares (lumina_kernels._autograd)
    _GroupedMM, _GroupedMMWeightGrad = op_functions(
        "lumina_native",
        grouped_mm=torch.ops.lumina_native.grouped_mm,
        grouped_mm_weight_grad=torch.ops.lumina_native.grouped_mm_weight_grad,
    )

if has_op("xent_rows_"):

    @torch.library.register_fake("lumina_native::xent_rows_")
    def _(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, grads: bool):
        return logits.new_empty(logits.shape[0], dtype=torch.float32), keep.new_empty(logits.shape[0])


if has_op("add_bf16_"):

    @torch.library.register_fake("lumina_native::add_bf16_")
    def _(acc: torch.Tensor, src: torch.Tensor) -> None:
        return None


if has_op("global_norm"):

    @torch.library.register_fake("lumina_native::global_norm")
    def _(xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0].new_empty((), dtype=torch.float32)


if has_op("hash_uniform"):

    @torch.library.register_fake("lumina_native::hash_uniform")
    def _(key: torch.Tensor, n: int) -> torch.Tensor:
        return key.new_empty(n, dtype=torch.float32)


if has_op("fold_in"):

    @torch.library.register_fake("lumina_native::fold_in")
    def _(key: torch.Tensor, data: int) -> torch.Tensor:
        return key.new_empty(())


if available():
    # The Functions (what torch.func.grad differentiates) with the dispatch and combine formulas every
    # provider shares (kernels/_autograd.py), also registered on the ops.
    _ops = torch.ops.lumina_native
    _Dispatch, _DispatchBackward, _Combine, _CombineBackward = op_functions(
        "lumina_native",
        moe_dispatch=_ops.moe_dispatch,
        moe_dispatch_backward=_ops.moe_dispatch_backward,
        moe_combine=_ops.moe_combine,
        moe_combine_backward=_ops.moe_combine_backward,
    )


def moe_dispatch(x_ND: torch.Tensor, perm_A: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token rows in expert-contiguous order: row i is token perm_A[i] // top_k. [A, D]"""
    _require()
    return apply(_Dispatch, x_ND, perm_A, top_k)


def moe_combine(y_AD: torch.Tensor, perm_A: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Each token's router-weighted sum of its K expert outputs (y in expert-sorted order). [N, D]"""
    _require()
    return apply(_Combine, y_AD, perm_A, weights_NK)


def hash_uniform(key: torch.Tensor, n: int) -> torch.Tensor:
    """``reference.hash_uniform`` in one pass (``kernels/csrc/random_ops.cpp``), bit-identical. [n] float32"""
    _require("hash_uniform")
    return torch.ops.lumina_native.hash_uniform(key, n)


def fold_in(key: torch.Tensor, data: int) -> torch.Tensor:
    """``lumina.model.random.fold_in``'s step for one int in one op (``kernels/csrc/random_ops.cpp``),
    bit-identical: hash32(hash32(key) ^ (data mod 2^32)). A 0-dim int64 key."""
    _require("fold_in")
    return torch.ops.lumina_native.fold_in(key, data & 0xFFFFFFFF)


def grouped_mm(x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``reference.grouped_mm`` (the same per-expert matmuls) without its Python per call
    (``kernels/csrc/grouped_mm_ops.cpp``); differentiable. [A, F]. fp32 / fp64: the experts spread
    over the threads, each one single-threaded matmul (results independent of the thread count; the
    reference's to fp32 rounding, equal bits except where torch's multi-threaded matmul differs from
    its single-threaded one). bf16 / fp16: each expert's rows rounded up to a bucket, so that oneDNN
    reuses its per-shape kernels (the padding is cut off; equal bits measured, tests/test_native.py)."""
    _require("grouped_mm")
    return apply(_GroupedMM, x_AD, w_EDF, counts_E)
