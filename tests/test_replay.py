"""``replay`` and ``--what-if`` on a run folder built from the orchestrator's own functions (no
training: an observation series with a NaN and a gradient blow-up gives a rollback and an LR cut)."""

import dataclasses
import json
import math

import pytest

from lumina import orchestrator
from lumina.config import OrchestratorConfig, to_dict
from lumina.orchestrator import Observation, decide, init_state
from lumina.orchestrator.replay import describe, replay
from lumina.run import main

SETTINGS = {"lr_scale": 1.0, "weight_decay": 0.1, "micro_batch_size": 2, "batch_size": 4,
            "grad_checkpointing": "none", "num_experts": 0, "top_k": 0, "balance": None,
            "capacity_factor": None, "mod_capacity": None, "mode": "base_only", "interleave_ratio": 0.5,
            "knobs": {"aux_loss_weight": 0.01}}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as the driver leaves it: config.json and the two logs."""
    cfg = OrchestratorConfig()
    (tmp_path / "config.json").write_text(json.dumps({"orchestrator": to_dict(cfg)}))
    s = init_state(0)
    for t in range(1, 9):
        loss = math.nan if t == 4 else 5.0 - 0.1 * t
        obs = Observation(step=t, loss=loss, grad_norm=1e4 if t == 7 else 1.0, lr=1e-3, settings=SETTINGS)
        s, ds = decide(s, obs, cfg)
        orchestrator.append_log(tmp_path / orchestrator.OBSERVATIONS_FILE, [obs.to_dict()])
        orchestrator.append_log(tmp_path / orchestrator.DECISIONS_FILE, [d.to_dict() for d in ds])
    return tmp_path


def logged(run_dir):
    return list(orchestrator.read_log(run_dir / orchestrator.DECISIONS_FILE))


def test_the_fixture_run_replays_identically(run_dir, capsys):
    assert [d["action"] for d in logged(run_dir)] == ["rollback", "emergency_lr_cut"]
    assert replay(run_dir).identical
    assert main(["replay", str(run_dir)]) == 0
    assert "8 observations -> 2 decisions, identical to the log" in capsys.readouterr().out


def test_what_if_the_orchestrator_were_off_every_logged_decision_differs(run_dir, capsys):
    """With ``enabled=false`` no decision would have been taken: all the logged ones are listed."""
    r = replay(run_dir, ["orchestrator.enabled=false"])
    assert r.derived == [] and len(r.logged) == 2
    assert main(["replay", str(run_dir), "--what-if", "orchestrator.enabled=false"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[replay] 8 observations; logged 2 decisions, what-if 0; 2 differ"
    assert out[1:] == [f"- {describe(d)}" for d in logged(run_dir)]
    # and switching it back on is the logged run again
    assert replay(run_dir, ["orchestrator.enabled=false", "orchestrator.enabled=true"]).identical


@pytest.mark.parametrize(
    ("what_if", "problem"),
    [
        ("orchestrator.window=abc", "expected an integer, got 'abc'"),
        ("orchestrator.nosuch=1", "unknown key 'nosuch'"),
        ("bogus", "expected orchestrator.KEY=VALUE"),
        ("orchestrator.grad_abs=-1", "grad_abs must be > 0"),  # a check in OrchestratorConfig
        ("orchestrator.conf_soft=2", "conf_soft must be in [0, 1]"),
        ("train.lr=1", "only orchestrator.KEY=VALUE"),  # a replay cannot change the training
    ],
)
def test_a_bad_what_if_is_one_line_naming_the_flag_and_its_value(run_dir, capsys, what_if, problem):
    assert main(["replay", str(run_dir), "--what-if", what_if]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and captured.out == "", captured
    assert err[0].startswith(f"lumina: error: --what-if {what_if}: "), err[0]
    assert problem in err[0], err[0]


def test_a_bad_what_if_among_good_ones_is_the_one_named(run_dir, capsys):
    args = ["--what-if", "orchestrator.window=20", "--what-if", "orchestrator.grad_abs=0", "--what-if",
            "orchestrator.cooldown=3"]  # fmt: skip
    assert main(["replay", str(run_dir), *args]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("lumina: error: --what-if orchestrator.grad_abs=0: grad_abs must be > 0"), err


def test_a_config_json_written_before_a_field_existed_replays_as_the_orchestrator_did_then(tmp_path):
    """A steady slow descent draws LR raises today; a run folder whose config.json predates the
    fields of issue 18 was decided without them, and replay fills them in from ORCHESTRATOR_BEFORE
    (raises off, raw hard confidences, no forecast actions), so its logs still replay exactly."""
    from lumina.config import ORCHESTRATOR_BEFORE

    old = dataclasses.replace(OrchestratorConfig(), **ORCHESTRATOR_BEFORE)
    section = {k: v for k, v in to_dict(old).items() if k not in ORCHESTRATOR_BEFORE}
    (tmp_path / "config.json").write_text(json.dumps({"orchestrator": section}))
    s = init_state(0)
    for t in range(1, 61):
        obs = Observation(step=t, loss=10.0 - 0.05 * t + 0.02 * (-1) ** t, grad_norm=1.0, lr=1e-3,
                          settings=SETTINGS)  # fmt: skip
        s, ds = decide(s, obs, old)
        orchestrator.append_log(tmp_path / orchestrator.OBSERVATIONS_FILE, [obs.to_dict()])
        orchestrator.append_log(tmp_path / orchestrator.DECISIONS_FILE, [d.to_dict() for d in ds])
    assert logged(tmp_path) == [] and replay(tmp_path).identical
    now = replay(tmp_path, ["orchestrator.lr_raise_factor=2"])  # today's default
    raises = [(d["step"], d["action"], d["args"]["to"]) for d in now.derived]
    assert raises == [(23, "lr_scale", 2.0), (48, "lr_scale", 2.0)]  # (the logged settings stay at 1)
