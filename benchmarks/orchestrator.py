"""Does the orchestrator help? Paired runs with it on and off, per case and seed (issue 18).

    python -m benchmarks.orchestrator                          # every case x 5 seeds x on/off, debug
    python -m benchmarks.orchestrator --quick                  # smoke: lr_low + clean, 1 seed, 30 steps
    python -m benchmarks.orchestrator --cases lr_low,lr_high --seeds 0,1,2,3,4 --steps 150
    python -m benchmarks.orchestrator --report                 # the tables from the CSV, no runs

Each case trains ``--preset`` (default ``debug``: real Shakespeare text, CPU) for ``--steps`` steps
twice per seed, identical except ``orchestrator.enabled``, and evaluates the held-out loss every
``--eval-every`` steps on both runs. Three kinds of case:

- **clean**: the preset as it is.
- **mis-configured starts** a user could really make (config overrides, relative to the preset):
  ``lr_low`` LR / 10; ``lr_high`` LR x 10; ``no_warmup`` LR x 3 and no warm-up; ``moe_capacity``
  ``model.moe.capacity_factor=1.0`` (the preset is dropless; on ``debug``, seed 0, 36-47 % of the
  expert assignments were dropped at every step from 3 to 20, the mean over the MoE layers in the
  train records' ``dropped``); ``mod_capacity`` ``model.mod.capacity=0.125`` (the preset routes
  0.25); ``micro_batch`` ``train.micro_batch_size=1`` (a micro-batch far below what memory allows:
  accumulation over batch_size micro-batches; ``eval_batches`` x batch_size so the held-out windows
  are the same). Whether each off-run really ends worse than the clean one is printed under the
  table (same seed), when ``clean`` ran too.
- **faults** injected by the driver (``train.inject``) at ``--at`` (a fraction of the run) or at
  initialisation: ``lr_spike``, ``nan_grad``, ``loss_spike``, ``bad_batch``, ``oom``,
  ``expert_collapse``, ``mod_collapse``.

Per run: survived (all steps done and the final eval loss finite), the held-out loss curve, final
eval loss, optimizer steps redone after rollbacks ("steps lost"), decisions, wall time, train time
(the sum of the steps' own times: evaluations, the orchestrator and snapshot copies excluded) and the
orchestrator's own time (``decide`` + applying the decisions; copying snapshots into the ring is
reported separately) against the mean step time. Per paired seed: **reach** = the first evaluation
at which the on-run's held-out loss <= the off-run's final held-out loss, as optimizer steps run
(redone steps count) / the step budget (``reach_steps``), and as train time / the off-run's train time
(``reach_time``).
For ``micro_batch`` the optimisation is the same by design (the global batch does not change), so
its reach is judged on train time, not steps. An off-run that fails (non-finite, out of memory) has
no final loss: its last finite eval loss is the target.

Goals (issue 18), marked in the printed table: a mis-configured case's on-run reaches the target in
<= 0.8 x the steps (time for ``micro_batch``) on >= 80 % of paired seeds; on the clean case the
on-run's final eval loss is within 0.5 % of the off-run's (mean of the paired relative differences,
``--tol``); every fault case's on-runs survive; decide + apply <= 0.5 % of the step time (median of
the case's on-runs). Final eval loss: mean with a 95 % t interval over seeds per arm, and the paired
difference on - off with its 95 % paired-t interval.

Cost (2-core CPU machine): a quiet ``debug`` step is ~0.53 s (``orchestrator.csv``: 100-step runs
with one evaluation took 58-64 s wall), so a 150-step run with an evaluation every 10 steps is an
estimated ~100-120 s and the full benchmark (14 cases x 5 seeds x 2 runs = 140 runs) ~4-5 h
(``micro_batch`` runs are slower per step). Measured once, ``--quick`` (4 runs of 30 steps, eval every
10) took 8 min 16 s wall, 115-129 s a run, on the same machine while a 2-worker test suite ran
(load ~4, 3-4 s a step): on a busy machine expect ~4 x the estimate.

Gate: on-runs use the evidence table as shipped (``--gate evidence``, default), or the findings'
confidence alone (``--gate raw``: ``orchestrator.evidence`` empty) — the table is measured from raw
runs, since an action the table holds back is never measured again. ``--arms on`` runs the on-runs
only (an off-run does not depend on the gate; ``--report`` pairs them with the off-runs in the
CSV). ``--report`` runs nothing: it prints the tables from the CSV (the newest row per case, seed,
arm and gate), cases run in separate invocations together, and the per-action evidence table of
the raw runs (``OrchestratorConfig.evidence``'s ``K/N``). Rows written before the gate existed
carry ``gate`` raw: they ran without it.

Rows go to ``benchmarks/results/orchestrator_v2.csv`` (``orchestrator.csv`` holds the rows of the
earlier version, whose columns differ: no eval curve, no reach); ``--registry`` runs the registry
experiment instead (``orchestrator_registry.csv``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script or with -m
from benchmarks import _harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "orchestrator_v2.csv"
REGISTRY_RESULTS = RESULTS.with_name("orchestrator_registry.csv")


@dataclass(frozen=True)
class Case:
    kind: str  # clean | misconfig | fault
    inject: str | None = None  # fault spec template ({at}: the fault's step)
    # mis-configuration: (lr factor, overrides); the factor multiplies the preset's LR (None: unchanged)
    lr_factor: float | None = None
    overrides: tuple[str, ...] = ()
    by_time: bool = False  # reach judged on train time (the steps are the same by design)


CASES: dict[str, Case] = {
    "clean": Case("clean"),
    "lr_low": Case("misconfig", lr_factor=0.1),
    "lr_high": Case("misconfig", lr_factor=10.0),
    "no_warmup": Case("misconfig", lr_factor=3.0, overrides=("--train.warmup_ratio=0",)),
    "moe_capacity": Case("misconfig", overrides=("--model.moe.capacity_factor=1.0",)),
    "mod_capacity": Case("misconfig", overrides=("--model.mod.capacity=0.125",)),
    "micro_batch": Case("misconfig", overrides=("--train.micro_batch_size=1",), by_time=True),
    "lr_spike": Case("fault", inject="lr_spike@{at}x100"),
    "nan_grad": Case("fault", inject="nan_grad@{at}"),
    "loss_spike": Case("fault", inject="loss_spike@{at}"),
    "bad_batch": Case("fault", inject="bad_batch@{at}"),
    "oom": Case("fault", inject="oom@micro_batch>4"),
    "expert_collapse": Case("fault", inject="expert_collapse@0"),
    "mod_collapse": Case("fault", inject="mod_collapse@0"),
}
QUICK = {"steps": 30, "seeds": "0", "cases": "lr_low,clean", "eval_every": 10}
REACH_GOAL, SEED_SHARE_GOAL, COST_GOAL_PCT = 0.8, 0.8, 0.5
# actions whose point is time or memory, not the loss (the step's arithmetic is the same): the
# held-out loss cannot say whether they helped, so they get no evidence entry
LOSS_NEUTRAL = frozenset({"eval_every", "micro_batch", "grad_checkpointing"})


def case_overrides(case: str, preset: str, at: int) -> list[str]:
    """The config overrides of ``case`` on ``preset`` (LR factors are relative to the preset's LR)."""
    from lumina.configure import load_config

    c = CASES[case]
    base = load_config(preset=preset)
    out = list(c.overrides)
    if c.lr_factor is not None:
        out.append(f"--train.lr={base.train.lr * c.lr_factor:.6g}")
    if case == "micro_batch":  # the same held-out windows: batch p of size 1 is window p (lumina.data.text)
        out.append(f"--train.eval_batches={base.train.eval_batches * base.train.batch_size}")
    if case in ("moe_capacity", "expert_collapse") and not base.model.moe.enabled:
        raise SystemExit(f"orchestrator: case {case} needs a MoE preset; {preset} has no experts")
    if case in ("mod_capacity", "mod_collapse") and not base.model.mod.enabled:
        raise SystemExit(f"orchestrator: case {case} needs a MoD preset; {preset} does not route depth")
    if c.inject is not None:
        out.append(f"--train.inject={c.inject.format(at=at)}")
    return out


def one_run(
    case: str, seed: int, on: bool, steps: int, at: int, root: Path, preset: str = "debug",
    eval_every: int = 10, gate: str = "evidence",
) -> dict:  # fmt: skip
    from lumina import loop, orchestrator, tree
    from lumina.configure import load_config
    from lumina.step import init_train_state

    overrides = case_overrides(case, preset, at)
    if gate == "raw":  # the findings' confidence alone: what the evidence table is measured with
        overrides.append("--orchestrator.evidence=")
    cfg = load_config(
        preset=preset,
        overrides=[f"--train.steps={steps}", f"--seed={seed}", f"--train.eval_every={eval_every}",
                   f"--run_dir={root}", f"--name={case}-{seed}-{'on' if on else 'off'}",
                   f"--orchestrator.enabled={str(on).lower()}", *overrides],
    )  # fmt: skip
    t0 = time.perf_counter()
    survived, err = True, ""
    try:
        result = loop.train(cfg, out=io.StringIO())
        run_dir, final = result.run_dir, result.final_eval
    except (loop.OutOfMemory, RuntimeError) as e:
        survived, err, final = False, str(e).splitlines()[0], None
        run_dir = root / cfg.name
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    curve, t_run = eval_curve(recs)
    decisions = list(orchestrator.read_log(run_dir / orchestrator.DECISIONS_FILE)) if on else []
    survived = (
        survived and final is not None and math.isfinite(final) and bool(train) and train[-1]["step"] == steps
    )
    step_s = statistics.mean(r["step_s"] for r in train[1:]) if len(train) > 1 else float("nan")
    orch_s = train[-1].get("orch_s", 0.0) if train else 0.0
    orch_ms = 1e3 * orch_s / max(1, len(train))
    snap_ms = 1e3 * (train[-1].get("orch_snapshot_s", 0.0) if train else 0.0) / max(1, len(train))
    state_mb = sum(v.numel() * v.element_size() for v in tree.flatten(init_train_state(cfg)).values()) / 2**20
    tps = [r["tokens_per_s"] for r in train[1:]]
    return {
        "case": case, "kind": CASES[case].kind,
        "overrides": " ".join(o.removeprefix("--") for o in overrides), "seed": seed,
        "orchestrator": "on" if on else "off", "survived": survived,
        "final_eval": round(final, 5) if final is not None and math.isfinite(final) else "",
        "steps_run": len(train), "steps_lost": max(0, len(train) - steps) if survived else "",
        "gate": gate, "decisions": len(decisions),
        "actions": " ".join(orchestrator.action_label(d["action"], d["args"]) for d in decisions) or err[:80],
        "wall_s": round(wall, 1), "train_s": round(t_run, 2), "mean_step_s": round(step_s, 4),
        "tokens_per_s": round(statistics.median(tps), 1) if tps else "",
        "orch_ms_per_step": round(orch_ms, 3),
        "orch_cost_pct": round(100 * orch_ms / 1e3 / step_s, 4) if step_s == step_s else "",
        "snapshot_ms_per_step": round(snap_ms, 3),
        "snapshot_mb": round(cfg.orchestrator.snapshot_ring * state_mb, 1) if on else 0,
        "eval_curve": json.dumps(curve, separators=(",", ":")),
    }  # fmt: skip


def eval_curve(recs: list[dict]) -> tuple[list[tuple[int, float, float]], float]:
    """The held-out curve of a run's metrics records as (optimizer steps run, train seconds, loss),
    and the run's train seconds. A rollback sends the step counter back, so the steps run (redone
    ones included) are counted from the train records. The driver writes the evaluation after step
    s (s > 0) just before step s's own train record, so that evaluation is completed by it."""
    curve, n_run, t_run, pending = [], 0, 0.0, None
    for r in recs:
        if r["kind"] == "train":
            n_run, t_run = n_run + 1, t_run + r["step_s"]
            if pending is not None and r["step"] == pending["step"]:
                curve.append((n_run, round(t_run, 3), round(pending["loss"], 5)))
                pending = None
        elif r["kind"] == "eval":
            if r["step"] == 0:
                curve.append((0, 0.0, round(r["loss"], 5)))
            else:
                pending = r
    if pending is not None:  # no train record followed (a crash in between)
        curve.append((n_run, round(t_run, 3), round(pending["loss"], 5)))
    return curve, t_run


def target_loss(off: dict) -> float | None:
    """The off-run's final held-out loss, or its last finite one when it failed."""
    if off["final_eval"] != "":
        return float(off["final_eval"])
    finite = [loss for _, _, loss in json.loads(off["eval_curve"]) if math.isfinite(loss)]
    return finite[-1] if finite else None


def reach(on: dict, off: dict, steps: int) -> tuple[float | None, float | None]:
    """(steps, train time) the on-run took to reach the off-run's target loss, as fractions of the
    step budget and of the off-run's train time; None where it never did."""
    target = target_loss(off)
    if target is None or not on["survived"]:
        return None, None
    for n, t, loss in json.loads(on["eval_curve"]):
        if loss <= target:
            return n / steps, t / float(off["train_s"]) if float(off["train_s"]) > 0 else None
    return None, None


def t_interval(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of Student's t interval; half-width nan for fewer than 2 values."""
    from lumina.evaluate import student_t_sf

    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan")
    df, alpha = len(xs) - 1, 1 - level
    lo, hi = 0.0, 1e3  # the two-sided quantile: student_t_sf(q, df) = alpha, by bisection
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_sf(mid, df) > alpha else (lo, mid)
    return m, lo * statistics.stdev(xs) / math.sqrt(len(xs))


def _ci(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "—"
    m, hw = t_interval(xs)
    return f"{m:.{digits}f}" + ("" if math.isnan(hw) else f" ± {hw:.{digits}f}")


def case_stats(rows: list[dict], case: str, steps: int, tol: float) -> dict | None:
    on = {r["seed"]: r for r in rows if r["case"] == case and r["orchestrator"] == "on"}
    off = {r["seed"]: r for r in rows if r["case"] == case and r["orchestrator"] == "off"}
    seeds = sorted(set(on) & set(off))
    if not seeds:
        return None
    c = CASES[case]
    reaches = [reach(on[s], off[s], steps) for s in seeds]
    key = 1 if c.by_time else 0
    fr = [x[key] for x in reaches]
    met_seeds = sum(x is not None and x <= REACH_GOAL for x in fr)
    both = [s for s in seeds if on[s]["final_eval"] != "" and off[s]["final_eval"] != ""]
    diffs = [float(on[s]["final_eval"]) - float(off[s]["final_eval"]) for s in both]
    rel = [d / float(off[s]["final_eval"]) for d, s in zip(diffs, both, strict=True)]
    cost = [float(on[s]["orch_cost_pct"]) for s in seeds if on[s]["orch_cost_pct"] != ""]
    alive_on = sum(on[s]["survived"] for s in seeds)
    if c.kind == "misconfig":
        goal = met_seeds >= SEED_SHARE_GOAL * len(seeds)
    elif c.kind == "clean":
        goal = bool(rel) and len(rel) == len(seeds) and statistics.mean(rel) <= tol
    else:
        goal = alive_on == len(seeds)
    return {
        "case": case, "kind": c.kind, "n": len(seeds), "reach": fr, "met_seeds": met_seeds,
        "final_on": [float(on[s]["final_eval"]) for s in seeds if on[s]["final_eval"] != ""],
        "final_off": [float(off[s]["final_eval"]) for s in seeds if off[s]["final_eval"] != ""],
        "diffs": diffs, "rel": rel, "alive_on": alive_on, "alive_off": sum(off[s]["survived"] for s in seeds),
        "decisions": statistics.mean(on[s]["decisions"] for s in seeds),
        "cost": statistics.median(cost) if cost else float("nan"),
        "goal": goal, "cost_goal": bool(cost) and statistics.median(cost) <= COST_GOAL_PCT,
    }  # fmt: skip


def summarise(rows: list[dict], steps: int, tol: float) -> str:
    """The Markdown table per case, goals marked, plus the cost line."""
    head = ["case", "kind", "reach ≤ 0.8 (seeds)", "reach (median)", "final eval on (95 % CI)",
            "off (95 % CI)", "on − off (paired 95 % CI)", "survived on / off", "decisions / run",
            "orch cost % step", "goal"]  # fmt: skip
    lines = h.markdown_head(head)
    clean_off = {r["seed"]: float(r["final_eval"]) for r in rows if r["case"] == "clean"
                 and r["orchestrator"] == "off" and r["final_eval"] != ""}  # fmt: skip
    notes = []
    for case in CASES:
        s = case_stats(rows, case, steps, tol)
        if s is None:
            continue
        c = CASES[case]
        known = [x for x in s["reach"] if x is not None]
        med = statistics.median(x if x is not None else math.inf for x in s["reach"])
        med_s = "never" if math.isinf(med) else f"{med:.2f}" + (" (time)" if c.by_time else "")
        reach_s = f"{s['met_seeds']}/{s['n']}" + (" (time)" if c.by_time else "")
        if not known and s["n"]:
            reach_s += " (never)"
        if c.kind == "clean":
            rel = statistics.mean(s["rel"]) if s["rel"] else float("nan")
            goal = f"{'met' if s['goal'] else 'NOT met'} (on − off {100 * rel:+.2f} % ≤ {100 * tol:.1f} %)"
        elif c.kind == "fault":
            goal = f"{'met' if s['goal'] else 'NOT met'} (survival)"
        else:
            goal = f"{'met' if s['goal'] else 'NOT met'} (reach)"
        goal += "; cost " + ("met" if s["cost_goal"] else "NOT met")
        lines.append(
            f"| {case} | {c.kind} | {reach_s} | {med_s} | {_ci(s['final_on'])} | {_ci(s['final_off'])} "
            f"| {_ci(s['diffs'], 4)} | {s['alive_on']}/{s['n']} / {s['alive_off']}/{s['n']} "
            f"| {s['decisions']:.1f} | {s['cost']:.3f} | {goal} |"
        )
        gaps = [float(r["final_eval"]) - clean_off[r["seed"]] for r in rows
                if r["case"] == case and r["orchestrator"] == "off" and r["final_eval"] != ""
                and r["seed"] in clean_off]  # fmt: skip
        if c.kind == "misconfig" and gaps:
            notes.append(f"{case}: off-run final eval − clean off-run's, same seed: {_ci(gaps, 4)}")
    cost = [r["orch_cost_pct"] for r in rows if r["orchestrator"] == "on" and r["orch_cost_pct"] != ""]
    if cost:
        ring = max(r["snapshot_mb"] for r in rows)
        snap = statistics.median(r["snapshot_ms_per_step"] for r in rows if r["orchestrator"] == "on")
        lines.append(
            f"\norchestrator cost (decide + apply): median {statistics.median(cost):.3f} % of the step time "
            f"(max {max(cost):.3f} %; goal ≤ {COST_GOAL_PCT} %); snapshot copies {snap:.2f} ms per step; "
            f"snapshot ring {ring} MB"
        )
    lines.append(
        f"reach: the first evaluation at which the on-run's held-out loss ≤ the off-run's final one, as "
        f"optimizer steps run / {steps} (time: train seconds / the off-run's); goal ≤ {REACH_GOAL} on ≥ "
        f"{SEED_SHARE_GOAL:.0%} of seeds. CI: Student's t over seeds (± half-width; none for one seed)."
    )
    if notes:
        lines.append("how mis-configured (the off-runs against the clean off-runs):")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines)


def load_rows(
    path: Path, preset: str, steps: int, eval_every: int, gate: str = "raw", device: str | None = None
) -> list[dict]:
    """The newest row of each (case, seed, arm) in the results CSV at this preset, step budget and
    evaluation cadence, typed as ``one_run`` returns them (so cases run in separate invocations are
    summarised together); on-runs of ``gate`` only (an off-run is the same under either). Rows of one
    machine only (``device``, default: the newest matching row's): paired runs and their comparisons
    with the clean case need one machine's numerics (the last bits differ between CPUs)."""
    import csv

    if not path.exists():
        h.fail(f"{path}: no results yet; run the benchmark first")
    newest: dict[tuple, dict] = {}
    with path.open(newline="") as f:
        matching = [
            r for r in csv.DictReader(f)
            if (r["preset"], r["steps"], r["eval_every"]) == (preset, str(steps), str(eval_every))
        ]  # fmt: skip
    devices = sorted({r["device"] for r in matching})
    if device is not None and device not in devices:
        h.fail(f"{path}: no rows of device {device!r} at {preset}, {steps} steps, eval every {eval_every}"
               f" (devices there: {', '.join(devices) or 'none'})")  # fmt: skip
    device = device or (matching[-1]["device"] if matching else None)
    for r in matching:
        if r["device"] != device:
            continue
        if r["case"] not in CASES or (r["orchestrator"] == "on" and r["gate"] != gate):
            continue
        r = dict(r, seed=int(r["seed"]), survived=r["survived"] == "True", decisions=int(r["decisions"]),
                 snapshot_mb=float(r["snapshot_mb"] or 0),
                 snapshot_ms_per_step=float(r["snapshot_ms_per_step"]),
                 orch_cost_pct=float(r["orch_cost_pct"]) if r["orch_cost_pct"] else "")  # fmt: skip
        newest[(r["case"], r["seed"], r["orchestrator"])] = r  # file order: the last one is the newest
    return list(newest.values())


def evidence(rows: list[dict]) -> str:
    """Per action kind, over the paired seeds whose on-run took it at least once: how often the
    on-run ended with a lower held-out loss than its off-run (or survived where the off-run failed).
    A run that took several kinds counts for each (the paired runs cannot separate them). Last line:
    the table as ``OrchestratorConfig.evidence`` entries (labels with a direction, not loss-neutral)."""
    on = {(r["case"], r["seed"]): r for r in rows if r["orchestrator"] == "on"}
    off = {(r["case"], r["seed"]): r for r in rows if r["orchestrator"] == "off"}
    stats: dict[str, list] = {}
    for key in sorted(set(on) & set(off)):
        a, b = on[key], off[key]
        kinds = sorted(set(a["actions"].split())) if a["decisions"] else []  # else: the error text
        if not kinds:
            continue
        if a["survived"] and not b["survived"]:
            better, diff = True, None
        elif a["final_eval"] != "" and b["final_eval"] != "":
            diff = float(a["final_eval"]) - float(b["final_eval"])
            better = diff < 0
        else:
            better, diff = False, None
        for k in kinds:
            stats.setdefault(k, []).append((key[0], better, diff))
    head = ["action", "paired runs", "improved", "cases", "on − off (mean)", "Laplace (k+1)/(n+2)",
            "Wilson 95 % lower"]  # fmt: skip
    lines = h.markdown_head(head)
    entries = []
    for k, xs in sorted(stats.items(), key=lambda kv: -len(kv[1])):
        n, good = len(xs), sum(b for _, b, _ in xs)
        diffs = [d for _, _, d in xs if d is not None]
        z, p = 1.959964, good / n  # Wilson's score interval, lower end
        wilson = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z**2 / n)
        cases = ", ".join(sorted({c for c, _, _ in xs}))
        mean = f"{statistics.mean(diffs):+.4f}" if diffs else "—"
        neutral = k.rstrip("+-") in LOSS_NEUTRAL
        if neutral:
            k += " (not meant to move the loss)"
        elif k[-1] in "+-":  # rows from before the labels named a direction are left out of the entries
            entries.append(f"{k}={good}/{n}")
        lines.append(f"| {k} | {n} | {good} | {cases} | {mean} | {(good + 1) / (n + 2):.2f} | {wilson:.2f} |")
    lines.append(f"\nOrchestratorConfig.evidence entries: {tuple(entries)}")
    return "\n".join(lines)


def registry_experiment(
    steps: int, seeds: list[int], past_lrs: list[float], starts: list[float]
) -> list[dict]:
    """Fill a registry with runs at ``past_lrs`` (seed 0), then start runs at each LR in ``starts``
    with the suggestion applied and without it (``registry_mode=off``), per seed (not 0)."""
    from lumina import loop
    from lumina.configure import load_config

    rows = []
    with tempfile.TemporaryDirectory(prefix="lumina-registry-bench-") as tmp:

        def run(name, lr, seed, mode):
            cfg = load_config(preset="debug", overrides=[
                f"--train.steps={steps}", f"--seed={seed}", f"--train.eval_every={steps}", f"--run_dir={tmp}",
                f"--name={name}", f"--train.lr={lr}", f"--orchestrator.registry_mode={mode}"])  # fmt: skip
            r = loop.train(cfg, out=io.StringIO())
            used = json.loads((r.run_dir / "config.json").read_text())["train"]["lr"]
            return {"name": name, "seed": seed, "start_lr": lr, "mode": mode, "used_lr": used,
                    "final_eval": round(r.final_eval, 5)}  # fmt: skip

        for lr in past_lrs:
            rows.append(run(f"past-{lr:g}", lr, 0, "log"))
            print(f"registry past run lr {lr:g}: eval {rows[-1]['final_eval']}", flush=True)
        for lr in starts:
            for seed in seeds:
                for mode in ("apply", "off"):
                    rows.append(run(f"new-{lr:g}-{seed}-{mode}", lr, seed, mode))
                    r = rows[-1]
                    print(f"registry start lr {lr:g} seed {seed} {mode:5s}: used lr {r['used_lr']:.4g} "
                          f"eval {r['final_eval']}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--steps", type=int, default=150, help="the step budget of every run")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out evaluation cadence, both runs")
    ap.add_argument("--at", type=float, default=0.5, help="fault step as a fraction of --steps")
    ap.add_argument("--tol", type=float, default=0.005, help="clean goal: on within this of off")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: {QUICK['cases']}, seed {QUICK['seeds']}, {QUICK['steps']} steps, "
                         "nothing saved (explicit --cases/--seeds/--steps still apply)")  # fmt: skip
    ap.add_argument("--no-save", action="store_true", help="do not append to the results CSV")
    ap.add_argument(
        "--gate",
        choices=("evidence", "raw"),
        default="evidence",
        help="on-runs with the evidence table as shipped (default), or raw: the findings' "
        "confidence alone (orchestrator.evidence empty), what the table is measured with",
    )
    ap.add_argument("--arms", default="on,off",
                    help="which runs per seed (on: only the on-runs, paired by --report with off-runs "
                         "already in the CSV: an off-run does not depend on the gate)")  # fmt: skip
    ap.add_argument("--report", action="store_true",
                    help="run nothing: summarise the results CSV (the newest row per case, seed and "
                         "arm at --preset, --steps, --eval-every) and print the per-action evidence "
                         "table")  # fmt: skip
    ap.add_argument("--device", default=None,
                    help="with --report: the rows of this machine (the CSV's device column: the CPU "
                         "model; x86_64 on rows written before it named it); default: the newest "
                         "matching row's")  # fmt: skip
    ap.add_argument("--registry", action="store_true",
                    help="instead: does applying the registry's suggestion help? (past runs, then new "
                         "runs at a good and a bad LR with and without the suggestion)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.registry:
        seeds = [int(x) for x in args.seeds.split(",") if int(x) != 0] or [1]
        rows = registry_experiment(args.steps, seeds, [1e-3, 3e-3, 1e-2], [3e-3, 3e-2])
        if not args.no_save:
            stamp = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "commit": h.commit(),
                     "threads": torch.get_num_threads(), "steps": args.steps}  # fmt: skip
            h.append_csv(REGISTRY_RESULTS, [{**stamp, **r} for r in rows])
        return 0
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        flags = {"steps": "--steps", "seeds": "--seeds", "cases": "--cases", "eval_every": "--eval-every"}
        for key, flag in flags.items():
            if not any(a == flag or a.startswith(flag + "=") for a in given):
                setattr(args, key, QUICK[key])
        args.no_save = True
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASES)}")
    if args.report:
        for gate in ("raw", "evidence"):
            rows = [r for r in load_rows(RESULTS, args.preset, args.steps, args.eval_every, gate, args.device)
                    if r["case"] in cases]  # fmt: skip
            if rows and gate == "raw":
                print(f"rows of device {rows[0]['device']!r}\n")
            if any(r["orchestrator"] == "on" for r in rows):
                print(f"on-runs with gate={gate}:\n{summarise(rows, args.steps, args.tol)}\n")
                if gate == "raw":
                    print(f"evidence (gate=raw runs):\n{evidence(rows)}\n")
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - {"on", "off"} or len(set(arms)) < len(arms):
        ap.error(f"--arms {args.arms!r}: expected on, off or on,off")
    arms = [a for a in ("on", "off") if a in arms]  # the pairing below reads (on, off) in this order
    at = max(1, round(args.at * args.steps))
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "commit": h.commit(),
            "device": h.cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "preset": args.preset, "steps": args.steps,
            "eval_every": args.eval_every}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="lumina-orch-bench-") as tmp:
        for case in cases:
            for seed in seeds:
                for on in [arm == "on" for arm in arms]:
                    r = one_run(
                        case, seed, on, args.steps, at, Path(tmp), args.preset, args.eval_every, args.gate
                    )
                    r["reach_steps"] = r["reach_time"] = ""  # the on-run's, below, once its pair ran
                    rows.append(r)
                    print(f"{case:16s} seed {seed} {r['orchestrator']:3s}: survived={r['survived']} "
                          f"eval={r['final_eval']} decisions={r['decisions']} [{r['actions']}] "
                          f"lost={r['steps_lost']} {r['wall_s']}s (train {r['train_s']}s)",
                          flush=True)  # fmt: skip
                if len(arms) < 2:  # no pair in this invocation (--report pairs across them)
                    continue
                on_r, off_r = rows[-2], rows[-1]
                frac, tfrac = reach(on_r, off_r, args.steps)
                on_r["reach_steps"] = "" if frac is None else round(frac, 4)
                on_r["reach_time"] = "" if tfrac is None else round(tfrac, 4)
    if not args.no_save:
        h.append_csv(RESULTS, [{**meta, **r} for r in rows])
    print()
    print(summarise(rows, args.steps, args.tol))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
