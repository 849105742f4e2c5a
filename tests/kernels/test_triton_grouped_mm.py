"""The Triton grouped GEMM (dropless MoE expert compute) and its weight gradient against ``reference``.

Runs compiled on CUDA when a GPU is present and through Triton's interpreter on CPU tensors otherwise
(the kernels pick per launch from the tensors' device, see ``lumina_kernels._triton``). Interpreted
shapes stay small and odd; the ``gpu`` tests use realistic ones.

Every comparison is the kernel in ``dtype`` against the reference in fp32 on the same (rounded)
inputs. Inputs are fresh random draws each run; the seed is in every failure message.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from lumina_kernels import reference  # noqa: E402
from lumina_kernels.grouped_mm import (  # noqa: E402
    grouped_mm,
    grouped_mm_launch,
    grouped_mm_weight_grad,
    grouped_mm_weight_grad_launch,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernels accumulate in fp32, so the only error against the fp32 reference is the final rounding
# to `dtype` plus fp32 summation order. w is scaled so the forward and grad_x are O(1); grad_w grows
# like sqrt(rows), which rtol covers.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
CASES = {  # name: (A rows, E experts, D, F, routing)
    "one_row": (1, 7, 5, 37, "random"),
    "empty_experts": (33, 7, 37, 70, "skip_some"),  # experts 0, 2 and 6 get no rows
    "all_in_one_expert": (45, 7, 70, 5, "one"),  # every row in expert 3 (45 rows: not a block multiple)
    "e61_mostly_empty": (40, 61, 37, 70, "few"),  # rows in 5 of 61 experts
}
# (block_m, block_n, block_k) for the forward and grad_x; the weight grad gets (block_d, block_f,
# block_k) = the same numbers. None: the launcher's own. Small: several tiles on every axis for the
# shapes above (D, F in {5, 37, 70}, rows 33..45), the last of each partial; 16 is tl.dot's compiled
# minimum.
BLOCKS = {"auto": None, "small": (16, 16, 16)}


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _counts(A: int, E: int, routing: str, gen: torch.Generator) -> torch.Tensor:
    """Rows per expert summing to A, drawn at random over the experts the routing allows."""
    if routing == "one":
        allowed = torch.tensor([3])
    elif routing == "skip_some":
        allowed = torch.tensor([1, 3, 4, 5])
    elif routing == "few":
        allowed = torch.randperm(E, generator=gen)[:5]
    else:
        allowed = torch.arange(E)
    pick = allowed[torch.randint(len(allowed), (A,), generator=gen)]
    return torch.bincount(pick, minlength=E)


def _inputs(case, dtype, seed):
    A, E, D, F, routing = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    counts = _counts(A, E, routing, gen)
    assert counts.sum() == A
    x = torch.randn(A, D, generator=gen).to(dtype)
    w = (torch.randn(E, D, F, generator=gen) / D**0.5).to(dtype)
    g = torch.randn(A, F, generator=gen).to(dtype)  # grad_x O(1); grad_w up to sqrt(rows): rtol covers it
    return x.to(DEVICE), w.to(DEVICE), g.to(DEVICE), counts.to(DEVICE)


def _close(actual, expected, dtype, msg, **tol):
    torch.testing.assert_close(
        actual.float(), expected.float(), **(tol or TOL[dtype]), msg=lambda m: f"{msg}: {m}"
    )


def _poisoned(*shape, dtype):
    """A NaN-poisoned output buffer, as a strided view inside a NaN margin one element wide on every
    side, and ``check(msg)``, which fails if any write landed in the margin (a row or column past the
    end, a negative row): what a plain buffer could only show as heap corruption or a crash."""
    buf = torch.full([n + 2 for n in shape], float("nan"), dtype=dtype, device=DEVICE)
    inner = tuple(slice(1, n + 1) for n in shape)
    margin = torch.ones(buf.shape, dtype=torch.bool, device=DEVICE)
    margin[inner] = False

    def check(msg):
        untouched = bool(buf[margin].isnan().all())
        assert untouched, f"a write outside the output, {msg}"

    return buf[inner], check


def _reference_grads(x, w, g, counts):
    """(out, grad_x, grad_w) of the reference in fp32 for output gradient g."""
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    out = reference.grouped_mm(x32, w32, counts)
    gx, gw = torch.autograd.grad(out, (x32, w32), g.float())
    return out.detach(), gx, gw


# ---------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, blocks):
    """Forward, grad_x (grouped_mm of g with the strided w^T view, as the backward calls it) and
    grad_w, each launched into a NaN-poisoned strided buffer: any element left unwritten (an empty
    expert's zero block, a partial tile's edge) fails, and so does any write past the output's edges."""
    seed = _seed()
    x, w, g, counts = _inputs(case, dtype, seed)
    A, E, D, F = x.shape[0], w.shape[0], x.shape[1], w.shape[2]
    bm, bn, bk = BLOCKS[blocks] or (None, None, None)
    e_out, e_gx, e_gw = _reference_grads(x, w, g, counts)

    msg = f"{case}, blocks {blocks}, seed {seed}"
    out, check = _poisoned(A, F, dtype=dtype)
    out = grouped_mm_launch(x, w, counts, out=out, block_m=bm, block_n=bn, block_k=bk)
    assert out.dtype == dtype and out.shape == (A, F)
    _close(out, e_out, dtype, f"forward, {msg}")
    check(f"forward, {msg}")

    w_T = w.transpose(1, 2)  # [E, F, D], not contiguous: taken through its strides
    gx, check = _poisoned(A, D, dtype=dtype)
    gx = grouped_mm_launch(g, w_T, counts, out=gx, block_m=bm, block_n=bn, block_k=bk)
    _close(gx, e_gx, dtype, f"grad_x, {msg}")
    check(f"grad_x, {msg}")

    gw, check = _poisoned(E, D, F, dtype=dtype)
    gw = grouped_mm_weight_grad_launch(x, g, counts, out=gw, block_d=bm, block_f=bn, block_k=bk)
    assert gw.dtype == dtype and gw.shape == (E, D, F)
    _close(gw, e_gw, dtype, f"grad_w, {msg}")
    check(f"grad_w, {msg}")
    empty = counts == 0
    assert (gw[empty] == 0).all(), f"an empty expert's grad_w is not zero, seed {seed}"


def test_accumulates_in_fp32():
    """Long reductions in bf16, forced into 16-wide K steps (32 of them): accumulating in fp32 leaves
    only the final rounding to bf16, under one bf16 ulp (2**-7 relative; half that compiled, where the
    cast rounds to nearest: Triton 3.7's interpreter truncates fp32 -> bf16). A bf16 accumulator, which
    rounds at every step, is off by 25% and more here. The tolerance is that bound, tighter than TOL's."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    A, E, D, F = 96, 3, 512, 16
    counts = torch.tensor([40, 0, 56], device=DEVICE)
    x = torch.randn(A, D, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    w = (torch.randn(E, D, F, generator=gen) / D**0.5).to(device=DEVICE, dtype=torch.bfloat16)
    g = torch.randn(A, F, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    bound = dict(rtol=2**-7, atol=1e-5)  # atol: the fp32 order of summation, near-zero outputs
    out = grouped_mm_launch(x, w, counts, block_k=16)
    _close(out, reference.grouped_mm(x.float(), w.float(), counts), torch.bfloat16, f"seed {seed}", **bound)
    # The weight grad's reduction runs over an expert's rows (56), 16 at a time; its D x F block whole.
    gw = grouped_mm_weight_grad_launch(x[:, :16].contiguous(), g, counts, block_k=16)
    expected = reference.grouped_mm_weight_grad(x[:, :16].float(), g.float(), counts)
    _close(gw, expected, torch.bfloat16, f"seed {seed}", **bound)


def test_tile_search_over_several_expert_chunks():
    """The tile -> expert search compares BLOCK_E experts at a time; force 16 of 61 (four chunks, the
    last partial) and 16-row tiles so the owning experts sit in different chunks."""
    seed = _seed()
    x, w, g, counts = _inputs("e61_mostly_empty", torch.float32, seed)
    out, check = _poisoned(x.shape[0], w.shape[2], dtype=x.dtype)
    out = grouped_mm_launch(x, w, counts, out=out, block_m=16, block_e=16)
    msg = f"seed {seed}, counts {counts.tolist()}"
    _close(out, reference.grouped_mm(x, w, counts), torch.float32, msg)
    check(msg)


def test_deterministic_and_input_checks():
    """No atomics: bit-identical run to run. Mismatched dtypes / shapes fail with a clear error."""
    seed = _seed()
    x, w, g, counts = _inputs("empty_experts", torch.float32, seed)
    assert torch.equal(grouped_mm_launch(x, w, counts), grouped_mm_launch(x, w, counts)), f"seed {seed}"
    gw = grouped_mm_weight_grad_launch(x, g, counts)
    assert torch.equal(gw, grouped_mm_weight_grad_launch(x, g, counts)), f"seed {seed}"
    with pytest.raises(TypeError, match="bfloat16"):
        grouped_mm_launch(x, w.bfloat16(), counts)
    with pytest.raises(ValueError, match="grouped_mm"):
        grouped_mm_launch(x, w[:, :-1], counts)
    with pytest.raises(ValueError, match="grouped_mm"):
        grouped_mm_launch(x, w, counts[:-1])


# ------------------------------------------------------------------------------ ops, autograd, compile
def test_opcheck():
    seed = _seed()
    x, w, g, counts = _inputs("empty_experts", torch.float32, seed)
    x, w, g = (t.clone().requires_grad_() for t in (x, w, g))
    ops = torch.ops.lumina_triton
    torch.library.opcheck(ops.grouped_mm, (x, w, counts))
    torch.library.opcheck(ops.grouped_mm, (g, w.detach().transpose(1, 2).requires_grad_(), counts))
    torch.library.opcheck(ops.grouped_mm_weight_grad, (x, g, counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_functions_autograd(dtype):
    """The autograd.Function path (what the model calls): all three gradients of a small expert MLP
    (up, nonlinearity, down) equal the reference's."""
    seed = _seed()
    x, w_up, _, counts = _inputs("empty_experts", dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w_down = (torch.randn(w_up.shape[0], w_up.shape[2], 11, generator=gen) / w_up.shape[2] ** 0.5).to(
        device=DEVICE, dtype=dtype
    )
    g = torch.randn(x.shape[0], 11, generator=gen).to(device=DEVICE, dtype=dtype)

    def mlp(impl, x, w_up, w_down):
        return impl(torch.tanh(impl(x, w_up, counts)), w_down, counts)

    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
    out = mlp(grouped_mm, *leaves)
    grads = torch.autograd.grad(out, leaves, g)
    leaves32 = [t.float().requires_grad_() for t in (x, w_up, w_down)]
    ref = mlp(reference.grouped_mm, *leaves32)
    ref_grads = torch.autograd.grad(ref, leaves32, g.float())
    # bf16 also rounds the intermediate (and its gradient) that the fp32 reference keeps.
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    _close(out, ref, dtype, f"forward, seed {seed}", **tol)
    for name, a, b in zip(("x", "w_down"), grads[::2], ref_grads[::2], strict=True):
        _close(a, b, dtype, f"d{name}, seed {seed}", **tol)
    if dtype == torch.float32:
        _close(grads[1], ref_grads[1], dtype, f"dw_up, seed {seed}", **tol)
        return
    # dw_up[e] sums, over the expert's rows, x * dt * tanh'(h) with dt = g @ w_down^T. bf16 rounds each
    # term's dt and h (truncated in Triton's interpreter, whose bias, 2**-8 of the value, scales the sum
    # and sits in rtol), tanh (which moves tanh' by up to 2u of dt's scale) and the tanh' product: in
    # quadrature under 3u of |x * dt|, u = 2**-8, zero-mean. Over a segment's rows that is a random walk
    # of standard deviation 3u / sqrt(3) * sqrt(sum of (x * dt)**2): allow 6 of them on top of the
    # kernel's own tolerance (its final rounding). The flat rtol = atol = 3e-2 used before failed 2 of
    # 1000 seeds, at entries whose terms cancel to near zero; this bound: 0 of 1000.
    dt = reference.grouped_mm(g.float(), leaves32[2].detach().transpose(1, 2), counts)
    walk = reference.grouped_mm_weight_grad(x.float() ** 2, dt**2, counts).sqrt()
    err, want = (grads[1].float() - ref_grads[1]).abs(), ref_grads[1]
    bound = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * want.abs() + 6 * 3**0.5 * 2**-8 * walk
    assert (err <= bound).all(), f"dw_up, seed {seed}: error {err.max().item():.3g} over its bound"


@pytest.mark.parametrize("reduce", ["square_sum", "sum"])
def test_torch_func_grad(reduce):
    """torch.func.grad (the train step's transform) through the public function equals the reference's.
    With a plain sum the output gradient is an expanded all-ones tensor (strides 0, 0), which the
    backward's launches read through its strides."""
    seed = _seed()
    x, w, _, counts = _inputs("e61_mostly_empty", torch.float32, seed)

    def loss(impl, x, w):
        y = impl(x, w, counts)
        return y.square().sum() if reduce == "square_sum" else y.sum()

    got = torch.func.grad(lambda x, w: loss(grouped_mm, x, w), argnums=(0, 1))(x, w)
    ref = torch.func.grad(lambda x, w: loss(reference.grouped_mm, x, w), argnums=(0, 1))(x, w)
    for name, a, b in zip("xw", got, ref, strict=True):
        _close(a, b, torch.float32, f"d{name}, seed {seed}")


@pytest.mark.slow  # ~45 s in Triton's interpreter on 2 cores
def test_double_backward():
    """Both backwards are built from the same Functions: gradgradcheck in fp64 (tl.dot takes fp64),
    through grouped_mm and through grouped_mm_weight_grad (fast_mode there: the full check costs ~4 s
    more in the interpreter and exercises the same two kernels). Expert 1 is empty."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    A, E, D, F = 5, 3, 3, 4
    counts = torch.tensor([2, 0, 3], device=DEVICE)
    x, w, g = (
        torch.randn(*shape, generator=gen).to(DEVICE, torch.float64).requires_grad_()
        for shape in ((A, D), (E, D, F), (A, F))
    )
    assert torch.autograd.gradgradcheck(lambda x, w: grouped_mm(x, w, counts), (x, w)), f"seed {seed}"
    assert torch.autograd.gradgradcheck(
        lambda x, g: grouped_mm_weight_grad(x, g, counts), (x, g), fast_mode=True
    ), f"seed {seed}"


def test_compiles_fullgraph():
    """Opaque to torch.compile (the fake impls give the shapes): torch.func.grad of a loss, compiled
    with fullgraph=True as the train step is, gives eager's gradients, the weight's included."""
    seed = _seed()
    x, w, _, counts = _inputs("empty_experts", torch.float32, seed)

    def loss(x, w):
        return torch.tanh(grouped_mm(x, w, counts)).square().sum()

    grad = torch.func.grad(loss, argnums=(0, 1))
    got = torch.compile(grad, fullgraph=True, backend="aot_eager")(x, w)
    ref = grad(x, w)
    for name, a, b in zip("xw", got, ref, strict=True):
        _close(a, b, torch.float32, f"d{name}, seed {seed}")
    assert got[1].abs().sum() > 0, f"compiled weight gradient is all zero, seed {seed}"


# ---------------------------------------------------------------------- the compiled path without a GPU
def _compile_for_h100(kernel, cfg: dict, ints: tuple[str, ...], constexprs: dict):
    """Compile ``kernel`` ahead of time for sm_90 (Triton's own ptxas; no GPU needed) with the launch
    config ``cfg`` and the 16-divisibility hints the JIT gives aligned pointers and sizes (``ints``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    constexprs = dict(constexprs, **{k: v for k, v in cfg.items() if k.startswith("BLOCK")})
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in ("offsets_ptr", "tile_starts_ptr") else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(JITFunction(kernel.fn), sig, constexprs, attrs)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def test_compiles_for_h100_bf16():
    """CI has no GPU, so this is the only check that the kernels compile (not just interpret): both,
    bf16, with the configs the launchers pick on CUDA for A=32768, E=64, D=2048, F=4096, the forward
    with w and with the backward's strided w^T. Each must lower to wgmma with the K loop
    software-pipelined (async copies into a multi-stage shared-memory ring) and fit the H100's 227 KiB
    of shared memory. Skips where Triton's CUDA backend or ptxas is absent."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton.language as tl

    from lumina_kernels import grouped_mm as gm

    cuda = torch.device("cuda")  # only a device description: nothing is allocated on it
    mm_cfg = gm._mm_config(32768, 2048, 4096, 64, torch.bfloat16, cuda)
    wgrad_cfg = gm._wgrad_config(32768, 2048, 4096, torch.bfloat16, cuda)
    common = dict(ACC=tl.float32, UPCAST=False)
    mm_ints = ("D", "F", "stride_xa", "stride_we", "stride_wd", "stride_wf", "stride_oa")
    compiled = {}
    try:
        for name, unit_stride in (("forward", "stride_wf"), ("forward, w^T", "stride_wd")):
            consts = dict(common, BLOCK_E=64, GROUP_M=8, stride_xd=1, stride_of=1, **{unit_stride: 1})
            compiled[name] = _compile_for_h100(gm._grouped_mm_kernel, mm_cfg, mm_ints, consts)
    except RuntimeError as e:  # e.g. no ptxas for this platform
        pytest.skip(f"cannot compile for sm_90 here: {e}")
    compiled["weight grad"] = _compile_for_h100(
        gm._weight_grad_kernel,
        wgrad_cfg,
        ("D", "F", "stride_xa", "stride_ga", "stride_oe", "stride_od"),
        dict(common, stride_xd=1, stride_gf=1, stride_of=1),
    )
    for name, k in compiled.items():
        ttgir = k.asm["ttgir"]
        assert "warp_group_dot " in ttgir, f"{name}: no wgmma"
        assert "async_copy_global_to_local" in ttgir, f"{name}: K loop not pipelined"
        assert 2 * 32 * 1024 <= k.metadata.shared <= 227 * 1024, f"{name}: {k.metadata.shared} B smem"


# ------------------------------------------------------------------------------ GPU: realistic shapes
def _gpu_counts(A: int, E: int, routing: str, gen: torch.Generator) -> torch.Tensor:
    if routing == "uniform":
        probs = torch.ones(E)
    else:  # skewed: Zipf-like loads (1/rank), every third expert of the upper half empty
        probs = 1.0 / torch.arange(1, E + 1).float()
        probs[E // 2 :: 3] = 0
    return torch.bincount(torch.multinomial(probs, A, replacement=True, generator=gen), minlength=E)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "A,E,D,F,routing",
    [
        (32768, 8, 2048, 4096, "uniform"),
        (32768, 64, 2048, 4096, "uniform"),
        (32768, 64, 2048, 4096, "skewed"),
        (4099, 61, 1000, 1411, "skewed"),  # odd everything, partial tiles on every axis
    ],
)
def test_gpu_large_shapes(A, E, D, F, routing):
    """bf16 through the public function (forward, grad_x, grad_w) against the fp32 reference (torch's
    fp32 matmuls: IEEE unless a user enabled TF32), uniform and skewed routing."""
    seed = _seed()
    counts = _gpu_counts(A, E, routing, torch.Generator().manual_seed(seed)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(seed)  # 0.5 G values: draw them on the GPU
    x = torch.randn(A, D, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(E, D, F, generator=gen, device="cuda") / D**0.5).bfloat16()
    g = torch.randn(A, F, generator=gen, device="cuda").bfloat16()
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = grouped_mm(xl, wl, counts)
    gx, gw = torch.autograd.grad(out, (xl, wl), g)
    e_out, e_gx, e_gw = _reference_grads(x, w, g, counts)
    msg = f"A={A} E={E} {routing}, seed {seed}"
    _close(out, e_out, torch.bfloat16, f"forward, {msg}")
    _close(gx, e_gx, torch.bfloat16, f"grad_x, {msg}")
    _close(gw, e_gw, torch.bfloat16, f"grad_w, {msg}")
    assert (gw[counts == 0] == 0).all(), msg


@pytest.mark.gpu
def test_gpu_fp32_is_ieee_not_tf32():
    """fp32 inputs are multiplied in IEEE fp32: against an fp64 reference the error stays ~1e-6. TF32
    rounds every input to 10 mantissa bits (2**-11 relative), which over 1024-term sums leaves errors
    far above the 1e-4 allowed here."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    A, E, D, F = 4096, 8, 1024, 512
    counts = _gpu_counts(A, E, "skewed", gen).cuda()
    x = torch.randn(A, D, generator=gen).cuda()
    w = (torch.randn(E, D, F, generator=gen) / D**0.5).cuda()
    g = torch.randn(A, F, generator=gen).cuda() / 16  # grad_w O(1) for the hottest expert
    expected = reference.grouped_mm(x.double(), w.double(), counts)
    _close(grouped_mm(x, w, counts), expected, torch.float32, f"seed {seed}", rtol=1e-5, atol=1e-4)
    e_gw = reference.grouped_mm_weight_grad(x.double(), g.double(), counts)
    _close(grouped_mm_weight_grad(x, g, counts), e_gw, torch.float32, f"seed {seed}", rtol=1e-5, atol=1e-4)
