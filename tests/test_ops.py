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
    # CPU (auto): the reference, whatever the native library provides (it has none of these ops).
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
