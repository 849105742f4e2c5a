"""Dropless MoE data movement on the CPU: native ops (kernels/csrc/moe_ops.cpp) vs the pure-torch reference.

    python benchmarks/moe.py [--tokens 8192] [--dim 512] [--experts 8] [--top-k 2] [--repeats 20]

Times dispatch, combine, and the pair (what one MoE layer runs around its expert matmuls), in the same
run for both implementations: forward, backward (autograd from a graph built outside the timed region),
and forward + backward. Median of --repeats after warm-up. Inputs come from
``reference.moe_routing`` on random top-k ids, so the permutation is realistic.
Rows are appended to benchmarks/results/moe.csv with the CPU, thread count, versions and shapes.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from lumina_kernels import native, native_status, reference

RESULTS = Path(__file__).resolve().parent / "results" / "moe.csv"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-save", action="store_true", help="print only; append nothing to the CSV")
    args = ap.parse_args()
    if not native.available():
        print(f"native ops unavailable: {native_status()}")
        return 1

    N, D, E, K = args.tokens, args.dim, args.experts, args.top_k
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    topk_ids_NK = torch.rand(N, E, generator=gen).topk(K, dim=1).indices
    weights_NK = torch.rand(N, K, generator=gen).softmax(-1)
    _, _, perm_A, _, _ = reference.moe_routing(topk_ids_NK, weights_NK, E, None)
    x_ND = torch.randn(N, D, generator=gen, dtype=dtype).requires_grad_()
    y_AD = torch.randn(N * K, D, generator=gen, dtype=dtype).requires_grad_()
    w_NK = weights_NK.requires_grad_()
    impls = {"reference": reference, "native": native}
    # Each subject: (inputs to differentiate, forward); the pair is one MoE layer's data movement.
    subjects = {
        "dispatch": ((x_ND,), lambda impl: impl.moe_dispatch(x_ND, perm_A, K)),
        "combine": ((y_AD, w_NK), lambda impl: impl.moe_combine(y_AD, perm_A, w_NK)),
        "dispatch+combine": (
            (x_ND, w_NK),
            lambda impl: impl.moe_combine(impl.moe_dispatch(x_ND, perm_A, K), perm_A, w_NK),
        ),
    }
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    for _, forward in subjects.values():  # the two agree before anything is timed
        torch.testing.assert_close(forward(native), forward(reference), **tol)

    load_before = os.getloadavg()[0]  # other work on the machine skews absolute times (not ratios)
    ms: dict[tuple[str, str, str], float] = {}
    for subject, (inputs, forward) in subjects.items():
        grad = torch.randn_like(forward(reference))
        for name, impl in impls.items():

            def fwd(impl=impl, forward=forward):
                with torch.no_grad():
                    forward(impl)

            def bwd(impl=impl, forward=forward, inputs=inputs, grad=grad):
                out = forward(impl)  # untimed set-up: a fresh graph each repeat
                t0 = time.perf_counter()
                torch.autograd.grad(out, inputs, grad)
                return time.perf_counter() - t0

            def fwd_bwd(impl=impl, forward=forward, inputs=inputs, grad=grad):
                torch.autograd.grad(forward(impl), inputs, grad)

            ms[subject, name, "fwd"] = median_ms(fwd, args.repeats)
            for _ in range(3):
                bwd()
            ms[subject, name, "bwd"] = 1e3 * statistics.median(bwd() for _ in range(args.repeats))
            ms[subject, name, "fwd+bwd"] = median_ms(fwd_bwd, args.repeats)

    threads = torch.get_num_threads()
    load = f"{load_before:.1f}/{os.getloadavg()[0]:.1f}"
    device = f"{cpu_model()} ({os.cpu_count()} cpus)"
    shape = f"N{N} D{D} E{E} k{K}"
    print(
        f"MoE dispatch/combine {shape} {args.dtype}; {device}, {threads} threads, torch {torch.__version__}"
    )
    print(f"load average before/after {load}; median of {args.repeats} after warm-up")
    print("ratio = reference ms / native ms (higher: native faster)")
    print(f"{'ops':<18}{'pass':<9}{'reference ms':>14}{'native ms':>12}{'ratio':>8}")
    rows = []
    for subject, p in ((s, p) for s in subjects for p in ("fwd", "bwd", "fwd+bwd")):
        ref, nat = ms[subject, "reference", p], ms[subject, "native", p]
        print(f"{subject:<18}{p:<9}{ref:>14.2f}{nat:>12.2f}{ref / nat:>8.2f}")
        rows.append(
            {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
                "device": device,
                "threads": threads,
                "loadavg": load,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "shape": shape,
                "dtype": args.dtype,
                "ops": subject,
                "pass": p,
                "repeats": args.repeats,
                "ms_reference": f"{ref:.3f}",
                "ms_native": f"{nat:.3f}",
                "native_speedup": f"{ref / nat:.2f}",
            }
        )
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with RESULTS.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
