"""Training on several devices (in progress): a module view of the parameter tree for the engines
(FSDP2, DDP; DeepSpeed next), the data-parallel train step over it with plain autograd, and sharded
checkpoints.

Done so far:
- ``engines``: ``init_from_env`` from torchrun's variables; ``wrap(view, "ddp" | "fsdp")``.
- ``view.ModelView``: one ``nn.Module`` per layer plus the root, running the model's own pure
  functions.
- ``step.dist_train_step``: W ranks x A/W micro-batches == one process with ``grad_accum = A``.
  ``tests/test_distributed.py`` runs it at 2 gloo ranks under torchrun: DDP is bit-identical; FSDP2
  is bit-identical with clipping off and within 1e-6 with it on.
- ``shards``: a safetensors file per rank plus a msgpack index, loading at any world size. A 2-rank
  FSDP run resumed from one is bit-identical to a straight run.

Not yet: the driver and CLI (``--dist``), the orchestrator in lockstep, DeepSpeed ZeRO.
"""

from lumina.distributed.engines import DistEnv, init_from_env, under_torchrun, wrap
from lumina.distributed.step import dist_train_step, load_params_into
from lumina.distributed.view import ModelView

__all__ = [
    "DistEnv",
    "ModelView",
    "dist_train_step",
    "init_from_env",
    "load_params_into",
    "under_torchrun",
    "wrap",
]
