"""fp8 matmuls for ``train.precision=fp8``: dynamic tensorwise scaling, e4m3 forward, e5m2 gradients.

Legend: M rows (tokens), K contraction dim, N output features; A expert-sorted rows, E experts,
C capacity, D d_model, F expert hidden.

The recipe (torchao's tensorwise float8 training, re-derived here):
  - every operand gets a fresh scale each call from its absolute maximum (``amax``), no history:
    scale = 2^floor(log2(fp8_max / max(amax, EPS))), so the largest element lands in
    (fp8_max / 2, fp8_max]. The power of two costs at most one binade of headroom and makes the scaling
    exact: x * scale and q / scale round nowhere, so the only error is the fp8 rounding itself, and a
    quantize -> dequantize pair gives the very operands ``torch._scaled_mm`` multiplies (the expert
    path below relies on that);
  - the cast saturates: values are clamped to +-fp8_max before ``.to(fp8)`` (e4m3fn has no inf:
    an unclamped overflow becomes NaN);
  - forward operands (activations, weights) in e4m3 (3 mantissa bits, max 448); output gradients in
    e5m2 (2 mantissa bits, max 57344: gradients need range more than digits);
  - y = x @ w, dx = dy @ w^T, dw = x^T @ dy as fp8 x fp8 GEMMs with fp32 accumulation
    (``use_fast_accum=False``), output in the input dtype (bf16 in training). The fp32 masters stay
    in the train state; ``lumina.step`` casts them to bf16 inside the differentiated function, as
    for ``bf16``, and the bf16 weight gradient arrives there in fp32.

Where fp8 is used (``apply(..., fp8=True)``, which the train and eval steps pass for precision fp8):
the attention projections (wq, wk, wv, wo), the dense SwiGLU FFN, shared experts (``fp8_linear``:
the ``lumina::fp8_mm`` custom op over ``torch._scaled_mm``) and the routed experts
(``fp8_expert_mm``). Not: the embedding, the LM head, norms, attention scores / softmax, the MoE
router and the MoD router and predictor — small matmuls or precision-sensitive ones (the head's
logits feed the loss directly; a router's top-k flips on small errors), as torchao/torchtitan leave
them. A weight whose in or out dimension is not a multiple of 16 (``_scaled_mm``'s alignment rule)
also stays in bf16. The token count M is free: the weight-gradient GEMM contracts over M, so its
operands are zero-padded to a multiple of 16 there (zero rows add nothing).

Experts (stacked [E, D, F], a scale per expert): the fp8 numerics — e4m3 x and per-expert w, e5m2
output gradient — as quantize -> dequantize (exact, see above) around the bf16 grouped matmul
(``lumina.ops.grouped_mm``: torch's grouped_mm on CUDA, the reference loop on CPU) or ``torch.bmm``
(capacity buffers). So experts train with fp8's rounding but at bf16 speed everywhere: torch's
``_scaled_grouped_mm`` takes e4m3 x e4m3 only (checked in its CUDA source: no e5m2 operand) with
rowwise scales, so it could serve the forward GEMM alone on sm90; that is not wired yet.

Devices: CUDA needs compute capability 8.9+ (Ada, Hopper: fp8 tensor cores); an older GPU is refused
with one line (``check_device``, ``ConfigError``: exit status 2). On CPU ``torch._scaled_mm`` runs (as
a dequantize + fp32 matmul), which is how the tests check the numerics; it is not fast.

Differentiation: ``lumina::fp8_mm`` carries ``register_fake`` and ``register_autograd`` (for
``torch.library.opcheck`` and callers of the op); the model goes through an ``autograd.Function``
with the same formula (``lumina_kernels._autograd``: ``torch.func.grad`` cannot use a custom op's
registered formula in torch 2.13). The backward op is not itself differentiable (no double backward).
"""

from __future__ import annotations

import torch

from lumina.config import ConfigError
from lumina_kernels._autograd import apply as _apply
from lumina_kernels._autograd import op_function

__all__ = [
    "E4M3",
    "E5M2",
    "EPS",
    "MIN_CAPABILITY",
    "amax_to_scale",
    "cast_to_fp8",
    "check_device",
    "dequantize",
    "fake_quantize",
    "fp8_eligible",
    "fp8_expert_mm",
    "fp8_linear",
    "fp8_mm",
    "quantize",
]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale (and quantizes to zeros)
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
ALIGN = 16  # torch._scaled_mm: K and N multiples of 16


# ------------------------------------------------------------------------------------------ scaling


def amax_to_scale(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The power of two that maps ``amax`` into (fp8_max / 2, fp8_max]: 2^floor(log2(fp8_max / amax)),
    fp32, with amax floored at ``EPS``. (If log2's rounding lifts the exponent by one at an exact
    boundary, the cast's saturation clamps the largest element by at most 2^-22 of itself.)"""
    fmax = torch.finfo(fp8_dtype).max
    ratio = fmax / amax.float().clamp(min=EPS)
    return torch.exp2(torch.floor(torch.log2(ratio)))


def quantize(
    x: torch.Tensor, fp8_dtype: torch.dtype, dims: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, inv_scale): q = saturate(x * scale) in ``fp8_dtype``, x ~= q * inv_scale. One scale for the
    whole tensor (``dims=None``: a 0-dim fp32 inv_scale) or one per slice over ``dims`` (kept as size
    1, e.g. dims=(1, 2) of [E, D, F] gives [E, 1, 1]: one per expert). q keeps x's strides."""
    amax = x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)
    scale = amax_to_scale(amax, fp8_dtype)
    return cast_to_fp8(x, scale, fp8_dtype), scale.reciprocal()


def cast_to_fp8(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """x * scale rounded to ``fp8_dtype`` with saturation: beyond +-fp8_max it is +-fp8_max (a plain
    cast would give NaN in e4m3fn, inf in e5m2)."""
    fmax = torch.finfo(fp8_dtype).max
    return (x.float() * scale).clamp(-fmax, fmax).to(fp8_dtype)


def dequantize(q: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * inv_scale in ``dtype`` (exact in bf16 and fp32: a 4-bit significand times a power of two)."""
    return (q.float() * inv_scale).to(dtype)


def fake_quantize(
    x: torch.Tensor, fp8_dtype: torch.dtype, dims: tuple[int, ...] | None = None
) -> torch.Tensor:
    """x rounded to what an fp8 GEMM sees: dequantize(quantize(x)), in x's dtype."""
    return dequantize(*quantize(x, fp8_dtype, dims), x.dtype)


def fp8_eligible(w: torch.Tensor) -> bool:
    """Whether weight ``w`` ([..., K, N]) goes through fp8: K and N multiples of 16."""
    return w.shape[-1] % ALIGN == 0 and w.shape[-2] % ALIGN == 0


def check_device(device: torch.device | str, capability: tuple[int, int] | None = None) -> None:
    """Raise ``ConfigError`` (one line) when ``train.precision=fp8`` cannot run on ``device``.
    ``capability`` overrides the CUDA device's (for tests). CPU is accepted silently (slow, exact)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"train.precision=fp8 needs a CUDA GPU of compute capability 8.9+ or the CPU, got {device}"
        )
    cap = capability or torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        name = "this GPU" if capability else torch.cuda.get_device_name(device)
        raise ConfigError(
            f"train.precision=fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper: fp8 tensor "
            f"cores); {name} has {cap[0]}.{cap[1]}: use train.precision=bf16"
        )


# ----------------------------------------------------------------------------- the dense fp8 GEMM


def _row_major(q: torch.Tensor) -> torch.Tensor:
    return q if q.is_contiguous() else q.contiguous()


def _col_major(q: torch.Tensor) -> torch.Tensor:
    return q if q.stride(0) == 1 and q.stride(1) >= q.shape[0] else q.t().contiguous().t()


def _scaled_mm(
    a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype
) -> torch.Tensor:
    """a @ b * sa * sb with fp32 accumulation; a row-major, b column-major (cuBLAS's fp8 layout)."""
    return torch._scaled_mm(
        _row_major(a), _col_major(b), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False
    )


def _pad_rows(x: torch.Tensor, multiple: int = ALIGN) -> torch.Tensor:
    pad = -x.shape[0] % multiple
    return x if pad == 0 else torch.nn.functional.pad(x, (0, 0, 0, pad))


@torch.library.custom_op("lumina::fp8_mm", mutates_args=())
def _fp8_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [K, N] through e4m3 with tensorwise dynamic scales. [M, N] in x's dtype."""
    qx, sx = quantize(x, E4M3)
    qw, sw = quantize(w, E4M3)
    return _scaled_mm(qx, sx, qw, sw, x.dtype)


@_fp8_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("lumina::fp8_mm_backward", mutates_args=())
def _fp8_mm_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of ``fp8_mm``: dx = e5m2(g) @ e4m3(w)^T, dw = e4m3(x)^T @ e5m2(g). The scales are
    recomputed from the saved bf16 inputs (as torchao does by default: no fp8 copies kept)."""
    # dw contracts over M, which _scaled_mm wants a multiple of 16: zero rows change neither the
    # amax nor the sum (padded before quantizing: torch cannot pad an fp8 tensor on every device)
    M = g.shape[0]
    qg, sg = quantize(_pad_rows(g), E5M2)  # [M', N]
    qx, sx = quantize(_pad_rows(x), E4M3)  # [M', K]
    qw, sw = quantize(w, E4M3)  # [K, N]
    dx = _scaled_mm(qg[:M], sg, qw.t(), sw, x.dtype)  # [M, N] @ [N, K]
    dw = _scaled_mm(qx.t(), sx, qg, sg, w.dtype)  # [K, M'] @ [M', N]
    return dx, dw


@_fp8_mm_backward.register_fake
def _(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(w)


def _fp8_mm_forward(x, w):
    return torch.ops.lumina.fp8_mm.default(x, w)


def _fp8_mm_backward_forward(g, x, w):
    return torch.ops.lumina.fp8_mm_backward.default(g, x, w)


def _fp8_mm_grad(inputs, g):
    x, w = inputs
    return _apply(_FP8MM_BACKWARD, g, x, w)


def _no_double_backward(inputs, *grads):
    raise NotImplementedError("lumina::fp8_mm has no second derivative (train.precision=fp8)")


# Functions, not the ops' registered formulas, carry the gradient under torch.func (see the module
# docstring); the backward is a Function too, or torch.func would trace the op's default autograd
# wrapper, which it refuses.
_FP8MM = op_function("lumina::fp8_mm", _fp8_mm_forward, _fp8_mm_grad, save=(0, 1))
_FP8MM_BACKWARD = op_function("lumina::fp8_mm_backward", _fp8_mm_backward_forward, _no_double_backward)
torch.library.register_autograd("lumina::fp8_mm", _FP8MM.backward, setup_context=_FP8MM.setup_context)


def fp8_mm(x_MK: torch.Tensor, w_KN: torch.Tensor) -> torch.Tensor:
    """The fp8 GEMM of two matrices, differentiable (under torch.func and torch.compile too). [M, N]"""
    return _apply(_FP8MM, x_MK, w_KN)


def fp8_linear(x: torch.Tensor, w_KN: torch.Tensor) -> torch.Tensor:
    """``x @ w`` for x [..., K] through ``fp8_mm``; a ``w`` with K or N not a multiple of 16 takes
    the plain matmul in x's dtype. [..., N]"""
    if not fp8_eligible(w_KN):
        return x @ w_KN
    lead, K = x.shape[:-1], x.shape[-1]
    return fp8_mm(x.reshape(-1, K), w_KN).view(*lead, w_KN.shape[1])


# ------------------------------------------------------------------------------- the expert GEMMs


class _Fp8Round(torch.autograd.Function):
    """Forward: x rounded to fp8 format ``fwd`` (None: unchanged); backward: the incoming gradient
    rounded to ``bwd`` (None: unchanged). ``dims``: the scaling slices (None: one tensorwise scale)."""

    @staticmethod
    def forward(x, fwd, bwd, dims):
        return x.clone() if fwd is None else fake_quantize(x, fwd, dims)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.bwd, ctx.dims = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, g):
        return (g if ctx.bwd is None else fake_quantize(g, ctx.bwd, ctx.dims)), None, None, None


def _round(x: torch.Tensor, fwd, bwd, dims=None) -> torch.Tensor:
    return _apply(_Fp8Round, x, fwd, bwd, dims)


def fp8_expert_mm(x: torch.Tensor, w: torch.Tensor, mm) -> torch.Tensor:
    """``mm(x, w)`` for expert weights w [E, K, N] (``mm``: a grouped matmul over expert segments of
    x [A, K], or ``torch.bmm`` of x [E, C, K]) with fp8's numerics: x in e4m3 (one scale), w in e4m3
    (a scale per expert), the output's gradient in e5m2 (one scale), the GEMM itself in x's dtype
    (bf16) over the exactly-dequantized operands. Weights that are not 16-aligned stay unrounded."""
    if not fp8_eligible(w):
        return mm(x, w)
    y = mm(_round(x, E4M3, None), _round(w, E4M3, None, (-2, -1)))
    return _round(y, None, E5M2)
