"""``decide``: the orchestrator's pure state transition — observation in, decisions out.

    ostate, decisions = decide(ostate, obs, ocfg)

Pure and deterministic: no clocks, no randomness, no I/O; the input state is never mutated. It
(1) updates the history windows and running statistics with ``obs``, (2) runs the detectors,
(3) maps each finding to candidate actions through ``RESPONSES`` (finding kind -> response),
(4) gates them — a finding acts only when its confidence reaches its level's threshold
(``conf_soft`` .. ``conf_critical``), an action waits ``cooldown`` steps before firing again, and
at most ``max_changes_per_window`` non-critical changes happen per ``window`` steps; rollbacks
are exempt from both but capped at ``max_rollbacks_per_window`` — and (5) books the decisions
(cooldowns, snapshots, rollbacks) into the new state.

Rollback targets: an observation at step ``a`` reports the loss of the state after step ``a - 1``;
the state after step ``a - 1`` is therefore suspect when observation ``a`` is bad, and the newest
state a bad observation leaves trustworthy is the one after step ``a - 2``. Rollbacks go to the
newest healthy snapshot at or before that step (for divergence: at or before the EMA's minimum).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

from lumina.config import OrchestratorConfig, evidence_record
from lumina.orchestrator import detect
from lumina.orchestrator.detect import Finding
from lumina.orchestrator.state import LR_ACTIONS, Decision, Observation, OrchestratorState, action_label

__all__ = ["RESPONSES", "decide"]

# findings that persist rather than strike: they gain confidence while they last (persist_decay)
CHRONIC = frozenset({"divergence", "expert_collapse", "dead_expert", "capacity_overflow", "capacity_slack",
                     "mod_collapse", "mod_too_aggressive", "mod_underused", "memory_pressure",
                     "throughput_drop", "lr_too_low"})  # fmt: skip
# findings that are chances to save compute or time, not trouble: no cost to the health score
_OPPORTUNITIES = frozenset({"capacity_slack", "mod_underused", "micro_batch_room", "micro_batch_no_gain",
                            "lr_too_low", "near_convergence", "emergency_over"})  # fmt: skip
# what makes a state unfit to roll back to: trouble with the loss or gradients (chronic routing
# findings do not: a run whose experts are skewed for 50 steps must still get snapshots)
_UNHEALTHY = frozenset({"nonfinite", "oom", "loss_spike", "grad_explosion", "divergence", "oscillation"})
_EMA = 0.1  # loss EMA weight of the newest observation
_PENALTY = {1: 5.0, 2: 15.0, 3: 30.0, 4: 60.0}  # health points a finding costs, x its confidence
_MAX_EVALS = 8
_MAX_FORECASTS = 32


def _threshold(level: int, cfg: OrchestratorConfig) -> float:
    return (cfg.conf_soft, cfg.conf_medium, cfg.conf_hard, cfg.conf_critical)[level - 1]


@functools.cache
def _evidence_table(entries: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``OrchestratorConfig.evidence`` as {label: (K, N)}."""
    return {label: (k, n) for label, k, n in map(evidence_record, entries)}


def _evidenced(f: Finding, action: str, args: dict, cfg: OrchestratorConfig) -> tuple[float, str]:
    """(confidence, reason suffix) of a candidate action: its finding's confidence, capped by the
    action's record in the evidence table — (K + 1) / (N + 2), Laplace's estimate of how often it
    helps — when it has one and the finding is soft or medium. Hard and critical findings answer
    trouble (exploding gradients, divergence, non-finite values, OOM) that paired runs see too
    rarely to measure, and holding their answer back would risk the run."""
    rec = _evidence_table(cfg.evidence).get(action_label(action, args)) if f.level <= 2 else None
    if rec is None:
        return f.confidence, ""
    k, n = rec
    return min(f.confidence, (k + 1) / (n + 2)), f"; evidence: improved {k} of {n} benchmark runs"


# ------------------------------------------------------------------------------- bookkeeping


def _observe(s: OrchestratorState, obs: Observation, cfg: OrchestratorConfig) -> None:
    """Fold ``obs`` into the windows and running statistics (in place on the copy ``s``)."""
    s.n_obs += 1
    s.step = obs.step
    if "oom" in obs.events:  # a step that did not run has no loss to learn from
        return
    s.history = [*s.history, [obs.step, obs.loss, obs.grad_norm, obs.tokens_per_s]][-cfg.window :]
    s.lrs = [*s.lrs, [obs.step, obs.lr, obs.settings.lr_scale]][-cfg.window :]
    if math.isfinite(obs.loss):
        s.first_loss = obs.loss if s.first_loss is None else s.first_loss
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


def _observe_micro_batch(s: OrchestratorState, obs: Observation, cfg: OrchestratorConfig) -> None:
    """Micro-batch growth's bookkeeping (in place on the copy ``s``): the tokens/s measured at the
    current micro-batch (reset when it changes, whatever changed it), the judgment of a growth under
    trial once ``grow_settle + grow_window`` observations ran at the new size, and the sizes never to
    try again (one that ran out of memory)."""
    mb = obs.settings.micro_batch_size
    if "oom" in obs.events:
        s.mb_ceiling = min(mb, s.mb_ceiling or mb)
        return
    if mb != s.mb_current:
        s.mb_current, s.mb_speed = mb, []
    if obs.tokens_per_s > 0 and math.isfinite(obs.tokens_per_s):
        s.mb_speed = [*s.mb_speed, obs.tokens_per_s][-cfg.window :]
    t = s.mb_trial
    if t is None:
        return
    if mb != t["to"]:  # something else changed it (an OOM's halving): the trial is over
        s.mb_trial, s.mb_ceiling = None, min(t["to"], s.mb_ceiling or t["to"])
    elif t["verdict"] is None and len(s.mb_speed) >= cfg.grow_settle + cfg.grow_window:
        after = detect.median(s.mb_speed[cfg.grow_settle :])
        if after >= (1 + cfg.grow_gain) * t["before"]:  # kept; a further doubling may follow
            s.mb_trial = None
            s.counters["micro_batch_kept"] = s.counters.get("micro_batch_kept", 0) + 1
        else:  # reported by detect.micro_batch until its shrink passes the gate
            s.mb_trial = {**t, "verdict": "revert", "after": after}


def _book_micro_batch(s: OrchestratorState, d: Decision, cfg: OrchestratorConfig) -> None:
    """A micro-batch decision taken: a growth starts a trial (its baseline: the median tokens/s at
    the old size); a shrink (no gain, memory pressure, OOM) ends any trial and bars the size it left."""
    a = d.args
    if a["to"] > a["from"]:
        s.mb_floor = s.mb_floor or a["from"]
        before = detect.median(s.mb_speed[cfg.grow_settle :])
        s.mb_trial = {"step": d.step, "from": a["from"], "to": a["to"], "before": before, "verdict": None}
    else:
        s.mb_trial, s.mb_ceiling = None, min(a["from"], s.mb_ceiling or a["from"])


# ------------------------------------------------------------------------------------ actions


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def _lr(
    obs: Observation, factor: float, cfg: OrchestratorConfig, floor: float = 0.0
) -> dict[str, Any] | None:
    old = obs.settings.lr_scale
    new = max(cfg.min_lr_scale, floor, old * factor)
    return {"from": old, "to": new} if new < old else None


def _lowers_lr(d: Decision) -> bool:
    return d.action in LR_ACTIONS and d.args["to"] < d.args["from"]


def _unhealthy(d: Decision) -> bool:
    """A decision that makes this observation's state unfit to keep as a snapshot (an LR raise does
    not: the state before a raise is the one to go back to if the raise brings trouble)."""
    return d.action == "rollback" or _lowers_lr(d)


def _cooldown_key(action: str, args: dict[str, Any]) -> str:
    """LR raises cool down on their own: a cut right after a raise must not wait for the raise's
    cooldown (and a raise right after a cut cannot happen: ``lr_ceiling``)."""
    return "lr_raise" if action == "lr_scale" and args["to"] > args["from"] else action


def _rollback_target(s: OrchestratorState, latest_ok: int) -> int | None:
    ok = [x for x in s.snapshots if x <= latest_ok]
    return max(ok) if ok else None


# ---------------------------------------------------------------------------------- responses
# A response is (finding, state, observation, config) -> the candidate actions (name, args) that
# answer the finding, most wanted first; args None (or no entry) when an action is at its bound.
# ``decide`` gates them. ``RESPONSES`` below maps each finding kind to its response.

Candidates = list[tuple[str, dict[str, Any] | None]]
Response = Callable[[Finding, OrchestratorState, Observation, OrchestratorConfig], Candidates]


def _recover(f, s, obs, cfg) -> Candidates:
    """Back to the newest snapshot the bad observation leaves trustworthy; when that came back (or
    there is nowhere to go) the LR must come down too."""
    out: Candidates = []
    target = _rollback_target(s, obs.step - 2)
    if target is not None:
        out.append(("rollback", {"to_step": target, "skip_data": True}))
    if any(obs.step - r < cfg.window for r in s.rollbacks) or target is None:
        out.append(("emergency_lr_cut", _lr(obs, cfg.emergency_lr_factor, cfg)))
    return out


def _oom(f, s, obs, cfg) -> Candidates:
    mb = obs.settings.micro_batch_size
    if mb > 1:
        return [("micro_batch", {"from": mb, "to": mb // 2})]
    return _checkpoint(f, s, obs, cfg)


def _memory_pressure(f, s, obs, cfg) -> Candidates:
    """A micro-batch the orchestrator grew shrinks back first; else gradient checkpointing."""
    mb = obs.settings.micro_batch_size
    if s.mb_floor and mb > s.mb_floor:
        return [("micro_batch", {"from": mb, "to": mb // 2})]
    return _checkpoint(f, s, obs, cfg)


def _set_micro_batch(f, s, obs, cfg) -> Candidates:
    """To the size the finding names: double (room) or back (no gain)."""
    return [("micro_batch", {"from": obs.settings.micro_batch_size, "to": f.data["to"]})]


def _checkpoint(f, s, obs, cfg) -> Candidates:
    gc = obs.settings.grad_checkpointing
    return [("grad_checkpointing", {"from": gc, "to": "full"})] if gc != "full" else []


def _emergency_lr(f, s, obs, cfg) -> Candidates:
    """Cut the LR, but not below ``emergency_lr_floor``: a gradient that still explodes there is
    not the LR's doing (a non-finite loss is answered by ``_recover``, which has no floor)."""
    return [("emergency_lr_cut", _lr(obs, cfg.emergency_lr_factor, cfg, cfg.emergency_lr_floor))]


def _restore_lr(f, s, obs, cfg) -> Candidates:
    """Back to the LR scale a gradient-explosion cut left (``emergency_over``)."""
    return [("emergency_lr_restore", {"from": obs.settings.lr_scale, "to": f.data["to"]})]


def _soft_lr(f, s, obs, cfg) -> Candidates:
    return [("lr_scale", _lr(obs, cfg.soft_lr_factor, cfg))]


def _overshoot_lr(f, s, obs, cfg) -> Candidates:
    """The LR scale x ``overshoot_lr_factor``, once (``lr_overshoot`` looks only at step 2). The
    decision names its cause, so the evidence table counts it apart from the other cuts
    (``lr_scale:lr_overshoot-``): they answer other findings, late in a run."""
    args = _lr(obs, cfg.overshoot_lr_factor, cfg)
    return [("lr_scale", None if args is None else {**args, "cause": "lr_overshoot"})]


def _loss_spike(f, s, obs, cfg) -> Candidates:
    if f.data["z"] > cfg.spike_rollback_z and f.data["rel"] > cfg.spike_rollback_rel:
        return _recover(f, s, obs, cfg)  # a big spike: as bad as a NaN
    if f.data["repeat"]:  # a second spike within the window: the LR is too high for this data
        return _soft_lr(f, s, obs, cfg)
    return []


def _divergence(f, s, obs, cfg) -> Candidates:
    out: Candidates = []
    target = _rollback_target(s, min(obs.step - 2, f.data["best_step"]))
    if target is not None:
        out.append(("rollback", {"to_step": target, "skip_data": True}))
    return [*out, *_soft_lr(f, s, obs, cfg)]


def _plateau(f, s, obs, cfg) -> Candidates:
    n = obs.settings.num_experts
    if n and cfg.allow_expert_changes and not obs.settings.frozen_base and n < cfg.max_experts:
        return [("add_expert", {"from": n, "to": n + 1})]
    return _soft_lr(f, s, obs, cfg)


def _expert_collapse(f, s, obs, cfg) -> Candidates:
    if s.streaks.get("expert_collapse", 0) < cfg.collapse_patience:
        return []  # the balance loss often heals an early collapse (default run, seed 0: by ~step 58)
    knobs = obs.settings.knobs
    w = knobs.get("aux_loss_weight", 0.0)
    if obs.settings.balance == "aux_loss" and w < 0.1:
        return [("set_knob", {"name": "aux_loss_weight", "from": w, "to": min(0.1, max(4 * w, 1e-3))})]
    p = knobs.get("expert_dropout", 0.0)
    if p < 0.1:
        return [("set_knob", {"name": "expert_dropout", "from": p, "to": 0.1})]
    t = knobs.get("router_temperature", 1.0)
    if t < 4.0:
        return [("set_knob", {"name": "router_temperature", "from": t, "to": min(4.0, 1.5 * t)})]
    return []


def _dead_expert(f, s, obs, cfg) -> Candidates:
    n, k = obs.settings.num_experts, obs.settings.top_k
    every_layer = {int(x.split(":")[0]) for x in f.data["dead"]} == set(range(len(obs.expert_load)))
    editable = cfg.allow_expert_changes and not obs.settings.frozen_base  # train.lora: the base is frozen
    if editable and n > max(cfg.min_experts, k) and every_layer:
        # per layer, its least-loaded expert (ties: the lowest index)
        prune = [min(range(n), key=lambda e, sh=sh: (sh[e], e)) for sh in obs.expert_load]
        return [("prune_expert", {"from": n, "to": n - 1, "experts": prune})]
    return []


def _capacity_overflow(f, s, obs, cfg) -> Candidates:
    cf = obs.settings.capacity_factor
    if cf is not None and cf < cfg.max_capacity_factor:
        return [("capacity_factor", {"from": cf, "to": min(cfg.max_capacity_factor, cf * cfg.capacity_step)})]
    return []


def _capacity_slack(f, s, obs, cfg) -> Candidates:
    cf = obs.settings.capacity_factor
    if s.streaks.get("capacity_slack", 0) < cfg.slack_patience or cf is None or cf <= cfg.min_capacity_factor:
        return []
    return [("capacity_factor", {"from": cf, "to": max(cfg.min_capacity_factor, cf / cfg.capacity_step)})]


def _mod_collapse(f, s, obs, cfg) -> Candidates:
    if obs.settings.frozen_base:  # the router is part of the frozen base (train.lora)
        return []
    return [("reset_mod_router", {"layers": f.data["layers"], "seed": obs.step})]


def _mod_capacity(f, s, obs, cfg) -> Candidates:
    c = obs.settings.mod_capacity
    if c < cfg.mod_max_capacity:
        return [("mod_capacity", {"from": c, "to": min(cfg.mod_max_capacity, c * cfg.mod_capacity_step)})]
    return []


def _mod_underused(f, s, obs, cfg) -> Candidates:
    c = obs.settings.mod_capacity
    if s.streaks.get("mod_underused", 0) < cfg.slack_patience or c <= cfg.mod_min_capacity:
        return []
    return [("mod_capacity", {"from": c, "to": max(cfg.mod_min_capacity, c / cfg.mod_capacity_step)})]


def _overfitting(f, s, obs, cfg) -> Candidates:
    wd = obs.settings.weight_decay
    return [("weight_decay", {"from": wd, "to": min(1.0, max(2 * wd, 0.01))})] if wd < 1.0 else []


def _data_imbalance(f, s, obs, cfg) -> Candidates:
    r = obs.settings.interleave_ratio  # fraction of base batches
    to = _clamp(r + (0.1 if f.data["lagging"] == "base" else -0.1), 0.1, 0.9)
    return [("interleave_ratio", {"from": r, "to": round(to, 6)})] if to != r else []


def _raise_lr(f, s, obs, cfg) -> Candidates:
    """After lr_low_patience observations in a row: the LR scale x lr_raise_factor, up to
    lr_raise_max and never above where an LR cut or a rollback left it (``lr_ceiling``)."""
    if s.streaks.get("lr_too_low", 0) < cfg.lr_low_patience:
        return []
    old = obs.settings.lr_scale
    cap = cfg.lr_raise_max if s.lr_ceiling is None else min(cfg.lr_raise_max, s.lr_ceiling)
    new = min(cap, old * cfg.lr_raise_factor)
    return [("lr_scale", {"from": old, "to": new} if new > old else None)]


def _near_convergence(f, s, obs, cfg) -> Candidates:
    """Ease the LR (x forecast_ease_factor) and evaluate forecast_eval_factor x as often."""
    out: Candidates = [("lr_scale", _lr(obs, cfg.forecast_ease_factor, cfg))]
    ev = obs.settings.eval_every  # 0: no evaluations
    to = max(1, ev // cfg.forecast_eval_factor)
    if 0 < to < ev:
        out.append(("eval_every", {"from": ev, "to": to}))
    return out


def _report(f, s, obs, cfg) -> Candidates:
    return []  # logged and counted (health, phase), but no action answers it


# finding kind -> response, in the order of ``detect.DETECTORS`` (every kind a detector reports)
RESPONSES: dict[str, Response] = {
    "nonfinite": _recover,  # rollback (+ emergency LR cut when it recurs)
    "oom": _oom,  # halve the micro-batch; at 1: gradient checkpointing
    "memory_pressure": _memory_pressure,  # shrink a grown micro-batch back, else gradient checkpointing
    "grad_explosion": _emergency_lr,  # cut the LR
    "lr_overshoot": _overshoot_lr,  # the first update overshot without warm-up: cut the LR once
    "loss_spike": _loss_spike,  # big: as nonfinite; repeated: lower the LR
    "divergence": _divergence,  # rollback to before the EMA's minimum + lower the LR
    "oscillation": _soft_lr,  # lower the LR
    "plateau": _plateau,  # add an expert (MoE, when allowed), else lower the LR
    "lr_too_low": _raise_lr,  # after lr_low_patience: raise the LR scale (to lr_raise_max, lr_ceiling)
    "near_convergence": _near_convergence,  # once: ease the LR, evaluate more often
    "emergency_over": _restore_lr,  # the LR scale a gradient-explosion cut left comes back (once)
    "expert_collapse": _expert_collapse,  # after collapse_patience: aux weight, expert dropout, temperature
    "dead_expert": _dead_expert,  # prune each layer's least-loaded expert
    "capacity_overflow": _capacity_overflow,  # raise the capacity factor
    "capacity_slack": _capacity_slack,  # after slack_patience: lower the capacity factor
    "mod_collapse": _mod_collapse,  # re-initialise the collapsed MoD routers
    "mod_too_aggressive": _mod_capacity,  # raise the MoD capacity
    "mod_underused": _mod_underused,  # after slack_patience: lower the MoD capacity
    "throughput_drop": _report,
    "micro_batch_room": _set_micro_batch,  # double the micro-batch (the batch is kept)
    "micro_batch_no_gain": _set_micro_batch,  # shrink it back (f.data["to"]: the size before)
    "overfitting": _overfitting,  # raise the weight decay
    "data_imbalance": _data_imbalance,  # shift the interleave ratio toward the lagging source
}


def _candidates(
    f: Finding, s: OrchestratorState, obs: Observation, cfg: OrchestratorConfig
) -> list[tuple[str, dict[str, Any]]]:
    """The actions (name, args) that answer finding ``f``; empty when none applies (at a bound)."""
    return [(a, args) for a, args in RESPONSES[f.kind](f, s, obs, cfg) if args is not None]


# ------------------------------------------------------------------------------------- decide


def decide(
    ostate: OrchestratorState, obs: Observation, cfg: OrchestratorConfig
) -> tuple[OrchestratorState, list[Decision]]:
    """The next orchestrator state and the decisions for observation ``obs`` (see module doc)."""
    s = ostate.copy()
    _observe(s, obs, cfg)
    _observe_micro_batch(s, obs, cfg)
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
    emergency = None  # a gradient-explosion cut here, which may be undone later
    taken: set[str] = set()
    acted: set[str] = set()  # finding kinds a decision answered
    recent = [x for x in s.changes if obs.step - x < cfg.window]
    trouble = any(f.kind in _UNHEALTHY for f in findings)
    for f in sorted(findings, key=lambda f: -f.level):  # stable: detector order within a level
        if f.confidence < _threshold(f.level, cfg):
            continue
        for action, args in _candidates(f, s, obs, cfg):
            if action in taken or ("rollback" in taken and action not in LR_ACTIONS):
                continue
            if action in LR_ACTIONS and args["to"] > args["from"] and trouble:
                continue  # never raise the LR at an observation with trouble (it would also be cut)
            conf, why = _evidenced(f, action, args, cfg)
            if conf < _threshold(f.level, cfg):  # measured not to help often enough for its level
                s.counters["held_by_evidence"] = s.counters.get("held_by_evidence", 0) + 1
                continue
            if action == "rollback":  # recovery, not a change: no cooldown, but a cap of its own
                if sum(1 for r in s.rollbacks if obs.step - r < cfg.window) >= cfg.max_rollbacks_per_window:
                    s.counters["suppressed"] = s.counters.get("suppressed", 0) + 1
                    continue
            elif f.level < 4:
                last = s.last_action.get(_cooldown_key(action, args))
                if last is not None and 0 <= obs.step - last < cfg.cooldown:
                    s.counters["suppressed"] = s.counters.get("suppressed", 0) + 1
                    continue
                if len(recent) >= cfg.max_changes_per_window:
                    s.counters["suppressed"] = s.counters.get("suppressed", 0) + 1
                    continue
                recent.append(obs.step)
            decisions.append(Decision(step=obs.step, action=action, args=args, level=f.level,
                                      confidence=round(conf, 6), reason=f.reason + why))  # fmt: skip
            if f.kind == "grad_explosion" and action == "emergency_lr_cut" and not s.emergency_restores:
                emergency = {**args, "step": obs.step, "quiet_since": obs.step}
            taken.add(action)
            acted.add(f.kind)
            s.last_action[_cooldown_key(action, args)] = obs.step
    if any(f.kind == "loss_spike" for f in findings):
        s.spike_steps = [*s.spike_steps, obs.step]
    s.changes = recent

    # health: instant penalty, slow recovery
    instant = max(
        0.0, 100.0 - sum(_PENALTY[f.level] * f.confidence for f in findings if f.kind not in _OPPORTUNITIES)
    )
    s.health = round(min(instant, 0.9 * s.health + 0.1 * instant), 6)
    s.phase = detect.phase_of(s, findings, cfg)

    if "near_convergence" in acted:
        s.converging_at = obs.step
    # an emergency cut may be undone once its trouble has passed (emergency_over); any other change of
    # the LR scale ends that, and so does the undoing, which caps raises where the trouble came
    if any(d.action in LR_ACTIONS for d in decisions):
        s.emergency = emergency
    elif s.emergency is not None and trouble:
        s.emergency = {**s.emergency, "quiet_since": obs.step}
    for d in decisions:
        s.counters[f"action:{d.action}"] = s.counters.get(f"action:{d.action}", 0) + 1
        # memory against ping-pong: an LR cut or a rollback caps the LR scale where it left it, so a
        # raise that led to trouble does not come back
        if _lowers_lr(d) or d.action == "rollback":
            left = d.args["to"] if d.action != "rollback" else obs.settings.lr_scale
            s.lr_ceiling = left if s.lr_ceiling is None else min(s.lr_ceiling, left)
        elif d.action == "emergency_lr_restore":
            s.emergency_restores += 1
            s.lr_ceiling = d.args["to"]
        if d.action == "rollback":
            to = d.args["to_step"]
            s.rollbacks = [*s.rollbacks, obs.step][-8:]
            s.snapshots = [x for x in s.snapshots if x <= to]
            s.history = [h for h in s.history if h[0] <= to]
            s.lrs = [h for h in s.lrs if h[0] <= to]
            s.ema_history = [h for h in s.ema_history if h[0] <= to]
            s.loss_ema = s.ema_history[-1][1] if s.ema_history else None
            s.plateau_since = None
            s.spike_steps = []
            s.dead_since = {k: v for k, v in s.dead_since.items() if v <= to}
        elif d.action in ("add_expert", "prune_expert"):
            s.dead_since = {}  # expert indices changed
        elif d.action == "micro_batch":
            _book_micro_batch(s, d, cfg)

    # Snapshots for rollbacks: the state after a healthy snapshot step is kept at once (pending) and
    # confirmed by the next observation — the first to see that state's loss — being healthy too.
    healthy = (
        obs.finite
        and not any(_unhealthy(d) for d in decisions)
        and not any(f.kind in _UNHEALTHY for f in findings)
    )
    if s.pending_snapshot is not None and healthy:
        s.snapshots = [*s.snapshots, s.pending_snapshot][-cfg.snapshot_ring :]
    s.pending_snapshot = None
    if healthy and obs.step % cfg.snapshot_every == 0 and obs.step not in s.snapshots:
        s.pending_snapshot = obs.step
    return s, decisions
