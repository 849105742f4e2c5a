"""One optimizer step as the driver runs it: the batch, injected faults, the (compiled) pure step,
and the train record that describes it."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from tensordict import TensorDict

from lumina import metrics
from lumina.data.mix import MixState
from lumina.driver import ranks
from lumina.driver.prepare import Run
from lumina.optim import lr_at

__all__ = ["OutOfMemory", "StepOutput", "routing_record", "take_step", "train_record"]


class OutOfMemory(RuntimeError):
    """A step ran out of memory and the orchestrator (off, or at its limits) could not help."""


@dataclasses.dataclass
class StepOutput:
    state: TensorDict
    metrics: TensorDict
    sources: list[str]  # the data source of each micro-batch
    next_mix: MixState
    t0: float  # when the step began (perf_counter)


def take_step(run: Run) -> StepOutput:
    """Run step ``run.step + 1`` without committing it. Raises ``torch.OutOfMemoryError`` (real or
    injected); nothing has changed then (the step is pure). Raises ``KeyboardInterrupt`` first when
    a signal arrived since the last step (``ranks.defer_interrupts``)."""
    cfg, t = run.cfg, run.cfg.train
    if run.env is None and run.interrupt_requested:  # (torchrun: all ranks together, below)
        raise KeyboardInterrupt
    xs, ys, sources, mix_state = [], [], [], run.mix_state
    mine = _my_micro_batches(run)
    for a in range(t.grad_accum):  # the global order; each rank keeps its own share of it
        x, y, src, mix_state = run.mix.next_batch(mix_state, cfg.data.interleave_ratio)
        if a in mine:
            xs.append(x)
            ys.append(y)
        sources.append(src)
    batch = TensorDict({"inputs": torch.cat(xs), "targets": torch.cat(ys)}, batch_size=[])
    run.hp["lr"] = torch.tensor(lr_at(run.step, t), device=run.device)
    if run.mix.switch_step == run.step:
        run.logs.event(run.step, "phase_switch", "data source base -> chat")
        run.console.line(f"[data] step {run.step}: source base -> chat")
    t0 = time.perf_counter()
    state = run.state
    if run.engine is not None and run.injector.corrupts(run.step + 1):
        state = run.engine.full_state(state)  # the fault rewrites whole tensors; sharded again below
    try:
        state, batch, hp, fired = run.injector.before_step(
            run.step + 1, state, batch.to(run.device), run.hp, cfg, run.tok.vocab_size
        )
        oom = None
    except torch.OutOfMemoryError as e:  # injected (a real one is raised by the step itself)
        oom = e
    if run.env is not None:  # one collective: every rank takes the same branch
        any_oom, any_interrupt = ranks.any_flag(run.env, oom is not None, run.interrupt_requested)
        if any_interrupt:
            raise KeyboardInterrupt
        if any_oom:
            raise oom or torch.OutOfMemoryError("out of memory on another rank")
    if oom is not None:
        raise oom
    for spec in fired:
        run.logs.event(run.step + 1, "inject", spec)
        run.console.line(f"[inject] step {run.step + 1}: {spec}")
    if run.engine is not None and state is not run.state:  # a fault changed the state: make it live
        state = run.engine.adopt(state)
    new_state, m = run.step_fn(state, batch, hp)
    return StepOutput(new_state, m, sources, mix_state, t0)


def _my_micro_batches(run: Run) -> range:
    """The global micro-batch indices this rank runs (all of them in one process)."""
    A = run.cfg.train.grad_accum
    if run.env is None:
        return range(A)
    per = A // run.env.world_size
    return range(run.env.rank * per, (run.env.rank + 1) * per)


def routing_record(m: TensorDict) -> dict[str, Any]:
    """Per-layer expert load shares, dropped fractions and MoD selected ratios as plain lists."""
    rec: dict[str, Any] = {}
    if "moe" in m:
        layers = sorted(m["moe"].keys(), key=int)
        loads = [m["moe", i, "load"].float() for i in layers]
        rec["expert_layers"] = [int(i) for i in layers]
        rec["expert_load"] = [(x / x.sum().clamp(min=1)).tolist() for x in loads]
        rec["dropped"] = [m["moe", i, "dropped_frac"].item() for i in layers]
    if "mod" in m:
        layers = sorted(m["mod"].keys(), key=int)
        rec["mod_layers"] = [int(i) for i in layers]
        rec["mod_ratio"] = [m["mod", i, "selected_ratio"].item() for i in layers]
        rec["mod_predictor_acc"] = [m["mod", i, "predictor_acc"].item() for i in layers]
        rec["mod_router_weight"] = [m["mod", i, "router_weight"].item() for i in layers]
        rec["mod_score_std"] = [m["mod", i, "score_std"].item() for i in layers]
    return rec


def train_record(run: Run, out: StepOutput, flops_per_token: float, peak_flops: float) -> dict[str, Any]:
    """Commit the step (the new state and data position become the run's) and describe it."""
    run.state = out.state
    run.set_mix_state(out.next_mix)
    m = out.metrics
    loss = m["loss"].item()  # the sync point: one per step
    dt, memory_mb = ranks.max_over_ranks(run.env, time.perf_counter() - out.t0, metrics.memory_mb(run.device))
    run.step += 1
    tokens = m["tokens"].item()
    record = {
        "kind": "train",
        "step": run.step,
        "loss": loss,
        "ppl": math.exp(min(loss, 80.0)),
        "accuracy": m["accuracy"].item(),
        "aux_loss": m["aux_loss"].item(),
        "lr": m["lr"].item(),
        "grad_norm": m["grad_norm"].item(),
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "mfu": flops_per_token * tokens / dt / peak_flops,
        "memory_mb": memory_mb,
        "step_s": dt,
        "source": out.sources[-1],
        **routing_record(m),
    }
    if run.cfg.train.precision == "fp16":
        record["loss_scale"] = m["loss_scale"].item()
        record["skipped"] = bool(m["skipped"].item())
    return record
