"""What the 2-rank workers, the single-process reference and the tests that launch them share: a
small config, its batches, and the torchrun launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from tensordict import TensorDict

from lumina.configure import load_config

PAD_ID = -100


def small_config(precision: str = "fp32", overrides: list[str] = ()):
    """The debug preset, smaller: 2 layers (one MoE + MoD), 4 sequences of 32 tokens per step as
    2 micro-batches of 2 (one per rank at W = 2), with router jitter, expert dropout and the MoE
    balance bias."""
    return load_config(
        "debug",
        overrides=[
            "--model.n_layers=2",
            "--model.vocab_size=512",
            "--train.batch_size=4",
            "--train.micro_batch_size=2",
            "--train.seq_len=32",
            f"--train.precision={precision}",
            "--train.compile=false",
            # random routing noise on, so every micro-batch's RNG key matters
            "--model.moe.router_jitter=0.05",
            "--model.moe.expert_dropout=0.1",
            # the aux-loss-free balance bias: set by a rule after the step, no gradient (the debug
            # preset's aux-loss balancing runs in tests/test_dist_run.py)
            "--model.moe.balance=bias",
            *overrides,
        ],
    )


def batches(cfg, steps: int) -> list[TensorDict]:
    """Fixed random global batches [A * b, T] (micro-batch a is rows a*b .. a*b+b-1)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len), generator=g)
        y = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), PAD_ID)], dim=1)
        out.append(TensorDict({"inputs": x, "targets": y}, batch_size=[]))
    return out


ROOT = Path(__file__).resolve().parent.parent.parent  # the workers import this checkout's lumina


def torchrun(target: list[str], ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=RANKS --standalone TARGET...`` (a script and
    its arguments, or ``-m module ...``) on gloo with one thread per rank; asserts exit 0, showing
    the output's tail otherwise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--standalone",
        *target,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
