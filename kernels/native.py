"""Python side of the native CPU MoE ops (``kernels/csrc/moe_ops.cpp``, namespace ``lumina_native``).

Legend: N tokens, K top-k, A = N*K assignments, S rows of the expert-side buffer, D model dim.
``perm`` maps each buffer row to an assignment or -1 (an empty row): a permutation in the dropless case,
a partial map for capacity buffers and MoD selections (see ``reference.moe_dispatch``).

The C++ library defines and implements the ops (``torch.ops.lumina_native.*``); this module adds what
torch needs to trace and differentiate them: a fake (meta) kernel for every op, an autograd formula on
every op (so ``opcheck`` and direct callers get gradients), and ``autograd.Function`` wrappers with
``setup_context`` — the form ``torch.func.grad`` can differentiate in torch 2.13 (it cannot go through
a ``register_autograd`` formula). Each backward is written with the same Functions, so it is itself
differentiable. Semantics are those of ``lumina_kernels.reference``.

When the library is not built (or is stale), ``available()`` is False and the public functions raise
with ``lumina_kernels.native_status()``; choosing a fallback is the caller's decision.
"""

from __future__ import annotations

import torch

from lumina_kernels import load_native, native_status
from lumina_kernels._autograd import op_function, register

__all__ = ["available", "moe_combine", "moe_dispatch"]

_NATIVE = load_native()  # importing lumina_kernels._C runs its TORCH_LIBRARY registrations


def available() -> bool:
    """True when the native op library is built against this torch and its MoE ops are registered."""
    return _NATIVE is not None and hasattr(torch.ops.lumina_native, "moe_combine")


def _require() -> None:
    if not available():
        raise RuntimeError(f"lumina native ops unavailable: {native_status()}")


if available():
    _ops = torch.ops.lumina_native

    @torch.library.register_fake("lumina_native::moe_dispatch")
    def _(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
        return x.new_empty(perm.shape[0], x.shape[1])

    @torch.library.register_fake("lumina_native::moe_dispatch_backward")
    def _(grad: torch.Tensor, perm: torch.Tensor, top_k: int, num_tokens: int) -> torch.Tensor:
        return grad.new_empty(num_tokens, grad.shape[1])

    @torch.library.register_fake("lumina_native::moe_combine")
    def _(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return y.new_empty(weights.shape[0], y.shape[1])

    @torch.library.register_fake("lumina_native::moe_combine_backward")
    def _(
        grad: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return y.new_empty(y.shape), weights.new_empty(weights.shape)

    # Formulas (kernels/_autograd.py). Dispatch and its backward are adjoint; combine's backward is
    # linear in (g, w) for dy and bilinear in (g, y) for dw, so its second-order terms are combines and
    # combine-backwards again.
    def _dispatch_grad(inputs, grad_SD):
        x_shape, perm_S, top_k = inputs
        return _DispatchBackward.apply(grad_SD, perm_S, top_k, x_shape[0]), None, None

    def _dispatch_backward_grad(inputs, grad_ND):
        _, perm_S, top_k, _ = inputs
        return _Dispatch.apply(grad_ND, perm_S, top_k), None, None, None

    def _combine_grad(inputs, grad_ND):
        y_SD, perm_S, weights_NK = inputs
        # the kernel computes both gradients in one pass
        grad_y, grad_w = _CombineBackward.apply(grad_ND, y_SD, perm_S, weights_NK)
        return grad_y, None, grad_w

    def _combine_backward_grad(inputs, gg_y_SD, gg_w_NK):
        g_ND, y_SD, perm_S, weights_NK = inputs
        if gg_y_SD is None:
            gg_y_SD = torch.zeros_like(y_SD)
        if gg_w_NK is None:
            gg_w_NK = torch.zeros_like(weights_NK)
        # dy[inv[a]] = w[a] g[n]:     d/dg = combine(gg_y, perm, w);  d/dw = <g[n], gg_y[inv[a]]>
        # dw[a] = <g[n], y[inv[a]]>:  d/dg = combine(y, perm, gg_w);  d/dy[inv[a]] = gg_w[a] g[n]
        grad_g = _Combine.apply(gg_y_SD, perm_S, weights_NK) + _Combine.apply(y_SD, perm_S, gg_w_NK)
        grad_y = _CombineBackward.apply(g_ND, y_SD, perm_S, gg_w_NK)[0]
        grad_w = _CombineBackward.apply(g_ND, gg_y_SD, perm_S, weights_NK)[1]
        return grad_g, grad_y, None, grad_w

    _Dispatch = op_function(
        "_Dispatch", lambda x, perm, top_k: _ops.moe_dispatch(x, perm, top_k), _dispatch_grad, save=(1,)
    )
    _DispatchBackward = op_function(
        "_DispatchBackward",
        lambda g, perm, top_k, n: _ops.moe_dispatch_backward(g, perm, top_k, n),
        _dispatch_backward_grad,
        save=(1,),
    )
    _Combine = op_function(
        "_Combine", lambda y, perm, w: _ops.moe_combine(y, perm, w), _combine_grad, save=(0, 1, 2)
    )
    _CombineBackward = op_function(
        "_CombineBackward",
        lambda g, y, perm, w: tuple(_ops.moe_combine_backward(g, y, perm, w)),
        _combine_backward_grad,
        save=(0, 1, 2, 3),
    )
    for _name, _fn in (
        ("moe_dispatch", _Dispatch),
        ("moe_dispatch_backward", _DispatchBackward),
        ("moe_combine", _Combine),
        ("moe_combine_backward", _CombineBackward),
    ):
        register(f"lumina_native::{_name}", _fn)


# The public functions hand the Functions a view of each differentiable input. torch 2.13's Dynamo,
# tracing torch.func.grad, runs an autograd.Function's forward on the *wrapped* (GradTracking) tensor
# when that tensor is the transform's own input, so the op inside hits its register_autograd formula
# ("must override the setup_context staticmethod"). Any op in between (a free view) avoids it.
def moe_dispatch(x_ND: torch.Tensor, perm_A: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token rows in expert-contiguous order: row i is token perm_A[i] // top_k. [A, D]"""
    _require()
    return _Dispatch.apply(x_ND.view_as(x_ND), perm_A, top_k)


def moe_combine(y_AD: torch.Tensor, perm_A: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Each token's router-weighted sum of its K expert outputs (y in expert-sorted order). [N, D]"""
    _require()
    return _Combine.apply(y_AD.view_as(y_AD), perm_A, weights_NK.view_as(weights_NK))
