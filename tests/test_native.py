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


def test_fold_in_is_bit_identical_to_the_reference():
    from lumina import ops
    from lumina.model import random
    from lumina_kernels import native, reference

    assert native.has_op("fold_in"), lumina_kernels.native_status()
    data = [0, 1, 7, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 40) + 5, -1, -12345]  # taken mod 2^32
    for key_value in (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x9E3779B9):
        key = torch.tensor(key_value, dtype=torch.int64)
        for d in data:
            got, want = native.fold_in(key, d), reference.fold_in(key, d)
            assert got.dtype == torch.int64 and got.dim() == 0
            assert torch.equal(got, want), (key_value, d)
            assert torch.equal(ops.fold_in(key, d), want)
    # several ints, and a tensor (which takes the reference), in order; a compiled graph calls the op
    key = random.key_from_seed(3)
    chained = reference.fold_in(reference.fold_in(reference.fold_in(key, 1), 2), torch.tensor(5))
    assert torch.equal(random.fold_in(key, 1, 2, torch.tensor(5)), chained)
    assert not torch.equal(random.fold_in(key, 2, 1), random.fold_in(key, 1, 2))
    compiled = torch.compile(lambda k: random.fold_in(k, 4, 9) + 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(key), reference.fold_in(reference.fold_in(key, 4), 9) + 1)
    with pytest.raises(RuntimeError, match="0-dim int64 CPU tensor"):
        native.fold_in(torch.tensor([1, 2]), 4)


def test_global_norm_kernel_sums_in_float64_whatever_the_thread_count():
    from tensordict import TensorDict

    from lumina import optim

    assert optim._NATIVE_NORM, lumina_kernels.native_status()
    g = torch.Generator().manual_seed(0)
    # several blocks with a tail, a vector tail inside a block, a scalar, an empty leaf; and a block
    # whose first square (1e8) would swallow the 16383 ones after it in an fp32 sum (5e-6 off)
    xs = [torch.randn(s, generator=g) * 30 for s in [(1000, 70), (16385,), (17,), (), (0,)]]
    spike = torch.ones(16384)
    spike[0] = 1e4
    xs.append(spike)
    want = torch.sqrt(sum((x.double() ** 2).sum() for x in xs))
    got = torch.ops.lumina_native.global_norm(xs)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == torch.tensor(want.item(), dtype=torch.float32).item()  # the exact norm, rounded once
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.lumina_native.global_norm(xs), got)
    finally:
        torch.set_num_threads(threads)
    # optim.global_norm takes it for plain fp32 CPU leaves, in sorted-key order; torch's norms elsewhere
    tree = TensorDict({"b": xs[1], "a": {"w": xs[0], "s": xs[3]}}, [])
    assert torch.equal(optim.global_norm(tree), torch.ops.lumina_native.global_norm([xs[3], xs[0], xs[1]]))
    wide = tree.apply(lambda x: x.to(torch.float64))  # torch's norms, in fp32: to their rounding
    torch.testing.assert_close(optim.global_norm(wide), optim.global_norm(tree), rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors"):
        torch.ops.lumina_native.global_norm([torch.zeros(4, 4).T[::2]])


def test_adamw_kernel_follows_the_foreach_arithmetic_in_place_or_not():
    from tensordict import TensorDict

    from lumina import optim
    from lumina.config import TrainConfig

    assert optim._NATIVE_ADAMW, lumina_kernels.native_status()
    cfg = TrainConfig(beta1=0.9, beta2=0.95, eps=1e-8)
    g = torch.Generator().manual_seed(0)
    shapes = [(513, 37), (100_003,), (5,)]  # several parallel chunks, a vector tail, a scalar-only leaf
    p = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    m = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    v = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    hp = TensorDict({"lr": torch.tensor(3e-3), "weight_decay": torch.tensor(0.1)}, [])
    for step, clip in ((1, None), (7, torch.tensor(0.37))):
        t = torch.tensor(step)
        new = optim._adamw_fused(p, grads, m, v, [0], t, hp, cfg, grad_scale=clip)
        scaled = grads if clip is None else torch._foreach_mul(grads, clip)
        want = optim._adamw_math(p, scaled, m, v, [0], t, hp, cfg)
        for ours, theirs in zip(new[1:], want[1:], strict=True):  # moments: bit for bit
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        # params: torch's vectorised sqrt is not always correctly rounded, so the update term may
        # differ in its last bits; p * decay - update can cancel to far below |p|, so the tolerance is
        # in units of the operands' last place (eps * max(|p|, |p'|): 1-2 ulps), not the result's
        # (on the AMD EPYC the same 1-ulp update difference read 16 and 512 result ulps)
        for a, b, p0 in zip(new[0], want[0], p, strict=True):
            ulp = torch.finfo(torch.float32).eps * torch.maximum(p0.abs(), b.abs())
            assert ((a - b).abs() <= 4 * ulp).all()
        assert not torch.equal(new[0][0], p[0]) and not torch.equal(new[1][0], m[0])
        inplace = [[x.clone() for x in xs] for xs in (p, m, v)]
        optim.adamw_(inplace[0], grads, inplace[1], inplace[2], [0], t, hp, cfg, grad_scale=clip)
        for ours, theirs in zip(inplace, new, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_adamw_kernel_refuses_mismatched_operands():
    x = torch.zeros(8)
    args = (1.0, 1.0, 1e-3, 0.9, 0.95, 0.1, 0.05, 1e-8)
    with pytest.raises(RuntimeError, match="grad has 7 elements"):
        torch.ops.lumina_native.adamw_out(x, torch.zeros(7), x, x, x, x, x, *args)
    with pytest.raises(RuntimeError, match="m must be a contiguous fp32 CPU tensor"):
        torch.ops.lumina_native.adamw_out(x, x, torch.zeros(8, dtype=torch.float64), x, x, x, x, *args)
    with pytest.raises(RuntimeError, match="v_out must be a contiguous fp32"):
        torch.ops.lumina_native.adamw_out(x, x, x, x, x, x, torch.zeros(16)[::2], *args)


def test_grouped_mm_equals_the_reference_bit_for_bit():
    from lumina_kernels import native, reference

    assert native.has_op("grouped_mm"), lumina_kernels.native_status()
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 1, 9])  # an empty expert, a single row
    A, D, F = int(counts.sum()), 24, 40
    x = torch.randn(A, D, generator=g, requires_grad=True)
    w = torch.randn(len(counts), D, F, generator=g, requires_grad=True)
    gy = torch.randn(A, F, generator=g)
    y = native.grouped_mm(x, w, counts)
    assert torch.equal(y, reference.grouped_mm(x.detach(), w.detach(), counts))
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    assert torch.equal(gx, reference.grouped_mm(gy, w.detach().transpose(1, 2), counts))  # strided w
    assert torch.equal(gw, reference.grouped_mm_weight_grad(x.detach(), gy, counts))
    assert gw[1].abs().max() == 0  # the empty expert's weight gradient
    small = torch.tensor([2, 0, 3])  # twice differentiable: the backward is written with the same ops
    xd = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    wd = torch.randn(3, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: native.grouped_mm(a, b, small), (xd, wd))
    with pytest.raises(RuntimeError, match="counts sum to 32, the rows are 33"):
        torch.ops.lumina_native.grouped_mm(torch.zeros(33, D), w.detach(), counts)
    with pytest.raises(RuntimeError, match="is negative"):
        torch.ops.lumina_native.grouped_mm(torch.zeros(31, D), w.detach(), torch.tensor([-1, 0, 30, 1, 1]))


def test_grouped_mm_spreads_fp32_experts_over_the_threads_and_its_results_do_not_depend_on_them():
    """fp32: each expert one single-threaded matmul, the experts spread over the threads; so the
    same bits at 1 thread and at 2 (a one-row segment, summed as a matrix-vector product, is the
    case where torch's own matmul differs between thread counts), and the reference's results to
    fp32 rounding. Segments of the benchmark's size, with an empty one."""
    from lumina_kernels import native, reference

    assert native.has_op("grouped_mm"), lumina_kernels.native_status()
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([1, 300, 0, 257, 64, 411, 1, 180])
    A, D, F = int(counts.sum()), 256, 384
    x, gy = torch.randn(A, D, generator=g), torch.randn(A, F, generator=g)
    w = torch.randn(len(counts), D, F, generator=g)
    ops = torch.ops.lumina_native
    results = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = (
                ops.grouped_mm(x, w, counts),
                ops.grouped_mm(gy, w.transpose(1, 2), counts),
                ops.grouped_mm_weight_grad(x, gy, counts),
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[1], results[2], strict=True):
        assert torch.equal(one, two)
    y, gx, gw = results[2]
    torch.testing.assert_close(y, reference.grouped_mm(x, w, counts))
    torch.testing.assert_close(gx, reference.grouped_mm(gy, w.transpose(1, 2), counts))
    torch.testing.assert_close(gw, reference.grouped_mm_weight_grad(x, gy, counts))
    assert gw[2].abs().max() == 0  # the empty expert


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_mm_pads_reduced_precision_segments_to_buckets_with_the_same_results(dtype):
    """bf16 / fp16 segments are rounded up to a bucket of rows (oneDNN builds a kernel per shape): the
    forward reads the next segment's rows or zeros past the end, the weight gradient zero-padded
    copies. The kept results are the reference's unpadded matmuls: equal bits on the AMX Xeon of the
    CI type; the assertions allow the dtype's rounding, since another CPU's kernels may sum a padded
    contraction in another order (a wrong pad — garbage rows, a missing zero — is off by O(1)).
    Counts straddle the buckets (64, 65, 72, 73, 130), and the last segment reads past the last row."""
    from lumina_kernels import native, reference

    assert native.has_op("grouped_mm"), lumina_kernels.native_status()
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([64, 65, 0, 1, 72, 73, 130, 3])
    A, D, F = int(counts.sum()), 32, 48
    x = torch.randn(A, D, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(counts), D, F, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(A, F, generator=g).to(dtype)
    y = native.grouped_mm(x, w, counts)
    assert y.shape == (A, F) and y.is_contiguous() and y.dtype == dtype
    torch.testing.assert_close(y, reference.grouped_mm(x.detach(), w.detach(), counts))
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    torch.testing.assert_close(gx, reference.grouped_mm(gy, w.detach().transpose(1, 2), counts))
    torch.testing.assert_close(gw, reference.grouped_mm_weight_grad(x.detach(), gy, counts))
    assert gw[2].abs().max() == 0  # the empty expert
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:  # the matmuls' row counts are the buckets
        torch.ops.lumina_native.grouped_mm(x.detach(), w.detach(), counts)
    rows = sorted(e.input_shapes[0][0] for e in prof.events() if e.name == "aten::mm")
    assert rows == [64, 64, 64, 72, 72, 80, 144]  # 64, 1 and 3 -> 64; 65, 72 -> 72; 73 -> 80; 130 -> 144
