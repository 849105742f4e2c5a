"""The driver's handling of a shape-changing orchestrator decision, in one process or under torchrun:
prepare a debug run, apply ``add_expert`` (E -> E + 1 in every MoE layer) through
``Orchestration.act``, take STEPS steps, and save the parameters (rank 0) to OUT/params.safetensors.

Usage: [torchrun --nproc_per_node=2] tests/distributed/act_worker.py OUT STEPS [--section.field=value ...]
(under torchrun pass --dist.strategy=...)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from lumina import tree
from lumina.configure import load_config
from lumina.driver.orchestration import Orchestration
from lumina.driver.prepare import prepare_run
from lumina.driver.stepping import take_step, train_record
from lumina.orchestrator import Decision


def main() -> None:
    out, steps, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    cfg = load_config("debug", overrides=[f"--run_dir={out / 'runs'}", "--train.eval_batches=0", *overrides])
    run = prepare_run(cfg, resume=None, out=io.StringIO())
    orch = Orchestration(run)
    E = run.cfg.model.moe.num_experts
    grow = Decision(step=0, action="add_expert", args={"from": E, "to": E + 1}, level=2, confidence=1.0,
                    reason="test")  # fmt: skip
    orch.act(run, [grow])
    assert run.cfg.model.moe.num_experts == E + 1
    for _ in range(steps):
        train_record(run, take_step(run), 1.0, 1.0)
    state = run.engine.full_state(run.state) if run.engine is not None else run.state
    params = {k: v.detach().contiguous() for k, v in tree.flatten(state["params"]).items()}
    if run.is_main:
        save_file(params, str(out / "params.safetensors"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
