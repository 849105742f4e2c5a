"""Activation recomputation ("gradient checkpointing") that works under ``torch.func.grad`` and
``torch.compile(fullgraph=True)``.

``torch.utils.checkpoint`` relies on saved-tensor hooks, which ``torch.func`` transforms refuse
("don't yet support saved tensor hooks"), eager or compiled. Here a segment is an
``autograd.Function`` whose forward runs the segment and saves only its *inputs*; the backward
recomputes the segment with ``torch.func.vjp`` and returns the input gradients. Activations inside
the segment are therefore not kept between the forward and backward passes.

Constraints that keep Dynamo able to trace it (all measured on torch 2.13): the Function has a fixed
positional arity (unused slots are ``None``), the segment function is found by name in a registry
rather than stored on ``ctx``, non-tensor arguments travel as one hashable ``static`` value, and no
tensor appears twice among the inputs. Randomness inside a segment must come from keys passed in
(``lumina.model.random``): the recomputation then draws the same numbers.

    register("attn", fn)                      # fn(static, *float_tensors, *other_tensors) -> tuple
    outs = remat("attn", static, floats, others)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

__all__ = ["MAX_INPUTS", "register", "remat"]

MAX_INPUTS = 96  # a quantized + LoRA-adapted MoE block with its knobs: ~60
_FNS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {}


def register(name: str, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
    _FNS[name] = fn


def _with_others(name, static, others, *floats):
    return _FNS[name](static, *floats, *others)


def _forward_source(n: int) -> str:
    slots = ", ".join(f"a{i}" for i in range(n))
    head = f"def forward(name, static, n_float, n_args, {slots}):\n"
    return head + f"    return _fwd(name, static, n_args, {slots})\n"


def _fwd(name, static, n_args, *slots):
    return _FNS[name](static, *slots[:n_args])


_ns: dict = {}
exec(_forward_source(MAX_INPUTS), {"_fwd": _fwd}, _ns)  # a fixed arity: Dynamo cannot bind *args here


class _Remat(torch.autograd.Function):
    forward = staticmethod(_ns["forward"])

    @staticmethod
    def setup_context(ctx, inputs, output):
        name, static, n_float, n_args = inputs[:4]
        ctx.save_for_backward(*inputs[4 : 4 + n_args])
        ctx.name, ctx.static, ctx.n_float, ctx.n_args = name, static, n_float, n_args

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        floats, others = saved[: ctx.n_float], saved[ctx.n_float :]
        target = functools.partial(_with_others, ctx.name, ctx.static, others)
        _, vjp_fn = torch.func.vjp(target, *floats)
        g = vjp_fn(grads)
        return (None, None, None, None, *g, *([None] * (MAX_INPUTS - len(g))))


def remat(
    name: str, static, floats: Sequence[torch.Tensor], others: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, ...]:
    """Run the registered segment ``name`` on (``floats``, ``others``), keeping only its inputs for
    the backward pass. Gradients flow to ``floats``; ``others`` (integer tensors) get none."""
    args = (*floats, *others)
    if len(args) > MAX_INPUTS:
        raise ValueError(f"remat segment {name!r} has {len(args)} tensor inputs, more than {MAX_INPUTS}")
    pad = [None] * (MAX_INPUTS - len(args))
    return _Remat.apply(name, static, len(floats), len(args), *args, *pad)
