"""Starting the process group from torchrun's environment, and the engines the driver trains through.

    torchrun --nproc_per_node=2 -m lumina.run --dist fsdp      # the driver does what follows

``init_from_env`` reads torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts
gloo on CPU or nccl on CUDA, one device per local rank. ``make_engine`` hands the run's train state
to the engine of ``dist.strategy``; the driver then calls only the ``Engine`` interface below, on
every rank, in the same order:

- ``state``: the engine's run state: the single-process train-state tree whose ``params`` (and
  moments) are the engine's own leaves — full tensors under DDP, DTensor shards under FSDP2;
- ``step(state, batch, hp)``: one optimizer step on this rank's micro-batches (``lumina.distributed.
  step``'s semantics: W ranks x A/W micro-batches == one process with ``grad_accum = A``);
- ``eval_step(state, batch)``: loss / accuracy / tokens of a whole held-out batch, the same on every
  rank (each rank evaluates every batch: the FSDP forward is collective anyway);
- ``checkpoint_tensors(state)``: the flat tensors a checkpoint holds, under the single-process names
  (``lumina.shards`` writes each rank's part), so checkpoints move between world sizes;
- ``snapshot(state)`` / ``adopt(state)``: a detached copy for the rollback ring, and making such a
  copy (or a state the fault injector changed) the live one;
- ``full_state(state)``: the whole train state on every rank (collective), for changes of shape.

Engines:
- ``ddp``: ``torch.distributed._composable.replicate`` over the module view; gradients all-reduced
  (averaged) during the backward;
- ``fsdp``: FSDP2's ``fully_shard`` on every layer module, then the root; parameters, gradients and
  the AdamW moments are DTensor shards on dim 0;
- ``zero1`` / ``zero2`` / ``zero3``: DeepSpeed (``lumina.distributed.zero``), when present.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import torch
import torch.distributed as dist
from tensordict import TensorDict

from lumina import optim, tree
from lumina.config import ConfigError, RunConfig
from lumina.distributed.view import ModelView
from lumina.shards import Piece, assign, copy_into, is_dtensor, local_rows, placed_like, whole

__all__ = [
    "STRATEGIES",
    "DistEnv",
    "Engine",
    "ViewEngine",
    "eval_through",
    "init_from_env",
    "make_engine",
    "under_torchrun",
    "wrap",
]

STRATEGIES = ("ddp", "fsdp")  # the engines of torch itself; zero1..3 come from DeepSpeed


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_from_env(device_type: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (once; later calls return the same description).
    ``device_type``: "cpu" (gloo) or "cuda" (nccl, device = the local rank); default: cuda when
    present."""
    if not under_torchrun():
        raise RuntimeError("not started by torchrun: run `torchrun --nproc_per_node=N ...`")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def wrap(
    view: ModelView, strategy: str, *, reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
) -> ModelView:  # fmt: skip
    """Hand ``view`` to the engine of ``strategy`` (in place; returned for chaining). ``param_dtype`` /
    ``reduce_dtype``: FSDP2's mixed precision (None: the parameters' own dtype)."""
    if strategy == "ddp":
        from torch.distributed._composable.replicate import replicate

        replicate(view)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for module in view.layers:  # the unit FSDP gathers and frees: one transformer layer
            fully_shard(module, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        fully_shard(view, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    else:
        raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    return view


class Engine(Protocol):
    """What the driver calls on every rank (see the module docstring)."""

    strategy: str
    state: TensorDict

    def step(self, state: TensorDict, batch: TensorDict, hp: TensorDict) -> tuple[TensorDict, TensorDict]: ...

    def eval_step(self, state: TensorDict, batch: TensorDict) -> TensorDict: ...

    def checkpoint_tensors(self, state: TensorDict) -> dict[str, torch.Tensor | Piece]: ...

    def snapshot(self, state: TensorDict) -> TensorDict: ...

    def adopt(self, state: TensorDict) -> TensorDict: ...

    def full_state(self, state: TensorDict) -> TensorDict: ...


@torch.no_grad()
def eval_through(module, state: TensorDict, batch: TensorDict, cfg: RunConfig, pad_id: int) -> TensorDict:
    """``lumina.step.eval_step``'s figures for one held-out batch, through ``module`` (a wrapped
    ``ModelView``, or DeepSpeed's engine around one): every engine evaluates the same way."""
    from lumina.step import head_loss

    targets = batch["targets"]
    (ce_sum, correct), _ = module(
        batch["inputs"],
        state["knobs"],
        train=False,
        fp8=cfg.train.precision == "fp8",
        head_fn=lambda root, x: head_loss(root, x, targets, cfg, pad_id, differentiable=False),
    )
    n = (targets != pad_id).sum().clamp(min=1)
    loss = ce_sum / n
    return TensorDict({"loss": loss, "ppl": loss.exp(), "accuracy": correct / n, "tokens": n}, batch_size=[])


def _like(target: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``src`` in ``target``'s layout: itself when it already is a DTensor or both are plain;
    else this rank's rows of the full ``src`` as a DTensor placed like ``target`` (no collective:
    every rank holds the full tensor)."""
    if is_dtensor(src) or not is_dtensor(target):
        return src.detach().clone()
    return placed_like(local_rows(src, target).detach().clone().to(target.to_local().device), target)


class ViewEngine:
    """DDP or FSDP2 over a ``ModelView``, with Lumina's own clipping and AdamW on the gradients the
    engine leaves (``lumina.distributed.step``)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, full: TensorDict, pad_id: int):
        from lumina.step import COMPUTE_DTYPES

        if cfg.train.optimizer == "adamw8bit" and cfg.dist.strategy == "fsdp":
            # its absmax blocks run over the flattened parameter; FSDP's row shards do not align
            raise ConfigError("train.optimizer=adamw8bit with dist.strategy=fsdp: not supported; use ddp")
        self.strategy, self.cfg, self.env, self.pad_id = cfg.dist.strategy, cfg, env, pad_id
        full = full.to(env.device)
        # the MoE balance bias is set by a rule after the step, never by a gradient: DDP's reducer
        # would wait for its gradient forever (DeepSpeed keeps it trainable: zero.py)
        self.view = ModelView(
            full["params"], cfg.model, COMPUTE_DTYPES[cfg.train.precision], frozen=frozenset({"balance_bias"})
        )
        if cfg.train.compile:  # per layer, before the engine wraps it (torchtitan's order)
            for module in self.view.layers:
                module.compile(fullgraph=True)
        dtypes = {"fp32": None, "bf16": torch.bfloat16}  # None: as stored (fp32 masters)
        wrap(
            self.view, self.strategy, reshard_after_forward=cfg.dist.reshard_after_forward,
            param_dtype=dtypes[cfg.dist.param_dtype], reduce_dtype=dtypes[cfg.dist.reduce_dtype],
        )  # fmt: skip
        live = self.view.params()
        opt = optim.init_opt(live.apply(lambda p: p.detach()), cfg.train.optimizer)  # DTensors under FSDP
        flat_opt, full_opt = tree.flatten(opt), tree.flatten(full["opt"])
        for k, leaf in flat_opt.items():
            copy_into(leaf, full_opt[k])
        state = full.exclude("params", "opt")
        state["params"], state["opt"] = live, tree.unflatten(flat_opt)
        self.state = state

    def step(self, state: TensorDict, batch: TensorDict, hp: TensorDict) -> tuple[TensorDict, TensorDict]:
        from lumina.distributed.step import dist_train_step

        new, metrics = dist_train_step(
            self.view, state.exclude("params"), batch, hp, cfg=self.cfg, pad_id=self.pad_id
        )
        new["params"] = self.view.params()
        self.state = new
        return new, metrics

    def eval_step(self, state: TensorDict, batch: TensorDict) -> TensorDict:
        return eval_through(self.view, state, batch, self.cfg, self.pad_id)

    def checkpoint_tensors(self, state: TensorDict) -> dict[str, torch.Tensor | Piece]:
        return tree.flatten(state)  # full tensors and dim-0 DTensor shards: lumina.shards reads both

    def snapshot(self, state: TensorDict) -> TensorDict:
        return state.apply(lambda t: t.detach().clone())

    def adopt(self, state: TensorDict) -> TensorDict:
        """Make ``state`` the live one: its parameters copied into the view's leaves, its other
        tensors in this engine's layout. ``state`` may hold this engine's shards (a snapshot) or
        full tensors (a state a fault rewrote, ``full_state``)."""
        live, src = tree.flatten(self.state), tree.flatten(state)
        out = {}
        for k, target in live.items():
            if k.startswith("params."):
                assign(target, src[k])
                out[k] = target
            else:
                out[k] = _like(target, src[k])
        self.state = tree.unflatten(out)
        return self.state

    def full_state(self, state: TensorDict) -> TensorDict:
        return tree.unflatten({k: whole(v).detach().clone() for k, v in tree.flatten(state).items()})


def make_engine(cfg: RunConfig, env: DistEnv, full: TensorDict, pad_id: int) -> Engine:
    """The engine of ``cfg.dist.strategy`` over the full train state ``full`` (fresh or loaded)."""
    if cfg.train.grad_accum % env.world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / micro_batch_size={cfg.train.micro_batch_size} = "
            f"{cfg.train.grad_accum} micro-batches cannot be split over {env.world_size} ranks"
        )
    if cfg.model.quant != "none" or cfg.train.lora.enabled:
        raise ConfigError(
            f"model.quant / train.lora with dist.strategy={cfg.dist.strategy}: adapters on a frozen base "
            "train on one device for now"
        )
    if cfg.train.precision == "fp16" and cfg.dist.strategy in STRATEGIES:
        raise ConfigError(
            f"train.precision=fp16 with dist.strategy={cfg.dist.strategy}: dynamic loss scaling is not "
            "in the distributed step yet; use bf16"
        )
    if cfg.dist.strategy in STRATEGIES:
        return ViewEngine(cfg, env, full, pad_id)
    from lumina.distributed import zero  # DeepSpeed: imported only when asked for

    return zero.ZeroEngine(cfg, env, full, pad_id)
