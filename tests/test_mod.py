import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lumina.config import MoDConfig, ModelConfig, MoEConfig
from lumina.model import apply, default_knobs, init, init_cache
from lumina.model.layers import rms_norm, rope_cos_sin
from lumina.model.mod import mod_block
from lumina.model.transformer import _block


def cfg_with(**kw) -> ModelConfig:
    base = dict(
        vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=16, max_seq_len=64
    )
    return ModelConfig(**{**base, **kw})


def tokens(cfg, B=2, T=24, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forward_flops_at_most_065_of_dense():
    common = dict(
        vocab_size=128, d_model=256, n_layers=4, n_heads=4, max_seq_len=256, attn_backend="reference"
    )
    dense = ModelConfig(**common)
    mod = ModelConfig(**common, mod=MoDConfig(enabled=True, capacity=0.125, every_n=2))
    B, T = 2, 256
    x = torch.randint(0, 128, (B, T))
    head = 2 * B * T * dense.d_model * dense.vocab_size  # the LM head is excluded (embedding is a lookup)

    def flops(cfg):
        params = init(cfg, seed=0)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            apply(params, x, cfg, train=False)
        return counter.get_total_flops() - head

    ratio = flops(mod) / flops(dense)
    assert ratio <= 0.65, ratio


def test_capacity_one_equals_router_weighted_dense_block():
    cfg = cfg_with(n_layers=1, mod=MoDConfig(enabled=True, capacity=1.0, every_n=1))
    params = init(cfg, seed=0)
    x = tokens(cfg)
    out, aux = apply(params, x, cfg)
    # By hand: every token goes through the block; its update is scaled by sigmoid(router score).
    p = params["layers", "0"]
    h = torch.nn.functional.embedding(x, params["embed", "weight"])
    pos = torch.arange(x.shape[1])
    attn, _, ffn, _ = _block(
        h,
        p,
        cfg,
        default_knobs(cfg),
        rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta),
        pos,
        None,
        moe=False,
        train=True,
    )
    w = torch.sigmoid(h @ p["mod", "router"])
    h = h + w[..., None] * (attn + ffn)
    expected = rms_norm(h, params["final_norm", "weight"], cfg.norm_eps) @ params["head", "weight"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert aux["mod", "0", "selected_ratio"].item() == 1.0


def test_only_selected_tokens_run_with_their_original_positions():
    cfg = cfg_with(mod=MoDConfig(enabled=True, capacity=0.3, every_n=1))
    p = init(cfg, seed=0)["layers", "0", "mod"]
    B, T, D = 3, 10, cfg.d_model
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0))
    seen = {}

    def block_delta(x_sel, pos):
        seen["x"], seen["pos"] = x_sel, pos
        return torch.ones_like(x_sel), {}

    out, stats, _ = mod_block(x, p, block_delta, torch.arange(T) + 100, cfg, default_knobs(cfg))
    S = math.ceil(0.3 * T)
    scores = x @ p["router"]
    expected_idx = torch.sort(scores.topk(S, dim=1).indices, dim=1).values
    assert torch.equal(seen["pos"], expected_idx + 100)  # original positions, ascending
    assert torch.equal(seen["x"], torch.gather(x, 1, expected_idx[..., None].expand(-1, -1, D)))
    selected = torch.zeros(B, T, dtype=torch.bool).scatter(1, expected_idx, True)
    assert torch.equal(out[~selected], x[~selected])  # everything else skips the block unchanged
    w = torch.sigmoid(scores.gather(1, expected_idx))
    torch.testing.assert_close(out[selected], (x + 0)[selected] + w.reshape(-1, 1))
    assert stats["selected_ratio"].item() == pytest.approx(S / T)


def test_gradcheck_mod_layer_including_router():
    cfg = cfg_with(mod=MoDConfig(enabled=True, capacity=0.5, every_n=1))
    p = init(cfg, seed=0, dtype=torch.float64)["layers", "0", "mod"]
    knobs = default_knobs(cfg).apply(lambda t: t.double())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, cfg.d_model, generator=g, dtype=torch.float64, requires_grad=True)
    w_block = torch.randn(cfg.d_model, cfg.d_model, generator=g, dtype=torch.float64, requires_grad=True)
    router = (p["router"] * 50).requires_grad_()

    def f(x, router, w_block):
        q = p.clone()
        q["router"] = router
        out, stats, _ = mod_block(
            x, q, lambda xs, pos: (torch.tanh(xs @ w_block), {}), torch.arange(6), cfg, knobs
        )
        return out, stats["predictor_loss"]

    assert torch.autograd.gradcheck(f, (x, router, w_block))
    g_router = torch.autograd.grad(f(x, router, w_block)[0].sum(), router)[0]
    assert g_router.abs().sum() > 0


def test_predictor_learns_from_a_stop_gradient_input():
    cfg = cfg_with(mod=MoDConfig(enabled=True, capacity=0.25, every_n=1))
    p = init(cfg, seed=0)["layers", "0", "mod"]
    p["predictor", "w1"].requires_grad_()
    x = torch.randn(2, 12, cfg.d_model, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _, stats, _ = mod_block(x, p, lambda xs, pos: (xs * 0, {}), torch.arange(12), cfg, default_knobs(cfg))
    gx, gw = torch.autograd.grad(stats["predictor_loss"], (x, p["predictor", "w1"]), allow_unused=True)
    assert gx is None or gx.abs().sum() == 0
    assert gw.abs().sum() > 0
    assert 0 <= stats["predictor_acc"].item() <= 1


def test_hybrid_runs_moe_inside_mod_blocks_on_selected_tokens_only():
    cfg = cfg_with(
        n_layers=4,
        moe=MoEConfig(num_experts=3, top_k=2, d_expert=24),
        mod=MoDConfig(enabled=True, capacity=0.25, every_n=2),
    )
    params = init(cfg, seed=0)
    B, T = 2, 24
    _, aux = apply(params, tokens(cfg, B, T), cfg)
    S = math.ceil(0.25 * T)
    for i in range(4):
        load = aux["moe", str(i), "load"].sum().item()
        routed = str(i) in aux["mod"]
        assert routed == (i % 2 == 1)
        assert load == (B * S * 2 if routed else B * T * 2), (i, load)


def test_cached_decoding_of_mod_layers_is_refused_clearly():
    cfg = cfg_with(mod=MoDConfig(enabled=True))
    params = init(cfg, seed=0)
    with pytest.raises(ValueError, match="cached decoding of MoD-routed layers"):
        apply(params, tokens(cfg, 1, 4), cfg, cache=init_cache(cfg, 1, 8), positions=torch.arange(4))


def test_mod_model_compiles_fullgraph():
    torch._dynamo.reset()
    cfg = cfg_with(
        n_layers=2,
        moe=MoEConfig(num_experts=3, top_k=1, d_expert=16),
        mod=MoDConfig(enabled=True, capacity=0.5, every_n=2),
    )
    params = init(cfg, seed=0)
    x = tokens(cfg)
    compiled = torch.compile(lambda p, t: apply(p, t, cfg, train=False)[0], fullgraph=True)
    torch.testing.assert_close(
        compiled(params, x), apply(params, x, cfg, train=False)[0], atol=1e-5, rtol=1e-5
    )
