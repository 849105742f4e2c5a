import dataclasses
import subprocess
import sys

import pytest

from lumina import presets
from lumina.config import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from lumina.configure import load_config


def test_derived_fields():
    m = ModelConfig(vocab_size=10, d_model=96, n_layers=1, n_heads=6)
    assert m.n_kv_heads == 6 and m.head_dim == 16
    assert m.ffn_dim == 256 and m.ffn_dim >= 8 * 96 / 3  # rounded up to ffn_multiple_of=256
    t = TrainConfig(steps=200, lr=1e-3, batch_size=8)
    assert t.micro_batch_size == 8 and t.grad_accum == 1
    assert t.min_lr == pytest.approx(1e-4) and t.warmup_steps == 10


def test_frozen():
    m = ModelConfig(vocab_size=10, d_model=64, n_layers=1, n_heads=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.d_model = 128


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(d_model=100, n_heads=3), "not divisible by n_heads=3"),
        (dict(d_model=64, n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(d_model=64, n_heads=4, head_dim=15), "head_dim=15 must be even"),
        (dict(d_model=0, n_heads=4), "d_model must be > 0"),
    ],
)
def test_model_validation(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        ModelConfig(vocab_size=10, n_layers=1, **kwargs)
    assert fragment in str(e.value)


def test_moe_validation():
    with pytest.raises(ConfigError, match=r"top_k must be in \[1, num_experts=4\]"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="capacity_factor must be > 0"):
        MoEConfig(num_experts=4, capacity_factor=0.0)


def test_train_and_run_validation():
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size=3"):
        TrainConfig(batch_size=8, micro_batch_size=3)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    m = ModelConfig(vocab_size=10, d_model=64, n_layers=1, n_heads=4, max_seq_len=32)
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=32"):
        RunConfig(model=m, train=TrainConfig(seq_len=64))


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_round_trips_through_dict(name):
    cfg = presets.get(name)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_precedence_preset_file_cli(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "debug"\nseed = 3\n[model]\nd_model = 256\n[train]\nlr = 1e-3\nsteps = 7\n')
    cfg = load_config(config_file=str(f), overrides=["--train.steps=11", "--model.moe.num_experts=4"])
    assert cfg.preset == "debug" and cfg.seed == 3
    assert cfg.model.d_model == 256 and cfg.train.lr == 1e-3  # file over preset
    assert cfg.train.steps == 11  # CLI over file
    assert cfg.model.moe.num_experts == 4
    assert cfg.model.n_layers == presets.get("debug").model.n_layers  # untouched preset value


def test_override_rederives_derived_fields_but_keeps_explicit_ones(tmp_path):
    base = presets.get("debug").model
    cfg = load_config(overrides=["--model.d_model=256"])
    assert cfg.model.head_dim == 256 // base.n_heads  # not the preset's stale 128 // n_heads
    f = tmp_path / "hd.toml"
    f.write_text("[model]\nhead_dim = 16\n")
    cfg = load_config(config_file=str(f), overrides=["--model.d_model=256"])
    assert cfg.model.head_dim == 16


def test_cli_value_parsing():
    cfg = load_config(
        overrides=[
            "--model.tie_embeddings=false",
            "--model.moe.num_experts=4",
            "--model.moe.capacity_factor=1.25",
            "--train.precision=bf16",
            "--data.train_files=a.txt, b/*.jsonl",
            "--model.rope_theta=500000",
        ]
    )
    assert cfg.model.tie_embeddings is False
    assert cfg.model.moe.capacity_factor == 1.25
    assert cfg.train.precision == "bf16"
    assert cfg.data.train_files == ("a.txt", "b/*.jsonl")
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    cfg = load_config(overrides=["--model.moe.num_experts=4", "--model.moe.capacity_factor=none"])
    assert cfg.model.moe.capacity_factor is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.d_model=oops", "--model.d_model: expected an integer, got 'oops'"),
        ("--model.d_modle=3", "unknown key 'model.d_modle' (did you mean 'd_model'?)"),
        ("--train.precision=fp8", "--train.precision: expected one of"),
        ("--model.tie_embeddings=maybe", "expected true or false"),
        ("--model.d_model.x=3", "'model.d_model' is a field, not a section"),
        ("--model", "overrides look like --section.field=value"),
    ],
)
def test_cli_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_toml_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[model]\nd_model = 256\nn_heads = "four"\n')
    with pytest.raises(ConfigError, match=r"bad.toml:3: model.n_heads: expected an integer"):
        load_config(config_file=str(f))
    f.write_text("seed = 1\n[train]\nsteps = 10\nlearning_rate = 0.1\n")
    with pytest.raises(
        ConfigError, match=r"bad.toml:4: unknown key 'train.learning_rate' \(did you mean 'lr'\?\)"
    ):
        load_config(config_file=str(f))
    f.write_text("[trian]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml:1: unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(config_file=str(f))
    f.write_text("[model\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML: .*line 1"):
        load_config(config_file=str(f))
    f.write_text("[model]\nd_model = 102\n")
    with pytest.raises(ConfigError, match=r"bad.toml: model: d_model=102 is not divisible by n_heads"):
        load_config(config_file=str(f))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(config_file=str(tmp_path / "missing.toml"))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'b8'; choose from debug"):
        load_config(preset="b8")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model.d_model=oops"], "model.d_model"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, fragment):
    r = subprocess.run([sys.executable, "-m", "lumina.run", *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
