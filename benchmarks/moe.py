"""MoE kernels per provider: routing metadata, dispatch, combine, the grouped expert matmul, and a whole
dropless MoE layer against a torchtitan-style baseline.

    python -m benchmarks.moe                       # CPU: reference vs native (fp32, N=8192 D=512 E=8 k=2)
    python -m benchmarks.moe --dtype bfloat16
    python -m benchmarks.moe --tokens 16384 --dim 2048 --ffn 4096 --experts 8 --dtype bfloat16  # GPU
    python -m benchmarks.moe --quick --providers reference,native,triton   # smoke (CPU: interpreter)

Subjects (each provider, all in the same run, each checked against the reference before it is timed):
  routing          expert histogram, offsets, stable permutation (forward only)
  dispatch         token rows into expert order                      GB/s: read + write A*D
  combine          router-weighted sum of each token's K rows        GB/s: read A*D, write N*D
  dispatch+combine the pair (one MoE layer's data movement around its experts)
  grouped_mm       x_seg @ w[e] over the expert segments, A x D x F  TFLOP/s: 2*A*D*F
  layer            routing + dispatch + SwiGLU experts (3 grouped matmuls) + combine
Providers: ``reference`` (``lumina_kernels.reference``; the grouped matmul as ``lumina.ops`` runs it:
an opaque custom op looping over the segments, with its own backward formula), ``native`` (CPU data
movement through the CMake-built ops), ``triton`` (``lumina_kernels`` Triton kernels; on CPU tensors
the interpreter — a smoke run, never a timing), ``torch`` (grouped matmul by
``torch.nn.functional.grouped_mm``; bf16), and, for ``layer`` only, ``baseline``: the torchtitan-style
layer — argsort of the expert ids, index gather, ``grouped_mm``, weighted ``scatter_add`` back (bf16,
where grouped_mm runs).
The layer rows use each provider for everything it has and the reference for the rest (native: its
dispatch/combine, reference routing and matmul; triton: Triton routing, dispatch/combine and matmul).

Forward, backward alone, forward+backward; median of --repeats after warm-up; CUDA: peak memory of
a forward+backward and a measured device copy bandwidth to hold GB/s against. Rows are appended to
benchmarks/results/moe.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks import _harness as h
from lumina import ops
from lumina_kernels import native, reference

RESULTS = Path(__file__).resolve().parent / "results" / "moe.csv"
CPU_PROVIDERS, CUDA_PROVIDERS = "reference,native", "reference,triton,torch"  # the defaults


def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts_E, 0).to(torch.int32)


def _gmm(impl: str):
    """The grouped matmul as the model runs it (``lumina.ops.grouped_mm``): the reference is an opaque
    custom op with its own backward formula, not autograd through the reference's slice writes."""
    return lambda x_AD, w_EDF, counts_E: ops.grouped_mm(x_AD, w_EDF, counts_E, impl)


def providers_for(device: torch.device) -> dict[str, SimpleNamespace]:
    ref = SimpleNamespace(
        routing=reference.moe_routing,
        dispatch=reference.moe_dispatch,
        combine=reference.moe_combine,
        grouped_mm=_gmm("reference"),
    )
    out = {"reference": ref}
    if device.type == "cpu" and native.available():
        out["native"] = SimpleNamespace(
            **vars(ref) | dict(dispatch=native.moe_dispatch, combine=native.moe_combine)
        )
    out["torch"] = SimpleNamespace(**vars(ref) | dict(grouped_mm=_gmm("torch")))
    try:
        from lumina_kernels import grouped_mm, moe_combine, moe_dispatch
    except ImportError:  # triton not installed
        return out
    out["triton"] = SimpleNamespace(
        routing=moe_dispatch.moe_routing,
        dispatch=moe_dispatch.moe_dispatch,
        combine=moe_combine.moe_combine,
        grouped_mm=grouped_mm.grouped_mm,
    )
    return out


def layer(impl, x_ND, ids_NK, w_NK, w_gate, w_up, w_down):
    """A dropless MoE layer's expert path (the router's top-k given)."""
    E, K = w_gate.shape[0], ids_NK.shape[1]
    counts_E, _, perm_A, _, _ = impl.routing(ids_NK, w_NK, E, None)
    xs_AD = impl.dispatch(x_ND, perm_A, K)
    h_AF = F.silu(impl.grouped_mm(xs_AD, w_gate, counts_E)) * impl.grouped_mm(xs_AD, w_up, counts_E)
    return impl.combine(impl.grouped_mm(h_AF, w_down, counts_E), perm_A, w_NK.to(x_ND.dtype))


def baseline_layer(x_ND, ids_NK, w_NK, w_gate, w_up, w_down):
    """The torchtitan-style layer: sort assignments by expert, gather, grouped matmuls, weighted
    scatter-add back to the tokens."""
    E, K = w_gate.shape[0], ids_NK.shape[1]
    order_A = torch.argsort(ids_NK.reshape(-1), stable=True)
    offs = _offsets(
        torch.zeros(E, dtype=torch.int64, device=x_ND.device).scatter_add_(
            0, ids_NK.reshape(-1), torch.ones_like(order_A)
        )
    )
    token_A = order_A // K
    xs_AD = x_ND[token_A]
    h_AF = F.silu(F.grouped_mm(xs_AD, w_gate, offs=offs)) * F.grouped_mm(xs_AD, w_up, offs=offs)
    ys_AD = F.grouped_mm(h_AF, w_down, offs=offs) * w_NK.reshape(-1)[order_A, None].to(x_ND.dtype)
    index = token_A[:, None].expand(-1, x_ND.shape[1])
    return torch.zeros_like(x_ND).scatter_add(0, index, ys_AD)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024, help="expert hidden size (grouped_mm, layer)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--subjects", default="routing,dispatch,combine,dispatch+combine,grouped_mm,layer")
    h.add_common_args(ap, CPU_PROVIDERS, CUDA_PROVIDERS)
    args = ap.parse_args()
    device = h.parse_device(args.device)
    if args.quick:
        args.tokens, args.dim, args.ffn, args.repeats, args.no_save = 64, 32, 48, 2, True
    available = providers_for(device)
    wanted = h.choose_providers(
        args.providers, device, CPU_PROVIDERS, CUDA_PROVIDERS, available, extra=("baseline",)
    )
    if "baseline" in wanted:
        wanted.remove("baseline")
        baseline = True
    else:
        baseline = device.type == "cuda" or args.dtype == "bfloat16"
    dtype = getattr(torch, args.dtype)
    if dtype != torch.bfloat16 and ("torch" in wanted or baseline):
        print("note: torch.nn.functional.grouped_mm is bf16-only here: no torch / baseline rows")
        wanted = [p for p in wanted if p != "torch"]
        baseline = False

    N, D, Fh, E, K = args.tokens, args.dim, args.ffn, args.experts, args.top_k
    A = N * K
    gen = torch.Generator().manual_seed(0)
    ids_NK = torch.rand(N, E, generator=gen).topk(K, dim=1).indices.to(device)
    w_NK = torch.rand(N, K, generator=gen).softmax(-1).to(device).requires_grad_()
    counts_E, _, perm_A, _, _ = reference.moe_routing(ids_NK, w_NK.detach(), E, None)

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    x_ND, y_AD, xs_AD = param(N, D), param(A, D), param(A, D)
    w_gate, w_up, w_down = (
        param(E, D, Fh, scale=D**-0.5),
        param(E, D, Fh, scale=D**-0.5),
        param(E, Fh, D, scale=Fh**-0.5),
    )
    elt = x_ND.element_size()
    # subject: (inputs to differentiate or None, forward(impl), (unit, amount per forward))
    subjects = {
        "routing": (None, lambda i: i.routing(ids_NK, w_NK.detach(), E, None)[2], ("", 0.0)),
        "dispatch": ((x_ND,), lambda i: i.dispatch(x_ND, perm_A, K), ("GB/s", 2.0 * A * D * elt)),
        "combine": ((y_AD, w_NK), lambda i: i.combine(y_AD, perm_A, w_NK), ("GB/s", (A + N) * D * elt)),
        "dispatch+combine": (
            (x_ND, w_NK),
            lambda i: i.combine(i.dispatch(x_ND, perm_A, K), perm_A, w_NK),
            ("GB/s", (3 * A + N) * D * elt),
        ),
        "grouped_mm": (
            (xs_AD, w_gate),
            lambda i: i.grouped_mm(xs_AD, w_gate, counts_E),
            ("TFLOP/s", 2.0 * A * D * Fh),
        ),
        "layer": (
            (x_ND, w_NK, w_gate, w_up, w_down),
            lambda i: layer(i, x_ND, ids_NK, w_NK, w_gate, w_up, w_down),
            ("TFLOP/s", 6.0 * A * D * Fh),
        ),
    }
    chosen = args.subjects.split(",")
    bad = [s for s in chosen if s not in subjects]
    if bad:
        h.fail(f"--subjects: unknown {', '.join(bad)} (have: {', '.join(subjects)})")
    # Which subject each provider has its own implementation of (the rest would time the reference).
    own = {
        "reference": set(subjects),
        "native": {"dispatch", "combine", "dispatch+combine", "layer"},
        "torch": {"grouped_mm", "layer"},
        "triton": set(subjects),
    }
    tol = {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    results: dict[tuple[str, str], dict] = {}
    for subject in chosen:
        inputs, forward, _ = subjects[subject]
        with torch.no_grad():
            expected = forward(available["reference"])
        runs = {name: (lambda impl=available[name], forward=forward: forward(impl)) for name in wanted}
        runs = {name: run for name, run in runs.items() if subject in own[name]}
        if subject == "layer" and baseline:
            runs["baseline"] = lambda: baseline_layer(x_ND, ids_NK, w_NK, w_gate, w_up, w_down)
        for name, run in runs.items():
            with torch.no_grad():  # every provider agrees with the reference before it is timed
                torch.testing.assert_close(run(), expected, **tol)
            if inputs is None:
                results[subject, name] = {"fwd": h.median_ms(run, device, args.repeats)}
            else:
                results[subject, name] = h.time_passes(run, inputs, device, args.repeats)
            print(f"  {subject} / {name}: done", flush=True)

    amounts = {s: subjects[s][2] for s in chosen if subjects[s][2][0]}
    path = None if args.no_save else RESULTS
    h.finish(
        "MoE ops", device, f"N{N} D{D} F{Fh} E{E} k{K}", args.dtype, args.repeats, results, amounts, path
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
