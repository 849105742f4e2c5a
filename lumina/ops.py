"""The routing op surface the model calls. Semantics are fixed by ``lumina_kernels.reference``.

Legend: N tokens, K top-k, A = N*K assignments, E experts, C capacity, D model dim, F expert hidden.

``grouped_mm`` (dropless expert compute over variable-size expert segments) has three
implementations, chosen per call by ``model.moe.grouped_mm`` (``grouped_mm_choice``): torch's
``torch.nn.functional.grouped_mm`` (bf16 only), the Triton grouped GEMM
(``lumina_kernels.grouped_mm``), and the reference: a ``torch.library.custom_op``
(``lumina::grouped_mm``) whose loop reads the segment sizes on the host, which inside an opaque op
costs no graph break, so a model using it still compiles with ``fullgraph=True``.

Every op is differentiated through an ``autograd.Function`` (``lumina_kernels._autograd``), because
``torch.func.grad`` cannot use a custom op's ``register_autograd`` formula in torch 2.13.

Providers (``_route``): on CUDA tensors the Triton kernels when triton is installed (not yet run on
a GPU): ``lumina_kernels.moe_dispatch`` (MoE routing metadata, dispatch), ``moe_combine`` and
``mod_routing`` (MoD top-k, gather, scatter). On CPU tensors the native ops
(``lumina_kernels.native``, built by CMake; 6.4x / 8.9x the reference for dispatch + combine forward
+ backward in fp32 / bf16 at N=8192, D=512, k=2, see docs/kernels.md) when built and the op has one; else the
reference. ``LUMINA_OPS=reference`` forces the reference (A/B runs), ``LUMINA_OPS=triton`` the Triton
kernels on every device (tests of the GPU path on CPU); a missing native library is announced once.

Dispatch and combine take a row map whose entries may be -1 (``reference.moe_dispatch``), so one pair
of kernels per provider serves three layouts: the dropless permutation, the capacity buffer (its E*C
slots, ``reference.capacity_map``) and, on CPU, the MoD selection (a K = 1 map of the [B*T] stream;
on CUDA MoD has its own fused Triton kernels). MoD top-k has no native op: CPU takes the reference.
"""

from __future__ import annotations

import logging
import os

import torch

from lumina_kernels import native, native_status, reference
from lumina_kernels._autograd import apply, op_functions

try:  # Triton kernels: CUDA tensors only (on CPU, Triton's interpreter is far too slow to train with)
    from lumina_kernels import grouped_mm as _triton_gmm
    from lumina_kernels import mod_routing as _triton_mod
    from lumina_kernels import moe_combine as _triton_combine
    from lumina_kernels import moe_dispatch as _triton_dispatch
except ImportError:  # triton not installed
    _triton_dispatch = _triton_combine = _triton_mod = _triton_gmm = None

log = logging.getLogger(__name__)

__all__ = [
    "provider",
    "capacity_map",
    "fold_in",
    "GROUPED_MM",
    "grouped_mm",
    "grouped_mm_choice",
    "hash_uniform",
    "mod_gather",
    "mod_scatter",
    "mod_topk",
    "moe_combine",
    "moe_dispatch",
    "moe_routing",
]


@torch.library.custom_op("lumina::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return reference.grouped_mm(x, w, counts)


@_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("lumina::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return reference.grouped_mm_weight_grad(x, g, counts)


@_grouped_mm_weight_grad.register_fake
def _(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(counts.shape[0], x.shape[1], g.shape[1])


# Differentiated through autograd.Functions (lumina_kernels._autograd: torch.func.grad cannot use a
# custom op's register_autograd formula in torch 2.13) with the grouped-matmul formulas the Triton
# kernel shares; the same formulas on the ops themselves.
_GroupedMM, _GroupedMMWeightGrad = op_functions(
    "lumina",
    grouped_mm=torch.ops.lumina.grouped_mm.default,
    grouped_mm_weight_grad=torch.ops.lumina.grouped_mm_weight_grad.default,
)


def _reference_grouped_mm(x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return apply(_GroupedMM, x_AD, w_EDF, counts_E)


# ------------------------------------------------------------------------------------ providers


# LUMINA_OPS, read once at import: "auto" (the default), "reference" (every op on the reference: A/B
# runs), or "triton" (the Triton kernels on every device, CPU tensors through Triton's interpreter:
# how CPU-only CI runs the model on the GPU code path; far too slow to train with).
_MODES = ("auto", "reference", "triton")
_MODE = os.environ.get("LUMINA_OPS", "auto")
if _MODE not in _MODES:
    raise ValueError(f"LUMINA_OPS={_MODE!r}: expected one of {', '.join(_MODES)}")
if _MODE == "triton" and _triton_dispatch is None:
    raise ImportError("LUMINA_OPS=triton, but triton is not installed (pip install -e '.[dev]')")


def provider() -> str:
    """What the ops with several implementations use on CPU tensors: "native", "reference", or
    "triton" (forced by LUMINA_OPS=triton; ops with no Triton kernel then take the reference)."""
    if _MODE != "auto":
        return _MODE
    return "native" if native.available() else "reference"


_PROVIDER = provider()
if _PROVIDER == "reference" and _MODE == "auto":
    log.warning("lumina.ops: native CPU ops unavailable (%s); using the reference ops", native_status())


def _route(x: torch.Tensor, triton_fn, native_fn, reference_fn):
    """The implementation for ``x``'s device: Triton on CUDA (or everywhere under LUMINA_OPS=triton),
    native on CPU (when built), else the reference. A Python branch on static facts, so it costs no
    graph break under torch.compile."""
    if _MODE == "reference":
        return reference_fn
    if triton_fn is not None and (x.is_cuda or _PROVIDER == "triton"):
        return triton_fn
    if _PROVIDER == "native" and x.device.type == "cpu":
        return native_fn
    return reference_fn


def moe_routing(
    topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts_E, offsets_E1, perm_A, position_A, keep_A): see ``reference.moe_routing``. No host sync."""
    triton_fn = _triton_dispatch.moe_routing if _triton_dispatch is not None else None
    impl = _route(topk_ids_NK, triton_fn, reference.moe_routing, reference.moe_routing)
    return impl(topk_ids_NK, topk_weights_NK, num_experts, capacity)


def moe_dispatch(x_ND: torch.Tensor, perm_A: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token rows in expert-contiguous order: row i is token perm_A[i] // top_k. [A, D]"""
    triton_fn = _triton_dispatch.moe_dispatch if _triton_dispatch is not None else None
    return _route(x_ND, triton_fn, native.moe_dispatch, reference.moe_dispatch)(x_ND, perm_A, top_k)


def moe_combine(y_AD: torch.Tensor, perm_A: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Each token's router-weighted sum of its K expert outputs (deterministic). [N, D]"""
    triton_fn = _triton_combine.moe_combine if _triton_combine is not None else None
    return _route(y_AD, triton_fn, native.moe_combine, reference.moe_combine)(y_AD, perm_A, weights_NK)


def mod_topk(scores_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Per sequence, the positions of the k highest scores, ascending; ties to the earlier position. [B, k]"""
    triton_fn = _triton_mod.mod_topk if _triton_mod is not None else None
    return _route(scores_BT, triton_fn, reference.mod_topk, reference.mod_topk)(scores_BT, k)


_NATIVE_UNIFORM = native.hash_uniform if native.has_op("hash_uniform") else reference.hash_uniform
_NATIVE_FOLD = native.fold_in if native.has_op("fold_in") else reference.fold_in


def hash_uniform(key: torch.Tensor, n: int) -> torch.Tensor:
    """[n] float32 U[0, 1) hashed from ``key`` and each index (``lumina.model.random.uniform``'s draw).
    On CPU the native kernel when built (one pass; the reference makes ~30 over int64), bit-identical."""
    return _route(key, None, _NATIVE_UNIFORM, reference.hash_uniform)(key, n)


def fold_in(key: torch.Tensor, data: int) -> torch.Tensor:
    """A new key from ``key`` and one int (``lumina.model.random.fold_in``'s step). On CPU the native
    op when built (one op; the reference is ~30 on a 0-dim tensor), bit-identical."""
    return _route(key, None, _NATIVE_FOLD, reference.fold_in)(key, data)


# The row map of a capacity buffer's E*C slots (pure index arithmetic, no host sync): the model
# dispatches and combines through it with the same kernels as the dropless path on every provider.
capacity_map = reference.capacity_map


def _mod_rows(idx_BS: torch.Tensor, T: int) -> torch.Tensor:
    """The selected positions as rows of the flattened [B*T] stream: a K = 1 dispatch map. [B*S]"""
    offsets_B1 = torch.arange(idx_BS.shape[0], device=idx_BS.device).unsqueeze(1) * T
    return (idx_BS + offsets_B1).reshape(-1)


def _native_mod_gather(x_BTD: torch.Tensor, idx_BS: torch.Tensor) -> torch.Tensor:
    B, T, D = x_BTD.shape
    return native.moe_dispatch(x_BTD.reshape(B * T, D), _mod_rows(idx_BS, T), 1).view(B, -1, D)


def _native_mod_scatter(
    x_BTD: torch.Tensor, delta_BSD: torch.Tensor, weight_BS: torch.Tensor, idx_BS: torch.Tensor
) -> torch.Tensor:
    # A K = 1 combine: each token's update is its row's weighted delta, zero for unselected tokens
    # (whose weights, scattered from the selection, are never read).
    B, T, D = x_BTD.shape
    rows = _mod_rows(idx_BS, T)
    w_N1 = weight_BS.new_zeros(B * T).scatter(0, rows, weight_BS.reshape(-1)).unsqueeze(1)
    return x_BTD + native.moe_combine(delta_BSD.reshape(-1, D), rows, w_N1).view(B, T, D)


def mod_gather(x_BTD: torch.Tensor, idx_BS: torch.Tensor) -> torch.Tensor:
    """The selected rows of each sequence. [B, S, D]"""
    triton_fn = _triton_mod.mod_gather if _triton_mod is not None else None
    return _route(x_BTD, triton_fn, _native_mod_gather, reference.mod_gather)(x_BTD, idx_BS)


def mod_scatter(
    x_BTD: torch.Tensor, delta_BSD: torch.Tensor, weight_BS: torch.Tensor, idx_BS: torch.Tensor
) -> torch.Tensor:
    """x with ``weight * delta`` added at the selected rows; the other rows pass through. [B, T, D]"""
    triton_fn = _triton_mod.mod_scatter if _triton_mod is not None else None
    impl = _route(x_BTD, triton_fn, _native_mod_scatter, reference.mod_scatter)
    return impl(x_BTD, delta_BSD, weight_BS, idx_BS)


# ----------------------------------------------------------------------------------- grouped matmul
# model.moe.grouped_mm: "auto" | "torch" (torch.nn.functional.grouped_mm) | "triton"
# (lumina_kernels.grouped_mm) | "reference" (a loop of matmuls over the segments, an opaque custom op).
GROUPED_MM = ("auto", "torch", "triton", "reference")


def torch_grouped_mm_unsupported(x_AD: torch.Tensor, w_EDF: torch.Tensor) -> str | None:
    """Why ``torch.nn.functional.grouped_mm`` cannot take these operands (None: it can). torch 2.13:
    bf16 only (its fake kernel refuses fp32, so fp32 cannot compile), 16-byte-aligned rows (D and F
    multiples of 8), and on CUDA compute capability 8.0 or newer."""
    if x_AD.dtype != torch.bfloat16 or w_EDF.dtype != torch.bfloat16:
        return f"it takes bf16 operands only, got {x_AD.dtype} (train.precision=bf16 trains in bf16)"
    if x_AD.shape[1] % 8 or w_EDF.shape[2] % 8:
        D, F = x_AD.shape[1], w_EDF.shape[2]
        return f"its rows must be 16-byte aligned: D={D} and F={F} must be multiples of 8"
    if x_AD.is_cuda and torch.cuda.get_device_capability(x_AD.device) < (8, 0):
        return "it needs a CUDA device of compute capability 8.0 or newer"
    return None


def grouped_mm_choice(x_AD: torch.Tensor, w_EDF: torch.Tensor, impl: str = "auto") -> str:
    """The implementation ``grouped_mm`` uses for these operands: "torch", "triton" or "reference".

    auto: on CUDA, torch's grouped_mm where it takes the operands (bf16, aligned, sm80+), else the
    Triton kernel; on CPU the reference (torch's CPU grouped_mm is itself a loop of matmuls) — its
    loop in C++ when the native library is built (``lumina_native::grouped_mm``, same matmuls, same
    bits) —, or the Triton kernel under LUMINA_OPS=triton. LUMINA_OPS=reference forces the
    reference. An explicit choice that cannot run raises ValueError naming ``model.moe.grouped_mm``."""
    if impl not in GROUPED_MM:
        raise ValueError(f"model.moe.grouped_mm={impl!r}: expected one of {', '.join(GROUPED_MM)}")
    if _MODE == "reference":
        return "reference"
    if impl == "auto":
        if x_AD.is_cuda:
            if torch_grouped_mm_unsupported(x_AD, w_EDF) is None:
                return "torch"
            return "triton" if _triton_gmm is not None else "reference"
        return "triton" if _PROVIDER == "triton" else "reference"
    if impl == "torch" and (why := torch_grouped_mm_unsupported(x_AD, w_EDF)) is not None:
        raise ValueError(f"model.moe.grouped_mm=torch: torch.nn.functional.grouped_mm cannot run here: {why}")
    if impl == "triton" and _triton_gmm is None:
        raise ValueError("model.moe.grouped_mm=triton: triton is not installed")
    return impl


_NATIVE_GMM = _PROVIDER == "native" and native.has_op("grouped_mm")


def grouped_mm(
    x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """Rows [offsets[e], offsets[e+1]) of the expert-sorted ``x`` times ``w[e]``. [A, F]. No host sync
    on the torch and Triton paths; ``impl`` as ``grouped_mm_choice``."""
    choice = grouped_mm_choice(x_AD, w_EDF, impl)
    if choice == "torch":
        offsets = torch.cumsum(counts_E, 0).to(torch.int32)  # each segment's end
        return torch.nn.functional.grouped_mm(x_AD, w_EDF, offs=offsets)
    if choice == "triton":
        return _triton_gmm.grouped_mm(x_AD, w_EDF, counts_E)
    if _NATIVE_GMM and x_AD.device.type == "cpu":  # the reference's loop, in C++
        return native.grouped_mm(x_AD, w_EDF, counts_E)
    return _reference_grouped_mm(x_AD, w_EDF, counts_E)
