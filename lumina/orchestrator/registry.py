"""The run registry: what past runs started with and how they ended, and starting suggestions from it.

    entries = read_registry(path)                                   # plain data (msgpack stream)
    decision = suggest(entries, fingerprint(cfg), start_values(cfg), cfg.orchestrator)   # pure

Each finished run appends one entry: its config fingerprint (sizes and kinds that make runs
comparable), its starting hyper-parameters, the effective ones it ended with (the LR times the
orchestrator's final ``lr_scale``, the micro-batch after OOM responses), its decisions by action,
and its outcome. ``suggest`` looks for successful runs whose fingerprint is within
``registry_max_distance`` (sum of |log ratio| over sizes + 1 per differing kind) and proposes the
geometric mean of the effective LRs of the best ``registry_top`` of them (by best eval loss), the
median warmup fraction, and the smallest micro-batch that ran; ``orchestrator.registry_mode``
decides whether that is only logged ("log", the default) or applied ("apply") at the start of a
fresh run. The entries a suggestion used are stored with it (``suggestion.msgpack``), so ``replay``
re-derives it too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lumina.config import OrchestratorConfig, RunConfig
from lumina.orchestrator.state import Decision, append_log, read_log

__all__ = [
    "SUGGESTION_FILE", "apply_suggestion", "distance", "fingerprint", "read_registry", "record_run",
    "registry_path", "start_values", "suggest",
]  # fmt: skip

SUGGESTION_FILE = "suggestion.msgpack"

_SIZES = (
    "d_model",
    "n_layers",
    "n_heads",
    "vocab_size",
    "seq_len",
    "batch_size",
    "steps",
    "experts",
    "top_k",
)
_KINDS = ("mode", "precision", "moe", "mod", "tokenizer")


def registry_path(cfg: RunConfig) -> Path | None:
    r = cfg.orchestrator.registry
    if cfg.orchestrator.registry_mode == "off" or r in ("", "none"):
        return None
    return Path(cfg.run_dir) / ".registry" if r == "auto" else Path(r)


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    m, t = cfg.model, cfg.train
    return {
        "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "vocab_size": m.vocab_size,
        "seq_len": t.seq_len, "batch_size": t.batch_size, "steps": t.steps,
        "experts": m.moe.num_experts + 1, "top_k": m.moe.top_k if m.moe.enabled else 1,
        "mode": cfg.data.mode, "precision": t.precision, "moe": m.moe.enabled, "mod": m.mod.enabled,
        "tokenizer": cfg.data.tokenizer,
    }  # fmt: skip


def start_values(cfg: RunConfig) -> dict[str, Any]:
    t = cfg.train
    return {"lr": t.lr, "warmup_steps": t.warmup_steps, "micro_batch_size": t.micro_batch_size,
            "batch_size": t.batch_size, "steps": t.steps}  # fmt: skip


def distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    d = sum(abs(math.log(max(a[k], 1) / max(b[k], 1))) for k in _SIZES)
    return d + sum(1.0 for k in _KINDS if a[k] != b[k])


def read_registry(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    try:
        return list(read_log(path))
    except ValueError:  # a damaged registry must not stop training: it only informs suggestions
        return []


def record_run(path: Path | None, entry: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    append_log(path, [entry])


def suggest(
    entries: list[dict[str, Any]], fp: dict[str, Any], start: dict[str, Any], cfg: OrchestratorConfig
) -> tuple[Decision | None, list[dict[str, Any]]]:
    """(a ``suggest`` decision or None, the similar entries it is based on: ``suggest`` of those
    alone gives the same answer). Pure."""
    latest = {e["run_dir"]: e for e in entries}  # a resumed run's last entry
    similar = [
        e for e in latest.values()
        if e.get("survived") and not e.get("injected") and e.get("best_eval") is not None
        and distance(e["fingerprint"], fp) <= cfg.registry_max_distance
    ]  # fmt: skip
    if len(similar) < cfg.registry_min_runs:
        return None, []
    best = sorted(similar, key=lambda e: (e["best_eval"], e["name"]))[: cfg.registry_top]
    lr = math.exp(sum(math.log(e["effective"]["lr"]) for e in best) / len(best))
    fracs = sorted(e["effective"]["warmup_steps"] / max(1, e["effective"]["steps"]) for e in best)
    warm = round(fracs[len(fracs) // 2] * start["steps"])
    micro = min([start["micro_batch_size"], *(e["effective"]["micro_batch_size"] for e in best)])
    if start["batch_size"] % micro:
        micro = start["micro_batch_size"]
    args: dict[str, Any] = {}
    if abs(math.log(lr / start["lr"])) > math.log(1.05):
        args["lr"] = {"from": start["lr"], "to": float(f"{lr:.4g}")}
    if warm != start["warmup_steps"]:
        args["warmup_steps"] = {"from": start["warmup_steps"], "to": warm}
    if micro != start["micro_batch_size"]:
        args["micro_batch_size"] = {"from": start["micro_batch_size"], "to": micro}
    if not args:
        return None, similar
    names = ", ".join(
        f"{e['name']} (best eval {e['best_eval']:.4g}, lr {e['effective']['lr']:.3g})" for e in best
    )
    reason = f"{len(similar)} similar successful past run(s); the best {len(best)}: {names}"
    conf = min(1.0, 0.5 + 0.1 * len(similar))
    return Decision(step=0, action="suggest", args=args, level=1, confidence=conf, reason=reason), similar


def apply_suggestion(d: Decision, cfg: RunConfig) -> RunConfig:
    """The config with a ``suggest`` decision's values (a fresh run, before its state exists)."""
    import dataclasses

    values = {k: v["to"] for k, v in d.args.items()}
    if "lr" in values:  # the floor of the schedule moves with the LR
        values["min_lr"] = cfg.train.min_lr * values["lr"] / cfg.train.lr
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **values))
