"""Distributed strategies against one process with the same global batch: tokens/s, peak memory and
train state per rank.

    python -m benchmarks.distributed                           # debug + debug_200m, ddp / fsdp (+ zero*)
    python -m benchmarks.distributed --presets debug --steps 6 --strategies ddp,fsdp --no-save

Per preset, each configuration is a real ``lumina.run`` (the packaged text, the orchestrator and
evaluation off): one process (``none``), then ``torchrun --nproc_per_node=W`` per strategy, all with
the same global batch split into the same micro-batches (W of them: one per rank), eager (a
compiled step would time compilation: debug_200m compiles for minutes on 2 cores) and in fp32 on
CPU (bf16 on CUDA). Per run, from
its ``metrics.jsonl``: the median tokens/s of the steps after the first two (the first includes
warm-up), the peak memory (the peak resident set on CPU, the allocator's peak on CUDA; the maximum
over ranks), and the train state each rank holds (parameters + AdamW moments + counters: its
shards under FSDP / ZeRO-3). ``vs_one`` is tokens/s over the one-process run's in the same
invocation. Rows go to ``benchmarks/results/distributed.csv``.

On a machine with C cores each rank gets C / W threads, so on CPU the ratios measure the cost of the
engines' communication and bookkeeping on the same total compute, not a speed-up: a speed-up needs
W devices.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script or with -m
from benchmarks import _harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.csv"
FIELDS = ["date", "commit", "device", "cpus", "torch", "preset", "batch", "seq_len", "steps", "world",
          "strategy", "tokens_per_s", "vs_one", "peak_mb_per_rank", "state_mb_per_rank", "state_vs_one",
          "final_loss"]  # fmt: skip
# debug_200m is ~200M parameters (114M active): 2 sequences of 128 tokens per step keep it to
# seconds per step on 2 cores
SHAPES = {"debug": ("8", "128"), "debug_200m": ("2", "128")}


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _run(preset: str, strategy: str, world: int, steps: int, root: Path) -> dict:
    """One run; ``world``: the number of micro-batches per step (the ranks, for a strategy)."""
    batch, seq = SHAPES.get(preset, ("8", "128"))
    args = [f"--preset={preset}", f"--steps={steps}", f"--train.batch_size={batch}", f"--train.seq_len={seq}",
            f"--train.micro_batch_size={int(batch) // world}", "--train.eval_batches=0",
            "--orchestrator.enabled=false", "--train.log_every=1000", "--train.compile=false",
            f"--train.precision={'fp32' if _on_cpu() else 'bf16'}", f"--run-dir={root}",
            f"--name={preset}-{strategy}"]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // (1 if strategy == "none" else world))
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu")
    )
    if strategy == "none":
        cmd = [sys.executable, "-m", "lumina.run", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone",
               "-m", "lumina.run", "--dist", strategy, *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"{preset} {strategy}: exit {proc.returncode}: {tail[0]}")
    recs = [
        json.loads(line)
        for line in (root / f"{preset}-{strategy}" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in recs if r["kind"] == "train"]
    dist = [r for r in recs if r["kind"] == "dist"]
    if dist:
        state_mb = dist[0]["state_mb_per_rank"]
    else:  # one process: the whole train state
        from lumina import tree
        from lumina.configure import load_config
        from lumina.step import init_train_state

        cfg = load_config(preset, overrides=[a for a in args if a.startswith("--train.")])
        state_mb = (
            sum(v.numel() * v.element_size() for v in tree.flatten(init_train_state(cfg)).values()) / 2**20
        )
    timed = train[2:] or train
    return {
        "preset": preset, "batch": batch, "seq_len": seq, "steps": steps,
        "world": 1 if strategy == "none" else world, "strategy": strategy,  # ranks
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
        "peak_mb_per_rank": round(max(r["memory_mb"] for r in train), 1),
        "state_mb_per_rank": round(state_mb, 1), "final_loss": round(train[-1]["loss"], 5),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="debug,debug_200m")
    ap.add_argument("--strategies", default=None, help="comma list (default: ddp,fsdp and zero1,zero2,zero3 "
                    "when deepspeed imports)")  # fmt: skip
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    strategies = args.strategies.split(",") if args.strategies else ["ddp", "fsdp"]
    if args.strategies is None:
        try:
            import deepspeed  # noqa: F401

            strategies += ["zero1", "zero2", "zero3"]
        except ImportError:
            print("[bench] deepspeed not importable: no zero rows")
    device = f"{platform.processor() or platform.machine()} cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="lumina-dist-bench-") as tmp:
        for preset in args.presets.split(","):
            base = _run(preset, "none", args.world, args.steps, Path(tmp))
            rows.append(base | {"vs_one": 1.0, "state_vs_one": 1.0})
            print(f"[bench] {preset} one process: {base['tokens_per_s']} tok/s", flush=True)
            for strategy in strategies:
                try:
                    r = _run(preset, strategy, args.world, args.steps, Path(tmp))
                except RuntimeError as e:
                    print(f"[bench] {e}", flush=True)
                    continue
                r["vs_one"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                r["state_vs_one"] = round(r["state_mb_per_rank"] / base["state_mb_per_rank"], 3)
                rows.append(r)
                print(f"[bench] {preset} {strategy}: {r['tokens_per_s']} tok/s ({r['vs_one']}x)", flush=True)
    common = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "commit": h.commit(), "device": device,
              "cpus": os.cpu_count(), "torch": torch.__version__}  # fmt: skip
    head = ["preset", "strategy", "ranks", "tokens/s", "vs one process", "peak MB / rank", "state MB / rank",
            "state vs one"]  # fmt: skip
    print("\n" + "\n".join(h.markdown_head(head)))
    for r in rows:
        cells = [r["preset"], r["strategy"], r["world"], f"{r['tokens_per_s']:.0f}", f"{r['vs_one']:.2f}x",
                 f"{r['peak_mb_per_rank']:.0f}", f"{r['state_mb_per_rank']:.0f}",
                 f"{r['state_vs_one']:.2f}"]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    if not args.no_save:
        RESULTS.parent.mkdir(exist_ok=True)
        new = not RESULTS.exists()
        with RESULTS.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(common | r)
        print(f"[bench] {len(rows)} rows -> {RESULTS}")


if __name__ == "__main__":
    main()
