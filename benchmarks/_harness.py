"""Shared plumbing of the kernel benchmarks (``moe.py``, ``mod.py``): what machine this is, timing
(median after warm-up; CUDA synchronised), peak memory, the forward / backward / forward+backward
passes, memory bandwidth for reference, and appending rows to a results CSV.

Backward is timed alone: each repeat builds a fresh graph outside the timed region, then only
``torch.autograd.grad`` is timed. Peak memory (CUDA only) is the allocator's peak during one
forward+backward above what was allocated before it.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

PASSES = ("fwd", "bwd", "fwd+bwd")


def fail(message: str) -> None:
    """Bad command-line input: one line on stderr, exit code 2."""
    print(f"{Path(sys.argv[0]).stem}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_common_args(ap, cpu_providers: str, cuda_providers: str) -> None:
    """The options both kernel benchmarks take: dtype, device, providers, repeats, quick, no-save."""
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument(
        "--providers", default=None, help=f"comma list (default: CPU {cpu_providers}; CUDA {cuda_providers})"
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats, nothing saved")
    ap.add_argument("--no-save", action="store_true", help="print only; append nothing to the CSV")


def choose_providers(
    arg: str | None, device: torch.device, cpu_default: str, cuda_default: str, available, extra=()
) -> list[str]:
    """--providers (or the device's default) checked against what this machine has (plus ``extra``
    names a script handles itself); the reference always first: every ratio is against it."""
    wanted = (arg or (cpu_default if device.type == "cpu" else cuda_default)).split(",")
    unknown = [p for p in wanted if p not in available and p not in extra]
    if unknown:
        fail(f"--providers: {', '.join(unknown)} not available here (have: {', '.join(available)})")
    return wanted if "reference" in wanted else ["reference", *wanted]


def parse_device(name: str | None) -> torch.device:
    """--device: default CUDA when present, else CPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device here")
    return device


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "-"
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_passes(
    forward: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    repeats: int,
    warmup: int = 3,
) -> dict[str, float | None]:
    """Median ms of forward (no grad), backward alone and forward+backward; peak MB (CUDA, else None)."""
    grad = torch.randn_like(forward())

    def fwd():
        with torch.no_grad():
            forward()

    def bwd() -> float:
        out = forward()  # untimed set-up: a fresh graph each repeat
        _sync(device)
        t0 = time.perf_counter()
        torch.autograd.grad(out, inputs, grad)
        _sync(device)
        return time.perf_counter() - t0

    def fwd_bwd():
        torch.autograd.grad(forward(), inputs, grad)

    result: dict[str, float | None] = {"fwd": median_ms(fwd, device, repeats, warmup)}
    for _ in range(warmup):
        bwd()
    result["bwd"] = 1e3 * statistics.median(bwd() for _ in range(repeats))
    result["fwd+bwd"] = median_ms(fwd_bwd, device, repeats, warmup)
    result["peak_mb"] = None
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fwd_bwd()
        _sync(device)
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return result


def copy_bandwidth_gbs(device: torch.device, mb: int = 1024, repeats: int = 10) -> float:
    """Measured memory bandwidth: a large device-to-device copy (read + write), GB/s. The reference
    the data-movement kernels are held to."""
    n = mb * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def commit() -> str:
    """HEAD, with "+dirty" when lumina/ or kernels/ differ from it: the code these numbers measure."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "lumina", "kernels") else "")


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M")


def markdown_head(head: list[str]) -> list[str]:
    """The header row and rule of a Markdown table with these columns."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows (header first in a new file). A file with other columns is refused rather than
    mixed with: move it aside."""
    if not rows:
        return
    fields = list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            fail(f"{path}: its columns differ from this script's; move it aside first")
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")


def make_rows(
    meta: dict[str, object],
    results: dict[tuple[str, str], dict[str, float | None]],
    amounts: dict[str, tuple[str, float]],
) -> list[dict]:
    """One CSV row per (subject, provider, pass). ``results[subject, provider]`` holds ms per pass and
    peak_mb; ``amounts[subject] = (unit, per call)`` turns a forward time into a rate: "GB/s" (bytes
    moved) or "TFLOP/s" (flops). vs_reference = reference ms / this provider's ms."""
    rows = []
    for (subject, provider), r in results.items():
        ref = results.get((subject, "reference"), {})
        for pas in PASSES:
            ms = r.get(pas)
            if ms is None:
                continue
            unit, amount = amounts.get(subject, ("", 0.0))
            rate = ""
            if pas == "fwd" and unit:
                rate = f"{amount / (ms * 1e-3) / (1e9 if unit == 'GB/s' else 1e12):.2f}"
            peak = r.get("peak_mb") if pas == "fwd+bwd" else None
            rows.append(
                {
                    **meta,
                    "subject": subject,
                    "provider": provider,
                    "pass": pas,
                    "ms": f"{ms:.4f}",
                    "peak_mb": "" if peak is None else f"{peak:.1f}",
                    "rate": rate,
                    "unit": unit if rate else "",
                    "vs_reference": f"{ref[pas] / ms:.2f}" if ref.get(pas) else "",
                }
            )
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'subject':<20}{'provider':<12}{'pass':<9}{'ms':>11}{'peak MB':>9}{'rate':>18}{'vs ref':>8}")
    for r in rows:
        rate = f"{r['rate']} {r['unit']}" if r["rate"] else ""
        print(
            f"{r['subject']:<20}{r['provider']:<12}{r['pass']:<9}{float(r['ms']):>11.3f}"
            f"{r['peak_mb']:>9}{rate:>18}{r['vs_reference']:>8}"
        )


def finish(
    title: str,
    device: torch.device,
    shape: str,
    dtype: str,
    repeats: int,
    results: dict[tuple[str, str], dict[str, float | None]],
    amounts: dict[str, tuple[str, float]],
    path: Path | None,
) -> None:
    """Stamp the run (device, versions, shape; on CUDA a device copy's GB/s measured now: what the
    data-movement rates are held to), print the table and append it to ``path`` (None: print only)."""
    meta = {
        "date": stamp(),
        "device": device_name(device),
        **versions(),
        "shape": shape,
        "dtype": dtype,
        "repeats": repeats,
        "copy_gbs": f"{copy_bandwidth_gbs(device):.0f}" if device.type == "cuda" else "",
    }
    rows = make_rows(meta, results, amounts)
    print(f"{title} {shape} {dtype} on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    if meta["copy_gbs"]:
        print(f"measured copy bandwidth: {meta['copy_gbs']} GB/s")
    print(f"median of {repeats} after warm-up; vs ref = reference ms / provider ms")
    print_rows(rows)
    print(headline(rows))
    if path is not None:
        append_csv(path, rows)


def headline(rows: list[dict]) -> str:
    """One ``[kernels]`` line of what the goals are judged by: each data-movement subject's best
    forward GB/s (and its share of the measured copy, on CUDA), and the layer's forward+backward
    against the torchtitan-style baseline per provider (the GPU check's summary reads this line)."""
    parts = []
    copy = float(rows[0]["copy_gbs"]) if rows and rows[0]["copy_gbs"] else None
    for subject in dict.fromkeys(r["subject"] for r in rows if r["unit"] == "GB/s"):
        cands = [
            r
            for r in rows
            if r["subject"] == subject and r["unit"] == "GB/s" and r["provider"] != "reference"
        ]
        best = max(
            cands or [r for r in rows if r["subject"] == subject and r["unit"] == "GB/s"],
            key=lambda r: float(r["rate"]),
        )
        share = f" = {float(best['rate']) / copy:.0%} of copy" if copy else ""
        parts.append(f"{subject} {best['provider']} {float(best['rate']):.3g} GB/s{share}")
    both = {r["provider"]: float(r["ms"]) for r in rows if r["subject"] == "layer" and r["pass"] == "fwd+bwd"}
    if "baseline" in both:
        ratios = ", ".join(f"{p} {both['baseline'] / ms:.2f}x" for p, ms in both.items() if p != "baseline")
        parts.append(f"layer fwd+bwd vs baseline: {ratios}")
    shape = f"{rows[0]['shape']} {rows[0]['dtype']}" if rows else ""
    return f"[kernels] {shape}: " + " | ".join(parts)
