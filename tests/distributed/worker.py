"""Run under torchrun: N data-parallel steps of a small config with a strategy, then rank 0 writes
the parameters (safetensors) and the per-step metrics (JSON) for the test to compare with one
process. Usage: torchrun --nproc_per_node=N tests/distributed/worker.py STRATEGY OUT_DIR STEPS [ARG ...]
(the outputs are named STRATEGY-wN). ARGs: config overrides (--a.b=c); ``save``: also write a sharded
checkpoint of the whole train state to OUT_DIR/ckpt-STRATEGY-wN; ``load=DIR``: start from the
checkpoint DIR (it also skips the batches it was trained on)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tensordict import TensorDict

from lumina import tree
from lumina.checkpoint import load_checkpoint, save_checkpoint
from lumina.distributed.engines import init_from_env, wrap
from lumina.distributed.step import dist_train_step
from lumina.distributed.view import ModelView
from lumina.optim import default_hp, init_opt
from lumina.shards import copy_into
from lumina.step import COMPUTE_DTYPES, init_train_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAD_ID, batches, small_config  # noqa: E402


def main() -> None:
    strategy, out, steps, args = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    overrides = [a for a in args if a.startswith("--")]
    load = next((a.removeprefix("load=") for a in args if a.startswith("load=")), None)
    env = init_from_env("cpu")
    torch.set_num_threads(1)
    rank, world = env.rank, env.world_size
    cfg = small_config(overrides=overrides)
    state = init_train_state(cfg)
    view = ModelView(
        state["params"], cfg.model, COMPUTE_DTYPES[cfg.train.precision], frozen=frozenset({"balance_bias"})
    )
    wrap(view, strategy)
    state = state.exclude("params")
    state["opt"] = init_opt(view.params().apply(lambda p: p.detach()), cfg.train.optimizer)
    hp = default_hp(cfg.train)
    if load is not None:
        loaded, meta = load_checkpoint(load)
        full = tree.flatten(loaded)
        for k, leaf in tree.flatten(view.params()).items():
            copy_into(leaf, full["params." + k])
        for k, leaf in tree.flatten(state).items():  # moments (DTensor shards under FSDP), counters, rng
            copy_into(leaf, full[k])
        done = meta["step"]
    else:
        done = 0
    records = []
    for batch in batches(cfg, done + steps)[done:]:
        A_local = cfg.train.grad_accum // world
        rows = batch["inputs"].shape[0] // world
        local = TensorDict({k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}, batch_size=[])
        assert local["inputs"].shape[0] == A_local * cfg.train.micro_batch_size
        state, m = dist_train_step(view, state, local, hp, cfg=cfg, pad_id=PAD_ID)
        records.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])})
    if "save" in args:
        flat = {"params." + k: v for k, v in tree.flatten(view.params()).items()} | tree.flatten(state)
        save_checkpoint(out / f"ckpt-{strategy}-w{world}", flat, step=done + steps, config={}, data={})
    params = view.params()
    full = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous()
        for k, v in tree.flatten(params).items()
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(full, str(out / f"{strategy}-w{world}.safetensors"))
        (out / f"{strategy}-w{world}.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
