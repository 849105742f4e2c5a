"""One preset's train step on one device: compile time, step time, tokens/s, MFU and peak memory.

    python -m benchmarks.mfu --preset b1 --label dense-1b --set model.moe.num_experts=0 \\
        --set model.mod.enabled=false --batch 8 --seq 2048            # GPU (bf16, compiled)
    python -m benchmarks.mfu --preset debug --device cpu --eager --batch 2 --seq 64 --steps 2 --no-save

The step is Lumina's own (``make_train_step``: pure, ``torch.compile(fullgraph=True)`` unless
``--eager``) on random tokens, from the preset's initialisation, with ``train.precision`` (default
bf16). The first call is reported as the compile time (it includes the first step's work); then
``--warmup`` steps, then the median of ``--steps`` timed steps (CUDA synchronised before each clock
read). MFU = training FLOPs per token (``lumina.metrics.flops_per_token``: 6 x active parameters of
the matmuls, MoD-scaled, plus attention) x tokens/s over the device's dense bf16 peak
(``lumina.metrics.peak_flops``). Peak memory is the CUDA allocator's peak (the process's peak RSS on
CPU). Every step's loss must be finite, or the run fails. Rows are appended to
``benchmarks/results/mfu.csv`` with device, versions and the resolved shapes; an OOM is a row too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from benchmarks import _harness as h
from lumina import metrics, presets
from lumina.config import ConfigError
from lumina.configure import load_config
from lumina.optim import default_hp
from lumina.step import init_train_state, make_train_step

RESULTS = Path(__file__).resolve().parent / "results" / "mfu.csv"
PAD_ID = -100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg, device: torch.device) -> TensorDict:
    B, T = cfg.train.batch_size, cfg.train.seq_len
    x_BT = torch.randint(0, cfg.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    targets_BT = torch.cat([x_BT[:, 1:], torch.full((B, 1), PAD_ID)], dim=1)
    return TensorDict({"inputs": x_BT, "targets": targets_BT}, batch_size=[]).to(device)


def measure(cfg, device: torch.device, steps: int, warmup: int) -> dict:
    """Compile time, median step time and peak memory of ``cfg``'s train step on ``device``."""
    step, hp = make_train_step(cfg, PAD_ID), default_hp(cfg.train)
    state, batch = init_train_state(cfg, device), _batch(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(1 + warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        state, out = step(state, batch, hp)
        losses.append(out["loss"])
        _sync(device)
        times.append(time.perf_counter() - t0)
    first, times = times[0], times[1 + warmup :]
    values = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"non-finite loss in {values}")
    return {
        "compile_s": first,
        "step_ms": 1e3 * statistics.median(times),
        "spread_ms": 1e3 * (max(times) - min(times)),
        "peak_mem_gib": metrics.memory_mb(device) / 1024,
        "loss_first": values[0],
        "loss_last": values[-1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--label", default=None, help="the row's name (default: the preset)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--no-save", action="store_true", help="print only; append nothing to the CSV")
    args = ap.parse_args(argv)
    device = h.parse_device(args.device)
    overrides = [f"--{kv}" for kv in args.set] + [
        f"--train.precision={args.precision}",
        f"--train.batch_size={args.batch}",
        "--train.micro_batch_size=none",
        f"--train.seq_len={args.seq}",
        f"--model.max_seq_len={max(args.seq, 1)}",
        f"--train.compile={'false' if args.eager else 'true'}",
        "--train.grad_checkpointing=none",
    ]
    try:
        cfg = load_config(args.preset, overrides=overrides)
    except ConfigError as e:
        h.fail(str(e))
    cfg = dataclasses.replace(cfg, device=str(device))
    label = args.label or args.preset
    count = presets.count_params(cfg.model)
    tokens = args.batch * args.seq
    peak, peak_src = metrics.peak_flops(device, None, cfg.train.precision)
    row: dict[str, object] = {
        "date": h.stamp(),
        "device": h.device_name(device),
        **h.versions(),
        "label": label,
        "preset": args.preset,
        "overrides": " ".join(args.set),
        "precision": args.precision,
        "compiled": not args.eager,
        "active_params": count.active,
        "total_params": count.total,
        "batch": args.batch,
        "seq": args.seq,
        **dict.fromkeys(("compile_s", "step_ms", "spread_ms", "peak_mem_gib", "loss_first", "loss_last")),
        **dict.fromkeys(("tokens_per_s", "mfu", "error")),
    }
    print(
        f"[mfu] {label}: {count.active / 1e9:.3f}B active / {count.total / 1e9:.3f}B total, "
        f"{args.batch}x{args.seq} tokens, {args.precision}, {'eager' if args.eager else 'compiled'}, "
        f"{row['device']}",
        flush=True,
    )
    try:
        got = measure(cfg, device, args.steps, args.warmup)
    except torch.OutOfMemoryError as e:
        row["error"] = "out of memory: " + str(e).split("\n")[0][:200]
        got = None
    if got is not None:
        tps = tokens / (got["step_ms"] / 1e3)
        mfu = metrics.flops_per_token(cfg.model, args.seq) * tps / peak
        row |= {k: round(v, 4) for k, v in got.items()} | {"tokens_per_s": round(tps), "mfu": round(mfu, 4)}
        first = "first step" if args.eager else "compile"
        print(
            f"[mfu] {label}: {first} {got['compile_s']:.1f} s, step {got['step_ms']:.1f} ms "
            f"(spread {got['spread_ms']:.1f}), {tps:,.0f} tok/s, MFU {mfu:.1%} of {peak / 1e12:.3g} "
            f"TFLOP/s ({peak_src}), peak memory {got['peak_mem_gib']:.2f} GiB, "
            f"loss {got['loss_first']:.3f} -> {got['loss_last']:.3f}"
        )
    else:
        print(f"[mfu] {label}: {row['error']}")
    if not args.no_save:
        h.append_csv(RESULTS, [row])
    return 0 if got is not None else 1


if __name__ == "__main__":
    sys.exit(main())
