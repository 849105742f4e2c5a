"""The orchestrator's plain data: observations in, decisions out, and the state between them.

Everything here is msgpack-serialisable (ints, floats, strings, lists, dicts, None), so the
observation and decision logs replay bit for bit and the orchestrator state rides in checkpoints.
Python floats are IEEE doubles and msgpack stores them as such: a value read back is the value
written, NaN and infinities included.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from lumina.config import RunConfig

__all__ = [
    "LEVELS",
    "OBSERVATIONS_FILE",
    "DECISIONS_FILE",
    "Decision",
    "Observation",
    "OrchestratorState",
    "Settings",
    "action_label",
    "append_log",
    "init_state",
    "read_log",
    "truncate_log",
]

OBSERVATIONS_FILE = "observations.msgpack"
DECISIONS_FILE = "decisions.msgpack"
LEVELS = {1: "soft", 2: "medium", 3: "hard", 4: "critical"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The current values of everything the orchestrator may change (and what bounds it), so decisions
    can state absolute targets without reading the config. Built by the driver with ``Settings.of``.

    A field missing from an older or hand-written observation takes its default: the value the
    orchestrator assumed when it read settings with ``dict.get``. In the logs it is the plain dict
    ``to_dict`` gives, in this field order (the dict the driver wrote before this class existed).
    """

    lr_scale: float = 1.0
    weight_decay: float = 0.0
    micro_batch_size: int = 1
    batch_size: int = 1
    grad_checkpointing: str = "none"  # "none" | "attention" | "full"
    num_experts: int = 0  # 0: dense
    top_k: int = 1  # the driver writes 0 for a dense model; detectors treat < 1 as 1
    balance: str | None = None  # "aux_loss" | "bias"; None: dense
    capacity_factor: float | None = None  # None: dropless (or dense)
    mod_capacity: float | None = 1.0  # the fraction of tokens routed blocks process; None: no MoD
    mode: str = "base_only"  # the data mode ("interleaved" mixes base and chat batches)
    interleave_ratio: float = 0.5  # fraction of base batches
    knobs: dict[str, float] = dataclasses.field(default_factory=dict)  # the live model knobs, by name
    frozen_base: bool = False  # train.lora: only adapters train, so no action may edit the base weights
    world_size: int = 1  # ranks sharing the batch: a micro-batch change keeps grad_accum divisible by it
    eval_every: int = 0  # steps between evaluations; 0: no evaluations (or unknown: an older log)

    def __post_init__(self) -> None:
        # hold the declared types (a hand-written dict says 1 for 1.0), so decisions' args have them too
        for f in dataclasses.fields(self):
            value, convert = getattr(self, f.name), _CONVERT.get(f.type)
            if convert is not None and value is not None:
                object.__setattr__(self, f.name, convert(value))
        object.__setattr__(self, "knobs", {k: float(v) for k, v in self.knobs.items()})

    @classmethod
    def of(cls, cfg: RunConfig, knobs: Mapping[str, Any], world_size: int = 1) -> Settings:
        """The settings of run config ``cfg`` with the live ``knobs`` (0-dim tensors or floats), on
        ``world_size`` ranks."""
        m, t = cfg.model, cfg.train
        return cls(
            lr_scale=t.lr_scale,
            weight_decay=t.weight_decay,
            micro_batch_size=t.micro_batch_size,
            batch_size=t.batch_size,
            grad_checkpointing=t.grad_checkpointing,
            num_experts=m.moe.num_experts,
            top_k=m.moe.top_k if m.moe.enabled else 0,
            balance=m.moe.balance if m.moe.enabled else None,
            capacity_factor=m.moe.capacity_factor if m.moe.enabled else None,
            mod_capacity=m.mod.capacity if m.mod.enabled else None,
            mode=cfg.data.mode,
            interleave_ratio=cfg.data.interleave_ratio,
            knobs={k: float(v) for k, v in sorted(knobs.items())},
            frozen_base=t.lora.enabled,
            world_size=world_size,
            eval_every=t.eval_every if t.eval_batches else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Settings:
        """From a logged (or hand-written) dict; missing keys take the defaults, unknown ones are a
        ValueError."""
        unknown = set(d) - _SETTINGS_FIELDS
        if unknown:
            raise ValueError(f"settings: unexpected keys {sorted(unknown)}")
        return cls(**d)


# by annotation (postponed: strings)
_CONVERT = {"float": float, "float | None": float, "int": int, "bool": bool}
_SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observation:
    """What the driver saw after optimizer step ``step`` (or, with an ``oom`` event, instead of it).

    ``settings`` are the run's current ``Settings``; a plain dict (as the logs store them) is
    accepted and converted, its missing keys taking the defaults.
    """

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float = 0.0
    memory_mb: float = 0.0
    memory_limit_mb: float = 0.0  # what memory_mb may reach (lumina.metrics.memory_limit_mb); 0: unknown
    eval_loss: float | None = None  # when an evaluation ran at this step
    eval_losses: dict[str, float] = dataclasses.field(default_factory=dict)  # per data source
    expert_load: list[list[float]] = dataclasses.field(default_factory=list)  # per MoE layer, shares
    dropped: list[float] = dataclasses.field(default_factory=list)  # per MoE layer
    mod_weight: list[float] = dataclasses.field(default_factory=list)  # per MoD layer: mean sigmoid(r)
    mod_score_std: list[float] = dataclasses.field(default_factory=list)  # per MoD layer
    events: list[str] = dataclasses.field(default_factory=list)  # "oom", "phase_switch", ...
    settings: Settings = dataclasses.field(default_factory=Settings)

    def __post_init__(self) -> None:
        if isinstance(self.settings, Mapping):
            object.__setattr__(self, "settings", Settings.from_dict(self.settings))
        elif not isinstance(self.settings, Settings):
            raise TypeError(f"settings must be Settings or a dict, got {type(self.settings).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # settings as a plain dict: the log format

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Observation:
        return cls(**d)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


# the actions that set the LR scale (train.lr_scale): a cut or a raise; an emergency's cut; its undoing
LR_ACTIONS = ("lr_scale", "emergency_lr_cut", "emergency_lr_restore")


def action_label(action: str, args: dict[str, Any]) -> str:
    """What the evidence table (``OrchestratorConfig.evidence``) calls a decision: the action, the knob
    for ``set_knob`` or the cause a decision names (``args["cause"]``: ``lr_scale:lr_overshoot-``),
    and ``+`` / ``-`` where it moves a number up / down (``lr_scale+`` is a raise, ``lr_scale-`` a
    cut, ``set_knob:aux_loss_weight+``); actions without a direction by name alone."""
    what = args.get("name") if action == "set_knob" else args.get("cause")
    label = action + (f":{what}" if what else "")
    lo, hi = args.get("from"), args.get("to")
    if isinstance(lo, int | float) and isinstance(hi, int | float) and lo != hi:
        label += "+" if hi > lo else "-"
    return label


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decision:
    """One action the orchestrator takes: ``args`` hold absolute targets (e.g. ``{"from": 1.0,
    "to": 0.1}``) so applying a decision never depends on anything but the decision."""

    step: int
    action: str
    args: dict[str, Any]
    level: int  # 1 soft, 2 medium, 3 hard, 4 critical
    confidence: float
    reason: str

    @property
    def label(self) -> str:
        return action_label(self.action, self.args)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(**d)

    def __str__(self) -> str:
        a = self.args
        if "to" in a and "from" in a:
            what = f"{a.get('name', '')}{' ' if 'name' in a else ''}{_fmt(a['from'])} -> {_fmt(a['to'])}"
        else:
            what = " ".join(f"{k}={_fmt(v)}" for k, v in a.items())
        return (
            f"[ORCH] step {self.step} {self.action} {what} (L{self.level} {LEVELS[self.level]}, "
            f"conf {self.confidence:.2f}): {self.reason}"
        )


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and set(v) == {"from", "to"}:
        return f"{_fmt(v['from'])} -> {_fmt(v['to'])}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass(kw_only=True)
class OrchestratorState:
    """Fixed-size history windows, running statistics, cooldowns, phase, counters and snapshot
    bookkeeping. ``decide`` never mutates one: it returns a changed copy."""

    n_obs: int = 0
    step: int = -1  # the last observed step
    history: list[list[float]] = dataclasses.field(default_factory=list)  # [step, loss, gnorm, tok/s]
    loss_ema: float | None = None
    ema_history: list[list[float]] = dataclasses.field(default_factory=list)  # [step, ema]
    evals: list[list[Any]] = dataclasses.field(default_factory=list)  # [step, loss, {src: loss}, train_ema]
    last_action: dict[str, int] = dataclasses.field(default_factory=dict)  # action -> step it fired
    changes: list[int] = dataclasses.field(default_factory=list)  # steps of recent non-critical changes
    phase: str = "warmup"
    health: float = 100.0
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    snapshots: list[int] = dataclasses.field(default_factory=list)  # steps with a confirmed snapshot
    pending_snapshot: int | None = None  # taken at the last observation, confirmed by the next
    dead_since: dict[str, int] = dataclasses.field(default_factory=dict)  # "layer:expert" -> step
    plateau_since: int | None = None
    rollbacks: list[int] = dataclasses.field(default_factory=list)  # steps rollbacks were decided at
    spike_steps: list[int] = dataclasses.field(default_factory=list)  # recent loss spikes
    streaks: dict[str, int] = dataclasses.field(default_factory=dict)  # finding kind -> in a row
    forecast: dict[str, Any] = dataclasses.field(default_factory=dict)  # latest convergence forecast
    pending_forecasts: list[list[float]] = dataclasses.field(default_factory=list)  # [target, predicted]
    forecast_errors: list[float] = dataclasses.field(default_factory=list)  # relative, past predictions
    # micro-batch growth (policy._observe_micro_batch): the tokens/s observed since the micro-batch
    # became ``mb_current``; a growth being judged {"step", "from", "to", "before", "verdict"}; sizes
    # >= ``mb_ceiling`` are never tried again (a growth reverted, shrunk on pressure, or an OOM; 0:
    # none); ``mb_floor`` the micro-batch before the first growth (0: never grown)
    mb_current: int = 0
    mb_speed: list[float] = dataclasses.field(default_factory=list)
    mb_trial: dict[str, Any] | None = None
    mb_ceiling: int = 0
    mb_floor: int = 0
    lrs: list[list[float]] = dataclasses.field(default_factory=list)  # [step, lr, lr_scale] as history
    lr_ceiling: float | None = None  # an LR cut or a rollback left the LR scale here: no raise above it
    converging_at: int | None = None  # the step the near-convergence actions were taken (once a run)
    first_loss: float | None = None  # the first finite loss observed (how far the run has come)
    # a gradient-explosion cut that may be undone: {"step", "from", "to", "quiet_since"} (the newest
    # observation with trouble); ``emergency_restores`` how many were undone (once a run)
    emergency: dict[str, Any] | None = None
    emergency_restores: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrchestratorState:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ValueError(f"not an orchestrator state: unexpected keys {sorted(set(d) - names)}")
        return cls(**d)

    def copy(self) -> OrchestratorState:
        return copy.deepcopy(self)


def init_state(start_step: int = 0) -> OrchestratorState:
    """A fresh state; the run's starting state (step ``start_step``) is the first snapshot."""
    return OrchestratorState(snapshots=[start_step])


# ------------------------------------------------------------------------------------ the logs


def append_log(path: Path, records: list[dict[str, Any]]) -> None:
    """Append msgpack records to ``path`` (one msgpack object each, concatenated)."""
    if not records:
        return
    with open(path, "ab") as f:
        for r in records:
            f.write(msgpack.packb(r, use_bin_type=True))
        f.flush()


def read_log(path: Path, *, torn_tail_ok: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a log written by ``append_log`` (ValueError on a corrupt or truncated file;
    with ``torn_tail_ok``, a partial last record — a process killed mid-write — is left out)."""
    if not Path(path).exists():
        return
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=True)
        try:
            for record in unpacker:
                if not isinstance(record, dict) or "step" not in record:
                    raise ValueError(f"{path}: a record is not a step-stamped map: {record!r:.80}")
                yield record
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
            raise ValueError(f"{path}: corrupt log ({e})") from None
        # A partial trailing record (a crash mid-write) stays buffered in the unpacker.
        if unpacker.tell() != os.path.getsize(path) and not torn_tail_ok:
            raise ValueError(f"{path}: truncated log (a partial record at byte {unpacker.tell()})")


def truncate_log(path: Path, upto_step: int, count: int | None = None) -> int:
    """Keep the records written before a checkpoint (resuming from it): its first ``count`` records,
    as the checkpoint counted them. Without a count (checkpoints from before the count was saved),
    the records up to the one that ends at ``upto_step``: records are in order, and a rollback
    makes steps repeat, so this keeps the prefix up to the last record stamped ``upto_step`` or
    earlier — which drops a rollback and the steps before it when the checkpoint was taken right
    after the rollback, before any new step. A torn last record (a kill mid-write, after the
    checkpoint) goes with the rest of the later ones. Returns the number of records kept."""
    path = Path(path)
    if not path.exists():
        return 0
    records = list(read_log(path, torn_tail_ok=True))
    keep = 0
    if count is not None:
        keep = min(count, len(records))
    else:
        for i, r in enumerate(records):
            if r["step"] <= upto_step:
                keep = i + 1
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for r in records[:keep]:
            f.write(msgpack.packb(r, use_bin_type=True))
    os.replace(tmp, path)
    return keep
