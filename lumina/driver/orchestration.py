"""The driver's side of the orchestrator: its state and logs, the observation (built here only),
and acting on decisions between steps. Its cadence: every ``orchestrator.observe_every`` steps, at
every non-finite loss, and after an out-of-memory error."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lumina import orchestrator
from lumina.checkpoint import CheckpointError
from lumina.driver.evaluation import EvalResult
from lumina.driver.prepare import Run, mix_state_of
from lumina.driver.rollback import SnapshotRing, rolled_back
from lumina.driver.stepping import OutOfMemory
from lumina.orchestrator import Decision, Observation, Settings

__all__ = ["Orchestration", "observation", "respond_to_oom", "settings"]


def settings(run: Run) -> Settings:
    """What the orchestrator may change, as plain values (an observation's ``settings``)."""
    return Settings.of(run.cfg, run.state["knobs"])


def observation(
    run: Run, record: dict[str, Any] | None, evaluation: EvalResult | None = None, *, events=()
) -> Observation:
    """What the orchestrator sees after step ``run.step`` (``record``: its train record), or, with
    ``record=None``, instead of step ``run.step + 1`` (which did not run: an ``oom`` event)."""
    if record is None:
        return Observation(step=run.step + 1, loss=math.nan, grad_norm=math.nan, lr=run.hp["lr"].item(),
                           events=list(events), settings=settings(run))  # fmt: skip
    e = evaluation.metrics if evaluation is not None else None
    return Observation(
        step=run.step,
        loss=record["loss"],
        grad_norm=record["grad_norm"],
        lr=record["lr"],
        tokens_per_s=record["tokens_per_s"],
        memory_mb=record["memory_mb"],
        eval_loss=None if e is None else e["loss"],
        eval_losses={} if e is None else {k[5:]: v for k, v in e.items() if k.startswith("loss_")},
        expert_load=record.get("expert_load", []),
        dropped=record.get("dropped", []),
        mod_weight=record.get("mod_router_weight", []),
        mod_score_std=record.get("mod_score_std", []),
        events=list(events),
        settings=settings(run),
    )


class Orchestration:
    def __init__(self, run: Run):
        self.ocfg = run.cfg.orchestrator
        self.obs_log = run.run_dir / orchestrator.OBSERVATIONS_FILE
        self.dec_log = run.run_dir / orchestrator.DECISIONS_FILE
        saved = run.extra.get("orchestrator")
        if saved is not None:
            try:
                self.ostate = orchestrator.OrchestratorState.from_dict(saved)
            except (TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{run.run_dir}: bad orchestrator state in the checkpoint ({e})"
                ) from None
            for log_file in (self.obs_log, self.dec_log):  # steps after the checkpoint are redone
                try:
                    orchestrator.truncate_log(log_file, run.start)
                except ValueError as e:
                    raise CheckpointError(str(e)) from None
        else:
            self.ostate = orchestrator.init_state(run.start)
        for log_file in (self.obs_log, self.dec_log):  # both logs exist in every orchestrated run
            log_file.touch()
        self.ring = SnapshotRing()
        self.ring.snapshot(run.start, run.state, run.cfg)
        self.seconds = 0.0  # time spent deciding and acting (the orchestrator's cost)

    def decide(self, obs: Observation) -> list[Decision]:
        t0 = time.perf_counter()
        self.ostate, decisions = orchestrator.decide(self.ostate, obs, self.ocfg)
        self.seconds += time.perf_counter() - t0
        orchestrator.append_log(self.obs_log, [obs.to_dict()])
        orchestrator.append_log(self.dec_log, [d.to_dict() for d in decisions])
        return decisions

    def observe(self, run: Run, record: dict[str, Any], evaluation: EvalResult | None) -> list[Decision]:
        """Observe the step just taken when due; its figures join ``record``."""
        if run.step % self.ocfg.observe_every and math.isfinite(record["loss"]):
            return []
        decisions = self.decide(observation(run, record, evaluation))
        o = self.ostate
        record |= {"orch_health": o.health, "orch_phase": o.phase, "orch_s": self.seconds,
                   "orch_snapshot_s": self.ring.seconds}  # fmt: skip
        if o.forecast:
            record |= {
                f"forecast_{k}": v
                for k, v in o.forecast.items()
                if k in ("loss", "steps_to_plateau", "error")
            }
        return decisions

    def act(self, run: Run, decisions: list[Decision]) -> None:
        """Execute decisions between steps (a rollback first), then keep the snapshot ring in sync."""
        t0 = time.perf_counter()
        old = run.cfg
        for d in decisions:
            run.console.line(str(d))
            run.logs.write({"kind": "decision", **d.to_dict()})
        for d in (d for d in decisions if d.action == "rollback"):
            run.state, run.cfg, where = rolled_back(d, self.ring, run.run_dir, run.state, run.cfg, run.device)
            run.mix_state = mix_state_of(run.state)
            run.step = int(run.state["step"])
            run.logs.event(
                run.step, "rollback", f"to {where}; data continues at micro-batch {run.mix_state.step}"
            )
            run.console.line(f"[orch] rolled back to {where} (step {run.step})")
        if decisions:
            run.state, run.hp, run.cfg = orchestrator.apply_decisions(decisions, run.state, run.hp, run.cfg)
            if "step" in run.reconfigure(old):
                run.logs.event(run.step, "rebuild_step", "a decision changed a shape or a step constant")
        self.seconds += time.perf_counter() - t0
        self.ring.sync({*self.ostate.snapshots, self.ostate.pending_snapshot}, run.step, run.state, run.cfg)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"orchestrator": self.ostate.to_dict()}


def respond_to_oom(run: Run, orch: Orchestration | None, error: torch.OutOfMemoryError) -> None:
    """Step ``run.step + 1`` ran out of memory (nothing changed: the step is pure). The orchestrator
    may shrink the micro-batch or turn on gradient checkpointing; else ``OutOfMemory``."""
    what = str(error).splitlines()[0] if str(error) else "out of memory"
    run.logs.event(run.step + 1, "oom", what)
    run.console.line(f"[lumina] out of memory at step {run.step + 1} ({what})")
    decisions = orch.decide(observation(run, None, events=["oom"])) if orch is not None else []
    if not decisions:
        why = "the orchestrator is off" if orch is None else "nothing left to shrink"
        raise OutOfMemory(
            f"out of memory at step {run.step + 1} with micro_batch_size={run.cfg.train.micro_batch_size} "
            f"({why}; lower train.micro_batch_size or enable train.grad_checkpointing)"
        ) from error
    orch.act(run, decisions)
