"""The impure driver: data -> compiled step -> metrics, logs, evals, orchestrator, checkpoints, report.

    result = train(cfg)                         # runs/<name>/ ...
    result = train(cfg, resume="latest")        # or a run folder, or a checkpoint folder

``train`` reads top to bottom: ``prepare_run`` (config, device, data, state — fresh or resumed — and
the run folder), then one optimizer step at a time, each followed by the parts that own a cadence
(evaluation, the orchestrator, checkpointing, progress), then ``finish``. The parts live in
``lumina.driver``; rollback is ``lumina.driver.rollback``.

Everything stateful that must survive a restart lives in the train state (params, moments, step,
RNG key, loss scale, data position) or in the checkpoint's bookkeeping (best eval, orchestrator
state, fired faults), so a resumed run makes exactly the steps an uninterrupted one would.

The run folder ``runs/<name>/`` (``<name>-2``, ``-3``... when the name is taken and not resuming):
    config.json             the resolved config, derived fields filled in
    metrics.jsonl           one JSON object per line: kind = train | eval | event | decision
    tb/                     TensorBoard event files (the same scalars)
    checkpoints/step_N/     every ``ckpt_every`` steps and at the end, newest ``keep_last`` kept
    checkpoints/best        the state with the best eval loss so far (a symlink to best_N/)
    observations.msgpack    the orchestrator's input, one record per observed step (orchestrator on)
    decisions.msgpack       its decisions, possibly none (``python -m lumina.run replay`` re-derives them)
    report.png              loss / eval / LR / throughput / expert-load / MoD panels (at the end)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from tensordict import TensorDict

from lumina import metrics
from lumina.driver import ranks
from lumina.driver.checkpointing import Checkpointer
from lumina.driver.console import Progress, fmt_time
from lumina.driver.evaluation import EvalResult, Evaluator
from lumina.driver.orchestration import Orchestration, respond_to_oom
from lumina.driver.prepare import Run, find_resume, prepare_run, resolve_device
from lumina.driver.stepping import OutOfMemory, take_step, train_record

__all__ = ["OutOfMemory", "RunResult", "find_resume", "resolve_device", "train"]


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    steps: int  # optimizer steps completed (including those before a resume)
    first_eval: float | None  # the run's eval loss at step 0 (None: no evals, or an older checkpoint)
    final_eval: float | None
    best_eval: float | None
    best_step: int | None
    stopped_early: bool
    seconds: float  # this process's wall-clock time


def train(
    cfg,
    *,
    resume: str | Path | None = None,
    out: TextIO | None = None,
    step_hook: Callable[[int, TensorDict, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train ``cfg`` (a ``RunConfig``), resuming from ``resume`` ("latest", a run folder or a
    checkpoint folder). ``step_hook(step, state, record)`` is called after every step (a
    KeyboardInterrupt it raises stops the run as Ctrl-C would, the step's decisions applied).
    From here to the end of the final checkpoint a SIGINT / SIGTERM stops the run at the next step
    boundary (``ranks.defer_interrupts``; under torchrun ``prepare_run`` installed that already);
    one noted in the last step, or while the run finished, is raised once it has."""
    run = prepare_run(cfg, resume=resume, out=out or sys.stdout)
    if run.env is None:
        run.restore_signals = ranks.defer_interrupts(run)
    try:
        result = _train(run, step_hook)
    finally:
        run.restore_signals()
    if run.interrupt_requested:  # the run is complete, and the caller was asked to stop
        raise KeyboardInterrupt
    return result


def _train(run: Run, step_hook: Callable[[int, TensorDict, dict[str, Any]], None] | None) -> RunResult:
    evaluator = Evaluator(run.eval_sets, run.tok.pad_id, run.device, run.extra)
    orch = Orchestration(run) if run.cfg.orchestrator.enabled else None
    saver = Checkpointer([evaluator, orch])
    flops = metrics.flops_per_token(run.cfg.model, run.cfg.train.seq_len)
    peak, _ = metrics.peak_flops(run.device, run.cfg.train.peak_flops, run.cfg.train.precision)
    peak *= run.env.world_size if run.env is not None else 1  # the ranks' tokens/s over all their devices
    progress = Progress(run.console, run.start, flops, peak)
    stopped_early = interrupted = False
    pending: list = []  # decisions taken at this step and not applied yet
    try:
        if evaluator.sets and run.start == 0:
            _evaluate(run, evaluator, saver)
        while run.step < run.cfg.train.steps:
            try:
                out_ = take_step(run)
            except torch.OutOfMemoryError as e:
                respond_to_oom(run, orch, e)  # raises OutOfMemory when nothing helps
                continue
            record = train_record(run, out_, flops, peak)
            evaluation = _evaluate(run, evaluator, saver) if evaluator.due(run.step, run.cfg) else None
            pending = orch.observe(run, record, evaluation) if orch is not None else []
            run.logs.write(record)
            if step_hook is not None:
                step_hook(run.step, run.state, record)
            progress.update(run.step, run.cfg.train.steps, record, run.cfg.train.log_every)
            if orch is not None:
                decisions, pending = pending, []
                orch.act(run, decisions)
            if evaluation is not None and evaluator.should_stop(run.cfg) and run.step < run.cfg.train.steps:
                stopped_early = True
                _early_stop(run, evaluator)
                break
            saver.after_step(run)
    except KeyboardInterrupt:
        interrupted = True
        if pending:  # (a step hook raised it, or a second signal): the run would apply them before
            decisions, pending = pending, []  # its next step, so the checkpoint holds them applied
            orch.act(run, decisions)
        run.console.line(f"[lumina] interrupted at step {run.step}; saving a checkpoint")
        run.logs.event(run.step, "interrupted")
    except BaseException:
        run.logs.close()
        raise
    finally:
        if orch is not None:
            orch.ring.close()  # spilled snapshots are deleted with the run's end (or crash)
    return _finish(run, evaluator, orch, saver, stopped_early=stopped_early, interrupted=interrupted)


def _evaluate(run: Run, evaluator: Evaluator, saver: Checkpointer) -> EvalResult:
    result = evaluator(run.step, run.state, run.cfg, run.engine)
    run.logs.write({"kind": "eval", "step": run.step, **result.metrics})
    saver.after_eval(run, result)
    run.console.line(evaluator.describe(result, run.cfg.train.patience))
    return result


def _early_stop(run: Run, evaluator: Evaluator) -> None:
    t = run.cfg.train
    run.logs.event(run.step, "early_stop", f"no eval improvement > {t.min_delta} in {t.patience} evals")
    best = f"best eval {evaluator.best:.4f} at step {evaluator.best_step}"
    run.console.line(f"[lumina] early stop at step {run.step}: {best}")


def _finish(
    run: Run, evaluator: Evaluator, orch: Orchestration | None, saver: Checkpointer, *,
    stopped_early: bool, interrupted: bool,
) -> RunResult:  # fmt: skip
    """The final checkpoint, the registry record, report.png and the summary."""
    saver.final(run)
    run.logs.close()
    if not interrupted and run.is_main:
        run.registry.record(
            run.cfg, run.run_dir, run.step, counters=orch.ostate.counters if orch is not None else {},
            stopped_early=stopped_early, final_eval=evaluator.final, best_eval=evaluator.best,
        )  # fmt: skip
    report = None
    try:
        from lumina.report import write_report

        report = write_report(run.run_dir) if run.is_main else None
    except (ImportError, ValueError, FileNotFoundError) as e:  # a missing plot must not fail a run
        run.console.line(f"[lumina] no report.png: {e}")
    seconds = time.perf_counter() - run.t_start
    e0, e1 = evaluator.first, evaluator.final
    if e1 is not None:
        since = f"{e0:.4f} -> " if e0 is not None else ""
        best = f"best {evaluator.best:.4f} at step {evaluator.best_step}"
        run.console.line(f"[lumina] held-out loss {since}{e1:.4f} ({best}) in {fmt_time(seconds)}")
    run.console.line(f"[lumina] run folder: {run.run_dir}" + (f" (report: {report.name})" if report else ""))
    if interrupted:
        raise KeyboardInterrupt
    return RunResult(
        run.run_dir, run.step, e0, e1, evaluator.best, evaluator.best_step, stopped_early, seconds
    )
