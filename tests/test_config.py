import dataclasses
import subprocess
import sys

import pytest

from lumina import presets
from lumina.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    OrchestratorConfig,
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
        ("--train.precision=fp4", "--train.precision: expected one of"),
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


def test_config_module_imports_neither_presets_nor_the_loader():
    """presets builds configs and configure merges both: config importing either (even inside a
    function) is the cycle the split removed."""
    import ast
    from pathlib import Path

    import lumina.config

    tree = ast.parse(Path(lumina.config.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not imported & {"lumina.presets", "lumina.configure"}, imported


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (TrainConfig, dict(ckpt_every=-1), "ckpt_every must be >= 0, got -1"),
        (TrainConfig, dict(eval_batches=-2), "eval_batches must be >= 0, got -2"),
        (TrainConfig, dict(beta1=1.0), "beta1 must be in [0, 1), got 1.0"),
        (TrainConfig, dict(beta2=-0.1), "beta2 must be in [0, 1), got -0.1"),
        (TrainConfig, dict(patience=-1), "patience must be >= 0, got -1"),
        (TrainConfig, dict(min_delta=-0.5), "min_delta must be >= 0, got -0.5"),
        (MoEConfig, dict(aux_loss_weight=-1.0), "aux_loss_weight must be >= 0, got -1.0"),
        (MoEConfig, dict(z_loss_weight=-1.0), "z_loss_weight must be >= 0, got -1.0"),
        (OrchestratorConfig, dict(cooldown=-1), "cooldown must be >= 0, got -1"),
        (OrchestratorConfig, dict(warmup=-3), "warmup must be >= 0, got -3"),
        (OrchestratorConfig, dict(min_experts=1), "min_experts must be >= 2, got 1"),
        (OrchestratorConfig, dict(max_experts=3, min_experts=4), "max_experts=3 must be >= min_experts=4"),
    ],
)
def test_a_bad_value_names_exactly_its_field(cls, kwargs, message):
    """Checks of two fields at once named both (``--train.ckpt_every=-1`` blamed eval_batches too)."""
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert str(e.value) == message
    others = {"eval_batches", "ckpt_every", "beta1", "beta2", "patience", "min_delta", "cooldown", "warmup"}
    others |= {"aux_loss_weight", "z_loss_weight", "loss weights"}
    assert not {o for o in others - set(kwargs) if o in message}, message


def test_optimizer_accepts_adamw8bit_and_names_the_field_for_others(tmp_path):
    assert TrainConfig(optimizer="adamw8bit").optimizer == "adamw8bit"
    f = tmp_path / "q.toml"
    f.write_text('[train]\noptimizer = "adamw8bit"\n')
    assert load_config(config_file=str(f)).train.optimizer == "adamw8bit"
    f.write_text('[train]\noptimizer = "sgd"\n')
    with pytest.raises(ConfigError) as e:
        load_config(config_file=str(f))
    assert str(e.value).endswith("q.toml:2: train.optimizer: expected one of 'adamw', 'adamw8bit', got 'sgd'")


def test_held_out_files_need_training_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval_files without data.train_files"):
        DataConfig(eval_files=("h.txt",))
    with pytest.raises(ConfigError, match=r"^chat_eval_files without data.chat_files"):
        DataConfig(chat_eval_files=("h.jsonl",))
    assert DataConfig(train_files=("t.txt",), eval_files=("h.txt",)).eval_files == ("h.txt",)
    assert DataConfig(train_files=("t.txt",)).train_files == ("t.txt",)  # alone: a held-out split
    f = tmp_path / "d.toml"
    f.write_text('[data]\neval_files = ["h.txt"]\n')
    with pytest.raises(ConfigError, match=r"d.toml: data: eval_files without data.train_files"):
        load_config(config_file=str(f))
