"""The adaptive orchestrator: a pure decision function over plain data, and the one pure function
that turns its decisions into a new train state.

    ostate = init_state()
    ostate, decisions = decide(ostate, obs, cfg.orchestrator)        # pure, deterministic
    state, hp, cfg = apply_decisions(decisions, state, hp, cfg)      # pure

The driver (``lumina.loop``) builds an ``Observation`` after each step, logs observations and
decisions to ``observations.msgpack`` / ``decisions.msgpack`` in the run folder, executes rollbacks
from its snapshot ring, and rebuilds the compiled step when a decision changed a shape.
``replay`` re-derives every decision from the observation log (``python -m lumina.run replay``).
"""

from lumina.orchestrator.apply import ACTIONS, apply_decisions, step_signature
from lumina.orchestrator.policy import decide
from lumina.orchestrator.state import (
    DECISIONS_FILE,
    LEVELS,
    OBSERVATIONS_FILE,
    Decision,
    Observation,
    OrchestratorState,
    Settings,
    action_label,
    append_log,
    init_state,
    read_log,
    truncate_log,
)

__all__ = [
    "ACTIONS",
    "DECISIONS_FILE",
    "LEVELS",
    "OBSERVATIONS_FILE",
    "Decision",
    "Observation",
    "OrchestratorState",
    "Settings",
    "action_label",
    "append_log",
    "apply_decisions",
    "decide",
    "init_state",
    "read_log",
    "step_signature",
    "truncate_log",
]
