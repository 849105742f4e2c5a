"""Crash safety with real processes: ``kill -9`` at random moments of a run that saves a checkpoint
every step (retention on, ``best`` replaced as evals improve), then ``--resume latest`` until done.
The end state must be bit-identical to a straight run's."""

import os
import random
import signal
import subprocess
import sys
import time

import torch
from test_run import TINY

from lumina import checkpoint, loop, tree
from lumina.configure import load_config

STEPS = 16
ARGS = [
    *TINY,
    f"--train.steps={STEPS}",
    "--train.ckpt_every=1",
    "--train.keep_last=2",
    "--train.eval_every=3",
]


def _env() -> dict[str, str]:
    # as many intra-op threads as this process (the straight run) uses: under `pytest -n N` it has
    # fewer than a fresh process would take, and a different split of a reduction changes the bits
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _start(*args: str, cwd) -> subprocess.Popen:
    env = _env()
    return subprocess.Popen(
        [sys.executable, "-m", "lumina.run", *args],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _newest_step(run) -> int:
    found = checkpoint.checkpoints(run)
    return int(found[-1].name.split("_")[1]) if found else -1


def _step_folders_are_all_complete(run) -> bool:
    root = run / "checkpoints"
    named = sorted(p for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []
    return named == checkpoint.checkpoints(run)


def test_kill_9_during_checkpointing_then_resume_latest_equals_a_straight_run(tmp_path):
    straight = loop.train(load_config(overrides=[*ARGS, f"--run_dir={tmp_path / 'a'}"]))
    root, run = tmp_path / "b", tmp_path / "b" / "crash"
    rng = random.Random(13)
    kills, attempts = 0, 0
    cmd = ["--run-dir", str(root), "--name", "crash", *ARGS]
    while kills < 3 and attempts < 8:
        attempts += 1
        before = _newest_step(run)
        p = _start(*cmd, cwd=tmp_path)
        deadline = time.monotonic() + 120
        while _newest_step(run) <= before and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until this process is saving checkpoints
        time.sleep(rng.uniform(0.0, 0.6))
        if p.poll() is not None:  # it finished (or failed) before the kill
            assert p.returncode == 0, p.stderr.read()
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        assert _step_folders_are_all_complete(run), sorted(os.listdir(run / "checkpoints"))
        cmd = ["--resume", "latest", "--run-dir", str(root), "--name", "crash"]
    assert kills >= 2, f"only {kills} kills landed mid-run"
    done = subprocess.run(
        [sys.executable, "-m", "lumina.run", *cmd],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    a, _ = checkpoint.load_checkpoint(checkpoint.latest(straight.run_dir))
    b, meta = checkpoint.load_checkpoint(checkpoint.latest(run))
    assert meta["step"] == STEPS
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():  # params, moments, step, RNG key, data position
        assert torch.equal(fb[key], value), key
    best_a, _ = checkpoint.load_checkpoint(straight.run_dir / "checkpoints" / "best")
    best_b, _ = checkpoint.load_checkpoint(run / "checkpoints" / "best")
    assert all(torch.equal(v, tree.flatten(best_b)[k]) for k, v in tree.flatten(best_a).items())
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the last start cleaned what the kills left
