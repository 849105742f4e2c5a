"""`python -m lumina.run` end to end on the packaged data, with a tiny model (seconds on 2 cores)."""

import contextlib
import dataclasses
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from lumina import checkpoint, loop, orchestrator, tree
from lumina.config import to_dict
from lumina.configure import load_config
from lumina.driver.console import fmt_rate
from lumina.run import main

TINY = [
    "--model.d_model=32",
    "--model.n_heads=2",
    "--model.n_kv_heads=1",
    "--model.moe.d_expert=32",
    "--model.max_seq_len=32",
    "--train.seq_len=32",
    "--train.batch_size=4",
    "--train.micro_batch_size=2",
    "--train.eval_batches=2",
    "--train.eval_every=2",
    "--train.log_every=2",
    "--train.warmup_steps=1",
    "--train.compile=false",
    "--model.moe.router_jitter=0.1",  # randomness that an exact resume must reproduce
    "--model.moe.expert_dropout=0.2",
]
TIMING = {"tokens_per_s", "mfu", "memory_mb", "step_s", "orch_s", "orch_snapshot_s"}


def records(run_dir, kind=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    return [r for r in recs if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 4-step run of the CLI shared by the run-folder tests: (run folder, stdout)."""
    root = tmp_path_factory.mktemp("tiny")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--steps", "4", "--run-dir", str(root), *TINY]) == 0
    return root / "debug", out.getvalue()


def test_train_leaves_a_complete_run_folder(tiny_run):
    run, out = tiny_run
    assert "[eval] step 4:" in out and "held-out loss" in out and f"run folder: {run}" in out
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in records(run, "eval")] == [0, 2, 4]
    r = train[-1]
    assert r["mfu"] > 0 and r["memory_mb"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1
    assert r["expert_layers"] == [0, 1, 2, 3] and len(r["expert_load"]) == 4
    assert all(len(load) == 4 and sum(load) == pytest.approx(1.0) for load in r["expert_load"])
    assert r["mod_layers"] == [1, 3] and r["mod_ratio"] == [0.25, 0.25]
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000004"]
    assert (run / "checkpoints" / "best" / checkpoint.META_FILE).exists()
    assert any(
        p.name.startswith("events.out.tfevents") and p.stat().st_size > 0 for p in (run / "tb").iterdir()
    )
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same name again starts a new folder instead of mixing two runs
    assert main(["--steps", "1", "--run-dir", str(run.parent), *TINY, "--train.eval_batches=0"]) == 0
    assert (run.parent / "debug-2" / "metrics.jsonl").exists()


def test_config_json_is_the_resolved_config_with_derived_fields(tiny_run):
    run, _ = tiny_run
    cfg = load_config(overrides=["--train.steps=4", f"--run_dir={run.parent}", *TINY])
    written = json.loads((run / "config.json").read_text())
    assert written == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert written["model"]["head_dim"] == 16 and written["train"]["warmup_steps"] == 1
    assert to_dict(cfg)["model"]["head_dim"] is None  # (checkpoints keep the re-derivable form)


def test_an_orchestrated_run_without_decisions_has_both_logs(tiny_run):
    run, _ = tiny_run
    assert len(list(orchestrator.read_log(run / "observations.msgpack"))) == 4
    assert (run / "decisions.msgpack").is_file()  # (read_log reads a missing file as empty)
    assert list(orchestrator.read_log(run / "decisions.msgpack")) == []


def test_progress_line_rates_count_the_steps_own_time(tiny_run):
    """tok/s and MFU on the progress line: tokens over the steps' own seconds since the previous
    line (evaluations excluded), both from the same window."""
    run, out = tiny_run
    train = records(run, "train")
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    for line, window in zip(lines, (train[:2], train[2:]), strict=True):
        rate = sum(r["tokens_per_s"] * r["step_s"] for r in window) / sum(r["step_s"] for r in window)
        mfu = window[0]["mfu"] / window[0]["tokens_per_s"] * rate
        assert f"| {fmt_rate(rate)} tok/s | MFU {mfu:.1%} |" in line, line


def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, capsys):
    cfg = load_config(overrides=["--train.steps=6", *TINY])
    straight = loop.train(load_config(overrides=["--train.steps=6", f"--run_dir={tmp_path / 'a'}", *TINY]))

    def stop_at_3(step, state, record):
        if step == 3:
            raise KeyboardInterrupt

    b_cfg = load_config(overrides=["--train.steps=6", f"--run_dir={tmp_path / 'b'}", *TINY])
    with pytest.raises(KeyboardInterrupt):
        loop.train(b_cfg, step_hook=stop_at_3)
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "b" / "debug")] == ["step_00000003"]
    capsys.readouterr()
    # a fresh process resumes from the checkpoint alone (the CLI reads the config stored in it)
    assert main(["--resume", "latest", "--run-dir", str(tmp_path / "b")]) == 0
    # its summary starts from the run's step-0 eval, not from this process's first eval
    step0, last = records(straight.run_dir, "eval")[0]["loss"], records(straight.run_dir, "eval")[-1]["loss"]
    assert f"held-out loss {step0:.4f} -> {last:.4f}" in capsys.readouterr().out

    a, _ = checkpoint.load_checkpoint(checkpoint.latest(straight.run_dir))
    b, meta = checkpoint.load_checkpoint(checkpoint.latest(tmp_path / "b" / "debug"))
    assert meta["step"] == 6 and int(b["step"]) == 6 and cfg.train.steps == 6
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():  # params, moments, step, rng key, data position
        assert torch.equal(fb[key], value), key

    def comparable(run_dir):
        return [
            {k: v for k, v in r.items() if k not in TIMING}
            for r in records(run_dir)
            if r["kind"] in ("train", "eval")
        ]

    assert comparable(tmp_path / "b" / "debug") == comparable(straight.run_dir)
    assert [r["what"] for r in records(tmp_path / "b" / "debug", "event")][:2] == [
        "interrupted",
        "checkpoint",
    ]


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_stops_the_run_at_the_step_boundary_and_a_second_one_at_once(tmp_path, capfd, signals):
    """SIGINT during step 2 (sent from its hook): the hook and the step go on (the signal is only
    noted) and the run stops before step 3, saving a checkpoint at 2 and raising KeyboardInterrupt
    (the CLI's exit 130). A second signal raises where it lands: in the hook, which goes no further.
    The handlers in place before the run are back after it."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen = []

    def hook(step, state, record):
        if step == 2:
            for n in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
                seen.append(n)

    cfg = load_config(overrides=["--train.steps=6", f"--run_dir={tmp_path}", *TINY, "--train.eval_batches=0"])
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, step_hook=hook)
    assert seen == [0]
    assert "[lumina] SIGINT: stopping after this step; again to stop at once\n" in capfd.readouterr().err
    run = tmp_path / "debug"
    assert [r["step"] for r in records(run, "train")] == [1, 2]
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000002"]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_signal_in_the_last_step_is_raised_once_the_run_is_complete_and_an_ignored_one_stays_ignored(
    tmp_path,
):
    """SIGINT during the last step: nothing is left to stop, so the run completes (its final
    checkpoint and registry record as any run's) and then raises KeyboardInterrupt, so that a
    caller running several (a benchmark, a sweep) stops too. A process that ignores SIGINT (a job
    started with `&` from a script) keeps ignoring it: the run goes on to its end."""

    def hook(step, state, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    overrides = ["--train.steps=3", *TINY, "--train.eval_batches=0"]
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_config(overrides=[*overrides, f"--run_dir={tmp_path / 'a'}"]), step_hook=hook)
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "a" / "debug")] == ["step_00000003"]
    assert "interrupted" not in [r["what"] for r in records(tmp_path / "a" / "debug", "event")]
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cfg = load_config(overrides=[*overrides, f"--run_dir={tmp_path / 'b'}"])
        result = loop.train(cfg, step_hook=hook)
        assert result.steps == 3 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_to_the_cli_saves_the_step_under_way_and_exits_130(tmp_path):
    """What a scheduler does before it kills a job: SIGTERM to ``python -m lumina.run`` mid-run.
    The run ends at a step boundary with a checkpoint at its last logged step, one line on stderr
    and exit status 130."""
    p = subprocess.Popen(
        [sys.executable, "-m", "lumina.run", "--steps", "500", "--run-dir", str(tmp_path), *TINY,
         "--train.eval_batches=0"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = tmp_path / "debug" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (
        p.poll() is None
        and time.monotonic() < deadline
        and '"kind": "train"' not in (metrics.read_text() if metrics.exists() else "")
    ):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "lumina: interrupted"
    last = records(tmp_path / "debug", "train")[-1]["step"]
    assert 0 < last < 500
    assert [c.name for c in checkpoint.checkpoints(tmp_path / "debug")] == [f"step_{last:08d}"]


class _Payload:
    def __reduce__(self):  # what an attacker's pickle would run on load
        return (open, (_Payload.marker, "w"))


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lumina.run", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_corrupted_foreign_and_pickled_checkpoints_exit_2_with_one_line(tmp_path):
    assert main(["--steps", "1", "--run-dir", str(tmp_path), *TINY, "--train.eval_batches=0"]) == 0
    ckpt = checkpoint.latest(tmp_path / "debug")
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    cases = {}
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "meta.msgpack").write_bytes(pickle.dumps(_Payload()))
    (bad / "shard_00000.safetensors").write_bytes(pickle.dumps(_Payload()))
    cases["pickled meta"] = (bad, "meta.msgpack")
    bad2 = tmp_path / "pickled-state"
    bad2.mkdir()
    (bad2 / "meta.msgpack").write_bytes((ckpt / "meta.msgpack").read_bytes())
    (bad2 / "shard_00000.safetensors").write_bytes(pickle.dumps(_Payload()))
    cases["pickled state"] = (bad2, "shard_00000.safetensors")
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "meta.msgpack").write_bytes((ckpt / "meta.msgpack").read_bytes())
    (torn / "shard_00000.safetensors").write_bytes((ckpt / "shard_00000.safetensors").read_bytes()[:-100])
    cases["truncated"] = (torn, "shard_00000.safetensors")
    cases["missing"] = (tmp_path / "nowhere", "nowhere")
    for name, (path, needle) in cases.items():
        r = _cli("--resume", str(path), cwd=tmp_path)
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lumina: error:") and needle in lines[0], (
            name,
            r.stderr,
        )
        assert "Traceback" not in r.stderr
    assert not marker.exists()
    # a checkpoint of another model: refused with the first mismatching tensor named
    r = _cli("--resume", str(ckpt), "--model.d_model=48", cwd=tmp_path)
    assert r.returncode == 2 and "this run needs" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_early_stopping_on_eval_loss(tmp_path):
    cfg = load_config(
        overrides=[
            *TINY,
            "--train.steps=20",
            "--train.eval_every=1",
            "--train.lr=1e-9",  # nothing improves by min_delta
            "--train.min_delta=0.1",
            "--train.patience=2",
            f"--run_dir={tmp_path}",
        ]
    )
    result = loop.train(cfg)
    assert result.stopped_early and result.steps == 2 and result.best_step == 0
    assert [r["what"] for r in records(result.run_dir, "event")][0] == "early_stop"


@pytest.mark.parametrize("mode", ["finetuning_only", "interleaved", "hybrid"])
def test_chat_modes_train_on_chitchat(tmp_path, mode):
    result = loop.train(
        load_config(overrides=[*TINY, "--train.steps=4", f"--data.mode={mode}", f"--run_dir={tmp_path}"])
    )
    evals = records(result.run_dir, "eval")
    assert "loss_chat" in evals[-1] and ("loss_base" in evals[-1]) == (mode != "finetuning_only")
    sources = [r["source"] for r in records(result.run_dir, "train")]
    assert set(sources) == ({"chat"} if mode == "finetuning_only" else set(sources)) and "chat" in sources
    switches = [r for r in records(result.run_dir, "event") if r["what"] == "phase_switch"]
    if mode == "hybrid":
        assert sources == ["base"] * 3 + ["chat"]  # the switch at ceil(0.7 * 4) = 3
        assert [r["step"] for r in switches] == [3]
    else:  # interleaved flips source at random steps: that is no phase
        assert switches == []
    if mode == "interleaved":
        assert len(set(sources)) == 2


@pytest.mark.parametrize(
    ("flags", "field", "value"),
    [
        (["--data", "a.txt,b.txt"], "train_files", ("a.txt", "b.txt")),
        (["--data", "a.txt", "--eval-data", "h.txt"], "eval_files", ("h.txt",)),
        (["--mode", "finetuning_only", "--data", "c.jsonl"], "chat_files", ("c.jsonl",)),
        (
            ["--mode", "finetuning_only", "--data", "c.jsonl", "--eval-data", "d.jsonl"],
            "chat_eval_files",
            ("d.jsonl",),
        ),  # fmt: skip
        (["--mode", "interleaved"], "mode", "interleaved"),
    ],
)
def test_data_flags_map_to_the_config(flags, field, value):
    from lumina.run import parse_config_args, train_parser

    _, cfg = parse_config_args(train_parser(), flags)
    assert getattr(cfg.data, field) == value


@pytest.mark.parametrize(
    "args", [[], ["--precision", "bf16", "--model.moe.grouped_mm=torch"]], ids=["fp32", "bf16-torch-gmm"]
)
def test_check_runs_one_forward_backward_in_the_train_precision(args, capsys):
    """`check` builds the debug model in the step's compute dtype and runs forward + backward: with
    bf16 it can use torch's bf16-only grouped matmul, as training would."""
    assert main(["check", *args]) == 0
    out = capsys.readouterr().out
    assert "forward+backward on [8, 128] random tokens" in out and "layer 1 MoD" in out


def test_check_refuses_torch_grouped_mm_without_bf16(tmp_path):
    r = _cli("check", "--model.moe.grouped_mm=torch", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "lumina: error: run: model.moe.grouped_mm=torch needs train.precision=bf16 (torch's grouped_mm "
        "is bf16-only), got fp32"
    )
