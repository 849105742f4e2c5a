"""Everything a run needs before its first step: the resolved config, the device, the tokenizer and
data, the train state (fresh or resumed), the run folder, the logs — gathered in one ``Run``.

``Run`` is the driver's mutable context: the loop's named steps read and replace its fields (the
train state, hyper-parameters, config, compiled step, data) instead of sharing closures. Nothing in it
needs saving that the checkpoint does not already hold.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from tensordict import TensorDict

from lumina import allocator, checkpoint, metrics, optim, quant, tree, weights
from lumina.checkpoint import CheckpointError
from lumina.config import ConfigError, RunConfig
from lumina.data.mix import DataMix, MixState, build_mix
from lumina.data.tokenizer import Tokenizer, get_tokenizer
from lumina.distributed.engines import DistEnv, Engine, make_engine
from lumina.driver import ranks
from lumina.driver.console import Console, Logs
from lumina.driver.evaluation import eval_sets
from lumina.driver.registry import RunRegistry
from lumina.inject import Injector
from lumina.optim import default_hp
from lumina.orchestrator import step_signature
from lumina.presets import check_fits, count_params
from lumina.step import init_train_state, make_train_step

__all__ = ["Run", "build_step", "find_resume", "mix_state_of", "prepare_run", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine")
    return device


def find_resume(spec: str, run_root: str | Path, name: str) -> Path:
    """The checkpoint directory ``--resume`` names: a checkpoint folder; a run folder (its complete
    checkpoint with the highest step); or ``latest``: of runs/<name> and runs/<name>-N, the run whose
    newest complete checkpoint was written last (by its metadata file's time: deleting old
    checkpoints touches folder times, never that file's)."""
    if spec == "latest":
        root = Path(run_root)
        runs = [root / name, *sorted(root.glob(f"{name}-*"))] if root.is_dir() else []
        newest = [found[-1] for r in runs if (found := checkpoint.checkpoints(r))]
        if not newest:
            raise CheckpointError(
                f"{root / name}: no checkpoint to resume from (train first, or --resume PATH)"
            )
        return max(newest, key=lambda c: ((c / checkpoint.META_FILE).stat().st_mtime, c.name))
    path = Path(spec)
    if (path / checkpoint.META_FILE).exists():
        return path
    if (path / "checkpoints").is_dir():
        return checkpoint.latest(path)
    raise CheckpointError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints")


def _fresh_run_dir(cfg: RunConfig) -> Path:
    root = Path(cfg.run_dir)
    candidate, n = root / cfg.name, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = root / f"{cfg.name}-{n}"
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


@dataclasses.dataclass(eq=False)
class Run:
    """The driver's context (see the module docstring)."""

    cfg: RunConfig
    device: torch.device
    tok: Tokenizer
    run_dir: Path
    logs: Logs
    console: Console
    injector: Injector
    registry: RunRegistry
    state: TensorDict
    hp: TensorDict
    mix: DataMix
    mix_state: MixState
    eval_sets: dict[str, list[TensorDict]]  # fixed held-out batches per data source
    step_fn: Callable[[TensorDict, TensorDict, TensorDict], tuple[TensorDict, TensorDict]]
    start: int  # the step this process started at
    step: int  # optimizer steps done
    resumed_from: Path | None
    extra: dict[str, Any]  # the resumed checkpoint's bookkeeping ({} when fresh)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    env: DistEnv | None = None  # this rank's place under torchrun (None: one process)
    engine: Engine | None = None  # the distributed engine the state lives in (None: one process)
    interrupt_requested: bool = False  # a signal arrived: stop at the next step boundary (ranks together)
    restore_signals: Callable[[], None] = lambda: None  # puts back the handlers defer_interrupts replaced
    # what memory_mb may reach (metrics.memory_limit_mb; the smallest over the ranks): the
    # orchestrator's memory-pressure limit when orchestrator.memory_budget_mb is unset
    memory_limit_mb: float = 0.0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0, or the only process)."""
        return self.env is None or self.env.is_main

    def rebuild_engine(self) -> None:
        """Hand the (full) ``self.state`` to a new engine of ``self.cfg`` (after a change of shapes
        or a state that is not the engine's own: a checkpoint, a full-state decision)."""
        self.engine = make_engine(self.cfg, self.env, self.state, self.tok.pad_id)
        self.state, self.step_fn = self.engine.state, self.engine.step

    def set_mix_state(self, mix_state: MixState) -> None:
        self.mix_state = mix_state
        self.state["data"] = TensorDict(
            {k: torch.tensor(v, device=self.device) for k, v in mix_state.to_dict().items()}, batch_size=[]
        )

    def reconfigure(self, old: RunConfig) -> list[str]:
        """Bring the compiled step and the data in line with ``self.cfg`` after a change from ``old``;
        returns what was rebuilt."""
        rebuilt = []
        new_t, old_t = self.cfg.train, old.train
        if self.engine is not None and self.cfg != old:
            self.engine.cfg = self.cfg  # the engine's step reads the train settings from it
        if self.engine is None and step_signature(self.cfg) != step_signature(old):
            self.step_fn = build_step(self.cfg, self.tok.pad_id)
            rebuilt.append("step")
        if new_t.micro_batch_size != old_t.micro_batch_size:  # the same place, counted in new units
            ms = self.mix_state.to_dict()
            mb0, mb1 = old_t.micro_batch_size, new_t.micro_batch_size
            self.set_mix_state(MixState(**{k: v * mb0 // mb1 for k, v in ms.items()}))
        if (new_t.micro_batch_size, self.cfg.data) != (old_t.micro_batch_size, old.data):
            self.mix = build_mix(self.cfg, "train")
            rebuilt.append("data")
        return rebuilt


def mix_state_of(state: TensorDict) -> MixState:
    """The data position a train state holds, as plain ints."""
    return MixState(**{k: int(state["data", k]) for k in ("step", "base", "chat")})


def build_step(cfg: RunConfig, pad_id: int):
    """The (compiled) train step of ``cfg``: the one place the driver makes it."""
    return make_train_step(cfg, pad_id)


def _resume(cfg: RunConfig, resume: str | Path, device: torch.device, template: TensorDict):
    ckpt = find_resume(str(resume), cfg.run_dir, cfg.name)
    loaded, meta = checkpoint.load_checkpoint(ckpt, device=str(device))
    saved = (meta["config"].get("train") or {}).get("optimizer", "adamw")
    if saved != cfg.train.optimizer:  # the states differ in kind, not only in shape
        raise CheckpointError(
            f"{ckpt}: saved with train.optimizer={saved}, this run uses {cfg.train.optimizer} "
            "(optimizer states are not converted); resume with the same optimizer"
        )
    checkpoint.check_compatible(loaded, template, ckpt)
    if (problem := optim.opt_format_problem(loaded["opt"])) is not None:
        raise CheckpointError(f"{ckpt}: {problem}")
    flat = tree.flatten(loaded)  # a fresh state's key order, or a compiled step recompiles once
    state = tree.unflatten({k: flat[k] for k in tree.flatten(template)})
    counts = meta["extra"].get("orchestrator_logs", [None, None])  # (checked before anything is written)
    if not (isinstance(counts, list) and len(counts) == 2 and all(_log_count(c) for c in counts)):
        raise CheckpointError(f"{ckpt}: bad orchestrator log counts in the checkpoint: {counts!r}")
    return ckpt, state, meta["extra"]


def _log_count(c: Any) -> bool:
    return c is None or (type(c) is int and c >= 0)


def prepare_run(cfg: RunConfig, *, resume: str | Path | None, out: TextIO) -> Run:
    """Resolve, load and create everything; print the run's header. Bad input raises before the
    run folder exists (a config, fault spec, tokenizer or data problem leaves nothing behind)."""
    t_start = time.perf_counter()
    allocator.tune()  # large CPU buffers stay with the process between steps (lumina.allocator)
    env = ranks.start(cfg)  # None for one process; refuses --dist without torchrun
    device = env.device if env is not None else resolve_device(cfg.device)
    check_fits(cfg, device)  # from the parameter shapes, before anything is allocated
    if cfg.train.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    injector = Injector(cfg.train.inject)  # bad fault specs fail here
    tok = get_tokenizer(cfg.data.tokenizer)
    if resume is None and cfg.train.init_from:  # a foreign Hugging Face folder's own tokenizer.json
        weights.check_tokenizer(cfg.train.init_from, tok)
    reg = RunRegistry(cfg)
    if resume is None:
        cfg = reg.suggest(cfg)
    cfg, split_note = ranks.fit_micro_batch(cfg, env)
    ranks.agree(env, ranks.config_payload(cfg), "the resolved config")
    mix = build_mix(cfg, "train")
    held_out = eval_sets(cfg) if cfg.train.eval_batches else {}
    start_params, source = None, None
    if resume is None and cfg.train.init_from:  # a fine-tune: trained weights, everything else fresh
        start_params, source = weights.load_params(cfg.train.init_from, cfg.model, device)
    state = init_train_state(cfg, device, params=start_params)
    resumed_from, extra = None, {}
    if resume is not None:
        resumed_from, state, extra = _resume(cfg, resume, device, state)
        run_dir = resumed_from.parent.parent
    elif env is not None:
        run_dir = ranks.shared_run_dir(env, lambda: _fresh_run_dir(cfg))
    else:
        run_dir = _fresh_run_dir(cfg)
    main = env is None or env.is_main
    injector.rank = env.rank if env is not None else 0
    cleaned = checkpoint.clean(run_dir) if main else []
    if main:  # the resolved config, derived fields filled in (checkpoints keep the re-derivable form)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    logs = Logs(run_dir) if main else ranks.NullLogs()
    console = Console(out if main else ranks.null_out(), cfg.train.steps)
    injector.fired = list(extra.get("injected") or [])  # one-shot faults a resumed run already had
    start = int(state["step"])
    run = Run(
        cfg=cfg, device=device, tok=tok, run_dir=run_dir, logs=logs, console=console, injector=injector,
        registry=reg, state=state, hp=default_hp(cfg.train, device), mix=mix, eval_sets=held_out,
        mix_state=mix_state_of(state),
        step_fn=build_step(cfg, tok.pad_id) if env is None else None, start=start, step=start,
        resumed_from=resumed_from, extra=extra, t_start=t_start, env=env,
        memory_limit_mb=metrics.memory_limit_mb(device),
    )  # fmt: skip
    if env is not None:
        run.rebuild_engine()
        run.restore_signals = ranks.defer_interrupts(run)  # (one process: lumina.loop.train)
        if split_note:
            console.line(f"[dist] {split_note}")
        # one collective: the largest train state and the smallest memory limit over the ranks
        state_mb, neg_limit = ranks.max_over_ranks(env, ranks.local_mb(run.state), -run.memory_limit_mb)
        run.memory_limit_mb = -neg_limit
        logs.write({"kind": "dist", "step": start, "strategy": cfg.dist.strategy,
                    "world_size": env.world_size, "state_mb_per_rank": state_mb})  # fmt: skip
    if main:
        reg.log_suggestion(run_dir, logs.write, console.line)
    _header(run, cleaned, source)
    return run


def _header(run: Run, cleaned: list[str], init_from: Path | None = None) -> None:
    cfg, t, line = run.cfg, run.cfg.train, run.console.line
    n = count_params(cfg.model)
    peak, peak_src = metrics.peak_flops(run.device, t.peak_flops, t.precision)
    line(
        f"[lumina] run {run.run_dir} | preset {cfg.preset} | device {run.device} | precision {t.precision} | "
        f"compile {t.compile} | {n.active / 1e6:.2f}M active / {n.total / 1e6:.2f}M params"
    )
    if run.env is not None:
        line(
            f"[lumina] dist: {cfg.dist.strategy} on {run.env.world_size} ranks | "
            f"{t.grad_accum // run.env.world_size} micro-batches of {t.micro_batch_size} per rank per step | "
            f"train state {ranks.local_mb(run.state):.0f} MB on rank {run.env.rank}"
        )
    line(
        f"[lumina] data: {cfg.data.mode} | {t.steps} steps x {t.batch_size} x {t.seq_len} tokens "
        f"({t.grad_accum} micro-batches) | MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_src})"
    )
    if run.mix.eval_note:
        line(f"[data] {run.mix.eval_note}")
    for what in cleaned:
        line(f"[lumina] removed checkpoints/{what}")
        run.logs.event(run.start, "cleanup", what)
    if init_from is not None:
        line(f"[lumina] weights from {init_from}")
    if quant.frozen_base(cfg):
        line(quant.summary(run.state["params"], cfg))
    if run.resumed_from is not None:
        line(f"[lumina] resumed from {run.resumed_from} at step {run.start}")
        run.logs.event(run.start, "resume", str(run.resumed_from))
    if run.start >= t.steps:
        line(f"[lumina] already at step {run.start} >= train.steps={t.steps}; nothing to do")
    if run.injector:
        line(f"[lumina] injecting faults: {', '.join(f.spec for f in run.injector.faults)}")
