"""Replay: re-derive a run's decisions from its observation log, and what-if analysis.

    result = replay("runs/debug")                                   # bit-identity check
    result = replay("runs/debug", what_if=["orchestrator.grad_abs=50"])

``decide`` is pure and deterministic, so feeding the logged observations, in order, to a fresh
orchestrator state with the run's ``OrchestratorConfig`` must give back exactly the logged decisions
(compared as msgpack data: every float bit for bit). The start-of-run registry suggestion, when there
was one, is re-derived from the registry entries stored with it (``suggestion.msgpack``).
With ``what_if`` overrides the same observations
are replayed under a changed config and the decisions that would differ are listed
(``orchestrator.enabled=false``: none would have been taken, so every logged one). That is a
counterfactual on the *logged* observations: a changed decision would have changed the run after it,
which no replay can know.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import msgpack

from lumina.config import ORCHESTRATOR_BEFORE, ConfigError, OrchestratorConfig, from_dict
from lumina.orchestrator import registry
from lumina.orchestrator.policy import decide
from lumina.orchestrator.state import (
    DECISIONS_FILE,
    OBSERVATIONS_FILE,
    Decision,
    Observation,
    init_state,
    read_log,
)

__all__ = ["ReplayError", "ReplayResult", "replay"]


class ReplayError(ValueError):
    """The run folder cannot be replayed (missing or corrupt logs or config): one line."""


@dataclasses.dataclass
class ReplayResult:
    observations: int
    logged: list[dict[str, Any]]
    derived: list[dict[str, Any]]
    first_mismatch: int | None  # index into the decision lists, None when identical

    @property
    def identical(self) -> bool:
        return self.first_mismatch is None


def _normalise(d: dict[str, Any]) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False)  # tuples -> lists, etc.


def _parse_what_if(item: str) -> tuple[str, str]:
    """``orchestrator.KEY=VALUE`` -> (KEY, VALUE); the ``orchestrator.`` and a leading ``--`` are optional."""
    key, sep, value = item.partition("=")
    key = key.strip().removeprefix("--").removeprefix("orchestrator.")
    if not sep or not key:
        raise ConfigError(f"--what-if {item}: expected orchestrator.KEY=VALUE")
    if "." in key:
        raise ConfigError(f"--what-if {item}: a replay changes only orchestrator.KEY=VALUE settings")
    return key, value


def load_orchestrator_config(run_dir: Path, what_if: list[str] = ()) -> OrchestratorConfig:
    """The run's ``OrchestratorConfig`` from its ``config.json``, with the ``what_if`` overrides
    applied in order; a bad override is a one-line ``ConfigError`` naming ``--what-if`` and its value."""
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReplayError(f"{path}: missing (not a run folder)") from None
    except json.JSONDecodeError as e:
        raise ReplayError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    # a field the config.json lacks was added after the run: the value that reproduces its orchestrator
    section = {**ORCHESTRATOR_BEFORE, **raw.get("orchestrator", {})}
    try:
        base = from_dict(OrchestratorConfig, section)
    except ConfigError as e:  # checked first, so that a what-if is blamed only for its own problems
        raise ReplayError(f"{path}: orchestrator: {str(e).removeprefix('run: ')}") from None
    if not what_if:
        return base
    given: dict[str, str] = {}  # key -> the last --what-if that set it
    for item in what_if:
        key, value = _parse_what_if(item)
        section[key] = value
        given[key] = item
    origin = {key: f"--what-if {item}" for key, item in given.items()}
    try:
        return from_dict(OrchestratorConfig, section, origin=origin, from_cli=frozenset(given))
    except ConfigError as e:
        if str(e).startswith("--what-if "):
            raise
        # a check across the fields failed (from_dict says "run: grad_abs must be > 0, ..."): name the
        # overrides its message mentions, or all of them
        problem = str(e).removeprefix("run: ")
        named = [item for key, item in given.items() if re.search(rf"\b{re.escape(key)}\b", problem)]
        flags = " ".join(f"--what-if {item}" for item in named or given.values())
        raise ConfigError(f"{flags}: {problem}") from None


def replay(run_dir: str | Path, what_if: list[str] = ()) -> ReplayResult:
    run_dir = Path(run_dir)
    ocfg = load_orchestrator_config(run_dir, list(what_if))
    obs_path = run_dir / OBSERVATIONS_FILE
    if not obs_path.exists():
        raise ReplayError(f"{obs_path}: missing (was the orchestrator enabled in this run?)")
    try:
        observations = [Observation.from_dict(o) for o in read_log(obs_path)]
        logged = [_normalise(d) for d in read_log(run_dir / DECISIONS_FILE)]
    except (TypeError, ValueError) as e:
        raise ReplayError(f"{run_dir}: {e}") from None
    ostate = init_state(0)
    derived: list[dict[str, Any]] = []
    sugg_path = run_dir / registry.SUGGESTION_FILE
    if sugg_path.exists():  # the start-of-run suggestion, re-derived from the registry entries it used
        try:
            (rec,) = list(read_log(sugg_path))
            d, _ = registry.suggest(rec["entries"], rec["fingerprint"], rec["start"], ocfg)
        except (TypeError, ValueError, KeyError) as e:
            raise ReplayError(f"{sugg_path}: not a suggestion record ({e})") from None
        logged.insert(0, _normalise(rec["decision"]))
        if d is not None and ocfg.enabled:
            derived.append(_normalise(d.to_dict()))
    # with the orchestrator off the driver neither asks for a suggestion nor calls decide: nothing
    for obs in observations if ocfg.enabled else ():
        ostate, ds = decide(ostate, obs, ocfg)
        derived.extend(_normalise(d.to_dict()) for d in ds)
    mismatch = next((i for i, (a, b) in enumerate(zip(logged, derived, strict=False)) if a != b), None)
    if mismatch is None and len(logged) != len(derived):
        mismatch = min(len(logged), len(derived))
    return ReplayResult(len(observations), logged, derived, mismatch)


def describe(d: dict[str, Any] | None) -> str:
    return "(none)" if d is None else str(Decision.from_dict(d))


def differences(result: ReplayResult) -> tuple[list[dict], list[dict]]:
    """(logged decisions the replay did not make, replayed decisions the run did not make)."""

    def key(d):
        return json.dumps(d, sort_keys=True)

    a, b = {key(d) for d in result.logged}, {key(d) for d in result.derived}
    return [d for d in result.logged if key(d) not in b], [d for d in result.derived if key(d) not in a]


def main_replay(run_dir: str, what_if: list[str], out) -> int:
    """The ``replay`` command: 0 when identical (or, with what-if, always after listing changes)."""
    r = replay(run_dir, what_if)
    if what_if:
        gone, new = differences(r)
        print(
            f"[replay] {r.observations} observations; logged {len(r.logged)} decisions, "
            f"what-if {len(r.derived)}; {len(gone) + len(new)} differ",
            file=out,
        )
        for d in gone:
            print(f"- {describe(d)}", file=out)
        for d in new:
            print(f"+ {describe(d)}", file=out)
        return 0
    if r.identical:
        print(
            f"[replay] {r.observations} observations -> {len(r.derived)} decisions, identical to the log",
            file=out,
        )
        return 0
    i = r.first_mismatch
    print(f"[replay] MISMATCH at decision #{i}:", file=out)
    print(f"  logged:   {describe(r.logged[i] if i < len(r.logged) else None)}", file=out)
    print(f"  replayed: {describe(r.derived[i] if i < len(r.derived) else None)}", file=out)
    return 1
