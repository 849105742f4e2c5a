"""The data-parallel train step over a module view, with plain autograd.

Legend: A micro-batches per optimizer step (all ranks), W ranks, b sequences per micro-batch, T time.

Semantics: W ranks each running A / W micro-batches equal one process with ``grad_accum = A``.
Rank r runs the global micro-batches r·A/W … (r+1)·A/W − 1 (their RNG keys are
``fold_in(rng, global index)``, as the single-process step's). The token count that normalises the
cross-entropy is summed over all ranks before the forward, and aux losses are weighted 1/A, so each
rank's loss is its share of the single-process loss. The engines average gradients over ranks, so
each rank's loss is multiplied by W. Scaling by a power of two is exact in floating point: for W = 2
the reduced gradient is the single process's sum bit for bit, wherever the engine's sum order
matches.

After the backward the gradients are what the engine left on the parameters: full tensors for DDP,
DTensor shards for FSDP. Lumina's global-norm clipping and functional AdamW then run on them
unchanged (AdamW, elementwise, runs its fused kernel on each rank's local shards: without clipping
an FSDP step equals the one-process step bit for bit). The new parameters are copied into the
module's leaves leaf by leaf, because ``_foreach_copy_`` has no DTensor sharding strategy. The
routing statistics are all-reduced before the balance-bias update (expert loads summed, the rest
averaged over all micro-batches), and the metrics in one collective.

Only fp32 / bf16 precision and the eager step are covered here. fp16 loss scaling and
``torch.compile`` of the distributed step are not part of this step yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tensordict import TensorDict

from lumina import optim, tree
from lumina.config import RunConfig
from lumina.distributed.view import ModelView
from lumina.model import random
from lumina.model.moe import update_balance_bias
from lumina.shards import assign, whole
from lumina.step import head_loss

__all__ = ["dist_train_step", "load_params_into"]


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


def _reduce_stats(per_micro: list[dict], A: int) -> TensorDict:
    """Routing stats over all A micro-batches of all ranks: expert loads summed, the rest averaged."""
    out = {}
    for group in ("moe", "mod"):
        if group not in per_micro[0]:
            continue
        flat = [tree.flatten(TensorDict(m[group], batch_size=[])) for m in per_micro]
        keys = sorted(flat[0])
        sums = [sum(f[k].float() for f in flat) for k in keys]
        total = _all_reduce(torch.cat([t.flatten() for t in sums]))  # one collective per group
        parts = total.split([t.numel() for t in sums])
        reduced = {
            k: (part if k.endswith(".load") else part / A).reshape(t.shape).to(flat[0][k].dtype)
            for k, part, t in zip(keys, parts, sums, strict=True)
        }
        out[group] = tree.unflatten(reduced)
    return TensorDict(out, batch_size=[])


@torch.no_grad()
def load_params_into(view: ModelView, params: TensorDict) -> None:
    """Copy a parameter tree (the view's layout, or full tensors) into the view's leaves, one leaf
    at a time (``lumina.shards.assign``)."""
    flat_new = tree.flatten(params)
    for key, leaf in tree.flatten(view.params()).items():
        assign(leaf, flat_new[key])


def _full_bias(params: TensorDict) -> TensorDict:
    """``params`` with every MoE balance bias as a full tensor (FSDP shards even these [E] vectors;
    the bias update mixes them with the all-reduced loads, plain tensors). Collective under FSDP."""
    flat = tree.flatten(params)
    for k, v in flat.items():
        if k.endswith(".balance_bias"):
            flat[k] = whole(v)
    return tree.unflatten(flat)


def dist_train_step(
    view: ModelView,
    state: TensorDict,
    batch: TensorDict,
    hp: TensorDict,
    *,
    cfg: RunConfig,
    pad_id: int,
) -> tuple[TensorDict, TensorDict]:
    """One optimizer step on this rank's micro-batches ``batch`` ([A/W · b, T] inputs / targets).
    ``state`` is the train state without ``params`` (the view holds them); returns the new state
    (the view's parameters updated in place) and the step's metrics, reduced over all ranks."""
    W, rank = dist.get_world_size(), dist.get_rank()
    A, tc = cfg.train.grad_accum, cfg.train
    if A % W:
        raise ValueError(f"train.grad_accum={A} micro-batches cannot be split over {W} ranks")
    A_local = A // W
    inputs = batch["inputs"].unflatten(0, (A_local, -1))
    targets = batch["targets"].unflatten(0, (A_local, -1))
    n_tokens = _all_reduce((targets != pad_id).sum()).clamp(min=1)
    fp8 = tc.precision == "fp8"
    per_micro = []
    for a in range(A_local):
        key = random.fold_in(state["rng"], rank * A_local + a)
        t_a = targets[a]
        (ce_sum, correct), aux = view(
            inputs[a],
            state["knobs"],
            rng=key,
            train=True,
            remat_mode=tc.grad_checkpointing,
            fp8=fp8,
            head_fn=lambda root, x_BTD, t_a=t_a: head_loss(root, x_BTD, t_a, cfg, pad_id),
        )
        loss = ce_sum / n_tokens + aux["loss"] / A
        (loss * W).backward()
        per_micro.append(
            {"ce_sum": ce_sum.detach(), "aux_loss": aux["loss"].detach(), "correct": correct.detach()}
            | {g: aux[g].detach().to_dict() for g in ("moe", "mod") if g in aux}
        )
    params, grads = view.params(), view.grads()
    grad_norm = optim.global_norm(grads)
    clip = optim.clip_factor(grad_norm, hp["clip_norm"])  # applied inside the update, as lumina.step
    updates = state["updates"] + 1
    detached = params.apply(lambda p: p.detach())
    new_params, opt = optim.update(
        tc.optimizer, detached, grads, state["opt"], updates, hp, tc, grad_scale=clip
    )
    stats = _reduce_stats(per_micro, A)
    if "moe" in stats:
        new_params = update_balance_bias(_full_bias(new_params), stats, cfg.model)
    load_params_into(view, new_params)
    for p in view.parameters():
        p.grad = None
    totals = _all_reduce(
        torch.stack([sum(m[k].float() for m in per_micro) for k in ("ce_sum", "aux_loss", "correct")])
    )
    new_state = state.clone(recurse=False)
    new_state.update(
        {"opt": opt, "updates": updates, "step": state["step"] + 1, "rng": random.fold_in(state["rng"], A)}
    )
    metrics = TensorDict(
        {
            "loss": totals[0] / n_tokens,
            "aux_loss": totals[1] / A,
            "accuracy": totals[2] / n_tokens,
            "grad_norm": grad_norm,
            "tokens": n_tokens,
            "lr": hp["lr"],
            **stats,
        },
        batch_size=[],
    )
    return new_state, metrics
