"""Mixture-of-Experts SwiGLU FFN: router, top-k, capacity or dropless dispatch, aux losses, stats.

Legend: N tokens (B*T), K top-k, A = N*K assignments, E experts, C capacity, D d_model, F expert hidden.

Routing, in order:
  1. jitter (training): router input * U(1 - j, 1 + j) (Switch Transformer), j = knob ``router_jitter``;
  2. logits = x @ router [N, E] in fp32, divided by the ``router_temperature`` knob;
  3. expert dropout (training): each expert is dropped with probability ``expert_dropout`` (its logit
     -> -inf, so it gets no tokens this step); the K experts with the highest draw are always kept;
  4. probs = softmax(logits); experts chosen by top-k of probs (+ the per-expert balance bias when
     ``balance="bias"``: DeepSeek-V3's aux-loss-free balancing, which biases selection, not weights);
  5. weights = the chosen probs, renormalised to sum to 1 when ``renormalize`` (Mixtral).
Capacity: ``capacity_factor=None`` is dropless (every assignment computed, grouped matmul over
variable-size expert segments); otherwise each expert takes at most C = ceil(cf * N * K / E)
assignments, keeping those with the highest router weight; dropped assignments contribute zero.
Losses: load-balancing E * sum_e f_e * P_e (f_e: share of assignments routed to e, P_e: mean router
prob of e) which is exactly 1 for a perfectly balanced router, and router z-loss mean(logsumexp^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from lumina import ops
from lumina.config import ModelConfig
from lumina.fp8 import fp8_expert_mm
from lumina.model import random
from lumina.model.layers import at_least_fp32 as _at_least_fp32
from lumina.model.layers import swiglu
from lumina.quant import adapted_mm

__all__ = ["MOE_STAT_KEYS", "moe_ffn", "moe_layer_loss", "update_balance_bias"]

# The per-layer stats moe_ffn returns, in a fixed order (remat segments return them positionally).
MOE_STAT_KEYS = ("aux_loss", "z_loss", "load", "dropped_frac", "entropy", "top1_prob")


def _rand(shape, like: torch.Tensor, rng: torch.Tensor | None, salt: int) -> torch.Tensor:
    """U[0, 1): from the counter-based ``rng`` key when given (the pure train step), else torch's
    global generator (interactive use)."""
    if rng is None:
        return torch.rand(shape, device=like.device, dtype=like.dtype)
    return random.uniform(random.fold_in(rng, salt), shape, dtype=like.dtype)


def _expert_keep_mask(E: int, K: int, p: torch.Tensor, like: torch.Tensor, rng) -> torch.Tensor:
    u_E = _rand((E,), like, rng, salt=1)
    kth_largest = u_E.topk(K).values[-1]
    return (u_E >= p) | (u_E >= kth_largest)  # p == 0 keeps all; never fewer than K kept


def _swiglu_experts(x, w_gate, w_up, w_down, mm):
    return mm(F.silu(mm(x, w_gate)) * mm(x, w_up), w_down)


def _expert_mm(mm, fp8: bool, counts: torch.Tensor | None = None, impl: str = "auto"):
    """``mm`` for expert weights that may be quantized / adapted sub-trees (``lumina.quant``);
    ``counts`` / ``impl``: the grouped matmul's expert segments and implementation."""
    base = (lambda a, w: fp8_expert_mm(a, w, mm)) if fp8 else mm
    return lambda a, w: adapted_mm(a, w, base, counts=counts, grouped_mm=impl)


def moe_ffn(
    x_BTD: torch.Tensor,
    p: TensorDict,
    cfg: ModelConfig,
    knobs: TensorDict,
    *,
    train: bool,
    rng: torch.Tensor | None = None,
    fp8: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MoE FFN output [B, T, D] and this layer's losses and stats. ``rng``: this layer's key for
    jitter and expert dropout (see ``lumina.model.random``); None draws from torch's generator.
    ``fp8``: expert and shared-expert matmuls with fp8 numerics (``lumina.fp8``); the router stays."""
    moe = cfg.moe
    B, T, D = x_BTD.shape
    N, E, K = B * T, moe.num_experts, moe.top_k
    x_ND = x_BTD.reshape(N, D)

    router_in_ND = x_ND
    if train:
        jitter = knobs["router_jitter"].to(x_ND.dtype)
        router_in_ND = x_ND * (1 + jitter * (2 * _rand(x_ND.shape, x_ND, rng, salt=0) - 1))
    raw_logits_NE = _at_least_fp32(router_in_ND @ p["router"])
    logits_NE = raw_logits_NE / knobs["router_temperature"]
    if train:
        keep_E = _expert_keep_mask(E, K, knobs["expert_dropout"], raw_logits_NE, rng)
        logits_NE = logits_NE.masked_fill(~keep_E, float("-inf"))
    probs_NE = logits_NE.softmax(dim=-1)

    select_NE = probs_NE
    if moe.balance == "bias":
        select_NE = probs_NE + p["balance_bias"].detach().to(probs_NE.dtype)
    topk_ids_NK = select_NE.topk(K, dim=-1).indices
    topk_w_NK = probs_NE.gather(1, topk_ids_NK)
    if moe.renormalize:
        topk_w_NK = topk_w_NK / topk_w_NK.sum(dim=-1, keepdim=True)

    capacity = None if moe.capacity_factor is None else math.ceil(moe.capacity_factor * N * K / E)
    counts_E, _, perm_A, position_A, keep_A = ops.moe_routing(topk_ids_NK, topk_w_NK, E, capacity)
    weights_NK = topk_w_NK.to(x_ND.dtype)
    if capacity is None:
        xs_AD = ops.moe_dispatch(x_ND, perm_A, K)
        ys_AD = _swiglu_experts(
            xs_AD,
            p["w_gate"],
            p["w_up"],
            p["w_down"],
            _expert_mm(
                lambda a, w: ops.grouped_mm(a, w, counts_E, moe.grouped_mm), fp8, counts_E, moe.grouped_mm
            ),
        )
        out_ND = ops.moe_combine(ys_AD, perm_A, weights_NK)
        load_E = counts_E
    else:
        # The E*C slots as a row map, built once for both directions: the buffer is a dispatch through
        # it (empty slots zero) and the output a combine (dropped assignments contribute nothing).
        slots_S = ops.capacity_map(topk_ids_NK, position_A, keep_A, E, capacity)
        buf_ECD = ops.moe_dispatch(x_ND, slots_S, K).view(E, capacity, D)
        y_ECD = _swiglu_experts(buf_ECD, p["w_gate"], p["w_up"], p["w_down"], _expert_mm(torch.bmm, fp8))
        out_ND = ops.moe_combine(y_ECD.reshape(E * capacity, D), slots_S, weights_NK)
        load_E = counts_E.clamp(max=capacity)
    if moe.num_shared_experts:
        s = p["shared"]
        out_ND = out_ND + swiglu(x_ND, s["w_gate"], s["w_up"], s["w_down"], fp8)

    frac_routed_E = counts_E.float() / (N * K)  # decisions before drops; no gradient (as in Switch)
    balance_loss = E * (frac_routed_E * probs_NE.mean(dim=0)).sum()
    z_loss = torch.logsumexp(raw_logits_NE, dim=-1).pow(2).mean()
    stats = {
        "aux_loss": balance_loss,
        "z_loss": z_loss,
        "load": load_E.float(),
        "dropped_frac": 1.0 - keep_A.float().mean(),
        "entropy": -(probs_NE * probs_NE.clamp_min(1e-20).log()).sum(dim=-1).mean(),
        "top1_prob": probs_NE.max(dim=-1).values.mean(),
    }
    return out_ND.view(B, T, D), stats


def moe_layer_loss(stats: dict[str, torch.Tensor], cfg: ModelConfig, knobs: TensorDict) -> torch.Tensor:
    """What one MoE layer adds to the training loss: weighted balance loss (unless the aux-loss-free
    bias balances the load instead) plus the weighted z-loss."""
    loss = knobs["z_loss_weight"] * stats["z_loss"]
    if cfg.moe.balance == "aux_loss":
        loss = loss + knobs["aux_loss_weight"] * stats["aux_loss"]
    return loss


def update_balance_bias(params: TensorDict, aux: TensorDict, cfg: ModelConfig) -> TensorDict:
    """Aux-loss-free balancing step (DeepSeek-V3): raise the selection bias of under-loaded experts,
    lower it for over-loaded ones, by ``bias_update_rate``. Pure: returns new params."""
    if cfg.moe.balance != "bias":
        return params
    out = params.clone(recurse=False)
    for i, is_moe in enumerate(cfg.moe_layers()):
        if is_moe:
            load_E = aux["moe", str(i), "load"]
            bias = params["layers", str(i), "moe", "balance_bias"]
            step = cfg.moe.bias_update_rate * torch.sign(load_E.mean() - load_E).to(bias.dtype)
            out["layers", str(i), "moe", "balance_bias"] = bias + step
    return out
