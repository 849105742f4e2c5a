"""The gradient formulas shared by every provider (``lumina_kernels._autograd``): each provider's
Functions behave the same at their edges.

- A None output gradient (an unused output, when a caller invokes a backward node or an op's
  registered formula directly) counts as zeros, on every op of every provider, and every
  differentiable input still gets a gradient.
- Each public function compiles (``fullgraph=True``) under ``torch.func.grad`` when the transform's
  own inputs go straight into it.

Providers: ``native`` (the C++ ops, when built), ``triton`` (interpreted on CPU tensors), ``reference``
(the grouped matmul custom op of ``lumina.ops``). Shapes are tiny: the Triton interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch

from lumina import ops
from lumina_kernels import native, reference

PROVIDERS: dict[str, dict] = {
    "reference": {"grouped_mm": lambda x, w, c: ops.grouped_mm(x, w, c, impl="reference")},
}
if native.available():
    PROVIDERS["native"] = {"dispatch": native.moe_dispatch, "combine": native.moe_combine}
try:
    from lumina_kernels import grouped_mm as _triton_gmm
    from lumina_kernels import mod_routing as _triton_mod
    from lumina_kernels import moe_combine as _triton_combine
    from lumina_kernels import moe_dispatch as _triton_dispatch

    PROVIDERS["triton"] = {
        "dispatch": _triton_dispatch.moe_dispatch,
        "combine": _triton_combine.moe_combine,
        "mod_gather": _triton_mod.mod_gather,
        "mod_scatter": _triton_mod.mod_scatter,
        "grouped_mm": _triton_gmm.grouped_mm,
    }
except ImportError:  # triton not installed
    pass

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, E, K, D, F = 5, 3, 2, 6, 4  # MoE: tokens, experts, top-k, model dim, expert dim
B, T, S = 2, 7, 3  # MoD: batch, sequence, selected per sequence


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _moe_inputs(gen):
    w_NK, ids_NK = torch.rand(N, E, generator=gen).softmax(-1).topk(K, dim=-1)
    counts_E, _, perm_A, _, _ = reference.moe_routing(ids_NK, w_NK, E, None)
    x_ND, y_AD = torch.randn(N, D, generator=gen), torch.randn(N * K, D, generator=gen)
    return [t.to(DEVICE) for t in (x_ND, y_AD, w_NK, perm_A, counts_E)]


def _mod_inputs(gen):
    idx_BS = reference.mod_topk(torch.randn(B, T, generator=gen), S)
    x_BTD, delta_BSD = torch.randn(B, T, D, generator=gen), torch.randn(B, S, D, generator=gen)
    return [t.to(DEVICE) for t in (x_BTD, delta_BSD, torch.rand(B, S, generator=gen), idx_BS)]


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


def _grads(out, inputs):
    """First-order gradients with a graph (the output gradient requires grad too), so the backward
    ops' own nodes can be reached."""
    g = torch.randn_like(out).requires_grad_()
    return torch.autograd.grad(out, inputs, g, create_graph=True)


def _function_node(t):
    """The autograd.Function node that produced ``t`` (skipping the free views public functions add)."""
    node = t.grad_fn
    while not hasattr(node, "_forward_cls"):
        node = node.next_functions[0][0]
    return node


def _nodes(kind, fns, gen):
    """{op: the outputs of one call of that op's Function}, for the ops of ``kind`` on one provider."""
    if kind in ("dispatch", "combine"):
        x, y, w, perm, _ = _moe_inputs(gen)
        x, y, w = _leaves(x, y, w)
        if kind == "dispatch":
            out = fns["dispatch"](x, perm, K)
            return {"moe_dispatch": [out], "moe_dispatch_backward": list(_grads(out, (x,)))}
        out = fns["combine"](y, perm, w)
        return {"moe_combine": [out], "moe_combine_backward": list(_grads(out, (y, w)))}
    if kind in ("mod_gather", "mod_scatter"):
        x, delta, w, idx = _mod_inputs(gen)
        x, delta, w = _leaves(x, delta, w)
        if kind == "mod_gather":
            out = fns["mod_gather"](x, idx)
            return {"mod_gather": [out], "mod_gather_backward": list(_grads(out, (x,)))}
        out = fns["mod_scatter"](x, delta, w, idx)
        _, d_delta, d_w = _grads(out, (x, delta, w))  # d x is the output gradient itself
        return {"mod_scatter": [out], "mod_scatter_backward": [d_delta, d_w]}
    x, _, _, _, counts = _moe_inputs(gen)
    x_AD = torch.randn(N * K, D, generator=gen).to(DEVICE)
    x_AD, w_EDF = _leaves(x_AD, torch.randn(E, D, F, generator=gen).to(DEVICE))
    out = fns["grouped_mm"](x_AD, w_EDF, counts)
    _, d_w = _grads(out, (x_AD, w_EDF))
    return {"grouped_mm": [out], "grouped_mm_weight_grad": [d_w]}


KINDS = ("dispatch", "combine", "mod_gather", "mod_scatter", "grouped_mm")
CASES = [(p, k) for p in PROVIDERS for k in KINDS if k in PROVIDERS[p]]


def _assert_same(got, want, msg):
    assert len(got) == len(want), msg
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), f"{msg}: input {i} got {a is not None}, expected {b is not None}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=i: f"{msg}: input {i}: {m}")


@pytest.mark.parametrize("provider,kind", CASES)
def test_a_missing_output_gradient_counts_as_zero(provider, kind):
    """Each backward node of the op (and of its backward op), called with None for one output gradient
    (or all of them), returns what it returns for zeros there: a tensor for every input that gets one.
    The native combine backward once had this guard and the Triton one did not."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for op, outputs in _nodes(kind, PROVIDERS[provider], gen).items():
        node = _function_node(outputs[0])
        assert all(_function_node(t) is node for t in outputs), op
        zeros = [torch.zeros_like(t) for t in outputs]
        given = [torch.randn(t.shape, generator=gen).to(t) for t in outputs]
        msg = f"{provider} {op}, seed {seed}"
        _assert_same(node.apply(*[None] * len(outputs)), node.apply(*zeros), f"{msg}, all None")
        for i in range(len(outputs)) if len(outputs) > 1 else ():
            with_none = [None if j == i else g for j, g in enumerate(given)]
            with_zero = [zeros[j] if j == i else g for j, g in enumerate(given)]
            _assert_same(node.apply(*with_none), node.apply(*with_zero), f"{msg}, output {i} None")


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if "combine" in PROVIDERS[p]])
def test_an_ops_registered_formula_takes_a_missing_gradient(provider):
    """The formula registered on the op itself (``register_autograd``: direct callers, opcheck) is the
    same: the combine backward's node with one output gradient None."""
    namespace = f"lumina_{provider}"
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    x, y, w, perm, _ = _moe_inputs(gen)
    g, y, w = _leaves(torch.randn(N, D, generator=gen).to(DEVICE), y, w)
    dy, dw = getattr(torch.ops, namespace).moe_combine_backward(g, y, perm, w)
    node = dy.grad_fn
    gg_y, gg_w = torch.randn_like(dy), torch.randn_like(dw)
    msg = f"{namespace}, seed {seed}"
    _assert_same(node.apply(gg_y, None), node.apply(gg_y, torch.zeros_like(dw)), f"{msg}, dw None")
    _assert_same(node.apply(None, gg_w), node.apply(torch.zeros_like(dy), gg_w), f"{msg}, dy None")


def _losses(kind, fns, gen):
    """(loss, its arguments): the transform's inputs go straight into the public functions."""
    if kind == "moe":
        x, y, w, perm, _ = _moe_inputs(gen)

        def loss(x, y, w):
            return fns["dispatch"](x, perm, K).square().sum() + fns["combine"](y, perm, w).square().sum()

        return loss, (x, y, w)
    if kind == "mod":
        x, delta, w, idx = _mod_inputs(gen)

        def loss(x, delta, w):
            gathered = fns["mod_gather"](x, idx).square().sum()
            return gathered + fns["mod_scatter"](x, delta, w, idx).square().sum()

        return loss, (x, delta, w)
    _, _, _, _, counts = _moe_inputs(gen)
    x_AD, w_EDF = (
        torch.randn(N * K, D, generator=gen).to(DEVICE),
        torch.randn(E, D, F, generator=gen).to(DEVICE),
    )

    def loss(x, w):
        return fns["grouped_mm"](x, w, counts).square().sum()

    return loss, (x_AD, w_EDF)


COMPILE_CASES = [
    (p, k)
    for p in PROVIDERS
    for k, needs in (("moe", "combine"), ("mod", "mod_scatter"), ("grouped_mm", "grouped_mm"))
    if needs in PROVIDERS[p]
]


@pytest.mark.parametrize("provider,kind", COMPILE_CASES)
def test_public_functions_compile_under_torch_func_grad_on_their_own_inputs(provider, kind):
    """torch.compile(torch.func.grad(loss), fullgraph=True) where ``loss`` passes its arguments straight
    to the public functions (torch 2.13 fails there unless the function hands its Function a view)."""
    seed = _seed()
    torch._dynamo.reset()
    loss, args = _losses(kind, PROVIDERS[provider], torch.Generator().manual_seed(seed))
    argnums = tuple(range(len(args)))
    eager = torch.func.grad(loss, argnums=argnums)(*args)
    compiled = torch.compile(torch.func.grad(loss, argnums=argnums), fullgraph=True, backend="aot_eager")
    for i, (a, b) in enumerate(zip(compiled(*args), eager, strict=True)):
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"{provider} {kind} arg {i}, seed {seed}: {m}")
