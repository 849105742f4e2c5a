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

    # The same arithmetic as torch.optim.AdamW, on whole lists of tensors (torch._foreach_*: one
    # dispatch per op for all leaves instead of one per leaf; pure — every op returns new tensors).
    keys = list(tree.flatten(params))  # the input's order: a compiled step guards on key order
    flat_p, flat_g, flat_m, flat_v = (tree.flatten(x) for x in (params, grads, opt["m"], opt["v"]))
    p32 = [flat_p[k].float() for k in keys]
    g32 = [flat_g[k].float() for k in keys]
    m = torch._foreach_add(torch._foreach_mul([flat_m[k] for k in keys], b1), torch._foreach_mul(g32, 1 - b1))
    v = torch._foreach_add(
        torch._foreach_mul([flat_v[k] for k in keys], b2),
        torch._foreach_mul(torch._foreach_mul(g32, g32), 1 - b2),
    )
    decay = [i for i, k in enumerate(keys) if flat_p[k].ndim >= 2]  # matrices only
    if decay:
        for i, d in zip(decay, torch._foreach_mul([p32[i] for i in decay], 1 - lr * wd), strict=True):
            p32[i] = d
    denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(v, bc2)), eps)
    step_ = torch._foreach_div(torch._foreach_mul(torch._foreach_div(m, bc1), lr), denom)
    p32 = torch._foreach_sub(p32, step_)
    new_p = {k: p.to(flat_p[k].dtype) for k, p in zip(keys, p32, strict=True)}
    new_m, new_v = dict(zip(keys, m, strict=True)), dict(zip(keys, v, strict=True))
    opt = TensorDict({"m": tree.unflatten(new_m), "v": tree.unflatten(new_v)}, batch_size=[])
    return tree.unflatten(new_p), opt


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The scheduled learning rate for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then ``constant`` / ``linear`` / ``cosine`` decay to ``min_lr`` at ``steps``;
    ``onecycle`` warms up from lr/25, then anneals (cosine) to ``min_lr``; all times ``lr_scale``
    (the orchestrator's multiplier)."""
    return cfg.lr_scale * _schedule(step, cfg)


def _schedule(step: int, cfg: TrainConfig) -> float:
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
