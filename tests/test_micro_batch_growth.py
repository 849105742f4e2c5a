"""Micro-batch growth (issue 18): double the micro-batch while memory allows, keep it when tokens/s
improves, shrink it back when it does not (never to be tried again) or under memory pressure — all
decided from observations, so replay is exact. Synthetic series through ``decide`` (with decisions
applied to the settings, as the driver would), then a real run."""

import math

from test_run import TINY, records

from lumina import checkpoint, loop, orchestrator
from lumina.config import OrchestratorConfig
from lumina.configure import load_config
from lumina.orchestrator import Observation, decide, init_state
from lumina.orchestrator.replay import replay

OCFG = OrchestratorConfig()  # warmup 20; grow_settle 3 + grow_window 10 observations; cooldown 25
SETTINGS = {"micro_batch_size": 1, "batch_size": 8, "lr_scale": 1.0}


def drive(
    n, speed, memory=lambda step, mb: 500.0, settings=SETTINGS, cfg=OCFG, oom_above=math.inf, nan_at=-1
):
    """Observe steps 1..n: tokens/s ``speed(mb)``, memory ``memory(step, mb)`` MB of a 10 GB limit;
    micro-batch decisions are applied before the next step. (state, decisions, mb per step)."""
    s, out, settings, mbs = init_state(0), [], dict(settings), []
    step = 1
    while step <= n:
        mb = settings["micro_batch_size"]
        if mb > oom_above:  # the step ran out of memory: an oom observation instead of it
            obs = Observation(step=step, loss=math.nan, grad_norm=math.nan, lr=1e-3, events=["oom"],
                              settings=settings)  # fmt: skip
        else:
            loss = math.nan if step == nan_at else 4.0 + 6.0 * step**-0.5
            obs = Observation(step=step, loss=loss, grad_norm=1.0, lr=1e-3,
                              tokens_per_s=speed(mb) * (1 + 0.01 * (step % 3)), memory_mb=memory(step, mb),
                              memory_limit_mb=10_000.0, settings=settings)  # fmt: skip
            mbs.append(mb)
            step += 1
        s, ds = decide(s, obs, cfg)
        out += ds
        for d in ds:
            if d.action == "micro_batch":
                settings = {**settings, "micro_batch_size": d.args["to"]}
            elif d.action == "grad_checkpointing":
                settings = {**settings, "grad_checkpointing": d.args["to"]}
    return s, out, mbs


def acts(ds):
    return [(d.step, d.action, d.args) for d in ds]


def test_growth_fires_once_a_baseline_exists_and_is_kept_while_tokens_per_s_improves():
    s, ds, mbs = drive(100, speed=lambda mb: 1000 * mb**0.5)  # +41 % per doubling
    # step 21: the first past the warm-up (20 observations; the baseline needs 3 settling + 10); each
    # growth kept at its 13th observation at the new size (34, 59), the next doubling waits for the
    # action's cooldown (25 steps): 46, 71; at 8 the step is one micro-batch, nothing left to grow
    assert acts(ds) == [(21, "micro_batch", {"from": 1, "to": 2}), (46, "micro_batch", {"from": 2, "to": 4}),
                        (71, "micro_batch", {"from": 4, "to": 8})]  # fmt: skip
    assert (
        ds[0].level == 1
        and ds[0].confidence >= OCFG.conf_soft
        and "2 x memory 500 MB < 70% of the 10000 MB limit" in ds[0].reason
    )
    assert mbs[20] == 1 and mbs[21] == 2 and mbs[-1] == 8
    assert s.counters["micro_batch_kept"] == 3 and s.mb_trial is None and s.mb_floor == 1
    assert s.health == 100.0  # an opportunity costs no health


def test_a_growth_without_gain_is_shrunk_back_and_never_tried_again():
    s, ds, mbs = drive(200, speed=lambda mb: 1000.0)
    # judged at step 34 (13 observations at 2): no faster; the shrink waits for the cooldown (21 + 25)
    assert acts(ds) == [(21, "micro_batch", {"from": 1, "to": 2}), (46, "micro_batch", {"from": 2, "to": 1})]
    assert "did not pay" in ds[1].reason and "< +5%" in ds[1].reason
    assert s.mb_ceiling == 2 and s.mb_trial is None and set(mbs[46:]) == {1}


def test_a_small_gain_is_not_enough():
    cfg = OrchestratorConfig(cooldown=0)  # no cooldown: the shrink follows the judgment at once
    s, ds, _ = drive(60, speed=lambda mb: 1000 * (1.03 if mb == 2 else 1.0), cfg=cfg)
    assert acts(ds) == [(21, "micro_batch", {"from": 1, "to": 2}), (34, "micro_batch", {"from": 2, "to": 1})]


def test_memory_pressure_shrinks_a_grown_micro_batch_back_then_checkpoints():
    # kept at step 34 (+41 %), then at step 36 memory reaches 95 % of the limit
    s, ds, mbs = drive(
        60, speed=lambda mb: 1000 * mb**0.5, memory=lambda step, mb: 9500.0 if step >= 36 else 500.0
    )
    assert acts(ds)[:2] == [
        (21, "micro_batch", {"from": 1, "to": 2}),
        (46, "micro_batch", {"from": 2, "to": 1}),
    ]
    assert ds[1].level == 2 and "memory 9500 MB > 90%" in ds[1].reason  # waited for the cooldown
    # still under pressure at the size it started with: gradient checkpointing, as before growth
    assert acts(ds)[2] == (47, "grad_checkpointing", {"from": "none", "to": "full"})
    assert s.mb_ceiling == 2 and set(mbs[46:]) == {1}


def test_no_growth_without_room_accumulation_or_a_fitting_split():
    assert drive(60, lambda mb: 1000 * mb, memory=lambda step, mb: 4000.0)[1] == []  # 8000 > 70 % of 10000
    assert (
        drive(60, lambda mb: 1000 * mb, settings=SETTINGS | {"micro_batch_size": 8})[1] == []
    )  # one micro-batch
    assert (
        drive(60, lambda mb: 1000 * mb, settings=SETTINGS | {"batch_size": 6, "micro_batch_size": 2})[1] == []
    )
    assert drive(60, lambda mb: 1000 * mb, cfg=OrchestratorConfig(grow_micro_batch=False))[1] == []
    # 2 ranks, batch 4: micro-batch 1 -> 2 leaves one per rank; 2 -> 4 would leave half a micro-batch each
    _, ds, _ = drive(
        80, lambda mb: 1000 * mb, settings={"micro_batch_size": 1, "batch_size": 4, "world_size": 2}
    )
    assert acts(ds) == [(21, "micro_batch", {"from": 1, "to": 2})]


def test_no_growth_while_the_run_warms_up_again_after_a_rollback():
    # a NaN at step 15 rolls back to the snapshot of step 10: the history keeps steps 1..10, so the
    # warm-up (more than 20 observations in it) ends with the 11th observation after it, step 26
    _, ds, _ = drive(40, speed=lambda mb: 1000 * mb, nan_at=15)
    assert acts(ds) == [(15, "rollback", {"to_step": 10, "skip_data": True}),
                        (26, "micro_batch", {"from": 1, "to": 2})]  # fmt: skip


def test_a_size_that_ran_out_of_memory_is_not_grown_to_again():
    s, ds, mbs = drive(100, lambda mb: 1000 * mb, settings=SETTINGS | {"micro_batch_size": 4}, oom_above=2)
    assert acts(ds)[0] == (1, "micro_batch", {"from": 4, "to": 2}) and ds[0].level == 4
    assert len(ds) == 1 and s.mb_ceiling == 4 and set(mbs) == {2}


def test_a_real_run_grows_its_micro_batch_keeps_the_batch_and_replays(tmp_path):
    """micro-batch 1 of 4 with a generous budget: the growth fires at step 4 (past a 2-observation
    warm-up, 1 settling + 3 baseline observations) and is applied from step 5; tokens/s on a shared
    machine decides keep or revert, so both are accepted — the replay must be exact either way."""
    cfg = load_config(overrides=["--train.steps=10", f"--run_dir={tmp_path}", *TINY,
                                 "--train.micro_batch_size=1", "--train.eval_batches=0",
                                 "--orchestrator.memory_budget_mb=100000", "--orchestrator.grow_settle=1",
                                 "--orchestrator.grow_window=3", "--orchestrator.cooldown=0",
                                 "--orchestrator.warmup=2"])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = list(orchestrator.read_log(run / orchestrator.DECISIONS_FILE))
    assert [(d["step"], d["action"], d["args"]) for d in ds][0] == (4, "micro_batch", {"from": 1, "to": 2})
    assert all(d["action"] == "micro_batch" for d in ds)
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    mb = {o["step"]: o["settings"]["micro_batch_size"] for o in obs}
    assert [mb[s] for s in range(1, 5)] == [1] * 4 and mb[5] == 2  # applied before step 5
    assert {o["settings"]["batch_size"] for o in obs} == {4}
    later = ds[1:]
    if later and later[0]["args"]["to"] == 1:  # reverted at step 8 (4 observations at 2): never again
        assert len(ds) == 2 and later[0]["step"] == 8 and {mb[s] for s in range(9, 11)} == {1}
    elif later:  # kept at step 8, and doubled again: 4 = the batch, one micro-batch a step
        assert later[0]["step"] == 8 and later[0]["args"] == {"from": 2, "to": 4}
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 11))
    assert len({r["tokens"] for r in train}) == 1  # the same global batch every step
    meta = checkpoint.read_meta(run / "checkpoints" / "step_00000010")
    t = meta["config"]["train"]
    final_mb = t["micro_batch_size"] or t["batch_size"]  # None: the batch (the re-derivable form)
    assert t["batch_size"] == 4 and final_mb in (1, 2, 4)
    assert meta["data"]["step"] * final_mb == 10 * 4  # 10 steps x 4 sequences, in units of the micro-batch
    r = replay(run)
    assert r.identical and len(r.derived) == len(ds)


def test_a_real_run_shrinks_a_growth_without_gain_back_and_never_grows_again(tmp_path):
    """The run above with a gain no growth can show (grow_gain 100: the doubled micro-batch would
    need 101 x the tokens/s): the growth at step 4 is judged after 1 settling + 3 observations at
    micro-batch 2 and shrunk back at step 8 (micro_batch_no_gain), applied from step 9; 2 is
    barred, so nothing grows again; the batch never changes and replay is exact."""
    cfg = load_config(overrides=["--train.steps=12", f"--run_dir={tmp_path}", *TINY,
                                 "--train.micro_batch_size=1", "--train.eval_batches=0",
                                 "--orchestrator.memory_budget_mb=100000", "--orchestrator.grow_settle=1",
                                 "--orchestrator.grow_window=3", "--orchestrator.cooldown=0",
                                 "--orchestrator.warmup=2", "--orchestrator.grow_gain=100"])  # fmt: skip
    run = loop.train(cfg).run_dir
    ds = list(orchestrator.read_log(run / orchestrator.DECISIONS_FILE))
    assert [(d["step"], d["action"], d["args"]) for d in ds] == [
        (4, "micro_batch", {"from": 1, "to": 2}),
        (8, "micro_batch", {"from": 2, "to": 1}),
    ]
    assert ds[1]["reason"].startswith("micro-batch 1 -> 2 did not pay: ")
    obs = list(orchestrator.read_log(run / orchestrator.OBSERVATIONS_FILE))
    mb = {o["step"]: o["settings"]["micro_batch_size"] for o in obs}
    assert [mb[s] for s in range(1, 13)] == [1] * 4 + [2] * 4 + [1] * 4
    assert {o["settings"]["batch_size"] for o in obs} == {4}
    r = replay(run)
    assert r.identical and len(r.derived) == 2
