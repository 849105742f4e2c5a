"""The kernel benchmarks run end to end (``--quick``: tiny shapes, nothing saved) with every provider
this machine has, each checked against the reference inside the script before it is timed; their
tables name every provider and subject. Timings at these sizes mean nothing and are not checked."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lumina_kernels import native

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ["reference"] + (["native"] if native.available() else [])
PROVIDERS += ["triton"] if importlib.util.find_spec("triton") else []


def _run(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--device", "cpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _table(out: str) -> set[tuple[str, str, str]]:
    rows = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("fwd", "bwd", "fwd+bwd"):
            rows.add(tuple(parts[:3]))
    return rows


def test_moe_benchmark_runs():
    out = _run("benchmarks.moe", "--providers", ",".join([*PROVIDERS, "torch"]), "--dtype", "bfloat16")
    rows = _table(out)
    assert ("layer", "baseline", "fwd+bwd") in rows  # the torchtitan-style peer (bf16)
    assert ("grouped_mm", "torch", "bwd") in rows
    for p in PROVIDERS:
        assert ("dispatch+combine", p, "fwd+bwd") in rows, out
        assert ("layer", p, "fwd+bwd") in rows, out
    if "triton" in PROVIDERS:
        assert ("routing", "triton", "fwd") in rows and ("grouped_mm", "triton", "fwd+bwd") in rows


def test_mod_benchmark_runs():
    rows = _table(_run("benchmarks.mod", "--providers", ",".join(PROVIDERS)))
    for p in PROVIDERS:
        assert ("gather+scatter", p, "fwd+bwd") in rows
    if "triton" in PROVIDERS:
        assert ("topk", "triton", "fwd") in rows


def test_unknown_provider_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.mod", "--quick", "--device", "cpu", "--providers", "cublas"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("mod: error: --providers: cublas not available here")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module", ["benchmarks.moe", "benchmarks.mod"])
def test_help(module):
    assert (
        "usage"
        in subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout
    )


@pytest.mark.slow  # ~4 min on 2 cores: five fresh worker processes and six short CLI runs
def test_memory_benchmark_runs():
    """``benchmarks/memory.py --quick``: every configuration's memory row and loss run completes."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--quick", "--no-save"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for config in ("adamw", "adamw8bit", "full", "lora_bf16", "qlora_nf4"):
        assert any(line.split()[:2] == ["debug", config] for line in proc.stdout.splitlines()), config
    for run in ("(a) adamw seed 0", "(a) adamw8bit seed 0", "(b) base", "(b) qlora_nf4 (chat)"):
        assert run in proc.stdout, run
