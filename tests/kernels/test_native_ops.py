"""Native CPU MoE ops (kernels/csrc/moe_ops.cpp via lumina_kernels.native) against the reference.

Legend: N tokens, K top-k, A = N*K assignments, E experts, D model dim.
Inputs are fresh random each run (the seed is printed, and shown by pytest on a failure); the
permutation comes from ``reference.moe_routing``, so it is what the model passes.
"""

from __future__ import annotations

import random

import pytest
import torch

import lumina_kernels
from lumina_kernels import native, reference

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason=f"native op library unavailable: {lumina_kernels.native_status()}; build with `make venv`",
)

# name: (N, K, E, D, routing). Shapes chosen to catch indexing bugs: a single token, K=1, K=E (every
# token visits every expert), a prime E, D that is no multiple of 8/16, every token on one expert,
# experts that get no tokens.
CASES = {
    "one_token": (1, 2, 7, 5, "random"),
    "k1": (23, 1, 7, 33, "random"),
    "k_equals_e": (13, 4, 4, 17, "random"),
    "prime_e": (61, 2, 7, 24, "random"),
    "one_expert_takes_all": (19, 1, 7, 9, "one_expert"),
    "empty_experts": (29, 2, 7, 40, "skip_experts"),
    "wide": (37, 3, 5, 131, "random"),
}
# dtype: (rtol, atol). fp32 and float64 differ from the reference only in summation order; bf16/fp16
# accumulate in float here and in the input dtype in the reference.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


@pytest.fixture
def seed() -> int:
    s = random.randrange(2**31)
    torch.manual_seed(s)
    print(f"seed {s}")
    return s


def routing(N: int, K: int, E: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm_A, weights_NK) from reference.moe_routing on top-k ids of the given kind."""
    if kind == "one_expert":
        ids_NK = torch.full((N, K), 3, dtype=torch.int64)
    elif kind == "skip_experts":  # experts 0, 2 and E-1 get nothing
        allowed = torch.tensor([e for e in range(E) if e not in (0, 2, E - 1)])
        ids_NK = torch.stack([allowed[torch.randperm(len(allowed))[:K]] for _ in range(N)])
    else:
        ids_NK = torch.rand(N, E).topk(K, dim=1).indices
    weights_NK = torch.rand(N, K).softmax(-1)
    counts_E, _, perm_A, _, _ = reference.moe_routing(ids_NK, weights_NK, E, None)
    if kind == "skip_experts":
        assert counts_E[0] == 0 and counts_E[-1] == 0
    return perm_A, weights_NK


def poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Free a NaN-filled block of the output's size so the allocator likely hands that memory to the
    kernel's torch::empty: a row the kernel forgets to write then reads NaN instead of zeros."""
    torch.full((numel,), float("nan"), dtype=dtype)


def assert_clean(t: torch.Tensor) -> None:
    assert torch.isfinite(t).all(), "non-finite values: an output row was not written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_reference(case, dtype, seed):
    N, K, E, D, kind = CASES[case]
    perm_A, weights_NK = routing(N, K, E, kind)
    rtol, atol = TOL[dtype]
    x_ND = torch.randn(N, D, dtype=dtype, requires_grad=True)
    y_AD = torch.randn(N * K, D, dtype=dtype, requires_grad=True)
    w_NK = weights_NK.clone().requires_grad_()

    poison_allocator(N * K * D, dtype)
    got = native.moe_dispatch(x_ND, perm_A, K)
    want = reference.moe_dispatch(x_ND, perm_A, K)
    assert torch.equal(got, want)  # a copy: bit-exact in every dtype
    g_AD = torch.randn_like(want)
    poison_allocator(N * D, dtype)
    (dx,) = torch.autograd.grad(got, x_ND, g_AD)
    (dx_ref,) = torch.autograd.grad(want, x_ND, g_AD)
    assert_clean(dx)
    # dx sums each token's K rows of g: the kernel in float, rounded once (rtol covers that); the
    # reference adds them in the input dtype, rounding each of its K - 1 partial sums by up to
    # u = eps / 2 of |partial| <= u * sum_k |g_k|. That worst case comes on top of the
    # tolerance: without it fp16 failed 2 of 10000 seeds at K = 4 (a sum cancelling to near zero after
    # a rounded partial of ~4); with it 0 of 10000.
    x32 = x_ND.detach().float().requires_grad_()
    (g_abs,) = torch.autograd.grad(reference.moe_dispatch(x32, perm_A, K), x32, g_AD.float().abs())
    err = (dx.float() - dx_ref.float()).abs()
    bound = atol + rtol * dx_ref.float().abs() + (K - 1) * torch.finfo(dtype).eps / 2 * g_abs
    assert (err <= bound).all(), f"dx: error {err.max().item():.3g} over its bound"

    poison_allocator(N * D, dtype)
    got = native.moe_combine(y_AD, perm_A, w_NK)
    want = reference.moe_combine(y_AD, perm_A, w_NK)
    assert got.dtype == want.dtype and got.shape == want.shape == (N, D)
    assert_clean(got)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    g_ND = torch.randn_like(want)
    poison_allocator(N * K * D, dtype)
    dy, dw = torch.autograd.grad(got, (y_AD, w_NK), g_ND)
    dy_ref, dw_ref = torch.autograd.grad(want, (y_AD, w_NK), g_ND)
    assert_clean(dy)
    assert dw.dtype == dw_ref.dtype == torch.float32
    torch.testing.assert_close(dy, dy_ref, rtol=rtol, atol=atol)
    # dw is a length-D dot product: the reference rounds it in the input dtype, the kernel in float.
    dw_atol = atol * (D**0.5 if dtype != torch.float32 else 1)
    torch.testing.assert_close(dw, dw_ref, rtol=rtol, atol=dw_atol)


@pytest.mark.parametrize("case", ["one_token", "k_equals_e", "empty_experts"])
def test_gradcheck_and_gradgradcheck_float64(case, seed):
    # First and second derivatives of the autograd.Function wrappers (whose backward uses the same
    # Functions) against finite differences.
    N, K, E, _, kind = CASES[case]
    N, D = min(N, 9), 3  # finite differences cost one pass per input element
    perm_A, weights_NK = routing(N, K, E, kind)
    x_ND = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    y_AD = torch.randn(N * K, D, dtype=torch.float64, requires_grad=True)
    w_NK = weights_NK.double().requires_grad_()
    dispatch = lambda x: native.moe_dispatch(x, perm_A, K)  # noqa: E731
    combine = lambda y, w: native.moe_combine(y, perm_A, w)  # noqa: E731
    assert torch.autograd.gradcheck(dispatch, (x_ND,))
    assert torch.autograd.gradgradcheck(dispatch, (x_ND,))
    assert torch.autograd.gradcheck(combine, (y_AD, w_NK))
    assert torch.autograd.gradgradcheck(combine, (y_AD, w_NK))


def test_weights_in_another_dtype_are_rounded_like_the_reference(seed):
    # bf16 activations with fp32 router weights: the reference multiplies by weights.to(y.dtype).
    perm_A, weights_NK = routing(17, 2, 5, "random")
    y_AD = torch.randn(34, 12, dtype=torch.bfloat16)
    got = native.moe_combine(y_AD, perm_A, weights_NK)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.moe_combine(y_AD, perm_A, weights_NK), rtol=2e-2, atol=2e-2)


def test_deterministic_across_calls(seed):
    perm_A, weights_NK = routing(257, 2, 7, "random")
    y_AD = torch.randn(514, 64, requires_grad=True)
    w_NK = weights_NK.requires_grad_()
    g_ND = torch.randn(257, 64)
    runs = [torch.autograd.grad(native.moe_combine(y_AD, perm_A, w_NK), (y_AD, w_NK), g_ND) for _ in range(3)]
    for dy, dw in runs[1:]:
        assert torch.equal(dy, runs[0][0]) and torch.equal(dw, runs[0][1])
    x_ND = torch.randn(257, 64, requires_grad=True)
    g_AD = torch.randn(514, 64)
    dxs = [torch.autograd.grad(native.moe_dispatch(x_ND, perm_A, 2), x_ND, g_AD)[0] for _ in range(3)]
    assert all(torch.equal(dx, dxs[0]) for dx in dxs[1:])


def test_rejects_a_bad_row_map():
    x_ND = torch.randn(4, 8)
    bad = torch.tensor([0, 1, 2, 2, 4, 5, 6, 7])
    with pytest.raises(RuntimeError, match="maps assignment 2 twice"):
        native.moe_dispatch(x_ND, bad, 2)
    with pytest.raises(RuntimeError, match="outside"):
        native.moe_combine(torch.randn(8, 8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]), torch.rand(4, 2))
    with pytest.raises(RuntimeError, match="outside"):  # -1 marks an empty row; other negatives are bugs
        native.moe_dispatch(x_ND, torch.tensor([0, -2]), 2)
    with pytest.raises(RuntimeError, match="int64"):
        native.moe_dispatch(x_ND, torch.arange(8, dtype=torch.int32), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op(dtype, seed):
    N, K, E, D = 11, 2, 7, 13
    perm_A, weights_NK = routing(N, K, E, "random")
    ops = torch.ops.lumina_native

    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    w_NK = weights_NK.clone().requires_grad_()
    cases = [
        (ops.moe_dispatch, (t(N, D), perm_A, K)),
        (ops.moe_dispatch_backward, (t(N * K, D), perm_A, K, N)),
        (ops.moe_combine, (t(N * K, D), perm_A, w_NK)),
        (ops.moe_combine_backward, (t(N, D), t(N * K, D), perm_A, w_NK)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_func_grad_matches_reference(seed):
    N, K, E, D = 31, 2, 7, 19
    perm_A, weights_NK = routing(N, K, E, "random")
    x_ND, scale_AD = torch.randn(N, D), torch.randn(N * K, D)

    def loss(impl, x, w):
        y_AD = impl.moe_dispatch(x, perm_A, K) * scale_AD  # stands in for the expert
        return impl.moe_combine(y_AD, perm_A, w).square().sum()

    got = torch.func.grad(lambda x, w: loss(native, x, w), argnums=(0, 1))(x_ND, weights_NK)
    want = torch.func.grad(lambda x, w: loss(reference, x, w), argnums=(0, 1))(x_ND, weights_NK)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_no_graph_breaks(seed):
    N, K, E, D = 37, 2, 7, 24
    perm_A, weights_NK = routing(N, K, E, "random")
    x_ND, scale_AD = torch.randn(N, D), torch.randn(N * K, D)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def layer(impl, x, w):
        return impl.moe_combine(impl.moe_dispatch(x, perm_A, K) * scale_AD, perm_A, w)

    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: layer(native, x, w), backend=counting_backend, fullgraph=True)
    torch.testing.assert_close(compiled(x_ND, weights_NK), layer(reference, x_ND, weights_NK))
    assert len(graphs) == 1, f"{len(graphs)} graphs: the ops broke the graph"
    # Forward + backward through AOTAutograd, the path train_step takes (torch.func.grad in compile).
    # x and w reach the ops directly as the transform's inputs: the case torch 2.13 trips over without
    # the views in lumina_kernels.native's public functions.
    step = torch.compile(
        torch.func.grad(lambda x, w: layer(native, x, w).square().sum(), argnums=(0, 1)),
        backend="aot_eager",
        fullgraph=True,
    )
    want = torch.func.grad(lambda x, w: layer(reference, x, w).square().sum(), argnums=(0, 1))(
        x_ND, weights_NK
    )
    for g, r in zip(step(x_ND, weights_NK), want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_and_grads(seed):
    # Transposed activations and an expanded (stride-0) upstream gradient, as .sum() produces.
    N, K, E, D = 13, 2, 5, 10
    perm_A, weights_NK = routing(N, K, E, "random")
    x_DN = torch.randn(D, N, requires_grad=True)
    y_DA = torch.randn(D, N * K, requires_grad=True)
    w_KN = weights_NK.T.clone().requires_grad_()
    results = []
    for impl in (native, reference):
        out = impl.moe_combine(impl.moe_dispatch(x_DN.T, perm_A, K) * y_DA.T, perm_A, w_KN.T)
        results.append((out, torch.autograd.grad(out.sum(), (x_DN, y_DA, w_KN))))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
