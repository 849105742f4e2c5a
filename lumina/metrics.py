"""Throughput accounting: FLOPs per token, device peak FLOP/s, MFU, and memory.

FLOPs per token follow torchtitan's ``get_num_flop_per_token``: 6 x (active parameters that do
matmul work per token, i.e. without the embedding lookup table unless it doubles as the output
head) + 12 x layers x heads x head_dim x seq_len (the attention scores and values, forward and
backward). MoE counts the top-k experts (active parameters); MoD layers count their block
parameters and attention term scaled by the routed fraction (capacity; capacity^2 for attention).

Peak FLOP/s: a table of dense bf16 tensor-core peaks for common accelerators (the numbers
torchtitan uses); on CPU an estimate, cores x clock x FLOPs per cycle of the training's matmul dtype,
read from /proc/cpuinfo: fp32 FMA 64 with AVX-512, 32 with AVX2, 8 otherwise; bf16 (and fp8, whose
CPU matmuls are bf16) 1024 with AMX (a TDPBF16PS, 16 x 16 x 32 multiply-adds, every 16 cycles) and
128 with AVX512_BF16, else the fp32 rate (the same for fp16 with AMX_FP16 / AVX512_FP16); the
AVX-512 rates halved on AMD Zen 4, whose 512-bit instructions take two 256-bit pipes (on the 2-core
EPYC of the CI type, 2.6 GHz nominal: fp32 matmuls at 176-201 GFLOP/s, bf16 at 382-432, above the
nominal clock's 166 and 333 as the cores boost). On the
AMX Xeon of the CI type bf16 matmuls run at 1.0-1.9 TFLOP/s on 2 cores against 0.18-0.35 in fp32
(benchmarks/README.md), so an fp32 peak would overstate a bf16 run's MFU several times.
``train.peak_flops`` overrides either.
MFU = achieved model FLOP/s / peak. Memory: CUDA max allocated on GPU, else the process's peak RSS;
the limit it is held against (``memory_limit_mb``): the device's total memory on CUDA, else the
smallest of the cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and the physical
memory, shared evenly by the ranks torchrun started on this machine.
"""

from __future__ import annotations

import math
import os
import re
import resource
from pathlib import Path

import torch

from lumina.config import ModelConfig

__all__ = ["PEAK_FLOPS", "flops_per_token", "memory_limit_mb", "memory_mb", "peak_flops"]

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM / NVL
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "V100": 125e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    from lumina.model import param_shapes

    E, K = cfg.moe.num_experts, cfg.moe.top_k
    mod_layers = cfg.mod_layers()
    params = 0.0
    for path, (shape, _std) in param_shapes(cfg).items():
        n = math.prod(shape)
        if path == "embed.weight" and not cfg.tie_embeddings:
            continue  # a lookup, no matmul (the separate head.weight is counted)
        if ".moe.w_" in path:
            n = n / E * K
        if path.startswith("layers."):
            layer = int(path.split(".")[1])
            if mod_layers[layer] and ".mod." not in path:
                n *= cfg.mod.capacity
        params += n
    attn = sum(
        12 * cfg.n_heads * cfg.head_dim * seq_len * (cfg.mod.capacity**2 if mod else 1.0)
        for mod in mod_layers
    )
    return 6 * params + attn


# reduced-precision matmul rates per core and cycle: (cpuinfo flag, FLOPs), the first the CPU has
_CPU_RATES = {
    "bf16": (("amx_bf16", 1024), ("avx512_bf16", 128)),
    "fp8": (("amx_bf16", 1024), ("avx512_bf16", 128)),
    "fp16": (("amx_fp16", 1024), ("avx512_fp16", 128)),
}


def _cpu_peak_flops(precision: str = "fp32", info: str | None = None) -> tuple[float, str]:
    if info is None:
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            info = ""
    mhz = [float(x) for x in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)] or [2000.0]
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split()) if "flags" in info else set()
    per_cycle, unit = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8, "FMA width"
    for flag, rate in _CPU_RATES.get(precision, ()):
        if flag in flags:
            per_cycle, unit = rate, f"{flag} rate"
            break
    if per_cycle > 32 and _half_width_avx512(info):
        per_cycle, unit = per_cycle // 2, f"{unit}, AVX-512 on 256-bit pipes"
    return torch.get_num_threads() * max(mhz) * 1e6 * per_cycle, unit


def _half_width_avx512(info: str) -> bool:
    """AMD Zen 4 (family 25 with AVX-512; Zen 3 has none) runs each 512-bit instruction on its two
    256-bit pipes: half the AVX-512 / AVX512_BF16 rate per cycle of an Intel core (AMX aside)."""
    vendor = re.search(r"vendor_id\s*:\s*(\S+)", info)
    family = re.search(r"cpu family\s*:\s*(\d+)", info)
    return bool(vendor and family) and vendor.group(1) == "AuthenticAMD" and int(family.group(1)) == 25


def peak_flops(
    device: torch.device, override: float | None = None, precision: str = "fp32"
) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from) for ``device`` training in ``precision``
    (``train.precision``; on CUDA the table's bf16 peaks serve every precision)."""
    if override:
        return override, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} bf16 dense peak"
        return 312e12, f"{name} unknown: assumed A100 bf16 peak (set train.peak_flops)"
    peak, unit = _cpu_peak_flops(precision)
    return peak, f"CPU estimate: {torch.get_num_threads()} threads x clock x {unit}"


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _cpu_limit_bytes(cgroup_files=_CGROUP_LIMITS) -> int:
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for f in cgroup_files:
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" / a huge number: no limit
            limits.append(int(text))
    return min(limits)


def memory_limit_mb(device: torch.device) -> float:
    """The memory this process may use, in MiB (what ``memory_mb`` is compared with): the CUDA
    device's total, else the machine's (or its cgroup's) memory divided by the torchrun ranks on this
    machine (``LOCAL_WORLD_SIZE``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / 2**20
    return _cpu_limit_bytes() / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) / 2**20


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 1024 if os.uname().sysname == "Linux" else rss_kb / 2**20
