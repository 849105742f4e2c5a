"""Fault injection for the driver (``--inject`` / ``train.inject``): never inside the pure step.

Each spec names a fault and the optimizer step it hits (steps as logged: the first step is 1):

    lr_spike@S[xF][:N]     steps S .. S+N-1 run with F x the scheduled LR (F = 100, N = 1)
    nan_grad@S             step S computes non-finite loss and gradients (a NaN is written into
                           the final norm's weight of the state fed to that step; its update then
                           spreads NaN to every weight, as a real overflow does)
    loss_spike@S           before step S every weight gets Gaussian noise of 0.3 x its tensor's RMS
                           (the loss jumps and stays up until retrained or rolled back)
    bad_batch@S            step S trains on uniformly random tokens (a corrupt shard)
    oom@S                  step S raises torch.OutOfMemoryError once
    oom@micro_batch>N      every step with micro-batch size > N raises torch.OutOfMemoryError
    expert_collapse@S      before step S every MoE router column is set to column 0's: every expert
                           scores the same, so top-k sends every token to the same k experts
    mod_collapse@S         before step S every MoD router is zeroed: it cannot tell tokens apart
    oom@.../rankR          under --dist: rank R alone runs out of memory (oom@5/rank1); every rank
                           books the fault as fired, and all of them back off together

One-shot faults fire once per run, also across a rollback that replays their step, and also across
a resume (the fired ones are stored in the checkpoint). Noise is drawn from the counter-based RNG
seeded by the run's seed and the step, so an injected run is reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from tensordict import TensorDict

from lumina import tree
from lumina.config import ConfigError, RunConfig
from lumina.model import random

__all__ = ["Fault", "Injector", "parse"]

_KINDS = ("lr_spike", "nan_grad", "loss_spike", "bad_batch", "oom", "expert_collapse", "mod_collapse")
_SPEC = re.compile(r"(?P<kind>[a-z_]+)@(?:(?P<step>\d+)(?:x(?P<factor>[0-9.e+-]+))?(?::(?P<n>\d+))?"
                   r"|micro_batch>(?P<mb>\d+))(?:/rank(?P<rank>\d+))?")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Fault:
    spec: str
    kind: str
    step: int | None = None  # None: a condition (oom@micro_batch>N)
    factor: float = 100.0
    steps: int = 1
    micro_batch_above: int | None = None
    rank: int | None = None  # None: every rank


def parse(specs: tuple[str, ...] | list[str]) -> list[Fault]:
    """Faults from ``train.inject`` specs; a bad spec is a ConfigError naming it."""
    out = []
    for spec in specs:
        m = _SPEC.fullmatch(spec.strip())
        if m is None or m["kind"] not in _KINDS:
            raise ConfigError(
                f"train.inject: {spec!r} is not a fault spec (want KIND@STEP, e.g. nan_grad@20, "
                f"lr_spike@200x100, oom@micro_batch>4; kinds: {', '.join(_KINDS)})"
            )
        if m["mb"] is not None and m["kind"] != "oom":
            raise ConfigError(f"train.inject: {spec!r}: only oom takes a micro_batch>N condition")
        if m["rank"] is not None and m["kind"] != "oom":
            raise ConfigError(f"train.inject: {spec!r}: only oom takes /rankR")
        if (m["factor"] or m["n"]) and m["kind"] != "lr_spike":
            raise ConfigError(f"train.inject: {spec!r}: only lr_spike takes xFACTOR and :STEPS")
        try:
            factor = float(m["factor"]) if m["factor"] else 100.0
        except ValueError:
            raise ConfigError(f"train.inject: {spec!r}: bad factor {m['factor']!r}") from None
        step = int(m["step"]) if m["step"] is not None else None
        if step is not None and step < 1 and m["kind"] not in ("expert_collapse", "mod_collapse"):
            raise ConfigError(f"train.inject: {spec!r}: steps count from 1")
        out.append(
            Fault(spec.strip(), m["kind"], step=step, factor=factor, steps=int(m["n"] or 1),
                  micro_batch_above=int(m["mb"]) if m["mb"] is not None else None,
                  rank=int(m["rank"]) if m["rank"] is not None else None)
        )  # fmt: skip
    return out


class InjectedOOM(torch.OutOfMemoryError):
    """An out-of-memory error raised by ``oom@...`` (caught where a real one would be)."""


class Injector:
    """Applies the faults to what the driver feeds the step. ``fired``: one-shot faults done."""

    def __init__(self, specs, fired: list[str] | None = None, rank: int = 0):
        self.faults = parse(specs)
        self.fired: list[str] = list(fired or [])
        self.rank = rank  # this process's rank (faults with /rankR hit that rank only)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _due(self, f: Fault, step: int) -> bool:
        return f.step is not None and f.spec not in self.fired and f.step <= step

    def corrupts(self, step: int) -> bool:
        """Whether a fault that rewrites the state (not the batch or the LR) fires before ``step``."""
        kinds = ("nan_grad", "loss_spike", "expert_collapse", "mod_collapse")
        return any(f.kind in kinds and f.rank is None and self._due(f, step) for f in self.faults)

    def before_step(
        self, step: int, state: TensorDict, batch: TensorDict, hp: TensorDict, cfg: RunConfig, vocab: int
    ) -> tuple[TensorDict, TensorDict, TensorDict, list[str]]:
        """(state, batch, hp) to feed step ``step`` and the specs that fired. Raises InjectedOOM."""
        fired = []
        for f in self.faults:
            if f.rank is not None and f.rank != self.rank:  # another rank's: booked, not applied
                if f.step is not None and self._due(f, step):
                    self.fired.append(f.spec)
                continue
            if f.kind == "oom":
                if f.micro_batch_above is not None and cfg.train.micro_batch_size > f.micro_batch_above:
                    raise InjectedOOM(f"injected {f.spec}: micro_batch_size={cfg.train.micro_batch_size}")
                if self._due(f, step):
                    self.fired.append(f.spec)
                    raise InjectedOOM(f"injected {f.spec}")
                continue
            if f.kind == "lr_spike":  # once: steps replayed after a rollback run clean
                if f.spec not in self.fired and f.step <= step < f.step + f.steps:
                    hp = hp.clone()
                    hp["lr"] = hp["lr"] * f.factor
                    fired.append(f.spec)
                    if step == f.step + f.steps - 1:
                        self.fired.append(f.spec)
                continue
            if not self._due(f, step):
                continue
            self.fired.append(f.spec)
            fired.append(f.spec)
            key = random.fold_in(random.key_from_seed(cfg.seed, batch["inputs"].device), step)
            if f.kind == "bad_batch":
                u = random.uniform(key, batch["inputs"].shape)
                tokens = (u * vocab).long().clamp(max=vocab - 1)
                batch = TensorDict({"inputs": tokens, "targets": tokens.roll(-1, dims=1)}, batch_size=[])
            else:
                state = _corrupt(f.kind, state, cfg, key)
        return state, batch, hp, fired


def _corrupt(kind: str, state: TensorDict, cfg: RunConfig, key: torch.Tensor) -> TensorDict:
    flat = tree.flatten(state)
    new = dict(flat)
    if kind == "nan_grad":
        w = flat["params.final_norm.weight"].clone()
        w[0] = math.nan
        new["params.final_norm.weight"] = w
    elif kind == "loss_spike":
        for i, k in enumerate(
            sorted(k for k in flat if k.startswith("params.") and flat[k].is_floating_point())
        ):
            p = flat[k]
            u1 = random.uniform(random.fold_in(key, 2 * i), p.shape).clamp(min=1e-7)
            u2 = random.uniform(random.fold_in(key, 2 * i + 1), p.shape)
            normal = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)  # Box-Muller
            new[k] = p + 0.3 * p.float().pow(2).mean().sqrt().to(p.dtype) * normal.to(p.dtype)
    elif kind == "expert_collapse":
        for k in flat:
            if k.startswith("params.") and k.endswith(".moe.router"):
                r = flat[k]
                new[k] = r[:, :1].expand_as(r).clone()
    elif kind == "mod_collapse":
        for k in flat:
            if k.startswith("params.") and k.endswith(".mod.router"):
                new[k] = torch.zeros_like(flat[k])
    return tree.unflatten(new)
