"""Mixture-of-Depths routing ops per provider: capacity top-k, gather of the selected rows, and the
router-weighted scatter back into the residual stream.

    python -m benchmarks.mod                        # CPU: reference vs native; CUDA: reference vs triton
    python -m benchmarks.mod --batch 8 --seq 4096 --dim 2048 --dtype bfloat16   # a GPU-sized run
    python -m benchmarks.mod --providers reference,triton --quick              # smoke test (CPU: interpreter)

Subjects: ``topk`` (forward only: integer output), ``gather``, ``scatter`` and ``gather+scatter``
(a MoD block's data movement around its skipped-or-run block: scatter(x, gather(x), w, idx)).
Providers: ``reference`` (``lumina_kernels.reference``), ``native`` (CPU: MoD gather/scatter as K = 1
dispatch/combine through the CMake-built ops, as ``lumina.ops`` runs them; top-k has no native op),
``triton`` (``lumina_kernels.mod_routing``; on CPU tensors Triton's interpreter — a correctness smoke
run, never a timing). Forward, backward alone and forward+backward, median of --repeats after
warm-up, all providers in the same run; GB/s from the bytes each op must move (forward); CUDA: peak
memory of a forward+backward and the ratio to a measured device copy. Rows are appended to
benchmarks/results/mod.csv.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import _harness as h
from lumina_kernels import native, reference

RESULTS = Path(__file__).resolve().parent / "results" / "mod.csv"
CPU_PROVIDERS, CUDA_PROVIDERS = "reference,native", "reference,triton"  # the defaults


def providers_for(device: torch.device) -> dict[str, SimpleNamespace]:
    out = {
        "reference": SimpleNamespace(
            topk=reference.mod_topk, gather=reference.mod_gather, scatter=reference.mod_scatter
        )
    }
    if device.type == "cpu" and native.available():
        from lumina import ops

        out["native"] = SimpleNamespace(
            topk=None, gather=ops._native_mod_gather, scatter=ops._native_mod_scatter
        )
    try:
        from lumina_kernels import mod_routing
    except ImportError:
        return out
    out["triton"] = SimpleNamespace(
        topk=mod_routing.mod_topk, gather=mod_routing.mod_gather, scatter=mod_routing.mod_scatter
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--capacity", type=float, default=0.5, help="fraction of each sequence selected")
    h.add_common_args(ap, CPU_PROVIDERS, CUDA_PROVIDERS)
    args = ap.parse_args()
    device = h.parse_device(args.device)
    if args.quick:
        args.batch, args.seq, args.dim, args.repeats, args.no_save = 2, 64, 32, 2, True
    available = providers_for(device)
    wanted = h.choose_providers(args.providers, device, CPU_PROVIDERS, CUDA_PROVIDERS, available)

    B, T, D = args.batch, args.seq, args.dim
    S = max(1, math.ceil(args.capacity * T))
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    scores_BT = torch.randn(B, T, generator=gen).to(device)
    idx_BS = reference.mod_topk(scores_BT, S)
    x_BTD = torch.randn(B, T, D, generator=gen).to(device, dtype).requires_grad_()
    delta_BSD = torch.randn(B, S, D, generator=gen).to(device, dtype).requires_grad_()
    w_BS = torch.rand(B, S, generator=gen).to(device).requires_grad_()
    elt = x_BTD.element_size()
    # subject: (inputs to differentiate or None, forward(impl), bytes a forward must move)
    subjects = {
        "topk": (None, lambda i: i.topk(scores_BT, S), B * T * 4 + B * S * 8),
        "gather": ((x_BTD,), lambda i: i.gather(x_BTD, idx_BS), 2 * B * S * D * elt),
        "scatter": (
            (x_BTD, delta_BSD, w_BS),
            lambda i: i.scatter(x_BTD, delta_BSD, w_BS, idx_BS),
            (2 * B * T + B * S) * D * elt,
        ),
        "gather+scatter": (
            (x_BTD, w_BS),
            lambda i: i.scatter(x_BTD, i.gather(x_BTD, idx_BS), w_BS, idx_BS),
            (2 * B * T + 3 * B * S) * D * elt,
        ),
    }
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    results: dict[tuple[str, str], dict] = {}
    for subject, (inputs, forward, _) in subjects.items():
        with torch.no_grad():
            expected = forward(available["reference"])
        for name in wanted:
            impl = available[name]
            if subject == "topk" and impl.topk is None:
                continue
            with torch.no_grad():  # every provider agrees with the reference before it is timed
                torch.testing.assert_close(forward(impl), expected, **tol)
            run = lambda impl=impl, forward=forward: forward(impl)  # noqa: E731
            if inputs is None:
                results[subject, name] = {"fwd": h.median_ms(run, device, args.repeats)}
            else:
                results[subject, name] = h.time_passes(run, inputs, device, args.repeats)
            print(f"  {subject} / {name}: done", flush=True)

    amounts = {s: ("GB/s", float(b)) for s, (_, _, b) in subjects.items()}
    path = None if args.no_save else RESULTS
    h.finish("MoD ops", device, f"B{B} T{T} D{D} S{S}", args.dtype, args.repeats, results, amounts, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
