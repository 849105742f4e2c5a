"""`python -m lumina.run` input handling: every bad flag or value ends in one line on stderr naming the
flag or field, exit status 2, and nothing written; --help is plain text and does not import torch."""

import subprocess
import sys

import pytest
from test_run import TINY as RUN_TINY

from lumina.run import main

# test_run's tiny model for one step, so a run that wrongly starts training ends in seconds (these
# tests then fail fast rather than hang when a check is missing).
TINY = [*RUN_TINY, "--train.eval_batches=0", "--steps", "1"]
COMMANDS = ["train", "check", "presets", "validate", "replay", "generate", "export", "eval", "compare"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr (returned)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err.rstrip("\n")


def test_an_unknown_optimizer_is_refused_naming_the_flag(tmp_path, capsys):
    line = one_line_error(capsys, ["--train.optimizer=sgd", "--run-dir", str(tmp_path), *TINY])
    assert line == "lumina: error: --train.optimizer: expected one of 'adamw', 'adamw8bit', got 'sgd'"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["check", "train"])
def test_a_model_too_big_for_the_device_is_refused_before_allocating(command, tmp_path, capsys):
    argv = [command, "--model.vocab_size=100000000000"]
    if command == "train":
        argv += ["--run-dir", str(tmp_path)]
    line = one_line_error(capsys, argv)
    assert line.startswith("lumina: error: model: ")
    assert "embed.weight [100000000000, 128]" in line and "does not fit" in line and "cpu" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--data", ""], "--data: no files given"),
        (["--data", " , "], "--data: no files given"),
        (["--eval-data", ""], "--eval-data: no files given"),
    ],
)
def test_empty_file_lists_are_refused(flags, needle, tmp_path, capsys):
    line = one_line_error(capsys, [*flags, "--run-dir", str(tmp_path / "runs"), *TINY])
    assert needle in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("flags", "held_out", "field"),
    [
        ([], "held_out.txt", "eval_files without data.train_files"),
        (["--mode", "finetuning_only"], "held_out.jsonl", "chat_eval_files without data.chat_files"),
    ],
)
def test_eval_data_without_training_data_is_refused(flags, held_out, field, tmp_path, capsys):
    """Valid held-out files: without the check, training would start on the packaged data."""
    held_out = tmp_path / held_out
    chat = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
    held_out.write_text(f"{chat}\n" * 50 if held_out.suffix == ".jsonl" else "To be, or not to be.\n" * 50)
    runs = tmp_path / "runs"
    line = one_line_error(capsys, [*flags, "--eval-data", str(held_out), "--run-dir", str(runs), *TINY])
    assert line.startswith("lumina: error: data: ") and field in line and "--data" in line
    assert not runs.exists()


def test_each_bad_value_names_only_its_field(capsys):
    line = one_line_error(capsys, ["check", "--train.ckpt_every=-1"])
    assert line == "lumina: error: train: ckpt_every must be >= 0, got -1"


def test_check_offers_only_the_flags_it_uses(capsys):
    assert main(["check", "--help"]) == 0
    check_help = capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    train_help = capsys.readouterr().out
    for flag in ("--steps", "--run-dir", "--name", "--data", "--resume", "--inject", "--mode"):
        assert f"[{flag} " in train_help and f"[{flag} " not in check_help, flag  # the usage line
    for flag in ("--preset", "--config", "--seed", "--device", "--precision"):
        assert f"[{flag} " in check_help, flag
    line = one_line_error(capsys, ["check", "--steps", "3"])
    assert "unrecognized arguments: --steps" in line


def test_help_is_plain_text_and_does_not_import_torch():
    """Top-level and per-command --help: no reST marks, and torch (seconds to import) stays unloaded."""
    script = (
        "import sys\n"
        "from lumina.run import main\n"
        f"for argv in [['--help'], ['-h'], *[[c, '--help'] for c in {COMMANDS!r}]]:\n"
        "    assert main(argv) == 0, argv\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("torch not imported"), r.stdout[-300:]
    assert "``" not in r.stdout and ":class:" not in r.stdout
    assert "usage: lumina.run check" in r.stdout and "Commands:" in r.stdout
