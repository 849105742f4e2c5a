"""Held-out evaluation during training: fixed batches per data source, the best-so-far bookkeeping
and early stopping. The ``Evaluator`` owns its cadence (``train.eval_every`` and the last step)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from tensordict import TensorDict

from lumina.config import RunConfig
from lumina.data.mix import build_mix
from lumina.distributed.engines import Engine
from lumina.step import eval_step

__all__ = ["EvalResult", "Evaluator", "eval_sets", "evaluate"]


def eval_sets(cfg: RunConfig) -> dict[str, list[TensorDict]]:
    """Fixed held-out batches per source present in the mode: the same tokens at every eval."""
    mix = build_mix(cfg, "eval")
    sets = {}
    for src, data in (("base", mix.base), ("chat", mix.chat)):
        if data is not None:
            batches = [data.batch_at(i, cfg.train.micro_batch_size) for i in range(cfg.train.eval_batches)]
            sets[src] = [TensorDict({"inputs": x, "targets": y}, batch_size=[]) for x, y in batches]
    return sets


def evaluate(
    state: TensorDict, sets: dict[str, list[TensorDict]], cfg: RunConfig, pad_id: int, device: torch.device,
    engine: Engine | None = None,
) -> dict[str, float]:  # fmt: skip
    """Token-weighted loss / accuracy per source and overall (``loss``: the mean over sources).
    With a distributed ``engine`` every rank evaluates every batch through it (the same figures on
    every rank)."""
    out: dict[str, float] = {}
    for src, batches in sets.items():
        loss_sum = correct = tokens = 0.0
        for b in batches:
            if engine is not None:
                m = engine.eval_step(state, b.to(device))
            else:
                m = eval_step(state["params"], b.to(device), cfg=cfg, pad_id=pad_id, knobs=state["knobs"])
            n = m["tokens"].item()
            loss_sum += m["loss"].item() * n
            correct += m["accuracy"].item() * n
            tokens += n
        out[f"loss_{src}"] = loss_sum / max(tokens, 1)
        out[f"accuracy_{src}"] = correct / max(tokens, 1)
    losses = [v for k, v in out.items() if k.startswith("loss_")]
    out["loss"] = sum(losses) / len(losses)
    out["ppl"] = math.exp(min(out["loss"], 80.0))
    out["accuracy"] = sum(v for k, v in out.items() if k.startswith("accuracy_")) / len(losses)
    return out


@dataclasses.dataclass(frozen=True)
class EvalResult:
    step: int
    metrics: dict[str, float]
    improved: bool


class Evaluator:
    """Evaluates every ``train.eval_every`` steps and at the last step; tracks the best eval loss, the
    evaluations without improvement (early stopping) and the run's first (step 0) eval loss. All of
    it rides in checkpoints (``checkpoint_extra``), so a resumed run reports the same figures."""

    def __init__(
        self, sets: dict[str, list[TensorDict]], pad_id: int, device: torch.device, extra: dict[str, Any]
    ):
        self.sets, self.pad_id, self.device = sets, pad_id, device
        self.best: float | None = extra.get("best_eval")
        self.best_step: int | None = extra.get("best_step")
        self.bad_evals: int = extra.get("bad_evals", 0)
        self.first: float | None = extra.get("first_eval")  # older checkpoints lack it: None
        self.final: float | None = None

    def due(self, step: int, cfg: RunConfig) -> bool:
        t = cfg.train
        return bool(self.sets) and (step % t.eval_every == 0 or step == t.steps)

    def __call__(
        self, step: int, state: TensorDict, cfg: RunConfig, engine: Engine | None = None
    ) -> EvalResult:
        e = evaluate(state, self.sets, cfg, self.pad_id, self.device, engine)
        if step == 0:
            self.first = e["loss"]
        self.final = e["loss"]
        improved = self.best is None or e["loss"] < self.best - cfg.train.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = e["loss"], step, 0
        else:
            self.bad_evals += 1
        return EvalResult(step, e, improved)

    def describe(self, r: EvalResult, patience: int) -> str:
        e = r.metrics
        per_src = " ".join(
            f"{k.removeprefix('loss_')} {v:.4f}" for k, v in e.items() if k.startswith("loss_")
        )
        tail = (
            " *best*"
            if r.improved
            else f" (best {self.best:.4f} @ {self.best_step}; {self.bad_evals}/{patience or '-'})"
        )
        return (
            f"[eval] step {r.step}: loss {e['loss']:.4f} ppl {e['ppl']:.1f} acc {e['accuracy']:.1%}"
            + (f" ({per_src})" if len(self.sets) > 1 else "")
            + tail
        )

    def should_stop(self, cfg: RunConfig) -> bool:
        """Early stopping: ``train.patience`` evaluations in a row without a new best."""
        return bool(cfg.train.patience) and self.bad_evals >= cfg.train.patience

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "best_eval": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "first_eval": self.first,
        }
