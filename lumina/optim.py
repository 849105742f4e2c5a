"""Functional AdamW, learning-rate schedules and global-norm clipping: pure functions on TensorDicts.

AdamW (decoupled weight decay, Loshchilov & Hutter):
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr * wd * mask * p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
with the same update order and bias corrections as ``torch.optim.AdamW`` (a test compares them).
Weight decay applies to matrices only (``ndim >= 2``): norms, biases and the MoE balance bias are
never decayed. Hyper-parameters that may change during a run (lr, weight decay, clip norm) are 0-dim
tensors in ``hp``, so a compiled step never recompiles when they change.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict

from lumina import tree
from lumina.config import TrainConfig

__all__ = ["adamw_init", "adamw_update", "clip_by_global_norm", "default_hp", "global_norm", "lr_at"]


def adamw_init(params: TensorDict) -> TensorDict:
    """First and second moments, fp32, zero."""
    zeros = params.apply(lambda p: torch.zeros_like(p, dtype=torch.float32))
    return TensorDict({"m": zeros, "v": zeros.clone()}, batch_size=[])


def global_norm(grads: TensorDict) -> torch.Tensor:
    """sqrt(sum of squares) over all leaves, summed in sorted-key order: a tree's insertion order
    (which differs between a fresh state and one loaded from a checkpoint) must not change the bits."""
    flat = tree.flatten(grads)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(flat[k].float()) for k in sorted(flat)])
    )


def clip_by_global_norm(grads: TensorDict, clip_norm: torch.Tensor) -> tuple[TensorDict, torch.Tensor]:
    """Scale ``grads`` so their global norm is at most ``clip_norm`` (0 disables). Returns the
    clipped grads and the norm before clipping."""
    norm = global_norm(grads)
    scale = torch.where(clip_norm > 0, torch.clamp(clip_norm / (norm + 1e-6), max=1.0), torch.ones_like(norm))
    return grads.apply(lambda g: g * scale.to(g.dtype)), norm


def adamw_update(
    params: TensorDict,
    grads: TensorDict,
    opt: TensorDict,
    step: torch.Tensor,
    hp: TensorDict,
    cfg: TrainConfig,
) -> tuple[TensorDict, TensorDict]:
    """One AdamW step (``step`` counts from 1). Returns new params and moments."""
    b1, b2, eps = cfg.beta1, cfg.beta2, cfg.eps
    lr, wd = hp["lr"], hp["weight_decay"]
    t = step.to(torch.float32)
    bc1, bc2 = 1 - b1**t, 1 - b2**t

    def update(p, g, m, v):
        g32 = g.float()
        m = m * b1 + g32 * (1 - b1)
        v = v * b2 + g32 * g32 * (1 - b2)
        p32 = p.float()
        if p.ndim >= 2:
            p32 = p32 * (1 - lr * wd)
        p32 = p32 - lr * (m / bc1) / ((v / bc2).sqrt() + eps)
        return p32.to(p.dtype), m, v

    new_p, new_m, new_v = {}, {}, {}
    flat_g, flat_m, flat_v = (tree.flatten(x) for x in (grads, opt["m"], opt["v"]))
    for key, p in tree.flatten(params).items():
        new_p[key], new_m[key], new_v[key] = update(p, flat_g[key], flat_m[key], flat_v[key])
    opt = TensorDict({"m": tree.unflatten(new_m), "v": tree.unflatten(new_v)}, batch_size=[])
    return tree.unflatten(new_p), opt


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The scheduled learning rate for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then ``constant`` / ``linear`` / ``cosine`` decay to ``min_lr`` at ``steps``;
    ``onecycle`` warms up from lr/25, then anneals (cosine) to ``min_lr``."""
    lr, floor, warm, total = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps
    if cfg.schedule == "onecycle":
        start = lr / 25
        if step < warm:
            return start + (lr - start) * step / max(1, warm)
    elif step < warm:
        return lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return lr
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if cfg.schedule == "linear":
        return lr + (floor - lr) * progress
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))  # cosine, onecycle's decay


def default_hp(cfg: TrainConfig, device: torch.device | str = "cpu") -> TensorDict:
    """The live hyper-parameters as 0-dim fp32 tensors (lr is set from ``lr_at`` each step)."""
    values = {"lr": lr_at(0, cfg), "weight_decay": cfg.weight_decay, "clip_norm": cfg.clip_norm}
    return TensorDict({k: torch.tensor(float(v), device=device) for k, v in values.items()}, batch_size=[])
