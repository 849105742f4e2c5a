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

    class _Dispatch(torch.autograd.Function):
        """x_SD[i] = x[perm[i] // K]; its backward sums each token's K rows (``_DispatchBackward``)."""

        @staticmethod
        def forward(x_ND, perm_S, top_k):
            return _ops.moe_dispatch(x_ND, perm_S, top_k)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x_ND, perm_S, top_k = inputs
            ctx.save_for_backward(perm_S)
            ctx.top_k, ctx.num_tokens = top_k, x_ND.shape[0]

        @staticmethod
        def backward(ctx, grad_SD):
            (perm_S,) = ctx.saved_tensors
            return _DispatchBackward.apply(grad_SD, perm_S, ctx.top_k, ctx.num_tokens), None, None

    class _DispatchBackward(torch.autograd.Function):
        """The adjoint of dispatch; linear in grad, so its own backward is dispatch."""

        @staticmethod
        def forward(grad_SD, perm_S, top_k, num_tokens):
            return _ops.moe_dispatch_backward(grad_SD, perm_S, top_k, num_tokens)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _, perm_S, top_k, _ = inputs
            ctx.save_for_backward(perm_S)
            ctx.top_k = top_k

        @staticmethod
        def backward(ctx, grad_ND):
            (perm_S,) = ctx.saved_tensors
            return _Dispatch.apply(grad_ND, perm_S, ctx.top_k), None, None, None

    class _Combine(torch.autograd.Function):
        """out[n] = sum_k w[n,k] * y[inv[n*K+k]]."""

        @staticmethod
        def forward(y_AD, perm_A, weights_NK):
            return _ops.moe_combine(y_AD, perm_A, weights_NK)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, grad_ND):
            y_AD, perm_A, weights_NK = ctx.saved_tensors
            # Both gradients, always (see lumina/ops.py: needs_input_grad is unreliable under
            # torch.compile of torch.func.grad in torch 2.13); the kernel computes them in one pass.
            grad_y, grad_w = _CombineBackward.apply(grad_ND, y_AD, perm_A, weights_NK)
            return grad_y, None, grad_w

    class _CombineBackward(torch.autograd.Function):
        """(dy, dw) of combine. dy is linear in (g, w) and dw bilinear in (g, y), so the second-order
        terms are combines and combine-backwards again."""

        @staticmethod
        def forward(grad_ND, y_AD, perm_A, weights_NK):
            return tuple(_ops.moe_combine_backward(grad_ND, y_AD, perm_A, weights_NK))

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, gg_y_AD, gg_w_NK):
            g_ND, y_AD, perm_A, weights_NK = ctx.saved_tensors
            if gg_y_AD is None:
                gg_y_AD = torch.zeros_like(y_AD)
            if gg_w_NK is None:
                gg_w_NK = torch.zeros_like(weights_NK)
            # dy[inv[a]] = w[a] g[n]:     d/dg = combine(gg_y, perm, w);  d/dw = <g[n], gg_y[inv[a]]>
            # dw[a] = <g[n], y[inv[a]]>:  d/dg = combine(y, perm, gg_w);  d/dy[inv[a]] = gg_w[a] g[n]
            grad_g = _Combine.apply(gg_y_AD, perm_A, weights_NK) + _Combine.apply(y_AD, perm_A, gg_w_NK)
            grad_y = _CombineBackward.apply(g_ND, y_AD, perm_A, gg_w_NK)[0]
            grad_w = _CombineBackward.apply(g_ND, gg_y_AD, perm_A, weights_NK)[1]
            return grad_g, grad_y, None, grad_w

    # The same formulas on the ops themselves, for callers of torch.ops.lumina_native.* (and opcheck).
    for _name, _fn in (
        ("moe_dispatch", _Dispatch),
        ("moe_dispatch_backward", _DispatchBackward),
        ("moe_combine", _Combine),
        ("moe_combine_backward", _CombineBackward),
    ):
        torch.library.register_autograd(
            f"lumina_native::{_name}", _fn.backward, setup_context=_fn.setup_context
        )


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
