"""The impure driver: data -> compiled step -> metrics, logs, evals, checkpoints, report.

    result = train(cfg)                         # runs/<name>/ ...
    result = train(cfg, resume="latest")        # or a run folder, or a checkpoint folder

Everything stateful that must survive a restart lives in the train state (params, moments, step,
RNG key, loss scale, data position) and is checkpointed with it; the driver itself only holds
derived things (the compiled step, open log files, the progress display), so a resumed run makes
exactly the steps an uninterrupted one would.

The run folder ``runs/<name>/`` (``<name>-2``, ``-3``... when the name is taken and not resuming):
    config.json             the resolved config (``lumina.config.to_dict``)
    metrics.jsonl           one JSON object per line: kind = train | eval | event (see README)
    tb/                     TensorBoard event files (the same scalars)
    checkpoints/step_N/     every ``ckpt_every`` steps and at the end, newest ``keep_last`` kept
    checkpoints/best/       the state with the best eval loss so far
    observations.msgpack    the orchestrator's input, one record per observed step
    decisions.msgpack       its decisions (``python -m lumina.run replay`` re-derives them)
    report.png              loss / eval / LR / throughput / expert-load / MoD panels (at the end)

The orchestrator (``lumina.orchestrator``) sees an observation after every ``observe_every`` steps
(and after an out-of-memory error) and its decisions are applied between steps: a rollback restores
a snapshot (an in-memory ring of healthy states, else the newest checkpoint at or before the target)
while the data stream continues past the offending batches; a shape change rebuilds the compiled
step; a micro-batch change rebuilds the batch iterator at the same position in the data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from tensordict import TensorDict

from lumina import checkpoint, metrics, orchestrator, tree
from lumina.checkpoint import CheckpointError
from lumina.config import RunConfig, from_dict, to_dict
from lumina.data.mix import DataMix, MixState, build_mix
from lumina.data.tokenizer import get_tokenizer
from lumina.inject import Injector
from lumina.optim import default_hp, lr_at
from lumina.orchestrator import Decision, Observation, registry
from lumina.step import eval_step, init_train_state, make_train_step

__all__ = ["OutOfMemory", "RunResult", "find_resume", "resolve_device", "train"]


class OutOfMemory(RuntimeError):
    """A step ran out of memory and the orchestrator (off, or at its limits) could not help."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    steps: int  # optimizer steps completed (including those before a resume)
    first_eval: float | None  # eval loss at the first evaluation of this process (step 0 when fresh)
    final_eval: float | None
    best_eval: float | None
    best_step: int | None
    stopped_early: bool
    seconds: float


def resolve_device(name: str) -> torch.device:
    from lumina.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine")
    return device


def find_resume(spec: str, run_root: str | Path, name: str) -> Path:
    """The checkpoint directory ``--resume`` names: ``latest`` (the newest checkpoint of runs/<name>
    or runs/<name>-N), a run folder (its newest checkpoint) or a checkpoint folder."""
    if spec == "latest":
        root = Path(run_root)
        runs = [root / name, *sorted(root.glob(f"{name}-*"))] if root.is_dir() else []
        found = [c for r in runs for c in checkpoint.checkpoints(r)]
        if not found:
            raise CheckpointError(
                f"{root / name}: no checkpoint to resume from (train first, or --resume PATH)"
            )
        return max(found, key=lambda c: (c.stat().st_mtime, c.name))
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


def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class _Console:
    """A one-line progress bar redrawn in place on a terminal; plain log lines everywhere."""

    def __init__(self, out: TextIO, total: int):
        self.out, self.total = out, total
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._bar_shown = False

    def line(self, text: str) -> None:
        if self._bar_shown:
            self.out.write("\r\033[K")
            self._bar_shown = False
        self.out.write(text + "\n")
        self.out.flush()

    def bar(self, step: int, loss: float, tok_s: float, eta: float) -> None:
        if not self.tty:
            return
        width = 24
        done = int(width * step / max(1, self.total))
        self.out.write(
            f"\r\033[K[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.4f} "
            f"| {_fmt_rate(tok_s)} tok/s | ETA {_fmt_time(eta)}"
        )
        self.out.flush()
        self._bar_shown = True


class _Logs:
    """metrics.jsonl + TensorBoard, append-only (a resumed run keeps writing the same files)."""

    def __init__(self, run_dir: Path):
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is a dependency; tolerate its absence in embedded use
            pass

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        if self.tb is None or record["kind"] == "event":
            return
        for key, value in record.items():
            if isinstance(value, float | int) and key not in ("step", "kind"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            elif isinstance(value, list) and value and isinstance(value[0], float | int):
                layers = record.get(
                    "mod_layers" if key == "mod_ratio" else "expert_layers", range(len(value))
                )
                for layer, v in zip(layers, value, strict=False):
                    self.tb.add_scalar(f"{record['kind']}/{key}/layer{layer}", v, record["step"])

    def event(self, step: int, what: str, detail: str = "") -> None:
        self.write({"kind": "event", "step": step, "what": what, "detail": detail})

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _routing_record(m: TensorDict) -> dict[str, Any]:
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


def _eval_sets(cfg: RunConfig) -> dict[str, list[TensorDict]]:
    """Fixed held-out batches per source present in the mode: the same tokens at every eval."""
    mix = build_mix(cfg, "eval")
    sets = {}
    for src, data in (("base", mix.base), ("chat", mix.chat)):
        if data is not None:
            batches = [data.batch_at(i, cfg.train.micro_batch_size) for i in range(cfg.train.eval_batches)]
            sets[src] = [TensorDict({"inputs": x, "targets": y}, batch_size=[]) for x, y in batches]
    return sets


def _evaluate(state, sets, cfg, pad_id, device) -> dict[str, float]:
    """Token-weighted loss / accuracy per source and overall (``loss``: the mean over sources)."""
    out: dict[str, float] = {}
    for src, batches in sets.items():
        loss_sum = correct = tokens = 0.0
        for b in batches:
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


def _next_batch(mix: DataMix, mix_state: MixState, cfg: RunConfig, ratio: float):
    xs, ys, sources = [], [], []
    for _ in range(cfg.train.grad_accum):
        x, y, src, mix_state = mix.next_batch(mix_state, ratio)
        xs.append(x)
        ys.append(y)
        sources.append(src)
    return TensorDict({"inputs": torch.cat(xs), "targets": torch.cat(ys)}, batch_size=[]), sources, mix_state


def _mix_state(state: TensorDict) -> MixState:
    return MixState(**{k: int(state["data", k]) for k in ("step", "base", "chat")})


def _set_mix_state(state: TensorDict, mix_state: MixState, device) -> None:
    state["data"] = TensorDict(
        {k: torch.tensor(v, device=device) for k, v in mix_state.to_dict().items()}, batch_size=[]
    )


def _rescale_mix(mix_state: MixState, old_mb: int, new_mb: int) -> MixState:
    """The same place in the data counted in micro-batches of ``new_mb`` sequences instead of ``old_mb``."""
    return MixState(**{k: v * old_mb // new_mb for k, v in mix_state.to_dict().items()})


def _settings(cfg: RunConfig, state: TensorDict) -> dict[str, Any]:
    """What the orchestrator may change, as plain values (an observation's ``settings``)."""
    m, t = cfg.model, cfg.train
    return {
        "lr_scale": t.lr_scale,
        "weight_decay": t.weight_decay,
        "micro_batch_size": t.micro_batch_size,
        "batch_size": t.batch_size,
        "grad_checkpointing": t.grad_checkpointing,
        "num_experts": m.moe.num_experts,
        "top_k": m.moe.top_k if m.moe.enabled else 0,
        "balance": m.moe.balance if m.moe.enabled else None,
        "capacity_factor": m.moe.capacity_factor if m.moe.enabled else None,
        "mod_capacity": m.mod.capacity if m.mod.enabled else None,
        "mode": cfg.data.mode,
        "interleave_ratio": cfg.data.interleave_ratio,
        "knobs": {k: float(v) for k, v in sorted(state["knobs"].items())},
    }


class _Orchestrator:
    """The driver's side of the orchestrator: its state, logs and the snapshot ring."""

    def __init__(self, cfg: RunConfig, run_dir: Path, start: int, extra: dict[str, Any] | None):
        self.ocfg = cfg.orchestrator
        self.run_dir = run_dir
        self.obs_log = run_dir / orchestrator.OBSERVATIONS_FILE
        self.dec_log = run_dir / orchestrator.DECISIONS_FILE
        saved = (extra or {}).get("orchestrator")
        if saved is not None:
            try:
                self.ostate = orchestrator.OrchestratorState.from_dict(saved)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{run_dir}: bad orchestrator state in the checkpoint ({e})") from None
            for log_file in (self.obs_log, self.dec_log):  # steps after the checkpoint are redone
                try:
                    orchestrator.truncate_log(log_file, start)
                except ValueError as e:
                    raise CheckpointError(str(e)) from None
        else:
            self.ostate = orchestrator.init_state(start)
        self.ring: dict[int, tuple[TensorDict, RunConfig]] = {}
        self.seconds = 0.0  # time spent deciding and applying (the orchestrator's cost)
        self.snapshot_seconds = 0.0  # time spent copying states into the snapshot ring

    def snapshot(self, step: int, state: TensorDict, cfg: RunConfig) -> None:
        t0 = time.perf_counter()
        self.ring[step] = (state.clone(), cfg)
        self.snapshot_seconds += time.perf_counter() - t0

    def sync_ring(self, state: TensorDict, cfg: RunConfig, step: int) -> None:
        """Keep the states ``ostate`` lists (confirmed and pending); take the one it just asked for."""
        keep = {*self.ostate.snapshots, self.ostate.pending_snapshot}
        if step in keep and step not in self.ring:
            self.snapshot(step, state, cfg)
        for s in [s for s in self.ring if s not in keep]:
            del self.ring[s]

    def decide(self, obs: Observation) -> list[Decision]:
        t0 = time.perf_counter()
        self.ostate, decisions = orchestrator.decide(self.ostate, obs, self.ocfg)
        self.seconds += time.perf_counter() - t0
        orchestrator.append_log(self.obs_log, [obs.to_dict()])
        orchestrator.append_log(self.dec_log, [d.to_dict() for d in decisions])
        return decisions

    def restore(self, to_step: int, device) -> tuple[TensorDict, RunConfig, str]:
        """The state (and its config) at the newest snapshot at or before ``to_step``: from the ring,
        else from the run's checkpoints; else the oldest snapshot the ring has."""
        ok = [s for s in self.ring if s <= to_step]
        if ok:
            s = max(ok)
            state, cfg = self.ring[s]
            return state.clone(), cfg, f"snapshot at step {s}"
        for ckpt in reversed(checkpoint.checkpoints(self.run_dir)):
            meta = checkpoint.read_meta(ckpt)
            if meta["step"] <= to_step:
                state, _ = checkpoint.load_checkpoint(ckpt, device=str(device))
                return state, from_dict(RunConfig, meta["config"]), f"checkpoint {ckpt.name}"
        s = min(self.ring)
        state, cfg = self.ring[s]
        return state.clone(), cfg, f"snapshot at step {s} (nothing older is kept)"


def train(
    cfg: RunConfig,
    *,
    resume: str | Path | None = None,
    out: TextIO | None = None,
    step_hook: Callable[[int, TensorDict, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train ``cfg`` (resuming from ``resume``: "latest", a run folder or a checkpoint folder).
    ``step_hook(step, state, record)`` is called after every step (tests, embedding)."""
    out = out or sys.stdout
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    t = cfg.train
    if t.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    injector = Injector(t.inject)  # bad fault specs fail here, before a run folder exists
    tok = get_tokenizer(cfg.data.tokenizer)
    reg_path = registry.registry_path(cfg)
    reg_fingerprint, reg_start = registry.fingerprint(cfg), registry.start_values(cfg)
    suggestion = None
    if resume is None and cfg.orchestrator.enabled and reg_path is not None:
        found, similar = registry.suggest(
            registry.read_registry(reg_path), reg_fingerprint, reg_start, cfg.orchestrator
        )
        if found is not None:
            applied = cfg.orchestrator.registry_mode == "apply"
            suggestion = {"step": 0, "fingerprint": reg_fingerprint, "start": reg_start, "entries": similar,
                          "decision": found.to_dict(), "applied": applied}  # fmt: skip
            if applied:
                cfg = registry.apply_suggestion(found, cfg)
                t = cfg.train
    mix = build_mix(cfg, "train")
    eval_sets = _eval_sets(cfg) if t.eval_batches else {}

    state = init_train_state(cfg, device)
    resumed_from = None
    if resume is not None:
        ckpt = find_resume(str(resume), cfg.run_dir, cfg.name)
        loaded, meta = checkpoint.load_checkpoint(ckpt, device=str(device))
        checkpoint.check_compatible(loaded, state, ckpt)
        flat = tree.flatten(loaded)  # a fresh state's key order, or a compiled step recompiles once
        state, resumed_from = tree.unflatten({k: flat[k] for k in tree.flatten(state)}), ckpt
        run_dir = ckpt.parent.parent
        best = meta["extra"].get("best_eval")
        best_step = meta["extra"].get("best_step")
        bad_evals = meta["extra"].get("bad_evals", 0)
    else:
        run_dir = _fresh_run_dir(cfg)
        best, best_step, bad_evals = None, None, 0
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    logs, console = _Logs(run_dir), _Console(out, t.steps)
    if suggestion is not None:
        orchestrator.append_log(run_dir / registry.SUGGESTION_FILE, [suggestion])
        logs.write({"kind": "decision", **suggestion["decision"]})
        console.line(
            str(Decision.from_dict(suggestion["decision"]))
            + ("" if suggestion["applied"] else " [logged, not applied: orchestrator.registry_mode=log]")
        )

    count = metrics.flops_per_token(cfg.model, t.seq_len)
    peak, peak_src = metrics.peak_flops(device, t.peak_flops)
    from lumina.presets import count_params

    n = count_params(cfg.model)
    console.line(
        f"[lumina] run {run_dir} | preset {cfg.preset} | device {device} | precision {t.precision} | "
        f"compile {t.compile} | {n.active / 1e6:.2f}M active / {n.total / 1e6:.2f}M params"
    )
    console.line(
        f"[lumina] data: {cfg.data.mode} | {t.steps} steps x {t.batch_size} x {t.seq_len} tokens "
        f"({t.grad_accum} micro-batches) | MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_src})"
    )
    start = int(state["step"])
    if resumed_from is not None:
        console.line(f"[lumina] resumed from {resumed_from} at step {start}")
        logs.event(start, "resume", str(resumed_from))
    if start >= t.steps:
        console.line(f"[lumina] already at step {start} >= train.steps={t.steps}; nothing to do")

    step_fn = make_train_step(cfg, tok.pad_id)
    hp = default_hp(t, device)
    mix_state = _mix_state(state)
    first_eval = final_eval = None
    stopped_early, interrupted = False, False
    last_source = None
    extra0 = meta["extra"] if resumed_from is not None else {}
    orch = _Orchestrator(cfg, run_dir, start, extra0) if cfg.orchestrator.enabled else None
    if orch is not None:
        orch.snapshot(start, state, cfg)
    injector.fired = list(extra0.get("injected") or [])  # one-shot faults a resumed run already had
    if injector:
        console.line(f"[lumina] injecting faults: {', '.join(f.spec for f in injector.faults)}")

    def save(step: int, name: str | None = None) -> Path:
        extra = {
            "best_eval": best,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "injected": injector.fired,
        }
        if orch is not None:
            extra["orchestrator"] = orch.ostate.to_dict()
        return checkpoint.save_checkpoint(
            run_dir, state, step=step, config=to_dict(cfg), data=mix_state.to_dict(),
            extra=extra, keep_last=t.keep_last, name=name,
        )  # fmt: skip

    def run_eval(step: int) -> dict[str, float]:
        nonlocal best, best_step, bad_evals, first_eval, final_eval
        e = _evaluate(state, eval_sets, cfg, tok.pad_id, device)
        logs.write({"kind": "eval", "step": step, **e})
        first_eval = e["loss"] if first_eval is None else first_eval
        final_eval = e["loss"]
        improved = best is None or e["loss"] < best - t.min_delta
        if improved:
            best, best_step, bad_evals = e["loss"], step, 0
            if step > 0:
                save(step, name="best")
        else:
            bad_evals += 1
        per_src = " ".join(
            f"{k.removeprefix('loss_')} {v:.4f}" for k, v in e.items() if k.startswith("loss_")
        )
        console.line(
            f"[eval] step {step}: loss {e['loss']:.4f} ppl {e['ppl']:.1f} acc {e['accuracy']:.1%}"
            + (f" ({per_src})" if len(eval_sets) > 1 else "")
            + (
                " *best*"
                if improved
                else f" (best {best:.4f} @ {best_step}; {bad_evals}/{t.patience or '-'})"
            )
        )
        return e

    def act(decisions: list[Decision], step: int) -> int:
        """Execute decisions between steps; returns the step the run continues from."""
        nonlocal state, hp, cfg, t, step_fn, mix, mix_state
        for d in decisions:
            console.line(str(d))
            logs.write({"kind": "decision", **d.to_dict()})
        t0 = time.perf_counter()
        old_cfg = cfg
        for d in decisions:
            if d.action == "rollback":
                data_now = mix_state  # skip_data: the stream goes on past the offending batches
                state, snap_cfg, where = orch.restore(d.args["to_step"], device)
                # the snapshot's model shapes; every other setting decided since (LR scale, micro-batch,
                # knobs live in the state) stays: what the run learned is not rolled back
                cfg = dataclasses.replace(cfg, model=snap_cfg.model)
                _set_mix_state(
                    state, data_now if d.args.get("skip_data", True) else _mix_state(state), device
                )
                mix_state = _mix_state(state)
                step = int(state["step"])
                logs.event(step, "rollback", f"to {where}; data continues at micro-batch {mix_state.step}")
                console.line(f"[orch] rolled back to {where} (step {step})")
        state, hp, cfg = orchestrator.apply_decisions(decisions, state, hp, cfg)
        t = cfg.train
        if orchestrator.step_signature(cfg) != orchestrator.step_signature(old_cfg):
            step_fn = make_train_step(cfg, tok.pad_id)
            logs.event(step, "rebuild_step", "a decision changed a shape or a step constant")
        if t.micro_batch_size != old_cfg.train.micro_batch_size:
            mix_state = _rescale_mix(mix_state, old_cfg.train.micro_batch_size, t.micro_batch_size)
            _set_mix_state(state, mix_state, device)
        if (t.micro_batch_size, cfg.data) != (old_cfg.train.micro_batch_size, old_cfg.data):
            mix = build_mix(cfg, "train")
        orch.seconds += time.perf_counter() - t0
        return step

    if eval_sets and start == 0:
        run_eval(0)
    t_window, tok_window, t_run = time.perf_counter(), 0, time.perf_counter()
    step = start
    try:
        while step < t.steps:
            batch, sources, next_mix = _next_batch(mix, mix_state, cfg, cfg.data.interleave_ratio)
            hp["lr"] = torch.tensor(lr_at(step, t), device=device)
            t0 = time.perf_counter()
            try:
                fed_state, fed_batch, fed_hp, fired = injector.before_step(
                    step + 1, state, batch.to(device), hp, cfg, tok.vocab_size
                )
                for spec in fired:
                    logs.event(step + 1, "inject", spec)
                    console.line(f"[inject] step {step + 1}: {spec}")
                new_state, m = step_fn(fed_state, fed_batch, fed_hp)
            except torch.OutOfMemoryError as e:
                # nothing changed (the step is pure): the orchestrator may shrink the micro-batch
                what = str(e).splitlines()[0] if str(e) else "out of memory"
                logs.event(step + 1, "oom", what)
                console.line(f"[lumina] out of memory at step {step + 1} ({what})")
                decisions = []
                if orch is not None:
                    obs = Observation(step=step + 1, loss=math.nan, grad_norm=math.nan, lr=hp["lr"].item(),
                                      events=["oom"], settings=_settings(cfg, state))  # fmt: skip
                    decisions = orch.decide(obs)
                if not decisions:
                    why = "the orchestrator is off" if orch is None else "nothing left to shrink"
                    raise OutOfMemory(
                        f"out of memory at step {step + 1} with micro_batch_size={t.micro_batch_size} "
                        f"({why}; lower train.micro_batch_size or enable train.grad_checkpointing)"
                    ) from e
                step = act(decisions, step)
                continue
            if last_source is not None and sources[0] != last_source:
                logs.event(step, "phase_switch", f"data source {last_source} -> {sources[0]}")
                console.line(f"[data] step {step}: source {last_source} -> {sources[0]}")
            last_source = sources[-1]
            state, mix_state = new_state, next_mix
            _set_mix_state(state, mix_state, device)
            loss = m["loss"].item()  # the sync point: one per step
            dt = time.perf_counter() - t0
            step += 1
            tokens = m["tokens"].item()
            tok_window += tokens
            tok_s = tokens / dt
            record = {
                "kind": "train",
                "step": step,
                "loss": loss,
                "ppl": math.exp(min(loss, 80.0)),
                "accuracy": m["accuracy"].item(),
                "aux_loss": m["aux_loss"].item(),
                "lr": m["lr"].item(),
                "grad_norm": m["grad_norm"].item(),
                "tokens_per_s": tok_s,
                "mfu": count * tok_s / peak,
                "memory_mb": metrics.memory_mb(device),
                "step_s": dt,
                "source": sources[-1],
                **_routing_record(m),
            }
            if t.precision == "fp16":
                record["loss_scale"] = m["loss_scale"].item()
                record["skipped"] = bool(m["skipped"].item())
            e = None
            if eval_sets and (step % t.eval_every == 0 or step == t.steps):
                e = run_eval(step)
            decisions = []
            if orch is not None and (step % cfg.orchestrator.observe_every == 0 or not math.isfinite(loss)):
                obs = Observation(
                    step=step,
                    loss=loss,
                    grad_norm=record["grad_norm"],
                    lr=record["lr"],
                    tokens_per_s=tok_s,
                    memory_mb=record["memory_mb"],
                    eval_loss=None if e is None else e["loss"],
                    eval_losses={}
                    if e is None
                    else {k[5:]: v for k, v in e.items() if k.startswith("loss_")},
                    expert_load=record.get("expert_load", []),
                    dropped=record.get("dropped", []),
                    mod_weight=record.get("mod_router_weight", []),
                    mod_score_std=record.get("mod_score_std", []),
                    settings=_settings(cfg, state),
                )
                decisions = orch.decide(obs)
                o = orch.ostate
                record |= {"orch_health": o.health, "orch_phase": o.phase, "orch_s": orch.seconds,
                           "orch_snapshot_s": orch.snapshot_seconds}  # fmt: skip
                if o.forecast:
                    record |= {
                        f"forecast_{k}": v
                        for k, v in o.forecast.items()
                        if k in ("loss", "steps_to_plateau", "error")
                    }
            logs.write(record)
            if step_hook is not None:
                step_hook(step, state, record)
            if step == start + 1:  # the first step includes compilation: estimate from the later ones
                t_run = time.perf_counter()
            done = step - start - 1
            eta = (time.perf_counter() - t_run) / done * (t.steps - step) if done else dt * (t.steps - step)
            console.bar(step, loss, tok_s, eta)
            if step % t.log_every == 0 or step == t.steps:
                rate = tok_window / (time.perf_counter() - t_window)
                t_window, tok_window = time.perf_counter(), 0
                console.line(
                    f"step {step:>6}/{t.steps} | loss {loss:.4f} | lr {record['lr']:.2e} | "
                    f"gnorm {record['grad_norm']:.2f} | {_fmt_rate(rate)} tok/s | MFU {record['mfu']:.1%} | "
                    f"mem {record['memory_mb']:.0f} MB | ETA {_fmt_time(eta)}"
                    + (f" | health {record['orch_health']:.0f}" if "orch_health" in record else "")
                )
            if decisions:
                step = act(decisions, step)
            if orch is not None:
                orch.sync_ring(state, cfg, step)
            if e is not None and t.patience and bad_evals >= t.patience and step < t.steps:
                stopped_early = True
                logs.event(step, "early_stop", f"no eval improvement > {t.min_delta} in {t.patience} evals")
                console.line(f"[lumina] early stop at step {step}: best eval {best:.4f} at step {best_step}")
                break
            if t.ckpt_every and step % t.ckpt_every == 0 and step < t.steps:
                save(step)
    except KeyboardInterrupt:
        interrupted = True
        console.line(f"[lumina] interrupted at step {step}; saving a checkpoint")
        logs.event(step, "interrupted")
    except BaseException:
        logs.close()
        raise
    if step > start or resumed_from is None:
        path = save(step)
        logs.event(step, "checkpoint", str(path))
    logs.close()
    if not interrupted and reg_path is not None:
        counters = orch.ostate.counters if orch is not None else {}
        counts = {k.removeprefix("action:"): v for k, v in counters.items() if k.startswith("action:")}
        registry.record_run(reg_path, {
            "step": step, "name": run_dir.name, "run_dir": str(run_dir.resolve()),
            "fingerprint": reg_fingerprint, "start": reg_start,
            "effective": {"lr": t.lr * t.lr_scale, "warmup_steps": t.warmup_steps,
                          "micro_batch_size": t.micro_batch_size, "steps": t.steps},
            "decisions": counts, "injected": bool(t.inject), "stopped_early": stopped_early,
            "survived": final_eval is not None and math.isfinite(final_eval),
            "final_eval": final_eval, "best_eval": best,
        })  # fmt: skip
    report = None
    try:
        from lumina.report import write_report

        report = write_report(run_dir)
    except (ImportError, ValueError, FileNotFoundError) as e:  # a missing plot must not fail a run
        console.line(f"[lumina] no report.png: {e}")
    seconds = time.perf_counter() - t_start
    if first_eval is not None and final_eval is not None:
        console.line(
            f"[lumina] held-out loss {first_eval:.4f} -> {final_eval:.4f} "
            f"(best {best:.4f} at step {best_step}) in {_fmt_time(seconds)}"
        )
    console.line(f"[lumina] run folder: {run_dir}" + (f" (report: {report.name})" if report else ""))
    if interrupted:
        raise KeyboardInterrupt
    return RunResult(run_dir, step, first_eval, final_eval, best, best_step, stopped_early, seconds)
