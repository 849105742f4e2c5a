"""Lumina's kernels, imported as ``lumina_kernels``.

Triton kernels, the native (CMake-built) op library ``lumina_kernels._C`` and the pure-torch
references of every kernel live here. This package never imports ``lumina``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def _hand_over_to_pypi_kernels() -> None:
    """Imported under the bare name ``kernels``, this folder is shadowing PyPI's ``kernels`` package:
    the checkout's root is on ``sys.path`` (``python -m ...`` or ``python -m pytest`` run from it) and
    a library asked for the other one (transformers >= 5.25 imports it whenever it is installed).
    Load that package in this module's place, found on ``sys.path`` without the checkout's root; the
    import statement then returns it. Not installed: the ImportError a missing package gives."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (the checkout's kernels/ folder is lumina_kernels)", name="kernels"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_to_pypi_kernels()

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
