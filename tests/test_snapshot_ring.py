"""The snapshot ring's storage (``lumina.driver.rollback.SnapshotRing``): a byte budget decides
whether a snapshot stays in memory or is spilled to a safetensors file; a spilled snapshot restores
bit for bit, its files go when the ring drops it, and a run that rolls back from a spilled snapshot
trains exactly as one that rolls back from memory."""

import math

import pytest
import torch
from tensordict import TensorDict
from test_run import TINY, records

from lumina import loop, orchestrator, tree
from lumina.config import ConfigError, OrchestratorConfig
from lumina.configure import load_config
from lumina.driver.orchestration import snapshot_budget_mb
from lumina.driver.rollback import SnapshotRing, state_bytes
from lumina.orchestrator.replay import replay


def a_state(seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    flat = {
        "params.layers.0.w": torch.randn(7, 5, generator=g),
        "params.embed.weight": torch.randn(11, 3, generator=g).to(torch.bfloat16),
        "opt.m.layers.0.w": torch.randn(7, 5, generator=g),
        "step": torch.tensor(seed, dtype=torch.int64),
        "rng": torch.randint(0, 2**62, (2,), generator=g),
        "knobs.flag": torch.tensor(seed % 2 == 0),
    }
    return tree.unflatten(flat)


def test_the_budget_decides_memory_or_disk_and_memory_never_exceeds_it(tmp_path):
    cfg = load_config(overrides=TINY)
    nbytes = state_bytes(a_state(0))
    assert nbytes == 7 * 5 * 4 * 2 + 11 * 3 * 2 + 8 + 2 * 8 + 1
    ring = SnapshotRing(budget_bytes=1.5 * nbytes, spill_dir=tmp_path / ".snapshots")
    for step in (0, 10, 20):
        ring.sync({0, 10, 20}, step, a_state(step), cfg)
        assert ring.memory_bytes <= ring.budget_bytes
    assert {s: ring.ring[s].where for s in ring.ring} == {0: "memory", 10: "disk", 20: "disk"}
    assert ring.spilled == 2 and ring.disk_bytes == 2 * nbytes
    assert sorted(p.name for p in (tmp_path / ".snapshots").iterdir()) == ["step_00000010", "step_00000020"]
    # the ring drops 0 and 10: their memory and files go; the new snapshot takes the freed memory
    ring.sync({20, 30}, 30, a_state(30), cfg)
    assert {s: ring.ring[s].where for s in ring.ring} == {20: "disk", 30: "memory"}
    assert sorted(p.name for p in (tmp_path / ".snapshots").iterdir()) == ["step_00000020"]
    ring.close()
    assert not (tmp_path / ".snapshots").exists() and not ring.ring


@pytest.mark.parametrize("budget", [0.0, math.inf])
def test_a_snapshot_restores_bit_for_bit_from_disk_as_from_memory(tmp_path, budget):
    cfg = load_config(overrides=TINY)
    state = a_state(3)
    ring = SnapshotRing(budget_bytes=budget, spill_dir=tmp_path / ".snapshots")
    ring.snapshot(5, state, cfg)
    assert ring.ring[5].where == ("disk" if budget == 0 else "memory")
    for _ in range(2):  # every restore is a fresh copy: changing one leaves the ring's intact
        got, got_cfg = ring.get(5, torch.device("cpu"))
        assert got_cfg is cfg
        a, b = tree.flatten(got), tree.flatten(state)
        assert list(a) == list(b)  # the key order too (a compiled step guards on it)
        for k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
            assert a[k].data_ptr() % 64 == 0 or not a[k].numel(), k  # aligned as the running state
        got["params", "layers", "0", "w"].add_(1.0)
    state["params", "layers", "0", "w"].zero_()  # the ring holds a copy, not the live state
    assert not torch.equal(tree.flatten(ring.get(5, torch.device("cpu"))[0])["params.layers.0.w"],
                           state["params", "layers", "0", "w"])  # fmt: skip


def test_a_new_ring_removes_spilled_files_a_crashed_run_left(tmp_path):
    left = tmp_path / ".snapshots" / "step_00000004"
    left.mkdir(parents=True)
    (left / "shard_00000.safetensors").write_bytes(b"x")
    SnapshotRing(budget_bytes=0, spill_dir=tmp_path / ".snapshots")
    assert not (tmp_path / ".snapshots").exists()


def test_the_default_budget_is_a_fraction_of_the_memory_limit():
    assert snapshot_budget_mb(OrchestratorConfig(), 24_000.0) == pytest.approx(2400.0)
    assert snapshot_budget_mb(OrchestratorConfig(), 0.0) == 2048.0  # unknown limit
    assert snapshot_budget_mb(OrchestratorConfig(snapshot_mb=0), 24_000.0) == 0
    with pytest.raises(ConfigError, match="snapshot_mb"):
        OrchestratorConfig(snapshot_mb=-1)
    with pytest.raises(ConfigError, match="snapshot_memory"):
        OrchestratorConfig(snapshot_memory=1.5)


def test_a_rollback_from_a_spilled_snapshot_trains_as_one_from_memory(tmp_path):
    """nan_grad@7 rolls back to the snapshot of step 4: with snapshot_mb=0 every snapshot is on disk,
    by default every one is in memory; the runs log the same losses, bit for bit, and the spilled
    files are gone when the run ends."""
    runs, steps = {}, {}
    for name, budget in (("memory", []), ("disk", ["--orchestrator.snapshot_mb=0"])):
        seen = []

        def hook(step, state, record, seen=seen, run_dir=tmp_path / name):
            seen.append(sorted(p.name for p in (run_dir / "debug" / ".snapshots").glob("step_*")))

        cfg = load_config(overrides=["--train.steps=10", f"--run_dir={tmp_path / name}", *TINY,
                                     "--orchestrator.snapshot_every=2", "--train.eval_batches=0",
                                     "--train.inject=nan_grad@7", *budget])  # fmt: skip
        runs[name] = loop.train(cfg, step_hook=hook).run_dir
        steps[name] = seen
    mem, disk = runs["memory"], runs["disk"]
    for run in (mem, disk):
        ds = list(orchestrator.read_log(run / orchestrator.DECISIONS_FILE))
        assert [(d["step"], d["action"], d["args"]["to_step"]) for d in ds] == [(7, "rollback", 4)]
        assert replay(run).identical
        assert not (run / ".snapshots").exists()
    assert [r["loss"] for r in records(mem, "train")] == [r["loss"] for r in records(disk, "train")]
    events = {r["what"]: r["detail"] for r in records(disk) if r["kind"] == "event"}
    assert "snapshot at step 4" in events["rollback"] and ".snapshots" in events["snapshot_spill"]
    assert "snapshot_spill" not in {r["what"] for r in records(mem) if r["kind"] == "event"}
    assert steps["memory"] == [[]] * len(steps["memory"])
    # on disk: at most the ring's 3 confirmed snapshots + the pending one
    assert max(len(s) for s in steps["disk"]) <= 4 and any(len(s) >= 3 for s in steps["disk"])
