"""The orchestrator inside real (tiny) training runs: fault injection, rollback, OOM response, replay
and what-if on the logged observations, and the acceptance command on the debug preset."""

import json
import math
import os
import signal

import msgpack
import pytest
import torch
from test_run import TINY, records

from lumina import checkpoint, loop, orchestrator, tree
from lumina.config import ConfigError
from lumina.configure import load_config
from lumina.driver import prepare
from lumina.inject import Injector, parse
from lumina.optim import lr_at
from lumina.orchestrator.detect import Finding
from lumina.orchestrator.policy import RESPONSES
from lumina.orchestrator.replay import replay
from lumina.run import main
from lumina.step import init_train_state

SNAP = ["--orchestrator.snapshot_every=2", "--train.eval_batches=0"]  # (no evals: faster)
# the findings' confidence alone, no evidence table (a test of a detector's action on a real run;
# the table's gate: tests/test_orchestrator.py)
RAW = ["--orchestrator.evidence="]


def decisions(run_dir):
    return list(orchestrator.read_log(run_dir / orchestrator.DECISIONS_FILE))


def stopped_at(cfg, stop: int) -> None:
    """Train ``cfg`` and stop it after step ``stop`` as an exception would: a step hook raising
    KeyboardInterrupt (between the step's decisions and their application)."""

    def hook(step, state, record):
        if step == stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, step_hook=hook)


def test_nan_grad_rolls_back_to_the_exact_snapshot_and_skips_the_batch(tmp_path, monkeypatch):
    """A NaN at step 9 -> rollback to the snapshot of step 6 (newest <= 9 - 2, every 2 steps kept):
    the state fed to the next step is bit for bit the state after step 6, except the data position,
    which goes on after the offending batch."""
    fed, after = [], {}
    real = prepare.make_train_step

    def spy_make(cfg, pad_id):
        step = real(cfg, pad_id)

        def spying(state, batch, hp):
            fed.append(state.clone())
            return step(state, batch, hp)

        return spying

    monkeypatch.setattr(prepare, "make_train_step", spy_make)
    cfg = load_config(overrides=["--train.steps=12", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--train.inject=nan_grad@9"])  # fmt: skip

    def hook(step, state, record):
        after.setdefault(step, state.clone())  # the first pass through each step

    result = loop.train(cfg, step_hook=hook)
    run = result.run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"]) for d in ds] == [
        (9, "rollback", {"to_step": 6, "skip_data": True})
    ]
    assert ds[0]["level"] == 4 and "non-finite loss" in ds[0]["reason"]
    train = records(run, "train")
    assert [r["step"] for r in train] == [*range(1, 10), *range(7, 13)]
    assert math.isnan(train[8]["loss"]) and all(math.isfinite(r["loss"]) for r in train[9:])
    events = [r for r in records(run) if r["kind"] == "event"]
    assert any(e["what"] == "rollback" and "snapshot at step 6" in e["detail"] for e in events)
    assert any(e["what"] == "inject" and e["detail"] == "nan_grad@9" for e in events)
    # fed[9] is the first step after the rollback (fed[0..8] were steps 1..9)
    restored, snap = tree.flatten(fed[9]), tree.flatten(after[6])
    for k, v in snap.items():
        if not k.startswith("data."):
            assert torch.equal(restored[k], v), k
    assert int(fed[9]["step"]) == 6
    assert (
        int(fed[9]["data", "step"]) == 18
    )  # steps 7..9's micro-batches (2 a step, the bad one's too) skipped
    assert torch.isfinite(tree.flatten(fed[-1])["params.final_norm.weight"]).all()
    # the decisions replay bit for bit from the observation log
    r = replay(run)
    assert r.identical and r.observations == 15 and len(r.derived) == 1


def test_without_the_orchestrator_the_nan_stays(tmp_path):
    cfg = load_config(overrides=["--train.steps=6", f"--run_dir={tmp_path}", *TINY,
                                 "--train.inject=nan_grad@3", "--orchestrator.enabled=false"])  # fmt: skip
    run = loop.train(cfg).run_dir
    assert all(math.isnan(r["loss"]) for r in records(run, "train")[2:])
    assert not (run / orchestrator.OBSERVATIONS_FILE).exists()


def test_injected_oom_halves_the_micro_batch_and_keeps_the_batch(tmp_path, capsys):
    args = ["--steps", "4", "--run-dir", str(tmp_path), *TINY, "--inject", "oom@micro_batch>1"]
    assert main(args) == 0
    run = tmp_path / "debug"
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"], d["level"]) for d in ds] == [
        (1, "micro_batch", {"from": 2, "to": 1}, 4)
    ]
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {r["tokens_per_s"] > 0 for r in train} == {True}
    meta = checkpoint.read_meta(run / "checkpoints" / "step_00000004")
    assert meta["config"]["train"]["micro_batch_size"] == 1 and meta["config"]["train"]["batch_size"] == 4
    assert meta["data"]["step"] == 16  # 4 steps x 4 micro-batches of 1 sequence
    assert "[ORCH] step 1 micro_batch 2 -> 1" in capsys.readouterr().out
    assert replay(run).identical
    # orchestrator off: the OOM ends the run with one line and exit 1
    off = [*args, "--orchestrator.enabled=false", "--run-dir", str(tmp_path / "off")]
    assert main(off) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lumina: out of memory at step 1")


def test_what_if_lists_the_decisions_that_change_with_a_threshold(tmp_path, capsys):
    cfg = load_config(overrides=["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--train.inject=nan_grad@5"])  # fmt: skip
    run = loop.train(cfg).run_dir
    capsys.readouterr()
    assert main(["replay", str(run)]) == 0
    assert "identical to the log" in capsys.readouterr().out
    # a lower absolute gradient threshold would have cut the LR (every step's norm exceeds 1e-3)
    assert main(["replay", str(run), "--what-if", "orchestrator.grad_abs=0.001"]) == 0
    out = capsys.readouterr().out
    assert "+ [ORCH] step 1 emergency_lr_cut 1 -> 0.1" in out and "differ" in out
    assert main(["replay", str(run), "--what-if", "orchestrator.grad_abs=0.001",
                 "--what-if", "orchestrator.enabled=true"]) == 0  # fmt: skip
    # a tampered decision log is caught: exit 1 and the first divergent decision
    log = run / orchestrator.DECISIONS_FILE
    ds = decisions(run)
    ds[0]["args"]["to_step"] = 0
    log.unlink()
    orchestrator.append_log(log, ds)
    assert main(["replay", str(run)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH at decision #0" in out and "to_step=0" in out and "to_step=2" in out
    # bad input: one line, exit 2
    assert main(["replay", str(tmp_path / "nope")]) == 2
    assert main(["replay", str(run), "--what-if", "orchestrator.grad_abs=-1"]) == 2
    log.write_bytes(log.read_bytes()[:-3])
    assert main(["replay", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("lumina: error:") for line in err)
    assert "truncated" in err[2] or "corrupt" in err[2]


def test_resume_carries_the_orchestrator_state_and_replay_spans_it(tmp_path):
    overrides = ["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP, "--train.inject=nan_grad@6"]
    stopped_at(load_config(overrides=overrides), 4)
    run = tmp_path / "debug"
    with open(run / orchestrator.OBSERVATIONS_FILE, "ab") as f:  # a kill -9 in the middle of a record
        f.write(msgpack.packb({"step": 5, "loss": 1.0, "settings": {}})[:-4])
    assert main(["--resume", "latest", "--run-dir", str(tmp_path)]) == 0
    assert [d["action"] for d in decisions(run)] == ["rollback"]  # the fault still fires after resuming
    r = replay(run)
    assert r.identical and r.observations == 8 + 2  # 8 steps + the two re-run after the rollback


# ------------------------------------------------------------------------------- injection


def test_fault_specs_parse_and_bad_ones_are_one_line_errors():
    f = parse(["lr_spike@200x50:10", "oom@micro_batch>4", "expert_collapse@0"])
    assert (f[0].kind, f[0].step, f[0].factor, f[0].steps) == ("lr_spike", 200, 50.0, 10)
    assert (f[1].kind, f[1].step, f[1].micro_batch_above) == ("oom", None, 4)
    assert f[2].step == 0
    for bad in ("nan_grad", "nan_grad@x", "boom@3", "nan_grad@3x2", "bad_batch@micro_batch>2", "nan_grad@0"):
        with pytest.raises(ConfigError, match="train.inject"):
            parse([bad])


def test_a_bad_fault_spec_exits_2_and_writes_nothing(tmp_path, capsys):
    assert main(["--steps", "2", "--run-dir", str(tmp_path), "--inject", "boom@1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.inject: 'boom@1'" in err[0]
    assert list(tmp_path.iterdir()) == []  # no half-made run folder


def test_each_fault_changes_what_the_step_is_fed():
    cfg = load_config(overrides=[*TINY, "--model.mod.enabled=true"])
    state = init_train_state(cfg)
    batch = tree.unflatten(
        {"inputs": torch.zeros(4, 32, dtype=torch.long), "targets": torch.zeros(4, 32, dtype=torch.long)}
    )
    hp = tree.unflatten({"lr": torch.tensor(1e-3)})
    specs = [
        "nan_grad@2",
        "loss_spike@3",
        "bad_batch@4",
        "expert_collapse@0",
        "mod_collapse@5",
        "lr_spike@6x10:2",
    ]
    inj = Injector(specs)
    s1, b1, h1, fired = inj.before_step(1, state, batch, hp, cfg, 1000)
    assert fired == ["expert_collapse@0"]
    router = s1["params", "layers", "0", "moe", "router"]
    assert torch.equal(router, router[:, :1].expand_as(router))
    s2, *_ = inj.before_step(2, state, batch, hp, cfg, 1000)
    assert math.isnan(s2["params", "final_norm", "weight"][0].item())
    assert torch.isfinite(state["params", "final_norm", "weight"]).all()  # the real state is untouched
    s3, *_ = inj.before_step(3, state, batch, hp, cfg, 1000)
    w, w0 = s3["params", "layers", "0", "attn", "wq"], state["params", "layers", "0", "attn", "wq"]
    rel = ((w - w0).pow(2).mean().sqrt() / w0.pow(2).mean().sqrt()).item()
    assert rel == pytest.approx(0.3, rel=0.1)
    _, b4, *_ = inj.before_step(4, state, batch, hp, cfg, 1000)
    assert b4["inputs"].shape == (4, 32) and b4["inputs"].unique().numel() > 100
    assert int(b4["inputs"].max()) < 1000
    s5, *_ = inj.before_step(5, state, batch, hp, cfg, 1000)
    assert torch.count_nonzero(s5["params", "layers", "1", "mod", "router"]) == 0
    lrs = [inj.before_step(n, state, batch, hp, cfg, 1000)[2]["lr"].item() for n in (6, 7, 8, 6, 7)]
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-3])  # replayed steps 6, 7 run clean
    # one-shot faults fired once: a replayed step (after a rollback) is clean
    _, _, _, fired = inj.before_step(2, state, batch, hp, cfg, 1000)
    assert fired == [] and sorted(inj.fired) == sorted(specs)


@pytest.mark.slow  # 60 steps of the debug preset: ~75 s on 2 cores (the tiny runs above check the same path)
def test_acceptance_nan_grad_on_the_debug_preset(tmp_path, capsys):
    """`python -m lumina.run --inject nan_grad@20 --steps 60` survives, logs the rollback, replays."""
    assert main(["--inject", "nan_grad@20", "--steps", "60", "--run-dir", str(tmp_path)]) == 0
    run = tmp_path / "debug"
    ds = decisions(run)
    assert ds and ds[0]["action"] == "rollback" and ds[0]["step"] == 20 and ds[0]["args"]["to_step"] == 10
    train = records(run, "train")
    assert train[-1]["step"] == 60 and math.isfinite(train[-1]["loss"])
    evals = records(run, "eval")
    assert evals[-1]["step"] == 60 and evals[-1]["loss"] < evals[0]["loss"] - 3
    capsys.readouterr()
    assert main(["replay", str(run)]) == 0


def test_registry_records_runs_and_the_next_run_gets_a_replayable_suggestion(tmp_path, capsys):
    from lumina.orchestrator import registry

    common = ["--steps", "2", "--run-dir", str(tmp_path), *TINY]
    for lr in ("1e-3", "4e-3"):
        assert main([*common, f"--train.lr={lr}", f"--name=past-{lr}"]) == 0
    entries = registry.read_registry(tmp_path / ".registry")
    assert [e["name"] for e in entries] == ["past-1e-3", "past-4e-3"]
    assert all(e["survived"] and e["effective"]["lr"] == e["start"]["lr"] for e in entries)
    capsys.readouterr()
    assert main([*common, "--train.lr=0.05", "--name=new"]) == 0  # registry_mode=log: logged only
    out = capsys.readouterr().out
    assert "[ORCH] step 0 suggest lr=0.05 -> " in out and "not applied" in out
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["train"]["lr"] == 0.05
    assert main(["replay", str(tmp_path / "new")]) == 0
    # applied: the run starts with the suggested LR
    assert main([*common, "--train.lr=0.05", "--name=applied", "--orchestrator.registry_mode=apply"]) == 0
    cfg = json.loads((tmp_path / "applied" / "config.json").read_text())
    (rec,) = orchestrator.read_log(tmp_path / "applied" / registry.SUGGESTION_FILE)
    assert len(rec["entries"]) == 3 and rec["applied"]  # the two past runs and "new"
    lrs = [e["effective"]["lr"] for e in rec["entries"]]
    assert (
        cfg["train"]["lr"]
        == rec["decision"]["args"]["lr"]["to"]
        == pytest.approx(math.prod(lrs) ** (1 / 3), rel=1e-3)
    )
    assert main(["replay", str(tmp_path / "applied")]) == 0
    # a changed suggestion record no longer replays
    path = tmp_path / "applied" / registry.SUGGESTION_FILE
    (rec,) = orchestrator.read_log(path)
    rec["entries"] = rec["entries"][:1]
    path.unlink()
    orchestrator.append_log(path, [rec])
    assert main(["replay", str(tmp_path / "applied")]) == 1


def test_memory_limits_from_cgroup_files_and_the_machine(tmp_path, monkeypatch):
    from lumina import metrics

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    v1.write_text(f"{2**63 - 4096}\n")  # cgroup v1 without a limit
    assert metrics._cpu_limit_bytes((str(v2), str(v1), str(tmp_path / "absent"))) == physical
    v2.write_text(f"{2**30}\n")
    assert metrics._cpu_limit_bytes((str(v2), str(v1))) == min(2**30, physical)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks share the machine
    monkeypatch.setattr(metrics, "_cpu_limit_bytes", lambda: 2**32)
    assert metrics.memory_limit_mb(torch.device("cpu")) == 2**31 / 2**20


def test_a_run_watches_memory_against_the_machine_without_a_budget(tmp_path):
    """The observation log carries the machine's limit; with memory_high set below what the run
    uses, memory pressure fires on a real run and turns on gradient checkpointing."""
    from lumina import metrics

    cfg = load_config(overrides=["--train.steps=3", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--orchestrator.memory_high=1e-6"])  # fmt: skip
    run = loop.train(cfg).run_dir
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    limit = metrics.memory_limit_mb(torch.device("cpu"))
    assert all(o["memory_limit_mb"] == limit > o["memory_mb"] > 0 for o in obs)
    ds = decisions(run)
    assert [(d["action"], d["args"]["to"]) for d in ds] == [("grad_checkpointing", "full")]
    assert "device's memory" in ds[0]["reason"]
    assert replay(run).identical


def test_spare_expert_and_mod_capacity_are_lowered_on_a_real_run(tmp_path):
    """A capacity factor of 4 drops nothing: after warm-up and slack_patience observations the
    orchestrator lowers it (÷ 1.25). With mod_low raised to 0.99 the MoD routers' weights (~0.5 at
    init) count as underused: the MoD capacity falls too (÷ 1.5). The run goes on with the new
    settings, and replay is exact."""
    cfg = load_config(overrides=["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--model.moe.capacity_factor=4", "--orchestrator.warmup=2",
                                 "--orchestrator.slack_patience=3", "--orchestrator.mod_high=1",
                                 "--orchestrator.mod_low=0.99", *RAW])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = [(d["step"], d["action"], d["args"]) for d in decisions(run)]
    assert ds == [(5, "capacity_factor", {"from": 4.0, "to": 3.2}),
                  (5, "mod_capacity", {"from": 0.25, "to": 0.25 / 1.5})]  # fmt: skip
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    assert [o["settings"]["capacity_factor"] for o in obs][4:6] == [4.0, 3.2]
    assert [o["settings"]["mod_capacity"] for o in obs][4:6] == [0.25, 0.25 / 1.5]
    assert all(max(o["dropped"]) < 0.01 and max(o["mod_weight"]) < 0.99 for o in obs)
    assert replay(run).identical


def test_the_shipped_evidence_table_holds_both_capacity_cuts_on_a_real_run(tmp_path):
    """The run above with the shipped evidence table: the capacity-factor cut (measured 2/4:
    confidence 3/6 < soft 0.7) and the MoD capacity cut (8/12: 9/14) are held and counted, so the
    run takes no decision. What-if with the table off gives both back; with a table in which the
    capacity-factor cut improved 4 of 5 runs (5/7 >= 0.7) it acts, at that confidence, saying why."""
    cfg = load_config(overrides=["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--model.moe.capacity_factor=4", "--orchestrator.warmup=2",
                                 "--orchestrator.slack_patience=3", "--orchestrator.mod_high=1",
                                 "--orchestrator.mod_low=0.99"])  # fmt: skip
    run = loop.train(cfg).run_dir
    assert decisions(run) == []
    assert replay(run).identical
    s = orchestrator.init_state(0)
    for o in orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE):
        s, _ = orchestrator.decide(s, orchestrator.Observation.from_dict(o), cfg.orchestrator)
    assert s.counters["held_by_evidence"] >= 2 and s.counters.get("action:capacity_factor", 0) == 0
    off = replay(run, ["orchestrator.evidence="])
    assert [(d["step"], d["action"]) for d in off.derived] == [(5, "capacity_factor"), (5, "mod_capacity")]
    better = replay(run, ["orchestrator.evidence=capacity_factor-=4/5,mod_capacity-=8/12"])
    assert [(d["step"], d["action"], d["confidence"]) for d in better.derived] == [
        (5, "capacity_factor", pytest.approx(5 / 7, abs=1e-6))]  # fmt: skip
    assert better.derived[0]["reason"].endswith("; evidence: improved 4 of 5 benchmark runs")


def test_gradient_explosions_cut_the_lr_once_on_a_real_run(tmp_path):
    """With grad_abs far below any real gradient norm every step is an explosion: the first cuts the
    LR x0.1, to the floor, and none after it does. The run trains on at 0.1 x the LR. What-if with
    the floor at 0 (as before it existed): the logged observations, at 0.1 from step 2, get a cut
    below it at steps 2 and 3, until the change cap (3 per window)."""
    cfg = load_config(overrides=["--train.steps=6", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--orchestrator.grad_abs=1e-6", "--orchestrator.cooldown=0"])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"], d["level"]) for d in ds] == [
        (1, "emergency_lr_cut", {"from": 1.0, "to": 0.1}, 3)]  # fmt: skip
    train = records(run, "train")
    assert [r["lr"] for r in train][1:] == pytest.approx([0.1 * lr_at(k, cfg.train) for k in range(1, 6)])
    assert replay(run).identical
    before = replay(run, ["orchestrator.emergency_lr_floor=0"])
    assert [(d["step"], d["args"]["to"]) for d in before.derived] == [
        (1, 0.1), (2, pytest.approx(0.01)), (3, pytest.approx(0.01))]  # fmt: skip


def test_an_overshooting_first_update_cuts_the_lr_once_on_a_real_run(tmp_path):
    """LR 3e-2 from the first step (no warm-up) on this model: the grad norm goes 0.83 -> 4.0 from
    step 1 to step 2 (x4.8 > 3) -> the LR scale x0.5 at step 2, and steps 3-5 train at half the
    schedule's LR. The same LR with a 2-step warm-up: the first update is small, no decision. Replay
    is exact; what-if overshoot_ratio=0 (before the detector): no decision."""
    common = ["--train.steps=5", f"--run_dir={tmp_path}", *TINY, *SNAP, *RAW, "--train.lr=3e-2"]
    cfg = load_config(overrides=[*common, "--train.warmup_steps=0"])
    run = loop.train(cfg).run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"], d["level"]) for d in ds] == [
        (2, "lr_scale", {"from": 1.0, "to": 0.5, "cause": "lr_overshoot"}, 1)]  # fmt: skip
    assert ds[0]["reason"].startswith("the first update overshot: grad norm 0.828 -> 4 (x4.84 > 3)")
    train = records(run, "train")
    assert [r["lr"] for r in train] == pytest.approx(
        [lr_at(k, cfg.train) * (1.0 if k < 2 else 0.5) for k in range(5)])  # fmt: skip
    assert replay(run).identical
    assert replay(run, ["orchestrator.overshoot_ratio=0"]).derived == []
    warm = loop.train(load_config(overrides=[*common, "--train.warmup_steps=2", "--name=warm"])).run_dir
    assert decisions(warm) == []


def test_an_emergency_cut_is_undone_on_a_real_run_once(tmp_path):
    """grad_abs 1.72 on this model: the grad norm passes it at step 4 (1.75) -> cut x0.1; steps 5
    and 6 stay below (1.69, 1.51; emergency_recover 2) -> the scale comes back at step 6; step 7
    (2.69) cuts again, and that cut stays though steps 8 and 9 are quiet (once a run). Replay is
    exact; what-if emergency_recover=0 (before it existed): no restore."""
    cfg = load_config(overrides=["--train.steps=10", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--orchestrator.grad_abs=1.72", "--orchestrator.emergency_recover=2",
                                 "--orchestrator.cooldown=0"])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"]) for d in ds] == [
        (4, "emergency_lr_cut", {"from": 1.0, "to": 0.1}),
        (6, "emergency_lr_restore", {"from": 0.1, "to": 1.0}),
        (7, "emergency_lr_cut", {"from": 1.0, "to": 0.1}),
    ]  # fmt: skip
    assert ds[1]["reason"].startswith("no trouble for 2 observations since the gradient-explosion cut")
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    assert [o["settings"]["lr_scale"] for o in obs] == [1.0] * 4 + [0.1] * 2 + [1.0] + [0.1] * 3
    assert replay(run).identical
    assert [d["action"] for d in replay(run, ["orchestrator.emergency_recover=0"]).derived] == [
        "emergency_lr_cut", "emergency_lr_cut"]  # fmt: skip


def test_a_too_low_lr_is_raised_on_a_real_run_and_a_rollback_stops_further_raises(tmp_path):
    """A 10x too low LR (3e-4 for this model; its 4 x 32-token batches are too noisy for the default
    thresholds, so the test loosens them: any falling 4-observation fit counts) is raised x2 from the
    next step; a NaN at step 7 rolls back (to step 4, the raise's snapshot: a raise leaves the state
    fit to keep) and caps the LR scale where it is, so the raise the detector asks for again at step 8
    (cooldown 0) never comes. Replay is exact; what-if lr_raise_factor=1 (before issue 18): no raise."""
    cfg = load_config(overrides=["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--train.lr=3e-4", "--train.schedule=constant", "--train.warmup_steps=0",
                                 "--orchestrator.warmup=2", "--orchestrator.lr_low_window=4",
                                 "--orchestrator.lr_low_patience=1", "--orchestrator.lr_low_snr=0.01",
                                 "--orchestrator.lr_low_linearity=0", "--orchestrator.lr_low_grad_rise=100",
                                 "--orchestrator.lr_low_elasticity=0",
                                 "--orchestrator.cooldown=0", "--train.inject=nan_grad@7"])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"], d["level"]) for d in ds] == [
        (4, "lr_scale", {"from": 1.0, "to": 2.0}, 1),
        (7, "rollback", {"to_step": 4, "skip_data": True}, 4),
    ]
    assert ds[0]["reason"].startswith("loss falls slowly and steadily: ")
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    assert [o["step"] for o in obs] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8]
    assert [o["settings"]["lr_scale"] for o in obs] == [1.0] * 4 + [2.0] * 7
    assert obs[4]["lr"] == pytest.approx(2 * obs[3]["lr"])  # the run trained on at twice the LR
    # the cap the rollback left: a finding of a too low LR now raises nothing (without the cap: x2)
    s = orchestrator.init_state(0)
    for o in obs:
        s, _ = orchestrator.decide(s, orchestrator.Observation.from_dict(o), cfg.orchestrator)
    assert s.lr_ceiling == 2.0 and s.step == 8
    s.streaks, last = {"lr_too_low": 1}, orchestrator.Observation.from_dict(obs[-1])
    finding = Finding("lr_too_low", 1, 1.0, "test")
    raise_lr = RESPONSES["lr_too_low"]
    assert raise_lr(finding, s, last, cfg.orchestrator) == [("lr_scale", None)]
    s.lr_ceiling = None
    assert raise_lr(finding, s, last, cfg.orchestrator) == [("lr_scale", {"from": 2.0, "to": 4.0})]
    assert replay(run).identical
    off = replay(run, ["orchestrator.lr_raise_factor=1"])
    assert [d["action"] for d in off.derived] == ["rollback"]


def test_near_convergence_eases_the_lr_and_evaluates_every_step_on_a_real_run(tmp_path):
    """With the forecast due at observation 10 (forecast_every=5; it needs 10 points) and a
    threshold any falling forecast meets (forecast_ease_rel 0.99), the run eases the LR x0.5 and
    evaluates every step instead of every 2 from step 11; replay is exact, and it happens once."""
    cfg = load_config(overrides=["--train.steps=12", f"--run_dir={tmp_path}", *TINY,
                                 "--orchestrator.warmup=2", "--orchestrator.forecast_every=5",
                                 "--orchestrator.forecast_ease_rel=0.99", "--orchestrator.lr_raise_factor=1",
                                 "--orchestrator.forecast_min_fall=0", *RAW])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"], d["level"]) for d in ds] == [
        (10, "lr_scale", {"from": 1.0, "to": 0.5}, 1),
        (10, "eval_every", {"from": 2, "to": 1}, 1),
    ]
    assert ds[0]["reason"].startswith("near convergence: the forecast gains ")
    assert [r["step"] for r in records(run, "eval")] == [0, 2, 4, 6, 8, 10, 11, 12]
    train = records(run, "train")  # step k runs with the schedule's LR at k - 1, x the LR scale
    scale = [1.0] * 10 + [0.5] * 2
    assert [r["lr"] for r in train] == pytest.approx([x * lr_at(k, cfg.train) for k, x in enumerate(scale)])
    assert replay(run).identical


def test_dropped_assignments_raise_the_capacity_factor_on_a_real_run(tmp_path):
    """A capacity factor of 1.0 on the tiny MoE drops a fifth of the expert assignments at init
    (> overflow_drop 5 %): at the first observation past the warm-up the orchestrator raises the
    factor x 1.25 (medium, confidence from the drop), the next steps run with it, the cooldown keeps
    it to one raise in 8 steps, and replay is exact."""
    cfg = load_config(overrides=["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--model.moe.capacity_factor=1", "--orchestrator.warmup=2",
                                 *RAW])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"], d["level"]) for d in ds] == [
        (3, "capacity_factor", {"from": 1.0, "to": 1.25}, 2)
    ]
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    drop = {o["step"]: sum(o["dropped"]) / len(o["dropped"]) for o in obs}
    assert drop[3] > cfg.orchestrator.overflow_drop
    assert ds[0]["reason"] == f"{drop[3]:.1%} of expert assignments dropped (> 5%)"
    assert [o["settings"]["capacity_factor"] for o in obs] == [1.0] * 3 + [1.25] * 5
    assert replay(run).identical


def test_a_saturated_mod_router_on_a_plateau_raises_the_mod_capacity_on_a_real_run(tmp_path):
    """MoD capacity raised on a real run: a plateau threshold every slope meets (plateau_slope 100
    over a 6-observation window, so from the third observation) and a saturation threshold the
    routers' ~0.5 weights at init exceed (mod_high 0.01) make the first observation past the warm-up
    a saturated router on a plateau: MoD capacity x 1.5 (0.25 -> 0.375), applied from the next step,
    once (cooldown); plateau_patience keeps the plateau's own LR cut out; replay is exact."""
    cfg = load_config(overrides=["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP,
                                 "--orchestrator.warmup=2", "--orchestrator.window=6",
                                 "--orchestrator.lr_low_window=6", "--orchestrator.plateau_slope=100",
                                 "--orchestrator.plateau_patience=1000", "--orchestrator.mod_high=0.01",
                                 "--orchestrator.mod_low=0", *RAW])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = decisions(run)
    assert [(d["step"], d["action"], d["args"], d["level"]) for d in ds] == [
        (3, "mod_capacity", {"from": 0.25, "to": 0.375}, 1)
    ]
    assert ds[0]["reason"].startswith("loss on a plateau while the selected tokens' mean router weight is ")
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    assert min(min(o["mod_weight"]) for o in obs) > 0.01
    assert [o["settings"]["mod_capacity"] for o in obs] == [0.25] * 3 + [0.375] * 5
    assert replay(run).identical


# a plateau every slope meets from the third observation (6-observation window), acted on at once: on
# the tiny MoE the orchestrator adds an expert at step 4 (applied before step 5)
ADD_EXPERT = ["--orchestrator.warmup=2", "--orchestrator.window=6", "--orchestrator.lr_low_window=6",
              "--orchestrator.plateau_slope=100", "--orchestrator.plateau_patience=1"]  # fmt: skip


def _experts(ckpt):
    """(the experts its config names, every expert-stacked tensor's leading size) of a checkpoint."""
    state, meta = checkpoint.load_checkpoint(ckpt)
    sizes = {v.shape[0] for k, v in tree.flatten(state).items() if ".moe.w_" in k}
    return meta["config"]["model"]["moe"]["num_experts"], sizes


@pytest.mark.parametrize(("fault_at", "to_step", "experts"), [(None, None, 5), (5, 2, 4), (7, 4, 5)])
def test_an_added_expert_on_a_real_run_and_a_rollback_across_it(tmp_path, fault_at, to_step, experts):
    """A shape-changing decision through the whole loop: the plateau adds a fifth expert at step 4
    (params, router and moments grow; the step is rebuilt) and the run trains on. A fault at step 5
    rolls back to step 2's snapshot, from before the change: the run ends with 4 experts again, config
    and tensors alike; one at step 7 rolls back to step 4's, taken after it: 5. Replay is exact."""
    inject = [f"--train.inject=nan_grad@{fault_at}"] if fault_at else []
    cfg = load_config(overrides=["--train.steps=8", f"--run_dir={tmp_path}", *TINY, *SNAP, *ADD_EXPERT,
                                 *inject, *RAW])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = [(d["step"], d["action"], d["args"]) for d in decisions(run)]
    rollback = [(fault_at, "rollback", {"to_step": to_step, "skip_data": True})] if fault_at else []
    assert ds == [(4, "add_expert", {"from": 4, "to": 5}), *rollback]
    assert _experts(checkpoint.latest(run)) == (experts, {experts})
    assert [r["step"] for r in records(run, "train")][-1] == 8
    assert replay(run).identical


@pytest.mark.parametrize(("stop", "how"), [(6, "raise"), (4, "raise"), (4, "SIGINT"), (4, "SIGTERM")])
def test_a_run_resumed_after_an_added_expert_ends_as_the_straight_run(tmp_path, stop, how):
    """Stopped and resumed around the fifth expert added at step 4 (applied before step 5): two
    steps after it, or at step 4 itself between the decision and its application (a step hook that
    raises; a signal, deferred to the step boundary). Either way the checkpoint holds the decision
    applied (config and tensors), and the resumed run ends bit for bit as the straight one, its
    logs replaying exactly."""
    common = [*TINY, *SNAP, *ADD_EXPERT, *RAW, "--train.steps=8"]
    straight = loop.train(load_config(overrides=[*common, f"--run_dir={tmp_path / 'a'}"]))

    def stop_at(step, state, record):
        if step == stop and how == "raise":
            raise KeyboardInterrupt
        if step == stop:
            os.kill(os.getpid(), getattr(signal, how))

    with pytest.raises(KeyboardInterrupt):
        loop.train(load_config(overrides=[*common, f"--run_dir={tmp_path / 'b'}"]), step_hook=stop_at)
    run = tmp_path / "b" / "debug"
    assert [p.name for p in checkpoint.checkpoints(run)] == [f"step_{stop:08d}"]
    assert _experts(checkpoint.latest(run)) == (5, {5})
    assert main(["--resume", "latest", "--run-dir", str(tmp_path / "b")]) == 0
    a, _ = checkpoint.load_checkpoint(checkpoint.latest(straight.run_dir))
    b, meta = checkpoint.load_checkpoint(checkpoint.latest(run))
    assert meta["step"] == 8
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        assert torch.equal(fb[key], value), key
    assert [(d["step"], d["action"]) for d in decisions(run)] == [(4, "add_expert")]
    assert replay(run).identical


@pytest.mark.parametrize("stop", [None, 5])
def test_a_rollback_discards_the_checkpoints_it_abandons_so_a_resume_continues_after_it(tmp_path, stop):
    """Checkpoints every 2 steps; a NaN at step 5 rolls back to step 2's snapshot. step_4 holds a
    state the run abandoned: the next checkpoint (step 2's, at once) deletes it (event
    ``discard``), so that a run stopped right after the rollback (its checkpoint: step 2, data past
    the bad batch) resumes from there, not from step_4 by its higher step, and ends bit for bit as
    the straight run. With checkpoints every 4 steps the rollback's step saves none: step_4 stays
    (a run always keeps one to resume from) until step 4 is saved again."""
    common = [*TINY, *SNAP, "--train.steps=8", "--train.inject=nan_grad@5"]
    every_2 = load_config(overrides=[*common, "--train.ckpt_every=2", f"--run_dir={tmp_path / 'a'}"])
    straight = loop.train(every_2).run_dir
    assert [p.name for p in checkpoint.checkpoints(straight)] == [f"step_{s:08d}" for s in (4, 6, 8)]
    events = [(r["step"], r["what"], r["detail"]) for r in records(straight, "event")]
    assert (2, "discard", "checkpoints of abandoned steps: step_00000004") in events
    if stop is None:
        seen = []  # (step, the checkpoints then) after each step, with checkpoints every 4 steps

        def hook(step, state, record):
            seen.append((step, [p.name for p in checkpoint.checkpoints(tmp_path / "c" / "debug")]))

        every_4 = load_config(overrides=[*common, "--train.ckpt_every=4", f"--run_dir={tmp_path / 'c'}"])
        loop.train(every_4, step_hook=hook)
        assert seen[4:7] == [(5, ["step_00000004"]), (3, ["step_00000004"]), (4, ["step_00000004"])]
        return
    common.append("--train.ckpt_every=2")
    stopped_at(load_config(overrides=[*common, f"--run_dir={tmp_path / 'b'}"]), stop)
    run = tmp_path / "b" / "debug"
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000002"]
    assert main(["--resume", "latest", "--run-dir", str(tmp_path / "b")]) == 0
    a, _ = checkpoint.load_checkpoint(checkpoint.latest(straight))
    b, _ = checkpoint.load_checkpoint(checkpoint.latest(run))
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys() and all(torch.equal(fb[k], v) for k, v in fa.items())
    assert [(d["step"], d["action"]) for d in decisions(run)] == [(5, "rollback")]


@pytest.mark.parametrize("counts", ["drop", "bad"])
def test_log_counts_in_the_checkpoint_older_checkpoints_and_bad_ones(tmp_path, capsys, counts):
    """A checkpoint records how many records each orchestrator log held when it was saved; one
    written before that field existed falls back to the cut by step (a resume works as it did), and
    a damaged field is one line naming the run, exit 2, nothing written."""
    overrides = ["--train.steps=6", f"--run_dir={tmp_path}", *TINY, *SNAP]
    stopped_at(load_config(overrides=overrides), 3)
    run = tmp_path / "debug"
    meta_file = checkpoint.latest(run) / "meta.msgpack"
    meta = msgpack.unpackb(meta_file.read_bytes())
    assert meta["extra"]["orchestrator_logs"] == [3, 0]  # 3 observations, no decision
    if counts == "drop":
        del meta["extra"]["orchestrator_logs"]
    else:
        meta["extra"]["orchestrator_logs"] = [3, -1]
    meta_file.write_bytes(msgpack.packb(meta))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    rc = main(["--resume", "latest", "--run-dir", str(tmp_path)])
    if counts == "drop":
        assert rc == 0 and replay(run).identical and replay(run).observations == 6
        return
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "bad orchestrator log counts in the checkpoint: [3, -1]" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
