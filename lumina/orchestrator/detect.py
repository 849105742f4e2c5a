"""Detectors: pure functions from the orchestrator's history (and the newest observation) to findings.

Each detector looks at plain Python numbers only and returns a list of ``Finding`` — what it saw,
how sure it is, and how serious it is (level 1 soft .. 4 critical). ``policy.decide`` turns findings
into decisions, each kind through its entry in ``policy.RESPONSES``. Statistics are robust where
noise is heavy-tailed (median / MAD, as loss spikes are), and every threshold is a field of
``OrchestratorConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lumina.config import OrchestratorConfig
from lumina.orchestrator.state import Observation, OrchestratorState

__all__ = [
    "Finding",
    "detect_all",
    "forecast",
    "linear_fit",
    "mad",
    "median",
    "phase_of",
    "robust_z",
]

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Finding:
    kind: str  # "loss_spike", "grad_explosion", ...
    level: int
    confidence: float
    reason: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------ statistics


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def mad(xs: list[float]) -> float:
    """Median absolute deviation (scaled by 1.4826: the std of normal noise)."""
    m = median(xs)
    return 1.4826 * median([abs(x - m) for x in xs])


def robust_z(x: float, xs: list[float]) -> float:
    """(x - median) / MAD, with a floor on the MAD of 1e-3 x |median| (a flat window is not noise-free)."""
    m = median(xs)
    return (x - m) / max(mad(xs), 1e-3 * abs(m), _EPS)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def _conf(ratio: float) -> float:
    """Confidence that a statistic ``ratio`` x beyond its threshold is real: 0.5 at the threshold,
    rising with log(ratio) to 1 at 10x."""
    if ratio <= 1:
        return 0.0
    return min(1.0, 0.5 + 0.5 * math.log10(ratio))


def _hard(c: float, cfg: OrchestratorConfig) -> float:
    """A hard (level 3) finding's confidence from its statistic's ``c``: the doubt 1 - c scaled by
    ``hard_doubt_scale`` (1/3: it acts under conf_hard 0.9 where it did under the old 0.7)."""
    if cfg.hard_doubt_scale == 1:  # as before issue 18, bit for bit (1 - (1 - c) need not be c)
        return c
    return 1 - (1 - c) * cfg.hard_doubt_scale


def _warming(ostate: OrchestratorState, cfg: OrchestratorConfig) -> bool:
    """Too little history for statistics: the first ``warmup`` observations, and again after a
    rollback (which drops the history past its target)."""
    return len(ostate.history) <= cfg.warmup


def _window(ostate: OrchestratorState, col: int) -> list[float]:
    return [h[col] for h in ostate.history if math.isfinite(h[col])]


# ------------------------------------------------------------------------------------- detectors


def nonfinite(ostate, obs: Observation, cfg) -> list[Finding]:
    if "oom" in obs.events or obs.finite:
        return []
    what = "loss" if not math.isfinite(obs.loss) else "gradient norm"
    return [Finding("nonfinite", 4, 1.0, f"non-finite {what} (loss {obs.loss}, grad norm {obs.grad_norm})")]


def grad_explosion(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """Above ``grad_abs`` at once; or above ``grad_rel`` x the median of the window before the last
    ``grad_persist`` observations, in all of them (clipping absorbs an isolated spike; early training
    has some, e.g. ~30 against a median ~2 around steps 15-40 of the default run)."""
    g = obs.grad_norm
    if not math.isfinite(g):
        return []
    if g > cfg.grad_abs:
        return [
            Finding(
                "grad_explosion",
                3,
                _hard(_conf(g / cfg.grad_abs) ** 0.5, cfg),
                f"grad norm {g:.3g} > {cfg.grad_abs:g}",
            )
        ]
    n = cfg.grad_persist
    norms = _window(ostate, 2)
    if _warming(ostate, cfg) or len(norms) < n + 5:
        return []
    m = median(norms[:-n])
    recent = norms[-n:]
    if min(recent) > cfg.grad_rel * m:
        return [
            Finding(
                "grad_explosion",
                3,
                _hard(_conf(min(recent) / (cfg.grad_rel * m)) ** 0.5, cfg),
                f"grad norm > {cfg.grad_rel:g}x the window median {m:.3g} for {n} observations (now {g:.3g})",
            )
        ]
    return []


def lr_overshoot(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """The LR is too high for the model at its start: a run without LR warm-up (the LR of step 2
    not above step 1's) whose gradient norm after the first update is over ``overshoot_ratio`` x
    the first one's. Looked at once, at the observation of step 2 (the first two observations being
    steps 1 and 2), so a resumed or later run never sees it. On the debug preset without warm-up
    (20 seeds each): 1.30-2.86 at its LR, 1.80-9.60 at 3 x (16 of 20 above 3); with the preset's
    warm-up the first update is small and the ratio stays near 1 (0.91-1.32). Calibrated there only:
    on debug_200m (first grad norms 21-29) the ratio falls as the LR rises (0.27-1.27 at 10 x its
    LR), so there it never fires (docs/orchestrator.md, The overshoot detector)."""
    if cfg.overshoot_ratio <= 0 or obs.step != 2 or ostate.counters.get("lr_overshoot"):
        return []
    if [h[0] for h in ostate.history] != [1, 2]:  # (``lrs`` holds the same steps: kept together)
        return []
    (_, _, g1, _), (_, _, g2, _) = ostate.history
    (_, lr1, scale1), (_, lr2, scale2) = ostate.lrs
    if not (math.isfinite(g1) and math.isfinite(g2)) or g1 <= 0 or lr2 > lr1 or scale2 != scale1:
        return []
    r = g2 / g1
    if r <= cfg.overshoot_ratio:
        return []
    return [
        Finding(
            "lr_overshoot",
            1,
            _conf(r),
            f"the first update overshot: grad norm {g1:.3g} -> {g2:.3g} (x{r:.2f} > {cfg.overshoot_ratio:g}) "
            f"at LR {lr1:.3g} without warm-up",
            {"ratio": r},
        )
    ]


def loss_spike(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    past = _window(ostate, 1)[:-1][-cfg.spike_window :]  # recent: a decaying loss must not widen the MAD
    if _warming(ostate, cfg) or len(past) < 5 or not math.isfinite(obs.loss):
        return []
    m = median(past)
    z = robust_z(obs.loss, past)
    if z > cfg.spike_z and obs.loss > m * (1 + cfg.spike_min_rel):
        conf = _conf(z / cfg.spike_z)
        reason = f"loss {obs.loss:.4g} is {z:.1f} MADs above the window median {m:.4g}"
        before = [x for x in ostate.spike_steps if 0 < obs.step - x < cfg.window]
        if before:  # a repeat is stronger evidence than either spike alone
            conf = 1 - (1 - conf) ** 2
            reason += f"; the second spike in {obs.step - before[-1]} steps"
        return [
            Finding("loss_spike", 2, conf, reason, {"z": z, "rel": obs.loss / m - 1, "repeat": bool(before)})
        ]
    return []


def divergence(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """The loss EMA has risen ``diverge_rel`` above its minimum in the window and is still rising."""
    emas = ostate.ema_history
    if _warming(ostate, cfg) or len(emas) < 10:
        return []
    best_step, best = min(((s, e) for s, e in emas), key=lambda t: t[1])
    now = emas[-1][1]
    rising = emas[-1][1] > emas[-5][1]
    rel = (now - best) / max(abs(best), _EPS)
    if rel > cfg.diverge_rel and rising:
        return [
            Finding(
                "divergence",
                3,
                _hard(_conf(rel / cfg.diverge_rel), cfg),
                f"loss EMA {now:.4g} rose {rel:.0%} above its window minimum {best:.4g} "
                f"(step {int(best_step)})",
                {"best_step": int(best_step)},
            )
        ]
    return []


def plateau(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    if ostate.plateau_since is None or obs.step - ostate.plateau_since < cfg.plateau_patience:
        return []
    return [
        Finding(
            "plateau",
            1,
            0.9,
            f"loss flat (|slope| < {cfg.plateau_slope:g}/step relative) since step {ostate.plateau_since}",
        )
    ]


def is_flat(ostate: OrchestratorState, cfg: OrchestratorConfig) -> bool:
    hist = [h for h in ostate.history if math.isfinite(h[1])]
    if len(hist) < cfg.window // 2:
        return False
    slope, _ = linear_fit([h[0] for h in hist], [h[1] for h in hist])
    level = median([h[1] for h in hist])
    return abs(slope) < cfg.plateau_slope * max(abs(level), _EPS)


def lr_too_low(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """A slow, steady descent: the LR could be larger. The observations considered are the newest
    ones at the current LR scale past the LR warm-up (the LR not rising), at least ``lr_low_window``
    of them (at most ``window``). Over the last ``lr_low_window`` a straight line fitted to the loss
    falls ``lr_low_snr`` x its residual noise or more; over all of them, the second half falls at
    least ``lr_low_linearity`` x as fast as the first (a healthy descent decelerates: a power law
    4 + 6/sqrt(t) over steps 1-50 has halves 0.2x as fast); no loss spike in the window, the grad
    norm not rising (second-half median <= ``lr_low_grad_rise`` x the first half's), and neither a
    plateau nor near convergence by the forecast (``forecast_ease_rel``). On the debug preset (2-core
    CPU): a 10x too low LR (3e-4) falls ~0.045 a step with noise ~0.04 over steps 27-58, 21-26x
    over 20 observations, its halves 0.8-1.2x as fast; at the preset's LR (3e-3) the window falls
    < 4x its noise from the first observation the detector looks at (step 30: the fast early drop
    is over by then) to the end (250 steps)."""
    n = cfg.lr_low_window
    if cfg.lr_raise_factor <= 1 or _warming(ostate, cfg) or not obs.finite:
        return []
    if ostate.plateau_since is not None or ostate.converging_at is not None:
        return []
    fc = ostate.forecast
    if fc and fc.get("gain", math.inf) < cfg.forecast_ease_rel:
        return []  # near convergence: the LR's job is almost done
    if any(obs.step - x < n for x in ostate.spike_steps):
        return []
    # the newest observations at this LR scale with the LR not rising: past a change of the scale
    # (the loss before it shows another LR) and the schedule's warm-up
    scale, lrs, m = obs.settings.lr_scale, ostate.lrs, 0
    while m < len(lrs) and lrs[-1 - m][2] == scale and (m == 0 or lrs[-1 - m][1] >= lrs[-m][1] * (1 - 1e-9)):
        m += 1
    hist = ostate.history[-m:] if m else []
    if m < n or len(hist) < m:
        return []
    xs, ys, gs = [h[0] for h in hist], [h[1] for h in hist], [h[2] for h in hist]
    if not all(math.isfinite(y) and math.isfinite(g) for y, g in zip(ys, gs, strict=True)):
        return []
    b, a = linear_fit(xs[-n:], ys[-n:])
    if b >= 0:
        return []
    noise = math.sqrt(sum((y - a - b * x) ** 2 for x, y in zip(xs[-n:], ys[-n:], strict=True)) / (n - 2))
    drop = -b * (xs[-1] - xs[-n])
    snr = drop / max(noise, 1e-9 * abs(ys[-1]), _EPS)
    h = m // 2
    b1, _ = linear_fit(xs[:h], ys[:h])
    b2, _ = linear_fit(xs[h:], ys[h:])
    steady = b2 / b1 if b1 < 0 else 0.0
    rise = median(gs[h:]) / max(median(gs[:h]), _EPS)
    # how early on its curve the run is: -d loss / d ln(step), relative to the loss (a power law
    # a + c t^-p has p (L - a) / L, falling with t; an LR k x too low stretches the curve k x in time)
    early = -b * xs[-1] / max(abs(median(ys[-n:])), _EPS)
    if snr < cfg.lr_low_snr or steady < cfg.lr_low_linearity or rise > cfg.lr_low_grad_rise:
        return []
    if early < cfg.lr_low_elasticity:
        return []
    return [
        Finding(
            "lr_too_low",
            1,
            _conf(snr / cfg.lr_low_snr),
            f"loss falls slowly and steadily: {drop:.3g} in {n} observations = {snr:.1f}x its noise "
            f"{noise:.2g}; halves {steady:.2f}x as fast over {m} at this LR; -dloss/dln(step) "
            f"{early:.2f} of the loss; grad norm x{rise:.2f}",
            {"snr": snr, "steady": steady, "early": early, "observations": m},
        )
    ]


def near_convergence(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """The forecast made at this observation still falls, but by less than ``forecast_ease_rel`` of
    the loss over the next ``forecast_horizon`` steps, after the loss EMA came down at least
    ``forecast_min_fall`` from the first loss (a run stuck from the start is not converging: the
    plateau detector answers that); once per run (``converging_at``)."""
    fc = ostate.forecast
    if cfg.forecast_ease_rel <= 0 or not fc or fc.get("step") != obs.step or _warming(ostate, cfg):
        return []
    first, ema = ostate.first_loss, ostate.loss_ema
    if first is None or ema is None or ema > first - cfg.forecast_min_fall * abs(first):
        return []
    gain = fc.get("gain")
    if ostate.converging_at is not None or gain is None or not 0 <= gain < cfg.forecast_ease_rel:
        return []
    return [
        Finding(
            "near_convergence",
            1,
            0.9,
            f"near convergence: the forecast gains {gain:.2%} of the loss over the next "
            f"{cfg.forecast_horizon} steps (< {cfg.forecast_ease_rel:.2%})",
            {"gain": gain},
        )
    ]


def emergency_over(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """A gradient-explosion cut whose trouble has passed: ``emergency_recover`` observations since
    the cut (and since the last finding of trouble) with the LR scale where the cut left it. The cut
    was for the emergency; the scale it cut comes back (once a run: ``policy``). Hard, as the cut
    it undoes: a paired run with the restore had the cut too, so the benchmark's evidence cannot
    judge the restore apart from it (against the runs with the cut alone it improved 3 of 3)."""
    e = ostate.emergency
    if e is None or cfg.emergency_recover <= 0 or not obs.finite or obs.settings.lr_scale != e["to"]:
        return []
    quiet = obs.step - e["quiet_since"]
    if quiet < cfg.emergency_recover:
        return []
    return [
        Finding(
            "emergency_over",
            3,
            1.0,
            f"no trouble for {quiet} observations since the gradient-explosion cut at step {e['step']} "
            f"({e['from']:g} -> {e['to']:g})",
            {"to": e["from"]},
        )
    ]


def oscillation(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    losses = _window(ostate, 1)
    if _warming(ostate, cfg) or len(losses) < 20:
        return []
    d = [b - a for a, b in zip(losses, losses[1:], strict=False)]
    flips = sum(1 for a, b in zip(d, d[1:], strict=False) if a * b < 0) / max(1, len(d) - 1)
    mean_d = sum(d) / len(d)
    amp = math.sqrt(sum((x - mean_d) ** 2 for x in d) / len(d)) / max(abs(median(losses)), _EPS)
    if flips > cfg.oscillation_flips and amp > cfg.oscillation_amp:
        return [
            Finding(
                "oscillation",
                2,
                min(1.0, 0.5 * flips / cfg.oscillation_flips + 0.5 * _conf(amp / cfg.oscillation_amp)),
                f"loss alternates direction in {flips:.0%} of steps with relative amplitude {amp:.2f}",
            )
        ]
    return []


def experts(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """Collapse / imbalance per MoE layer, dead experts (after ``dead_patience`` steps) and capacity
    overflow (mean dropped fraction over the layers)."""
    out: list[Finding] = []
    if not obs.expert_load or _warming(ostate, cfg):
        return out
    worst = None
    k = max(1, obs.settings.top_k)  # a dense model reports top_k 0
    for layer, shares in enumerate(obs.expert_load):
        n = len(shares)
        total = sum(shares)
        if n <= k or total <= 0:
            continue
        p = [s / total for s in shares]
        # effective number of experts exp(entropy): n when balanced, k when every token picks the
        # same k experts (the least it can be: each token's k picks are distinct)
        eff = math.exp(-sum(x * math.log(x) for x in p if x > 0))
        limit = k + cfg.collapse_margin * (n - k)
        if eff <= limit:
            conf = 0.5 + 0.5 * (1 - (eff - k) / max(limit - k, _EPS))
            f = Finding(
                "expert_collapse",
                2,
                min(1.0, conf),
                f"layer {layer}: load spread over {eff:.2f} effective experts of {n} (top-{k}: "
                f"collapse at <= {limit:.2f}); top expert {max(p):.0%} of assignments",
                {"layer": layer, "effective_experts": eff},
            )
            worst = f if worst is None or f.confidence > worst.confidence else worst
    if worst is not None:
        out.append(worst)
    dead = [k for k, since in ostate.dead_since.items() if obs.step - since >= cfg.dead_patience]
    if dead and worst is None:
        out.append(
            Finding(
                "dead_expert",
                2,
                0.9,
                f"{len(dead)} expert(s) below {cfg.dead_share:.0%} of the load for "
                f"{cfg.dead_patience}+ steps: "
                + ", ".join(f"layer {k.split(':')[0]} expert {k.split(':')[1]}" for k in sorted(dead)[:4]),
                {"dead": sorted(dead)},
            )
        )
    if obs.dropped:
        drop = sum(obs.dropped) / len(obs.dropped)
        if drop > cfg.overflow_drop:
            out.append(
                Finding(
                    "capacity_overflow",
                    2,
                    _conf(drop / cfg.overflow_drop) ** 0.5,
                    f"{drop:.1%} of expert assignments dropped (> {cfg.overflow_drop:.0%})",
                )
            )
        elif drop < cfg.slack_drop and obs.settings.capacity_factor is not None:
            out.append(
                Finding(
                    "capacity_slack",
                    1,
                    0.9,
                    f"{drop:.2%} of expert assignments dropped (< {cfg.slack_drop:.0%}): the capacity "
                    f"factor {obs.settings.capacity_factor:g} pays for slots that stay empty",
                )
            )
    return out


def mod(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """MoD too aggressive (the loss is on a plateau while the router's weights on the selected tokens
    saturate — saturation alone is normal: in the default run the weights reach ~1.0 by step 40 and
    stay there while the loss keeps falling) or collapsed (the router's scores no longer differ
    between tokens, so top-k picks positions, not tokens). Weights near 0 are not a collapse: a
    layer may learn to skip its block (seed 1 of the default run does, in layer 1, by step 20)."""
    if not obs.mod_weight or _warming(ostate, cfg):
        return []
    w = sum(obs.mod_weight) / len(obs.mod_weight)
    flat = [i for i, sd in enumerate(obs.mod_score_std) if sd < cfg.mod_min_score_std]
    if flat:
        return [
            Finding(
                "mod_collapse",
                2,
                0.9,
                f"MoD routing collapsed in routed layer(s) {flat}: router score spread "
                f"{min(obs.mod_score_std):.2g} < {cfg.mod_min_score_std:g} (it cannot tell tokens apart)",
                {"layers": flat},
            )
        ]
    if w > cfg.mod_high and ostate.plateau_since is not None:
        return [
            Finding(
                "mod_too_aggressive",
                1,
                0.9,
                f"loss on a plateau while the selected tokens' mean router weight is {w:.3f} > "
                f"{cfg.mod_high:g}: the routed blocks may want more tokens than the capacity lets through",
            )
        ]
    if max(obs.mod_weight) < cfg.mod_low:
        return [
            Finding(
                "mod_underused",
                1,
                0.9,
                f"every routed layer's selected tokens have a mean router weight below {cfg.mod_low:g} "
                f"(at most {max(obs.mod_weight):.3f}): the blocks add little to the tokens they take",
            )
        ]
    return []


def memory(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    if "oom" in obs.events:
        return [Finding("oom", 4, 1.0, "out of memory in the step")]
    # the configured budget, else the device's own limit as the driver measured it (0: unknown)
    budget, what = cfg.memory_budget_mb, "budget"
    if not budget:
        budget, what = obs.memory_limit_mb, "device's memory"
    if budget and obs.memory_mb > cfg.memory_high * budget:
        return [
            Finding(
                "memory_pressure",
                2,
                0.9,
                f"memory {obs.memory_mb:.0f} MB > {cfg.memory_high:.0%} of the {budget:.0f} MB {what}",
            )
        ]
    return []


def throughput(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    past = _window(ostate, 3)[:-1]
    if _warming(ostate, cfg) or len(past) < 5 or obs.tokens_per_s <= 0:
        return []
    m = median(past)
    if obs.tokens_per_s < cfg.throughput_drop * m:
        return [
            Finding(
                "throughput_drop",
                1,
                0.5,
                f"{obs.tokens_per_s:.0f} tok/s < {cfg.throughput_drop:.0%} of the window median {m:.0f}",
            )
        ]
    return []


def micro_batch(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """Room to double the micro-batch (an opportunity), or a growth judged not worth it.

    Room: past the warm-up (``warmup`` observations, again after a rollback), more than one
    micro-batch per step, the doubled one divides the batch into a multiple of the ranks, it is
    below any size reverted or out of memory before (``mb_ceiling``), tokens/s has
    a baseline at the current size (``grow_window`` observations after ``grow_settle``) and twice
    the peak memory (activations at most double; parameters and moments do not) stays under
    ``grow_memory`` x the limit. The judgment itself is bookkeeping (``policy._observe_micro_batch``);
    a growth judged no faster is reported here until its shrink passes the gate."""
    if not cfg.grow_micro_batch or "oom" in obs.events:
        return []
    st, trial = obs.settings, ostate.mb_trial
    mb = st.micro_batch_size
    if trial is not None:
        if trial.get("verdict") == "revert" and mb == trial["to"]:
            return [Finding("micro_batch_no_gain", 1, 0.9,
                            f"micro-batch {trial['from']} -> {mb} did not pay: {trial['after']:.0f} tok/s vs "
                            f"{trial['before']:.0f} before (< +{cfg.grow_gain:.0%})",
                            {"to": trial["from"]})]  # fmt: skip
        return []
    new, world = 2 * mb, max(1, st.world_size)
    if st.batch_size // mb <= 1 or st.batch_size % new or (st.batch_size // new) % world:
        return []
    if ostate.mb_ceiling and new >= ostate.mb_ceiling or _warming(ostate, cfg):
        return []  # (not while warming up: the start of a run, or just after a rollback)
    speeds = ostate.mb_speed[cfg.grow_settle :]
    limit = cfg.memory_budget_mb or obs.memory_limit_mb
    if len(speeds) < cfg.grow_window or not limit or obs.memory_mb <= 0:
        return []
    if 2 * obs.memory_mb > cfg.grow_memory * limit:
        return []
    return [
        Finding(
            "micro_batch_room",
            1,
            0.9,
            f"2 x memory {obs.memory_mb:.0f} MB < {cfg.grow_memory:.0%} of the {limit:.0f} MB limit: "
            f"micro-batch {mb} -> {new} ({st.batch_size // new} micro-batches a step)",
            {"to": new, "before": median(speeds)},
        )
    ]


def overfitting(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """The eval loss rose over the last two evaluations while the training loss EMA fell."""
    ev = ostate.evals
    if obs.eval_loss is None or len(ev) < 3:
        return []
    (_, e0, _, t0), (_, e1, _, t1), (_, e2, _, t2) = ev[-3:]
    if e2 > e1 > e0 and t2 < t1 < t0:
        return [
            Finding(
                "overfitting",
                1,
                0.9,
                f"eval loss rose {e0:.4g} -> {e2:.4g} over two evaluations while training loss fell",
            )
        ]
    return []


def data_balance(ostate, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """Interleaved data: one source's eval loss got worse since the last evaluation while the other's
    improved — shift the ratio toward the lagging source."""
    ev = ostate.evals
    if obs.eval_loss is None or len(ev) < 2 or obs.settings.mode != "interleaved":
        return []
    before, now = ev[-2][2], ev[-1][2]
    if set(before) != {"base", "chat"} or set(now) != {"base", "chat"}:
        return []
    delta = {k: now[k] - before[k] for k in now}
    for lag, lead in (("base", "chat"), ("chat", "base")):
        if delta[lag] > 0 and delta[lead] < 0:
            return [
                Finding(
                    "data_imbalance",
                    1,
                    0.9,
                    f"{lag} eval loss got worse ({before[lag]:.4g} -> {now[lag]:.4g}) while {lead} improved",
                    {"lagging": lag},
                )
            ]
    return []


DETECTORS = (
    nonfinite,
    memory,
    grad_explosion,
    lr_overshoot,
    loss_spike,
    divergence,
    oscillation,
    plateau,
    lr_too_low,
    near_convergence,
    emergency_over,
    experts,
    mod,
    throughput,
    micro_batch,
    overfitting,
    data_balance,
)


def detect_all(ostate: OrchestratorState, obs: Observation, cfg: OrchestratorConfig) -> list[Finding]:
    """Every detector's findings for ``obs``, in a fixed order (``ostate`` already holds ``obs``)."""
    return [f for det in DETECTORS for f in det(ostate, obs, cfg)]


# ------------------------------------------------------------------------- phase and forecast


def phase_of(ostate: OrchestratorState, findings: list[Finding], cfg: OrchestratorConfig) -> str:
    kinds = {f.kind for f in findings}
    if _warming(ostate, cfg):
        return "warmup"
    if kinds & {"divergence", "nonfinite"}:
        return "diverging"
    if kinds & {"loss_spike", "oscillation", "grad_explosion"}:
        return "volatile"
    if ostate.plateau_since is not None:
        return "plateau"
    return "converging"


def forecast(ostate: OrchestratorState, step: int, cfg: OrchestratorConfig) -> dict[str, Any]:
    """Fit loss ~ a + b ln(step) over the window: the predicted loss ``forecast_horizon`` steps
    ahead, the steps until the fitted slope b/t falls under the plateau threshold, and the fitted
    fall over the horizon relative to the loss (``gain``; negative while the loss rises)."""
    hist = [h for h in ostate.history if math.isfinite(h[1]) and h[0] > 0]
    if len(hist) < 10:
        return {}
    b, a = linear_fit([math.log(h[0]) for h in hist], [h[1] for h in hist])
    target = step + cfg.forecast_horizon
    pred = a + b * math.log(target)
    level = max(abs(median([h[1] for h in hist])), _EPS)
    # |d loss / d step| = |b| / t < plateau_slope * level  <=>  t > |b| / (plateau_slope * level)
    t_flat = abs(b) / (cfg.plateau_slope * level)
    return {
        "step": step,
        "target_step": target,
        "loss": pred,
        "steps_to_plateau": max(0, math.ceil(t_flat - step)),
        "gain": -b * math.log(target / step) / level,  # the fitted fall over the horizon, relative
    }
