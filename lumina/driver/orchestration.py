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
from lumina.driver import ranks
from lumina.driver.evaluation import EvalResult
from lumina.driver.prepare import Run, mix_state_of
from lumina.driver.rollback import FROM_CHECKPOINT, SnapshotRing, rolled_back
from lumina.driver.stepping import OutOfMemory
from lumina.orchestrator import Decision, Observation, Settings

__all__ = ["SNAPSHOT_DIR", "Orchestration", "observation", "respond_to_oom", "settings", "snapshot_budget_mb"]


def settings(run: Run) -> Settings:
    """What the orchestrator may change, as plain values (an observation's ``settings``)."""
    return Settings.of(run.cfg, run.state["knobs"], run.env.world_size if run.env is not None else 1)


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
        memory_limit_mb=run.memory_limit_mb,
        eval_loss=None if e is None else e["loss"],
        eval_losses={} if e is None else {k[5:]: v for k, v in e.items() if k.startswith("loss_")},
        expert_load=record.get("expert_load", []),
        dropped=record.get("dropped", []),
        mod_weight=record.get("mod_router_weight", []),
        mod_score_std=record.get("mod_score_std", []),
        events=list(events),
        settings=settings(run),
    )


SNAPSHOT_DIR = ".snapshots"  # spilled snapshots, under the run folder (removed when the run ends)
_UNKNOWN_LIMIT_SNAPSHOT_MB = 2048.0  # the ring's budget when the memory limit is unknown (0)


def snapshot_budget_mb(ocfg, memory_limit_mb: float) -> float:
    """The snapshot ring's in-memory budget: ``snapshot_mb`` when set, else ``snapshot_memory`` x
    the run's memory limit (the device's on CUDA, so a 141 GB H200 keeps up to 14 GB of snapshots
    on the GPU by default; the rest goes to disk), 2 GiB when the limit is unknown."""
    if ocfg.snapshot_mb is not None:
        return ocfg.snapshot_mb
    return ocfg.snapshot_memory * memory_limit_mb if memory_limit_mb > 0 else _UNKNOWN_LIMIT_SNAPSHOT_MB


# decisions that rewrite parameters: under a distributed engine they apply to the full state, which a
# new engine then shards again
FULL_STATE_ACTIONS = ("add_expert", "prune_expert", "reset_mod_router")


class Orchestration:
    def __init__(self, run: Run):
        self.ocfg = run.cfg.orchestrator
        self.main, self.env = run.is_main, run.env  # only rank 0 writes the logs
        self.obs_log = run.run_dir / orchestrator.OBSERVATIONS_FILE
        self.dec_log = run.run_dir / orchestrator.DECISIONS_FILE
        saved = run.extra.get("orchestrator")
        # records in each log (rank 0), saved with every checkpoint: where a resume cuts them
        self.logged = [0, 0]
        if saved is not None:
            try:
                self.ostate = orchestrator.OrchestratorState.from_dict(saved)
            except (TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{run.run_dir}: bad orchestrator state in the checkpoint ({e})"
                ) from None
            # (older checkpoints have none; prepare_run checked them)
            counts = run.extra.get("orchestrator_logs", [None, None])
            for i, (log_file, count) in enumerate(zip((self.obs_log, self.dec_log), counts, strict=True)):
                if self.main:  # what was written after the checkpoint is redone
                    try:
                        self.logged[i] = orchestrator.truncate_log(log_file, run.start, count)
                    except ValueError as e:
                        raise CheckpointError(str(e)) from None
        else:
            self.ostate = orchestrator.init_state(run.start)
            if self.main:  # (a fresh run's logs are empty; these are of a run resumed with it off before)
                logs = (self.obs_log, self.dec_log)
                self.logged = [sum(1 for _ in orchestrator.read_log(f, torn_tail_ok=True)) for f in logs]
        for log_file in (self.obs_log, self.dec_log) if self.main else ():  # both exist in every run
            log_file.touch()
        # under an engine its own copy (detached shards), looked up on every use: engines get rebuilt;
        # its snapshots stay in memory (no spill_dir: lumina.driver.rollback)
        self.ring = SnapshotRing(
            (lambda st: run.engine.snapshot(st)) if run.engine is not None else None,
            budget_bytes=snapshot_budget_mb(self.ocfg, run.memory_limit_mb) * 2**20,
            spill_dir=run.run_dir / SNAPSHOT_DIR if run.engine is None else None,
        )
        self.ring.snapshot(run.start, run.state, run.cfg)
        self.spill_noted = False
        self.seconds = 0.0  # time spent deciding and acting (the orchestrator's cost)

    def decide(self, obs: Observation) -> list[Decision]:
        t0 = time.perf_counter()
        self.ostate, decisions = orchestrator.decide(self.ostate, obs, self.ocfg)
        self.seconds += time.perf_counter() - t0
        ranks.agree(self.env, [d.to_dict() for d in decisions], f"the decisions at step {obs.step}")
        if self.main:
            orchestrator.append_log(self.obs_log, [obs.to_dict()])
            orchestrator.append_log(self.dec_log, [d.to_dict() for d in decisions])
            self.logged = [self.logged[0] + 1, self.logged[1] + len(decisions)]
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
            state, run.cfg, where = rolled_back(d, self.ring, run.run_dir, run.state, run.cfg, run.device)
            run.state = _live(run, state, full=where.startswith(FROM_CHECKPOINT), old=old)
            run.mix_state = mix_state_of(run.state)
            run.step = int(run.state["step"])
            run.logs.event(
                run.step, "rollback", f"to {where}; data continues at micro-batch {run.mix_state.step}"
            )
            run.console.line(f"[orch] rolled back to {where} (step {run.step})")
        if decisions:
            gathered = run.engine is not None and any(d.action in FULL_STATE_ACTIONS for d in decisions)
            if gathered:  # parameters are rewritten: on the full state, sharded again below
                run.state = run.engine.full_state(run.state)
            before = run.cfg
            run.state, run.hp, run.cfg = orchestrator.apply_decisions(decisions, run.state, run.hp, run.cfg)
            # a new engine for new shapes, and for a new micro-batch (DeepSpeed's config holds it; an
            # out-of-memory step may have left an engine's gradient buffers half filled)
            reshaped = run.cfg.model != before.model
            rebatched = run.cfg.train.micro_batch_size != before.train.micro_batch_size
            if run.engine is not None and (gathered or reshaped or rebatched):
                if not gathered:
                    run.state = run.engine.full_state(run.state)
                run.rebuild_engine()
                run.logs.event(
                    run.step, "rebuild_engine", "a decision changed the parameters or model shapes"
                )
            if "step" in run.reconfigure(old):
                run.logs.event(run.step, "rebuild_step", "a decision changed a shape or a step constant")
        self.seconds += time.perf_counter() - t0
        self.ring.sync({*self.ostate.snapshots, self.ostate.pending_snapshot}, run.step, run.state, run.cfg)
        if self.ring.spilled and not self.spill_noted:  # the first spill of the run: say where and why
            self.spill_noted, r = True, self.ring
            what = f"snapshots past {r.budget_bytes / 2**20:.0f} MB in memory go to {r.spill_dir}"
            now = f"{r.memory_bytes / 2**20:.0f} MB in memory now"
            run.logs.event(run.step, "snapshot_spill", f"{what} ({now})")

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"orchestrator": self.ostate.to_dict(), "orchestrator_logs": list(self.logged)}


def _live(run: Run, state, *, full: bool, old) -> Any:
    """A restored state made the running one: as is in one process; under an engine adopted (a
    snapshot of the same shapes) or sharded by a new engine (a checkpoint's full tensors, or a
    snapshot taken before a change of shapes)."""
    if run.engine is None:
        return state
    if not full and run.cfg.model == old.model:
        return run.engine.adopt(state)
    run.state = state if full else run.engine.full_state(state)
    run.rebuild_engine()
    return run.state


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
