import pytest
import torch

import lumina_kernels


def test_native_library_is_built_against_this_torch():
    # `make venv` builds kernels/csrc with CMake; a broken build or a stale library fails here.
    native = lumina_kernels.load_native()
    assert native is not None, lumina_kernels.native_status()
    assert native.compiled_torch_version() == torch.__version__.split("+")[0]
    assert lumina_kernels.native_status().startswith("built against torch")


def test_hash_uniform_is_bit_identical_to_the_reference():
    from lumina import ops
    from lumina_kernels import native, reference

    assert native.has_op("hash_uniform"), lumina_kernels.native_status()
    keys = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x9E3779B9]
    for key_value in keys:
        key = torch.tensor(key_value, dtype=torch.int64)
        for n in (0, 1, 7, 64, 1000, 65536 + 37):  # empty, a vector tail, several parallel chunks
            got = native.hash_uniform(key, n)
            want = reference.hash_uniform(key, n)
            assert got.dtype == torch.float32 and got.shape == (n,)
            assert torch.equal(got, want), (key_value, n)
    u = native.hash_uniform(torch.tensor(12345, dtype=torch.int64), 1 << 16)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.01
    # the model's draw takes it on CPU, and a compiled graph calls it as an opaque op
    key = torch.tensor(99, dtype=torch.int64)
    assert ops.hash_uniform(key, 10).equal(want := reference.hash_uniform(key, 10))
    compiled = torch.compile(lambda k: ops.hash_uniform(k, 10) * 2, fullgraph=True, backend="aot_eager")
    assert compiled(key).equal(want * 2)


def test_hash_uniform_refuses_bad_keys():
    from lumina_kernels import native

    with pytest.raises(RuntimeError, match="0-dim int64 CPU tensor"):
        native.hash_uniform(torch.tensor([1, 2]), 4)
    with pytest.raises(RuntimeError, match="0-dim int64 CPU tensor"):
        native.hash_uniform(torch.tensor(1, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        native.hash_uniform(torch.tensor(1), -1)
