"""Mixture-of-Depths routing around a block (arXiv 2404.02258).

Legend: B batch, T positions, S = ceil(capacity * T) selected per sequence, D d_model, P predictor hidden.

Per sequence, a linear router scores every token (r = x . w); the S highest-scoring tokens go through
the whole block (attention and FFN) in their original order with their original RoPE positions;
the block's residual update for them is scaled by sigmoid(r), which keeps the router in the
gradient path, and added to the residual stream; all other tokens skip the block unchanged.

Top-k over a sequence looks ahead, which autoregressive decoding cannot do, so a small predictor
MLP (on a stop-gradient copy of the input) learns top-k membership with a BCE loss, weighted by
the ``mod_predictor_loss_weight`` knob; generation routes by its prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from lumina import ops
from lumina.config import ModelConfig
from lumina.model.layers import at_least_fp32 as _at_least_fp32

__all__ = ["mod_block", "mod_block_predicted", "predictor_logits"]

BlockFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def mod_block(
    x_BTD: torch.Tensor,
    p: TensorDict,
    block_delta: BlockFn,
    positions_T: torch.Tensor,  # [T] or [B, T]
    cfg: ModelConfig,
    knobs: TensorDict,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Run ``block_delta(x_sel_BSD, positions_BS) -> (residual update, block aux)`` on the selected
    tokens only. Returns the new residual stream, this layer's MoD stats, and the block's aux."""
    B, T, D = x_BTD.shape
    S = math.ceil(cfg.mod.capacity * T)
    scores_BT = _at_least_fp32(x_BTD @ p["router"])
    idx_BS = ops.mod_topk(scores_BT.detach(), S)
    x_sel_BSD = ops.mod_gather(x_BTD, idx_BS)
    pos_BS = positions_T[idx_BS] if positions_T.dim() == 1 else positions_T.gather(1, idx_BS)
    delta_BSD, block_aux = block_delta(x_sel_BSD, pos_BS)
    weight_BS = torch.sigmoid(scores_BT.gather(1, idx_BS))
    x_out_BTD = ops.mod_scatter(x_BTD, delta_BSD, weight_BS, idx_BS)

    target_BT = torch.zeros_like(scores_BT).scatter(1, idx_BS, 1.0)
    pred_BT = predictor_logits(x_BTD.detach(), p)
    stats = {
        "predictor_loss": F.binary_cross_entropy_with_logits(pred_BT, target_BT),
        "predictor_acc": ((pred_BT > 0).float() == target_BT).float().mean(),
        "selected_ratio": torch.tensor(S / T, device=x_BTD.device),
        "router_weight": weight_BS.mean(),
        # how far apart the router puts a sequence's tokens (0: it cannot tell them apart)
        "score_std": scores_BT.detach().std(dim=1, correction=0).mean(),
    }
    return x_out_BTD, stats, block_aux


def predictor_logits(x_BTD: torch.Tensor, p: TensorDict) -> torch.Tensor:
    """The causal predictor's logit of top-k membership, per token [B, T] (> 0: route into the block)."""
    q = p["predictor"]
    return _at_least_fp32((F.silu(x_BTD @ q["w1"]) @ q["w2"]).squeeze(-1))


DenseBlockFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


def mod_block_predicted(
    x_BTD: torch.Tensor,
    p: TensorDict,
    block_delta: DenseBlockFn,
    valid_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """MoD at inference, as the paper samples: each token is routed by the causal predictor alone
    (its own hidden state, no future tokens), so a prefix routes the same whatever follows and a
    KV cache stays exact. ``block_delta(route_BT) -> (update [B, T, D], aux)`` runs the block on every
    row with attention restricted to routed keys (static shapes: one compiled decode step serves any
    routing); only routed rows take their update, scaled by sigmoid(router score) as in training.
    ``valid_BT``: real tokens (pads are never routed). Returns what ``mod_block`` returns."""
    route_BT = predictor_logits(x_BTD, p) > 0
    if valid_BT is not None:
        route_BT = route_BT & valid_BT
    delta_BTD, block_aux = block_delta(route_BT)
    weight_BT = torch.sigmoid(_at_least_fp32(x_BTD @ p["router"]))
    update_BTD = delta_BTD * weight_BT.unsqueeze(-1).to(delta_BTD.dtype)
    x_out_BTD = x_BTD + torch.where(route_BT.unsqueeze(-1), update_BTD, torch.zeros_like(update_BTD))
    n_valid = route_BT.numel() if valid_BT is None else valid_BT.sum().clamp_min(1)
    stats = {
        "predictor_loss": torch.zeros((), device=x_BTD.device),  # no top-k target at inference
        "selected_ratio": route_BT.sum() / n_valid,
    }
    return x_out_BTD, stats, block_aux
