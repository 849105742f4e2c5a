"""Pure-torch references of every routing kernel: the semantics the Triton and native kernels must match,
and the CPU fallback. Plain, obviously-correct torch; never imports ``lumina``.

Legend: N tokens, K experts per token (top-k), A = N*K assignments, E experts, C capacity per expert,
D model dim, F expert hidden dim, B batch, T sequence length, S selected tokens per sequence (MoD).
An *assignment* a = n*K + j is token n's j-th choice.

Dispatch and combine take a row map ``perm_S``: row i of the expert-side buffer holds assignment
``perm_S[i]``, or nothing when it is -1. Dropless routing passes a permutation of the A assignments
(S = A); a capacity buffer is the partial map of its E*C slots (``capacity_map``), a MoD selection the
map of its B*S rows with K = 1. An assignment in no row is dropped: it contributes nothing and gets
no gradient.
"""

from __future__ import annotations

import torch

__all__ = [
    "capacity_combine",
    "capacity_dispatch",
    "capacity_map",
    "fold_in",
    "grouped_mm",
    "grouped_mm_weight_grad",
    "hash32",
    "hash_uniform",
    "inverse_map",
    "mod_gather",
    "mod_scatter",
    "mod_topk",
    "moe_combine",
    "moe_dispatch",
    "moe_routing",
]


def moe_routing(
    topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing metadata, with no host synchronisation (every output size is static).

    Returns
      counts_E     assignments per expert, before any capacity drop (the histogram), int64
      offsets_E1   exclusive prefix sum of counts, [E + 1], int64
      perm_A       assignment ids in expert-contiguous order, token order within an expert (stable)
      position_A   with a capacity: each assignment's rank inside its expert by descending router
                   weight (ties: lower assignment id first), the slot it takes in the capacity
                   buffer; dropless: its place in the expert's token-ordered segment (perm order),
                   which costs O(A) instead of the ranking's O(sum of count^2)
      keep_A       position < capacity (all True when capacity is None: dropless)
    """
    expert_A = topk_ids_NK.reshape(-1)
    A = expert_A.numel()
    # scatter_add, not bincount: bincount's output length depends on the data (max id + 1), which
    # torch.compile must treat as an unbacked size (and refuses inside autograd.Function segments).
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_A.device)
    counts_E = counts_E.scatter_add(0, expert_A, torch.ones_like(expert_A))
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_A.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    perm_A = torch.sort(expert_A, stable=True).indices
    ranked = perm_A  # dropless: the token-ordered segments
    if capacity is not None:  # rank by weight inside each expert: by weight (desc), then stably by expert
        by_weight = torch.sort(topk_weights_NK.reshape(-1), descending=True, stable=True).indices
        ranked = by_weight[torch.sort(expert_A[by_weight], stable=True).indices]
    position_A = torch.empty(A, dtype=torch.int64, device=expert_A.device)
    position_A[ranked] = torch.arange(A, device=expert_A.device) - offsets_E1[expert_A[ranked]]
    keep_A = position_A < capacity if capacity is not None else torch.ones_like(position_A, dtype=torch.bool)
    return counts_E, offsets_E1, perm_A, position_A, keep_A


def moe_dispatch(x_ND: torch.Tensor, perm_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token rows in expert-contiguous order: row i is token perm_S[i] // top_k, zero where -1. [S, D]"""
    held = perm_S >= 0
    rows = x_ND[torch.where(held, perm_S, 0) // top_k]
    return torch.where(held[:, None], rows, torch.zeros((), dtype=x_ND.dtype, device=x_ND.device))


def grouped_mm(x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Segment e of the expert-sorted rows times w[e]. [A, F]. A loop: reads counts on the host."""
    out = x_AD.new_empty(x_AD.shape[0], w_EDF.shape[-1])
    start = 0
    # straight into the output's rows (a contiguous slice): no temporary and copy per segment, unless
    # autograd records this (mm(out=...) is not differentiable)
    direct = not (torch.is_grad_enabled() and (x_AD.requires_grad or w_EDF.requires_grad))
    for e, n in enumerate(counts_E.tolist()):
        if direct:
            torch.mm(x_AD[start : start + n], w_EDF[e], out=out[start : start + n])
        else:
            out[start : start + n] = x_AD[start : start + n] @ w_EDF[e]
        start += n
    return out


def grouped_mm_weight_grad(x_AD: torch.Tensor, g_AF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(w) of ``grouped_mm``: per segment x_seg^T @ g_seg. [E, D, F]"""
    direct = not (torch.is_grad_enabled() and (x_AD.requires_grad or g_AF.requires_grad))
    out = (x_AD.new_empty if direct else x_AD.new_zeros)(counts_E.shape[0], x_AD.shape[1], g_AF.shape[1])
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if direct:  # as grouped_mm; an empty segment writes zeros
            torch.mm(x_AD[start : start + n].T, g_AF[start : start + n], out=out[e])
        else:
            out[e] = x_AD[start : start + n].T @ g_AF[start : start + n]
        start += n
    return out


def inverse_map(perm_S: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """inverse[perm_S[i]] = i: the row holding each assignment, -1 for one in no row. [A]"""
    A = num_assignments
    # Rows with -1 write into a sink entry A, then dropped (several may: only the sink collides).
    target = torch.where(perm_S >= 0, perm_S, A)
    inverse = torch.full((A + 1,), -1, dtype=torch.int64, device=perm_S.device)
    return inverse.scatter(0, target, torch.arange(perm_S.numel(), device=perm_S.device))[:A]


def moe_combine(y_AD: torch.Tensor, perm_S: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Each token's router-weighted sum of its K expert outputs (y in expert-sorted order); an
    assignment in no row contributes zero. [N, D]. A gather and a fixed-order sum: deterministic."""
    N, K = weights_NK.shape
    inverse_A = inverse_map(perm_S, N * K)
    held_A = inverse_A >= 0
    held_NK1 = held_A.view(N, K, 1)
    y_NKD = torch.where(held_NK1, y_AD[inverse_A.clamp(min=0)].view(N, K, -1), 0)
    w_NK1 = torch.where(held_NK1, weights_NK.unsqueeze(-1), 0).to(y_AD.dtype)
    return (y_NKD * w_NK1).sum(dim=1)


def capacity_map(
    topk_ids_NK: torch.Tensor, position_A: torch.Tensor, keep_A: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """The row map of a capacity buffer flattened to [E*C]: slot e*C + p holds the kept assignment of
    expert e at position p, or -1. Static size, no host sync."""
    EC = num_experts * capacity
    A = position_A.numel()
    slot_A = torch.where(keep_A, topk_ids_NK.reshape(-1) * capacity + position_A, EC)  # EC: a sink
    src = torch.full((EC + 1,), -1, dtype=torch.int64, device=position_A.device)
    return src.scatter(0, slot_A, torch.arange(A, device=position_A.device))[:EC]


def capacity_dispatch(
    x_ND: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    position_A: torch.Tensor,
    keep_A: torch.Tensor,
    num_experts: int,
    capacity: int,
) -> torch.Tensor:
    """Kept assignments written to their (expert, position) slot of a zero buffer [E, C, D]."""
    N, K = topk_ids_NK.shape
    EC = num_experts * capacity
    slot_A = torch.where(keep_A, topk_ids_NK.reshape(-1) * capacity + position_A, EC)  # EC: a sink row
    token_A = torch.arange(N * K, device=x_ND.device) // K
    buf = x_ND.new_zeros(EC + 1, x_ND.shape[1]).index_put((slot_A,), x_ND[token_A])
    return buf[:-1].view(num_experts, capacity, -1)  # the sink (dropped rows) is discarded


def capacity_combine(
    y_ECD: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    position_A: torch.Tensor,
    keep_A: torch.Tensor,
    weights_NK: torch.Tensor,
) -> torch.Tensor:
    """Router-weighted sum over each token's kept assignments; dropped ones contribute zero. [N, D]"""
    E, C, D = y_ECD.shape
    N, K = topk_ids_NK.shape
    slot_A = torch.where(keep_A, topk_ids_NK.reshape(-1) * C + position_A, 0)
    y_AD = y_ECD.reshape(E * C, D)[slot_A]
    w_A = (weights_NK.reshape(-1) * keep_A.to(weights_NK.dtype)).to(y_ECD.dtype)
    return (y_AD * w_A[:, None]).view(N, K, D).sum(dim=1)


def mod_topk(scores_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Per sequence, the positions of the k highest scores, in ascending (causal) order. [B, k]

    Equal scores go to the earlier position (a stable descending sort), -0.0 equals 0.0, and NaN ranks
    above everything. Not ``torch.topk``: which of several equal scores it keeps is unspecified (and
    differs between its CPU and CUDA kernels), so a kernel could not be held to it."""
    order_BT = torch.sort(scores_BT, dim=1, descending=True, stable=True).indices
    return torch.sort(order_BT[:, :k], dim=1).values


def mod_gather(x_BTD: torch.Tensor, idx_BS: torch.Tensor) -> torch.Tensor:
    """The selected rows of each sequence. [B, S, D]"""
    return torch.gather(x_BTD, 1, idx_BS.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1]))


def mod_scatter(
    x_BTD: torch.Tensor, delta_BSD: torch.Tensor, weight_BS: torch.Tensor, idx_BS: torch.Tensor
) -> torch.Tensor:
    """x with ``weight * delta`` added at the selected rows; the other rows pass through. [B, T, D]"""
    update_BSD = delta_BSD * weight_BS.unsqueeze(-1).to(delta_BSD.dtype)
    index = idx_BS.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1])
    return x_BTD + torch.zeros_like(x_BTD).scatter(1, index, update_BSD)


# ------------------------------------------------------------------- counter-based random numbers
# (lumina.model.random builds keys with hash32 and draws with hash_uniform). Every intermediate fits
# in int64 without overflow — 32-bit multiplies are split into 16-bit halves — so every backend
# computes the same bits, whatever its integer wrap-around behaviour.

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 without int64 overflow (hi * c < 2^48)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' "lowbias32" integer hash (two multiply-xorshift rounds) of x mod 2^32, in int64."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def fold_in(key: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``key`` and one integer (a Python int or an int64 tensor), each taken mod 2^32:
    hash32(hash32(key) ^ data)."""
    d = data & _MASK32 if isinstance(data, int) else data.to(torch.int64) & _MASK32
    return hash32(hash32(key) ^ d)


def hash_uniform(key: torch.Tensor, n: int) -> torch.Tensor:
    """[n] float32 U[0, 1) with 24-bit resolution: element i is hash32(hash32(i ^ key) + key) >> 8,
    scaled (two rounds: neighbouring indices decorrelate fully). ``key``: a 0-dim int64 tensor."""
    idx = torch.arange(n, dtype=torch.int64, device=key.device)
    bits = hash32(hash32(idx ^ key) + key)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
