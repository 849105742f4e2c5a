"""One factory for the ``torch.autograd.Function`` wrappers every kernel op is differentiated through.

Why Functions at all: ``torch.func.grad`` (the train step's transform) cannot differentiate a custom
op's ``register_autograd`` formula in torch 2.13 ("must override the setup_context staticmethod"),
but it can differentiate an ``autograd.Function`` with ``setup_context``, and so can torch.compile.
Each op therefore gets a Function whose forward calls the opaque op; the same formula is registered on
the op itself (``register``) for callers of the op and for ``torch.library.opcheck``. A backward is
written with other such Functions, so it is itself differentiable.

Rules every formula here follows:
- return a gradient for every differentiable input, always: under torch.compile of torch.func.grad
  ``ctx.needs_input_grad`` reads False for inputs that do need one (torch 2.13), and skipping on it
  silently zeroed expert gradients once;
- save only what the backward reads: ``save`` lists the input positions kept as tensors; every other
  tensor input reaches the backward as its ``torch.Size`` only, and non-tensor inputs as themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["grouped_mm_grad", "grouped_mm_weight_grad_grad", "op_function", "register"]


def op_function(
    name: str,
    forward: Callable[..., object],
    backward: Callable[..., Sequence[torch.Tensor | None]],
    save: Sequence[int] = (),
) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` named ``name``: ``apply(*inputs)`` returns ``forward(*inputs)``, and
    its gradients are ``backward(inputs, *grad_outputs)`` (one entry per input, None where there is
    none), where ``inputs`` holds the tensors at positions ``save``, the shapes of the other tensors
    and the non-tensor inputs unchanged."""
    saved_at = tuple(save)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in saved_at))
        ctx.kept = [
            None if i in saved_at else x.shape if isinstance(x, torch.Tensor) else x
            for i, x in enumerate(inputs)
        ]

    def backward_(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if i in saved_at else kept for i, kept in enumerate(ctx.kept)]
        return tuple(backward(inputs, *grads))

    body = {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_),
        "__doc__": getattr(backward, "__doc__", None),
    }
    return type(name, (torch.autograd.Function,), body)


def register(op_name: str | object, function: type[torch.autograd.Function]) -> None:
    """The Function's formula on the op itself (a ``custom_op`` object or a "namespace::name")."""
    if isinstance(op_name, str):
        torch.library.register_autograd(op_name, function.backward, setup_context=function.setup_context)
    else:
        op_name.register_autograd(function.backward, setup_context=function.setup_context)


# Grouped matmul formulas, shared by every implementation: ``MM(x_AD, w_EDF, counts_E)`` multiplies
# segment e of x by w[e], ``WeightGrad(x_AD, g_AF, counts_E)`` is the per-segment x^T g. Each backward
# is written with the pair, so both are differentiable twice:
#   y = MM(x, w):          dx = MM(gy, w^T),   dw = WeightGrad(x, gy)
#   W = WeightGrad(x, g):  dx = MM(g, gW^T),   dg = MM(x, gW)
# (w^T is a transposed view: implementations take strided operands). The Function classes come in as
# arguments from module globals: Dynamo cannot resolve a Function class captured in a closure.
def grouped_mm_grad(MM, WeightGrad, inputs, grad_AF):
    x_AD, w_EDF, counts_E = inputs
    return MM.apply(grad_AF, w_EDF.transpose(1, 2), counts_E), WeightGrad.apply(x_AD, grad_AF, counts_E), None


def grouped_mm_weight_grad_grad(MM, inputs, grad_EDF):
    x_AD, g_AF, counts_E = inputs
    return MM.apply(g_AF, grad_EDF.transpose(1, 2), counts_E), MM.apply(x_AD, grad_EDF, counts_E), None
