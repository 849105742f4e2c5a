"""DeepSpeed ZeRO 1/2/3 (lumina.distributed.zero) at 2 gloo ranks under torchrun on CPU, against one
process: W ranks x A/W local micro-batches must equal one process with grad_accum = A.

Measured on the small config of tests/distributed/common.py (2 layers, MoE with the balance bias,
MoD; 3 steps; clipping active: the gradient norm is ~1.7, clip_norm 1; lr 2.5e-4):
- against the pure single-process step (``make_train_step``): parameters within 1.2e-7 with one
  local micro-batch (bound 1e-6; two: see PARAM_TOL_ACCUM), moments within 1.4e-9 (m) and 2.2e-11
  (v), the loss equal, the gradient norm equal or one float32 ulp off (6.9e-8 relative). The
  distributed path differentiates with plain autograd, the pure step with torch.func, whose
  gradients differ in the last bits (the module-view step at one process was 3.6e-7 off the pure
  step too). Both sum the gradient norm's squares in fp64: DeepSpeed
  (``deepspeed.runtime.zero.utils.get_norm_dtype``) and, on CPU, ``lumina.optim.global_norm``'s
  native kernel (before it summed in fp32, and the reported norms differed by 2.4e-6 relative);
- two local micro-batches per rank: the gradient sums run in another order (see PARAM_TOL_ACCUM);
- with clipping off, ZeRO-3 (every leaf partitioned) equals the module-view step at one process
  (``lumina.distributed.step``) bit for bit, in fp32 and bf16: the reduction of 2 ranks is one
  exact addition, DeepSpeed's 1/W exact, and Lumina's AdamW runs on the partitions;
- ZeRO-1 and ZeRO-2 are bit-identical to each other; a rollback (snapshot -> step -> adopt) and a
  resume from a 2-rank checkpoint are bit-identical to the straight run; a 2-rank checkpoint loads
  in one process and a one-process checkpoint into 2 ranks with every tensor equal.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed's first import: no guessing
pytest.importorskip("deepspeed", exc_type=ImportError)  # not installed, or broken

from safetensors.torch import load_file  # noqa: E402

from lumina import checkpoint, tree  # noqa: E402
from lumina.checkpoint import check_compatible, load_checkpoint  # noqa: E402
from lumina.optim import default_hp  # noqa: E402
from lumina.step import COMPUTE_DTYPES, eval_step, init_train_state, make_train_step  # noqa: E402

HERE = Path(__file__).resolve().parent / "distributed"
sys.path.insert(0, str(HERE))
from common import PAD_ID, batches, small_config, torchrun  # noqa: E402

STEPS = 3
BIAS = ("--model.moe.balance=bias",)  # the aux-loss-free balance bias: updated after DeepSpeed's step
# 4 local micro-batches over 2 ranks: DeepSpeed's accumulation runs (2 per rank per step)
ACCUM = ("--train.batch_size=8",)
PARAM_TOL = 1e-6  # one local micro-batch: measured 1.2e-7 (see the module docstring)
# two local micro-batches: the fp32 gradient sums run in another order than one process's (as with
# DDP, 6.4e-7 in the aux-loss config); a near-cancelling element then moves by a few % of the
# learning rate (2.5e-4; one of layers.0.attn.wo: 5.8e-6, every other leaf within 3.7e-7, measured
# when the norm was summed in fp32). With fp64 norms: 2.1e-7 with this file run alone, 4.6e-6
# within the whole suite, run serially
PARAM_TOL_ACCUM = 2e-5


@functools.cache
def _run(strategy: str, ranks: int, out: str, *args: str, steps: int = STEPS) -> dict:
    """Run tests/distributed/zero_worker.py at ``ranks`` processes; its outputs (the JSON, the
    final whole state ``final`` and any ``-at<step>`` dump) as a dict."""
    torchrun([str(HERE / "zero_worker.py"), strategy, out, str(steps), *args], ranks)
    tag = next((a.removeprefix("tag=") for a in args if a.startswith("tag=")), None)
    name = f"{strategy}-w{ranks}" + (f"-{tag}" if tag else "")
    result = json.loads((Path(out) / f"{name}.json").read_text())
    result["final"] = load_file(str(Path(out) / f"{name}.safetensors"))
    for f in Path(out).glob(f"{name}-at*.safetensors"):
        result[f.stem.removeprefix(name + "-")] = load_file(str(f))
    return result


@functools.cache
def _pure(*overrides: str, steps: int = STEPS) -> tuple[dict[str, torch.Tensor], list[dict], float]:
    """One process, the pure step with grad_accum = 2: (final state flat, metrics per step, eval
    loss on the first batch)."""
    cfg = small_config(overrides=list(overrides))
    state, step, hp = init_train_state(cfg), make_train_step(cfg, PAD_ID), default_hp(cfg.train)
    records = []
    for b in batches(cfg, steps):
        state, m = step(state, b, hp)
        records.append({k: float(m[k]) for k in ("loss", "grad_norm")})
    ev = eval_step(state["params"], batches(cfg, 1)[0], cfg=cfg, pad_id=PAD_ID, knobs=state["knobs"])
    return tree.flatten(state), records, float(ev["loss"])


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("zero"))


def _diff(a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _check_close_to_pure(run: dict, overrides: tuple[str, ...] = BIAS, param_tol: float = PARAM_TOL) -> None:
    ref, ref_steps, ref_eval = _pure(*overrides)
    got = run["final"]
    assert int(got["updates"]) == STEPS
    assert _diff(got, ref, "params.") < param_tol
    assert _diff(got, ref, "opt.m.") < 1e-7 and _diff(got, ref, "opt.v.") < 1e-8
    steps = [s for s in run["steps"] if not s.get("rolled_back")]
    assert len(steps) == STEPS and not any(s["skipped"] for s in steps)
    for s, r in zip(steps, ref_steps, strict=True):
        assert s["loss"] == pytest.approx(r["loss"], rel=1e-6)
        # both fp64 sums of squares, of gradients that differ in the last bits: 6.9e-8 measured
        assert s["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    assert run["eval_loss"] == pytest.approx(ref_eval, rel=1e-6)


def _check_against_deepspeeds_accessors(run: dict) -> None:
    """The engine reads DeepSpeed's partitions through its own views; DeepSpeed's safe_get_full_*
    (and, ZeRO-3, safe_get_local_*) accessors give the same tensors bit for bit."""
    check = run["crosscheck"]
    assert check["leaves"] == 27 and check["full_mismatch"] == [] and check["local_mismatch"] == []


def _check_replayed(run: dict, step: int) -> None:
    """The step run before the rollback and its replay after ``adopt`` saw the same model."""
    first, replayed = (s for s in run["steps"] if s["step"] == step)
    assert first["rolled_back"] and not replayed.get("rolled_back")
    assert (first["loss"], first["grad_norm"]) == (replayed["loss"], replayed["grad_norm"])


def _check_loads_in_one_process(run: dict, strategy: str, out: str, overrides: tuple[str, ...]) -> None:
    """The step-2 checkpoint the run wrote (each rank's flat range of every master and moment)
    read by one process: the single-process names and dtypes, every tensor as the run held it."""
    path = checkpoint.latest(Path(out) / f"ckpt-{strategy}-w2")
    loaded, meta = load_checkpoint(path)
    check_compatible(loaded, init_train_state(small_config(overrides=list(overrides))), path)
    assert meta["step"] == 2 and meta["world_size"] == 2
    flat = tree.flatten(loaded)
    assert all(torch.equal(flat[k], v.reshape(flat[k].shape)) for k, v in run["at2"].items())
    index = meta["tensors"]
    files = {k: {c["file"] for c in s["chunks"]} for k, s in index.items() if k.startswith("opt.m.")}
    split = {k for k, f in files.items() if len(f) == 2}
    if strategy == "zero3":  # every leaf partitioned on its own
        assert split == set(files)
    else:  # the flattened groups are split: most leaves lie in one rank's half, some straddle
        assert 0 < len(split) < len(files)


@pytest.mark.slow  # 2 launches, ~50 s on 2 cores; CI runs ZeRO-3 (the stage that partitions the most)
def test_zero1_and_zero2_match_one_process_and_each_other_through_a_rollback(out):
    """ZeRO-2 (with a checkpoint at step 2, read back by one process); ZeRO-1 built by
    ``make_engine``, with a rollback: after step 1 a snapshot, step 2, adopt, step 2 again. The
    replayed step and the end state equal the straight ZeRO-2 run bit for bit (stages 1 and 2 reduce
    and step the same partitions)."""
    zero2 = _run("zero2", 2, out, *BIAS, "save=2", "crosscheck=1")
    _check_close_to_pure(zero2)
    _check_loads_in_one_process(zero2, "zero2", out, BIAS)
    _check_against_deepspeeds_accessors(zero2)
    zero1 = _run("zero1", 2, out, *BIAS, "rollback=1", "engine=make")
    _check_close_to_pure(zero1)
    _check_replayed(zero1, step=2)
    assert _same(zero1["final"], zero2["final"])


def test_zero3_matches_one_process_and_resumes_and_rolls_back_exactly(out):
    """Matrices partitioned (gathered per layer), small leaves kept gathered (persist=1000); two
    local micro-batches per rank (DeepSpeed's accumulation). The step-2 checkpoint loads in one
    process; loaded at 2 ranks, then snapshot, step 3, adopt, step 3
    again: every tensor equals the straight run's."""
    overrides = (*BIAS, *ACCUM)
    straight = _run("zero3", 2, out, *overrides, "save=2", "crosscheck=1")
    _check_close_to_pure(straight, overrides, PARAM_TOL_ACCUM)
    _check_loads_in_one_process(straight, "zero3", out, overrides)
    _check_against_deepspeeds_accessors(straight)
    ckpt = checkpoint.latest(Path(out) / "ckpt-zero3-w2")
    resumed = _run("zero3", 2, out, *overrides, f"load={ckpt}", "rollback=2", "nan=1", "tag=resumed", steps=1)
    assert _same(resumed["at2"], straight["at2"])  # masters, moments, counters as saved
    assert _same(resumed["final"], straight["final"])
    _check_replayed(resumed, step=3)
    # then a NaN in a weight (lumina.inject's nan_grad, made live by adopt): DeepSpeed skips the
    # step (the fp32 single-process step would apply it): the step counter and the RNG key advance,
    # no weight, moment or balance bias changes, ``updates`` stays
    nan = resumed["nan_step"]
    assert math.isnan(nan["loss"]) and nan["skipped"] == 1 and nan["updates"] == STEPS
    assert sorted(nan["changed"]) == ["rng", "step"] and nan["nan_kept"]


def _view_reference(cfg, run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    """``lumina.distributed.step`` at one process (a 1-rank gloo group in this process) over the
    plain module view; saves a checkpoint after step 1; returns the final state flat."""
    import torch.distributed as dist

    from lumina.distributed.step import dist_train_step
    from lumina.distributed.view import ModelView
    from lumina.optim import init_opt

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a kernel's summation order may depend on it
    try:
        state = init_train_state(cfg)
        view = ModelView(state["params"], cfg.model, COMPUTE_DTYPES[cfg.train.precision])
        state = state.exclude("params")
        state["opt"] = init_opt(view.params().apply(lambda p: p.detach()), cfg.train.optimizer)
        hp = default_hp(cfg.train)
        for i, b in enumerate(batches(cfg, steps)):
            state, _ = dist_train_step(view, state, b, hp, cfg=cfg, pad_id=PAD_ID)
            if i == 0:
                flat = {"params." + k: v for k, v in tree.flatten(view.params()).items()}
                checkpoint.save_checkpoint(run_dir, flat | tree.flatten(state), step=1, config={}, data={})
        params = {"params." + k: v.detach() for k, v in tree.flatten(view.params()).items()}
        return params | tree.flatten(state)
    finally:
        torch.set_num_threads(threads)
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])  # 20 s each
def test_zero3_without_clipping_equals_the_one_process_view_step_bit_for_bit(out, tmp_path, precision):
    """Every leaf partitioned (persist=0), clip_norm=0; started from a one-process checkpoint of
    step 1 (1 -> 2 ranks), steps 2 and 3 equal the module-view step at one process bit for bit, in
    bf16 too (the view casts the fp32 masters in the forward; DeepSpeed stays fp32). In bf16 that
    view step is itself 9.7e-4 off the pure step after 3 steps (plain autograd and torch.func round
    the bf16 gradients differently), so the pure step is no reference there. Both sides
    step through Lumina's native AdamW kernel (``lumina.optim.adamw_``: no fused multiply-adds,
    IEEE sqrt, so its vectorised body and scalar tail round alike), so DeepSpeed's flat partitions,
    which put a leaf's elements at other offsets, change no bit (with torch's fused kernel, one
    second moment differed in its last bit)."""
    overrides = (*BIAS, "--train.clip_norm=0", f"--train.precision={precision}")
    ref = _view_reference(small_config(overrides=list(overrides)), tmp_path / "one", STEPS)
    ckpt = checkpoint.latest(tmp_path / "one")
    tag = f"tag=noclip-{precision}"
    run = _run("zero3", 2, out, *overrides, f"load={ckpt}", "persist=0", tag, steps=STEPS - 1)
    loaded = tree.flatten(load_checkpoint(ckpt)[0])
    assert all(torch.equal(v.reshape(loaded[k].shape), loaded[k]) for k, v in run["at1"].items())
    got = run["final"]
    assert int(got["updates"]) == STEPS
    mismatched = [k for k, v in got.items() if not torch.equal(v.reshape(ref[k].shape), ref[k])]
    assert not mismatched, (mismatched[:3], _diff(got, ref, "params."))


@pytest.mark.slow
def test_zero3_with_cpu_offload_matches_one_process(out):
    """dist.offload=cpu: fp32 masters and moments in host memory, stepped by DeepSpeedCPUAdam (its
    C++ kernel JIT-builds once: ~2.5 min on 2 cores, then cached). Its own AdamW rounding: parameters
    within 1.2e-7 of one process, as without offload. A rollback through the offloaded state
    replays its step exactly."""
    run = _run("zero3", 2, out, *BIAS, "--dist.offload=cpu", "rollback=1", "tag=offload")
    _check_close_to_pure(run)
    _check_replayed(run, step=2)
