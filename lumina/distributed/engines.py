"""Starting the process group from torchrun's environment and handing a module view to an engine.

    torchrun --nproc_per_node=2 my_loop.py      # each process: init_from_env(), then wrap(view, "fsdp")

``init_from_env`` reads torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts
gloo on CPU or nccl on CUDA, one device per local rank. ``wrap`` applies an existing engine to a
``ModelView``:
- ``ddp``: ``torch.distributed._composable.replicate``; the gradients are all-reduced (averaged)
  during the backward;
- ``fsdp``: FSDP2's ``fully_shard`` on every layer module, then on the root; parameters become
  DTensor shards, and gradients are reduce-scattered (averaged).

``lumina.distributed.step.dist_train_step`` then trains over the wrapped view. Lumina's own AdamW
and clipping run on whatever gradients the engine leaves. DeepSpeed ZeRO is not here yet.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from lumina.distributed.view import ModelView

__all__ = ["STRATEGIES", "DistEnv", "init_from_env", "under_torchrun", "wrap"]

STRATEGIES = ("ddp", "fsdp")


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


def wrap(view: ModelView, strategy: str, *, reshard_after_forward: bool = True) -> ModelView:
    """Hand ``view`` to the engine of ``strategy`` (in place; returned for chaining)."""
    if strategy == "ddp":
        from torch.distributed._composable.replicate import replicate

        replicate(view)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in view.layers:  # the unit FSDP gathers and frees: one transformer layer
            fully_shard(module, reshard_after_forward=reshard_after_forward)
        fully_shard(view, reshard_after_forward=reshard_after_forward)
    else:
        raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    return view
