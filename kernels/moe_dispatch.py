"""Dropless MoE routing metadata and dispatch in Triton: expert histogram, offsets, the stable
expert-contiguous permutation and capacity positions; token rows gathered into that order, and the
gather's backward.

Legend: N tokens, K top-k, A = N*K assignments (a = n*K + k is token n's k-th choice), E experts,
D model dim. ``perm_A`` lists assignment ids in expert-sorted order; ``inverse_A`` is its inverse
(``inverse_A[perm_A[i]] = i``: the sorted row of each assignment).

Dispatch and its backward (and the combine in ``moe_combine``) also take a *partial* map ``perm_S``
of any length S whose entries are assignment ids or -1 (an empty row): a capacity buffer flattened to
S = E*C rows, with dropped assignments in no row, or a MoD selection (K = 1). Empty rows dispatch as
zeros; assignments in no row get no gradient (``inverse`` is -1 there).

  routing   counts[e]       = #{a : expert[a] = e}                                          [E]
            offsets[e]      = counts[0] + ... + counts[e-1]                                 [E + 1]
            perm[offsets[e] + #{a' < a : expert[a'] = e}] = a    (stable counting sort)     [A]
            position[a]     = #{a' : expert[a'] = expert[a], w[a'] > w[a] or (w[a'] = w[a], a' < a)}
                              (with a capacity; dropless: a's place in its expert's segment of perm)
            keep[a]         = position[a] < capacity (all True without one)                [A]
  forward   out[i]  = x[perm_S[i] // K]   (0 where perm_S[i] = -1)        [S, D]
  backward  dx[n]   = sum_k g[inverse_A[n*K + k]]   (k = 0..K-1, in order; terms with -1 skipped) [N, D]

Routing is four launches over static shapes (no host synchronisation, so it compiles with
``fullgraph=True``) and no atomics: per-block expert histograms (a one-hot of the block's ids summed
over rows), one program that prefix-sums them over blocks and experts, per-block placement (each
assignment's rank among its block's same-expert assignments, by an in-block prefix sum, plus its
block's and its expert's offsets), and the capacity positions: each sorted row counts the rows of its
own expert segment that outrank it (O(sum_e counts[e]^2) comparisons, spread over row blocks);
dropless routing skips the ranking (a row's position is then its place in its segment: O(A)).

The dispatch backward is a gather and a fixed-order sum per token, not a scatter-add: no atomics, so it
is deterministic (bit-identical run to run), and each output row is written exactly once.

Layers: ``_kernel`` -> launcher (``*_launch``, takes an optional preallocated ``out``) -> custom op
``lumina_triton::*`` (+ fake, + autograd) -> ``autograd.Function`` (for ``torch.func``) -> public fn.
Compiled on CUDA tensors, interpreted on CPU tensors (see ``_triton``). Semantics:
``reference.moe_routing`` and ``reference.moe_dispatch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autograd import apply, op_functions
from ._triton import acc_dtype, interpreted, jit, row_blocks

__all__ = ["inverse_permutation", "moe_dispatch", "moe_dispatch_backward", "moe_routing"]


# ---------------------------------------------------------------------------------------------- kernels
@jit
def _inverse_permutation_kernel(perm_ptr, inv_ptr, S, size, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < S
    p = tl.load(perm_ptr + i, mask=mask, other=-1)
    # A (partial) permutation: every target is written at most once, so the scatter has no conflicts;
    # the launcher filled inv with -1 for the assignments no row holds. Ids outside [0, size) (a
    # caller's wrong size) are not written: never a write out of bounds.
    tl.store(inv_ptr + p, i.to(tl.int64), mask=mask & (p >= 0) & (p < size))


@jit
def _dispatch_kernel(
    x_ptr, perm_ptr, out_ptr, A, D, K, stride_x, stride_out, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] sorted rows
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [C]
    row_ok = rows < A
    src = tl.load(perm_ptr + rows, mask=row_ok, other=-1).to(tl.int64)  # [R]; -1: an empty row
    token = tl.where(src >= 0, src, 0) // K
    mask = row_ok[:, None] & (cols < D)[None, :]
    vals = tl.load(
        x_ptr + token[:, None] * stride_x + cols[None, :], mask=mask & (src >= 0)[:, None], other=0
    )
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
        src = tl.load(inv_ptr + rows64 * K + k, mask=row_ok, other=-1)  # [R] row of (n, k); -1: none
        ok = mask & (src >= 0)[:, None]
        acc += tl.load(g_ptr + src[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(ACC)
    tl.store(
        out_ptr + rows64[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


@jit
def _block_histogram_kernel(ids_ptr, hist_ptr, A, E, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[blk, e] = #{a in block blk : expert[a] = e}: a one-hot [BLOCK_A, BLOCK_E] summed over rows."""
    blk = tl.program_id(0)
    a = blk * BLOCK_A + tl.arange(0, BLOCK_A)
    e = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + a, mask=a < A, other=-1).to(tl.int32)  # -1: matches no expert
    onehot = tl.where(ids[:, None] == e[None, :], 1, 0)
    hist = tl.reduce(onehot, 0, tl.standard._sum_combine)  # = tl.sum (see _triton)
    tl.store(hist_ptr + blk.to(tl.int64) * E + e, hist.to(tl.int64), mask=e < E)


@jit
def _offsets_kernel(hist_ptr, counts_ptr, offsets_ptr, NBLK, E, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program. hist[blk, e] becomes its exclusive prefix over blocks (where block blk's
    assignments to e start inside e's segment); counts[e] = the column totals; offsets = the exclusive
    prefix of counts over experts, with offsets[E] = A."""
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    carry = tl.full([BLOCK_E], 0, tl.int64)  # per expert: assignments in the blocks before
    for b0 in range(0, NBLK, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = (b < NBLK)[:, None] & e_ok[None, :]
        ptrs = hist_ptr + b.to(tl.int64)[:, None] * E + e[None, :]
        h = tl.load(ptrs, mask=mask, other=0)
        inclusive = tl.associative_scan(h, 0, tl.standard._sum_combine)  # = tl.cumsum (see _triton)
        tl.store(ptrs, carry[None, :] + inclusive - h, mask=mask)
        carry += tl.reduce(h, 0, tl.standard._sum_combine)
    tl.store(counts_ptr + e, carry, mask=e_ok)
    ends = tl.associative_scan(carry, 0, tl.standard._sum_combine)  # offsets[1:]; padded lanes add 0
    tl.store(offsets_ptr + 1 + e, ends, mask=e_ok)
    tl.store(offsets_ptr + e, tl.full([BLOCK_E], 0, tl.int64), mask=e == 0)


@jit
def _place_kernel(
    ids_ptr, hist_ptr, offsets_ptr, perm_ptr, A, E, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr
):
    """perm[offsets[e] + hist[blk, e] + rank of a among the block's earlier assignments to e] = a."""
    blk = tl.program_id(0)
    a = blk * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < A
    e = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + a, mask=a_ok, other=-1).to(tl.int32)
    onehot = tl.where(ids[:, None] == e[None, :], 1, 0)
    before = tl.associative_scan(onehot, 0, tl.standard._sum_combine) - onehot  # exclusive, per expert
    rank = tl.reduce(before * onehot, 1, tl.standard._sum_combine)  # [BLOCK_A]: its own expert's column
    safe = tl.where(a_ok, ids, 0)
    start = tl.load(offsets_ptr + safe, mask=a_ok, other=0)
    start += tl.load(hist_ptr + blk.to(tl.int64) * E + safe, mask=a_ok, other=0)
    dest = start + rank  # a permutation: one writer per slot, all in [0, A) (guarded against bugs)
    tl.store(perm_ptr + dest, a.to(tl.int64), mask=a_ok & (dest >= 0) & (dest < A))


@jit
def _position_kernel(
    ids_ptr,
    w_ptr,
    perm_ptr,
    offsets_ptr,
    position_ptr,
    keep_ptr,
    A,
    C,
    HAS_CAPACITY: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """For the sorted rows i of this block (assignment a = perm[i], expert e, weight w). With a
    capacity: position[a] = the rows j of e's segment that outrank it (w_j > w, or w_j = w and
    a_j < a), keep = position < C; rows are expert-sorted, so the block's experts span one range of
    rows. Dropless: position[a] = i - offsets[e] (its place in the token-ordered segment), keep = True
    — no ranking, so no O(count^2) work."""
    i0 = tl.program_id(0) * BLOCK_I
    i = i0 + tl.arange(0, BLOCK_I)
    i_ok = i < A
    a_i = tl.load(perm_ptr + i, mask=i_ok, other=0)
    e_i = tl.load(ids_ptr + a_i, mask=i_ok, other=-1).to(tl.int32)
    if HAS_CAPACITY:  # constexpr: resolved at compile time
        w_i = tl.load(w_ptr + a_i, mask=i_ok, other=0.0)
        e_first = tl.load(ids_ptr + tl.load(perm_ptr + i0)).to(tl.int32)
        e_last = tl.load(ids_ptr + tl.load(perm_ptr + tl.minimum(i0 + BLOCK_I, A) - 1)).to(tl.int32)
        lo = tl.load(offsets_ptr + e_first)
        hi = tl.load(offsets_ptr + e_last + 1)
        n = tl.full([BLOCK_I], 0, tl.int64)
        for j0 in range(lo, hi, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < hi
            a_j = tl.load(perm_ptr + j, mask=j_ok, other=0)
            e_j = tl.load(ids_ptr + a_j, mask=j_ok, other=-2).to(tl.int32)  # -2: never a row's expert
            w_j = tl.load(w_ptr + a_j, mask=j_ok, other=0.0)
            wins = (w_j[None, :] > w_i[:, None]) | (
                (w_j[None, :] == w_i[:, None]) & (a_j[None, :] < a_i[:, None])
            )
            n += tl.reduce(tl.where((e_j[None, :] == e_i[:, None]) & wins, 1, 0), 1, tl.standard._sum_combine)
        keep = n < C
    else:
        n = i.to(tl.int64) - tl.load(offsets_ptr + e_i, mask=i_ok, other=0)
        keep = n >= 0  # all True
    tl.store(position_ptr + a_i, n, mask=i_ok)
    tl.store(keep_ptr + a_i, keep, mask=i_ok)


# -------------------------------------------------------------------------------------------- launchers
def inverse_permutation_launch(
    perm_S: torch.Tensor, size: int | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """inv[perm_S[i]] = i over ``size`` assignments (default: len(perm_S)), -1 for those in no row."""
    perm_S = perm_S.contiguous()
    S = perm_S.numel()
    size = S if size is None else size
    inv_A = torch.empty(size, dtype=torch.int64, device=perm_S.device) if out is None else out
    inv_A.fill_(-1)
    if S:
        block = min(triton.next_power_of_2(S), 1 << 16 if interpreted(perm_S.device) else 1024)
        _inverse_permutation_kernel.on(perm_S.device)[(triton.cdiv(S, block),)](
            perm_S, inv_A, S, size, BLOCK=block
        )
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
    num_tokens: int | None = None,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """dx [num_tokens, D] (default num_tokens: len(perm) // top_k, the dropless case)."""
    g_AD = g_AD.contiguous()
    A, D = g_AD.shape
    N = A // top_k if num_tokens is None else num_tokens
    inv_A = inverse_permutation_launch(perm_A, N * top_k)
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


def _routing_blocks(A: int, E: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_E): the one-hot tiles [BLOCK_A, BLOCK_E] hold every expert; at most 4096
    elements compiled (registers), 64 Ki interpreted (few programs)."""
    be = triton.next_power_of_2(max(E, 1))
    ba = max(1, min(triton.next_power_of_2(max(A, 1)), (1 << 16 if interpreted(device) else 4096) // be))
    return ba, be


def moe_routing_launch(
    topk_ids_NK: torch.Tensor,
    topk_weights_NK: torch.Tensor,
    num_experts: int,
    capacity: int | None,
    *,
    out: tuple[torch.Tensor, ...] | None = None,
    block_a: int | None = None,
    block_b: int | None = None,
    block_i: int | None = None,
    block_j: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts_E, offsets_E1, perm_A, position_A, keep_A), as ``reference.moe_routing``. Expert ids
    must lie in [0, num_experts) (unchecked: checking would read them on the host)."""
    ids_A = topk_ids_NK.reshape(-1).contiguous()
    w_A = topk_weights_NK.reshape(-1).contiguous()
    A, E, dev = ids_A.numel(), num_experts, ids_A.device
    if out is None:
        counts_E = torch.empty(E, dtype=torch.int64, device=dev)
        offsets_E1 = torch.empty(E + 1, dtype=torch.int64, device=dev)
        perm_A = torch.empty(A, dtype=torch.int64, device=dev)
        position_A = torch.empty(A, dtype=torch.int64, device=dev)
        keep_A = torch.empty(A, dtype=torch.bool, device=dev)
    else:
        counts_E, offsets_E1, perm_A, position_A, keep_A = out
    ba, be = _routing_blocks(A, E, dev)
    ba = block_a or ba
    nblk = triton.cdiv(A, ba)
    hist = torch.empty(nblk, E, dtype=torch.int64, device=dev)  # per-block histograms, then their prefix
    if nblk:
        _block_histogram_kernel.on(dev)[(nblk,)](ids_A, hist, A, E, BLOCK_A=ba, BLOCK_E=be)
    block_b = block_b or max(1, min(triton.next_power_of_2(max(nblk, 1)), 4096 // be))
    _offsets_kernel.on(dev)[(1,)](hist, counts_E, offsets_E1, nblk, E, BLOCK_B=block_b, BLOCK_E=be)
    if A:
        _place_kernel.on(dev)[(nblk,)](ids_A, hist, offsets_E1, perm_A, A, E, BLOCK_A=ba, BLOCK_E=be)
        side = 256 if interpreted(dev) else 64
        bi = block_i or min(triton.next_power_of_2(A), side)
        bj = block_j or min(triton.next_power_of_2(A), side)
        _position_kernel.on(dev)[(triton.cdiv(A, bi),)](
            ids_A,
            w_A,
            perm_A,
            offsets_E1,
            position_A,
            keep_A,
            A,
            0 if capacity is None else capacity,
            HAS_CAPACITY=capacity is not None,
            BLOCK_I=bi,
            BLOCK_J=bj,
        )
    return counts_E, offsets_E1, perm_A, position_A, keep_A


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("lumina_triton::inverse_permutation", mutates_args=())
def _inverse_permutation_op(perm: torch.Tensor, size: int | None = None) -> torch.Tensor:
    return inverse_permutation_launch(perm, size)


@_inverse_permutation_op.register_fake
def _(perm: torch.Tensor, size: int | None = None) -> torch.Tensor:
    return perm.new_empty(perm.shape[0] if size is None else size, dtype=torch.int64)


@torch.library.custom_op("lumina_triton::moe_dispatch", mutates_args=())
def _moe_dispatch_op(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    return moe_dispatch_launch(x, perm, top_k)


@_moe_dispatch_op.register_fake
def _(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    return x.new_empty(perm.shape[0], x.shape[1])


@torch.library.custom_op("lumina_triton::moe_dispatch_backward", mutates_args=())
def _moe_dispatch_backward_op(
    g: torch.Tensor, perm: torch.Tensor, top_k: int, num_tokens: int
) -> torch.Tensor:
    return moe_dispatch_backward_launch(g, perm, top_k, num_tokens)


@_moe_dispatch_backward_op.register_fake
def _(g: torch.Tensor, perm: torch.Tensor, top_k: int, num_tokens: int) -> torch.Tensor:
    return g.new_empty(num_tokens, g.shape[1])


@torch.library.custom_op("lumina_triton::moe_routing", mutates_args=())
def _moe_routing_op(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe_routing_launch(topk_ids, topk_weights, num_experts, capacity)


@_moe_routing_op.register_fake
def _(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    A = topk_ids.numel()
    i64 = dict(dtype=torch.int64)
    return (
        topk_ids.new_empty(num_experts, **i64),
        topk_ids.new_empty(num_experts + 1, **i64),
        topk_ids.new_empty(A, **i64),
        topk_ids.new_empty(A, **i64),
        topk_ids.new_empty(A, dtype=torch.bool),
    )


# ------------------------------------------------------------------------------------ autograd wrappers
# The Functions (torch.func.grad cannot use register_autograd in torch 2.13) with the dispatch formulas
# every provider shares (kernels/_autograd.py), also registered on the ops.
_ops = torch.ops.lumina_triton
MoeDispatch, MoeDispatchBackward = op_functions(
    "lumina_triton",
    moe_dispatch=_ops.moe_dispatch.default,
    moe_dispatch_backward=_ops.moe_dispatch_backward.default,
)


# --------------------------------------------------------------------------------------------- public
def inverse_permutation(perm_S: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``inverse_A[perm_S[i]] = i`` over ``size`` assignments (default len(perm_S)), -1 for those in
    no row. [size] int64; one kernel, no host sync."""
    return _inverse_permutation_op(perm_S, size)


def moe_dispatch(x_ND: torch.Tensor, perm_A: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token rows in expert-contiguous order: row i is token perm_A[i] // top_k (zero where -1). [S, D]"""
    return apply(MoeDispatch, x_ND, perm_A, top_k)


def moe_dispatch_backward(
    g_AD: torch.Tensor, perm_A: torch.Tensor, top_k: int, num_tokens: int | None = None
) -> torch.Tensor:
    """The adjoint of ``moe_dispatch``: each token's K rows of ``g`` summed in k order. [N, D]
    (N = num_tokens, default len(perm_A) // top_k: the dropless case)."""
    N = perm_A.shape[0] // top_k if num_tokens is None else num_tokens
    return apply(MoeDispatchBackward, g_AD, perm_A, top_k, N)


def moe_routing(
    topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts_E, offsets_E1, perm_A, position_A, keep_A) exactly as ``reference.moe_routing``; no host
    sync. Integer outputs, not differentiable: the weights (which only rank) are detached."""
    return _moe_routing_op(topk_ids_NK, topk_weights_NK.detach(), num_experts, capacity)
