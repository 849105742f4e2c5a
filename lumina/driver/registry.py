"""The driver's side of the run registry (``lumina.orchestrator.registry``): a suggestion for a fresh
run's start values from similar past runs, and a record of this run when it ends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lumina.config import RunConfig
from lumina.orchestrator import Decision, append_log, registry

__all__ = ["RunRegistry"]


class RunRegistry:
    def __init__(self, cfg: RunConfig):
        self.path = registry.registry_path(cfg)
        self.fingerprint, self.start = registry.fingerprint(cfg), registry.start_values(cfg)
        self.suggestion: dict[str, Any] | None = None

    def suggest(self, cfg: RunConfig) -> RunConfig:
        """The config a fresh run starts with: ``cfg``, or with the suggestion applied when
        ``orchestrator.registry_mode=apply``. The suggestion is kept for ``log_suggestion``."""
        if not cfg.orchestrator.enabled or self.path is None:
            return cfg
        found, similar = registry.suggest(
            registry.read_registry(self.path), self.fingerprint, self.start, cfg.orchestrator
        )
        if found is None:
            return cfg
        applied = cfg.orchestrator.registry_mode == "apply"
        self.suggestion = {"step": 0, "fingerprint": self.fingerprint, "start": self.start,
                           "entries": similar, "decision": found.to_dict(), "applied": applied}  # fmt: skip
        return registry.apply_suggestion(found, cfg) if applied else cfg

    def log_suggestion(self, run_dir: Path, write, line) -> None:
        """Into the run folder (``suggestion.msgpack``, replayable), metrics.jsonl and the console."""
        if self.suggestion is None:
            return
        append_log(run_dir / registry.SUGGESTION_FILE, [self.suggestion])
        write({"kind": "decision", **self.suggestion["decision"]})
        note = "" if self.suggestion["applied"] else " [logged, not applied: orchestrator.registry_mode=log]"
        line(str(Decision.from_dict(self.suggestion["decision"])) + note)

    def record(
        self, cfg: RunConfig, run_dir: Path, step: int, *, counters: dict[str, int], stopped_early: bool,
        final_eval: float | None, best_eval: float | None,
    ) -> None:  # fmt: skip
        t = cfg.train
        counts = {k.removeprefix("action:"): v for k, v in counters.items() if k.startswith("action:")}
        registry.record_run(self.path, {
            "step": step, "name": run_dir.name, "run_dir": str(run_dir.resolve()),
            "fingerprint": self.fingerprint, "start": self.start,
            "effective": {"lr": t.lr * t.lr_scale, "warmup_steps": t.warmup_steps,
                          "micro_batch_size": t.micro_batch_size, "steps": t.steps},
            "decisions": counts, "injected": bool(t.inject), "stopped_early": stopped_early,
            "survived": final_eval is not None and math.isfinite(final_eval),
            "final_eval": final_eval, "best_eval": best_eval,
        })  # fmt: skip
