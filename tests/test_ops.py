"""lumina.ops: which implementation each op routes to, and the model through the Triton MoD kernels.

The Triton path is forced on CPU tensors (Triton's interpreter) by setting ``ops._PROVIDER`` to "triton",
which is what ``LUMINA_OPS=triton`` does at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lumina import ops
from lumina.config import MoDConfig, ModelConfig, MoEConfig
from lumina.model import apply, default_knobs, init
from lumina_kernels import reference

triton = pytest.importorskip("triton")

from lumina_kernels import mod_routing, moe_combine, moe_dispatch  # noqa: E402

CUDA_LIKE = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))  # _route reads only these


def test_route_picks_by_device_and_mode(monkeypatch):
    cpu = torch.zeros(1)
    t, n, r = "triton", "native", "reference"
    assert ops._route(CUDA_LIKE, t, n, r) == t
    assert ops._route(CUDA_LIKE, None, n, r) == r  # no Triton kernel for the op
    monkeypatch.setattr(ops, "_PROVIDER", "native")
    assert ops._route(cpu, t, n, r) == n
    monkeypatch.setattr(ops, "_PROVIDER", "reference")
    assert ops._route(cpu, t, n, r) == r
    monkeypatch.setattr(ops, "_PROVIDER", "triton")
    assert ops._route(cpu, t, n, r) == t
    assert ops._route(cpu, None, n, r) == r
    monkeypatch.setattr(ops, "_MODE", "reference")
    assert ops._route(CUDA_LIKE, t, n, r) == r
    assert ops._route(cpu, t, n, r) == r


def test_routing_ops_route_cpu_to_reference_and_cuda_to_triton(monkeypatch):
    seen = []
    monkeypatch.setattr(moe_dispatch, "moe_routing", lambda *a: seen.append("routing"))
    monkeypatch.setattr(mod_routing, "mod_topk", lambda *a: seen.append("topk"))
    monkeypatch.setattr(mod_routing, "mod_gather", lambda *a: seen.append("gather"))
    monkeypatch.setattr(mod_routing, "mod_scatter", lambda *a: seen.append("scatter"))
    x, idx = torch.randn(2, 5, 3), torch.tensor([[0, 3], [1, 4]])
    ids, w = torch.tensor([[0, 2], [2, 1]]), torch.rand(2, 2)
    # CPU (auto): no Triton kernel (gather runs natively when the library is built, as a K = 1
    # dispatch: test_providers checks which; routing and top-k have no native op).
    torch.testing.assert_close(ops.mod_gather(x, idx), reference.mod_gather(x, idx))
    assert torch.equal(ops.mod_topk(x[..., 0], 2), reference.mod_topk(x[..., 0], 2))
    for a, b in zip(ops.moe_routing(ids, w, 3, 1), reference.moe_routing(ids, w, 3, 1), strict=True):
        assert torch.equal(a, b)
    assert seen == []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    ops.moe_routing(ids, w, 3, None)
    ops.mod_topk(x[..., 0], 2)
    ops.mod_gather(x, idx)
    ops.mod_scatter(x, torch.randn(2, 2, 3), torch.rand(2, 2), idx)
    assert seen == ["routing", "topk", "gather", "scatter"]
    monkeypatch.setattr(ops, "_MODE", "reference")
    ops.moe_routing(ids, w, 3, None)
    ops.mod_topk(x[..., 0], 2)
    ops.mod_gather(x, idx)
    assert seen == ["routing", "topk", "gather", "scatter"]  # LUMINA_OPS=reference wins on CUDA too


KINDS = {  # name: (MoE, MoD, the Triton functions the model must call)
    "mod": (MoEConfig(), MoDConfig(enabled=True, capacity=0.4, every_n=2), {"mod"}),
    "moe_capacity": (
        MoEConfig(num_experts=5, top_k=2, d_expert=16, capacity_factor=0.8),
        MoDConfig(),
        {"routing", "dispatch_combine"},  # the capacity buffer is a dispatch through a partial map
    ),
    "hybrid": (
        MoEConfig(num_experts=3, top_k=2, d_expert=16),
        MoDConfig(enabled=True, capacity=0.4, every_n=2),
        {"mod", "routing", "dispatch_combine"},
    ),
}
TRITON_FNS = {  # group: the (module, function) pairs lumina.ops calls
    "mod": [(mod_routing, "mod_topk"), (mod_routing, "mod_gather"), (mod_routing, "mod_scatter")],
    "routing": [(moe_dispatch, "moe_routing")],
    "dispatch_combine": [(moe_dispatch, "moe_dispatch"), (moe_combine, "moe_combine")],
}


@pytest.mark.parametrize("kind", KINDS)
def test_model_through_triton_kernels_matches_reference(monkeypatch, kind):
    """Loss and every parameter gradient (torch.func.grad, the train step's transform) through the
    Triton kernels equal the reference's, and the model did go through them."""
    moe, mod, groups = KINDS[kind]
    cfg = ModelConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, ffn_multiple_of=16, moe=moe, mod=mod)
    params = init(cfg, seed=0)
    x = torch.randint(0, 53, (2, 13), generator=torch.Generator().manual_seed(0))

    def loss(p):
        logits, aux = apply(p, x[:, :-1], cfg, default_knobs(cfg))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + aux["loss"]

    monkeypatch.setattr(ops, "_PROVIDER", "reference")
    ref_grads, ref_loss = torch.func.grad_and_value(loss)(params)
    calls = set()
    for module, name in (pair for pairs in TRITON_FNS.values() for pair in pairs):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name: calls.add(name) or fn(*a))
    monkeypatch.setattr(ops, "_PROVIDER", "triton")
    grads, got_loss = torch.func.grad_and_value(loss)(params)
    assert calls == {name for g in groups for _, name in TRITON_FNS[g]}
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-6, rtol=1e-6)
    for path, g in ref_grads.flatten_keys(".").items():
        torch.testing.assert_close(grads.flatten_keys(".")[path], g, atol=1e-6, rtol=1e-5, msg=path)


def test_bad_lumina_ops_value_is_refused():
    proc = subprocess.run(
        [sys.executable, "-c", "import lumina.ops"],
        env={**os.environ, "LUMINA_OPS": "fast"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "LUMINA_OPS='fast': expected one of auto, reference, triton" in proc.stderr


# ----------------------------------------------------------------------------------- grouped matmul
def _gmm_operands(dtype, D=16, F=24):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 9])
    return torch.randn(17, D, generator=gen).to(dtype), torch.randn(4, D, F, generator=gen).to(dtype), counts


def test_grouped_mm_choice(monkeypatch):
    x, w, _ = _gmm_operands(torch.float32)
    xb, wb, _ = _gmm_operands(torch.bfloat16)
    assert ops.grouped_mm_choice(x, w) == "reference"  # CPU, auto
    assert ops.grouped_mm_choice(xb, wb, "torch") == "torch"
    assert ops.grouped_mm_choice(x, w, "triton") == "triton"
    with pytest.raises(
        ValueError, match=r"model.moe.grouped_mm=torch: .* bf16 operands only, got torch.float32"
    ):
        ops.grouped_mm_choice(x, w, "torch")
    xo, wo, _ = _gmm_operands(torch.bfloat16, D=12)
    with pytest.raises(ValueError, match="D=12 and F=24 must be multiples of 8"):
        ops.grouped_mm_choice(xo, wo, "torch")
    with pytest.raises(ValueError, match="expected one of auto, torch, triton, reference"):
        ops.grouped_mm_choice(x, w, "cublas")
    monkeypatch.setattr(ops, "_PROVIDER", "triton")  # LUMINA_OPS=triton: Triton on CPU too
    assert ops.grouped_mm_choice(x, w) == "triton"
    monkeypatch.setattr(ops, "_MODE", "reference")  # LUMINA_OPS=reference wins over an explicit choice
    assert ops.grouped_mm_choice(xb, wb, "torch") == "reference"


def test_grouped_mm_auto_on_cuda_prefers_torch_then_triton(monkeypatch):
    """On CUDA tensors auto takes torch's grouped_mm where it runs (bf16, aligned), else Triton."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    xb, wb, _ = _gmm_operands(torch.bfloat16)
    assert ops.grouped_mm_choice(xb, wb) == "torch"
    x, w, _ = _gmm_operands(torch.float32)
    assert ops.grouped_mm_choice(x, w) == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert ops.grouped_mm_choice(xb, wb) == "triton"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_model_grouped_mm_impls_match_reference(monkeypatch, impl):
    """A dropless MoE model's loss and gradients (bf16: torch's grouped_mm takes nothing else) with
    model.moe.grouped_mm = torch / triton equal those with the reference loop, and the model's forward
    did call the chosen implementation (its backward goes through that implementation's Functions)."""
    import dataclasses

    module, name = (torch.nn.functional, "grouped_mm") if impl == "torch" else (ops._triton_gmm, "grouped_mm")
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))

    moe = MoEConfig(num_experts=5, top_k=2, d_expert=16)
    base = ModelConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, ffn_multiple_of=16, moe=moe)
    x = torch.randint(0, 53, (2, 13), generator=torch.Generator().manual_seed(0))

    def grads(cfg):
        def loss(p):
            logits, aux = apply(p, x[:, :-1], cfg, default_knobs(cfg))
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            return ce + aux["loss"].float()

        return torch.func.grad_and_value(loss)(init(cfg, seed=0, dtype=torch.bfloat16))

    def with_impl(name):
        return dataclasses.replace(base, moe=dataclasses.replace(moe, grouped_mm=name))

    ref_grads, ref_loss = grads(with_impl("reference"))
    assert not calls
    got_grads, got_loss = grads(with_impl(impl))
    assert len(calls) >= 2 * 3  # 2 MoE layers x 3 expert matmuls in the forward alone
    torch.testing.assert_close(got_loss, ref_loss, atol=5e-3, rtol=5e-3)
    for path, g in ref_grads.flatten_keys(".").items():
        torch.testing.assert_close(
            got_grads.flatten_keys(".")[path].float(), g.float(), atol=5e-3, rtol=5e-2, msg=path
        )


def test_torch_grouped_mm_config_needs_bf16():
    from lumina.config import ConfigError, RunConfig, TrainConfig

    model = ModelConfig(
        vocab_size=53, d_model=16, n_layers=1, n_heads=2, moe=MoEConfig(num_experts=4, grouped_mm="torch")
    )
    with pytest.raises(ConfigError, match="model.moe.grouped_mm=torch needs train.precision=bf16"):
        RunConfig(model=model, train=TrainConfig(seq_len=16, precision="fp32"))
    RunConfig(model=model, train=TrainConfig(seq_len=16, precision="bf16"))
