import pytest
import torch

transformers = pytest.importorskip("transformers")  # a dev dependency; `make test` installs it
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

from lumina.config import ConfigError, MoDConfig, ModelConfig, MoEConfig  # noqa: E402
from lumina.hf import from_hf, to_hf  # noqa: E402
from lumina.model import apply, init  # noqa: E402


def randomised(model):
    """HF inits norms to 1 and tiny weights; randomise everything so a swapped tensor shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def hf_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
    )
    cfg._attn_implementation = "eager"  # plain math on the HF side
    return randomised(LlamaForCausalLM(cfg).eval())


def batch(vocab=211, B=3, T=37):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_parity(tie, backend):
    model = hf_llama(tie)
    cfg, params = from_hf(model)
    assert cfg.tie_embeddings is tie and cfg.n_kv_heads == 2 and cfg.rope_theta == 500.0
    cfg = ModelConfig(**{**cfg.__dict__, "attn_backend": backend})
    x = batch()
    with torch.no_grad():
        ref = model(x).logits
    ours, _ = apply(params, x, cfg)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_from_hf_state_dict_and_config_dict():
    model = hf_llama(tie=False)
    cfg_a, params_a = from_hf(model)
    cfg_b, params_b = from_hf(model.state_dict(), model.config.to_dict())
    assert cfg_a == cfg_b and (params_a == params_b).all()


@pytest.mark.parametrize("tie", [False, True])
def test_to_hf_round_trip(tie):
    cfg = ModelConfig(
        vocab_size=131,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        ffn_dim=80,
        tie_embeddings=tie,
        rope_theta=10000.0,
        norm_eps=1e-6,
        max_seq_len=64,
    )
    params = init(cfg, seed=3)
    state_dict, config = to_hf(cfg, params)
    # Back into Lumina: bit-identical parameters and the same architecture.
    cfg2, params2 = from_hf(state_dict, config)
    assert (params2 == params).all()
    for f in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "ffn_dim",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
        "max_seq_len",
    ):
        assert getattr(cfg2, f) == getattr(cfg, f), f
    # Into transformers: same logits.
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    result = model.load_state_dict(state_dict, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == (["lm_head.weight"] if tie else [])
    x = batch(vocab=131)
    with torch.no_grad():
        ref = model(x).logits
    ours, _ = apply(params, x, cfg)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_unsupported_inputs_are_clear_errors():
    model = hf_llama(tie=False)
    sd, conf = model.state_dict(), model.config.to_dict()
    with pytest.raises(ConfigError, match="attention_bias=True is not supported"):
        from_hf(sd, {**conf, "attention_bias": True})
    with pytest.raises(ConfigError, match="rope type 'llama3' is not supported"):
        from_hf(sd, {**conf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        from_hf(sd, {**conf, "model_type": "gpt2"})
    missing = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ConfigError, match="missing 'model.layers.1.mlp.up_proj.weight'"):
        from_hf(missing, conf)
    base = dict(vocab_size=10, d_model=32, n_layers=3, n_heads=2)
    for kwargs, why in [
        (dict(mod=MoDConfig(enabled=True)), "Mixture-of-Depths has no transformers equivalent"),
        (dict(moe=MoEConfig(num_experts=4, pattern="sandwich")), "Mixtral needs MoE in every layer"),
        (dict(moe=MoEConfig(num_experts=4, renormalize=False)), "Mixtral renormalises top-k weights"),
        (dict(moe=MoEConfig(num_experts=4, balance="bias")), "Mixtral has no balance bias"),
    ]:
        cfg = ModelConfig(**base, **kwargs)
        with pytest.raises(ConfigError, match=why):
            to_hf(cfg, init(cfg))
    mixtral = MixtralConfig(
        vocab_size=10,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        sliding_window=16,
        max_position_embeddings=64,
    ).to_dict()
    with pytest.raises(ConfigError, match="sliding_window=16 is not supported"):
        from_hf({}, mixtral)


def hf_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=5,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    )
    cfg._attn_implementation = "eager"
    return randomised(MixtralForCausalLM(cfg).eval())


def test_mixtral_logits_parity():
    model = hf_mixtral()
    cfg, params = from_hf(model)
    assert cfg.moe.num_experts == 5 and cfg.moe.top_k == 2 and cfg.moe.capacity_factor is None
    x = batch(vocab=101, T=19)
    with torch.no_grad():
        ref = model(x).logits
    ours, _ = apply(params, x, cfg, train=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_mixtral_round_trip_both_expert_layouts(layout):
    cfg, params = from_hf(hf_mixtral())
    state_dict, config = to_hf(cfg, params, expert_layout=layout)
    assert any(".experts.gate_up_proj" in k for k in state_dict) == (layout == "fused")
    cfg2, params2 = from_hf(state_dict, config)
    assert cfg2.moe == cfg.moe and (params2 == params).all()


def test_mixtral_export_loads_into_transformers():
    cfg, params = from_hf(hf_mixtral(seed=1))
    state_dict, config = to_hf(cfg, params)
    model = MixtralForCausalLM(MixtralConfig(**config)).eval()
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = batch(vocab=101, T=11)
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(apply(params, x, cfg, train=False)[0], ref, atol=1e-5, rtol=0)


def test_mixtral_balance_loss_weight_means_the_same_training_signal():
    model = hf_mixtral()
    model.config.router_aux_loss_coef = 0.02
    cfg, params = from_hf(model)
    assert cfg.moe.aux_loss_weight == pytest.approx(0.02 * 2)  # HF's loss is top_k x ours
    x = batch(vocab=101, T=19)
    with torch.no_grad():
        hf_aux = model(x, output_router_logits=True).aux_loss
    _, aux = apply(params, x, cfg, train=False)
    ours = sum(aux["moe", i, "aux_loss"] for i in ("0", "1")) / 2  # mean over layers
    # HF pools all layers' tokens into one statistic; ours averages per-layer ones (equal at balance)
    torch.testing.assert_close(cfg.moe.aux_loss_weight * ours, 0.02 * hf_aux, rtol=0.05, atol=0)
    assert to_hf(cfg, params)[1]["router_aux_loss_coef"] == pytest.approx(0.02)
