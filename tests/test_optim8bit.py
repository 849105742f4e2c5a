"""8-bit AdamW (``train.optimizer=adamw8bit``, ``lumina.optim.adamw8bit_*``) on the real bitsandbytes
custom ops: quantization error, the update against a float64 reference, tracking fp32 AdamW, memory,
layout, one compiled graph, checkpoints and exact resume, and the orchestrator's expert edits."""

import dataclasses
import json
import struct

import pytest
import torch
from tensordict import TensorDict
from torch._dynamo.backends.debugging import aot_eager

import lumina.step
from lumina import optim, presets, tree
from lumina.checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from lumina.config import ModelConfig, MoEConfig, RunConfig, TrainConfig, to_dict
from lumina.optim import (
    BLOCK,
    MIN_8BIT_SIZE,
    adamw8bit_init,
    adamw8bit_update,
    adamw_init,
    adamw_update,
    default_hp,
    get_moments,
    put_moments,
    quant_maps,
)
from lumina.step import init_train_state, make_train_step, train_step

PAD = 10_000


def _bracket_gap(x_unit: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Per element of ``x_unit`` (values in [-1, 1]): the width of the interval between the two map
    entries that bracket it — a block-wise quantizer that returns either bracketing entry is off by
    at most this (nearest rounding: half of it)."""
    hi = torch.searchsorted(qmap, x_unit.contiguous()).clamp(1, len(qmap) - 1)
    return qmap[hi] - qmap[hi - 1]


def _decode(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """The test's own decoder (float64): element i of the flattened leaf is qmap[code] times the
    absmax of block i // BLOCK."""
    flat = codes.reshape(-1).long()
    scale = absmax.double().repeat_interleave(BLOCK)[: flat.numel()]
    return (qmap.double()[flat] * scale).reshape(codes.shape)


def _block_absmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).abs()
    pad = -flat.numel() % BLOCK
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCK).amax(1)


def _eight_bit_flat() -> dict[str, torch.Tensor]:
    """A flattened 8-bit optimizer state holding no leaves yet (maps and block size only)."""
    return {k: v for k, v in tree.flatten(adamw8bit_init(TensorDict({}, []))).items()}


def test_the_maps_are_bitsandbytes_dynamic_maps():
    qm, qv = quant_maps()
    assert qm.shape == qv.shape == (256,) and qm.dtype == qv.dtype == torch.float32
    assert bool((qm.diff() > 0).all()) and bool((qv.diff() > 0).all())  # sorted, distinct
    assert qm.min() < 0 < qm.max() == 1.0 and qv.min() == 0.0 and qv.max() == 1.0  # m signed, v >= 0
    assert (qm == 0).sum() == 1 and (qv == 0).sum() == 1  # zero moments are exact


@pytest.mark.parametrize("moment", ["m", "v"])
def test_roundtrip_error_is_bounded_by_the_map_spacing(moment):
    """put_moments -> get_moments of a leaf with blocks spanning six decades (and a partial last
    block): each element decodes to a map entry near it, times its block's exact absmax, so the
    error is at most (the width of the map interval holding it) * absmax; over the whole map that is
    <= 0.0141 * absmax for m and <= 0.0070 * absmax for v (the widest gaps, next to 1)."""
    g = torch.Generator().manual_seed(0)
    n = 37 * BLOCK + 76  # not a multiple of the block (but of 7)
    decade = 10.0 ** -torch.randint(0, 6, (n // BLOCK + 1,), generator=g).repeat_interleave(BLOCK)[:n]
    x = torch.randn(n, generator=g) * decade
    x = (x if moment == "m" else x.square()).reshape(-1, 7)  # v >= 0
    zero = torch.zeros_like(x)
    flat = _eight_bit_flat()
    put_moments(flat, "w", *((x, zero) if moment == "m" else (zero, x)))
    assert flat[f"{moment}_q.w"].dtype == torch.uint8 and flat[f"{moment}_q.w"].shape == x.shape
    absmax = flat[f"{moment}_absmax.w"]
    assert absmax.shape == (n // BLOCK + 1,)
    assert torch.equal(absmax, _block_absmax(x))  # element i belongs to block i // 256
    back = get_moments(flat, "w")[0 if moment == "m" else 1]
    qmap = flat[f"qmap_{moment}"]
    scale = absmax.repeat_interleave(BLOCK)[:n].reshape(x.shape)
    err = (back - x).abs()
    # bitsandbytes' CPU quantizer searches the sorted map and is not exactly nearest (here 99.8 % of
    # m's codes and 96.9 % of v's are the nearest entry): it puts v's values below qmap_v[7] =
    # 1.56e-5 (x absmax) on that entry and lands some up to 1e-4 a few entries off (measured error
    # up to 1.9e-5 there). So: one bracket, but never less than 2 * 1.56e-5 = 3.1e-5 (x absmax).
    bound = torch.clamp(_bracket_gap((x / scale).clamp(-1, 1), qmap), min=3.2e-5) * scale
    assert bool((err <= bound * (1 + 1e-5)).all())
    widest = float(qmap.diff().max())
    assert widest == pytest.approx(0.0141 if moment == "m" else 0.0070, abs=1e-4)
    assert bool((err <= widest * scale * (1 + 1e-5)).all())
    assert float(err.max() / scale.max()) > 1e-4  # it is quantized: not an fp32 copy


def _params(g: torch.Generator) -> TensorDict:
    return TensorDict(
        {
            "w": torch.randn(67, 75, generator=g),  # 5025 elements: 8-bit, 20 blocks (last one partial)
            "norm": torch.randn(75, generator=g),  # small: fp32 moments
        },
        batch_size=[],
    )


def test_one_update_matches_a_float64_adamw_on_the_dequantized_moments():
    """From a state with non-zero moments (three earlier steps), step t=4 against float64 AdamW
    whose inputs are the stored moments decoded by the test's own decoder; matrices decay, vectors
    do not. The new params are fp32 roundings of the reference; the new moments are quantized
    versions of the reference's within the map's spacing."""
    cfg = TrainConfig(beta1=0.9, beta2=0.95, eps=1e-8)
    g = torch.Generator().manual_seed(1)
    params, hp = _params(g), TensorDict({"lr": torch.tensor(1e-2), "weight_decay": torch.tensor(0.1)}, [])
    opt = adamw8bit_init(params)
    for t in (1, 2, 3):
        grads = params.apply(lambda p: torch.randn(p.shape, generator=g))
        params, opt = adamw8bit_update(params, grads, opt, torch.tensor(t), hp, cfg)
    grads = params.apply(lambda p: torch.randn(p.shape, generator=g))
    before = tree.flatten(opt)
    new_p, new_opt = adamw8bit_update(params, grads, opt, torch.tensor(4), hp, cfg)
    assert all(torch.equal(before[k], v) for k, v in tree.flatten(opt).items())  # inputs untouched
    after = tree.flatten(new_opt)
    qm, qv = before["qmap_m"], before["qmap_v"]
    b1, b2, eps, lr, wd, t = 0.9, 0.95, 1e-8, 1e-2, 0.1, 4
    for k, decay in (("w", True), ("norm", False)):
        if k == "w":
            m0 = _decode(before["m_q.w"], before["m_absmax.w"], qm)
            v0 = _decode(before["v_q.w"], before["v_absmax.w"], qv)
        else:
            m0, v0 = before["m.norm"].double(), before["v.norm"].double()
        assert float(m0.abs().max()) > 0 and float(v0.min()) >= 0
        p0, g0 = params[k].double(), grads[k].double()
        m = b1 * m0 + (1 - b1) * g0
        v = b2 * v0 + (1 - b2) * g0 * g0
        p = p0 * (1 - lr * wd) if decay else p0
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(new_p[k].double(), p, atol=2e-6, rtol=1e-6)
        if k == "norm":
            torch.testing.assert_close(after["m.norm"].double(), m, atol=1e-7, rtol=1e-6)
            torch.testing.assert_close(after["v.norm"].double(), v, atol=1e-7, rtol=1e-6)
            continue
        for name, ref, qmap in (("m", m, qm), ("v", v, qv)):
            absmax = after[f"{name}_absmax.w"].double()
            torch.testing.assert_close(absmax, _block_absmax(ref), atol=0, rtol=1e-6)
            scale = absmax.repeat_interleave(BLOCK)[: ref.numel()].reshape(ref.shape)
            got = _decode(after[f"{name}_q.w"], after[f"{name}_absmax.w"], qmap)
            gap = _bracket_gap((ref / scale).clamp(-1, 1).float(), qmap).double()
            assert bool(((got - ref).abs() <= gap * scale * (1 + 1e-5)).all()), name


def test_fifty_steps_track_fp32_adamw():
    """A 32-128-4 MLP (w1 [128, 32]: 4096 elements, 8-bit; b1, w2 small: fp32) fitting a random
    teacher, 50 minibatch steps at lr 1e-2, 8-bit vs fp32 AdamW from the same start and batches.

    Tolerances: a moment element is off by at most one map gap times its block's absmax (~1.4 % of
    the block's largest value near the top of the map, a few % relative for elements within a
    decade of it), so each 8-bit update deviates by a few % per element, partly averaging out over
    steps. Measured: per-step losses within 0.4 % of fp32's, w1's final displacement within 4.7 % of
    its fp32 displacement (w2 1.2 %, b1 3.3 %), final full-data loss 0.1613 vs 0.1615 (from 1.76).
    Asserted: 2 %, 10 %, and the final loss within 1 % — while training lowers the loss > 5x."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 32, generator=g)
    Y = torch.tanh(X @ torch.randn(32, 4, generator=g))
    start = TensorDict(
        {
            "w1": torch.randn(128, 32, generator=g) * 0.2,
            "b1": torch.zeros(128),
            "w2": torch.randn(4, 128, generator=g) * 0.1,
        },
        batch_size=[],
    )

    def loss_fn(p, x, y):
        return ((torch.relu(x @ p["w1"].T + p["b1"]) @ p["w2"].T - y) ** 2).mean()

    cfg = TrainConfig(beta1=0.9, beta2=0.95)
    hp = TensorDict({"lr": torch.tensor(1e-2), "weight_decay": torch.tensor(0.1)}, [])
    runs = {}
    for name, init, update in (
        ("fp32", adamw_init, adamw_update),
        ("8bit", adamw8bit_init, adamw8bit_update),
    ):
        p, o, losses = start.clone(), init(start), []
        for t in range(1, 51):
            idx = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(t))
            grads, loss = torch.func.grad_and_value(loss_fn)(p, X[idx], Y[idx])
            losses.append(float(loss))
            p, o = update(p, grads, o, torch.tensor(t), hp, cfg)
        runs[name] = p, losses, float(loss_fn(p, X, Y)), o
    assert runs["8bit"][3]["m_q", "w1"].dtype == torch.uint8 and "b1" in runs["8bit"][3]["m"]
    (p32, l32, final32, _), (p8, l8, final8, _) = runs["fp32"], runs["8bit"]
    assert final32 < l32[0] / 5
    assert max(abs(a - b) / a for a, b in zip(l32, l8, strict=True)) < 0.02
    assert abs(final8 - final32) / final32 < 0.01
    for k in ("w1", "b1", "w2"):
        moved = (p32[k] - start[k]).norm()
        assert (p8[k] - p32[k]).norm() < 0.1 * moved, k


def test_state_bytes_of_a_large_leaf_and_the_estimate():
    params = TensorDict({"w": torch.zeros(1024, 1000)}, batch_size=[])
    flat = tree.flatten(adamw8bit_init(params))
    moments = sum(v.numel() * v.element_size() for k, v in flat.items() if k.endswith(".w"))
    fp32 = 2 * 4 * params["w"].numel()
    assert moments <= 0.27 * fp32  # 2 bytes + 8 per 256 elements: 0.2539x
    assert moments == optim.opt_state_bytes([1024 * 1000], "adamw8bit") - 2056
    # presets' estimate counts exactly what init_train_state allocates (as for AdamW in test_presets)
    base = presets.get("debug")
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, optimizer="adamw8bit"))
    state = tree.flatten(init_train_state(cfg))
    held = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(("params.", "opt.")))
    n = presets.count_params(cfg.model).total
    assert presets.train_state_bytes(cfg) == held + 4 * n
    opt = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("opt."))
    assert opt < 0.26 * 8 * n  # debug: 15.9 MB vs AdamW's 62.7 MB
    assert presets.train_state_bytes(cfg) < 0.65 * presets.train_state_bytes(base)


def tiny_cfg(**train) -> RunConfig:
    """embed [300, 16] (4800: 8-bit) and experts [4, 16, 64] (4096: 8-bit); attention, norms and
    routers are small (fp32 moments)."""
    model = ModelConfig(
        vocab_size=300,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_multiple_of=16,
        max_seq_len=32,
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=64, router_jitter=0.2, expert_dropout=0.3),
    )
    t = {"steps": 6, "batch_size": 4, "seq_len": 12, "lr": 1e-2, "warmup_steps": 0, "compile": False}
    return RunConfig(model=model, train=TrainConfig(**{**t, "optimizer": "adamw8bit", **train}))


def batch(cfg, seed=0):
    x = torch.randint(0, 300, (cfg.train.batch_size, 13), generator=torch.Generator().manual_seed(seed))
    targets = x[:, 1:].clone()
    targets[0, :3] = PAD
    return TensorDict({"inputs": x[:, :-1], "targets": targets}, batch_size=[])


def test_layout_small_leaves_fp32_and_uint8_codes_in_a_saved_checkpoint(tmp_path):
    cfg = tiny_cfg()
    state = init_train_state(cfg)
    state, _ = train_step(state, batch(cfg), default_hp(cfg.train), cfg=cfg, pad_id=PAD)
    flat = tree.flatten(state)
    quantized = []
    for k, p in tree.flatten(state["params"]).items():
        if p.numel() >= MIN_8BIT_SIZE:
            quantized.append(k)
            for n in ("m", "v"):
                assert flat[f"opt.{n}_q.{k}"].dtype == torch.uint8 and flat[f"opt.{n}_q.{k}"].shape == p.shape
                assert flat[f"opt.{n}_absmax.{k}"].shape == (-(-p.numel() // BLOCK),)
                assert f"opt.{n}.{k}" not in flat
        else:
            assert flat[f"opt.m.{k}"].dtype == flat[f"opt.v.{k}"].dtype == torch.float32
            assert f"opt.m_q.{k}" not in flat
    assert quantized == [
        "embed.weight",
        *(f"layers.{i}.moe.{w}" for i in (0, 1) for w in ("w_gate", "w_up", "w_down")),
        "head.weight",
    ]
    path = save_checkpoint(tmp_path, state, step=1, config=to_dict(cfg), data={})
    raw = (path / "shard_00000.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert (
        header["opt.m_q.embed.weight"]["dtype"] == "U8"
        and header["opt.v_q.layers.1.moe.w_down"]["dtype"] == "U8"
    )
    assert header["opt.m_absmax.embed.weight"]["dtype"] == "F32" and header["opt.qmap_m"]["shape"] == [256]
    loaded, _ = load_checkpoint(path)
    check_compatible(loaded, init_train_state(cfg), path)
    assert int(loaded["opt", "block_size"]) == BLOCK and torch.equal(loaded["opt", "qmap_v"], quant_maps()[1])
    for k, v in flat.items():
        assert torch.equal(tree.flatten(loaded)[k], v), k


def test_compiled_step_is_one_graph_and_equals_eager(monkeypatch):
    """fullgraph=True through AOTAutograd (aot_eager: the functionalised graph inductor would
    compile), hp changing between steps without recompiling; the compiled step equals the eager one
    bit for bit when both differentiate with torch.func (an eager step otherwise uses autograd,
    whose gradients differ in the last bits: lumina.step.grad_and_value)."""
    monkeypatch.setattr(lumina.step, "grad_and_value", lambda fn: torch.func.grad_and_value(fn, has_aux=True))
    torch._dynamo.reset()
    cfg = tiny_cfg(micro_batch_size=2)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    step = torch.compile(
        lambda s, b, h: train_step(s, b, h, cfg=cfg, pad_id=PAD), backend=counting_backend, fullgraph=True
    )
    state, hp = init_train_state(cfg), default_hp(cfg.train)
    eager, compiled = state, state
    for i in range(3):
        hp = TensorDict(
            {
                "lr": torch.tensor(1e-2 * (i + 1)),
                "weight_decay": torch.tensor(0.1 * i),
                "clip_norm": torch.tensor(1.0),
            },
            batch_size=[],
        )
        eager, em = train_step(eager, batch(cfg, i), hp, cfg=cfg, pad_id=PAD)
        compiled, cm = step(compiled, batch(cfg, i), hp)
        assert torch.equal(cm["loss"], em["loss"])
    assert len(graphs) == 1
    fe, fc = tree.flatten(eager), tree.flatten(compiled)
    assert fe.keys() == fc.keys() and any(v.dtype == torch.uint8 for v in fc.values())
    for k, v in fe.items():
        assert torch.equal(fc[k], v), k


@pytest.mark.slow  # a cold inductor compile of the step on 2 cores
def test_inductor_compiled_step_matches_eager():
    torch._dynamo.reset()
    cfg = tiny_cfg(compile=True)
    state, hp, b = init_train_state(cfg), default_hp(cfg.train), batch(cfg)
    eager, em = train_step(state, b, hp, cfg=cfg, pad_id=PAD)
    compiled, cm = make_train_step(cfg, PAD)(state, b, hp)
    torch.testing.assert_close(cm["loss"], em["loss"], atol=1e-5, rtol=1e-5)
    fe, fc = tree.flatten(eager), tree.flatten(compiled)
    for k, v in fe.items():
        if v.dtype == torch.uint8:  # fp32 moments may differ in the last bit: at most a code's neighbour
            assert (fc[k].int() - v.int()).abs().max() <= 1, k
        else:
            torch.testing.assert_close(fc[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_exact_resume_is_bit_identical(tmp_path):
    from lumina.optim import lr_at

    def run(cfg, state, first, steps):
        hp, metrics = default_hp(cfg.train), []
        for s in range(first, first + steps):
            hp["lr"] = torch.tensor(lr_at(int(state["step"]), cfg.train))
            state, m = train_step(state, batch(cfg, seed=s), hp, cfg=cfg, pad_id=PAD)
            metrics.append(m)
        return state, metrics

    cfg = tiny_cfg(micro_batch_size=2, warmup_steps=2)
    straight, straight_m = run(cfg, init_train_state(cfg), 0, 6)
    half, _ = run(cfg, init_train_state(cfg), 0, 3)
    path = save_checkpoint(tmp_path, half, step=3, config=to_dict(cfg), data={})
    state, _ = load_checkpoint(path)
    resumed, resumed_m = run(tiny_cfg(micro_batch_size=2, warmup_steps=2), state, 3, 3)
    for k, v in tree.flatten(straight).items():
        assert torch.equal(tree.flatten(resumed)[k], v), k
    for a, b in zip(straight_m[3:], resumed_m, strict=True):
        assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["grad_norm"], b["grad_norm"])


def test_resume_refuses_another_optimizer_or_block_size(tmp_path):
    from lumina.driver.prepare import _resume

    cfg8 = tiny_cfg()
    cfg32 = dataclasses.replace(cfg8, train=dataclasses.replace(cfg8.train, optimizer="adamw"))
    path = save_checkpoint(tmp_path, init_train_state(cfg32), step=1, config=to_dict(cfg32), data={})
    with pytest.raises(CheckpointError, match=r"saved with train.optimizer=adamw, this run uses adamw8bit"):
        _resume(cfg8, path, torch.device("cpu"), init_train_state(cfg8))
    state = init_train_state(cfg8)
    state["opt", "block_size"] = torch.tensor(128)
    path = save_checkpoint(tmp_path, state, step=2, config=to_dict(cfg8), data={})
    with pytest.raises(CheckpointError, match=r"opt.block_size is 128; .* block size 256"):
        _resume(cfg8, path, torch.device("cpu"), init_train_state(cfg8))


@pytest.mark.parametrize(
    ("action", "d_expert"), [("prune_expert", 32), ("add_expert", 32), ("add_expert", 28)]
)
def test_expert_add_and_prune_edit_8bit_moments(action, d_expert):
    """Experts [E=4, 32, d_expert]: with d_expert 32 they hold 4096 elements (8-bit); pruning one
    leaves 3072 (fp32 moments, as a fresh state of that shape has), adding one 5120 (8-bit,
    requantized); with 28, 3584 (fp32) grow to 4480 (8-bit). Kept experts' moments survive within
    the quantization error; an added expert's are zero; the new state matches a fresh state of the
    new config (so its checkpoints load) and trains."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_orchestrator import TINY_MOE, D

    from lumina.configure import load_config
    from lumina.orchestrator import apply_decisions

    over = [*TINY_MOE, f"--model.moe.d_expert={d_expert}", "--train.optimizer=adamw8bit"]
    cfg = load_config(overrides=over)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (4, 17), generator=g)
    b = tree.unflatten({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state, _ = make_train_step(cfg, pad_id=-1)(init_train_state(cfg), b, default_hp(cfg.train))
    before = tree.flatten(state["opt"])
    k = "layers.2.moe.w_up"
    E = cfg.model.moe.num_experts
    assert (f"m_q.{k}" in before) == (E * 32 * d_expert >= MIN_8BIT_SIZE)
    args = (
        {"from": E, "to": E - 1, "experts": [1, 0, 3, 2]}
        if action == "prune_expert"
        else {"from": E, "to": E + 1}
    )
    new, hp, cfg2 = apply_decisions([D(action, **args)], state, default_hp(cfg.train), cfg)
    check_compatible(new, init_train_state(cfg2), "after " + action)
    after = tree.flatten(new["opt"])
    eight_bit = cfg2.model.moe.num_experts * 32 * d_expert >= MIN_8BIT_SIZE
    assert (f"m_q.{k}" in after) == eight_bit and (f"m.{k}" in after) == (not eight_bit)
    m0, v0 = get_moments(before, k)
    m1, v1 = get_moments(after, k)
    kept = [e for e in range(E) if e != 3] if action == "prune_expert" else list(range(E))
    for old, now in ((m0, m1), (v0, v1)):
        ref = old.index_select(0, torch.tensor(kept))
        tol = 0.0141 * old.abs().max()  # one widest map gap of the old (or new) block absmax
        assert (now.narrow(0, 0, len(kept)) - ref).abs().max() <= tol
    if action == "add_expert":
        assert torch.count_nonzero(m1[E]) == 0 and torch.count_nonzero(v1[E]) == 0
    _, metrics = make_train_step(cfg2, pad_id=-1)(new, b, hp)
    assert torch.isfinite(metrics["loss"])
