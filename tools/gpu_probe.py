"""The CUDA-only calls Lumina makes, each tried on its own (a step of ``tools/gpu_check.py``).

    python3 tools/gpu_probe.py [--dry-run]

Everything that runs on the CPU is covered by the test suite on the development machines (torch 2.13)
and was run under torch 2.11 there; what only a GPU can answer is here, one probe per call site, each
compared against a CPU / float64 reference where it computes something. Every probe prints one
``[probe] NAME: ok|FAILED|skipped  detail`` line; the exit code is 1 when any failed. ``--dry-run``
(no CUDA) runs the probes' CPU halves and reports the CUDA ones as skipped, so the script itself is
exercised on every ``make test``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

import torch

PROBES: list[tuple[str, Callable[[torch.device], str]]] = []


def probe(fn: Callable[[torch.device], str]) -> Callable[[torch.device], str]:
    PROBES.append((fn.__name__, fn))
    return fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _expect(ok: bool, detail: str) -> str:
    if not ok:
        raise AssertionError(detail)
    return detail


@probe
def device_memory(device: torch.device) -> str:
    """lumina.presets.device_memory: what check_fits holds a config against."""
    from lumina.presets import device_memory as mem

    got = mem(device)
    _expect(got is not None and got[0] > 2**30, f"got {got}")
    return f"{got[0] / 2**30:.1f} GiB ({got[1]})"


@probe
def peak_flops(device: torch.device) -> str:
    """lumina.metrics.peak_flops: the MFU denominator must know this device."""
    from lumina.metrics import peak_flops as peak

    value, source = peak(device)
    _expect("unknown" not in source, source)
    return f"{value / 1e12:.0f} TFLOP/s ({source})"


@probe
def grouped_mm_torch(device: torch.device) -> str:
    """lumina.ops.grouped_mm with impl=torch: torch.nn.functional.grouped_mm (bf16, offs) on CUDA."""
    from lumina import ops

    _cuda_only(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.tensor([5, 0, 37, 22], dtype=torch.int64)
    x = torch.randn(int(counts.sum()), 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(4, 64, 48, generator=g).to(device, torch.bfloat16).requires_grad_()
    got = ops.grouped_mm(x, w, counts.to(device), "torch")
    ref = ops.grouped_mm(x.detach().double().cpu(), w.detach().double().cpu(), counts, "reference")
    err = _rel(got, ref)
    got.float().square().sum().backward()
    _expect(err < 1e-2 and x.grad is not None and torch.isfinite(w.grad).all(), f"rel err {err:.2e}")
    return f"forward rel err {err:.1e} vs float64, backward finite"


@probe
def grouped_mm_auto(device: torch.device) -> str:
    """The provider lumina.ops picks for bf16 expert matmuls on this device (``auto``)."""
    from lumina import ops

    _cuda_only(device)
    x = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(4, 64, 48, device=device, dtype=torch.bfloat16)
    return f"auto picks {ops.grouped_mm_choice(x, w, 'auto')!r}"


@probe
def sdpa_attention(device: torch.device) -> str:
    """lumina.model.attention on CUDA in bf16 (sdpa; flash-attn when importable) vs the reference."""
    from lumina.model import attention as attn

    _cuda_only(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(2, 8, 128, 64, generator=g)
    k = torch.randn(2, 2, 128, 64, generator=g)
    v = torch.randn(2, 2, 128, 64, generator=g)
    ref = attn.attention(q.double(), k.double(), v.double(), backend="reference")
    got = attn.attention(*(t.to(device, torch.bfloat16) for t in (q, k, v)), backend="sdpa")
    err = _rel(got, ref)
    _expect(err < 2e-2, f"rel err {err:.2e}")
    return f"sdpa bf16 rel err {err:.1e}; flash-attn importable: {attn.flash_available()}"


@probe
def scaled_mm_fp8(device: torch.device) -> str:
    """torch._scaled_mm in e4m3 with per-tensor fp32 scales (the fp8 precision's matmul) on CUDA."""
    _cuda_only(device)
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"skipped: compute capability {cap} has no fp8"
    g = torch.Generator(device="cpu").manual_seed(2)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 384, generator=g)
    one = torch.tensor(1.0, device=device)
    a8 = a.to(device, torch.float8_e4m3fn)
    b8 = b.t().contiguous().to(device, torch.float8_e4m3fn).t()  # column-major second operand
    got = torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    ref = a8.double().cpu() @ b8.double().cpu()
    err = _rel(got, ref)
    _expect(err < 1e-2, f"rel err {err:.2e}")
    return f"e4m3 x e4m3 -> bf16 rel err {err:.1e} against the same fp8 operands in float64"


@probe
def out_of_memory(device: torch.device) -> str:
    """A real CUDA OOM is torch.OutOfMemoryError (what the driver's OOM response catches)."""
    _cuda_only(device)
    free, total = torch.cuda.mem_get_info(device)
    try:
        torch.empty(int(total * 2), dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return f"raised torch.OutOfMemoryError for {2 * total / 2**30:.0f} GiB"
    raise AssertionError("no error for twice the device memory")


@probe
def compiled_kernel_step(device: torch.device) -> str:
    """The debug preset's train step under torch.compile(fullgraph=True) on this device, one graph."""
    import dataclasses

    from tensordict import TensorDict

    from lumina.configure import load_config
    from lumina.optim import default_hp
    from lumina.step import init_train_state, make_train_step

    _cuda_only(device)
    import torch._dynamo

    cfg = load_config(
        "debug",
        overrides=[
            "--train.compile=true",
            "--train.batch_size=4",
            "--train.seq_len=64",
            "--train.micro_batch_size=none",
            "--train.precision=bf16",
        ],
    )
    cfg = dataclasses.replace(cfg, device=str(device))
    torch._dynamo.reset()
    x = torch.randint(0, cfg.model.vocab_size, (4, 64), device=device)
    batch = TensorDict({"inputs": x, "targets": x.roll(-1, 1)}, batch_size=[])
    step = make_train_step(cfg, -100)
    state, out = step(init_train_state(cfg, device), batch, default_hp(cfg.train))
    state, out2 = step(state, batch, default_hp(cfg.train))
    loss0, loss1 = float(out["loss"]), float(out2["loss"])
    _expect(loss1 < loss0, f"loss {loss0:.4f} -> {loss1:.4f}")
    return f"compiled bf16 step: loss {loss0:.4f} -> {loss1:.4f}"


class Skip(Exception):
    pass


def _cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        raise Skip("no CUDA device")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="no CUDA: run the CPU halves only")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_probe: error: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    failed = 0
    for name, fn in PROBES:
        try:
            print(f"[probe] {name}: ok  {fn(device)}", flush=True)
        except Skip as e:
            print(f"[probe] {name}: skipped  {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - every probe is reported, the others still run
            failed += 1
            traceback.print_exc()
            first = str(e).splitlines()[0][:200] if str(e) else ""
            print(f"[probe] {name}: FAILED  {type(e).__name__}: {first}", flush=True)
    print(f"[probe] {len(PROBES) - failed} of {len(PROBES)} without failure", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
