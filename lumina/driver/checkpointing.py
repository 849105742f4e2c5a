"""When the driver saves: every ``train.ckpt_every`` steps, ``best`` whenever an evaluation improves,
and once at the end (or on an interrupt). The checkpoint's ``extra`` gathers the bookkeeping of
every part that must survive a restart (``checkpoint_extra()`` of each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lumina import checkpoint
from lumina.config import to_dict
from lumina.driver.evaluation import EvalResult
from lumina.driver.prepare import Run

__all__ = ["Checkpointer"]


class _Part(Protocol):
    def checkpoint_extra(self) -> dict[str, Any]: ...


class Checkpointer:
    def __init__(self, parts: list[_Part | None]):
        self.parts = [p for p in parts if p is not None]

    def save(self, run: Run, name: str | None = None) -> Path:
        extra: dict[str, Any] = {"injected": run.injector.fired}
        for part in self.parts:
            extra |= part.checkpoint_extra()
        state = run.engine.checkpoint_tensors(run.state) if run.engine is not None else run.state
        ahead = [p.name for p in checkpoint.ahead_of(run.run_dir, run.step)] if name is None else []
        path = checkpoint.save_checkpoint(
            run.run_dir, state, step=run.step, config=to_dict(run.cfg), data=run.mix_state.to_dict(),
            extra=extra, keep_last=run.cfg.train.keep_last, name=name,
        )  # fmt: skip
        if ahead:  # a rollback's abandoned steps, which the save deleted (checkpoint.save_checkpoint)
            run.logs.event(run.step, "discard", f"checkpoints of abandoned steps: {', '.join(ahead)}")
        return path

    def after_step(self, run: Run) -> None:
        every = run.cfg.train.ckpt_every
        if every and run.step % every == 0 and run.step < run.cfg.train.steps:  # the last: ``final``
            self.save(run)

    def after_eval(self, run: Run, result: EvalResult) -> None:
        if result.improved and result.step > 0:
            self.save(run, name=checkpoint.BEST)

    def final(self, run: Run) -> None:
        """The end of the run (or an interrupt): a checkpoint unless this process did no step."""
        if run.step > run.start or run.resumed_from is None:
            path = self.save(run)
            run.logs.event(run.step, "checkpoint", str(path))
