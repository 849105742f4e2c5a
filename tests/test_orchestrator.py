"""The orchestrator's pure parts: detectors on synthetic series, gating, decide's purity, and each
action's effect on a real train state."""

import dataclasses
import inspect
import math
import random
import re

import msgpack
import pytest
import torch

from lumina import tree
from lumina.config import ConfigError, OrchestratorConfig
from lumina.configure import load_config
from lumina.optim import default_hp, lr_at
from lumina.orchestrator import Decision, Observation, apply_decisions, decide, detect, init_state
from lumina.orchestrator.detect import forecast, mad, median, robust_z
from lumina.orchestrator.policy import CHRONIC, RESPONSES
from lumina.orchestrator.state import LR_ACTIONS, OrchestratorState, Settings
from lumina.step import init_train_state, make_train_step

# the detectors and responses on their own: the evidence table's gate has a test of its own
OCFG = OrchestratorConfig(evidence=())
DENSE = {"lr_scale": 1.0, "weight_decay": 0.1, "micro_batch_size": 8, "batch_size": 8,
         "grad_checkpointing": "none", "num_experts": 0, "top_k": 0, "balance": None,
         "capacity_factor": None, "mod_capacity": None, "mode": "base_only", "interleave_ratio": 0.5,
         "knobs": {"aux_loss_weight": 0.01, "expert_dropout": 0.0, "router_temperature": 1.0},
         "frozen_base": False, "world_size": 1, "eval_every": 0}  # fmt: skip
MOE = DENSE | {"num_experts": 8, "top_k": 2, "balance": "aux_loss", "capacity_factor": 1.25}


def clean_series(n, seed, noise=0.03):
    """A healthy run: loss decaying like a power law with small noise, grad norms ~1."""
    rng = random.Random(seed)
    out = []
    for t in range(1, n + 1):
        loss = 4.0 + 6.0 * t**-0.5 + rng.gauss(0, noise)
        out.append(dict(step=t, loss=loss, grad_norm=1.0 + 0.2 * abs(rng.gauss(0, 1)), lr=1e-3,
                        tokens_per_s=1000 + rng.gauss(0, 30), memory_mb=500.0))  # fmt: skip
    return out


def run(series, cfg=OCFG, settings=DENSE, **extra):
    """Feed observations through decide; (final state, decisions, per-step findings counters)."""
    s, decisions = init_state(0), []
    for o in series:
        fields = {"settings": settings, **extra, **o}
        s, ds = decide(s, Observation(**fields), cfg)
        decisions += ds
    return s, decisions


def found(s, kind):
    return s.counters.get(kind, 0)


# ------------------------------------------------------------------------------- statistics


def test_robust_statistics():
    assert median([3, 1, 2]) == 2 and median([4, 1, 2, 3]) == 2.5
    assert mad([1, 1, 1, 1]) == 0 and mad([1, 2, 3, 4, 100]) == pytest.approx(1.4826)
    assert robust_z(100, [1, 2, 3, 4, 5]) == pytest.approx(97 / 1.4826)
    assert robust_z(2.0, [2.0] * 10) == 0  # a flat window: the MAD floor avoids a division by zero


@pytest.mark.parametrize("seed", range(4))
def test_a_clean_run_draws_no_findings_and_no_decisions(seed):
    s, decisions = run(clean_series(300, seed))
    assert decisions == []
    assert {k: v for k, v in s.counters.items()} == {}
    assert s.phase == "converging" and s.health == 100.0
    assert s.snapshots == [270, 280, 290] and s.pending_snapshot == 300  # every 10 steps, newest 3 confirmed


# --------------------------------------------------------------------------------- detectors


def test_nonfinite_loss_rolls_back_to_a_snapshot_two_steps_before():
    series = clean_series(100, 0)
    series[64]["loss"] = math.nan  # step 65
    s, decisions = run(series)
    rb = [d for d in decisions if d.action == "rollback"]
    assert len(rb) == 1 and rb[0].step == 65 and rb[0].level == 4
    assert rb[0].args == {"to_step": 60, "skip_data": True}  # newest snapshot <= 63
    assert "non-finite loss" in rb[0].reason


def test_nonfinite_again_after_a_rollback_also_cuts_the_lr():
    series = clean_series(100, 0)
    for i in (64, 69):
        series[i]["grad_norm"] = math.inf
    s, decisions = run(series)
    assert [d.action for d in decisions] == ["rollback", "rollback", "emergency_lr_cut"]
    assert decisions[2].args == {"from": 1.0, "to": 0.1}


def test_loss_spike_small_is_recorded_large_rolls_back():
    series = clean_series(200, 1)
    series[99]["loss"] *= 1.3  # a spike (30 % up), below the rollback size (50 %)
    s, decisions = run(series)
    assert found(s, "loss_spike") == 1 and decisions == []
    series[149]["loss"] = 11.0  # 2.4x the median, z >> 20
    s, decisions = run(series)
    assert found(s, "loss_spike") == 2
    assert [(d.action, d.step, d.args["to_step"]) for d in decisions] == [("rollback", 150, 140)]


def test_repeated_loss_spikes_lower_the_lr():
    series = clean_series(200, 2)
    series[99]["loss"] *= 1.3
    series[109]["loss"] *= 1.3
    s, decisions = run(series)
    assert [(d.action, d.step, d.args) for d in decisions] == [("lr_scale", 110, {"from": 1.0, "to": 0.5})]


def test_grad_explosion_absolute_and_persistent_relative():
    series = clean_series(120, 3)
    series[79]["grad_norm"] = 500.0
    s, decisions = run(series)
    assert [(d.action, d.step, d.args) for d in decisions] == [
        ("emergency_lr_cut", 80, {"from": 1.0, "to": 0.1})
    ]
    # relative: one 20x spike is absorbed by clipping; three in a row act
    series = clean_series(120, 3)
    series[79]["grad_norm"] = 25.0
    assert run(series)[1] == []
    for i in (80, 81):
        series[i]["grad_norm"] = 25.0
    decisions = run(series)[1]
    assert [(d.action, d.step) for d in decisions] == [("emergency_lr_cut", 82)]


def test_grad_explosion_cuts_stop_at_the_floor_and_nonfinite_recovery_does_not():
    """Explosions that go on after a x0.1 cut are not the LR's doing: no second cut below
    emergency_lr_floor; a non-finite loss still rolls back and, recurring, cuts below it."""
    series = clean_series(200, 3)
    for i in (79, 119, 159):  # three explosions, each past the cooldown of the one before
        series[i]["grad_norm"] = 500.0
    stays = dataclasses.replace(OCFG, emergency_recover=0)  # (a cut is not undone: the test below)
    cuts = [(d.step, d.args) for d in run_applied(series, stays)[1]]  # (run_applied: below)
    assert cuts == [(80, {"from": 1.0, "to": 0.1})]
    no_floor = dataclasses.replace(stays, emergency_lr_floor=0.0)  # as before the floor: they compound
    assert [(d.step, d.args["to"]) for d in run_applied(series, no_floor)[1]] == [
        (80, 0.1), (120, pytest.approx(0.01)), (160, pytest.approx(0.001))]  # fmt: skip
    # from a raised scale the cut may land above the floor, and a second one stops at it
    decisions = run_applied(series, stays, settings=DENSE | {"lr_scale": 4.0})[1]
    assert [d.args for d in decisions] == [
        {"from": 4.0, "to": pytest.approx(0.4)}, {"from": pytest.approx(0.4), "to": 0.1}]  # fmt: skip
    # non-finite twice within the window at the floor: rollback, then rollback + a cut below it
    bad = clean_series(120, 3)
    for i in (80, 90):
        bad[i]["loss"] = float("nan")
    decisions = run_applied(bad, settings=DENSE | {"lr_scale": 0.1})[1]
    assert [(d.action, d.args.get("to")) for d in decisions if d.action != "rollback"] == [
        ("emergency_lr_cut", pytest.approx(0.01))]  # fmt: skip


def test_an_emergency_cut_is_undone_once_its_trouble_has_passed():
    """emergency_recover (20) observations without trouble after a gradient-explosion cut bring
    back the scale it cut; an explosion meanwhile (step 90: at the floor, no second cut) restarts
    the count. Once a run: the cut after the restore (120) stays, and a raise never goes above the
    scale the trouble came at."""
    series = clean_series(200, 3)
    for i in (79, 89, 119):
        series[i]["grad_norm"] = 500.0
    s, decisions = run_applied(series)
    assert [(d.step, d.action, d.args, d.level) for d in decisions] == [
        (80, "emergency_lr_cut", {"from": 1.0, "to": 0.1}, 3),
        (110, "emergency_lr_restore", {"from": 0.1, "to": 1.0}, 3),
        (120, "emergency_lr_cut", {"from": 1.0, "to": 0.1}, 3),
    ]  # fmt: skip
    assert decisions[1].reason.startswith("no trouble for 20 observations since the gradient-explosion cut")
    assert s.emergency is None and s.emergency_restores == 1 and s.lr_ceiling == 0.1
    assert found(s, "emergency_over") == 1
    # hard, as the cut it undoes: an evidence entry does not hold it back
    held = dataclasses.replace(OCFG, evidence=("emergency_lr_restore+=0/9",))
    assert run_applied(series, held)[1] == decisions
    # never while the run is in trouble, and never after the scale moved for another reason
    s = init_state(0)
    e = {"step": 80, "from": 1.0, "to": 0.1, "quiet_since": 80}
    s.emergency, s.history = e, [[t, 5.0, 1.0] for t in range(1, 101)]
    obs = Observation(step=100, loss=5.0, grad_norm=1.0, lr=1e-4, settings=DENSE | {"lr_scale": 0.1})
    assert [f.kind for f in detect.emergency_over(s, obs, OCFG)] == ["emergency_over"]
    assert detect.emergency_over(s, dataclasses.replace(obs, step=99), OCFG) == []
    moved = Observation(**{**obs.to_dict(), "settings": DENSE | {"lr_scale": 0.05}})
    assert detect.emergency_over(s, moved, OCFG) == []


def test_divergence_rolls_back_before_the_minimum():
    series = clean_series(200, 4)
    for i in range(120, 200):
        series[i]["loss"] = series[119]["loss"] * (1 + 0.01 * (i - 119))
    s, decisions = run(series)
    assert found(s, "divergence") >= 1
    rb = next(d for d in decisions if d.action == "rollback")
    assert rb.args["to_step"] <= 120 and rb.level == 3
    assert any(d.action == "lr_scale" and d.step <= rb.step for d in decisions)  # (or in its cooldown)


def test_plateau_lowers_the_lr_dense_and_adds_an_expert_moe():
    rng = random.Random(5)
    flat = [dict(step=t, loss=3.0 + rng.gauss(0, 1e-4), grad_norm=1.0, lr=1e-3) for t in range(1, 260)]
    s, decisions = run(flat)
    assert found(s, "plateau") >= 1 and s.phase == "plateau"
    assert decisions[0].action == "lr_scale" and decisions[0].step >= OCFG.plateau_patience
    s, decisions = run(flat, settings=MOE, expert_load=[[0.125] * 8])
    assert decisions[0].action == "add_expert" and decisions[0].args == {"from": 8, "to": 9}
    # ... and not on a decaying loss
    assert found(run(clean_series(260, 5))[0], "plateau") == 0


def test_oscillation():
    rng = random.Random(6)
    osc = [dict(step=t, loss=4 + (0.6 if t % 2 else -0.6) + rng.gauss(0, 0.01), grad_norm=1.0, lr=1e-3)
           for t in range(1, 80)]  # fmt: skip
    s, decisions = run(osc)
    assert found(s, "oscillation") >= 1 and decisions[0].action == "lr_scale"


def balanced(E=8):
    return [[1 / E] * E, [1 / E] * E]


def test_expert_collapse_raises_the_balance_weight():
    series = clean_series(60, 7)
    OCFG = dataclasses.replace(globals()["OCFG"], collapse_patience=1)  # (patience: below)
    s, decisions = run(series, OCFG, settings=MOE, expert_load=balanced())
    assert found(s, "expert_collapse") == 0 and decisions == []
    collapsed = [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [1 / 8] * 8]
    s, decisions = run(series, OCFG, settings=MOE, expert_load=collapsed)
    d = decisions[0]
    assert d.action == "set_knob" and d.args == {"name": "aux_loss_weight", "from": 0.01, "to": 0.04}
    # every token on the same 2 of 8 experts: 2.0 effective experts, the least top-2 allows: conf 1
    assert "layer 0" in d.reason and "2.00 effective experts" in d.reason and d.step == OCFG.warmup + 1
    # cooldown: the same action waits, and the next one comes after it
    assert [x.step for x in decisions if x.action == "set_knob"] == [21, 46]
    assert s.snapshots == [30, 40, 50]  # a chronic routing finding does not stop the snapshots
    # a milder skew (3.4 effective experts <= 2 + 0.25 x 6 = 3.5: conf 0.53) acts once it persists
    mild = [[0.32, 0.32, 0.32, 0.04, 0, 0, 0, 0], [1 / 8] * 8]
    s, decisions = run(series, OCFG, settings=MOE, expert_load=mild)
    first = decisions[0]
    assert first.action == "set_knob" and "observations in a row" in first.reason and first.step > 21
    # E = 4, k = 2 (the debug preset): two experts with all the tokens is a collapse, [.4 .3 .2 .1] is not
    four = MOE | {"num_experts": 4}
    assert run(series, OCFG, settings=four, expert_load=[[0.5, 0.5, 0, 0]])[1][0].action == "set_knob"
    assert run(series, OCFG, settings=four, expert_load=[[0.4, 0.3, 0.2, 0.1]])[1] == []
    # default patience: acted on only after 50 observations of collapse in a row
    s, decisions = run(clean_series(100, 7), settings=MOE, expert_load=collapsed)
    assert decisions[0].step == 20 + 50 and "50 observations in a row" in decisions[0].reason


def test_a_lasting_expert_collapse_escalates_balance_weight_then_dropout_then_temperature():
    """Each decision applied to the next observation's knobs while the collapse lasts: the balance
    weight x 4 up to 0.1 (0.01 -> 0.04 -> 0.1), then expert dropout 0.1, then the router temperature
    x 1.5 up to 4 (1 -> 1.5 -> 2.25 -> 3.375 -> 4), then nothing is left to raise. Without the
    balance loss (balance=bias: aux-loss-free routing) the first answer is the dropout."""
    cfg = dataclasses.replace(OCFG, collapse_patience=1, cooldown=0, max_changes_per_window=100)
    collapsed = [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [1 / 8] * 8]

    def escalate(settings):
        s, knobs, out = init_state(0), dict(settings["knobs"]), []
        for o in clean_series(60, 7):
            s, ds = decide(s, Observation(**{"settings": settings | {"knobs": dict(knobs)},
                                             "expert_load": collapsed, **o}), cfg)  # fmt: skip
            for d in ds:
                assert d.action == "set_knob"
                knobs[d.args["name"]] = d.args["to"]
                out.append((d.args["name"], d.args["from"], d.args["to"]))
        return out

    assert escalate(MOE) == [
        ("aux_loss_weight", 0.01, 0.04), ("aux_loss_weight", 0.04, 0.1), ("expert_dropout", 0.0, 0.1),
        ("router_temperature", 1.0, 1.5), ("router_temperature", 1.5, 2.25),
        ("router_temperature", 2.25, 3.375), ("router_temperature", 3.375, 4.0),
    ]  # fmt: skip
    assert escalate(MOE | {"balance": "bias"})[0] == ("expert_dropout", 0.0, 0.1)


def test_dead_expert_is_pruned_after_patience():
    load = [0.14] * 7 + [0.01]
    load = [x / sum(load) for x in load]
    other = [0.15] * 6 + [0.1, 0.0]  # layer 1: expert 7 dead too
    series = clean_series(120, 8)
    s, decisions = run(series, settings=MOE, expert_load=[load, other])
    prune = [d for d in decisions if d.action == "prune_expert"]
    assert prune and prune[0].args == {"from": 8, "to": 7, "experts": [7, 7]}
    assert prune[0].step >= OCFG.dead_patience
    # only one layer with a dead expert: no prune (the expert count is shared by all layers)
    s, decisions = run(series, settings=MOE, expert_load=[load, [1 / 8] * 8])
    assert not [d for d in decisions if d.action == "prune_expert"]


def test_capacity_overflow_raises_the_capacity_factor():
    s, decisions = run(clean_series(40, 9), settings=MOE, expert_load=balanced(), dropped=[0.3, 0.2])
    assert decisions[0].action == "capacity_factor"
    assert decisions[0].args == {"from": 1.25, "to": 1.5625}
    # dropless (no capacity factor): nothing to raise
    assert run(clean_series(40, 9), settings=MOE | {"capacity_factor": None}, dropped=[0.3])[1] == []


def test_capacity_factor_moves_both_ways_with_a_band_between():
    """Drops above overflow_drop (5 %) raise the factor at once; drops below slack_drop (1 %) for
    slack_patience observations lower it (not below min_capacity_factor); in between: nothing."""
    cfg = dataclasses.replace(OCFG, slack_patience=10)
    series = clean_series(40, 9)
    s, decisions = run(series, cfg, settings=MOE, expert_load=balanced(), dropped=[0.06, 0.05])
    assert [(d.action, d.args) for d in decisions] == [("capacity_factor", {"from": 1.25, "to": 1.5625})]
    s, decisions = run(series, cfg, settings=MOE, expert_load=balanced(), dropped=[0.005, 0.0])
    # warm-up (20 observations) then 10 in a row: the 30th lowers it; the cooldown holds the next one
    assert [(d.step, d.action, d.args, d.level) for d in decisions] == [
        (30, "capacity_factor", {"from": 1.25, "to": 1.0}, 1)
    ]
    assert "pays for slots that stay empty (10 observations in a row)" in decisions[0].reason
    assert s.health == 100  # spare capacity is a chance to save compute, not trouble
    assert run(series, cfg, settings=MOE, expert_load=balanced(), dropped=[0.03, 0.02])[1] == []  # the band
    at_min = MOE | {"capacity_factor": 1.0}
    assert run(series, cfg, settings=at_min, expert_load=balanced(), dropped=[0.0, 0.0])[1] == []
    dropless = MOE | {"capacity_factor": None}
    s, decisions = run(series, cfg, settings=dropless, expert_load=balanced(), dropped=[0.0, 0.0])
    assert decisions == [] and found(s, "capacity_slack") == 0
    with pytest.raises(ConfigError, match="slack_drop"):
        dataclasses.replace(OCFG, slack_drop=0.05)


def test_mod_collapse_and_too_aggressive():
    mod = DENSE | {"mod_capacity": 0.25}
    s, decisions = run(clean_series(30, 10), settings=mod, mod_weight=[0.6, 0.6], mod_score_std=[0.5, 0.0])
    assert decisions[0].action == "reset_mod_router" and decisions[0].args["layers"] == [1]
    # saturated router weights are normal while the loss falls (the default run reaches ~1.0)...
    s, decisions = run(clean_series(200, 10), settings=mod, mod_weight=[0.99, 0.99], mod_score_std=[1.0, 1.0])
    assert decisions == [] and found(s, "mod_too_aggressive") == 0
    # ... on a plateau they ask for more capacity
    rng = random.Random(10)
    flat = [dict(step=t, loss=3.0 + rng.gauss(0, 1e-4), grad_norm=1.0, lr=1e-3) for t in range(1, 200)]
    s, decisions = run(flat, settings=mod, mod_weight=[0.99, 0.99], mod_score_std=[1.0, 1.0])
    d = next(d for d in decisions if d.action == "mod_capacity")
    assert d.args == {"from": 0.25, "to": 0.375} and "plateau" in d.reason
    s, decisions = run(clean_series(30, 10), settings=mod, mod_weight=[0.7, 0.6], mod_score_std=[1.0, 1.0])
    assert decisions == []
    # a layer that learned to skip its block (weights near 0, scores still spread) is left alone
    s, decisions = run(clean_series(60, 10), settings=mod, mod_weight=[0.001, 1.0], mod_score_std=[4.0, 9.0])
    assert decisions == [] and found(s, "mod_collapse") == 0 and found(s, "mod_underused") == 0
    # every routed layer nearly skips its block: after slack_patience in a row, less capacity; while
    # it lasts, again after each cooldown (25 steps; the settings here stay as they were)
    cfg = dataclasses.replace(OCFG, slack_patience=10)
    low = {"mod_weight": [0.05, 0.02], "mod_score_std": [4.0, 9.0]}
    s, decisions = run(clean_series(60, 10), cfg, settings=mod, **low)
    lower = ("mod_capacity", {"from": 0.25, "to": 0.25 / 1.5})
    assert [(d.step, d.action, d.args) for d in decisions] == [(30, *lower), (55, *lower)]
    assert s.health == 100 and found(s, "mod_underused") == 40
    floor = mod | {"mod_capacity": cfg.mod_min_capacity}
    assert run(clean_series(60, 10), cfg, settings=floor, **low)[1] == []


def test_a_snapshot_counts_only_once_the_next_observation_is_healthy():
    """The state after step 50 is first seen by observation 51: a (not yet acted on) spike there
    means snapshot 50 may hold the damage, so a rollback at 52 goes to 40."""
    series = clean_series(60, 16)
    series[50]["loss"] *= 1.3  # step 51: a spike, recorded
    series[51]["loss"] = 20.0  # step 52: a large one, rolled back
    s, decisions = run(series)
    assert [(d.action, d.args["to_step"]) for d in decisions] == [("rollback", 40)]
    series[50]["loss"] /= 1.3  # a healthy 51 confirms 50
    s, decisions = run(series)
    assert [(d.action, d.args["to_step"]) for d in decisions] == [("rollback", 50)]


def test_oom_halves_the_micro_batch_then_checkpoints():
    s, d = decide(init_state(), Observation(step=1, loss=math.nan, grad_norm=math.nan, lr=1e-3,
                                            events=["oom"], settings=DENSE), OCFG)  # fmt: skip
    assert [(x.action, x.args, x.level) for x in d] == [("micro_batch", {"from": 8, "to": 4}, 4)]
    assert s.history == [] and found(s, "nonfinite") == 0  # an OOM is not a non-finite loss
    one = DENSE | {"micro_batch_size": 1}
    _, d = decide(s, Observation(step=1, loss=math.nan, grad_norm=math.nan, lr=1e-3, events=["oom"],
                                 settings=one), OCFG)  # fmt: skip
    assert [(x.action, x.args) for x in d] == [("grad_checkpointing", {"from": "none", "to": "full"})]


def test_memory_pressure_and_throughput_drop():
    cfg = dataclasses.replace(OCFG, memory_budget_mb=600)
    series = clean_series(40, 11)
    series[-1]["memory_mb"] = 590.0
    s, decisions = run(series, cfg)
    assert [(d.action, d.args["to"]) for d in decisions] == [("grad_checkpointing", "full")]
    series = clean_series(40, 11)
    series[-1]["tokens_per_s"] = 100.0
    s, decisions = run(series)
    assert found(s, "throughput_drop") == 1 and decisions == []  # noted in the health, not acted on
    assert s.health < 100


def test_memory_pressure_against_the_device_limit_when_no_budget_is_set():
    """Without memory_budget_mb the observation's memory_limit_mb is the limit; 0 (unknown, as in
    logs written before it existed) finds nothing; a budget, when set, wins over the device."""
    series = clean_series(40, 11)
    for o in series:
        o["memory_limit_mb"] = 1000.0
    series[-1]["memory_mb"] = 950.0
    s, decisions = run(series)
    assert [(d.action, d.args["to"]) for d in decisions] == [("grad_checkpointing", "full")]
    assert "of the 1000 MB device's memory" in decisions[0].reason
    series[-1]["memory_mb"] = 850.0  # below 90 %
    assert run(series)[1] == []
    series[-1] |= {"memory_mb": 950.0, "memory_limit_mb": 0.0}
    assert run(series)[1] == []
    series[-1]["memory_limit_mb"] = 1000.0
    assert run(series, dataclasses.replace(OCFG, memory_budget_mb=2000))[1] == []


def test_overfitting_raises_weight_decay_and_imbalanced_sources_shift_the_ratio():
    series = clean_series(100, 12)
    for i, e in zip((39, 59, 79), (5.0, 5.1, 5.2), strict=True):
        series[i]["eval_loss"] = e
    s, decisions = run(series)
    assert [(d.action, d.args) for d in decisions] == [("weight_decay", {"from": 0.1, "to": 0.2})]
    series = clean_series(60, 12)
    series[29] |= {"eval_loss": 5.0, "eval_losses": {"base": 5.0, "chat": 5.0}}
    series[49] |= {"eval_loss": 4.95, "eval_losses": {"base": 5.2, "chat": 4.7}}
    s, decisions = run(series, settings=DENSE | {"mode": "interleaved"})
    assert [(d.action, d.args) for d in decisions] == [("interleave_ratio", {"from": 0.5, "to": 0.6})]


def test_cap_on_changes_per_window():
    cfg = dataclasses.replace(OCFG, cooldown=0, max_changes_per_window=2)
    series = clean_series(60, 13)
    for i in range(25, 60):
        series[i]["grad_norm"] = 200.0
    s, decisions = run(series, cfg)
    assert [d.step for d in decisions] == [26, 27]  # then capped for the rest of the window
    assert found(s, "suppressed") == 60 - 27


def test_confidence_thresholds_gate_by_level():
    """Soft needs the least confidence, hard the most (issue 18): 0.7 < 0.8 < 0.9, critical any. The
    hard findings' doubt is scaled by 1/3 so they act where they did under the old conf_hard 0.7."""
    assert (OCFG.conf_soft, OCFG.conf_medium, OCFG.conf_hard, OCFG.conf_critical) == (0.7, 0.8, 0.9, 0.0)
    series = clean_series(120, 3)
    series[79]["grad_norm"] = 120.0  # just over grad_abs: statistic 0.735, doubt / 3 -> confidence 0.91
    raw = (0.5 + 0.5 * math.log10(1.2)) ** 0.5
    (d,) = run(series)[1]
    assert d.action == "emergency_lr_cut" and d.confidence == pytest.approx(1 - (1 - raw) / 3, abs=1e-6)
    assert run(series, dataclasses.replace(OCFG, conf_hard=0.95))[1] == []
    # the raw statistic (hard_doubt_scale 1, as before issue 18) would not reach the new conf_hard
    assert run(series, dataclasses.replace(OCFG, hard_doubt_scale=1.0))[1] == []
    old = dataclasses.replace(OCFG, hard_doubt_scale=1.0, conf_hard=0.7)
    assert run(series, old)[1][0].confidence == pytest.approx(raw, abs=1e-6)


# ------------------------------------------------------------------------------- the function


def test_decide_is_pure_deterministic_and_its_state_is_plain_data():
    series = clean_series(80, 14)
    series[50]["loss"] = math.nan
    s, _ = run(series[:40], settings=MOE, expert_load=balanced())
    before = msgpack.packb(s.to_dict())
    obs = Observation(**series[40], settings=MOE, expert_load=balanced())
    a = decide(s, obs, OCFG)
    b = decide(s, obs, OCFG)
    assert msgpack.packb(s.to_dict()) == before  # the input state is untouched
    assert a[0].to_dict() == b[0].to_dict() and a[1] == b[1]
    again = OrchestratorState.from_dict(msgpack.unpackb(msgpack.packb(a[0].to_dict())))
    assert again.to_dict() == a[0].to_dict()
    with pytest.raises(ValueError):
        OrchestratorState.from_dict({"bogus": 1})


def test_settings_are_typed_and_logged_as_the_plain_dict_the_driver_always_wrote():
    obs = Observation(step=1, loss=5.0, grad_norm=1.0, lr=1e-3, settings=MOE)
    assert (
        isinstance(obs.settings, Settings) and obs.settings.top_k == 2 and obs.settings.knobs == MOE["knobs"]
    )
    logged = msgpack.unpackb(msgpack.packb(obs.to_dict()))
    assert list(logged["settings"].items()) == list(MOE.items())  # same keys, values and order
    assert Observation.from_dict(logged) == obs
    # a hand-written (or older) dict: missing keys take the defaults the policy assumed, values the
    # declared types (1 -> 1.0), and an unknown key is refused
    partial = Observation(step=1, loss=5.0, grad_norm=1.0, lr=1e-3, settings={"lr_scale": 1, "top_k": 2.0})
    assert partial.settings == Settings(top_k=2) and type(partial.settings.lr_scale) is float
    assert Settings() == Settings(lr_scale=1.0, weight_decay=0.0, micro_batch_size=1, batch_size=1,
                                  grad_checkpointing="none", num_experts=0, top_k=1, balance=None,
                                  capacity_factor=None, mod_capacity=1.0, mode="base_only",
                                  interleave_ratio=0.5, knobs={}, frozen_base=False,
                                  eval_every=0)  # fmt: skip
    with pytest.raises(ValueError, match="unexpected keys \\['lr'\\]"):
        Observation.from_dict({**logged, "settings": {**MOE, "lr": 1.0}})


def test_settings_of_a_run_config():
    knobs = {"router_temperature": torch.tensor(2.0), "aux_loss_weight": 0.5}
    moe = load_config(
        preset="debug", overrides=["--model.moe.capacity_factor=1.5", "--train.micro_batch_size=2"]
    )
    assert Settings.of(moe, knobs) == Settings(
        lr_scale=1.0, weight_decay=0.1, micro_batch_size=2, batch_size=8, grad_checkpointing="none",
        num_experts=4, top_k=2, balance="aux_loss", capacity_factor=1.5, mod_capacity=0.25,
        mode="base_only", interleave_ratio=0.5, knobs={"aux_loss_weight": 0.5, "router_temperature": 2.0},
        eval_every=50,
    )  # fmt: skip
    assert list(Settings.of(moe, knobs).knobs) == ["aux_loss_weight", "router_temperature"]  # sorted
    dense = Settings.of(load_config(preset="debug", overrides=["--model.moe.num_experts=0",
                                                               "--model.mod.enabled=false"]), {})  # fmt: skip
    assert (dense.top_k, dense.balance, dense.capacity_factor, dense.mod_capacity) == (0, None, None, None)


def test_every_finding_kind_a_detector_reports_has_a_response():
    """``RESPONSES`` is the table decide looks findings up in: a kind missing from it would raise."""
    source = inspect.getsource(detect)
    kinds = set(re.findall(r'Finding\(\s*"(\w+)"', source))
    assert len(kinds) == 24 and kinds == set(RESPONSES)
    assert set(CHRONIC) <= kinds


def test_forecast_predicts_a_power_law_and_measures_its_error():
    s, _ = run(clean_series(300, 15, noise=0.01))
    fc = s.forecast
    assert set(fc) == {"step", "target_step", "loss", "steps_to_plateau", "gain", "error"}
    truth = 4.0 + 6.0 * fc["target_step"] ** -0.5
    assert fc["loss"] == pytest.approx(truth, rel=0.03)
    # the mean error of all past forecasts, early ones (fitted on 25 points) included
    assert 0 <= fc["error"] < 0.15 and fc["steps_to_plateau"] > 0
    assert forecast(init_state(), 10, OCFG) == {}  # too little history


def test_decision_text():
    d = Decision(step=300, action="emergency_lr_cut", args={"from": 1.0, "to": 0.1}, level=3,
                 confidence=0.95, reason="grad norm 156 > 100")  # fmt: skip
    assert str(d) == "[ORCH] step 300 emergency_lr_cut 1 -> 0.1 (L3 hard, conf 0.95): grad norm 156 > 100"


# ---------------------------------------------------------------------------------- actions

TINY_MOE = [
    "--model.d_model=32", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.moe.d_expert=16",
    "--model.max_seq_len=16", "--train.seq_len=16", "--train.batch_size=4", "--train.compile=false",
    "--model.moe.capacity_factor=1.5", "--model.moe.balance=bias",
]  # fmt: skip


@pytest.fixture(scope="module")
def moe_setup():
    cfg = load_config(overrides=TINY_MOE)
    state = init_train_state(cfg)
    step = make_train_step(cfg, pad_id=-1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (4, 17), generator=g)
    batch = tree.unflatten({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state, _ = step(state, batch, default_hp(cfg.train))  # non-zero moments
    return cfg, state, batch


def D(action, **args):
    return Decision(step=7, action=action, args=args, level=2, confidence=1.0, reason="test")


def test_lr_actions_scale_the_whole_schedule(moe_setup):
    cfg, state, _ = moe_setup
    hp = default_hp(cfg.train)
    _, hp2, cfg2 = apply_decisions([D("emergency_lr_cut", **{"from": 1.0, "to": 0.1})], state, hp, cfg)
    assert cfg2.train.lr_scale == 0.1 and cfg.train.lr_scale == 1.0
    for step in (0, 5, 50, 500):
        assert lr_at(step, cfg2.train) == pytest.approx(0.1 * lr_at(step, cfg.train), rel=1e-12)
    assert hp2["lr"].item() == pytest.approx(0.1 * hp["lr"].item())


def test_add_expert_extends_params_router_and_moments(moe_setup):
    cfg, state, batch = moe_setup
    before = tree.flatten(state).copy()
    E = cfg.model.moe.num_experts
    new, hp, cfg2 = apply_decisions(
        [D("add_expert", **{"from": E, "to": E + 1})], state, default_hp(cfg.train), cfg
    )
    assert cfg2.model.moe.num_experts == E + 1
    assert tree.flatten(state).keys() == before.keys() and all(
        torch.equal(tree.flatten(state)[k], v) for k, v in before.items()
    )  # the input state is untouched
    flat = tree.flatten(new)
    for layer in range(cfg.model.n_layers):
        p = f"params.layers.{layer}.moe"
        for name, axis in (("w_gate", 0), ("w_up", 0), ("w_down", 0), ("router", 1), ("balance_bias", 0)):
            old, x = before[f"{p}.{name}"], flat[f"{p}.{name}"]
            assert x.shape[axis] == E + 1
            assert torch.equal(x.narrow(axis, 0, E), old)  # the existing experts are unchanged
            added = x.narrow(axis, E, 1)
            mean = old.mean(dim=axis, keepdim=True)
            assert (added - mean).abs().max() <= 0.011 * old.std() * 3**0.5 + 1e-7  # mean + 1 % noise
            if name != "balance_bias":
                assert not torch.equal(added, mean)
            for mom in ("opt.m", "opt.v"):
                m = flat[f"{mom}.layers.{layer}.moe.{name}"]
                assert torch.equal(m.narrow(axis, 0, E), before[f"{mom}.layers.{layer}.moe.{name}"])
                assert torch.count_nonzero(m.narrow(axis, E, 1)) == 0
    state2, m = make_train_step(cfg2, pad_id=-1)(new, batch, hp)  # it trains with E + 1 experts
    assert torch.isfinite(m["loss"]) and m["moe", "0", "load"].shape == (E + 1,)


def test_prune_expert_removes_that_expert_per_layer(moe_setup):
    cfg, state, batch = moe_setup
    E = cfg.model.moe.num_experts
    drop = [3, 0, 1, 3]  # one per MoE layer
    new, hp, cfg2 = apply_decisions(
        [D("prune_expert", **{"from": E, "to": E - 1, "experts": drop})], state, default_hp(cfg.train), cfg
    )
    assert cfg2.model.moe.num_experts == E - 1
    flat, before = tree.flatten(new), tree.flatten(state)
    for layer, e in enumerate(drop):
        keep = [i for i in range(E) if i != e]
        for kind in ("params", "opt.m", "opt.v"):
            for name, axis in (("w_up", 0), ("router", 1), ("balance_bias", 0)):
                k = f"{kind}.layers.{layer}.moe.{name}"
                assert torch.equal(flat[k], before[k].index_select(axis, torch.tensor(keep)))
    _, m = make_train_step(cfg2, pad_id=-1)(new, batch, hp)
    assert torch.isfinite(m["loss"])
    with pytest.raises(ValueError, match="4 MoE layers"):
        apply_decisions([D("prune_expert", **{"from": E, "to": E - 1, "experts": [0]})], state, hp, cfg)


def test_knob_config_and_hp_actions(moe_setup):
    cfg, state, _ = moe_setup
    hp = default_hp(cfg.train)
    ds = [
        D("set_knob", name="router_temperature", **{"from": 1.0, "to": 2.0}),
        D("capacity_factor", **{"from": 1.5, "to": 2.0}),
        D("weight_decay", **{"from": 0.1, "to": 0.2}),
        D("micro_batch", **{"from": 4, "to": 2}),
        D("grad_checkpointing", **{"from": "none", "to": "full"}),
        D("interleave_ratio", **{"from": 0.5, "to": 0.6}),
        D("rollback", to_step=3, skip_data=True),  # the driver's: nothing here
    ]
    new, hp2, cfg2 = apply_decisions(ds, state, hp, cfg)
    assert (
        new["knobs", "router_temperature"].item() == 2.0
        and state["knobs", "router_temperature"].item() == 1.0
    )
    assert cfg2.model.moe.capacity_factor == 2.0
    assert cfg2.train.weight_decay == 0.2 and hp2["weight_decay"].item() == pytest.approx(0.2)
    assert cfg2.train.micro_batch_size == 2 and cfg2.train.batch_size == 4 and cfg2.train.grad_accum == 2
    assert cfg2.train.grad_checkpointing == "full" and cfg2.data.interleave_ratio == 0.6
    assert torch.equal(
        new["params", "layers", "0", "attn", "wq"], state["params", "layers", "0", "attn", "wq"]
    )
    with pytest.raises(ValueError, match="unknown orchestrator action"):
        apply_decisions([D("bogus")], state, hp, cfg)


def test_reset_mod_router():
    cfg = load_config(overrides=["--model.mod.enabled=true", "--model.moe.num_experts=0", *TINY_MOE[:8]])
    state = init_train_state(cfg)
    state["params", "layers", "1", "mod", "router"].zero_()
    state["opt", "m", "layers", "1", "mod", "router"].fill_(1.0)
    new, _, _ = apply_decisions(
        [D("reset_mod_router", layers=[0], seed=7)], state, default_hp(cfg.train), cfg
    )
    r = new["params", "layers", "1", "mod", "router"]
    assert r.std().item() == pytest.approx(cfg.model.init_std, rel=0.3)
    assert torch.count_nonzero(new["opt", "m", "layers", "1", "mod", "router"]) == 0
    assert torch.equal(
        new["params", "layers", "3", "mod", "router"], state["params", "layers", "3", "mod", "router"]
    )


# --------------------------------------------------------------------------------- registry


def entry(name, lr, best, survived=True, injected=False, micro=8, fp=None):
    from lumina.orchestrator import registry

    cfg = load_config(overrides=["--train.steps=100"])
    fp = fp or registry.fingerprint(cfg)
    return {"step": 100, "name": name, "run_dir": f"/runs/{name}", "fingerprint": fp,
            "start": registry.start_values(cfg), "survived": survived, "injected": injected,
            "effective": {"lr": lr, "warmup_steps": 10, "micro_batch_size": micro, "steps": 100},
            "best_eval": best, "final_eval": best, "decisions": {}}  # fmt: skip


def test_registry_suggests_from_the_best_similar_successful_runs():
    from lumina.orchestrator import registry

    cfg = load_config(overrides=["--train.steps=200", "--train.lr=0.03"])
    fp, start = registry.fingerprint(cfg), registry.start_values(cfg)
    far = registry.fingerprint(load_config(overrides=["--model.d_model=1024", "--model.n_layers=24"]))
    entries = [
        entry("a", 1e-3, 6.0), entry("b", 4e-3, 5.5), entry("c", 2e-3, 5.8), entry("d", 1e-2, 7.0),
        entry("dead", 1e-5, 1.0, survived=False), entry("faulty", 1e-5, 1.0, injected=True),
        entry("other", 1e-5, 1.0, fp=far), entry("small", 3e-3, 5.9, micro=4),
    ]  # fmt: skip
    d, used = registry.suggest(entries, fp, start, OCFG)
    assert {e["name"] for e in used} == {"a", "b", "c", "d", "small"}  # similar and successful
    # the best three (b 5.5, c 5.8, small 5.9): geometric mean of 4e-3, 2e-3, 3e-3
    assert d.args["lr"] == {"from": 0.03, "to": float(f"{(4e-3 * 2e-3 * 3e-3) ** (1 / 3):.4g}")}
    assert d.args["warmup_steps"] == {"from": start["warmup_steps"], "to": 20}  # 10 % of 200
    assert d.args["micro_batch_size"] == {"from": 8, "to": 4}
    assert d.action == "suggest" and d.step == 0 and "5 similar successful" in d.reason
    assert registry.suggest(used, fp, start, OCFG)[0] == d  # the stored entries re-derive it
    assert registry.suggest(entries[:1], fp, start, OCFG) == (None, [])  # fewer than registry_min_runs
    new = registry.apply_suggestion(d, cfg)
    assert (new.train.lr, new.train.warmup_steps, new.train.micro_batch_size) == (d.args["lr"]["to"], 20, 4)


def test_rollbacks_skip_the_cooldown_but_have_their_own_cap():
    series = clean_series(120, 17)
    for i in (60, 63, 66, 69):
        series[i]["loss"] = 20.0  # four big spikes, 3 steps apart (the series does not really roll back)
    s, decisions = run(series)
    rb = [d for d in decisions if d.action == "rollback"]
    assert [d.step for d in rb] == [61, 64, 67]  # the 4th exceeds max_rollbacks_per_window
    assert found(s, "suppressed") >= 1


# ------------------------------------------------------------------------ LR too low, forecast


def steady_series(n, seed, noise=0.02, lr=lambda t: 1e-3):
    """A too low LR: the loss falls 0.05 a step in a straight line (noise 0.02), grad norms ~1.5."""
    rng = random.Random(seed)
    return [dict(step=t, loss=10.0 - 0.05 * t + rng.gauss(0, noise), grad_norm=1.5 + 0.05 * rng.gauss(0, 1),
                 lr=lr(t)) for t in range(1, n + 1)]  # fmt: skip


def run_applied(series, cfg=OCFG, settings=DENSE, **extra):
    """``run``, but LR-scale and eval decisions take effect: later observations carry the new settings
    (and the LR scaled by the new scale), as in a real run."""
    s, decisions, now = init_state(0), [], dict(settings)
    for o in series:
        o = {**o, "lr": o["lr"] * now["lr_scale"]}
        s, ds = decide(s, Observation(**{"settings": now, **extra, **o}), cfg)
        decisions += ds
        for d in ds:
            if d.action in (*LR_ACTIONS, "eval_every"):
                now = {**now, d.action if d.action == "eval_every" else "lr_scale": d.args["to"]}
    return s, decisions


def test_lr_too_low_raises_the_lr_scale_step_by_step_to_its_bound():
    """Warm-up ends after observation 20; from 21 the 20 newest observations fit a line falling 0.95
    at ~47x its noise, halves equally fast, -dloss/dln(step) ~0.11 of the loss: a finding (confidence
    0.80 >= 0.7) at 21, 22, 23 -> patience 3 raises x2 at 23. The next 20 observations show the new
    scale (by 43), and the cooldown (25) holds it to 48; likewise 73, and at 98 the bound 10."""
    s, decisions = run_applied(steady_series(130, 0))
    assert [(d.step, d.action, d.args, d.level) for d in decisions] == [
        (23, "lr_scale", {"from": 1.0, "to": 2.0}, 1), (48, "lr_scale", {"from": 2.0, "to": 4.0}, 1),
        (73, "lr_scale", {"from": 4.0, "to": 8.0}, 1), (98, "lr_scale", {"from": 8.0, "to": 10.0}, 1),
    ]  # fmt: skip
    assert decisions[0].reason.startswith("loss falls slowly and steadily: ")
    assert "(3 observations in a row)" in decisions[0].reason and decisions[0].confidence >= OCFG.conf_soft
    assert s.health == 100 and s.lr_ceiling is None  # an opportunity, not trouble
    assert s.snapshots == [100, 110, 120]  # a raise does not spoil the snapshot of its step
    # the bound: lr_raise_max; lr_raise_factor=1 (as before issue 18): no raise at all
    assert (
        run_applied(steady_series(60, 0), dataclasses.replace(OCFG, lr_raise_max=1.5))[1][0].args["to"] == 1.5
    )
    s, decisions = run_applied(steady_series(130, 0), dataclasses.replace(OCFG, lr_raise_factor=1.0))
    assert decisions == [] and found(s, "lr_too_low") == 0
    # during the LR warm-up (rising to step 40) nothing counts: 20 observations from the peak, 3 in a row
    warm = steady_series(80, 0, lr=lambda t: 1e-3 * min(1.0, t / 40))
    assert [d.step for d in run_applied(warm)[1]] == [61]
    # a healthy power law 4 + 6/sqrt(t) with little noise (0.002): smooth, and by step ~120 straight
    # enough over 50 observations (halves 0.7x as fast), but late on its curve: -dloss/dln(step) < 0.1
    rng = random.Random(0)
    smooth = [dict(step=t, loss=4 + 6 * t**-0.5 + rng.gauss(0, 0.002), grad_norm=1.0, lr=1e-3)
              for t in range(1, 300)]  # fmt: skip
    assert found(run_applied(smooth)[0], "lr_too_low") == 0
    assert found(run_applied(smooth, dataclasses.replace(OCFG, lr_low_elasticity=0))[0], "lr_too_low") > 0
    # noise 0.3: the fall is ~3x the noise, not steady enough to tell
    s, decisions = run_applied(steady_series(130, 0, noise=0.3))
    assert decisions == [] and found(s, "lr_too_low") == 0


def test_an_overshooting_first_update_without_warm_up_cuts_the_lr_once():
    """The grad norm x4 from step 1 to step 2 at a constant LR: the first update overshot, so at step 2
    the LR scale is cut x overshoot_lr_factor (0.5), soft, confidence _conf(4) = 0.80, the decision
    naming its cause (its own evidence label). Nothing when: the LR warms up (step 2's LR above step
    1's), the ratio is under overshoot_ratio (3), overshoot_ratio is 0 (logs before it), the same jump
    comes later in the run, or the run was observed from step 2 on (a resumed run)."""

    def series(g2, lr=lambda t: 1e-3, g1=1.0, start=1):
        out = steady_series(40, 0, lr=lr)[start - 1 :]
        out[0]["grad_norm"], out[1]["grad_norm"] = g1, g2
        return out

    no_raise = dataclasses.replace(OCFG, lr_raise_factor=1.0)  # the steady series alone would raise it
    s, decisions = run_applied(series(4.0), no_raise)
    assert [(d.step, d.action, d.args, d.level) for d in decisions] == [
        (2, "lr_scale", {"from": 1.0, "to": 0.5, "cause": "lr_overshoot"}, 1)]  # fmt: skip
    d = decisions[0]
    assert d.label == "lr_scale:lr_overshoot-" and d.confidence == pytest.approx(0.5 + 0.5 * math.log10(4))
    assert d.reason.startswith("the first update overshot: grad norm 1 -> 4 (x4.00 > 3)")
    assert found(s, "lr_overshoot") == 1 and s.lr_ceiling == 0.5  # a cut: no raise above it later
    # x 0.25 by the factor; x 2.9 is under the threshold; the warm-up; off
    quarter = dataclasses.replace(no_raise, overshoot_lr_factor=0.25)
    assert run_applied(series(4.0), quarter)[1][0].args["to"] == 0.25
    assert run_applied(series(2.9), no_raise)[1] == []
    assert run_applied(series(4.0, lr=lambda t: 1e-3 * min(1.0, t / 10)), no_raise)[1] == []
    assert run_applied(series(4.0), dataclasses.replace(no_raise, overshoot_ratio=0))[1] == []
    late = steady_series(40, 0)
    late[20]["grad_norm"], late[21]["grad_norm"] = 1.0, 4.0
    assert run_applied(late, no_raise)[1] == []
    assert run_applied(series(4.0, start=2), no_raise)[1] == []
    # the shipped evidence for other LR cuts does not hold it; an entry of its own does
    gate = dataclasses.replace(no_raise, evidence=("lr_scale-=0/5",))
    assert [x.label for x in run_applied(series(4.0), gate)[1]] == ["lr_scale:lr_overshoot-"]
    shipped = run_applied(series(4.0), dataclasses.replace(OrchestratorConfig(), lr_raise_factor=1.0))[1]
    assert [x.label for x in shipped] == ["lr_scale:lr_overshoot-"]  # ACTION_EVIDENCE lets it act
    gate = dataclasses.replace(no_raise, evidence=("lr_scale:lr_overshoot-=1/5",))
    s, decisions = run_applied(series(4.0), gate)
    assert decisions == [] and s.counters["held_by_evidence"] == 1
    with pytest.raises(ConfigError, match="overshoot_ratio must be > 1"):
        OrchestratorConfig(overshoot_ratio=0.5)


def test_after_an_lr_cut_or_a_rollback_the_lr_is_never_raised_again():
    """Memory against ping-pong: the cut (or rollback) caps the LR scale where it left it; a cut
    right after a raise does not wait for the raise's cooldown."""
    series = steady_series(130, 1)
    series[29]["loss"] = 40.0  # step 30, after the raise at 23: a big spike -> rollback to 20
    s, decisions = run_applied(series)
    assert [(d.step, d.action) for d in decisions] == [(23, "lr_scale"), (30, "rollback")]
    assert s.lr_ceiling == 2.0 and found(s, "lr_too_low") > 50  # still found, never acted on
    series = steady_series(130, 1)
    for i in (29, 39):  # two spikes (x1.55: z ~9-10 on the falling loss, < 50 % above the median)
        series[i]["loss"] *= 1.55
    s, decisions = run_applied(series)
    assert [(d.step, d.args["to"]) for d in decisions if d.action == "lr_scale"] == [(23, 2.0), (40, 1.0)]
    assert len(decisions) == 2 and s.lr_ceiling == 1.0 and "second spike" in decisions[1].reason
    series = steady_series(130, 1)
    series[34]["grad_norm"] = 500.0  # an explosion after the raise: an emergency cut, undone after 20
    s, decisions = run_applied(series)  # quiet observations, to the scale the trouble came at: no higher
    got = [(d.step, d.action, d.args["to"]) for d in decisions]
    assert got == [
        (23, "lr_scale", 2.0), (35, "emergency_lr_cut", 0.2), (55, "emergency_lr_restore", 2.0)]  # fmt: skip
    assert s.lr_ceiling == 2.0 and found(s, "lr_too_low") > 50
    s, decisions = run_applied(series, dataclasses.replace(OCFG, emergency_recover=0))
    assert [(d.step, d.action, d.args["to"]) for d in decisions] == got[:2] and s.lr_ceiling == 0.2


def converging_series(n):
    """A decelerating fall from 9.5 to 5 by step 20, then a log-curve 5 - 0.01 ln(t / 20)."""
    return [
        dict(step=t, loss=5 + 5 * (1 - t / 20) ** 2 if t <= 20 else 5 - 0.01 * math.log(t / 20),
             grad_norm=1.0, lr=1e-3)
        for t in range(1, n + 1)
    ]  # fmt: skip


def test_near_convergence_eases_the_lr_and_evaluates_more_often_once():
    """Forecasts come every 25 observations: at 50 the window (steps 1-50) holds the fall (gain >> 0.5
    %); at 75 it is the log-curve alone (26-75): gain 0.01 ln(175 / 75) / 4.991 = 0.17 % < 0.5 %."""
    s, decisions = run_applied(converging_series(140), settings=DENSE | {"eval_every": 50})
    assert [(d.step, d.action, d.args) for d in decisions] == [
        (75, "lr_scale", {"from": 1.0, "to": 0.5}), (75, "eval_every", {"from": 50, "to": 25}),
    ]  # fmt: skip
    assert "near convergence: the forecast gains 0.17% of the loss" in decisions[0].reason
    assert s.converging_at == 75 and found(s, "near_convergence") == 1 and s.health == 100
    # without evaluations only the LR; forecast_ease_rel=0 (before issue 18): nothing
    assert [d.action for d in run_applied(converging_series(140))[1]] == ["lr_scale"]
    assert run_applied(converging_series(140), dataclasses.replace(OCFG, forecast_ease_rel=0.0))[1] == []
    # a loss flat from the start is not converging (the plateau detector answers that)
    flat = [dict(step=t, loss=3.0, grad_norm=1.0, lr=1e-3) for t in range(1, 200)]
    assert found(run(flat)[0], "near_convergence") == 0


def test_eval_every_and_lr_raise_actions(moe_setup):
    cfg, state, _ = moe_setup
    hp = default_hp(cfg.train)
    _, _, cfg2 = apply_decisions([D("eval_every", **{"from": 50, "to": 25})], state, hp, cfg)
    assert cfg2.train.eval_every == 25 and cfg.train.eval_every != 25
    _, hp2, cfg3 = apply_decisions([D("lr_scale", **{"from": 1.0, "to": 2.0})], state, hp, cfg)
    assert cfg3.train.lr_scale == 2.0 and hp2["lr"].item() == pytest.approx(2 * hp["lr"].item())


def test_evidence_caps_an_actions_confidence_by_its_measured_record():
    """OrchestratorConfig.evidence: an action measured to help in K of N paired benchmark runs acts at
    min(its finding's confidence, (K + 1) / (N + 2)); below its level's threshold it is held back (the
    finding is still recorded); labels tell a raise from a cut; hard and critical findings' actions
    keep their finding's confidence; a malformed entry is one ConfigError line."""
    from lumina.orchestrator import action_label

    assert action_label("lr_scale", {"from": 1.0, "to": 2.0}) == "lr_scale+"
    assert action_label("lr_scale", {"from": 1.0, "to": 0.5}) == "lr_scale-"
    assert action_label("set_knob", {"name": "aux_loss_weight", "from": 0.01, "to": 0.02}) == (
        "set_knob:aux_loss_weight+"
    )
    assert action_label("rollback", {"to_step": 8, "skip_data": False}) == "rollback"
    series = steady_series(60, 0)
    base = run_applied(series, dataclasses.replace(OCFG, evidence=()))[1]
    assert [d.step for d in base] == [23, 48] and all(d.label == "lr_scale+" for d in base)
    good = run_applied(series, dataclasses.replace(OCFG, evidence=("lr_scale+=5/5", "lr_scale-=0/5")))[1]
    assert [(d.step, d.args) for d in good] == [(d.step, d.args) for d in base]
    assert [d.confidence for d in good] == pytest.approx([min(b.confidence, 6 / 7) for b in base], abs=1e-6)
    assert any(b.confidence > 6 / 7 for b in base)  # the cap bites
    assert good[0].reason.endswith("; evidence: improved 5 of 5 benchmark runs")
    s, held = run_applied(series, dataclasses.replace(OCFG, evidence=("lr_scale+=0/4",)))  # 1/6 < 0.7
    assert held == [] and found(s, "lr_too_low") > 0 and found(s, "held_by_evidence") > 0
    bad = clean_series(40, 0)
    bad[29]["loss"] = float("nan")
    (d,) = run(bad, dataclasses.replace(OCFG, evidence=("rollback=0/9",)))[1]
    assert d.action == "rollback" and d.level == 4 and d.confidence == 1.0 and "evidence" not in d.reason
    spike = clean_series(120, 3)
    spike[79]["grad_norm"] = 120.0  # a hard finding (as in test_confidence_thresholds_gate_by_level)
    (d,) = run(spike, dataclasses.replace(OCFG, evidence=("emergency_lr_cut-=0/9",)))[1]
    assert d.action == "emergency_lr_cut" and d.level == 3 and d.confidence > OCFG.conf_hard
    # the shipped table (ACTION_EVIDENCE): lowering the MoD capacity of a run whose routed blocks
    # look unused did not help in most measured runs, so the default holds it back
    from lumina.config import ACTION_EVIDENCE

    shipped = OrchestratorConfig(slack_patience=10)
    assert shipped.evidence == ACTION_EVIDENCE and any(
        e.startswith("mod_capacity-=") for e in ACTION_EVIDENCE
    )
    k, n = next(
        map(int, e.split("=")[1].split("/")) for e in ACTION_EVIDENCE if e.startswith("mod_capacity-=")
    )
    low = {
        "settings": DENSE | {"mod_capacity": 0.25},
        "mod_weight": [0.05, 0.02],
        "mod_score_std": [4.0, 9.0],
    }
    s, decisions = run(clean_series(60, 10), shipped, **low)
    if (k + 1) / (n + 2) < shipped.conf_soft:
        assert decisions == [] and found(s, "mod_underused") == 40 and found(s, "held_by_evidence") > 0
    else:
        assert [d.action for d in decisions] == ["mod_capacity", "mod_capacity"]
    for entry in ("lr_scale+=6/5", "lr_scale+=1/0", "lr scale=1/2", "lr_scale+"):
        with pytest.raises(ConfigError, match="evidence entry"):
            OrchestratorConfig(evidence=(entry,))
