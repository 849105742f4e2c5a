"""``apply_decisions``: the one place decisions become a new train state, hyper-parameters and config.

    state, hp, cfg = apply_decisions(decisions, state, hp, cfg)

Pure: new TensorDicts and new frozen configs come back; nothing passed in is modified. The driver
then only executes what changed — it rebuilds the compiled step when ``step_signature(cfg)``
changed (shapes or step constants), the batch iterator when the micro-batch size or the data mix
changed. A ``rollback`` is the driver's to execute *before* calling this (it needs the snapshot
ring, which is not plain data); here it is a no-op.

Action          args                          effect
lr_scale        from, to (cause)              train.lr_scale (multiplies the LR schedule; a cut or a raise;
                                              cause, when set, names the finding: its evidence label)
emergency_lr_cut from, to                     the same, at level 3/4
emergency_lr_restore from, to                 the same: an emergency cut undone (emergency_over)
weight_decay    from, to                      train.weight_decay and hp["weight_decay"]
set_knob        name, from, to                state["knobs"][name] (router temperature, jitter, ...)
capacity_factor from, to                      model.moe.capacity_factor (recompiles)
add_expert      from, to                      one expert per MoE layer: the mean of the existing
                                              experts plus noise (1 % of their std); router column
                                              likewise; zero optimizer moments (recompiles)
prune_expert    from, to, experts[layer]      that expert removed per MoE layer: weights, router
                                              column, balance bias, moments (recompiles)
mod_capacity    from, to                      model.mod.capacity (recompiles)
reset_mod_router layers, seed                 fresh init of those MoD routers, zero moments
micro_batch     from, to                      train.micro_batch_size (batch size kept: the
                                              accumulation halves or doubles) (recompiles)
grad_checkpointing from, to                   train.grad_checkpointing (recompiles)
interleave_ratio from, to                     data.interleave_ratio
eval_every      from, to                      train.eval_every (the driver's evaluator reads it)
rollback        to_step, skip_data            (driver)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from tensordict import TensorDict

from lumina import optim, tree
from lumina.config import RunConfig
from lumina.model import random
from lumina.orchestrator.state import LR_ACTIONS, Decision

__all__ = ["ACTIONS", "apply_decisions", "step_signature"]

_NOISE = 0.01  # a new expert's noise, relative to the std of the experts it is averaged from
_EXPERT_AXIS = {"w_gate": 0, "w_up": 0, "w_down": 0, "router": 1, "balance_bias": 0}


def step_signature(cfg: RunConfig) -> tuple:
    """What the compiled step depends on besides tensor values: a change means rebuild it."""
    t = cfg.train
    return (cfg.model, t.micro_batch_size, t.batch_size, t.precision, t.grad_checkpointing,
            t.beta1, t.beta2, t.eps, t.loss_scale_window, t.compile, t.compile_mode, t.seq_len)  # fmt: skip


def _replace(cfg: RunConfig, section: str, sub: str | None = None, **values: Any) -> RunConfig:
    part = getattr(cfg, section)
    if sub is not None:
        part = dataclasses.replace(part, **{sub: dataclasses.replace(getattr(part, sub), **values)})
    else:
        part = dataclasses.replace(part, **values)
    return dataclasses.replace(cfg, **{section: part})


def _moe_param_keys(param_keys: list[str], layer: int) -> list[str]:
    prefix = f"layers.{layer}.moe."
    return [k for k in param_keys if k.startswith(prefix) and k[len(prefix) :] in _EXPERT_AXIS]


def _split_opt(flat: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the state's entries outside ``opt``, the optimizer state's) from a flattened train state."""
    rest = {k: v for k, v in flat.items() if not k.startswith("opt.")}
    return rest, {k.removeprefix("opt."): v for k, v in flat.items() if k.startswith("opt.")}


def _join_opt(flat: dict[str, torch.Tensor], rest: dict[str, torch.Tensor], opt: dict[str, torch.Tensor]):
    """The train state of ``rest`` and ``opt`` with ``flat``'s key order (a compiled step guards on it)."""
    out: dict[str, torch.Tensor] = {}
    for k in flat:
        if not k.startswith("opt."):
            out[k] = rest[k]
        elif f"opt.{next(iter(opt))}" not in out:  # the optimizer state goes where it was
            out |= {f"opt.{o}": v for o, v in opt.items()}
    return tree.unflatten(out)


def _change_experts(state: TensorDict, cfg: RunConfig, d: Decision) -> TensorDict:
    """Params and moments with one expert added (the mean of the others plus noise) or removed, in
    every MoE layer. Moments are edited in fp32: 8-bit AdamW's are dequantized, edited and quantized
    again in the layout a fresh state of the new shape has (``lumina.optim.put_moments``: a leaf
    that crosses ``MIN_8BIT_SIZE`` changes between uint8 codes and fp32), so a checkpoint written
    afterwards matches the new config's state."""
    flat = tree.flatten(state)
    new, opt = _split_opt(flat)
    new_opt = dict(opt)
    add = d.action == "add_expert"
    key = random.fold_in(random.key_from_seed(cfg.seed, flat["rng"].device), d.step)
    layers = [i for i, m in enumerate(cfg.model.moe_layers()) if m]
    params = [k.removeprefix("params.") for k in flat if k.startswith("params.")]
    if not add and len(d.args["experts"]) != len(layers):
        raise ValueError(
            f"prune_expert: {len(d.args['experts'])} expert indices for {len(layers)} MoE layers"
        )
    for n, layer in enumerate(layers):
        for j, k in enumerate(_moe_param_keys(params, layer)):
            axis = _EXPERT_AXIS[k.rsplit(".", 1)[-1]]
            p = flat[f"params.{k}"]
            moments = optim.get_moments(opt, k)
            if add:
                mean = p.mean(dim=axis, keepdim=True)
                scale = _NOISE * float(p.std()) if p.numel() > 1 else 0.0
                u = random.uniform(random.fold_in(key, 64 * layer + j), mean.shape, dtype=p.dtype)
                new[f"params.{k}"] = torch.cat([p, mean + scale * math.sqrt(3) * (2 * u - 1)], dim=axis)
                m, v = (torch.cat([x, torch.zeros_like(x.narrow(axis, 0, 1))], dim=axis) for x in moments)
            else:
                drop = d.args["experts"][n]
                keep = torch.tensor([e for e in range(p.shape[axis]) if e != drop], device=p.device)
                new[f"params.{k}"] = p.index_select(axis, keep)
                m, v = (x.index_select(axis, keep) for x in moments)
            optim.put_moments(new_opt, k, m, v)
    return _join_opt(flat, new, new_opt)


def _reset_mod_router(state: TensorDict, cfg: RunConfig, d: Decision) -> TensorDict:
    flat = tree.flatten(state)
    new, opt = _split_opt(flat)
    new_opt = dict(opt)
    mod_layers = [i for i, m in enumerate(cfg.model.mod_layers()) if m]
    key = random.fold_in(random.key_from_seed(cfg.seed, flat["rng"].device), d.args["seed"])
    std = cfg.model.init_std
    for ordinal in d.args["layers"]:
        k = f"layers.{mod_layers[ordinal]}.mod.router"
        p = flat[f"params.{k}"]
        u = random.uniform(random.fold_in(key, ordinal), p.shape, dtype=p.dtype)
        new[f"params.{k}"] = std * math.sqrt(3) * (2 * u - 1)  # U(-a, a) with std ``init_std``
        zero = torch.zeros_like(p, dtype=torch.float32)
        optim.put_moments(new_opt, k, zero, zero)
    return _join_opt(flat, new, new_opt)


def apply_decisions(
    decisions: list[Decision], state: TensorDict, hp: TensorDict, cfg: RunConfig
) -> tuple[TensorDict, TensorDict, RunConfig]:
    """The train state, hyper-parameters and config after ``decisions`` (in order)."""
    hp = hp.clone()
    for d in decisions:
        a = d.args
        if d.action in LR_ACTIONS:
            hp["lr"] = hp["lr"] * (a["to"] / cfg.train.lr_scale)
            cfg = _replace(cfg, "train", lr_scale=float(a["to"]))
        elif d.action == "weight_decay":
            cfg = _replace(cfg, "train", weight_decay=float(a["to"]))
            hp["weight_decay"] = torch.full_like(hp["weight_decay"], float(a["to"]))
        elif d.action == "set_knob":
            knobs = state["knobs"].clone()
            knobs[a["name"]] = torch.full_like(knobs[a["name"]], float(a["to"]))
            state = state.clone(recurse=False)
            state["knobs"] = knobs
        elif d.action == "capacity_factor":
            cfg = _replace(cfg, "model", "moe", capacity_factor=float(a["to"]))
        elif d.action in ("add_expert", "prune_expert"):
            state = _change_experts(state, cfg, d)
            cfg = _replace(cfg, "model", "moe", num_experts=int(a["to"]))
        elif d.action == "mod_capacity":
            cfg = _replace(cfg, "model", "mod", capacity=float(a["to"]))
        elif d.action == "reset_mod_router":
            state = _reset_mod_router(state, cfg, d)
        elif d.action == "micro_batch":
            cfg = _replace(cfg, "train", micro_batch_size=int(a["to"]))
        elif d.action == "grad_checkpointing":
            cfg = _replace(cfg, "train", grad_checkpointing=a["to"])
        elif d.action == "interleave_ratio":
            cfg = _replace(cfg, "data", interleave_ratio=float(a["to"]))
        elif d.action == "eval_every":
            cfg = _replace(cfg, "train", eval_every=int(a["to"]))
        elif d.action != "rollback":
            raise ValueError(f"unknown orchestrator action {d.action!r}")
    return state, hp, cfg


ACTIONS = (
    "lr_scale", "emergency_lr_cut", "emergency_lr_restore", "weight_decay", "set_knob", "capacity_factor",
    "add_expert", "prune_expert", "mod_capacity", "reset_mod_router", "micro_batch", "grad_checkpointing",
    "interleave_ratio", "eval_every", "rollback",
)  # fmt: skip
