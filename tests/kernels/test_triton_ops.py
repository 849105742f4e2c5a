"""The Triton dropless-MoE kernels (routing metadata, dispatch, combine, inverse permutation) against
``reference``.

Runs compiled on CUDA when a GPU is present and through Triton's interpreter on CPU tensors otherwise:
the kernels pick the interpreter per launch from the tensors' device (``lumina_kernels._triton``), so
this file needs no ``TRITON_INTERPRET=1`` and does not leak it into the rest of the session (setting it
here would be too late anyway whenever an earlier test had already imported triton, e.g. through
torch.compile). Interpreted shapes stay small; the ``gpu`` tests use realistic ones.

Inputs are fresh random draws each run; the seed is in every failure message.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from lumina_kernels import reference  # noqa: E402
from lumina_kernels.moe_combine import (  # noqa: E402
    moe_combine,
    moe_combine_backward,
    moe_combine_backward_launch,
    moe_combine_launch,
)
from lumina_kernels.moe_dispatch import (  # noqa: E402
    inverse_permutation,
    inverse_permutation_launch,
    moe_dispatch,
    moe_dispatch_backward,
    moe_dispatch_backward_launch,
    moe_dispatch_launch,
    moe_routing,
    moe_routing_launch,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel in `dtype` vs the reference in fp32 on the same (rounded) inputs: the kernels accumulate in
# fp32, so the only error is the final rounding to `dtype` (plus summation order in fp32).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
CASES = {  # name: (N tokens, E experts, K top-k, D, expert every token is sent to or None)
    "one_token": (1, 7, 1, 5, None),
    "k_eq_e": (5, 7, 7, 37, None),
    "e61_mostly_empty": (13, 61, 2, 37, None),
    "all_to_one_expert": (9, 7, 1, 24, 3),  # K=1: every assignment in expert 3, six experts empty
    "top2_of_7": (33, 7, 2, 70, None),
}
# None: the launcher's own blocks (one column block here); (4, 16): several row and column blocks,
# the last of each partial (D is never a multiple of 16 above, except 24 -> 16 + 8).
BLOCKS = [None, (4, 16)]


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _routing(N, E, K, all_to, gen):
    scores = torch.rand(N, E, generator=gen)
    if all_to is not None:
        scores[:, all_to] += 10
    w_NK, ids_NK = scores.softmax(-1).topk(K, dim=-1)
    _, _, perm_A, _, _ = reference.moe_routing(ids_NK, w_NK, E, None)
    return ids_NK, w_NK, perm_A


def _inputs(case, dtype, seed):
    N, E, K, D, all_to = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    ids_NK, w_NK, perm_A = _routing(N, E, K, all_to, gen)
    if all_to is not None:
        assert (ids_NK == all_to).all()
    x_ND = torch.randn(N, D, generator=gen).to(dtype)
    y_AD = torch.randn(N * K, D, generator=gen).to(dtype)
    # Router weights in fp32 (the usual), except fp16 runs, which also cover same-dtype weights.
    w_NK = w_NK.to(torch.float16 if dtype == torch.float16 else torch.float32)
    return [t.to(DEVICE) for t in (x_ND, y_AD, w_NK, perm_A)] + [K]


def _close(actual, expected, dtype, msg):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype], msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_inverse_permutation(case):
    seed = _seed()
    _, _, _, perm_A, _ = _inputs(case, torch.float32, seed)
    inv_A = inverse_permutation(perm_A)
    assert inv_A.dtype == torch.int64
    assert torch.equal(inv_A[perm_A], torch.arange(perm_A.numel(), device=DEVICE)), f"seed {seed}"


@pytest.mark.parametrize("blocks", BLOCKS, ids=["auto", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_dispatch_matches_reference(case, dtype, blocks):
    seed = _seed()
    x_ND, _, _, perm_A, K = _inputs(case, dtype, seed)
    br, bd = blocks or (None, None)
    out = moe_dispatch_launch(x_ND, perm_A, K, block_r=br, block_d=bd)
    assert out.dtype == dtype
    assert torch.equal(out, reference.moe_dispatch(x_ND, perm_A, K)), f"seed {seed}"  # a copy: exact

    g_AD = torch.randn(out.shape, device=DEVICE).to(dtype)
    x32 = x_ND.float().requires_grad_()
    (expected,) = torch.autograd.grad(reference.moe_dispatch(x32, perm_A, K), x32, g_AD.float())
    got = moe_dispatch_backward_launch(g_AD, perm_A, K, block_r=br, block_d=bd)
    assert got.dtype == dtype and got.shape == x_ND.shape
    _close(got, expected, dtype, f"dispatch backward, seed {seed}")


@pytest.mark.parametrize("blocks", BLOCKS, ids=["auto", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_combine_matches_reference(case, dtype, blocks):
    seed = _seed()
    _, y_AD, w_NK, perm_A, K = _inputs(case, dtype, seed)
    br, bd = blocks or (None, None)
    # The reference in fp32 on the same values (weights rounded to y's dtype, as both implementations do).
    y32 = y_AD.float().requires_grad_()
    w32 = w_NK.to(dtype).float().requires_grad_()
    expected = reference.moe_combine(y32, perm_A, w32)
    out = moe_combine_launch(y_AD, perm_A, w_NK, block_r=br, block_d=bd)
    assert out.dtype == dtype and out.shape == (w_NK.shape[0], y_AD.shape[1])
    _close(out, expected, dtype, f"combine forward, seed {seed}")

    g_ND = torch.randn(out.shape, device=DEVICE).to(dtype)
    e_dy, e_dw = torch.autograd.grad(expected, (y32, w32), g_ND.float())
    dy, dw = moe_combine_backward_launch(g_ND, y_AD, perm_A, w_NK, block_r=br, block_d=bd)
    assert dy.dtype == dtype and dw.dtype == w_NK.dtype and dw.shape == w_NK.shape
    _close(dy, e_dy, dtype, f"combine d(y), seed {seed}")
    _close(dw, e_dw, dtype, f"combine d(weights), seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_functions_autograd(dtype):
    """The autograd.Function path (what the model calls) gives the reference's gradients."""
    seed = _seed()
    x_ND, y_AD, w_NK, perm_A, K = _inputs("top2_of_7", dtype, seed)
    x, y, w = (t.clone().requires_grad_() for t in (x_ND, y_AD, w_NK))
    # A small MoE round trip: dispatch, a per-row nonlinearity standing in for the experts, combine.
    out = moe_combine(torch.tanh(moe_dispatch(x, perm_A, K)) * y, perm_A, w)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, y, w), g)
    x32, y32, w32 = (t.float().requires_grad_() for t in (x_ND, y_AD, w_NK.to(dtype)))
    ref = reference.moe_combine(torch.tanh(reference.moe_dispatch(x32, perm_A, K)) * y32, perm_A, w32)
    _close(out, ref, dtype, f"forward, seed {seed}")
    ref_grads = torch.autograd.grad(ref, (x32, y32, w32), g.float())
    # bf16 also rounds the intermediates (tanh, the product, their grads) that the fp32 reference keeps.
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    checked = 3 if dtype == torch.float32 else 2  # bf16 dw: below, with the walk of its D roundings
    for name, a, b in zip("xyw"[:checked], grads[:checked], ref_grads[:checked], strict=True):
        torch.testing.assert_close(
            a.float(), b.float(), **tol, msg=lambda m, n=name: f"d{n}, seed {seed}: {m}"
        )
    if dtype == torch.float32:
        return
    # dw sums D = 70 terms g * tanh(x) * y, each with two bf16 roundings (tanh, the product; 2**-8 each,
    # to nearest: torch ops): a random walk of standard deviation sqrt(2) * 2**-8 / sqrt(3) * ||g * tanh(x)
    # * y||. Allow 6 of them on top of a single kernel's tolerance, instead of the flat rtol 3e-2, atol
    # 5e-2 above, which came to 0.89 of its bound in 1000 seeds (an error of the terms, not of dw);
    # under this bound the largest error in 1000 seeds was 0.41 of it.
    inner = (torch.tanh(reference.moe_dispatch(x32, perm_A, K)) * y32).detach()
    w2 = w32.detach().clone().requires_grad_()
    (walk,) = torch.autograd.grad(reference.moe_combine(inner**2, perm_A, w2), w2, g.float() ** 2)
    err = (grads[2].float() - ref_grads[2]).abs()
    bound = (
        TOL[dtype]["atol"]
        + TOL[dtype]["rtol"] * ref_grads[2].abs()
        + 6 * 2**0.5 * 2**-8 / 3**0.5 * walk.sqrt()
    )
    assert (err <= bound).all(), f"dw, seed {seed}: error {err.max().item():.3g} over its bound"


def test_torch_func_grad():
    """torch.func.grad (the train step's transform) differentiates the public functions."""
    seed = _seed()
    x_ND, y_AD, w_NK, perm_A, K = _inputs("e61_mostly_empty", torch.float32, seed)

    def loss(impl_dispatch, impl_combine, x, w):
        return impl_combine(impl_dispatch(x, perm_A, K) * y_AD, perm_A, w).square().sum()

    got = torch.func.grad(lambda x, w: loss(moe_dispatch, moe_combine, x, w), argnums=(0, 1))(x_ND, w_NK)
    ref = torch.func.grad(
        lambda x, w: loss(reference.moe_dispatch, reference.moe_combine, x, w), argnums=(0, 1)
    )(x_ND, w_NK)
    for a, b in zip(got, ref, strict=True):
        _close(a, b, torch.float32, f"seed {seed}")


def test_double_backward():
    """The backward is built from the same differentiable Functions: gradgradcheck in fp64."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    N, E, K, D = 3, 5, 2, 3
    _, w_NK, perm_A = _routing(N, E, K, None, gen)
    x, y, w = (
        t.to(DEVICE, torch.float64).requires_grad_()
        for t in (torch.randn(N, D, generator=gen), torch.randn(N * K, D, generator=gen), w_NK)
    )
    perm_A = perm_A.to(DEVICE)
    assert torch.autograd.gradgradcheck(lambda x: moe_dispatch(x, perm_A, K), (x,)), f"seed {seed}"
    assert torch.autograd.gradgradcheck(lambda y, w: moe_combine(y, perm_A, w), (y, w)), f"seed {seed}"


def test_launchers_write_every_element():
    """Outputs come from torch.empty: launched into NaN-poisoned buffers, no NaN may survive."""
    seed = _seed()
    for dtype in (torch.float32, torch.bfloat16):
        x_ND, y_AD, w_NK, perm_A, K = _inputs("top2_of_7", dtype, seed)
        N, D = x_ND.shape
        A = perm_A.numel()

        def poisoned(*shape, dtype=dtype):
            return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)

        for br, bd in [(None, None), (4, 16), (1, 64)]:
            blocks = dict(block_r=br, block_d=bd)
            out = moe_dispatch_launch(x_ND, perm_A, K, out=poisoned(A, D), **blocks)
            assert torch.equal(out, reference.moe_dispatch(x_ND, perm_A, K)), f"seed {seed}"
            out = moe_dispatch_backward_launch(y_AD, perm_A, K, out=poisoned(N, D), **blocks)
            assert not out.isnan().any(), f"dispatch backward, blocks {br, bd}, seed {seed}"
            out = moe_combine_launch(y_AD, perm_A, w_NK, out=poisoned(N, D), **blocks)
            assert not out.isnan().any(), f"combine, blocks {br, bd}, seed {seed}"
            dy, dw = moe_combine_backward_launch(
                x_ND, y_AD, perm_A, w_NK, out=(poisoned(A, D), poisoned(N, K, dtype=w_NK.dtype)), **blocks
            )
            assert not dy.isnan().any() and not dw.isnan().any(), f"combine backward, seed {seed}"
        inv = inverse_permutation_launch(perm_A, out=torch.full_like(perm_A, -1))
        assert (inv >= 0).all(), f"seed {seed}"


def test_deterministic():
    """No atomics: the backward kernels are bit-identical run to run."""
    seed = _seed()
    x_ND, y_AD, w_NK, perm_A, K = _inputs("k_eq_e", torch.float32, seed)
    a = moe_dispatch_backward(y_AD, perm_A, K)
    assert torch.equal(a, moe_dispatch_backward(y_AD, perm_A, K))
    dy, dw = moe_combine_backward(x_ND, y_AD, perm_A, w_NK)
    dy2, dw2 = moe_combine_backward(x_ND, y_AD, perm_A, w_NK)
    assert torch.equal(dy, dy2) and torch.equal(dw, dw2)


def test_compiles_fullgraph():
    """The ops are opaque to torch.compile (fake impls give the shapes): one graph, forward + backward."""
    seed = _seed()
    x_ND, y_AD, w_NK, perm_A, K = _inputs("top2_of_7", torch.float32, seed)

    def f(x, w):
        return moe_combine(moe_dispatch(x, perm_A, K) * y_AD, perm_A, w).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, w = x_ND.clone().requires_grad_(), w_NK.clone().requires_grad_()
    got = torch.autograd.grad(compiled(x, w), (x, w))
    ref = torch.autograd.grad(f(x, w), (x, w))
    for a, b in zip(got, ref, strict=True):
        _close(a, b, torch.float32, f"seed {seed}")


def test_opcheck():
    seed = _seed()
    x_ND, y_AD, w_NK, perm_A, K = _inputs("k_eq_e", torch.float32, seed)
    x, y, w = (t.clone().requires_grad_() for t in (x_ND, y_AD, w_NK))
    ops = torch.ops.lumina_triton
    torch.library.opcheck(ops.inverse_permutation, (perm_A,))
    torch.library.opcheck(ops.moe_dispatch, (x, perm_A, K))
    torch.library.opcheck(ops.moe_dispatch_backward, (y, perm_A, K, x.shape[0]))
    torch.library.opcheck(ops.moe_combine, (y, perm_A, w))
    torch.library.opcheck(ops.moe_combine_backward, (x.detach().clone().requires_grad_(), y, perm_A, w))


# ------------------------------------------------------------------------------------ routing metadata
ROUTING_NAMES = ("counts", "offsets", "perm", "position", "keep")


def _routing_inputs(case, seed, levels=None, w_dtype=torch.float32):
    N, E, K, _, all_to = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    ids_NK, w_NK, _ = _routing(N, E, K, all_to, gen)
    if levels is not None:  # few distinct weights: rank ties inside experts, broken by assignment id
        w_NK = (w_NK * levels).round() / levels
    return ids_NK.to(DEVICE), w_NK.to(device=DEVICE, dtype=w_dtype), E


def _assert_routing_equal(got, ids_NK, w_NK, E, capacity, msg):
    expected = reference.moe_routing(ids_NK, w_NK, E, capacity)
    for name, g, e in zip(ROUTING_NAMES, got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, f"{name}: {g.dtype} {g.shape}, {msg}"
        assert torch.equal(g, e), f"{name}: {g.tolist()} != {e.tolist()}, {msg}"


# None: the launcher's own blocks (one block here); (4, 2, 4, 8): several histogram blocks, summed two
# at a time (carries across blocks and across the prefix kernel's tiles), and several row / column
# blocks in the capacity ranking, the last of each partial.
ROUTING_BLOCKS = [None, (4, 2, 4, 8)]


@pytest.mark.parametrize("blocks", ROUTING_BLOCKS, ids=["auto", "small"])
@pytest.mark.parametrize("capacity", [None, 1, 3, 1000], ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", CASES)
def test_routing_matches_reference(case, ties, capacity, blocks):
    """All five outputs equal the reference exactly: counts (empty experts included), offsets, the
    stable permutation, each assignment's rank in its expert by weight, and the drop mask."""
    seed = _seed()
    ids_NK, w_NK, E = _routing_inputs(case, seed, levels=4 if ties else None)
    A = ids_NK.numel()
    poisoned = (
        torch.full((E,), -1, dtype=torch.int64, device=DEVICE),
        torch.full((E + 1,), -1, dtype=torch.int64, device=DEVICE),
        torch.full((A,), -1, dtype=torch.int64, device=DEVICE),
        torch.full((A,), -1, dtype=torch.int64, device=DEVICE),
        torch.zeros(A, dtype=torch.bool, device=DEVICE)
        if capacity is None
        else torch.ones(A, dtype=torch.bool, device=DEVICE),
    )
    ba, bb, bi, bj = blocks or (None, None, None, None)
    got = moe_routing_launch(
        ids_NK, w_NK, E, capacity, out=poisoned, block_a=ba, block_b=bb, block_i=bi, block_j=bj
    )
    _assert_routing_equal(got, ids_NK, w_NK, E, capacity, f"seed {seed}")


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float64], ids=str)
def test_routing_weight_dtypes(w_dtype):
    """Ranks compare the weights in their own dtype (bf16 rounding makes ties, broken by id)."""
    seed = _seed()
    ids_NK, w_NK, E = _routing_inputs("top2_of_7", seed, w_dtype=w_dtype)
    got = moe_routing(ids_NK, w_NK, E, 4)
    _assert_routing_equal(got, ids_NK, w_NK, E, 4, f"seed {seed}")


def test_routing_compiles_fullgraph_and_opcheck():
    seed = _seed()
    ids_NK, w_NK, E = _routing_inputs("e61_mostly_empty", seed)
    for capacity in (None, 1):
        torch.library.opcheck(torch.ops.lumina_triton.moe_routing, (ids_NK, w_NK, E, capacity))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda i, w: moe_routing(i, w, E, 2), fullgraph=True, backend=counting_backend)
    _assert_routing_equal(compiled(ids_NK, w_NK), ids_NK, w_NK, E, 2, f"seed {seed}")
    assert len(graphs) == 1  # no host sync: one graph
    # Detached inside: grad-tracking router weights are fine and get no gradient path.
    assert not any(t.requires_grad for t in moe_routing(ids_NK, w_NK.clone().requires_grad_(), E, None))


# ------------------------------------------------------------------------------ GPU: realistic shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,E,K,D", [(4096, 64, 8, 1024), (3001, 61, 2, 1000), (1, 8, 8, 4096)])
def test_gpu_large_shapes(N, E, K, D, dtype):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    _, w_NK, perm_A = _routing(N, E, K, None, gen)
    x = torch.randn(N, D, generator=gen).to(device="cuda", dtype=dtype)
    y = torch.randn(N * K, D, generator=gen).to(device="cuda", dtype=dtype)
    w, perm_A = w_NK.cuda(), perm_A.cuda()
    assert torch.equal(moe_dispatch(x, perm_A, K), reference.moe_dispatch(x, perm_A, K)), f"seed {seed}"
    g_AD = torch.randn(N * K, D, device="cuda").to(dtype)
    x32 = x.float().requires_grad_()
    (e_dx,) = torch.autograd.grad(reference.moe_dispatch(x32, perm_A, K), x32, g_AD.float())
    _close(moe_dispatch_backward(g_AD, perm_A, K), e_dx, dtype, f"seed {seed}")
    y32, w32 = y.float().requires_grad_(), w.to(dtype).float().requires_grad_()
    expected = reference.moe_combine(y32, perm_A, w32)
    _close(moe_combine(y, perm_A, w), expected, dtype, f"seed {seed}")
    g_ND = torch.randn(N, D, device="cuda").to(dtype)
    e_dy, e_dw = torch.autograd.grad(expected, (y32, w32), g_ND.float())
    dy, dw = moe_combine_backward(g_ND, y, perm_A, w)
    _close(dy, e_dy, dtype, f"seed {seed}")
    # dw is a D-long dot product: fp32 accumulation, but the order differs from the reference's.
    torch.testing.assert_close(dw, e_dw, rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("N,E,K", [(16384, 64, 8), (3001, 61, 2), (4096, 8, 1), (1, 256, 8)])
@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_gpu_routing_large_shapes(N, E, K, capacity_factor):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    ids_NK, w_NK, _ = _routing(N, E, K, None, gen)
    ids_NK, w_NK = ids_NK.cuda(), w_NK.cuda()
    capacity = None if capacity_factor is None else int(capacity_factor * N * K / E) + 1
    _assert_routing_equal(moe_routing(ids_NK, w_NK, E, capacity), ids_NK, w_NK, E, capacity, f"seed {seed}")


def test_interpreted_follows_the_device_and_the_knob(monkeypatch):
    """One rule for "does this launch run in Triton's interpreter", used by every launcher and block
    heuristic: CPU tensors always, CUDA tensors only when TRITON_INTERPRET (the knob) says so."""
    from lumina_kernels._triton import interpreted

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    assert interpreted(torch.device("cpu"))
    assert not interpreted(torch.device("cuda"))
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert interpreted(torch.device("cuda"))
