"""The checkout's ``kernels/`` folder is imported as ``lumina_kernels``; run from the checkout's root
(``python -m``, ``python -m pytest``) it would also answer a bare ``import kernels`` — PyPI's
``kernels`` package, which transformers >= 5.25 imports whenever it is installed."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bare_kernels_from_the_checkout_root_is_pypi_kernels():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed here")
    code = (
        "import sys, kernels, lumina_kernels; "
        "print(kernels.__file__); print(lumina_kernels.__file__); print(hasattr(kernels, 'LayerRepository'))"
    )
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr
    pypi, ours, has_api = out.stdout.split()
    assert Path(ours).parent == ROOT / "kernels"
    assert not Path(pypi).is_relative_to(ROOT / "kernels") and has_api == "True"


def test_bare_kernels_without_the_pypi_package_is_a_clean_import_error():
    out = _run("-S", "-c", "import kernels")  # -S: no site-packages, so no PyPI kernels
    assert out.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in out.stderr.strip().splitlines()[-1]
