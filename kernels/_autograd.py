"""The gradient formulas of every differentiable kernel op, written once, and the factory that makes them
the ``torch.autograd.Function`` of each provider's op.

Legend: N tokens, K top-k, S rows of the expert-side buffer, D model dim, B batch, T sequence length,
E experts, A expert-sorted rows, F expert hidden dim.

Why Functions at all: ``torch.func.grad`` (the train step's transform) cannot differentiate a custom
op's ``register_autograd`` formula in torch 2.13 ("must override the setup_context staticmethod"),
but it can differentiate an ``autograd.Function`` with ``setup_context``, and so can torch.compile.
Each op therefore gets a Function whose forward calls the opaque op; the same formula is registered on
the op itself for callers of the op and for ``torch.library.opcheck``.

One formula per op kind (``FORMULAS``, keyed by the op's name), shared by every provider: a provider
defines ops with the same names and signatures in its own namespace (``lumina_native`` C++,
``lumina_triton`` Triton, ``lumina`` the reference grouped matmul) and plugs them in with
``op_functions(namespace, name=op, ...)``. A formula is written with the Functions of the provider
it differentiates (``function(namespace, name)``), so a backward is itself differentiable, on that
provider's kernels. The Functions are looked up in a module-level table, never captured in a closure:
Dynamo cannot resolve a Function class held in a closure cell (it inlines ``Function.apply`` and
fails), but it can one reached through a module global.

Rules every formula here follows (the factory enforces the third):
- return a gradient for every differentiable input, always: under torch.compile of torch.func.grad
  ``ctx.needs_input_grad`` reads False for inputs that do need one (torch 2.13), and skipping on it
  silently zeroed expert gradients once;
- save only what the backward reads: a formula's ``save`` lists the input positions kept as tensors;
  every other tensor input reaches the backward as its ``torch.Size`` only, and non-tensor inputs as
  themselves;
- a formula never sees a None output gradient: a None (an unused output, when a caller invokes the
  backward node or the op's registered formula directly; autograd itself materialises zeros) is
  replaced by zeros of that output's shape, dtype and device before the formula runs, so a missing
  gradient and a zero gradient give the same result on every provider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = ["FORMULAS", "Formula", "apply", "function", "op_function", "op_functions"]


def op_function(
    name: str,
    forward: Callable[..., object],
    backward: Callable[..., Sequence[torch.Tensor | None]],
    save: Sequence[int] = (),
) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` named ``name``: ``apply(*inputs)`` returns ``forward(*inputs)``, and
    its gradients are ``backward(inputs, *grad_outputs)`` (one entry per input, None where there is
    none), where ``inputs`` holds the tensors at positions ``save``, the shapes of the other tensors
    and the non-tensor inputs unchanged, and every grad_output is a tensor (None becomes zeros).
    ``forward`` must name its parameters (no ``*args``): Dynamo reads the signature."""
    saved_at = tuple(save)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in saved_at))
        ctx.kept = [
            None if i in saved_at else x.shape if isinstance(x, torch.Tensor) else x
            for i, x in enumerate(inputs)
        ]
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.outputs_like = [(y.shape, y.dtype, y.device) for y in outputs]

    def backward_(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if i in saved_at else kept for i, kept in enumerate(ctx.kept)]
        grads = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, ctx.outputs_like, strict=True)
        ]
        return tuple(backward(inputs, *grads))

    body = {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_),
        "__doc__": getattr(backward, "__doc__", None),
    }
    return type(name, (torch.autograd.Function,), body)


def apply(fn: type[torch.autograd.Function], *inputs: object) -> object:
    """``fn.apply(*inputs)`` with a view of each tensor input: torch 2.13's Dynamo, tracing
    torch.func.grad, runs a Function's forward on the *wrapped* (GradTracking) tensor when that tensor
    is the transform's own input, so the op inside hits its register_autograd formula ("must override
    the setup_context staticmethod"). Any op in between (a free view) avoids it. Public functions call
    this, never ``fn.apply`` on their arguments directly."""
    return fn.apply(*(x.view_as(x) if isinstance(x, torch.Tensor) else x for x in inputs))


# ----------------------------------------------------------------------------------------- the formulas
_FUNCTIONS: dict[tuple[str, str], type[torch.autograd.Function]] = {}


def function(namespace: str, name: str) -> type[torch.autograd.Function]:
    """The Function of op ``namespace::name`` (made by ``op_functions``)."""
    return _FUNCTIONS[namespace, name]


# Dispatch: out[i] = x[perm[i] // K] (0 where perm[i] = -1); its backward sums each token's K rows.
# The two are adjoint and linear in their tensor input, so each one's backward is the other.
def _moe_dispatch_grad(ns, inputs, grad_SD):
    x_shape, perm_S, top_k = inputs
    return function(ns, "moe_dispatch_backward").apply(grad_SD, perm_S, top_k, x_shape[0]), None, None


def _moe_dispatch_backward_grad(ns, inputs, grad_ND):
    _, perm_S, top_k, _ = inputs
    return function(ns, "moe_dispatch").apply(grad_ND, perm_S, top_k), None, None, None


# Combine: out[n] = sum_k w[n, k] y[inv[n*K + k]]. Its backward (dy, dw) is one op (one pass over g
# and y). dy is linear in (g, w) and dw bilinear in (g, y), so the second-order terms are combines and
# combine-backwards again:
#   dy[inv[a]] = w[a] g[n]:     d/dg = combine(gg_y, perm, w);  d/dw = <g[n], gg_y[inv[a]]>
#   dw[a] = <g[n], y[inv[a]]>:  d/dg = combine(y, perm, gg_w);  d/dy[inv[a]] = gg_w[a] g[n]
def _moe_combine_grad(ns, inputs, grad_ND):
    y_SD, perm_S, weights_NK = inputs
    grad_y, grad_w = function(ns, "moe_combine_backward").apply(grad_ND, y_SD, perm_S, weights_NK)
    return grad_y, None, grad_w


def _moe_combine_backward_grad(ns, inputs, gg_y_SD, gg_w_NK):
    g_ND, y_SD, perm_S, weights_NK = inputs
    combine, backward = function(ns, "moe_combine"), function(ns, "moe_combine_backward")
    grad_g = combine.apply(gg_y_SD, perm_S, weights_NK) + combine.apply(y_SD, perm_S, gg_w_NK)
    grad_y = backward.apply(g_ND, y_SD, perm_S, gg_w_NK)[0]
    grad_w = backward.apply(g_ND, gg_y_SD, perm_S, weights_NK)[1]
    return grad_g, grad_y, None, grad_w


# MoD gather: out[b, s] = x[b, idx[b, s]]; its backward places g's rows at idx in a zero [B, T, D].
# Adjoint, as dispatch.
def _mod_gather_grad(ns, inputs, grad_BSD):
    x_shape, idx_BS = inputs
    return function(ns, "mod_gather_backward").apply(grad_BSD, idx_BS, x_shape[1]), None


def _mod_gather_backward_grad(ns, inputs, grad_BTD):
    _, idx_BS, _ = inputs
    return function(ns, "mod_gather").apply(grad_BTD, idx_BS), None, None


# MoD scatter: out = x + (w * delta at the rows idx). d/dx is the identity; the backward op gives
# ddelta = w * G(g) and dw = <G(g), delta> (G: gather at idx), so its second-order terms are
#   d/dg = scatter(scatter(0, gg_ddelta, w), delta, gg_dw);  d/ddelta = backward(g, delta, gg_dw).ddelta;
#   d/dw = backward(g, gg_ddelta, w).dw
def _mod_scatter_grad(ns, inputs, grad_BTD):
    _, delta_BSD, weight_BS, idx_BS = inputs
    grad_delta, grad_w = function(ns, "mod_scatter_backward").apply(grad_BTD, delta_BSD, weight_BS, idx_BS)
    return grad_BTD, grad_delta, grad_w, None


def _mod_scatter_backward_grad(ns, inputs, gg_ddelta_BSD, gg_dw_BS):
    g_BTD, delta_BSD, weight_BS, idx_BS = inputs
    scatter, backward = function(ns, "mod_scatter"), function(ns, "mod_scatter_backward")
    zeros = torch.zeros_like(g_BTD)
    grad_g = scatter.apply(
        scatter.apply(zeros, gg_ddelta_BSD, weight_BS, idx_BS), delta_BSD, gg_dw_BS, idx_BS
    )
    grad_delta = backward.apply(g_BTD, delta_BSD, gg_dw_BS, idx_BS)[0]
    grad_w = backward.apply(g_BTD, gg_ddelta_BSD, weight_BS, idx_BS)[1]
    return grad_g, grad_delta, grad_w, None


# Grouped matmul: ``grouped_mm(x_AD, w_EDF, counts_E)`` multiplies segment e of x by w[e],
# ``grouped_mm_weight_grad(x_AD, g_AF, counts_E)`` is the per-segment x^T g. Each backward is written
# with the pair, so both are differentiable twice:
#   y = MM(x, w):          dx = MM(gy, w^T),   dw = WeightGrad(x, gy)
#   W = WeightGrad(x, g):  dx = MM(g, gW^T),   dg = MM(x, gW)
# (w^T is a transposed view: implementations take strided operands).
def _grouped_mm_grad(ns, inputs, grad_AF):
    x_AD, w_EDF, counts_E = inputs
    mm, weight_grad = function(ns, "grouped_mm"), function(ns, "grouped_mm_weight_grad")
    return (
        mm.apply(grad_AF, w_EDF.transpose(1, 2), counts_E),
        weight_grad.apply(x_AD, grad_AF, counts_E),
        None,
    )


def _grouped_mm_weight_grad_grad(ns, inputs, grad_EDF):
    x_AD, g_AF, counts_E = inputs
    mm = function(ns, "grouped_mm")
    return mm.apply(g_AF, grad_EDF.transpose(1, 2), counts_E), mm.apply(x_AD, grad_EDF, counts_E), None


class Formula(NamedTuple):
    """The backward of one op kind: ``grad(namespace, inputs, *grad_outputs)``, and the input
    positions it reads as tensors."""

    save: tuple[int, ...]
    grad: Callable[..., Sequence[torch.Tensor | None]]


FORMULAS: dict[str, Formula] = {
    "moe_dispatch": Formula((1,), _moe_dispatch_grad),
    "moe_dispatch_backward": Formula((1,), _moe_dispatch_backward_grad),
    "moe_combine": Formula((0, 1, 2), _moe_combine_grad),
    "moe_combine_backward": Formula((0, 1, 2, 3), _moe_combine_backward_grad),
    "mod_gather": Formula((1,), _mod_gather_grad),
    "mod_gather_backward": Formula((1,), _mod_gather_backward_grad),
    "mod_scatter": Formula((1, 2, 3), _mod_scatter_grad),
    "mod_scatter_backward": Formula((0, 1, 2, 3), _mod_scatter_backward_grad),
    "grouped_mm": Formula((0, 1, 2), _grouped_mm_grad),
    "grouped_mm_weight_grad": Formula((0, 1, 2), _grouped_mm_weight_grad_grad),
}

# A forward per op arity, with named parameters (op_function's rule): every op above takes 2 to 4.
_FORWARDS: dict[int, Callable[[Callable], Callable]] = {
    2: lambda op: lambda a, b: op(a, b),
    3: lambda op: lambda a, b, c: op(a, b, c),
    4: lambda op: lambda a, b, c, d: op(a, b, c, d),
}


def op_functions(namespace: str, **ops: Callable) -> tuple[type[torch.autograd.Function], ...]:
    """The Functions of a provider's ops, one per ``name=op`` (in order): the forward calls ``op``, the
    op ``namespace::name`` as found under ``torch.ops`` (an OpOverload or OpOverloadPacket: Dynamo
    cannot wrap the ``CustomOpDef`` that ``torch.library.custom_op`` returns when a closure holds it);
    the backward is ``FORMULAS[name]`` on this namespace's Functions; the same formula is registered
    on each op."""
    made = []
    for name, op in ops.items():
        save, grad = FORMULAS[name]
        arity = len(getattr(getattr(torch.ops, namespace), name).default._schema.arguments)

        def backward(inputs, *grads, grad=grad, namespace=namespace):
            return grad(namespace, inputs, *grads)

        fn = op_function(f"{namespace}::{name}", _FORWARDS[arity](op), backward, save)
        torch.library.register_autograd(f"{namespace}::{name}", fn.backward, setup_context=fn.setup_context)
        _FUNCTIONS[namespace, name] = fn
        made.append(fn)
    return tuple(made)
