"""Does the orchestrator help? Paired runs with it on and off, per injected fault and seed.

    python -m benchmarks.orchestrator                         # 8 cases x 3 seeds x on/off, debug preset
    python -m benchmarks.orchestrator --steps 40 --seeds 0 --cases clean,nan_grad   # smoke test

Each case trains the ``debug`` preset (real Shakespeare text, CPU) for ``--steps`` steps twice per
seed, identical except ``orchestrator.enabled``; the fault is injected by the driver
(``train.inject``) at ``--at`` (a fraction of the run) or at initialisation. Per run: survived (all
steps done and the final eval loss finite), final eval loss, optimizer steps redone after rollbacks
("steps lost"), decisions, wall time, and the orchestrator's own time (``decide`` + applying the
decisions; copying snapshots into the ring is reported separately) against the mean step time. Rows go to
``benchmarks/results/orchestrator.csv``; a summary table (Markdown) is printed.

Goal (issue): with the orchestrator every injected run survives and ends at an eval loss <= the
off run's on >= 80 % of seeds; on the clean run decisions are few and the result no worse; its cost
<= 0.5 % of the step time. "No worse" is judged with a tolerance of 0.5 % of the loss (``--tol``),
because a different but equally good trajectory differs in the last digits.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script or with -m
from benchmarks import _harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "orchestrator.csv"
CASES = {  # name -> spec template ({at}: the fault's step)
    "clean": None,
    "lr_spike": "lr_spike@{at}x100",
    "nan_grad": "nan_grad@{at}",
    "loss_spike": "loss_spike@{at}",
    "bad_batch": "bad_batch@{at}",
    "oom": "oom@micro_batch>4",
    "expert_collapse": "expert_collapse@0",
    "mod_collapse": "mod_collapse@0",
}
FIELDS = ["date", "commit", "device", "threads", "torch", "preset", "steps", "case", "inject", "seed",
          "orchestrator", "survived", "final_eval", "steps_run", "steps_lost", "decisions", "actions",
          "wall_s", "mean_step_s", "orch_ms_per_step", "orch_cost_pct", "snapshot_ms_per_step",
          "snapshot_mb"]  # fmt: skip


def one_run(case: str, seed: int, on: bool, steps: int, at: int, root: Path) -> dict:
    from lumina import loop, orchestrator, tree
    from lumina.configure import load_config
    from lumina.step import init_train_state

    spec = CASES[case]
    inject = [] if spec is None else [f"--train.inject={spec.format(at=at)}"]
    cfg = load_config(
        preset="debug",
        overrides=[f"--train.steps={steps}", f"--seed={seed}", f"--train.eval_every={steps}",
                   f"--run_dir={root}", f"--name={case}-{seed}-{'on' if on else 'off'}",
                   f"--orchestrator.enabled={str(on).lower()}", *inject],
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
    decisions = list(orchestrator.read_log(run_dir / orchestrator.DECISIONS_FILE)) if on else []
    survived = (
        survived and final is not None and math.isfinite(final) and bool(train) and train[-1]["step"] == steps
    )
    step_s = statistics.mean(r["step_s"] for r in train[1:]) if len(train) > 1 else float("nan")
    orch_s = train[-1].get("orch_s", 0.0) if train else 0.0
    orch_ms = 1e3 * orch_s / max(1, len(train))
    snap_ms = 1e3 * (train[-1].get("orch_snapshot_s", 0.0) if train else 0.0) / max(1, len(train))
    state_mb = sum(v.numel() * v.element_size() for v in tree.flatten(init_train_state(cfg)).values()) / 2**20
    return {
        "case": case, "inject": "" if spec is None else spec.format(at=at), "seed": seed,
        "orchestrator": "on" if on else "off", "survived": survived,
        "final_eval": round(final, 5) if final is not None and math.isfinite(final) else "",
        "steps_run": len(train), "steps_lost": max(0, len(train) - steps) if survived else "",
        "decisions": len(decisions), "actions": " ".join(d["action"] for d in decisions) or err[:80],
        "wall_s": round(wall, 1), "mean_step_s": round(step_s, 4), "orch_ms_per_step": round(orch_ms, 3),
        "orch_cost_pct": round(100 * orch_ms / 1e3 / step_s, 4) if step_s == step_s else "",
        "snapshot_ms_per_step": round(snap_ms, 3),
        "snapshot_mb": round(cfg.orchestrator.snapshot_ring * state_mb, 1) if on else 0,
    }  # fmt: skip


REGISTRY_RESULTS = RESULTS.with_name("orchestrator_registry.csv")


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


def summarise(rows: list[dict], tol: float) -> str:
    head = ["case", "survived on / off", "final eval on (mean)", "off (mean)", "on <= off (seeds)",
            "decisions (on, mean)", "steps lost (mean)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in CASES:
        on = [r for r in rows if r["case"] == case and r["orchestrator"] == "on"]
        off = [r for r in rows if r["case"] == case and r["orchestrator"] == "off"]
        if not on:
            continue
        pairs = {r["seed"]: r for r in off}
        wins = 0
        for r in on:
            o = pairs.get(r["seed"])
            if r["survived"] and (
                o is None or not o["survived"] or r["final_eval"] <= o["final_eval"] * (1 + tol)
            ):
                wins += 1

        def mean(rs, key):
            vals = [r[key] for r in rs if r["survived"] and r[key] != ""]
            return f"{statistics.mean(vals):.3f}" if vals else "—"

        alive_on, alive_off = sum(r["survived"] for r in on), sum(r["survived"] for r in off)
        lines.append(
            f"| {case} | {alive_on}/{len(on)} / {alive_off}/{len(off)} "
            f"| {mean(on, 'final_eval')} | {mean(off, 'final_eval')} | {wins}/{len(on)} "
            f"| {statistics.mean(r['decisions'] for r in on):.1f} | {mean(on, 'steps_lost')} |"
        )
    cost = [r["orch_cost_pct"] for r in rows if r["orchestrator"] == "on" and r["orch_cost_pct"] != ""]
    if cost:
        ring = max(r["snapshot_mb"] for r in rows)
        lines.append(
            f"\norchestrator cost: median {statistics.median(cost):.3f} % of the step time "
            f"(max {max(cost):.3f} %); snapshot ring {ring} MB"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--at", type=float, default=0.5, help="fault step as a fraction of --steps")
    ap.add_argument("--tol", type=float, default=0.005)
    ap.add_argument("--no-save", action="store_true", help="do not append to the results CSV")
    ap.add_argument("--registry", action="store_true",
                    help="instead: does applying the registry's suggestion help? (past runs, then new "
                         "runs at a good and a bad LR with and without the suggestion)")  # fmt: skip
    args = ap.parse_args()
    if args.registry:
        seeds = [int(x) for x in args.seeds.split(",") if int(x) != 0] or [1]
        rows = registry_experiment(args.steps, seeds, [1e-3, 3e-3, 1e-2], [3e-3, 3e-2])
        if not args.no_save:
            stamp = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "commit": h.commit(),
                     "threads": torch.get_num_threads(), "steps": args.steps}  # fmt: skip
            new = not REGISTRY_RESULTS.exists()
            with open(REGISTRY_RESULTS, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=[*stamp, *rows[0]])
                if new:
                    w.writeheader()
                for r in rows:
                    w.writerow({**stamp, **r})
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    at = max(1, round(args.at * args.steps))
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "commit": h.commit(),
            "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "preset": "debug", "steps": args.steps}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="lumina-orch-bench-") as tmp:
        for case in cases:
            for seed in seeds:
                for on in (True, False):
                    r = one_run(case, seed, on, args.steps, at, Path(tmp))
                    rows.append(r)
                    print(f"{case:16s} seed {seed} {r['orchestrator']:3s}: survived={r['survived']} "
                          f"eval={r['final_eval']} decisions={r['decisions']} [{r['actions']}] "
                          f"lost={r['steps_lost']} {r['wall_s']}s", flush=True)  # fmt: skip
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with open(RESULTS, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})
    print()
    print(summarise(rows, args.tol))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
