"""Dropless MoE combine in Triton: each token's router-weighted sum of its K expert outputs, and its
backward.

Legend: N tokens, K top-k, A = N*K assignments (a = n*K + k), D model dim. ``y_AD`` is in the
expert-sorted order of ``perm_A``; ``inverse_A`` is its inverse permutation.

  forward   out[n]      = sum_k w[n, k] * y[inverse_A[n*K + k]]   (k in order, fp32 accumulation) [N, D]
  backward  dy[i]       = w.flat[perm_A[i]] * g[perm_A[i] // K]                                   [A, D]
            dw.flat[j]  = dot(g[j // K], y[inverse_A[j]])   written at j = perm_A[i] from row i    [N, K]

``perm`` may also be a partial map (length S, entries -1 for empty rows; see ``moe_dispatch``): the
terms of assignments in no row are zero, and so are their ``dw`` and the empty rows of ``dy``.

Every output element is written exactly once (gathers, no scatter-add): no atomics, deterministic.
The backward walks the sorted rows, so it needs no inverse permutation and reads ``y`` contiguously;
one fused kernel writes ``dy`` and ``dw`` (``g`` and ``y`` are each read once).

As in the reference, the weights are rounded to y's dtype before use; all sums and dot products
accumulate in fp32.

Layers: ``_kernel`` -> launcher -> custom op ``lumina_triton::*`` (+ fake, + autograd) ->
``autograd.Function`` -> public fn. Semantics: ``reference.moe_combine``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autograd import apply, op_functions
from ._triton import acc_dtype, jit, row_blocks
from .moe_dispatch import inverse_permutation_launch

__all__ = ["moe_combine", "moe_combine_backward"]


# ---------------------------------------------------------------------------------------------- kernels
@jit
def _combine_kernel(
    y_ptr,
    inv_ptr,
    w_ptr,
    out_ptr,
    N,
    D,
    K,
    stride_y,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] tokens
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    mask = row_ok[:, None] & (cols < D)[None, :]
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, ACC)
    for k in range(K):  # fixed order: deterministic
        src = tl.load(inv_ptr + rows64 * K + k, mask=row_ok, other=-1)  # [R] row of (n, k); -1: none
        w = tl.load(w_ptr + rows64 * K + k, mask=row_ok & (src >= 0), other=0.0)  # dropped: w unread
        w = w.to(y_ptr.dtype.element_ty).to(ACC)  # the reference's w.to(y.dtype)
        y = tl.load(
            y_ptr + src[:, None] * stride_y + cols[None, :], mask=mask & (src >= 0)[:, None], other=0.0
        )
        acc += w[:, None] * y.to(ACC)
    tl.store(
        out_ptr + rows64[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


@jit
def _combine_backward_kernel(
    g_ptr,
    y_ptr,
    perm_ptr,
    w_ptr,
    dy_ptr,
    dw_ptr,
    A,
    D,
    K,
    stride_g,
    stride_y,
    stride_dy,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] sorted rows
    row_ok = rows < A
    rows64 = rows.to(tl.int64)
    j = tl.load(perm_ptr + rows, mask=row_ok, other=-1).to(tl.int64)  # [R] assignment n*K + k, or -1
    held = row_ok & (j >= 0)  # empty rows: w = 0 below, so their dy is written as zeros
    token = tl.where(held, j, 0) // K
    w = tl.load(w_ptr + j, mask=held, other=0.0).to(y_ptr.dtype.element_ty).to(ACC)
    dot = tl.full([BLOCK_R], 0.0, ACC)
    for d0 in range(0, D, BLOCK_D):  # the whole row per program: dw needs the full dot product
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        ok = mask & held[:, None]
        g = tl.load(g_ptr + token[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(ACC)
        y = tl.load(y_ptr + rows64[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(ACC)
        dy = (w[:, None] * g).to(dy_ptr.dtype.element_ty)
        tl.store(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], dy, mask=mask)
        dot += tl.reduce(g * y, 1, tl.standard._sum_combine)  # = tl.sum (see _triton)
    tl.store(dw_ptr + j, dot.to(dw_ptr.dtype.element_ty), mask=held)


# -------------------------------------------------------------------------------------------- launchers
def moe_combine_launch(
    y_AD: torch.Tensor,
    perm_A: torch.Tensor,
    weights_NK: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    y_AD, weights_NK = y_AD.contiguous(), weights_NK.contiguous()
    N, K = weights_NK.shape
    D = y_AD.shape[1]
    inv_A = inverse_permutation_launch(perm_A, N * K)
    out_ND = torch.empty(N, D, dtype=y_AD.dtype, device=y_AD.device) if out is None else out
    if N and D:
        br, bd = row_blocks(N, D, y_AD.device, block_r, block_d)
        grid = (triton.cdiv(N, br), triton.cdiv(D, bd))
        _combine_kernel.on(y_AD.device)[grid](
            y_AD,
            inv_A,
            weights_NK,
            out_ND,
            N,
            D,
            K,
            y_AD.stride(0),
            out_ND.stride(0),
            BLOCK_R=br,
            BLOCK_D=bd,
            ACC=acc_dtype(y_AD.dtype),
        )
    return out_ND


def moe_combine_backward_launch(
    g_ND: torch.Tensor,
    y_AD: torch.Tensor,
    perm_A: torch.Tensor,
    weights_NK: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    g_ND, y_AD = g_ND.contiguous(), y_AD.contiguous()
    perm_A, weights_NK = perm_A.contiguous(), weights_NK.contiguous()
    A, D = y_AD.shape
    K = weights_NK.shape[1]
    if out is None:
        dy_AD = torch.empty(A, D, dtype=y_AD.dtype, device=y_AD.device)
        dw_NK = torch.zeros_like(weights_NK)
    else:
        dy_AD, dw_NK = out
        dw_NK.zero_()
    # The kernel writes dw only for assignments some row holds; the rest (dropped) keep the zeros.
    if A:
        br, bd = row_blocks(A, D, y_AD.device, block_r, block_d)
        _combine_backward_kernel.on(y_AD.device)[(triton.cdiv(A, br),)](
            g_ND,
            y_AD,
            perm_A,
            weights_NK,
            dy_AD,
            dw_NK,
            A,
            D,
            K,
            g_ND.stride(0),
            y_AD.stride(0),
            dy_AD.stride(0),
            BLOCK_R=br,
            BLOCK_D=bd,
            ACC=acc_dtype(y_AD.dtype),
        )
    return dy_AD, dw_NK


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("lumina_triton::moe_combine", mutates_args=())
def _moe_combine_op(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return moe_combine_launch(y, perm, weights)


@_moe_combine_op.register_fake
def _(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return y.new_empty(weights.shape[0], y.shape[1])


@torch.library.custom_op("lumina_triton::moe_combine_backward", mutates_args=())
def _moe_combine_backward_op(
    g: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return moe_combine_backward_launch(g, y, perm, weights)


@_moe_combine_backward_op.register_fake
def _(
    g: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return y.new_empty(y.shape), weights.new_empty(weights.shape)  # contiguous, as the launcher's


# ------------------------------------------------------------------------------------ autograd wrappers
# The Functions (torch.func.grad cannot use register_autograd in torch 2.13) with the combine formulas
# every provider shares (kernels/_autograd.py), also registered on the ops. The backward is built from
# the same Functions, so it is differentiable again.
_ops = torch.ops.lumina_triton
MoeCombine, MoeCombineBackward = op_functions(
    "lumina_triton",
    moe_combine=_ops.moe_combine.default,
    moe_combine_backward=_ops.moe_combine_backward.default,
)


# --------------------------------------------------------------------------------------------- public
def moe_combine(y_AD: torch.Tensor, perm_A: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Each token's router-weighted sum of its K expert outputs (y in expert-sorted order). [N, D]"""
    return apply(MoeCombine, y_AD, perm_A, weights_NK)


def moe_combine_backward(
    g_ND: torch.Tensor, y_AD: torch.Tensor, perm_A: torch.Tensor, weights_NK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d y, d weights) of ``moe_combine`` for the output gradient ``g``. ([A, D], [N, K])"""
    return apply(MoeCombineBackward, g_ND, y_AD, perm_A, weights_NK)
