"""The driver on several ranks (``dist.strategy`` other than none, under torchrun): joining the
process group, the one run folder, and keeping every rank's control flow in lockstep.

Every rank runs the same driver. What could make ranks take different branches is made identical
by a collective first, and nothing here ever pickles (numbers only: ``all_reduce`` / ``all_gather``
of small tensors):
- the run folder: rank 0 picks it (``runs/<name>-N``) and broadcasts N;
- the resolved config: its digest is compared across ranks before anything is built;
- the step's outcome flags (an out-of-memory error on any rank, an interrupt on any rank) are
  all-reduced, so all ranks skip, shrink or stop together;
- the train record's step time and memory are maxima over ranks (its loss, token count and
  gradient norm come reduced from the step), so every rank's observation is the same;
- the orchestrator's decisions: every rank decides from that observation and an 8-byte digest of
  the decisions is all-gathered; a mismatch stops the run with one line.

Only rank 0 writes the run's files (metrics, TensorBoard, orchestrator logs, config.json, report,
registry); checkpoints are written by all ranks together (``lumina.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lumina.config import ConfigError, RunConfig, to_dict
from lumina.distributed.engines import DistEnv, init_from_env, under_torchrun

__all__ = [
    "LockstepError",
    "NullLogs",
    "agree",
    "any_flag",
    "config_payload",
    "defer_interrupts",
    "digest",
    "fit_micro_batch",
    "local_mb",
    "max_over_ranks",
    "null_out",
    "shared_run_dir",
    "start",
]


class LockstepError(RuntimeError):
    """Ranks disagree about something they must agree on; the message is one line."""


def start(cfg: RunConfig) -> DistEnv | None:
    """Join the process group when ``cfg.dist.strategy`` asks for one; None for a one-process run.
    Refuses a strategy without torchrun, and torchrun's several processes without a strategy."""
    strategy = cfg.dist.strategy
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "none":
        if world > 1:
            raise ConfigError(
                f"started by torchrun with {world} processes but dist.strategy=none: "
                "pass --dist ddp|fsdp|zero1|zero2|zero3 (or run one process)"
            )
        return None
    if not under_torchrun():
        raise ConfigError(
            f"--dist {strategy} needs torchrun: "
            f"torchrun --nproc_per_node=N -m lumina.run --dist {strategy} ..."
        )
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return init_from_env(device.split(":")[0])


def fit_micro_batch(cfg: RunConfig, env: DistEnv | None) -> tuple[RunConfig, str | None]:
    """``cfg`` with a micro-batch that splits the global batch evenly over the ranks: when
    ``grad_accum`` does not divide by W, the largest micro-batch no larger than the configured one
    that does (the debug preset's one micro-batch of 8 becomes 2 x 4 on 2 ranks); a note saying so."""
    if env is None:
        return cfg, None
    t, W = cfg.train, env.world_size
    if t.grad_accum % W == 0:
        return cfg, None
    fits = [
        m for m in range(t.micro_batch_size, 0, -1) if t.batch_size % m == 0 and (t.batch_size // m) % W == 0
    ]
    if not fits:
        raise ConfigError(
            f"train.batch_size={t.batch_size} cannot be split into micro-batches over {W} ranks"
        )
    new = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=fits[0]))
    note = (
        f"train.micro_batch_size {t.micro_batch_size} -> {fits[0]}: {new.train.grad_accum} micro-batches "
        f"of the global batch {t.batch_size} split over {W} ranks"
    )
    return new, note


def _device_of(env: DistEnv) -> torch.device:
    return env.device if env.device.type == "cuda" else torch.device("cpu")


def digest(payload: Any) -> int:
    """8 bytes of blake2b over the JSON of ``payload``, as a signed int64."""
    raw = json.dumps(payload, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def agree(env: DistEnv | None, payload: Any, what: str) -> None:
    """Raise ``LockstepError`` unless every rank passes the same ``payload`` (compared by digest)."""
    if env is None:
        return
    mine = torch.tensor([digest(payload)], dtype=torch.int64, device=_device_of(env))
    every = [torch.empty_like(mine) for _ in range(env.world_size)]
    dist.all_gather(every, mine)
    values = [int(t.item()) for t in every]
    if len(set(values)) > 1:
        odd = [r for r, v in enumerate(values) if v != values[0]]
        raise LockstepError(f"ranks disagree on {what}: rank(s) {odd} differ from rank 0")


def any_flag(env: DistEnv | None, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one collective)."""
    if env is None:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=_device_of(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def max_over_ranks(env: DistEnv | None, *values: float) -> list[float]:
    """Each value's maximum over all ranks (one collective)."""
    if env is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device_of(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def shared_run_dir(env: DistEnv, pick) -> Path:
    """The run folder rank 0 picks with ``pick()`` (a fresh ``runs/<name>[-N]``), known to all ranks:
    rank 0 broadcasts the folder's name as bytes in a fixed-size int tensor."""
    path = pick() if env.is_main else None
    raw = str(path).encode() if path is not None else b""
    size = torch.tensor([len(raw)], dtype=torch.int64, device=_device_of(env))
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=_device_of(env))
    if env.is_main:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return Path(bytes(buf.cpu().tolist()).decode())


def config_payload(cfg: RunConfig) -> dict[str, Any]:
    return to_dict(cfg)


def local_mb(state) -> float:
    """MiB of train state this rank holds: its shards of DTensor leaves, plain leaves whole."""
    from lumina import tree

    total = 0
    for t in tree.flatten(state).values():
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total / 2**20


def defer_interrupts(run) -> Callable[[], None]:
    """A Ctrl-C (SIGINT) or SIGTERM is only noted; the run stops at the next step boundary
    (``lumina.driver.stepping``), after the step it was in has been evaluated, observed and its
    decisions applied, and the interrupted run saves its checkpoint there, so a resume continues as
    the run would have. Under torchrun (which passes SIGINT on to every worker) the ranks note it at
    different moments and stop together. In one process a second signal stops at once (a
    ``KeyboardInterrupt`` where it lands). Returns what puts the previous handlers back
    (``lumina.loop.train`` calls it once the final checkpoint is written, and raises a signal noted
    in the last step then). A signal the process ignores stays ignored; outside the main thread,
    where Python installs no handlers, nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def note(signum, frame):
        if run.interrupt_requested and run.env is None:
            raise KeyboardInterrupt
        first, run.interrupt_requested = not run.interrupt_requested, True
        if first and run.is_main:  # (os.write: a signal may land mid-print)
            again = "; again to stop at once" if run.env is None else ""
            line = f"\n[lumina] {signal.Signals(signum).name}: stopping after this step{again}\n"
            with contextlib.suppress(OSError):  # (stderr gone, e.g. a pipe closed by the same Ctrl-C)
                os.write(2, line.encode())

    # a signal the process ignores stays ignored (a job started with `&` from a script ignores SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: h for sig, h in previous.items() if h is not signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, note)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    return restore


class NullLogs:
    """What ranks other than 0 write to: nothing (rank 0 keeps the run's logs)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def event(self, step: int, what: str, detail: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def null_out():
    """The console of ranks other than 0 (their progress would repeat rank 0's)."""
    return open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
