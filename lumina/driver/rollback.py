"""Rollback, in one place: the snapshot ring, where a rollback restores from, and the data rule.

The orchestrator (pure) decides *that* the run rolls back and *to which step* (the newest healthy
snapshot it has booked, ``lumina.orchestrator.policy``); this module executes it:

- **The ring** holds copies of healthy states (params, moments, knobs, RNG, data position) with the
  config they ran under, at the steps the orchestrator books (``ostate.snapshots`` and the one
  pending confirmation); ``sync`` keeps exactly those. It decides only *where* each copy lives:
  in memory (on the state's device) within a byte budget (``orchestrator.snapshot_mb``, default
  ``snapshot_memory`` x the run's memory limit), else spilled to ``run_dir/.snapshots/``.
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
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from lumina import checkpoint, shards, tree
from lumina.config import RunConfig, from_dict
from lumina.orchestrator import Decision

__all__ = ["FROM_CHECKPOINT", "Snapshot", "SnapshotRing", "restore_state", "rolled_back", "state_bytes"]

FROM_CHECKPOINT = "checkpoint "  # how ``restore_state`` names a source that is a checkpoint (full tensors)


class Snapshot:
    """One kept state: in memory (a copy on the state's device) or spilled (a safetensors file)."""

    __slots__ = ("cfg", "folder", "index", "keys", "nbytes", "state")

    def __init__(self, cfg: RunConfig, nbytes: int, *, state=None, folder=None, index=None, keys=()):
        self.cfg, self.nbytes = cfg, nbytes
        self.state: TensorDict | None = state  # in memory
        self.folder: Path | None = folder  # spilled: the folder holding shard_00000.safetensors
        self.index: dict[str, Any] | None = index  # lumina.shards' index of that file
        self.keys: tuple[str, ...] = tuple(keys)  # the state's key order (a compiled step guards on it)

    @property
    def where(self) -> str:
        return "memory" if self.folder is None else "disk"


def state_bytes(state: TensorDict) -> int:
    """The bytes ``state``'s tensors hold on this rank (a DTensor: its local shard)."""
    total = 0
    for t in tree.flatten(state).values():
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


class SnapshotRing:
    """Copies of healthy states keyed by step, with the config each ran under, held within a byte
    budget: a snapshot stays in memory (a copy on the state's own device: the GPU for a CUDA run)
    while the ones in memory plus it fit in ``budget_bytes``, else it is spilled to
    ``spill_dir/step_<N>/`` (one safetensors file through ``lumina.shards``, written into a hidden
    temporary folder and renamed into place, removed when the ring drops the snapshot). Where a
    snapshot lives is decided once, when it is taken; the orchestrator decides which steps are kept,
    so the storage never changes what a rollback restores (a spilled snapshot restores bit for bit).

    ``copy`` is how a state is copied: a plain clone, or a distributed engine's own (its shards,
    detached). Without ``spill_dir`` (distributed engines: their snapshots hold DTensor shards or
    engine partitions, which ``lumina.shards``' single-process writer does not take) every snapshot
    stays in memory whatever the budget."""

    def __init__(
        self,
        copy: Callable[[TensorDict], TensorDict] | None = None,
        *,
        budget_bytes: float = math.inf,
        spill_dir: Path | None = None,
    ) -> None:
        self.ring: dict[int, Snapshot] = {}
        self.seconds = 0.0  # time spent copying states into the ring (and writing spilled ones)
        self.copy = copy or (lambda s: s.clone())
        self.budget_bytes = budget_bytes
        self.spilled = 0  # snapshots written to disk so far
        self.spill_dir = spill_dir
        if spill_dir is not None:  # a crashed process's spilled snapshots are of no use to this one
            shutil.rmtree(spill_dir, ignore_errors=True)

    @property
    def memory_bytes(self) -> int:
        return sum(s.nbytes for s in self.ring.values() if s.folder is None)

    @property
    def disk_bytes(self) -> int:
        return sum(s.nbytes for s in self.ring.values() if s.folder is not None)

    def snapshot(self, step: int, state: TensorDict, cfg: RunConfig) -> None:
        t0 = time.perf_counter()
        self._drop(step)
        nbytes = state_bytes(state)
        if self.spill_dir is None or self.memory_bytes + nbytes <= self.budget_bytes:
            self.ring[step] = Snapshot(cfg, nbytes, state=self.copy(state))
        else:
            self.ring[step] = self._spill(step, state, cfg, nbytes)
            self.spilled += 1
        self.seconds += time.perf_counter() - t0

    def _spill(self, step: int, state: TensorDict, cfg: RunConfig, nbytes: int) -> Snapshot:
        root = self.spill_dir
        root.mkdir(parents=True, exist_ok=True)
        final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            flat = tree.flatten(state)
            index = shards.write_shard(tmp, flat)  # fsynced; no process group: this rank's file only
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Snapshot(cfg, nbytes, folder=final, index=index, keys=flat)

    def get(self, step: int, device: torch.device) -> tuple[TensorDict, RunConfig]:
        """A fresh copy of the snapshot at ``step`` (the ring keeps its own) and its config."""
        snap = self.ring[step]
        if snap.folder is None:
            return self.copy(snap.state), snap.cfg
        flat = shards.read_tensors(snap.folder, snap.index)
        return tree.unflatten({k: shards.owned(flat[k], device) for k in snap.keys}), snap.cfg

    def _drop(self, step: int) -> None:
        snap = self.ring.pop(step, None)
        if snap is not None and snap.folder is not None:
            shutil.rmtree(snap.folder, ignore_errors=True)

    def sync(self, keep: set[int | None], step: int, state: TensorDict, cfg: RunConfig) -> None:
        """Keep the snapshots at the steps in ``keep``; take the current state if ``step`` is one."""
        for s in [s for s in self.ring if s not in keep]:  # first: the memory they free is reusable
            self._drop(s)
        if step in keep and step not in self.ring:
            self.snapshot(step, state, cfg)

    def newest_at_or_before(self, step: int) -> int | None:
        ok = [s for s in self.ring if s <= step]
        return max(ok) if ok else None

    def close(self) -> None:
        """Drop every snapshot (the run is over): memory freed, spilled files removed."""
        for s in list(self.ring):
            self._drop(s)
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def restore_state(
    ring: SnapshotRing, run_dir: Path, to_step: int, device: torch.device
) -> tuple[TensorDict, RunConfig, str]:
    """(state, the config it ran under, where it came from) for a rollback to ``to_step``."""
    s = ring.newest_at_or_before(to_step)
    if s is not None:
        state, cfg = ring.get(s, device)
        return state, cfg, f"snapshot at step {s}"
    for ckpt in reversed(checkpoint.checkpoints(run_dir)):
        meta = checkpoint.read_meta(ckpt)
        if meta["step"] <= to_step:
            state, _ = checkpoint.load_checkpoint(ckpt, device=str(device))
            return state, from_dict(RunConfig, meta["config"]), f"{FROM_CHECKPOINT}{ckpt.name}"
    s = min(ring.ring)
    state, cfg = ring.get(s, device)
    return state, cfg, f"snapshot at step {s} (nothing older is kept)"


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
