"""Dropless MoE expert compute in Triton: a grouped GEMM over the expert-sorted rows, and its weight
gradient.

Legend: A assignments (rows, expert-sorted: expert e owns rows [offsets[e], offsets[e+1])), E experts,
D input dim, F output dim. ``offsets`` is the exclusive prefix sum of ``counts_E``.

  grouped_mm              out[a]  = x[a] @ w[e]          for a in e's rows                 [A, F]
  grouped_mm_weight_grad  dw[e]   = x[rows e]^T @ g[rows e]   (zeros for an empty expert) [E, D, F]

No host synchronisation: the tile schedule is built on the device. The forward tiles each expert's
rows separately in BLOCK_M chunks (a tile never straddles two experts, so it multiplies by one w[e]):
expert e has ceil(counts[e] / BLOCK_M) tiles, and ``tile_starts`` (their exclusive prefix sum) numbers
them globally. The grid is a static upper bound on the total, cdiv(A, BLOCK_M) + min(E, A) M tiles
(each non-empty expert wastes at most one partial tile); program m finds its expert as the number of
experts whose tiles start at or before m (tile_starts is non-decreasing: a vectorised compare over
BLOCK_E experts at a time), and programs past the last tile run a zero-trip K loop and store nothing.
M tiles are swizzled in groups of GROUP_M across the N tiles (the usual L2 ordering: a group's x rows
and the N panels of w[e] stay resident while the group sweeps them). The weight gradient runs one
program per (D block, F block, expert); each walks its expert's rows in BLOCK_K chunks (loop bounds
read from ``offsets``), so an empty expert's program runs no iterations and stores its zero accumulator.
No split over rows: a hot expert's programs run longest (a split would need atomics or a second
reduction pass); everything is written exactly once, so both kernels are deterministic.

Numerics: every tl.dot accumulates in fp32 (fp64 for fp64 inputs); the output is rounded once to the
input dtype. fp32 inputs use ``input_precision="ieee"`` always, never TF32: this matches torch's
default for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` is False unless a user sets it),
keeps the op's numerics independent of a global flag read at launch time (a flag flip would otherwise
silently change results inside an already-compiled graph); the fast paths are bf16 / fp16. fp64
works (tl.dot takes fp64: DMMA compiled, numpy interpreted), which is what gradgradcheck uses. Weights
(and x) are taken through their strides, so the backward's ``w.transpose(1, 2)`` costs no copy.

Interpreter (CPU tensors): Triton's interpreter multiplies bf16 tiles as their raw uint16 bits (triton
3.7 ``create_dot`` calls np.matmul on the storage), so interpreted kernels upcast the tiles to the
accumulator dtype before tl.dot (``UPCAST``); the products are the same (a bf16 or fp16 product is
exact in fp32), and numpy then takes its BLAS sgemm path instead of a slow fp16 loop. Compiled kernels
feed bf16 / fp16 straight to the tensor cores. The interpreter also truncates fp32 -> bf16 where
compiled code rounds to nearest, so interpreted bf16 outputs can be one ulp (2**-7 relative) off the
correctly rounded value, compiled ones half an ulp.

Layers: ``_kernel`` -> launcher (``*_launch``, optional preallocated ``out``, optional forced blocks)
-> custom op ``lumina_triton::*`` (+ fake, + autograd) -> ``autograd.Function`` -> public fn. Compiled
on CUDA tensors, interpreted on CPU tensors (see ``_triton``). Semantics: ``reference.grouped_mm`` and
``reference.grouped_mm_weight_grad``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autograd import apply, op_functions
from ._triton import acc_dtype, interpreted, jit

__all__ = ["grouped_mm", "grouped_mm_weight_grad", "grouped_mm_launch", "grouped_mm_weight_grad_launch"]


# ---------------------------------------------------------------------------------------------- kernels
@jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,  # [E + 1] row offsets of the experts' segments
    tile_starts_ptr,  # [E + 1] exclusive prefix sum of ceil(counts / BLOCK_M)
    A,
    D,
    F,
    E,
    NUM_PID_M,
    stride_xa,
    stride_xd,
    stride_we,
    stride_wd,
    stride_wf,
    stride_oa,
    stride_of,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Swizzle: GROUP_M consecutive M tiles share each N tile's turn (L2 reuse of x rows and w panels).
    pid = tl.program_id(0)
    num_pid_n = (F + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(NUM_PID_M - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    # Which expert owns M tile pid_m: the number of experts 1..E whose tiles start at or before it
    # (expert e's tiles are [tile_starts[e], tile_starts[e+1]); tile_starts[0] = 0).
    e = pid_m * 0  # an int32 scalar of the right kind in both modes
    for e0 in range(0, E, BLOCK_E):
        ei = e0 + tl.arange(0, BLOCK_E)
        starts = tl.load(tile_starts_ptr + 1 + ei, mask=ei < E, other=pid_m + 1)  # padding: never <= m
        e += tl.reduce(tl.where(starts <= pid_m, 1, 0), 0, tl.standard._sum_combine)  # = tl.sum
    valid = e < E  # False past the last tile (the grid is an upper bound)
    e = tl.minimum(e, E - 1).to(tl.int64)
    seg_start = tl.load(offsets_ptr + e)
    seg_end = tl.minimum(tl.load(offsets_ptr + e + 1), A)  # never read past x (bad counts)
    row0 = seg_start + (pid_m - tl.load(tile_starts_ptr + e)) * BLOCK_M
    row_end = tl.where(valid, seg_end, 0)
    k_end = tl.where(valid, D, 0)  # a zero-trip K loop for the programs past the last tile

    rows = row0 + tl.arange(0, BLOCK_M)  # [M] int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    row_ok = (rows >= seg_start) & (rows < row_end)  # the lower bound: only a guard against bad counts
    col_ok = cols < F
    x_rows = x_ptr + rows[:, None] * stride_xa  # [M, 1]
    w_cols = w_ptr + e * stride_we + cols[None, :].to(tl.int64) * stride_wf  # [1, N]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, ACC)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        ks64 = ks.to(tl.int64)  # int64 offsets throughout: strided (transposed) operands overflow int32
        a = tl.load(x_rows + ks64[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks64[:, None] * stride_wd, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only (see the module docstring)
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    out = out_ptr + rows[:, None] * stride_oa + cols[None, :].to(tl.int64) * stride_of
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@jit
def _weight_grad_kernel(
    x_ptr,
    g_ptr,
    out_ptr,
    offsets_ptr,
    A,
    D,
    F,
    stride_xa,
    stride_xd,
    stride_ga,
    stride_gf,
    stride_oe,
    stride_od,
    stride_of,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Expert on the slowest grid axis: programs running together share one expert's x and g rows.
    e = tl.program_id(2).to(tl.int64)
    ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
    d_ok = ds < D
    f_ok = fs < F
    lo = tl.load(offsets_ptr + e)
    hi = tl.minimum(tl.load(offsets_ptr + e + 1), A)
    x_cols = x_ptr + ds[:, None].to(tl.int64) * stride_xd  # [BD, 1]
    g_cols = g_ptr + fs[None, :].to(tl.int64) * stride_gf  # [1, BF]
    acc = tl.full([BLOCK_D, BLOCK_F], 0.0, ACC)
    for r0 in range(lo, hi, BLOCK_K):  # an empty expert runs no iterations: its block stays zero
        rs = r0 + tl.arange(0, BLOCK_K)  # [K] int64 rows of expert e
        r_ok = rs < hi
        xt = tl.load(x_cols + rs[None, :] * stride_xa, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        g = tl.load(g_cols + rs[:, None] * stride_ga, mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(ACC)
            g = g.to(ACC)
        acc = tl.dot(xt, g, acc, input_precision="ieee", out_dtype=ACC)  # [BD, BK] @ [BK, BF]
    out = (
        out_ptr + e * stride_oe + ds[:, None].to(tl.int64) * stride_od + fs[None, :].to(tl.int64) * stride_of
    )
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=d_ok[:, None] & f_ok[None, :])


# ------------------------------------------------------------------------------------ block heuristics
def _p2(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) clamped to [lo, hi]."""
    return max(lo, min(triton.next_power_of_2(max(n, 1)), hi))


def _compiled_tiles(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """Compiled (CUDA) upper bounds for both kernels: (two output-tile sides, reduction step,
    num_warps, num_stages). 16-bit inputs: 128 x 128 x 64, 8 warps, 4 stages (tensor cores);
    fp32 / fp64: 64 x 64 x 32, 4 warps, 3 stages."""
    if dtype in (torch.bfloat16, torch.float16):
        return 128, 128, 64, 8, 4
    return 64, 64, 32, 4, 3


def _mm_config(A: int, D: int, F: int, E: int, dtype: torch.dtype, device: torch.device) -> dict:
    """BLOCK_M/N/K, num_warps, num_stages for the forward.

    Compiled: bf16/fp16 128x128x64 tiles, 8 warps, 4 stages: 4 x (128x64 + 64x128) x 2 B = 128 KiB of
    the H100's 227 KiB shared memory per block. Compiled ahead of time for sm_90 with triton 3.7 (no
    GPU needed; the test file does it), both kernels lower to wgmma with the K loop pipelined through
    4 stages of async copies, at ~115 registers per thread and no spills. BLOCK_M 128 wastes at most
    one partial tile per non-empty expert (A=32768, E=64: 256 full tiles + <= 64 partial). fp32 (IEEE:
    CUDA-core FMAs, no tensor cores) and fp64 use 64x64x32, 4 warps, 3 stages. These are untimed
    starting points (no GPU was available when they were written): benchmark before trusting them.
    tl.dot needs every block >= 16 when compiled.

    Interpreted: each program is numpy work on whole tiles plus Python overhead per op, so blocks cover
    as much of the problem as possible (few programs) without padding far past the real extents
    (masked loads cost per padded element). BLOCK_M is sized to the mean non-empty segment."""
    if interpreted(device):
        mean_rows = -(-A // max(1, min(E, A)))
        bm = _p2(mean_rows, 16, 128)
        return dict(BLOCK_M=bm, BLOCK_N=_p2(F, 16, 256), BLOCK_K=_p2(D, 16, 256), num_warps=4, num_stages=1)
    bm, bn, bk, warps, stages = _compiled_tiles(dtype)
    return dict(
        BLOCK_M=_p2(A, 16, bm),
        BLOCK_N=_p2(F, 16, bn),
        BLOCK_K=_p2(D, 16, bk),
        num_warps=warps,
        num_stages=stages,
    )


def _wgrad_config(A: int, D: int, F: int, dtype: torch.dtype, device: torch.device) -> dict:
    """BLOCK_D/F/K (K: rows per step), num_warps, num_stages for the weight gradient; as ``_mm_config``."""
    if interpreted(device):
        return dict(
            BLOCK_D=_p2(D, 16, 256),
            BLOCK_F=_p2(F, 16, 256),
            BLOCK_K=_p2(A, 16, 128),
            num_warps=4,
            num_stages=1,
        )
    bd, bf, bk, warps, stages = _compiled_tiles(dtype)
    return dict(
        BLOCK_D=_p2(D, 16, bd),
        BLOCK_F=_p2(F, 16, bf),
        BLOCK_K=_p2(A, 16, bk),
        num_warps=warps,
        num_stages=stages,
    )


def _check(x: torch.Tensor, other: torch.Tensor, counts: torch.Tensor, what: str) -> None:
    """Static checks only (shapes, dtypes, devices): nothing here reads tensor data."""
    if x.dim() != 2 or counts.dim() != 1:
        raise ValueError(
            f"grouped_mm: x must be [A, D] and counts [E]; got {tuple(x.shape)}, {tuple(counts.shape)}"
        )
    if x.dtype != other.dtype:
        raise TypeError(f"grouped_mm: x is {x.dtype} but {what} is {other.dtype}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex:
        raise TypeError(f"grouped_mm: counts must be an integer tensor, got {counts.dtype}")
    if not (x.device == other.device == counts.device):
        raise ValueError(f"grouped_mm: tensors on {x.device}, {other.device}, {counts.device}")


# -------------------------------------------------------------------------------------------- launchers
def grouped_mm_launch(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    block_e: int | None = None,
) -> torch.Tensor:
    """out[A, F]: rows [offsets[e], offsets[e+1]) of ``x`` [A, D] times ``w[e]`` [D, F] (any strides).
    ``counts`` [E] must sum to A (rows past the sum are left unwritten, like the reference's
    ``new_empty``; a larger sum is clipped at A). No host sync. ``block_*`` force the tiles (tests);
    ``block_e`` is how many experts the tile -> expert search compares per step."""
    _check(x, w, counts, "w")
    A, D = x.shape
    if w.dim() != 3 or w.shape[1] != D or counts.shape[0] != w.shape[0]:
        raise ValueError(f"grouped_mm: x {tuple(x.shape)}, w {tuple(w.shape)}, counts {tuple(counts.shape)}")
    E, F = w.shape[0], w.shape[2]
    out = x.new_empty(A, F) if out is None else out
    if A == 0 or F == 0 or E == 0:
        return out
    cfg = _mm_config(A, D, F, E, x.dtype, x.device)
    bm = block_m or cfg["BLOCK_M"]
    bn = block_n or cfg["BLOCK_N"]
    bk = block_k or cfg["BLOCK_K"]
    # offsets and tile starts in one cumsum: [2, E+1] int64, row 0 rows, row 1 M tiles.
    c = counts.to(torch.int64)
    meta = torch.zeros(2, E + 1, dtype=torch.int64, device=x.device)
    meta[:, 1:] = torch.stack([c, (c + bm - 1) // bm]).cumsum(1)
    num_pid_m = triton.cdiv(A, bm) + min(E, A)  # >= the real number of M tiles, whatever the counts
    grid = (num_pid_m * triton.cdiv(F, bn),)
    _grouped_mm_kernel.on(x.device)[grid](
        x,
        w,
        out,
        meta[0],
        meta[1],
        A,
        D,
        F,
        E,
        num_pid_m,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_E=block_e or _p2(E, 16, 1024),  # experts compared per step of the tile search
        GROUP_M=8,
        ACC=acc_dtype(x.dtype),
        UPCAST=interpreted(x.device),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def grouped_mm_weight_grad_launch(
    x: torch.Tensor,
    g: torch.Tensor,
    counts: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
    block_f: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """out[E, D, F]: per expert x_seg^T @ g_seg (zeros for an empty expert). No host sync."""
    _check(x, g, counts, "g")
    if g.dim() != 2 or g.shape[0] != x.shape[0]:
        raise ValueError(f"grouped_mm_weight_grad: x {tuple(x.shape)}, g {tuple(g.shape)}")
    (A, D), F, E = x.shape, g.shape[1], counts.shape[0]
    out = x.new_empty(E, D, F) if out is None else out
    if E == 0 or D == 0 or F == 0:
        return out
    cfg = _wgrad_config(A, D, F, x.dtype, x.device)
    bd = block_d or cfg["BLOCK_D"]
    bf = block_f or cfg["BLOCK_F"]
    bk = block_k or cfg["BLOCK_K"]
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = counts.to(torch.int64).cumsum(0)
    grid = (triton.cdiv(D, bd), triton.cdiv(F, bf), E)
    _weight_grad_kernel.on(x.device)[grid](
        x,
        g,
        out,
        offsets,
        A,
        D,
        F,
        x.stride(0),
        x.stride(1),
        g.stride(0),
        g.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_D=bd,
        BLOCK_F=bf,
        BLOCK_K=bk,
        ACC=acc_dtype(x.dtype),
        UPCAST=interpreted(x.device),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("lumina_triton::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return grouped_mm_launch(x, w, counts)


@_grouped_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("lumina_triton::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return grouped_mm_weight_grad_launch(x, g, counts)


@_grouped_mm_weight_grad_op.register_fake
def _(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(counts.shape[0], x.shape[1], g.shape[1])


# ------------------------------------------------------------------------------------ autograd wrappers
# The Functions (torch.func.grad cannot use register_autograd in torch 2.13) with the grouped-matmul
# formulas every implementation shares (kernels/_autograd.py), also registered on the ops.
_ops = torch.ops.lumina_triton
GroupedMM, GroupedMMWeightGrad = op_functions(
    "lumina_triton",
    grouped_mm=_ops.grouped_mm.default,
    grouped_mm_weight_grad=_ops.grouped_mm_weight_grad.default,
)


# --------------------------------------------------------------------------------------------- public
def grouped_mm(x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[e], offsets[e+1]) of the expert-sorted ``x`` times ``w[e]``. [A, F]. No host sync;
    differentiable (twice) in x and w; ``counts_E`` must sum to A."""
    return apply(GroupedMM, x_AD, w_EDF, counts_E)


def grouped_mm_weight_grad(x_AD: torch.Tensor, g_AF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(w) of ``grouped_mm`` for output gradient ``g``: per expert x_seg^T @ g_seg, zeros for an
    empty expert. [E, D, F]. Differentiable in x and g."""
    return apply(GroupedMMWeightGrad, x_AD, g_AF, counts_E)
