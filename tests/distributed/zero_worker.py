"""Run under torchrun: N steps of a small config through the DeepSpeed ZeRO engine (the ``Engine``
interface the driver calls), then rank 0 writes the whole parameters and moments (safetensors,
from ``engine.full_state``) and the per-step metrics (JSON) for tests/test_zero.py.

Usage: torchrun --nproc_per_node=N tests/distributed/zero_worker.py STRATEGY OUT_DIR STEPS [ARG ...]
(outputs named STRATEGY-wN[-TAG]). ARGs: config overrides (--a.b=c); ``tag=T``: name suffix;
``persist=N``: ZeRO-3 keeps leaves under N elements gathered (default 1000: the norms and small
routers stay gathered, the matrices are partitioned); ``save=S``: after step S write a checkpoint of
``engine.checkpoint_tensors`` to OUT_DIR/ckpt-<name> and the whole state at that point;
``load=DIR``: start from that checkpoint (any world size; the state right after loading is written
too, as <name>-at<step>); ``rollback=S``: snapshot after step S (or at the start, when loading
step S), run step S+1, adopt the snapshot, and run on (step S+1 runs twice; the outputs must equal a
straight run's); ``engine=make``: build through ``make_engine`` (DeepSpeed's defaults); ``nan=1``:
after the outputs, inject a NaN into the final norm's weight and run one more step (its metrics and
the leaves it changed go to the JSON as ``nan_step``); ``crosscheck=1``: compare the engine's whole
and per-rank tensors with DeepSpeed's ``safe_get_*`` accessors (JSON ``crosscheck``). The JSON
also holds ``eval_step``'s loss on the first global batch after the last step."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tensordict import TensorDict

from lumina import tree
from lumina.checkpoint import load_checkpoint, save_checkpoint
from lumina.distributed.engines import init_from_env, make_engine
from lumina.distributed.zero import ZeroEngine
from lumina.optim import default_hp
from lumina.step import init_train_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAD_ID, batches, small_config  # noqa: E402


def _local(batch: TensorDict, rank: int, world: int) -> TensorDict:
    rows = batch["inputs"].shape[0] // world
    return TensorDict({k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}, batch_size=[])


def _dump(engine, state, path: Path, rank: int) -> None:
    full = tree.flatten(engine.full_state(state))
    if rank == 0:
        keep = {k: v.contiguous() for k, v in full.items() if k.startswith(("params.", "opt."))}
        save_file(keep | {"updates": full["updates"].reshape(1)}, str(path))


def _nan_step(engine, state, batch, hp) -> dict:
    """What lumina.inject's nan_grad does (a NaN written into the final norm's weight of the whole
    state, made live through ``adopt``), then one step: DeepSpeed finds the gradients non-finite
    and skips it. Returns the step's metrics and the leaves it changed (NaN-aware)."""
    full = engine.full_state(state)
    w = full["params", "final_norm", "weight"].clone()
    w[0] = math.nan
    full["params", "final_norm", "weight"] = w
    state = engine.adopt(full)
    before = tree.flatten(engine.full_state(state))
    state, m = engine.step(state, batch, hp)
    after = tree.flatten(engine.full_state(state))
    changed = [k for k in before if not torch.equal(before[k].nan_to_num(), after[k].nan_to_num())]
    return {"loss": float(m["loss"]), "skipped": float(m["skipped"]), "updates": int(state["updates"])} | {
        "changed": changed,
        "nan_kept": bool(after["params.final_norm.weight"][0].isnan()),
    }


def _crosscheck(engine, state) -> dict:
    """The engine's whole and per-rank tensors against DeepSpeed's own accessors on the live state:
    ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (every stage; collective) and,
    for ZeRO-3, ``safe_get_local_fp32_param`` / ``safe_get_local_optimizer_state``. Returns the
    names that differ (empty lists when all agree bit for bit) and how many were compared."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_get_local_fp32_param,
        safe_get_local_optimizer_state,
    )

    full = tree.flatten(engine.full_state(state))
    flat = tree.flatten(state)
    full_bad, local_bad = [], []
    for leaf in engine.leaves:
        p = leaf.param
        theirs = {
            "params.": safe_get_full_fp32_param(p),
            "opt.m.": safe_get_full_optimizer_state(p, "exp_avg"),
            "opt.v.": safe_get_full_optimizer_state(p, "exp_avg_sq"),
        }
        full_bad += [
            k + leaf.name
            for k, t in theirs.items()
            if not torch.equal(t.reshape(leaf.shape), full[k + leaf.name])
        ]
        if engine.stage == 3:
            local = {
                "params.": safe_get_local_fp32_param(p),
                "opt.m.": safe_get_local_optimizer_state(p, "exp_avg"),
                "opt.v.": safe_get_local_optimizer_state(p, "exp_avg_sq"),
            }
            local_bad += [
                k + leaf.name for k, t in local.items() if not torch.equal(t[: leaf.n], flat[k + leaf.name])
            ]
    return {"full_mismatch": full_bad, "local_mismatch": local_bad, "leaves": len(engine.leaves)}


def main() -> None:
    strategy, out, steps, args = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    opts = dict(a.split("=", 1) for a in args if not a.startswith("--") and "=" in a)
    overrides = [a for a in args if a.startswith("--")] + [f"--dist.strategy={strategy}"]
    env = init_from_env("cpu")
    torch.set_num_threads(1)
    rank, world = env.rank, env.world_size
    name = f"{strategy}-w{world}" + (f"-{opts['tag']}" if "tag" in opts else "")
    out.mkdir(parents=True, exist_ok=True)
    cfg = small_config(overrides=overrides)
    if "load" in opts:
        full, meta = load_checkpoint(opts["load"])
        done = meta["step"]
    else:
        full, done = init_train_state(cfg), 0
    t0 = time.perf_counter()
    if opts.get("engine") == "make":
        engine = make_engine(cfg, env, full, PAD_ID)
    else:
        engine = ZeroEngine(
            cfg, env, full, PAD_ID, stage3_param_persistence_threshold=int(opts.get("persist", 1000))
        )
    init_s = time.perf_counter() - t0
    state, hp = engine.state, default_hp(cfg.train)
    records, todo = [], batches(cfg, done + steps)[done:]
    save_at, rollback_at = int(opts.get("save", -1)), int(opts.get("rollback", -1))
    i, snap = 0, None
    if "load" in opts:  # what the engine holds right after loading
        _dump(engine, state, out / f"{name}-at{done}.safetensors", rank)
    if done == rollback_at:
        snap = engine.snapshot(state)
    while i < len(todo):
        step_no = done + i + 1
        state, m = engine.step(state, _local(todo[i], rank, world), hp)
        records.append(
            {k: float(m[k]) for k in ("loss", "aux_loss", "grad_norm", "skipped")} | {"step": step_no}
        )
        if step_no == save_at:
            save_checkpoint(
                out / f"ckpt-{name}", engine.checkpoint_tensors(state), step=step_no, config={}, data={}
            )
            _dump(engine, state, out / f"{name}-at{step_no}.safetensors", rank)
        if step_no == rollback_at and snap is None:
            snap = engine.snapshot(state)
        elif step_no == rollback_at + 1 and isinstance(snap, TensorDict):
            state = engine.adopt(snap)  # back to after step ``rollback_at``: replay the next step
            records[-1]["rolled_back"] = True
            snap = False
            continue
        i += 1
    _dump(engine, state, out / f"{name}.safetensors", rank)
    ev = engine.eval_step(state, batches(cfg, 1)[0])  # every rank evaluates the whole batch
    result = {"steps": records, "init_s": init_s, "eval_loss": float(ev["loss"])}
    if "crosscheck" in opts:
        result["crosscheck"] = _crosscheck(engine, state)
    if "nan" in opts:
        result["nan_step"] = _nan_step(
            engine, state, _local(batches(cfg, done + steps + 1)[-1], rank, world), hp
        )
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
