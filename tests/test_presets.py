import subprocess
import sys

import pytest
import torch

from lumina import presets
from lumina.config import ModelConfig
from lumina.model import init

NAMES = ["debug", "debug_200m", "b1", "b7", "b14", "b30", "b50", "b100", "b200", "b300"]


def closed_form(m: ModelConfig) -> tuple[int, int]:
    """(active, total) from the architecture alone, independent of the parameter tree."""
    D, C = m.d_model, m.head_dim
    attn = D * m.n_heads * C + 2 * D * m.n_kv_heads * C + m.n_heads * C * D + 2 * D  # + both norms
    total = active = m.vocab_size * D + D + (0 if m.tie_embeddings else D * m.vocab_size)
    E, k, S, Fe = m.moe.num_experts, m.moe.top_k, m.moe.num_shared_experts, m.expert_dim
    for i in range(m.n_layers):
        total += attn
        active += attn
        is_moe = E and (
            m.moe.pattern == "all"
            or (m.moe.pattern == "every_n" and (i + 1) % m.moe.every_n == 0)
            or (m.moe.pattern == "sandwich" and 0 < i < m.n_layers - 1)
        )
        if is_moe:
            bias = E if m.moe.balance == "bias" else 0
            total += D * E + 3 * D * Fe * (E + S) + bias
            active += D * E + 3 * D * Fe * (k + S) + bias
        else:
            total += 3 * D * m.ffn_dim
            active += 3 * D * m.ffn_dim
        if m.mod.enabled and (i + 1) % m.mod.every_n == 0:
            router_and_predictor = D + D * m.mod.predictor_hidden + m.mod.predictor_hidden
            total += router_and_predictor
            active += router_and_predictor
    return active, total


def test_all_ten_presets_exist():
    assert presets.names()[: len(NAMES)] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_counts_match_independent_formula(name):
    m = presets.get(name).model
    assert tuple(presets.count_params(m)) == closed_form(m)


@pytest.mark.parametrize("pattern", ["all", "every_n", "sandwich"])
def test_counts_match_formula_for_each_moe_pattern(pattern):
    m = presets.get("debug_200m").model
    m = ModelConfig(
        **{
            **m.__dict__,
            "moe": type(m.moe)(
                num_experts=6, top_k=3, num_shared_experts=1, pattern=pattern, every_n=3, balance="bias"
            ),
        }
    )
    active, total = presets.count_params(m)
    assert (active, total) == closed_form(m)
    assert active < total


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("b")])
def test_big_presets_active_within_20_percent_of_nominal(name):
    active, total = presets.count_params(presets.get(name).model)
    nominal = float(name[1:]) * 1e9
    assert presets.nominal_active(name) == nominal
    assert 0.8 * nominal <= active <= 1.2 * nominal
    assert total > active  # every b* preset is a sparse (MoE) model


def test_counting_allocates_nothing():
    params = init(presets.get("b300").model, device="meta")
    assert all(t.device.type == "meta" for t in params.values(True, True))


def test_debug_is_a_hybrid_small_enough_for_cpu():
    m = presets.get("debug").model
    active, total = presets.count_params(m)
    assert 1e6 < total < 1e7 and active < total  # a few million parameters, sparse
    hybrid_layers = [moe and mod for moe, mod in zip(m.moe_layers(), m.mod_layers(), strict=True)]
    assert any(hybrid_layers)  # MoD-routed blocks whose FFN is an MoE


def test_presets_command_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "lumina.run", "presets"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["preset", "layers", "d_model"]
    assert [line.split()[0] for line in lines[1:]] == presets.names()
    b7 = next(line for line in lines if line.startswith("b7 "))
    active, total = presets.count_params(presets.get("b7").model)
    assert f"{active / 1e9:.2f}B" in b7 and f"{total / 1e9:.2f}B" in b7


def test_meta_init_honours_dtype():
    p = init(presets.get("debug").model, device="meta", dtype=torch.bfloat16)
    assert {t.dtype for t in p.values(True, True)} == {torch.bfloat16}


def test_train_state_estimate_counts_what_the_train_state_holds():
    """fp32 masters + AdamW m and v as ``init_train_state`` allocates them, + fp32 gradients, + the
    compute-dtype copy of the weights the bf16 / fp16 forward reads."""
    import dataclasses

    from lumina import tree
    from lumina.step import init_train_state

    cfg = presets.get("debug")
    flat = tree.flatten(init_train_state(cfg))
    held = sum(t.numel() * t.element_size() for k, t in flat.items() if k.startswith(("params.", "opt.")))
    n = presets.count_params(cfg.model).total
    assert presets.train_state_bytes(cfg) == held + 4 * n
    bf16 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16"))
    assert presets.train_state_bytes(bf16) == held + 4 * n + 2 * n


def test_check_fits_refuses_what_the_device_cannot_hold(monkeypatch):
    from lumina.config import ConfigError

    cfg = presets.get("debug")
    need = presets.check_fits(cfg, "cpu")
    assert need == presets.train_state_bytes(cfg)
    monkeypatch.setattr(presets, "device_memory", lambda device: (need, "a test limit"))
    assert presets.check_fits(cfg, "cpu") == need  # exactly full still passes: it is a floor
    monkeypatch.setattr(presets, "device_memory", lambda device: (need - 1, "a test limit"))
    with pytest.raises(ConfigError) as e:
        presets.check_fits(cfg, "cpu")
    msg = str(e.value)
    assert msg.startswith("model: the train state does not fit on cpu: ") and "a test limit" in msg
    assert "largest embed.weight [50304, 128]" in msg and "\n" not in msg
    monkeypatch.setattr(presets, "device_memory", lambda device: None)  # unknown capacity: no check
    assert presets.check_fits(presets.get("b300"), "mps") > 10**12


def test_cpu_memory_is_the_smaller_of_ram_and_the_cgroup_limit(tmp_path):
    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, where = presets.device_memory("cpu")
    cgroup = where == "cgroup memory limit" and limit < physical
    assert (limit, where) == (physical, "physical RAM") or cgroup
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2, unlimited
    assert presets._cgroup_limit(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    assert presets._cgroup_limit(tmp_path) == 2**30
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()  # cgroup v1: "unlimited" is a huge number
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert presets._cgroup_limit(tmp_path) is None
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    assert presets._cgroup_limit(tmp_path) == 3 * 2**30
