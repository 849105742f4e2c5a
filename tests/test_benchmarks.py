"""The kernel benchmarks run end to end (``--quick``: tiny shapes, nothing saved) with every provider
this machine has, each checked against the reference inside the script before it is timed; their
tables name every provider and subject. Timings at these sizes mean nothing and are not checked."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lumina_kernels import native

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ["reference"] + (["native"] if native.available() else [])
PROVIDERS += ["triton"] if importlib.util.find_spec("triton") else []


def _run(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--device", "cpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _table(out: str) -> set[tuple[str, str, str]]:
    rows = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("fwd", "bwd", "fwd+bwd"):
            rows.add(tuple(parts[:3]))
    return rows


def test_moe_benchmark_runs():
    out = _run("benchmarks.moe", "--providers", ",".join([*PROVIDERS, "torch"]), "--dtype", "bfloat16")
    rows = _table(out)
    assert ("layer", "baseline", "fwd+bwd") in rows  # the torchtitan-style peer (bf16)
    assert ("grouped_mm", "torch", "bwd") in rows
    for p in PROVIDERS:
        assert ("dispatch+combine", p, "fwd+bwd") in rows, out
        assert ("layer", p, "fwd+bwd") in rows, out
    if "triton" in PROVIDERS:
        assert ("routing", "triton", "fwd") in rows and ("grouped_mm", "triton", "fwd+bwd") in rows


def test_mod_benchmark_runs():
    rows = _table(_run("benchmarks.mod", "--providers", ",".join(PROVIDERS)))
    for p in PROVIDERS:
        assert ("gather+scatter", p, "fwd+bwd") in rows
    if "triton" in PROVIDERS:
        assert ("topk", "triton", "fwd") in rows


def test_unknown_provider_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.mod", "--quick", "--device", "cpu", "--providers", "cublas"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("mod: error: --providers: cublas not available here")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module", ["benchmarks.moe", "benchmarks.mod"])
def test_help(module):
    assert (
        "usage"
        in subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout
    )


@pytest.mark.slow  # ~4 min on 2 cores: five fresh worker processes and six short CLI runs
def test_memory_benchmark_runs():
    """``benchmarks/memory.py --quick``: every configuration's memory row and loss run completes."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--quick", "--no-save"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for config in ("adamw", "adamw8bit", "full", "lora_bf16", "qlora_nf4"):
        assert any(line.split()[:2] == ["debug", config] for line in proc.stdout.splitlines()), config
    for run in ("(a) adamw seed 0", "(a) adamw8bit seed 0", "(b) base", "(b) qlora_nf4 (chat)"):
        assert run in proc.stdout, run


def _orchestrator_bench():
    spec = importlib.util.spec_from_file_location(
        "orchestrator_bench", ROOT / "benchmarks" / "orchestrator.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def _row(case, seed, on, final, curve, train_s=100.0, survived=True, decisions=0):
    return {"case": case, "seed": seed, "orchestrator": "on" if on else "off", "survived": survived,
            "final_eval": final, "eval_curve": json.dumps(curve), "train_s": train_s, "decisions": decisions,
            "orch_cost_pct": 0.1, "snapshot_ms_per_step": 0.3, "snapshot_mb": 269.0,
            "gate": "raw"}  # fmt: skip


def test_orchestrator_bench_statistics():
    """The benchmark's reach (steps and time to the off-run's final loss), t interval and goal marks,
    on synthetic runs (no training)."""
    ob = _orchestrator_bench()
    # the driver writes the eval after step s before step s's train record; a rollback redoes steps
    recs = [{"kind": "eval", "step": 0, "loss": 10.8}]
    recs += [{"kind": "train", "step": s, "step_s": 0.5} for s in (1, 2, 3, 2, 3)]  # 3 -> back to 1
    recs.insert(4, {"kind": "event", "step": 3})
    recs += [{"kind": "eval", "step": 4, "loss": 7.0}, {"kind": "train", "step": 4, "step_s": 1.0}]
    curve, train_s = ob.eval_curve(recs)
    assert curve == [(0, 0.0, 10.8), (6, 3.5, 7.0)] and train_s == 3.5
    m, hw = ob.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and hw == pytest.approx(2.776445 * 1.5811388 / 5**0.5, rel=1e-5)  # t(0.975, 4)
    assert math.isnan(ob.t_interval([1.0])[1])
    off = _row("lr_low", 0, False, 6.5, [[0, 0.0, 10.8], [50, 50.0, 7.0], [100, 100.0, 6.5]])
    on = _row("lr_low", 0, True, 6.2, [[0, 0.0, 10.8], [50, 40.0, 6.6], [70, 60.0, 6.45], [100, 90.0, 6.2]])
    assert ob.reach(on, off, 100) == (0.7, 0.6)
    slow = _row("lr_low", 1, True, 6.6, [[0, 0.0, 10.8], [100, 100.0, 6.6]])
    assert ob.reach(slow, {**off, "seed": 1}, 100) == (None, None)
    # an off-run that failed: its last finite eval loss is the target
    dead = _row("nan_grad", 0, False, "", [[0, 0.0, 10.8], [50, 50.0, 7.0], [100, 100.0, float("nan")]])
    assert ob.target_loss(dead) == 7.0
    rows = [on, off, slow, {**off, "seed": 1}]
    rows += [_row("clean", s, True, 6.40 + 0.001 * s, [[100, 100.0, 6.4]]) for s in (0, 1)]
    rows += [_row("clean", s, False, 6.40, [[100, 100.0, 6.4]]) for s in (0, 1)]
    table = ob.summarise(rows, 100, 0.005)
    lr_low = next(line for line in table.splitlines() if line.startswith("| lr_low "))
    assert "| 1/2 |" in lr_low and "NOT met (reach)" in lr_low  # 1 of 2 seeds < 80 %
    clean = next(line for line in table.splitlines() if line.startswith("| clean "))
    assert "met (on − off +0.01 %" in clean and "NOT" not in clean
    assert "lr_low: off-run final eval − clean off-run's" in table


def test_orchestrator_bench_report(tmp_path):
    """--report reads the CSV back: the newest row per (case, seed, arm) at the preset, budget and
    cadence asked, of one machine, typed; the evidence table credits each action kind of a pair with
    its outcome."""
    ob = _orchestrator_bench()
    meta = {"preset": "debug", "steps": 150, "eval_every": 10, "device": "x86_64"}
    curve = [[0, 0.0, 10.8], [150, 80.0, 7.0]]

    def row(case, seed, on, final, actions="", survived=True, **kw):
        r = {**meta, **_row(case, seed, on, final, curve, survived=survived, decisions=len(actions.split()))}
        return {**r, "actions": actions or ("out of memory" if not survived else ""), **kw}

    rows = [row("lr_low", 0, True, 7.2, "lr_scale"), row("lr_low", 0, False, 7.1),
            row("lr_low", 0, True, 6.3, "lr_scale+ lr_scale+"),  # a rerun: the newest row wins
            row("nan_grad", 0, True, 6.5, "rollback emergency_lr_cut"),
            row("nan_grad", 0, False, "", survived=False),
            row("clean", 0, True, 6.41, "micro_batch"), row("clean", 0, False, 6.40),
            row("clean", 1, True, 6.0, "lr_scale", steps=60),  # another budget: left out
            row("clean", 0, True, 6.38, "", gate="evidence"),
            row("clean", 0, False, 6.2, device="AMD EPYC")]  # another machine's numerics  # fmt: skip
    path = tmp_path / "orchestrator_v2.csv"
    ob.h.append_csv(path, rows)
    other = ob.load_rows(path, "debug", 150, 10)  # by default the newest row's machine
    assert [(r["case"], r["device"], r["final_eval"]) for r in other] == [("clean", "AMD EPYC", "6.2")]
    with pytest.raises(SystemExit):  # a machine without rows: one line, exit 2
        ob.load_rows(path, "debug", 150, 10, device="AMD")
    got = ob.load_rows(path, "debug", 150, 10, device="x86_64")
    assert len(got) == 6 and all(isinstance(r["survived"], bool) and isinstance(r["seed"], int) for r in got)
    assert next(r for r in got if r["case"] == "lr_low" and r["orchestrator"] == "on")["final_eval"] == "6.3"
    table = ob.evidence(got).splitlines()
    by_kind = {
        line.split(" | ")[0].strip("| ").split(" (")[0]: line for line in table[2:] if line.startswith("|")
    }
    assert sorted(by_kind) == ["emergency_lr_cut", "lr_scale+", "micro_batch", "rollback"]
    assert table[-1] == "OrchestratorConfig.evidence entries: ('lr_scale+=1/1',)"  # a direction, the loss
    assert "| lr_scale+ | 1 | 1 | lr_low | -0.8000 |" in by_kind["lr_scale+"]  # 6.3 - 7.1
    assert "| rollback | 1 | 1 | nan_grad | — |" in by_kind["rollback"]  # survived where off failed
    assert (
        "| micro_batch (not meant to move the loss) | 1 | 0 | clean | +0.0100 | 0.33 |"
        in by_kind["micro_batch"]
    )
    assert "| lr_low | misconfig | 0/1 |" in ob.summarise(got, 150, 0.005)  # reached 7.1 only at 150
    gated = ob.load_rows(path, "debug", 150, 10, gate="evidence", device="x86_64")  # paired with off-runs
    assert sorted((r["case"], r["orchestrator"]) for r in gated) == [
        ("clean", "off"), ("clean", "on"), ("lr_low", "off"), ("nan_grad", "off")]  # fmt: skip
    clean = next(line for line in ob.summarise(gated, 150, 0.005).splitlines() if line.startswith("| clean "))
    assert "| -0.0200 |" in clean  # the gated on-run 6.38 against the off-run 6.40


def test_orchestrator_bench_cases():
    """Each mis-configured case is the override it claims, relative to the preset."""
    ob = _orchestrator_bench()
    assert ob.case_overrides("moe_capacity", "debug", 50) == ["--model.moe.capacity_factor=1.0"]
    assert "--train.lr=0.0003" in ob.case_overrides("lr_low", "debug", 50)  # debug's LR is 3e-3
    assert "--train.lr=0.03" in ob.case_overrides("lr_high", "debug", 50)
    assert ob.case_overrides("no_warmup", "debug", 50) == ["--train.warmup_ratio=0", "--train.lr=0.009"]
    assert ob.case_overrides("micro_batch", "debug", 50) == [
        "--train.micro_batch_size=1", "--train.eval_batches=64"]  # fmt: skip
    assert ob.case_overrides("nan_grad", "debug", 50) == ["--train.inject=nan_grad@50"]


@pytest.mark.slow  # four 30-step debug runs: 8 min measured on 2 busy cores (est. ~2 min quiet)
def test_orchestrator_bench_quick():
    proc = subprocess.run(
        [sys.executable, "benchmarks/orchestrator.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert any(line.startswith("| lr_low | misconfig |") for line in proc.stdout.splitlines()), proc.stdout
    assert any(line.startswith("| clean | clean |") for line in proc.stdout.splitlines()), proc.stdout
