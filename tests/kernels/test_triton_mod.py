"""The Triton Mixture-of-Depths kernels (top-k, gather, scatter and their backwards) against ``reference``.

Runs compiled on CUDA when a GPU is present and through Triton's interpreter on CPU tensors otherwise
(the kernels pick per launch; see ``test_triton_ops``). Interpreted shapes stay small; the ``gpu`` test
uses realistic ones. Inputs are fresh random draws each run; the seed is in every failure message.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from lumina_kernels import reference  # noqa: E402
from lumina_kernels.mod_routing import (  # noqa: E402
    mod_gather,
    mod_gather_backward,
    mod_gather_backward_launch,
    mod_gather_launch,
    mod_scatter,
    mod_scatter_backward,
    mod_scatter_backward_launch,
    mod_scatter_launch,
    mod_topk,
    mod_topk_launch,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
# Kernel in `dtype` vs the reference in fp32 on the same (rounded) inputs: products and dot products are
# computed in fp32, so the error is the rounding to `dtype` (the reference's own intermediate rounding
# of w * delta in bf16 included).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
CASES = {  # name: (B, T, S, D)
    "one_token": (1, 1, 1, 5),
    "all_selected": (2, 9, 9, 24),
    "half_of_odd_T": (3, 37, 18, 37),  # T, S not multiples of any block
    "single_batch": (1, 20, 5, 24),
}
# None: the launcher's own blocks; (4, 16): several row and column blocks, the last of each partial.
BLOCKS = [None, (4, 16)]


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _inputs(case, dtype, seed):
    B, T, S, D = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    idx_BS = reference.mod_topk(torch.randn(B, T, generator=gen), S)
    x_BTD = torch.randn(B, T, D, generator=gen).to(dtype)
    delta_BSD = torch.randn(B, S, D, generator=gen).to(dtype)
    w_BS = torch.rand(B, S, generator=gen)  # router weights in fp32, as in the model
    return [t.to(DEVICE) for t in (x_BTD, delta_BSD, w_BS, idx_BS)]


def _close(actual, expected, dtype, msg):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype], msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("blocks", BLOCKS, ids=["auto", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_gather_matches_reference(case, dtype, blocks):
    seed = _seed()
    x_BTD, delta_BSD, _, idx_BS = _inputs(case, dtype, seed)
    br, bd = blocks or (None, None)
    out = mod_gather_launch(x_BTD, idx_BS, block_r=br, block_d=bd)
    assert out.dtype == dtype
    assert torch.equal(out, reference.mod_gather(x_BTD, idx_BS)), f"seed {seed}"  # a copy: exact

    x32 = x_BTD.float().requires_grad_()
    (expected,) = torch.autograd.grad(reference.mod_gather(x32, idx_BS), x32, delta_BSD.float())
    got = mod_gather_backward_launch(delta_BSD, idx_BS, x_BTD.shape[1], block_r=br, block_d=bd)
    assert got.dtype == dtype and got.shape == x_BTD.shape
    assert torch.equal(got.float(), expected), f"gather backward, seed {seed}"  # a placement: exact


@pytest.mark.parametrize("blocks", BLOCKS, ids=["auto", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_scatter_matches_reference(case, dtype, blocks):
    seed = _seed()
    x_BTD, delta_BSD, w_BS, idx_BS = _inputs(case, dtype, seed)
    br, bd = blocks or (None, None)
    out = mod_scatter_launch(x_BTD, delta_BSD, w_BS, idx_BS, block_r=br, block_d=bd)
    assert out.dtype == dtype and out.shape == x_BTD.shape
    # The reference's own roundings (w, then w * delta, to delta's dtype), the final add in fp32.
    update = (delta_BSD * w_BS.to(dtype).unsqueeze(-1)).float()
    same = reference.mod_scatter(x_BTD.float(), update, torch.ones_like(w_BS), idx_BS)
    if dtype == torch.float32:
        _close(out, same, dtype, f"scatter forward, seed {seed}")
    else:
        # The kernel rounds w, w * delta and the sum to bf16 as the reference does; compiled that is
        # round-to-nearest, but Triton's interpreter truncates on fp32 -> bf16, so each of the three
        # roundings may be off by one ulp (<= 2**-7 of the value rounded; w's scales the update).
        upd = reference.mod_scatter(torch.zeros_like(same), update, torch.ones_like(w_BS), idx_BS)
        bound = 2**-7 * (2 * upd.abs() + same.abs()) + 1e-6
        assert ((out.float() - same).abs() <= bound).all(), f"scatter forward, seed {seed}"
    # Unselected rows pass through bit-exactly.
    unselected = torch.ones(x_BTD.shape[:2], dtype=torch.bool, device=DEVICE).scatter(1, idx_BS, False)
    assert torch.equal(out[unselected], x_BTD[unselected]), f"seed {seed}"

    x32 = x_BTD.float().requires_grad_()
    d32 = delta_BSD.float().requires_grad_()
    w32 = w_BS.to(dtype).float().requires_grad_()
    expected = reference.mod_scatter(x32, d32, w32, idx_BS)

    g_BTD = torch.randn(out.shape, device=DEVICE).to(dtype)
    _, e_dd, e_dw = torch.autograd.grad(expected, (x32, d32, w32), g_BTD.float())
    dd, dw = mod_scatter_backward_launch(g_BTD, delta_BSD, w_BS, idx_BS, block_r=br, block_d=bd)
    assert dd.dtype == dtype and dd.shape == delta_BSD.shape
    assert dw.dtype == w_BS.dtype and dw.shape == w_BS.shape
    _close(dd, e_dd, dtype, f"scatter d(delta), seed {seed}")
    _close(dw, e_dw, dtype, f"scatter d(weight), seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_functions_autograd(dtype):
    """The autograd.Function path (what the model calls) gives the reference's gradients."""
    seed = _seed()
    x_BTD, delta_BSD, w_BS, idx_BS = _inputs("half_of_odd_T", dtype, seed)
    x, w = x_BTD.clone().requires_grad_(), w_BS.clone().requires_grad_()
    # A MoD block: gather, a per-row nonlinearity standing in for the block, weighted scatter back.
    out = mod_scatter(x, torch.tanh(mod_gather(x, idx_BS)) * delta_BSD, w, idx_BS)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w), g)
    x32, w32 = x_BTD.float().requires_grad_(), w_BS.to(dtype).float().requires_grad_()
    inner = torch.tanh(reference.mod_gather(x32, idx_BS)) * delta_BSD.float()
    ref = reference.mod_scatter(x32, inner, w32, idx_BS)
    # bf16 also rounds the intermediates (tanh, the product, their grads) that the fp32 reference keeps.
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(out.float(), ref, **tol, msg=lambda m: f"forward, seed {seed}: {m}")
    ref_grads = torch.autograd.grad(ref, (x32, w32), g.float())
    torch.testing.assert_close(grads[1], ref_grads[1], **tol, msg=lambda m: f"dw, seed {seed}: {m}")
    if dtype == torch.float32:
        torch.testing.assert_close(grads[0], ref_grads[0], **tol, msg=lambda m: f"dx, seed {seed}: {m}")
        return
    # dx = g + c at the selected rows, c = g * w * delta * tanh'(x). bf16 rounds c's factors: w * g
    # (truncated in Triton's interpreter: up to 2**-7), then * delta and the tanh' product (2**-8
    # each), and tanh' itself moves by up to 2**-7 of |g * w * delta| with tanh's rounding: at most
    # 2**-6 of |g * w * delta| in all: an error of the terms, not of dx, which may cancel to near zero.
    # That worst case comes on top of the kernel's own tolerance (the final rounding of g + c), instead
    # of the flat rtol 3e-2, atol 5e-2 above, under which dx's error reached 0.95 of the bound in 2000
    # seeds; under this bound 0 of 2000 failed, the largest error at 0.84 of it (a worst case, not a
    # tail: no seed can exceed it).
    g_delta = reference.mod_gather(g.float().abs(), idx_BS) * delta_BSD.float().abs()
    mag = reference.mod_scatter(torch.zeros_like(x32), g_delta, w32, idx_BS)  # |g * w * delta| at the rows
    err = (grads[0].float() - ref_grads[0]).abs()
    bound = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * ref_grads[0].abs() + 2**-6 * mag
    assert (err <= bound).all(), f"dx, seed {seed}: error {err.max().item():.3g} over its bound"


def test_torch_func_grad():
    """torch.func.grad (the train step's transform) differentiates the public functions."""
    seed = _seed()
    x_BTD, delta_BSD, w_BS, idx_BS = _inputs("half_of_odd_T", torch.float32, seed)

    def loss(gather, scatter, x, w):
        return scatter(x, gather(x, idx_BS) * delta_BSD, w, idx_BS).square().sum()

    got = torch.func.grad(lambda x, w: loss(mod_gather, mod_scatter, x, w), argnums=(0, 1))(x_BTD, w_BS)
    ref = torch.func.grad(
        lambda x, w: loss(reference.mod_gather, reference.mod_scatter, x, w), argnums=(0, 1)
    )(x_BTD, w_BS)
    for a, b in zip(got, ref, strict=True):
        _close(a, b, torch.float32, f"seed {seed}")


def test_double_backward():
    """The backwards are built from the same differentiable Functions: gradgradcheck in fp64."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    B, T, S, D = 2, 5, 3, 3
    idx_BS = reference.mod_topk(torch.randn(B, T, generator=gen), S).to(DEVICE)
    x, delta, w = (
        t.to(DEVICE, torch.float64).requires_grad_()
        for t in (torch.randn(B, T, D, generator=gen), torch.randn(B, S, D, generator=gen), torch.rand(B, S))
    )
    assert torch.autograd.gradgradcheck(lambda x: mod_gather(x, idx_BS), (x,)), f"seed {seed}"
    assert torch.autograd.gradgradcheck(lambda x, d, w: mod_scatter(x, d, w, idx_BS), (x, delta, w)), (
        f"seed {seed}"
    )


def test_launchers_write_every_element():
    """Outputs come from torch.empty: launched into NaN-poisoned buffers, no NaN may survive."""
    seed = _seed()
    for dtype in DTYPES:
        x_BTD, delta_BSD, w_BS, idx_BS = _inputs("half_of_odd_T", dtype, seed)
        B, T, D = x_BTD.shape
        S = idx_BS.shape[1]

        def poisoned(*shape, dtype=dtype):
            return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)

        for br, bd in [(None, None), (4, 16), (1, 64)]:
            blocks = dict(block_r=br, block_d=bd)
            out = mod_gather_launch(x_BTD, idx_BS, out=poisoned(B, S, D), **blocks)
            assert torch.equal(out, reference.mod_gather(x_BTD, idx_BS)), f"seed {seed}"
            out = mod_gather_backward_launch(delta_BSD, idx_BS, T, out=poisoned(B, T, D), **blocks)
            assert not out.isnan().any(), f"gather backward, blocks {br, bd}, seed {seed}"
            out = mod_scatter_launch(x_BTD, delta_BSD, w_BS, idx_BS, out=poisoned(B, T, D), **blocks)
            assert not out.isnan().any(), f"scatter, blocks {br, bd}, seed {seed}"
            dd, dw = mod_scatter_backward_launch(
                x_BTD,
                delta_BSD,
                w_BS,
                idx_BS,
                out=(poisoned(B, S, D), poisoned(B, S, dtype=w_BS.dtype)),
                **blocks,
            )
            assert not dd.isnan().any() and not dw.isnan().any(), f"scatter backward, seed {seed}"


def test_deterministic():
    """No atomics: the backward kernels are bit-identical run to run."""
    seed = _seed()
    x_BTD, delta_BSD, w_BS, idx_BS = _inputs("all_selected", torch.float32, seed)
    a = mod_gather_backward(delta_BSD, idx_BS, x_BTD.shape[1])
    assert torch.equal(a, mod_gather_backward(delta_BSD, idx_BS, x_BTD.shape[1]))
    dd, dw = mod_scatter_backward(x_BTD, delta_BSD, w_BS, idx_BS)
    dd2, dw2 = mod_scatter_backward(x_BTD, delta_BSD, w_BS, idx_BS)
    assert torch.equal(dd, dd2) and torch.equal(dw, dw2)


def test_compiles_fullgraph():
    """The ops are opaque to torch.compile (fake impls give the shapes): one graph, forward + backward."""
    seed = _seed()
    x_BTD, delta_BSD, w_BS, idx_BS = _inputs("single_batch", torch.float32, seed)

    def f(x, w):
        return mod_scatter(x, mod_gather(x, idx_BS) * delta_BSD, w, idx_BS).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, w = x_BTD.clone().requires_grad_(), w_BS.clone().requires_grad_()
    got = torch.autograd.grad(compiled(x, w), (x, w))
    ref = torch.autograd.grad(f(x, w), (x, w))
    for a, b in zip(got, ref, strict=True):
        _close(a, b, torch.float32, f"seed {seed}")


def test_opcheck():
    seed = _seed()
    x_BTD, delta_BSD, w_BS, idx_BS = _inputs("single_batch", torch.float32, seed)
    x, d, w = (t.clone().requires_grad_() for t in (x_BTD, delta_BSD, w_BS))
    ops = torch.ops.lumina_triton
    torch.library.opcheck(ops.mod_gather, (x, idx_BS))
    torch.library.opcheck(ops.mod_gather_backward, (d, idx_BS, x.shape[1]))
    torch.library.opcheck(ops.mod_scatter, (x, d, w, idx_BS))
    torch.library.opcheck(ops.mod_scatter_backward, (x.detach().clone().requires_grad_(), d, w, idx_BS))


# ------------------------------------------------------------------------------------------------ top-k
TOPK_CASES = {  # name: (B, T, k, distinct score values or None for continuous draws)
    "t1": (3, 1, 1, None),
    "t_below_block": (2, 9, 4, None),  # one block of 16, 7 lanes masked
    "prime_t": (3, 61, 17, None),
    "k_eq_t": (2, 37, 37, None),
    "k1": (2, 37, 1, None),
    "ties": (4, 37, 11, 3),  # 3 distinct values: every k-th score is shared
    "all_equal": (2, 29, 7, 1),
}
TOPK_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _scores(B, T, levels, dtype, gen):
    """Continuous draws, or each score one of `levels` random values (ties everywhere; random values,
    not small integers, so the tied scores' low key bits are not all zero)."""
    if levels is None:
        return torch.randn(B, T, generator=gen).to(dtype)
    values = torch.randn(levels, generator=gen, dtype=torch.float64)
    return values[torch.randint(0, levels, (B, T), generator=gen)].to(dtype)


@pytest.mark.parametrize("block_t", [None, 8], ids=["auto", "block8"])
@pytest.mark.parametrize("dtype", TOPK_DTYPES, ids=str)
@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_matches_reference(case, dtype, block_t):
    """Exactly the reference's positions (ascending; ties to the earlier position). block8: several
    blocks per row, the last partial, so the per-block counts and prefix carries are exercised."""
    seed = _seed()
    B, T, k, levels = TOPK_CASES[case]
    scores = _scores(B, T, levels, dtype, torch.Generator().manual_seed(seed)).to(DEVICE)
    poisoned = torch.full((B, k), -1, dtype=torch.int64, device=DEVICE)
    got = mod_topk_launch(scores, k, out=poisoned, block_t=block_t)
    expected = reference.mod_topk(scores, k)
    assert got.dtype == torch.int64 and got.shape == (B, k)
    assert torch.equal(got, expected), f"seed {seed}: {got.tolist()} != {expected.tolist()}"


def test_topk_special_values():
    """-0.0 ties with 0.0, NaN (either sign bit) ranks above +inf, -inf below everything: the
    reference's order."""
    nan, inf = float("nan"), float("inf")
    row = [0.0, -0.0, nan, 1.0, -inf, -nan, 1.0, -0.0, -1e-30, inf, 2.0, -2.0, 1e-30]
    for dtype in (torch.float32, torch.float64):
        scores = torch.tensor([row, row[::-1]], dtype=dtype, device=DEVICE)
        for k in range(len(row) + 1):
            assert torch.equal(mod_topk(scores, k), reference.mod_topk(scores, k)), (dtype, k)
        # A tie at the k-th score whose key is odd (its last bit decides the threshold), with a higher
        # score after the tied ones: keeps position 2 and the first of the tie.
        one_up = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype)).item()
        scores = torch.tensor([[one_up, one_up, 2.0], [-one_up, -one_up, 2.0]], dtype=dtype, device=DEVICE)
        assert mod_topk(scores, 2).tolist() == [[0, 2], [0, 2]]


def test_topk_rejects_k_above_t():
    with pytest.raises(ValueError, match="k=6 is outside"):
        mod_topk_launch(torch.zeros(1, 5, device=DEVICE), 6)


def test_topk_compiles_fullgraph_and_opcheck():
    seed = _seed()
    scores = torch.randn(3, 37, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    torch.library.opcheck(torch.ops.lumina_triton.mod_topk, (scores, 11))
    compiled = torch.compile(lambda s: mod_topk(s, 11), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(scores), reference.mod_topk(scores, 11)), f"seed {seed}"
    # Detached inside: a grad-tracking input (the router's scores) is fine and gets no gradient path.
    assert not mod_topk(scores.clone().requires_grad_(), 11).requires_grad


# ------------------------------------------------------------------------------ GPU: realistic shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,S,D", [(8, 4096, 512, 1024), (3, 1001, 500, 1000), (1, 1, 1, 4096)])
def test_gpu_large_shapes(B, T, S, D, dtype):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    idx = reference.mod_topk(torch.randn(B, T, generator=gen), S).cuda()
    x = torch.randn(B, T, D, generator=gen).to(device="cuda", dtype=dtype)
    delta = torch.randn(B, S, D, generator=gen).to(device="cuda", dtype=dtype)
    w = torch.rand(B, S, generator=gen).cuda()
    assert torch.equal(mod_gather(x, idx), reference.mod_gather(x, idx)), f"seed {seed}"
    x32 = x.float().requires_grad_()
    (e_dx,) = torch.autograd.grad(reference.mod_gather(x32, idx), x32, delta.float())
    assert torch.equal(mod_gather_backward(delta, idx, T).float(), e_dx), f"seed {seed}"
    d32, w32 = delta.float().requires_grad_(), w.to(dtype).float().requires_grad_()
    expected = reference.mod_scatter(x32, d32, w32, idx)
    # Compiled, the casts round to nearest: against the reference's own roundings (w and w * delta to
    # dtype; the add in fp32) only the final rounding differs.
    same = reference.mod_scatter(
        x.float(), (delta * w.to(dtype).unsqueeze(-1)).float(), torch.ones_like(w), idx
    )
    _close(mod_scatter(x, delta, w, idx), same, dtype, f"seed {seed}")
    g = torch.randn(B, T, D, device="cuda").to(dtype)
    _, e_dd, e_dw = torch.autograd.grad(expected, (x32, d32, w32), g.float())
    dd, dw = mod_scatter_backward(g, delta, w, idx)
    _close(dd, e_dd, dtype, f"seed {seed}")
    # dw is a D-long dot product: fp32 accumulation, but the order differs from the reference's.
    torch.testing.assert_close(dw, e_dw, rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,k", [(8, 4096, 512), (3, 10007, 2500), (2, 1, 1), (1, 5000, 5000)])
def test_gpu_topk_large_shapes(B, T, k, dtype):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for levels in (None, 5):  # continuous, then heavy ties (several blocks per row at T > 4096)
        scores = _scores(B, T, levels, dtype, gen).cuda()
        assert torch.equal(mod_topk(scores, k), reference.mod_topk(scores, k)), f"seed {seed}"
