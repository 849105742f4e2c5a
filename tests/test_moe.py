import math

import pytest
import torch
from tensordict import TensorDict

from lumina import presets
from lumina.config import MoDConfig, ModelConfig, MoEConfig
from lumina.model import apply, default_knobs, init
from lumina.model.moe import moe_ffn, update_balance_bias


def moe_cfg(**moe) -> ModelConfig:
    moe = {"num_experts": 5, "top_k": 2, "d_expert": 24, **moe}
    return ModelConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, moe=MoEConfig(**moe))


def layer(cfg, seed=0, dtype=torch.float32):
    return init(cfg, seed=seed, dtype=dtype)["layers", "0", "moe"]


def x_in(B=3, T=7, D=16, seed=0, dtype=torch.float32):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# dropless in CI (~40 s); with capacity (tokens dropped) ~50 s more, with -m slow
@pytest.mark.parametrize("capacity_factor", [None, pytest.param(0.75, marks=pytest.mark.slow)])
def test_gradcheck_including_router(capacity_factor):
    cfg = moe_cfg(capacity_factor=capacity_factor, num_shared_experts=1)
    p = layer(cfg, dtype=torch.float64).apply(lambda t: t * 20)  # larger weights: margins between top-k
    knobs = default_knobs(cfg).apply(lambda t: t.double())
    names = ["router", "w_gate", "w_up", "w_down"]

    def f(x, *ws):
        q = p.clone()
        for n, w in zip(names, ws, strict=True):
            q[n] = w
        out, stats = moe_ffn(x, q, cfg, knobs, train=False)
        return out, stats["aux_loss"], stats["z_loss"]

    inputs = [x_in(dtype=torch.float64).requires_grad_()] + [p[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6)
    out = f(*inputs)[0]
    g_router = torch.autograd.grad(out.pow(2).sum(), inputs[1])[0]
    assert g_router.abs().sum() > 0  # the router is in the gradient path through the weights


def test_capacity_really_drops_and_dropless_does_not():
    cfg_drop, cfg_free = moe_cfg(capacity_factor=0.5), moe_cfg(capacity_factor=None)
    p, x, knobs = layer(cfg_free), x_in(), default_knobs(cfg_free)
    out_drop, s_drop = moe_ffn(x, p, cfg_drop, knobs, train=False)
    out_free, s_free = moe_ffn(x, p, cfg_free, knobs, train=False)
    N, K, E = 21, 2, 5
    capacity = math.ceil(0.5 * N * K / E)
    assert s_free["dropped_frac"].item() == 0 and s_free["load"].sum().item() == N * K
    assert s_drop["load"].max().item() <= capacity
    assert s_drop["dropped_frac"].item() == pytest.approx(1 - s_drop["load"].sum().item() / (N * K))
    assert s_drop["dropped_frac"].item() > 0
    assert not torch.allclose(out_drop, out_free)
    # With room for every assignment, capacity mode computes exactly the dropless result.
    out_big, s_big = moe_ffn(x, p, moe_cfg(capacity_factor=float(E)), knobs, train=False)
    assert s_big["dropped_frac"].item() == 0
    torch.testing.assert_close(out_big, out_free, atol=1e-6, rtol=1e-5)


def test_all_tokens_to_one_expert_with_capacity():
    cfg = moe_cfg(capacity_factor=1.0, top_k=1)
    p = layer(cfg)
    p["router"] = torch.zeros(16, 5)
    p["router"][:, 3] = 0.0
    x = x_in().abs()
    p["router"][:, 3] = 5.0  # positive inputs: expert 3 wins for every token
    out, stats = moe_ffn(x, p, cfg, default_knobs(cfg), train=False)
    capacity = math.ceil(1.0 * 21 * 1 / 5)
    assert stats["load"].tolist() == [0, 0, 0, capacity, 0]
    assert stats["dropped_frac"].item() == pytest.approx(1 - capacity / 21)
    assert (out.reshape(21, 16).abs().sum(-1) == 0).sum().item() == 21 - capacity  # dropped rows are 0


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    E = 4
    cfg = ModelConfig(
        vocab_size=11, d_model=8, n_layers=1, n_heads=2, moe=MoEConfig(num_experts=E, top_k=1, d_expert=8)
    )
    p = layer(cfg)
    x = torch.zeros(1, E, 8)
    x[0, torch.arange(E), torch.arange(E)] = 1.0  # token j is basis vector j
    p["router"] = torch.zeros(8, E)
    p["router"][torch.arange(E), torch.arange(E)] = 3.0  # token j prefers expert j, symmetrically
    _, stats = moe_ffn(x, p, cfg, default_knobs(cfg), train=False)
    assert stats["aux_loss"].item() == pytest.approx(1.0, abs=1e-6)
    p["router"] = torch.zeros(8, E)
    p["router"][:, 0] = 50.0  # everyone to expert 0 with probability ~1
    x = torch.ones(1, E, 8)
    _, stats = moe_ffn(x, p, cfg, default_knobs(cfg), train=False)
    assert stats["aux_loss"].item() == pytest.approx(E, rel=1e-4)


def test_z_loss_and_stats_formulas():
    cfg = moe_cfg()
    p, x = layer(cfg), x_in()
    _, stats = moe_ffn(x, p, cfg, default_knobs(cfg), train=False)
    logits = x.reshape(-1, 16) @ p["router"]
    probs = logits.softmax(-1)
    torch.testing.assert_close(stats["z_loss"], torch.logsumexp(logits, -1).pow(2).mean())
    torch.testing.assert_close(stats["top1_prob"], probs.max(-1).values.mean())
    torch.testing.assert_close(stats["entropy"], -(probs * probs.log()).sum(-1).mean())


def test_knobs_change_routing():
    cfg = moe_cfg()
    p, x = layer(cfg), x_in()
    base = default_knobs(cfg)
    out0, s0 = moe_ffn(x, p, cfg, base, train=True)
    eval_out, _ = moe_ffn(x, p, cfg, base, train=False)
    torch.testing.assert_close(out0, eval_out)  # zero jitter and dropout: training == eval
    hot = base.clone()
    hot["router_temperature"] = torch.tensor(5.0)
    _, s_hot = moe_ffn(x, p, cfg, hot, train=False)
    assert s_hot["entropy"] > s0["entropy"]
    jit = base.clone()
    jit["router_jitter"] = torch.tensor(0.5)
    torch.manual_seed(0)
    out_j, _ = moe_ffn(x, p, cfg, jit, train=True)
    assert not torch.allclose(out_j, out0)
    drop = base.clone()
    drop["expert_dropout"] = torch.tensor(0.99)
    torch.manual_seed(0)
    _, s_drop = moe_ffn(x, p, cfg, drop, train=True)
    assert (s_drop["load"] > 0).sum().item() == cfg.moe.top_k  # only the K force-kept experts get tokens
    _, s_eval = moe_ffn(x, p, cfg, drop, train=False)
    assert (s_eval["load"] > 0).sum().item() > cfg.moe.top_k  # no expert dropout at eval


def test_renormalize_switch():
    p, x = layer(moe_cfg()), x_in()
    a, _ = moe_ffn(x, p, moe_cfg(renormalize=True), default_knobs(moe_cfg()), train=False)
    b, _ = moe_ffn(x, p, moe_cfg(renormalize=False), default_knobs(moe_cfg()), train=False)
    assert not torch.allclose(a, b)


def test_aux_loss_free_bias_balancing():
    cfg = moe_cfg(balance="bias", top_k=1)
    params = init(cfg, seed=0)
    p = params["layers", "0", "moe"]
    p["balance_bias"] = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0])
    x = x_in()
    _, stats = moe_ffn(x, p, cfg, default_knobs(cfg), train=False)
    assert stats["load"].tolist() == [0, 0, 21, 0, 0]  # the bias steers selection ...
    # ... but not the weights, and it is not part of the loss
    aux = TensorDict(
        {"moe": {"0": {"load": torch.tensor([10.0, 0, 5, 5, 1])}, "1": {"load": torch.ones(5)}}}, []
    )
    before = params.clone()
    new = update_balance_bias(params, aux, cfg)
    rate = cfg.moe.bias_update_rate
    expected = torch.tensor([-rate, rate, 5.0 + 0.0, 0.0, rate])  # mean load 4.2
    expected[2], expected[3] = 5.0 - rate, -rate
    torch.testing.assert_close(new["layers", "0", "moe", "balance_bias"], expected)
    assert (params == before).all()  # pure


def test_layer_patterns():
    def pattern(**kw):
        return ModelConfig(
            vocab_size=7, d_model=8, n_layers=6, n_heads=2, moe=MoEConfig(num_experts=2, top_k=1, **kw)
        ).moe_layers()

    assert pattern(pattern="all") == [True] * 6
    assert pattern(pattern="every_n", every_n=3) == [False, False, True, False, False, True]
    assert pattern(pattern="sandwich") == [False, True, True, True, True, False]
    mod = ModelConfig(vocab_size=7, d_model=8, n_layers=4, n_heads=2, mod=MoDConfig(enabled=True))
    assert mod.mod_layers() == [False, True, False, True]


def test_knob_changes_do_not_recompile():
    torch._dynamo.reset()
    cfg = presets.get("debug").model
    params = init(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    @torch.compile(backend=counting_backend, fullgraph=True)
    def step(params, knobs):
        logits, aux = apply(params, tokens, cfg, knobs)
        return logits, aux["loss"]

    knobs = default_knobs(cfg)
    out_a, loss_a = step(params, knobs)
    changed = knobs.clone()
    for name, value in {
        "router_temperature": 2.0,
        "router_jitter": 0.1,
        "expert_dropout": 0.2,
        "aux_loss_weight": 0.5,
        "z_loss_weight": 0.1,
        "mod_predictor_loss_weight": 0.3,
    }.items():
        changed[name] = torch.tensor(value)
    out_b, loss_b = step(params, changed)
    assert len(compiles) == 1
    assert not torch.allclose(loss_a, loss_b) and not torch.allclose(out_a, out_b)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_moe_model_compiles_fullgraph_and_matches_eager(capacity_factor):
    torch._dynamo.reset()
    cfg = ModelConfig(**{**moe_cfg(capacity_factor=capacity_factor).__dict__})
    params = init(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    eager, _ = apply(params, tokens, cfg, train=False)
    compiled = torch.compile(lambda p, t: apply(p, t, cfg, train=False)[0], fullgraph=True)
    torch.testing.assert_close(compiled(params, tokens), eager, atol=1e-5, rtol=1e-5)


def test_compiled_gradients_equal_eager_for_a_hybrid_model():
    torch._dynamo.reset()
    cfg = ModelConfig(
        vocab_size=53,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_multiple_of=16,
        moe=MoEConfig(num_experts=3, top_k=2, d_expert=16, pattern="every_n", every_n=2),
        mod=MoDConfig(enabled=True, capacity=0.5, every_n=2),
    )
    params = init(cfg, seed=0)
    x = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss(p):
        logits, aux = apply(p, x[:, :-1], cfg, default_knobs(cfg))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + aux["loss"]

    eager = torch.func.grad(loss)(params)
    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)(params)
    for path, g in eager.flatten_keys(".").items():
        torch.testing.assert_close(compiled.flatten_keys(".")[path], g, atol=1e-6, rtol=1e-5, msg=path)
