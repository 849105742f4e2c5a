import math

import pytest
import torch

from lumina.config import ModelConfig
from lumina.model import apply, default_knobs, init, init_cache
from lumina.model.attention import attention
from lumina.model.layers import apply_rope, rope_cos_sin


def with_backend(cfg: ModelConfig, backend: str) -> ModelConfig:
    return ModelConfig(**{**cfg.__dict__, "attn_backend": backend})


def tokens(cfg, B=3, T=29, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_init_is_deterministic_per_seed(tiny_cfg):
    a, b, c = init(tiny_cfg, seed=1), init(tiny_cfg, seed=1), init(tiny_cfg, seed=2)
    assert (a == b).all()
    for path, t in a.items(True, True):
        if t.dim() > 1:
            assert not torch.equal(t, c[path]), path


def test_init_leaves_do_not_depend_on_other_leaves(tiny_cfg):
    deeper = ModelConfig(**{**tiny_cfg.__dict__, "n_layers": 3})
    a, b = init(tiny_cfg, seed=0), init(deeper, seed=0)
    assert torch.equal(a["layers", "0", "attn", "wq"], b["layers", "0", "attn", "wq"])
    assert torch.equal(a["embed", "weight"], b["embed", "weight"])


def test_init_scales():
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4, init_std=0.02)
    p = init(cfg, seed=0)
    assert p["layers", "0", "attn", "wq"].std().item() == pytest.approx(0.02, rel=0.05)
    assert p["layers", "0", "attn", "wo"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert p["layers", "0", "ffn", "w_down"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(p["final_norm", "weight"], torch.ones(256))


def test_logits_shape_and_dtype(tiny_cfg):
    p = init(tiny_cfg, seed=0)
    logits, aux = apply(p, tokens(tiny_cfg), tiny_cfg, default_knobs(tiny_cfg))
    assert logits.shape == (3, 29, tiny_cfg.vocab_size) and logits.dtype == torch.float32
    assert list(aux.keys()) == ["loss"] and aux["loss"].item() == 0  # dense: no aux losses or stats


def test_tied_head_uses_embedding(tiny_cfg):
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "tie_embeddings": True})
    p = init(cfg, seed=0)
    assert "head" not in p
    logits, _ = apply(p, tokens(cfg), cfg)
    p2 = p.clone()
    p2["embed", "weight"][5] += 1.0  # changes the output row of token 5 (and its input embedding)
    logits2, _ = apply(p2, tokens(cfg), cfg)
    assert not torch.allclose(logits[..., 5], logits2[..., 5])


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_attention_backends_agree_with_reference(tiny_cfg, backend):
    p = init(tiny_cfg, seed=0)
    ref, _ = apply(p, tokens(tiny_cfg), with_backend(tiny_cfg, "reference"))
    out, _ = apply(p, tokens(tiny_cfg), with_backend(tiny_cfg, backend))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_attention_with_positions_matches_manual_math(G, backend):
    B, H, T, S, C = 2, 4, 5, 11, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, C, generator=g)
    k, v = torch.randn(B, G, S, C, generator=g), torch.randn(B, G, S, C, generator=g)
    pos = torch.tensor([3, 4, 5, 6, 7])
    out = attention(q, k, v, backend=backend, q_positions=pos)
    for h in range(H):
        kh, vh = k[:, h // (H // G)], v[:, h // (H // G)]
        for t, p_ in enumerate(pos.tolist()):
            w = torch.softmax(torch.einsum("bc,bsc->bs", q[:, h, t], kh[:, : p_ + 1]) / math.sqrt(C), dim=-1)
            expect = torch.einsum("bs,bsc->bc", w, vh[:, : p_ + 1])
            torch.testing.assert_close(out[:, h, t], expect, atol=1e-5, rtol=1e-5)


def test_model_is_causal(tiny_cfg):
    p = init(tiny_cfg, seed=0)
    x = tokens(tiny_cfg)
    y = x.clone()
    y[:, 17] = (y[:, 17] + 1) % tiny_cfg.vocab_size
    a, _ = apply(p, x, tiny_cfg)
    b, _ = apply(p, y, tiny_cfg)
    torch.testing.assert_close(a[:, :17], b[:, :17], atol=0, rtol=0)
    assert not torch.allclose(a[:, 17:], b[:, 17:])


def test_rope_depends_only_on_relative_position():
    C, g = 16, torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, C, generator=g), torch.randn(1, 1, 1, C, generator=g)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), C, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([n]), C, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4))
    cos, sin = rope_cos_sin(torch.tensor([5]), C, 10000.0)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(), q.norm())  # a rotation


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_cached_decoding_with_offsets_equals_full_sequence(tiny_cfg, backend):
    cfg = with_backend(tiny_cfg, backend)
    p = init(cfg, seed=0)
    x = tokens(cfg, B=2, T=23)
    full, _ = apply(p, x, cfg)
    cache = init_cache(cfg, batch_size=2, max_len=32)
    chunks, start = [], 0
    for size in (9, 5, 1, 1, 7):  # a prompt, a chunk, single tokens, a chunk
        pos = torch.arange(start, start + size)
        out, _ = apply(p, x[:, start : start + size], cfg, cache=cache, positions=pos)
        torch.testing.assert_close(out, full[:, start : start + size], atol=2e-5, rtol=1e-5)
        chunks.append(out)
        start += size
    assert start == 23


def test_positions_offset_shifts_rope(tiny_cfg):
    p = init(tiny_cfg, seed=0)
    x = tokens(tiny_cfg, B=1, T=8)
    a, _ = apply(p, x, tiny_cfg)
    b, _ = apply(p, x, tiny_cfg, positions=torch.arange(8) + 5)
    # Relative positions are unchanged, so attention scores are too: RoPE is shift-invariant.
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs positions"):
        apply(p, x, tiny_cfg, cache=init_cache(tiny_cfg, 1, 16))


def test_apply_is_pure_and_differentiable(tiny_cfg):
    p = init(tiny_cfg, seed=0)
    before = p.clone()
    x = tokens(tiny_cfg)

    def loss_fn(params):
        logits, _ = apply(params, x[:, :-1], tiny_cfg)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    grads, loss = torch.func.grad_and_value(loss_fn)(p)
    assert (p == before).all()
    assert loss.item() == pytest.approx(math.log(tiny_cfg.vocab_size), rel=0.05)
    for path, g in grads.items(True, True):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, path


def test_bf16_close_to_fp32(tiny_cfg):
    p = init(tiny_cfg, seed=0)
    x = tokens(tiny_cfg)
    ref, _ = apply(p, x, tiny_cfg)
    out, _ = apply(p.apply(lambda t: t.to(torch.bfloat16)), x, tiny_cfg)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_cpu_attention_in_bf16_runs_in_fp32():
    """On the CPU, bf16 / fp16 q, k, v are attended in fp32 (torch's CPU kernels are slower in bf16)
    and the output cast back: the reference's math on the same values, to the output's rounding,
    and gradients in the inputs' dtype."""
    from lumina.model.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2))
    out = attention(q, k, v, backend="sdpa")
    assert out.dtype == torch.bfloat16
    ref = attention(q.detach().float(), k.detach().float(), v.detach().float(), backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    fp32 = torch.nn.functional.scaled_dot_product_attention(
        q.detach().float(), k.detach().float(), v.detach().float(), is_causal=True, enable_gqa=True
    )
    assert torch.equal(out, fp32.to(torch.bfloat16))  # the fp32 kernel, not the bf16 one
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(gr.dtype == torch.bfloat16 and torch.isfinite(gr).all() for gr in grads)


def test_compiles_without_graph_breaks(tiny_cfg):
    torch._dynamo.reset()
    p = init(tiny_cfg, seed=0)
    x = tokens(tiny_cfg)
    compiled = torch.compile(lambda params, t: apply(params, t, tiny_cfg)[0], fullgraph=True)
    torch.testing.assert_close(compiled(p, x), apply(p, x, tiny_cfg)[0], atol=1e-5, rtol=1e-5)
