"""Training on several devices under torchrun: a module view of the parameter tree for the engines
(FSDP2, DDP, DeepSpeed ZeRO), the data-parallel train step over it with plain autograd, and the
``Engine`` interface the driver calls on every rank (``engines``). Checkpoints are sharded per rank
by ``lumina.checkpoint`` / ``lumina.shards`` and load at any world size.

- ``engines``: ``init_from_env`` from torchrun's variables; ``wrap(view, "ddp" | "fsdp")``;
  ``make_engine(cfg, env, state, pad_id)``.
- ``view.ModelView``: one ``nn.Module`` per layer plus the root, running the model's own pure
  functions.
- ``step.dist_train_step``: W ranks x A/W micro-batches == one process with ``grad_accum = A``.
  ``tests/test_distributed.py`` runs it at 2 gloo ranks under torchrun: DDP is bit-identical; FSDP2
  is bit-identical with clipping off and within 1e-6 with it on.
"""

from lumina.distributed.engines import DistEnv, Engine, init_from_env, make_engine, under_torchrun, wrap
from lumina.distributed.step import dist_train_step, load_params_into
from lumina.distributed.view import ModelView

__all__ = [
    "DistEnv",
    "Engine",
    "ModelView",
    "dist_train_step",
    "init_from_env",
    "load_params_into",
    "make_engine",
    "under_torchrun",
    "wrap",
]
