"""Rollback, in one place: the snapshot ring, where a rollback restores from, and the data rule.

The orchestrator (pure) decides *that* the run rolls back and *to which step* (the newest healthy
snapshot it has booked, ``lumina.orchestrator.policy``); this module executes it:

- **The ring** holds copies of healthy states (params, moments, knobs, RNG, data position) with the
  config they ran under, at the steps the orchestrator books (``ostate.snapshots`` and the one
  pending confirmation); ``sync`` keeps exactly those.
- **Where from**: the newest ring snapshot at or before the target step; else the newest of the
  run's checkpoints at or before it; else the oldest snapshot the ring has.
- **What is restored**: the state and the snapshot's *model* shapes (an expert added since is
  undone). Every other setting decided since (LR scale, micro-batch, weight decay, capacity) stays:
  what the run learned about its settings is not rolled back.
- **The data rule**: with ``skip_data`` (the policy always sets it) the data stream continues where
  it was — past the batches that led to the trouble — instead of replaying them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tensordict import TensorDict

from lumina import checkpoint
from lumina.config import RunConfig, from_dict
from lumina.orchestrator import Decision

__all__ = ["FROM_CHECKPOINT", "SnapshotRing", "restore_state", "rolled_back"]

FROM_CHECKPOINT = "checkpoint "  # how ``restore_state`` names a source that is a checkpoint (full tensors)


class SnapshotRing:
    """In-memory copies of healthy states keyed by step, with the config each ran under."""

    def __init__(self, copy: Callable[[TensorDict], TensorDict] | None = None) -> None:
        self.ring: dict[int, tuple[TensorDict, RunConfig]] = {}
        self.seconds = 0.0  # time spent copying states into the ring
        # how a state is copied: a plain clone, or a distributed engine's own (its shards, detached)
        self.copy = copy or (lambda s: s.clone())

    def snapshot(self, step: int, state: TensorDict, cfg: RunConfig) -> None:
        t0 = time.perf_counter()
        self.ring[step] = (self.copy(state), cfg)
        self.seconds += time.perf_counter() - t0

    def sync(self, keep: set[int | None], step: int, state: TensorDict, cfg: RunConfig) -> None:
        """Keep the snapshots at the steps in ``keep``; take the current state if ``step`` is one."""
        if step in keep and step not in self.ring:
            self.snapshot(step, state, cfg)
        for s in [s for s in self.ring if s not in keep]:
            del self.ring[s]

    def newest_at_or_before(self, step: int) -> int | None:
        ok = [s for s in self.ring if s <= step]
        return max(ok) if ok else None


def restore_state(
    ring: SnapshotRing, run_dir: Path, to_step: int, device: torch.device
) -> tuple[TensorDict, RunConfig, str]:
    """(state, the config it ran under, where it came from) for a rollback to ``to_step``."""
    s = ring.newest_at_or_before(to_step)
    if s is not None:
        state, cfg = ring.ring[s]
        return ring.copy(state), cfg, f"snapshot at step {s}"
    for ckpt in reversed(checkpoint.checkpoints(run_dir)):
        meta = checkpoint.read_meta(ckpt)
        if meta["step"] <= to_step:
            state, _ = checkpoint.load_checkpoint(ckpt, device=str(device))
            return state, from_dict(RunConfig, meta["config"]), f"{FROM_CHECKPOINT}{ckpt.name}"
    s = min(ring.ring)
    state, cfg = ring.ring[s]
    return ring.copy(state), cfg, f"snapshot at step {s} (nothing older is kept)"


def rolled_back(
    decision: Decision, ring: SnapshotRing, run_dir: Path, state_now: TensorDict, cfg_now: RunConfig, device
) -> tuple[TensorDict, RunConfig, str]:
    """The state and config a ``rollback`` decision leads to, and a description of its source.

    The data position is the current one when ``skip_data`` (the stream goes on past the
    offending batches), else the snapshot's own."""
    state, snap_cfg, where = restore_state(ring, run_dir, decision.args["to_step"], device)
    if decision.args.get("skip_data", True):
        state["data"] = state_now["data"].clone()
    return state, dataclasses.replace(cfg_now, model=snap_cfg.model), where
