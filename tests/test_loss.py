"""The chunked LM head + cross-entropy (lumina.model.loss) against the plain full-logits loss."""

import dataclasses
import functools

import pytest
import torch
from tensordict import TensorDict

from lumina import presets
from lumina.model.loss import linear_cross_entropy, plain_cross_entropy
from lumina.optim import default_hp
from lumina.step import eval_step, init_train_state, make_train_step

IGN = 10_007  # an ignore index outside the vocabulary, as a tokenizer's pad id can be


def _data(N=37, D=12, V=23, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(D, V, generator=g) / D**0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = t[11] = t[30] = IGN  # scattered ignored targets
    t[16:24] = IGN  # one whole chunk of 8 ignored (rows 16..23)
    return x, w, t


def _loss(x, w, t, chunk, scale=1 / 29):
    """The train step's use: ce_sum / n_tokens (a scalar gradient that is not 1), and the count."""
    if chunk is None:
        ce, correct = plain_cross_entropy(x, w, t, ignore_index=IGN)
    else:
        ce, correct = linear_cross_entropy(x, w, t, ignore_index=IGN, chunk=chunk)
    return ce * scale, correct


def _grads(fn, x, w, t, chunk):
    g = torch.func.grad_and_value(functools.partial(fn, t=t, chunk=chunk), argnums=(0, 1), has_aux=True)
    (gx, gw), (value, correct) = g(x, w)
    return value, correct, gx, gw


@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 37, 64, 0])  # 0: one chunk of all rows
def test_fp32_matches_plain_loss_value_grads_and_count(chunk):
    x, w, t = _data()  # N = 37 (prime: never a multiple of the chunk), V = 23 (odd)
    ref = _grads(_loss, x, w, t, None)
    out = _grads(_loss, x, w, t, chunk)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=1e-6)
    assert out[1].dtype == torch.int64 and out[1].item() == ref[1].item()
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-7)  # d/dx
    torch.testing.assert_close(out[3], ref[3], rtol=1e-5, atol=1e-7)  # d/dhead
    assert out[2][t == IGN].abs().max() == 0  # ignored rows get no gradient


def test_count_is_the_argmax_count_and_nonzero():
    x, w, t = _data()
    logits = x @ w
    t = torch.where(t == IGN, t, logits.argmax(-1))  # every kept row correct
    t[0] = (logits[0].argmax() + 1) % w.shape[1]  # but one
    _, correct = linear_cross_entropy(x, w, t, ignore_index=IGN, chunk=8)
    assert correct.item() == int((t != IGN).sum()) - 1


def test_ignore_index_inside_the_vocabulary():
    """A pad id that is a real token (argmax can equal it): those rows count in neither sum."""
    x, w, _ = _data()
    t = (x @ w).argmax(-1)  # every row predicted right...
    ign = int(t[0])  # ...but rows whose target is this token are ignored
    for chunk in (None, 8):
        fn = plain_cross_entropy if chunk is None else functools.partial(linear_cross_entropy, chunk=chunk)
        ce, correct = fn(x, w, t, ignore_index=ign)
        assert correct.item() == int((t != ign).sum()) < len(t)
        if chunk is None:
            ref = ce
    torch.testing.assert_close(ce, ref, rtol=1e-6, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    x, w, _ = _data()
    t = torch.full((x.shape[0],), IGN)
    value, correct, gx, gw = _grads(_loss, x, w, t, 8)
    assert value.item() == 0 and correct.item() == 0
    assert gx.abs().max() == 0 and gw.abs().max() == 0


def test_autograd_backward_and_tied_head_view():
    """Plain autograd, a transposed (non-contiguous) head as the tied embedding's ``.T``."""
    x, w, t = _data()
    emb = w.T.contiguous()  # [V, D]
    for chunk in (None, 7):
        xr, er = x.clone().requires_grad_(), emb.clone().requires_grad_()
        ce, _ = _loss(xr, er.T, t, chunk)
        ce.backward()
        if chunk is None:
            ref = xr.grad, er.grad
    torch.testing.assert_close(xr.grad, ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(er.grad, ref[1], rtol=1e-5, atol=1e-7)
    # the head's gradient is accumulated in the head's memory layout ([V, D] here), so the
    # embedding's gradient arrives contiguous: no transposed add, no copy before the optimizer
    seen = []
    er = emb.clone().requires_grad_()
    head = er.T
    head.register_hook(lambda g: seen.append(g))
    linear_cross_entropy(x, head, t, ignore_index=IGN, chunk=7)[0].backward()
    assert seen[0].T.is_contiguous() and er.grad.is_contiguous()
    torch.testing.assert_close(er.grad, ref[1] * 29, rtol=1e-5, atol=1e-6)  # _loss scaled by 1/29


def test_bf16_head_fp32_accumulation():
    """bf16 inputs: the logits are the same bf16 GEMM as the plain path's, so the value and count
    match to fp32 summation order. The gradients differ by where the bf16 roundings fall: the plain
    path rounds (softmax - onehot) * scale to bf16 before its GEMMs and returns bf16 grad_head, we
    round (softmax - onehot) unscaled and accumulate grad_head in fp32 over chunks. Each is within a
    few bf16 ulps (2^-8 relative) of the fp64 truth: both must be within 2 ulps of the gradient's
    scale (measured: ours 0.51 / 0.57 of it for d/dx / d/dhead, the plain path 0.43 / 0.42)."""
    x, w, t = _data(N=67, D=16, V=41, dtype=torch.bfloat16)
    ref = _grads(_loss, x, w, t, None)
    out = _grads(_loss, x, w, t, 9)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=1e-6)
    assert out[1].item() == ref[1].item()
    assert out[2].dtype == out[3].dtype == torch.bfloat16
    # truth: fp64 autograd on the same bf16 values, logits rounded to bf16 as both paths do
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    logits = (xd @ wd).to(torch.bfloat16).double()  # rounding is piecewise constant: d/dlogits passes through
    logits = xd @ wd + (logits - xd @ wd).detach()
    keep = t != IGN
    ce = torch.nn.functional.cross_entropy(logits[keep], t[keep], reduction="sum") / 29
    gx, gw = torch.autograd.grad(ce, (xd, wd))
    for got, plain, true in ((out[2], ref[2], gx), (out[3], ref[3], gw)):
        tol = 2 * 2**-8 * true.abs().max().item()
        err, err_plain = (got.double() - true).abs().max().item(), (plain.double() - true).abs().max().item()
        assert err <= tol and err_plain <= tol, (err, err_plain, tol)


def test_compile_fullgraph_aot_eager():
    x, w, t = _data()
    fn = torch.compile(
        torch.func.grad_and_value(functools.partial(_loss, t=t, chunk=8), argnums=(0, 1), has_aux=True),
        fullgraph=True,
        backend="aot_eager",
    )
    (gx, gw), (value, correct) = fn(x, w)
    ref = _grads(_loss, x, w, t, None)
    torch.testing.assert_close(value, ref[0], rtol=1e-6, atol=1e-6)
    assert correct.item() == ref[1].item()
    torch.testing.assert_close(gx, ref[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref[3], rtol=1e-5, atol=1e-7)


def test_compile_fullgraph_aot_eager_bf16():
    """bf16 on the CPU traces the native epilogue on bf16 logits and the native fp32 += bf16 add of
    the head's gradient (fake kernels): the compiled function computes what the eager one does."""
    x, w, t = _data(N=37, D=12, V=1001, dtype=torch.bfloat16, seed=3)
    fn = torch.compile(
        torch.func.grad_and_value(functools.partial(_loss, t=t, chunk=8), argnums=(0, 1), has_aux=True),
        fullgraph=True,
        backend="aot_eager",
    )
    (gx, gw), (value, correct) = fn(x, w)
    ref = _grads(_loss, x, w, t, 8)
    assert torch.equal(value, ref[0]) and correct.item() == ref[1].item()
    assert torch.equal(gx, ref[2]) and torch.equal(gw, ref[3])


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    x, w, t = _data()
    fn = torch.compile(
        torch.func.grad_and_value(functools.partial(_loss, t=t, chunk=8), argnums=(0, 1), has_aux=True),
        fullgraph=True,
    )
    (gx, gw), (value, correct) = fn(x, w)
    ref = _grads(_loss, x, w, t, None)
    torch.testing.assert_close(value, ref[0], rtol=1e-5, atol=1e-5)
    assert correct.item() == ref[1].item()
    torch.testing.assert_close(gx, ref[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ref[3], rtol=1e-4, atol=1e-6)


def test_not_differentiable_path_for_eval():
    x, w, t = _data()
    ce, correct = linear_cross_entropy(x, w, t, ignore_index=IGN, chunk=8, differentiable=False)
    ref = plain_cross_entropy(x, w, t, ignore_index=IGN)
    torch.testing.assert_close(ce, ref[0], rtol=1e-6, atol=1e-6)
    assert correct.item() == ref[1].item() and not ce.requires_grad


def _debug_cfg(loss_chunk):
    cfg = presets.get("debug")
    train = dataclasses.replace(
        cfg.train, loss_chunk=loss_chunk, batch_size=2, micro_batch_size=1, seq_len=64
    )
    return dataclasses.replace(cfg, train=train)


def test_debug_train_step_loss_chunk_on_vs_off():
    """The debug preset (V = 50304, tied head) with two micro-batches: 3 steps, losses, accuracy,
    gradient norms and the held-out eval agree with loss_chunk on (24 tokens: 64 = 24 + 24 + 16) and off."""
    results = []
    for chunk in (24, 0):
        cfg = _debug_cfg(chunk)
        state = init_train_state(cfg)
        step = make_train_step(cfg, pad_id=cfg.model.vocab_size)  # no pad token among the targets...
        g = torch.Generator().manual_seed(0)
        hp = default_hp(cfg.train)
        rows = []
        for _ in range(3):
            x = torch.randint(0, 1000, (2, 65), generator=g)
            tg = x[:, 1:].clone()
            tg[0, :5] = cfg.model.vocab_size  # ...but these
            batch = TensorDict({"inputs": x[:, :-1], "targets": tg}, batch_size=[])
            state, m = step(state, batch, hp)
            rows.append((m["loss"].item(), m["accuracy"].item(), m["grad_norm"].item()))
        ev = eval_step(state["params"], batch, cfg=cfg, pad_id=cfg.model.vocab_size)
        results.append((rows, ev["loss"].item(), ev["accuracy"].item()))
    (on, ev_on, acc_on), (off, ev_off, acc_off) = results
    for a, b in zip(on, off, strict=True):
        assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-6)
        assert a[1] == b[1]
        assert a[2] == pytest.approx(b[2], rel=1e-5)
    assert ev_on == pytest.approx(ev_off, rel=1e-6) and acc_on == acc_off
    assert on[0][0] != on[-1][0]  # it trains


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_epilogue_matches_the_torch_ops(monkeypatch, dtype):
    """On CPU the chunk's softmax, loss, count and softmax - onehot run in one native kernel
    (``lumina_native::xent_rows_``); the torch ops it replaces give the same numbers to float
    rounding. V = 1001: 62 full 16-lane blocks and a tail; big logits, so the max matters."""
    from lumina.model import loss

    if not loss._NATIVE_ROWS:
        pytest.skip("native library not built")
    x, w, t = _data(N=37, D=12, V=1001, dtype=dtype, seed=3)
    x = x * 4
    calls = []
    real = torch.ops.lumina_native.xent_rows_
    monkeypatch.setattr(loss.torch.ops.lumina_native, "xent_rows_", lambda *a: calls.append(1) or real(*a))
    native = _grads(_loss, x, w, t, 8)
    assert len(calls) == 5  # ceil(37 / 8) chunks
    monkeypatch.setattr(loss, "_NATIVE_ROWS", False)
    torch_ops = _grads(_loss, x, w, t, 8)
    assert len(calls) == 5
    assert native[1].item() == torch_ops[1].item()
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    for a, b in zip(native[::2], torch_ops[::2], strict=True):  # value, d/dx
        torch.testing.assert_close(a.float(), b.float(), **tol)
    torch.testing.assert_close(native[3].float(), torch_ops[3].float(), **tol)  # d/dhead
    with torch.no_grad():  # evaluation: no gradient pass, the same sums
        ev = linear_cross_entropy(x, w, t, ignore_index=IGN, chunk=8, differentiable=False)
    monkeypatch.setattr(loss, "_NATIVE_ROWS", True)
    with torch.no_grad():
        ev_native = linear_cross_entropy(x, w, t, ignore_index=IGN, chunk=8, differentiable=False)
    assert ev[1].item() == ev_native[1].item()
    torch.testing.assert_close(ev_native[0], ev[0], rtol=1e-6, atol=1e-6)


def test_native_epilogue_in_bf16_is_the_fp32_kernel_between_two_casts():
    """bf16 logits: each row widened, the fp32 kernel's three passes, the gradient rounded back in
    place: the same bits as widening the chunk, the fp32 kernel, and ``.to(torch.bfloat16)`` (what
    the loss did before the kernel took bf16), with the nll in fp32 either way."""
    from lumina.model import loss

    if not loss._NATIVE_ROWS:
        pytest.skip("native library not built")
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(9, 1003, generator=g) * 6).to(torch.bfloat16)
    targets, keep = torch.randint(0, 1003, (9,), generator=g), torch.rand(9, generator=g) > 0.3
    for grads in (True, False):
        wide, narrow = logits.float(), logits.clone()
        nll32, hits32 = torch.ops.lumina_native.xent_rows_(wide, targets, keep, grads)
        nll16, hits16 = torch.ops.lumina_native.xent_rows_(narrow, targets, keep, grads)
        assert nll16.dtype == torch.float32 and torch.equal(nll16, nll32) and torch.equal(hits16, hits32)
        assert torch.equal(narrow, wide.to(torch.bfloat16) if grads else logits)


def test_native_bf16_accumulation_is_torchs_mixed_add(monkeypatch):
    """The bf16 head's gradient is summed over chunks into fp32 by ``add_bf16_`` (one pass, no fp32
    temporary): the bits of torch's ``fp32.add_(bf16)``, called once per chunk after the first."""
    from lumina.model import loss

    if not loss._NATIVE_ADD:
        pytest.skip("native library not built")
    g = torch.Generator().manual_seed(2)
    acc, src = torch.randn(301, 7, generator=g), torch.randn(301, 7, generator=g).to(torch.bfloat16)
    mine = acc.clone()
    torch.ops.lumina_native.add_bf16_(mine, src)
    assert torch.equal(mine, acc.clone().add_(src))
    with pytest.raises(RuntimeError, match="accumulator must be a contiguous fp32"):
        torch.ops.lumina_native.add_bf16_(acc.double(), src)
    with pytest.raises(RuntimeError, match="of the accumulator's shape"):
        torch.ops.lumina_native.add_bf16_(acc, src[:300])
    calls, real = [], torch.ops.lumina_native.add_bf16_
    monkeypatch.setattr(loss.torch.ops.lumina_native, "add_bf16_", lambda *a: calls.append(1) or real(*a))
    x, w, t = _data(N=37, D=12, V=1001, dtype=torch.bfloat16, seed=3)
    native = _grads(_loss, x, w, t, 8)
    assert len(calls) == 4  # 5 chunks
    monkeypatch.setattr(loss, "_NATIVE_ADD", False)
    assert torch.equal(native[3], _grads(_loss, x, w, t, 8)[3])


def test_native_epilogue_refuses_out_of_range_targets():
    from lumina.model import loss

    if not loss._NATIVE_ROWS:
        pytest.skip("native library not built")
    logits, keep = torch.zeros(2, 5), torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="target 5 in row 1 is outside"):
        torch.ops.lumina_native.xent_rows_(logits, torch.tensor([0, 5]), keep, True)
    with pytest.raises(RuntimeError, match="contiguous 2-D fp32"):
        torch.ops.lumina_native.xent_rows_(logits.double(), torch.tensor([0, 1]), keep, True)


def test_no_rows_gives_zero_loss_and_zero_grads():
    x = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(4, 7, requires_grad=True)
    ce, correct = linear_cross_entropy(x, w, torch.zeros(0, dtype=torch.long), ignore_index=IGN, chunk=3)
    ce.backward()
    assert ce.item() == 0 and correct.item() == 0
    assert x.grad.shape == (0, 4) and w.grad.abs().max() == 0
