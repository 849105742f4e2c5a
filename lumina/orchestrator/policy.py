"""``decide``: the orchestrator's pure state transition — observation in, decisions out.

    ostate, decisions = decide(ostate, obs, ocfg)

Pure and deterministic: no clocks, no randomness, no I/O; the input state is never mutated. It
(1) updates the history windows and running statistics with ``obs``, (2) runs the detectors,
(3) maps findings to candidate actions, (4) gates them — a finding acts only when its confidence
reaches its level's threshold (``conf_soft`` .. ``conf_critical``), an action waits ``cooldown``
steps before firing again, and at most ``max_changes_per_window`` non-critical changes happen per
``window`` steps; rollbacks are exempt from both but capped at ``max_rollbacks_per_window`` —
and (5) books the decisions (cooldowns, snapshots, rollbacks) into the new state.

Rollback targets: an observation at step ``a`` reports the loss of the state after step ``a - 1``;
the state after step ``a - 1`` is therefore suspect when observation ``a`` is bad, and the newest
state a bad observation leaves trustworthy is the one after step ``a - 2``. Rollbacks go to the
newest healthy snapshot at or before that step (for divergence: at or before the EMA's minimum).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lumina.config import OrchestratorConfig
from lumina.orchestrator import detect
from lumina.orchestrator.detect import Finding
from lumina.orchestrator.state import Decision, Observation, OrchestratorState

__all__ = ["decide"]

# findings that persist rather than strike: they gain confidence while they last (persist_decay)
CHRONIC = frozenset({"divergence", "expert_collapse", "dead_expert", "capacity_overflow", "mod_collapse",
                     "mod_too_aggressive", "memory_pressure", "throughput_drop"})  # fmt: skip
# what makes a state unfit to roll back to: trouble with the loss or gradients (chronic routing
# findings do not: a run whose experts are skewed for 50 steps must still get snapshots)
_UNHEALTHY = frozenset({"nonfinite", "oom", "loss_spike", "grad_explosion", "divergence", "oscillation"})
_UNHEALTHY_ACTIONS = frozenset({"rollback", "emergency_lr_cut", "lr_scale"})
_EMA = 0.1  # loss EMA weight of the newest observation
_PENALTY = {1: 5.0, 2: 15.0, 3: 30.0, 4: 60.0}  # health points a finding costs, x its confidence
_MAX_EVALS = 8
_MAX_FORECASTS = 32


def _threshold(level: int, cfg: OrchestratorConfig) -> float:
    return (cfg.conf_soft, cfg.conf_medium, cfg.conf_hard, cfg.conf_critical)[level - 1]


# ------------------------------------------------------------------------------- bookkeeping


def _observe(s: OrchestratorState, obs: Observation, cfg: OrchestratorConfig) -> None:
    """Fold ``obs`` into the windows and running statistics (in place on the copy ``s``)."""
    s.n_obs += 1
    s.step = obs.step
    if "oom" in obs.events:  # a step that did not run has no loss to learn from
        return
    s.history = [*s.history, [obs.step, obs.loss, obs.grad_norm, obs.tokens_per_s]][-cfg.window :]
    if math.isfinite(obs.loss):
        s.loss_ema = obs.loss if s.loss_ema is None else (1 - _EMA) * s.loss_ema + _EMA * obs.loss
        s.ema_history = [*s.ema_history, [obs.step, s.loss_ema]][-cfg.window :]
    if obs.eval_loss is not None:
        s.evals = [*s.evals, [obs.step, obs.eval_loss, dict(obs.eval_losses), s.loss_ema]][-_MAX_EVALS:]
    dead = dict(s.dead_since)
    for layer, shares in enumerate(obs.expert_load):
        total = sum(shares) or 1.0
        for e, x in enumerate(shares):
            key = f"{layer}:{e}"
            if x / total < cfg.dead_share:
                dead.setdefault(key, obs.step)
            else:
                dead.pop(key, None)
    s.dead_since = dead
    flat = detect.is_flat(s, cfg)
    s.plateau_since = (s.plateau_since if s.plateau_since is not None else obs.step) if flat else None
    # forecasts: score the ones that came due against the loss EMA, make a new one every so often
    if s.loss_ema is not None:
        due = [f for f in s.pending_forecasts if f[0] <= obs.step]
        s.pending_forecasts = [f for f in s.pending_forecasts if f[0] > obs.step]
        errs = [abs(p - s.loss_ema) / max(abs(s.loss_ema), 1e-12) for _, p in due]
        s.forecast_errors = [*s.forecast_errors, *errs][-_MAX_FORECASTS:]
    if s.n_obs % cfg.forecast_every == 0:
        fc = detect.forecast(s, obs.step, cfg)
        if fc:
            s.pending_forecasts = [*s.pending_forecasts, [fc["target_step"], fc["loss"]]][-_MAX_FORECASTS:]
            s.forecast = fc
    if s.forecast_errors and s.forecast:
        s.forecast = {**s.forecast, "error": sum(s.forecast_errors) / len(s.forecast_errors)}


# ------------------------------------------------------------------------------------ actions


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def _lr(obs: Observation, factor: float, cfg: OrchestratorConfig) -> dict[str, Any] | None:
    old = float(obs.settings.get("lr_scale", 1.0))
    new = max(cfg.min_lr_scale, old * factor)
    return {"from": old, "to": new} if new < old else None


def _rollback_target(s: OrchestratorState, latest_ok: int) -> int | None:
    ok = [x for x in s.snapshots if x <= latest_ok]
    return max(ok) if ok else None


def _candidates(
    f: Finding, s: OrchestratorState, obs: Observation, cfg: OrchestratorConfig
) -> list[tuple[str, dict[str, Any]]]:
    """The actions (name, args) that answer finding ``f``; empty when none applies (at a bound)."""
    st = obs.settings
    recent_rollback = any(obs.step - r < cfg.window for r in s.rollbacks)
    out: list[tuple[str, dict[str, Any] | None]] = []
    big_spike = (
        f.kind == "loss_spike"
        and f.data["z"] > cfg.spike_rollback_z
        and f.data["rel"] > cfg.spike_rollback_rel
    )
    if f.kind == "nonfinite" or big_spike:
        target = _rollback_target(s, obs.step - 2)
        if target is not None:
            out.append(("rollback", {"to_step": target, "skip_data": True}))
        if recent_rollback or target is None:  # it came back (or nowhere to go): the LR must come down
            out.append(("emergency_lr_cut", _lr(obs, cfg.emergency_lr_factor, cfg)))
    elif f.kind == "oom":
        mb = int(st.get("micro_batch_size", 1))
        if mb > 1:
            out.append(("micro_batch", {"from": mb, "to": mb // 2}))
        elif st.get("grad_checkpointing", "none") != "full":
            out.append(("grad_checkpointing", {"from": st.get("grad_checkpointing", "none"), "to": "full"}))
    elif f.kind == "grad_explosion":
        out.append(("emergency_lr_cut", _lr(obs, cfg.emergency_lr_factor, cfg)))
    elif f.kind == "loss_spike":
        if f.data["repeat"]:  # a second spike within the window: the LR is too high for this data
            out.append(("lr_scale", _lr(obs, cfg.soft_lr_factor, cfg)))
    elif f.kind == "divergence":
        target = _rollback_target(s, min(obs.step - 2, f.data["best_step"]))
        if target is not None:
            out.append(("rollback", {"to_step": target, "skip_data": True}))
        out.append(("lr_scale", _lr(obs, cfg.soft_lr_factor, cfg)))
    elif f.kind == "oscillation":
        out.append(("lr_scale", _lr(obs, cfg.soft_lr_factor, cfg)))
    elif f.kind == "plateau":
        n = int(st.get("num_experts", 0))
        if n and cfg.allow_expert_changes and n < cfg.max_experts:
            out.append(("add_expert", {"from": n, "to": n + 1}))
        else:
            out.append(("lr_scale", _lr(obs, cfg.soft_lr_factor, cfg)))
    elif f.kind == "expert_collapse" and s.streaks.get("expert_collapse", 0) < cfg.collapse_patience:
        pass  # the balance loss often heals an early collapse (default run, seed 0: by ~step 58)
    elif f.kind == "expert_collapse":
        knobs = st.get("knobs", {})
        w = float(knobs.get("aux_loss_weight", 0.0))
        if st.get("balance") == "aux_loss" and w < 0.1:
            out.append(("set_knob", {"name": "aux_loss_weight", "from": w, "to": min(0.1, max(4 * w, 1e-3))}))
        elif float(knobs.get("expert_dropout", 0.0)) < 0.1:
            out.append(
                (
                    "set_knob",
                    {"name": "expert_dropout", "from": float(knobs.get("expert_dropout", 0.0)), "to": 0.1},
                )
            )
        elif float(knobs.get("router_temperature", 1.0)) < 4.0:
            t = float(knobs.get("router_temperature", 1.0))
            out.append(("set_knob", {"name": "router_temperature", "from": t, "to": min(4.0, 1.5 * t)}))
    elif f.kind == "dead_expert":
        n, k = int(st.get("num_experts", 0)), int(st.get("top_k", 1))
        layers = {int(x.split(":")[0]) for x in f.data["dead"]}
        if (
            cfg.allow_expert_changes
            and n > max(cfg.min_experts, k)
            and layers == set(range(len(obs.expert_load)))
        ):
            # per layer, its least-loaded expert (ties: the lowest index)
            prune = [min(range(n), key=lambda e, sh=sh: (sh[e], e)) for sh in obs.expert_load]
            out.append(("prune_expert", {"from": n, "to": n - 1, "experts": prune}))
    elif f.kind == "capacity_overflow":
        cf = st.get("capacity_factor")
        if cf is not None and cf < cfg.max_capacity_factor:
            out.append(
                ("capacity_factor", {"from": cf, "to": min(cfg.max_capacity_factor, cf * cfg.capacity_step)})
            )
    elif f.kind == "mod_collapse":
        out.append(("reset_mod_router", {"layers": f.data["layers"], "seed": obs.step}))
    elif f.kind == "mod_too_aggressive":
        c = float(st.get("mod_capacity", 1.0))
        if c < cfg.mod_max_capacity:
            out.append(
                ("mod_capacity", {"from": c, "to": min(cfg.mod_max_capacity, c * cfg.mod_capacity_step)})
            )
    elif f.kind == "memory_pressure":
        if st.get("grad_checkpointing", "none") != "full":
            out.append(("grad_checkpointing", {"from": st.get("grad_checkpointing", "none"), "to": "full"}))
    elif f.kind == "overfitting":
        wd = float(st.get("weight_decay", 0.0))
        if wd < 1.0:
            out.append(("weight_decay", {"from": wd, "to": min(1.0, max(2 * wd, 0.01))}))
    elif f.kind == "data_imbalance":
        r = float(st.get("interleave_ratio", 0.5))  # fraction of base batches
        to = _clamp(r + (0.1 if f.data["lagging"] == "base" else -0.1), 0.1, 0.9)
        if to != r:
            out.append(("interleave_ratio", {"from": r, "to": round(to, 6)}))
    return [(a, args) for a, args in out if args is not None]


# ------------------------------------------------------------------------------------- decide


def decide(
    ostate: OrchestratorState, obs: Observation, cfg: OrchestratorConfig
) -> tuple[OrchestratorState, list[Decision]]:
    """The next orchestrator state and the decisions for observation ``obs`` (see module doc)."""
    s = ostate.copy()
    _observe(s, obs, cfg)
    findings = detect.detect_all(s, obs, cfg)
    streaks = {}
    for i, f in enumerate(findings):
        s.counters[f.kind] = s.counters.get(f.kind, 0) + 1
        streaks[f.kind] = n = s.streaks.get(f.kind, 0) + 1
        if f.kind in CHRONIC and n > 1:
            conf = 1 - (1 - f.confidence) * cfg.persist_decay ** (n - 1)
            findings[i] = dataclasses.replace(
                f, confidence=conf, reason=f"{f.reason} ({n} observations in a row)"
            )
    s.streaks = streaks
    s.spike_steps = [x for x in s.spike_steps if obs.step - x < cfg.window]

    decisions: list[Decision] = []
    taken: set[str] = set()
    recent = [x for x in s.changes if obs.step - x < cfg.window]
    for f in sorted(findings, key=lambda f: -f.level):  # stable: detector order within a level
        if f.confidence < _threshold(f.level, cfg):
            continue
        for action, args in _candidates(f, s, obs, cfg):
            if action in taken or ("rollback" in taken and action not in ("emergency_lr_cut", "lr_scale")):
                continue
            if action == "rollback":  # recovery, not a change: no cooldown, but a cap of its own
                if sum(1 for r in s.rollbacks if obs.step - r < cfg.window) >= cfg.max_rollbacks_per_window:
                    s.counters["suppressed"] = s.counters.get("suppressed", 0) + 1
                    continue
            elif f.level < 4:
                last = s.last_action.get(action)
                if last is not None and 0 <= obs.step - last < cfg.cooldown:
                    s.counters["suppressed"] = s.counters.get("suppressed", 0) + 1
                    continue
                if len(recent) >= cfg.max_changes_per_window:
                    s.counters["suppressed"] = s.counters.get("suppressed", 0) + 1
                    continue
                recent.append(obs.step)
            decisions.append(Decision(step=obs.step, action=action, args=args, level=f.level,
                                      confidence=round(f.confidence, 6), reason=f.reason))  # fmt: skip
            taken.add(action)
            s.last_action[action] = obs.step
    if any(f.kind == "loss_spike" for f in findings):
        s.spike_steps = [*s.spike_steps, obs.step]
    s.changes = recent

    # health: instant penalty, slow recovery
    instant = max(0.0, 100.0 - sum(_PENALTY[f.level] * f.confidence for f in findings))
    s.health = round(min(instant, 0.9 * s.health + 0.1 * instant), 6)
    s.phase = detect.phase_of(s, findings, cfg)

    for d in decisions:
        s.counters[f"action:{d.action}"] = s.counters.get(f"action:{d.action}", 0) + 1
        if d.action == "rollback":
            to = d.args["to_step"]
            s.rollbacks = [*s.rollbacks, obs.step][-8:]
            s.snapshots = [x for x in s.snapshots if x <= to]
            s.history = [h for h in s.history if h[0] <= to]
            s.ema_history = [h for h in s.ema_history if h[0] <= to]
            s.loss_ema = s.ema_history[-1][1] if s.ema_history else None
            s.plateau_since = None
            s.spike_steps = []
            s.dead_since = {k: v for k, v in s.dead_since.items() if v <= to}
        elif d.action in ("add_expert", "prune_expert"):
            s.dead_since = {}  # expert indices changed

    # Snapshots for rollbacks: the state after a healthy snapshot step is kept at once (pending) and
    # confirmed by the next observation — the first to see that state's loss — being healthy too.
    healthy = (
        obs.finite
        and not any(d.action in _UNHEALTHY_ACTIONS for d in decisions)
        and not any(f.kind in _UNHEALTHY for f in findings)
    )
    if s.pending_snapshot is not None and healthy:
        s.snapshots = [*s.snapshots, s.pending_snapshot][-cfg.snapshot_ring :]
    s.pending_snapshot = None
    if healthy and obs.step % cfg.snapshot_every == 0 and obs.step not in s.snapshots:
        s.pending_snapshot = obs.step
    return s, decisions
