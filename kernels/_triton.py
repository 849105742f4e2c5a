"""Shared plumbing for Lumina's Triton kernels: one kernel object that runs compiled on CUDA tensors and
through Triton's interpreter on CPU tensors, plus block-size heuristics.

Why not plain ``@triton.jit``: it decides compiled-vs-interpreted once, when the decorator runs, from
``TRITON_INTERPRET`` (triton 3.7: ``triton.runtime.jit.jit``). Whether a CPU test works would then
depend on which module imported the kernels first and what the environment said at that moment. Here
the choice is made per launch, from the tensors' device, so CPU tensors always take the interpreter
(the only way Triton runs on a CPU) and CUDA tensors the compiled kernel, whatever the import order.
``TRITON_INTERPRET=1`` still forces the interpreter everywhere (debugging on a GPU machine).

The rule this imposes on kernel bodies: call only Triton *builtins* (``tl.load``, ``tl.full``,
``tl.reduce``, ``tl.arange``, ``.to`` …), not ``triton.language.standard``'s ``@jit`` helpers
(``tl.zeros``, ``tl.sum``, ``tl.max``, ``tl.cdiv`` …). Those were decorated when triton was imported;
if ``TRITON_INTERPRET`` was unset then, they are compiled-only and the interpreter refuses to call them
("Cannot call @triton.jit'd outside of the scope of a kernel"). Use ``tl.full(shape, 0.0, dtype)`` for
``tl.zeros`` and ``tl.reduce(x, axis, tl.standard._sum_combine)`` for ``tl.sum`` (the same combine
function ``tl.sum`` uses, so the compiled code is identical and the interpreter maps it to np.sum).

Triton 3.6 (torch 2.11's pin) needs one repair of its interpreter before any kernel with a runtime loop
bound runs on numpy >= 2.4: see ``_repair_interpreter_loop_bounds``.
"""

from __future__ import annotations

import functools
import operator
import types
from collections.abc import Callable

import numpy as np
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

__all__ = ["Kernel", "acc_dtype", "interpreted", "jit", "row_blocks"]


def interpreted(device: torch.device) -> bool:
    """Whether a launch on ``device``'s tensors runs in Triton's interpreter: always on CPU (the only way
    Triton runs there), on CUDA only when ``TRITON_INTERPRET`` is set. Launchers and block heuristics
    ask this, never the device type alone: an interpreted program is numpy work per Python iteration
    (large tiles, few programs), a compiled one a GPU block (small tiles, many programs)."""
    return device.type == "cpu" or knobs.runtime.interpret


class Kernel:
    """A Triton kernel source with a compiled (CUDA) and an interpreted (CPU) launcher, built lazily."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def compiled_launcher(self) -> JITFunction:
        return JITFunction(self.fn)

    @functools.cached_property
    def interpreted_launcher(self):
        from triton.runtime.interpreter import InterpretedFunction

        _repair_interpreter_loop_bounds()
        return InterpretedFunction(self.fn)

    def on(self, device: torch.device):
        """The launcher for tensors on ``device``: index it with the grid, then call it."""
        return self.interpreted_launcher if interpreted(device) else self.compiled_launcher


@functools.cache
def _repair_interpreter_loop_bounds() -> None:
    """Let triton 3.6's interpreter take a runtime loop bound (``for k in range(K)``, K a kernel
    argument) under numpy >= 2.4.

    The interpreter holds a scalar argument as a shape-(1,) array and its ``tensor.__index__`` is
    ``int(self.handle.data)``; numpy 2.4 turned that conversion's deprecation into an error, so every
    such kernel failed with ``InterpreterError: TypeError('only 0-dimensional arrays can be converted to
    Python scalars')`` (measured: triton 3.6.0 + numpy 2.5.5; numpy 2.3.5 only warns). Triton 3.7
    squeezes the array first. This probes the installed interpreter's ``__index__`` on such an array and,
    only where it fails, wraps ``_patch_lang_tensor`` (a private function, looked up at each launch) to
    install triton 3.7's version for the duration of the launch. Nothing changes where the probe passes."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope_cls is None:
        return

    class Probe:
        pass

    scope = scope_cls()
    try:
        patch(Probe, scope)
        probe = Probe()
        probe.handle = types.SimpleNamespace(data=np.ones(1, dtype=np.int32))
        operator.index(probe)
        return  # this interpreter converts a one-element array itself
    except TypeError:
        pass
    finally:
        scope.restore()

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def jit(fn: Callable) -> Kernel:
    return Kernel(fn)


def acc_dtype(dtype: torch.dtype):
    """The accumulator for sums over ``dtype`` inputs: fp32 (fp64 for fp64, so gradcheck is exact)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def row_blocks(
    rows: int, D: int, device: torch.device, block_r: int | None = None, block_d: int | None = None
) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for a kernel whose program covers BLOCK_R rows x BLOCK_D columns.

    Compiled: tiles of at most 4096 elements (BLOCK_D <= 1024: 4 warps x 32 lanes x 8 elements), so
    a program's registers stay small and there are many programs to fill the SMs. Interpreted: every
    program is a Python-level loop iteration of numpy work, so tiles are as large as possible (64 Ki
    elements) to launch few programs. Either can be forced (tests force small blocks to exercise the
    column masks and several column blocks)."""
    max_d, max_tile = (4096, 1 << 16) if interpreted(device) else (1024, 4096)
    bd = block_d or min(triton.next_power_of_2(max(D, 1)), max_d)
    br = block_r or max(1, min(triton.next_power_of_2(max(rows, 1)), max_tile // bd))
    return br, bd
