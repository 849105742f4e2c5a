"""Mixture-of-Depths routing in Triton: per-sequence capacity top-k, gather the selected rows of each
sequence, scatter the block's weighted output back, and their backwards.

Legend: B batch, T sequence length, S selected tokens per sequence, D model dim. ``idx_BS`` holds the
selected positions of each sequence (``reference.mod_topk``): distinct within a row, so every scatter
below has exactly one writer per target row.

  top-k              idx[b]       = the S highest scores of row b, ascending; ties: earlier t [B, S]
  gather             out[b, s]    = x[b, idx[b, s]]                                        [B, S, D]
  gather backward    dx[b, t]     = g[b, s] if t = idx[b, s], else 0                       [B, T, D]
  scatter            out[b, t]    = x[b, t] + (w[b, s] * delta[b, s]  if t = idx[b, s])    [B, T, D]
  scatter backward   dx           = g   (identity: the autograd wrapper passes it through)
                     ddelta[b, s] = w[b, s] * g[b, idx[b, s]]                              [B, S, D]
                     dw[b, s]     = dot(g[b, idx[b, s]], delta[b, s])   (fp32 accumulation) [B, S]

Top-k is one program per sequence (no host sync, integer output, no autograd); see ``_topk_kernel``.
The rows that are not selected are written explicitly, in a first pass (zeros for the gather backward,
a copy of x for the scatter), then the selected rows by a second kernel. No atomics: deterministic.

As in the reference, the weights are rounded to delta's dtype and ``w * delta`` to delta's dtype before
the add; products, the add and the dot products are computed in fp32 (fp64 for fp64).

Layers: ``_kernel`` -> launcher (``*_launch``, takes an optional preallocated ``out``) -> custom op
``lumina_triton::*`` (+ fake, + autograd) -> ``autograd.Function`` (for ``torch.func``) -> public fn.
Compiled on CUDA tensors, interpreted on CPU tensors (see ``_triton``). Semantics:
``reference.mod_topk``, ``reference.mod_gather`` and ``reference.mod_scatter``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autograd import apply, op_functions
from ._triton import acc_dtype, interpreted, jit, row_blocks

__all__ = [
    "mod_gather",
    "mod_gather_backward",
    "mod_scatter",
    "mod_scatter_backward",
    "mod_topk",
]


# ---------------------------------------------------------------------------------------------- kernels
@jit
def _init_rows_kernel(
    src_ptr,
    out_ptr,
    R,
    D,
    stride_src,
    stride_out,
    COPY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[r] = src[r] (COPY) or 0, for every row r < R: the first pass of both scatters."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    if COPY:
        vals = tl.load(src_ptr + rows64[:, None] * stride_src + cols[None, :], mask=mask)
    else:
        vals = tl.full([BLOCK_R, BLOCK_D], 0.0, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], vals, mask=mask)


@jit
def _gather_kernel(
    x_ptr,
    idx_ptr,
    out_ptr,
    R,
    S,
    T,
    D,
    stride_x,
    stride_out,
    SCATTER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row r = b*S + s of the [B*S, D] side <-> row b*T + idx[b, s] of the [B*T, D] side.
    SCATTER=False: out[r] = x[b*T + idx] (gather). SCATTER=True: out[b*T + idx] = x[r] (its adjoint's
    second pass; idx distinct per sequence, so one writer per target row)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] selected rows b*S + s
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    t = tl.load(idx_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    seq_row = (rows64 // S) * T + t  # [R] row in the [B*T, D] tensor
    mask = row_ok[:, None] & (cols < D)[None, :]
    if SCATTER:
        vals = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask)
        tl.store(out_ptr + seq_row[:, None] * stride_out + cols[None, :], vals, mask=mask)
    else:
        vals = tl.load(x_ptr + seq_row[:, None] * stride_x + cols[None, :], mask=mask)
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], vals, mask=mask)


@jit
def _scatter_kernel(
    x_ptr,
    delta_ptr,
    w_ptr,
    idx_ptr,
    out_ptr,
    R,
    S,
    T,
    D,
    stride_x,
    stride_delta,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """Second pass of the scatter: out[b*T + idx] = x[b*T + idx] + round(w * delta[b*S + s])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] selected rows b*S + s
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    t = tl.load(idx_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    seq_row = (rows64 // S) * T + t
    mask = row_ok[:, None] & (cols < D)[None, :]
    w = tl.load(w_ptr + rows64, mask=row_ok, other=0.0).to(delta_ptr.dtype.element_ty).to(ACC)
    delta = tl.load(delta_ptr + rows64[:, None] * stride_delta + cols[None, :], mask=mask, other=0.0)
    update = (w[:, None] * delta.to(ACC)).to(delta_ptr.dtype.element_ty).to(ACC)  # the reference's update
    x = tl.load(x_ptr + seq_row[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    out = (x + update).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + seq_row[:, None] * stride_out + cols[None, :], out, mask=mask)


@jit
def _scatter_backward_kernel(
    g_ptr,
    delta_ptr,
    w_ptr,
    idx_ptr,
    ddelta_ptr,
    dw_ptr,
    R,
    S,
    T,
    D,
    stride_g,
    stride_delta,
    stride_ddelta,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] selected rows b*S + s
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    t = tl.load(idx_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    seq_row = (rows64 // S) * T + t
    w = tl.load(w_ptr + rows64, mask=row_ok, other=0.0).to(delta_ptr.dtype.element_ty).to(ACC)
    dot = tl.full([BLOCK_R], 0.0, ACC)
    for d0 in range(0, D, BLOCK_D):  # the whole row per program: dw needs the full dot product
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        g = tl.load(g_ptr + seq_row[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(ACC)
        delta = tl.load(delta_ptr + rows64[:, None] * stride_delta + cols[None, :], mask=mask, other=0.0)
        ddelta = (w[:, None] * g).to(ddelta_ptr.dtype.element_ty)
        tl.store(ddelta_ptr + rows64[:, None] * stride_ddelta + cols[None, :], ddelta, mask=mask)
        dot += tl.reduce(g * delta.to(ACC), 1, tl.standard._sum_combine)  # = tl.sum (see _triton)
    tl.store(dw_ptr + rows64, dot.to(dw_ptr.dtype.element_ty), mask=row_ok)


@jit
def _topk_kernel(
    scores_ptr,
    out_ptr,
    T,
    K,
    stride_s,
    FLOAT: tl.constexpr,
    KEY: tl.constexpr,
    KEY_BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per sequence b: out[b] = the positions of its K highest scores, ascending.

    Scores become integer keys with the float order (IEEE bits; negatives' magnitude bits flipped;
    -0.0 -> +0.0; NaN -> the largest key). Pass 1 finds the K-th largest key bit by bit, most
    significant first (KEY_BITS counting sweeps: keep a bit when at least K keys are >= the candidate).
    Pass 2 keeps every key above it and, of the keys equal to it, the first K - #above by position,
    and writes each kept position t to slot #kept-before-t (exclusive prefix sums), so the output
    is ascending and every slot is written exactly once."""
    b = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + b * stride_s
    one = tl.full([], 1, KEY)
    sign = one << (KEY_BITS - 1)  # the sign bit; as a signed integer, the smallest key
    magnitude = ~sign  # every bit but the sign
    # Pass 1. `prefix` is the threshold so far in offset binary (unsigned order = signed order ^ sign):
    # `key >= cand ^ sign` (signed) is `unsigned(key) >= cand`.
    prefix = tl.full([], 0, KEY)
    for i in range(KEY_BITS):
        cand = prefix | (one << (KEY_BITS - 1 - i))
        thr = cand ^ sign
        n = tl.full([], 0, tl.int32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < T
            s = tl.load(row_ptr + t, mask=ok, other=0.0).to(FLOAT)
            s = tl.where(s == 0.0, 0.0, s)  # -0.0 == 0.0
            bits = s.to(KEY, bitcast=True)
            key = tl.where(s != s, magnitude, bits ^ ((bits >> (KEY_BITS - 1)) & magnitude))
            n += tl.reduce(tl.where(ok & (key >= thr), 1, 0), 0, tl.standard._sum_combine)
        prefix = tl.where(n >= K, cand, prefix)
    kth = prefix ^ sign  # the K-th largest key
    # Pass 2: n_above (< K) keys are above kth; the first `need` keys equal to it complete the K.
    n_above = tl.full([], 0, tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        s = tl.load(row_ptr + t, mask=ok, other=0.0).to(FLOAT)
        s = tl.where(s == 0.0, 0.0, s)
        bits = s.to(KEY, bitcast=True)
        key = tl.where(s != s, magnitude, bits ^ ((bits >> (KEY_BITS - 1)) & magnitude))
        n_above += tl.reduce(tl.where(ok & (key > kth), 1, 0), 0, tl.standard._sum_combine)
    need = K - n_above
    n_equal = tl.full([], 0, tl.int32)  # keys equal to kth before this block
    n_kept = tl.full([], 0, tl.int32)  # positions kept before this block
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        s = tl.load(row_ptr + t, mask=ok, other=0.0).to(FLOAT)
        s = tl.where(s == 0.0, 0.0, s)
        bits = s.to(KEY, bitcast=True)
        key = tl.where(s != s, magnitude, bits ^ ((bits >> (KEY_BITS - 1)) & magnitude))
        equal = tl.where(ok & (key == kth), 1, 0)
        # inclusive scans (= tl.cumsum, which is a @jit helper: see _triton); minus self: exclusive
        equal_rank = n_equal + tl.associative_scan(equal, 0, tl.standard._sum_combine) - equal
        keep = tl.where(ok & ((key > kth) | ((equal == 1) & (equal_rank < need))), 1, 0)
        slot = n_kept + tl.associative_scan(keep, 0, tl.standard._sum_combine) - keep
        # slot < K always holds; the guard keeps a future bug from writing past the row.
        tl.store(out_ptr + b * K + slot, t.to(tl.int64), mask=(keep == 1) & (slot < K))
        n_equal += tl.reduce(equal, 0, tl.standard._sum_combine)
        n_kept += tl.reduce(keep, 0, tl.standard._sum_combine)


# -------------------------------------------------------------------------------------------- launchers
def _init_rows(src: torch.Tensor | None, out: torch.Tensor, block_r: int | None, block_d: int | None) -> None:
    """out (viewed as [rows, D]) = src, or zeros when src is None."""
    R, D = out.shape[0] * out.shape[1], out.shape[2]
    if R and D:
        br, bd = row_blocks(R, D, out.device, block_r, block_d)
        grid = (triton.cdiv(R, br), triton.cdiv(D, bd))
        _init_rows_kernel.on(out.device)[grid](
            out if src is None else src,
            out,
            R,
            D,
            D if src is None else src.stride(1),
            out.stride(1),
            COPY=src is not None,
            BLOCK_R=br,
            BLOCK_D=bd,
        )


def _gather_rows(
    src: torch.Tensor,
    idx_BS: torch.Tensor,
    out: torch.Tensor,
    T: int,
    scatter: bool,
    block_r: int | None,
    block_d: int | None,
) -> None:
    B, S = idx_BS.shape
    R, D = B * S, src.shape[2]
    if R and D:
        br, bd = row_blocks(R, D, src.device, block_r, block_d)
        grid = (triton.cdiv(R, br), triton.cdiv(D, bd))
        _gather_kernel.on(src.device)[grid](
            src,
            idx_BS,
            out,
            R,
            S,
            T,
            D,
            src.stride(1),
            out.stride(1),
            SCATTER=scatter,
            BLOCK_R=br,
            BLOCK_D=bd,
        )


def mod_gather_launch(
    x_BTD: torch.Tensor,
    idx_BS: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    x_BTD, idx_BS = x_BTD.contiguous(), idx_BS.contiguous()
    B, T, D = x_BTD.shape
    S = idx_BS.shape[1]
    out_BSD = torch.empty(B, S, D, dtype=x_BTD.dtype, device=x_BTD.device) if out is None else out
    _gather_rows(x_BTD, idx_BS, out_BSD, T, False, block_r, block_d)
    return out_BSD


def mod_gather_backward_launch(
    g_BSD: torch.Tensor,
    idx_BS: torch.Tensor,
    seq_len: int,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    g_BSD, idx_BS = g_BSD.contiguous(), idx_BS.contiguous()
    B, _, D = g_BSD.shape
    out_BTD = torch.empty(B, seq_len, D, dtype=g_BSD.dtype, device=g_BSD.device) if out is None else out
    _init_rows(None, out_BTD, block_r, block_d)  # every row: the unselected ones stay 0
    _gather_rows(g_BSD, idx_BS, out_BTD, seq_len, True, block_r, block_d)  # then the selected ones
    return out_BTD


def mod_scatter_launch(
    x_BTD: torch.Tensor,
    delta_BSD: torch.Tensor,
    weight_BS: torch.Tensor,
    idx_BS: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    x_BTD, delta_BSD = x_BTD.contiguous(), delta_BSD.contiguous()
    weight_BS, idx_BS = weight_BS.contiguous(), idx_BS.contiguous()
    B, T, D = x_BTD.shape
    S = idx_BS.shape[1]
    out_BTD = torch.empty_like(x_BTD) if out is None else out
    _init_rows(x_BTD, out_BTD, block_r, block_d)  # every row: the unselected ones pass through
    R = B * S
    if R and D:
        br, bd = row_blocks(R, D, x_BTD.device, block_r, block_d)
        grid = (triton.cdiv(R, br), triton.cdiv(D, bd))
        _scatter_kernel.on(x_BTD.device)[grid](
            x_BTD,
            delta_BSD,
            weight_BS,
            idx_BS,
            out_BTD,
            R,
            S,
            T,
            D,
            x_BTD.stride(1),
            delta_BSD.stride(1),
            out_BTD.stride(1),
            BLOCK_R=br,
            BLOCK_D=bd,
            ACC=acc_dtype(x_BTD.dtype),
        )
    return out_BTD


def mod_scatter_backward_launch(
    g_BTD: torch.Tensor,
    delta_BSD: torch.Tensor,
    weight_BS: torch.Tensor,
    idx_BS: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    g_BTD, delta_BSD = g_BTD.contiguous(), delta_BSD.contiguous()
    weight_BS, idx_BS = weight_BS.contiguous(), idx_BS.contiguous()
    T = g_BTD.shape[1]
    B, S, D = delta_BSD.shape
    if out is None:
        ddelta_BSD = torch.empty_like(delta_BSD)
        dw_BS = torch.empty_like(weight_BS)
    else:
        ddelta_BSD, dw_BS = out
    R = B * S
    if R:
        br, bd = row_blocks(R, D, delta_BSD.device, block_r, block_d)
        _scatter_backward_kernel.on(delta_BSD.device)[(triton.cdiv(R, br),)](
            g_BTD,
            delta_BSD,
            weight_BS,
            idx_BS,
            ddelta_BSD,
            dw_BS,
            R,
            S,
            T,
            D,
            g_BTD.stride(1),
            delta_BSD.stride(1),
            ddelta_BSD.stride(1),
            BLOCK_R=br,
            BLOCK_D=bd,
            ACC=acc_dtype(delta_BSD.dtype),
        )
    return ddelta_BSD, dw_BS


def mod_topk_launch(
    scores_BT: torch.Tensor, k: int, *, out: torch.Tensor | None = None, block_t: int | None = None
) -> torch.Tensor:
    scores_BT = scores_BT.contiguous()
    B, T = scores_BT.shape
    if not 0 <= k <= T:
        raise ValueError(f"mod_topk: k={k} is outside [0, T={T}]")
    out_BS = torch.empty(B, k, dtype=torch.int64, device=scores_BT.device) if out is None else out
    if B and k:
        # Interpreted: the whole row in one block (each block is numpy work per sweep). Compiled: up to
        # 4096 positions per block (32 per thread of 4 warps). fp16/bf16 widen to fp32 exactly.
        max_block = 1 << 16 if interpreted(scores_BT.device) else 4096
        bt = block_t or min(triton.next_power_of_2(T), max_block)
        wide = scores_BT.dtype == torch.float64
        _topk_kernel.on(scores_BT.device)[(B,)](
            scores_BT,
            out_BS,
            T,
            k,
            scores_BT.stride(0),
            FLOAT=tl.float64 if wide else tl.float32,
            KEY=tl.int64 if wide else tl.int32,
            KEY_BITS=64 if wide else 32,
            BLOCK_T=bt,
        )
    return out_BS


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("lumina_triton::mod_gather", mutates_args=())
def _mod_gather_op(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return mod_gather_launch(x, idx)


@_mod_gather_op.register_fake
def _(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(idx.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("lumina_triton::mod_gather_backward", mutates_args=())
def _mod_gather_backward_op(g: torch.Tensor, idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    return mod_gather_backward_launch(g, idx, seq_len)


@_mod_gather_backward_op.register_fake
def _(g: torch.Tensor, idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    return g.new_empty(g.shape[0], seq_len, g.shape[2])


@torch.library.custom_op("lumina_triton::mod_scatter", mutates_args=())
def _mod_scatter_op(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    return mod_scatter_launch(x, delta, weight, idx)


@_mod_scatter_op.register_fake
def _(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous, as the launcher's


@torch.library.custom_op("lumina_triton::mod_scatter_backward", mutates_args=())
def _mod_scatter_backward_op(
    g: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return mod_scatter_backward_launch(g, delta, weight, idx)


@_mod_scatter_backward_op.register_fake
def _(
    g: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return delta.new_empty(delta.shape), weight.new_empty(weight.shape)


@torch.library.custom_op("lumina_triton::mod_topk", mutates_args=())
def _mod_topk_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    return mod_topk_launch(scores, k)


@_mod_topk_op.register_fake
def _(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


# ------------------------------------------------------------------------------------ autograd wrappers
# The Functions (torch.func.grad cannot use register_autograd in torch 2.13) with the gather / scatter
# formulas of kernels/_autograd.py, also registered on the ops. Each backward is built from the same
# Functions, so it is differentiable again.
_ops = torch.ops.lumina_triton
ModGather, ModGatherBackward, ModScatter, ModScatterBackward = op_functions(
    "lumina_triton",
    mod_gather=_ops.mod_gather.default,
    mod_gather_backward=_ops.mod_gather_backward.default,
    mod_scatter=_ops.mod_scatter.default,
    mod_scatter_backward=_ops.mod_scatter_backward.default,
)


# --------------------------------------------------------------------------------------------- public
def mod_gather(x_BTD: torch.Tensor, idx_BS: torch.Tensor) -> torch.Tensor:
    """The selected rows of each sequence: out[b, s] = x[b, idx[b, s]]. [B, S, D]"""
    return apply(ModGather, x_BTD, idx_BS)


def mod_gather_backward(g_BSD: torch.Tensor, idx_BS: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The adjoint of ``mod_gather``: g's rows placed at idx in a zero [B, seq_len, D]."""
    return apply(ModGatherBackward, g_BSD, idx_BS, seq_len)


def mod_scatter(
    x_BTD: torch.Tensor, delta_BSD: torch.Tensor, weight_BS: torch.Tensor, idx_BS: torch.Tensor
) -> torch.Tensor:
    """x with ``weight * delta`` added at the selected rows; the other rows pass through. [B, T, D]"""
    return apply(ModScatter, x_BTD, delta_BSD, weight_BS, idx_BS)


def mod_scatter_backward(
    g_BTD: torch.Tensor, delta_BSD: torch.Tensor, weight_BS: torch.Tensor, idx_BS: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d delta, d weight) of ``mod_scatter`` for the output gradient ``g`` (d x is g). ([B, S, D], [B, S])"""
    return apply(ModScatterBackward, g_BTD, delta_BSD, weight_BS, idx_BS)


def mod_topk(scores_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Per sequence, the positions of the k highest scores, ascending; ties to the earlier position
    (``reference.mod_topk``). [B, k] int64. Not differentiable (integer output): scores are detached."""
    return _mod_topk_op(scores_BT.detach(), k)
