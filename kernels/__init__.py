"""Lumina's kernels, imported as ``lumina_kernels``.

Triton kernels, the native (CMake-built) op library ``lumina_kernels._C`` and the pure-torch
references of every kernel live here. This package never imports ``lumina``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

__all__ = ["load_native", "native_status"]


@functools.cache
def _probe_native() -> tuple[ModuleType | None, str]:
    import torch

    try:
        native = importlib.import_module("lumina_kernels._C")
    except ImportError as e:
        return None, f"not built ({e})"
    built = native.compiled_torch_version()
    running = torch.__version__.split("+")[0]
    if built != running:
        # A library compiled against another torch would crash on its first call (C++ ABI).
        return None, f"stale: compiled against torch {built}, running {running}; rebuild with `make venv`"
    return native, f"built against torch {built}"


def load_native() -> ModuleType | None:
    """The native op library, or None when it is not built or was built against another torch."""
    return _probe_native()[0]


def native_status() -> str:
    """One line saying whether the native op library is usable, and why not."""
    return _probe_native()[1]
