import torch

import lumina_kernels


def test_native_library_is_built_against_this_torch():
    # `make venv` builds kernels/csrc with CMake; a broken build or a stale library fails here.
    native = lumina_kernels.load_native()
    assert native is not None, lumina_kernels.native_status()
    assert native.compiled_torch_version() == torch.__version__.split("+")[0]
    assert lumina_kernels.native_status().startswith("built against torch")
