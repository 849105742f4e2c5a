"""Dropless MoE dispatch in Triton: token rows gathered into expert-contiguous order, and its backward.

Legend: N tokens, K top-k, A = N*K assignments (a = n*K + k is token n's k-th choice), D model dim.
``perm_A`` (from ``reference.moe_routing``) lists assignment ids in expert-sorted order; ``inverse_A``
is its inverse (``inverse_A[perm_A[i]] = i``: the sorted row of each assignment).

  forward   out[i]  = x[perm_A[i] // K]                                   [A, D]
  backward  dx[n]   = sum_k g[inverse_A[n*K + k]]   (k = 0..K-1, in order) [N, D]

The backward is a gather and a fixed-order sum per token, not a scatter-add: no atomics, so it is
deterministic (bit-identical run to run), and each output row is written exactly once.

Layers: ``_kernel`` -> launcher (``*_launch``, takes an optional preallocated ``out``) -> custom op
``lumina_triton::*`` (+ fake, + autograd) -> ``autograd.Function`` (for ``torch.func``) -> public fn.
Compiled on CUDA tensors, interpreted on CPU tensors (see ``_triton``). Semantics:
``reference.moe_dispatch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import acc_dtype, jit, row_blocks

__all__ = ["inverse_permutation", "moe_dispatch", "moe_dispatch_backward"]


# ---------------------------------------------------------------------------------------------- kernels
@jit
def _inverse_permutation_kernel(perm_ptr, inv_ptr, A, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < A
    p = tl.load(perm_ptr + i, mask=mask, other=0)
    # A permutation: every target is written exactly once, so the scatter has no conflicts.
    tl.store(inv_ptr + p, i.to(tl.int64), mask=mask)


@jit
def _dispatch_kernel(
    x_ptr, perm_ptr, out_ptr, A, D, K, stride_x, stride_out, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] sorted rows
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [C]
    row_ok = rows < A
    token = tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64) // K  # [R]
    mask = row_ok[:, None] & (cols < D)[None, :]
    vals = tl.load(x_ptr + token[:, None] * stride_x + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], vals, mask=mask)


@jit
def _dispatch_backward_kernel(
    g_ptr,
    inv_ptr,
    out_ptr,
    N,
    D,
    K,
    stride_g,
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
        src = tl.load(inv_ptr + rows64 * K + k, mask=row_ok, other=0)  # [R] sorted row of (n, k)
        acc += tl.load(g_ptr + src[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(ACC)
    tl.store(
        out_ptr + rows64[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


# -------------------------------------------------------------------------------------------- launchers
def inverse_permutation_launch(perm_A: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    perm_A = perm_A.contiguous()
    A = perm_A.numel()
    inv_A = torch.empty_like(perm_A, dtype=torch.int64) if out is None else out
    if A:
        block = min(triton.next_power_of_2(A), 1 << 16 if perm_A.device.type == "cpu" else 1024)
        _inverse_permutation_kernel.on(perm_A.device)[(triton.cdiv(A, block),)](perm_A, inv_A, A, BLOCK=block)
    return inv_A


def moe_dispatch_launch(
    x_ND: torch.Tensor,
    perm_A: torch.Tensor,
    top_k: int,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    x_ND, perm_A = x_ND.contiguous(), perm_A.contiguous()
    A, D = perm_A.numel(), x_ND.shape[1]
    out_AD = torch.empty(A, D, dtype=x_ND.dtype, device=x_ND.device) if out is None else out
    if A and D:
        br, bd = row_blocks(A, D, x_ND.device, block_r, block_d)
        grid = (triton.cdiv(A, br), triton.cdiv(D, bd))
        _dispatch_kernel.on(x_ND.device)[grid](
            x_ND, perm_A, out_AD, A, D, top_k, x_ND.stride(0), out_AD.stride(0), BLOCK_R=br, BLOCK_D=bd
        )
    return out_AD


def moe_dispatch_backward_launch(
    g_AD: torch.Tensor,
    perm_A: torch.Tensor,
    top_k: int,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    g_AD = g_AD.contiguous()
    A, D = g_AD.shape
    N = A // top_k
    inv_A = inverse_permutation_launch(perm_A)
    out_ND = torch.empty(N, D, dtype=g_AD.dtype, device=g_AD.device) if out is None else out
    if N and D:
        br, bd = row_blocks(N, D, g_AD.device, block_r, block_d)
        grid = (triton.cdiv(N, br), triton.cdiv(D, bd))
        _dispatch_backward_kernel.on(g_AD.device)[grid](
            g_AD,
            inv_A,
            out_ND,
            N,
            D,
            top_k,
            g_AD.stride(0),
            out_ND.stride(0),
            BLOCK_R=br,
            BLOCK_D=bd,
            ACC=acc_dtype(g_AD.dtype),
        )
    return out_ND


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("lumina_triton::inverse_permutation", mutates_args=())
def _inverse_permutation_op(perm: torch.Tensor) -> torch.Tensor:
    return inverse_permutation_launch(perm)


@_inverse_permutation_op.register_fake
def _(perm: torch.Tensor) -> torch.Tensor:
    return perm.new_empty(perm.shape, dtype=torch.int64)


@torch.library.custom_op("lumina_triton::moe_dispatch", mutates_args=())
def _moe_dispatch_op(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    return moe_dispatch_launch(x, perm, top_k)


@_moe_dispatch_op.register_fake
def _(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    return x.new_empty(perm.shape[0], x.shape[1])


@torch.library.custom_op("lumina_triton::moe_dispatch_backward", mutates_args=())
def _moe_dispatch_backward_op(g: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    return moe_dispatch_backward_launch(g, perm, top_k)


@_moe_dispatch_backward_op.register_fake
def _(g: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    return g.new_empty(g.shape[0] // top_k, g.shape[1])


# ------------------------------------------------------------------------------------ autograd wrappers
# torch.func.grad cannot differentiate a custom op's register_autograd formula (torch 2.13), so the
# public functions go through autograd.Functions with setup_context; each backward uses the other
# Function, so the backward is itself differentiable (dispatch and its backward are adjoint).
class MoeDispatch(torch.autograd.Function):
    @staticmethod
    def forward(x_ND, perm_A, top_k):
        return _moe_dispatch_op(x_ND, perm_A, top_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.top_k = inputs[2]

    @staticmethod
    def backward(ctx, grad_AD):
        (perm_A,) = ctx.saved_tensors
        return MoeDispatchBackward.apply(grad_AD, perm_A, ctx.top_k), None, None


class MoeDispatchBackward(torch.autograd.Function):
    @staticmethod
    def forward(g_AD, perm_A, top_k):
        return _moe_dispatch_backward_op(g_AD, perm_A, top_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.top_k = inputs[2]

    @staticmethod
    def backward(ctx, grad_ND):
        (perm_A,) = ctx.saved_tensors
        return MoeDispatch.apply(grad_ND, perm_A, ctx.top_k), None, None


# The same formulas on the ops themselves, for callers of the ops (and torch.library.opcheck).
_moe_dispatch_op.register_autograd(MoeDispatch.backward, setup_context=MoeDispatch.setup_context)
_moe_dispatch_backward_op.register_autograd(
    MoeDispatchBackward.backward, setup_context=MoeDispatchBackward.setup_context
)


# --------------------------------------------------------------------------------------------- public
def inverse_permutation(perm_A: torch.Tensor) -> torch.Tensor:
    """``inverse_A[perm_A[i]] = i``. [A] int64; one kernel, no host sync."""
    return _inverse_permutation_op(perm_A)


def moe_dispatch(x_ND: torch.Tensor, perm_A: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token rows in expert-contiguous order: row i is token perm_A[i] // top_k. [A, D]"""
    return MoeDispatch.apply(x_ND, perm_A, top_k)


def moe_dispatch_backward(g_AD: torch.Tensor, perm_A: torch.Tensor, top_k: int) -> torch.Tensor:
    """The adjoint of ``moe_dispatch``: each token's K rows of ``g`` summed in k order. [N, D]"""
    return MoeDispatchBackward.apply(g_AD, perm_A, top_k)
