"""Configuration: frozen, keyword-only dataclasses, checked and with derived fields resolved.

Fields left as ``None`` are *derived* in ``__post_init__`` (``head_dim = d_model // n_heads`` ...).
``to_dict(cfg)`` writes a derived field back as ``None`` when it still equals its derivation, so an
override of ``d_model`` re-derives ``head_dim`` instead of keeping the preset's stale value.
``from_dict(cls, data)`` builds a config from a nested dict, checking keys and types. Resolving a
config from a preset, a TOML file and CLI flags is ``lumina.configure.load_config``.

Every problem with user input raises ``ConfigError`` whose message is one line naming the source
(file and line, or the CLI flag) and the field; ``lumina.run`` prints it and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "LoRAConfig",
    "MoDConfig",
    "MoEConfig",
    "ModelConfig",
    "ORCHESTRATOR_BEFORE",
    "OrchestratorConfig",
    "RunConfig",
    "TrainConfig",
    "evidence_record",
    "from_dict",
    "to_dict",
]


class ConfigError(ValueError):
    """Bad user configuration. The message is one line naming where the problem is."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses resolve derived fields in __post_init__


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v > 0, f"{n} must be > 0, got {v}")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v >= 0, f"{n} must be >= 0, got {v}")


def _within(obj: Any, name: str, interval: str) -> None:
    """``interval`` as written in the message: "[0, 1)", "(0, 1]" ... (numeric bounds)."""
    v = getattr(obj, name)
    lo, hi = (float(b) for b in interval[1:-1].split(","))
    above = v > lo if interval[0] == "(" else v >= lo
    below = v < hi if interval[-1] == ")" else v <= hi
    _check(above and below, f"{name} must be in {interval}, got {v}")


# ----------------------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-Experts FFN. ``num_experts=0`` means a dense SwiGLU FFN in every layer."""

    num_experts: int = 0
    top_k: int = 2
    d_expert: int | None = None  # hidden size of one expert; None -> the model's ffn_dim
    num_shared_experts: int = 0  # always-on experts added to the routed ones (DeepSeek-style)
    capacity_factor: float | None = None  # None -> dropless; else capacity = ceil(cf * T * k / E)
    # dropless expert matmuls: auto | torch (F.grouped_mm: bf16) | triton | reference; see lumina.ops
    grouped_mm: Literal["auto", "torch", "triton", "reference"] = "auto"
    pattern: Literal["all", "every_n", "sandwich"] = "all"
    every_n: int = 2  # with pattern="every_n": layers n-1, 2n-1, ... are MoE, the rest dense
    renormalize: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral)
    balance: Literal["aux_loss", "bias"] = "aux_loss"  # "bias": aux-loss-free (DeepSeek-V3)
    bias_update_rate: float = 1e-3
    # Initial values of the live knobs (0-dim tensors at run time; the orchestrator may change them).
    router_temperature: float = 1.0
    router_jitter: float = 0.0
    expert_dropout: float = 0.0
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3

    def __post_init__(self) -> None:
        _non_negative(self, "num_experts", "num_shared_experts")
        if self.num_experts:
            _check(
                1 <= self.top_k <= self.num_experts,
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}",
            )
        _check(self.d_expert is None or self.d_expert > 0, f"d_expert must be > 0, got {self.d_expert}")
        cf = self.capacity_factor
        _check(cf is None or cf > 0, f"capacity_factor must be > 0 or none (dropless), got {cf}")
        _check(self.every_n >= 1, f"every_n must be >= 1, got {self.every_n}")
        _positive(self, "router_temperature")
        _non_negative(self, "router_jitter", "aux_loss_weight", "z_loss_weight", "bias_update_rate")
        _within(self, "expert_dropout", "[0, 1)")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True, kw_only=True)
class MoDConfig:
    """Mixture-of-Depths (arXiv 2404.02258): on routed layers only the top ``capacity`` fraction of
    each sequence's tokens go through the block; the rest skip it on the residual stream."""

    enabled: bool = False
    capacity: float = 0.125
    every_n: int = 2  # layers n-1, 2n-1, ... are routed (the paper routes every other block)
    predictor_loss_weight: float = 1e-2  # causal predictor used for autoregressive sampling
    predictor_hidden: int = 64  # hidden width of that predictor MLP

    def __post_init__(self) -> None:
        _within(self, "capacity", "(0, 1]")
        _positive(self, "predictor_hidden")
        _check(self.every_n >= 1, f"every_n must be >= 1, got {self.every_n}")
        _non_negative(self, "predictor_loss_weight")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE FFN."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    head_dim: int | None = None  # None -> d_model // n_heads
    ffn_dim: int | None = None  # None -> 8/3 * d_model rounded up to ffn_multiple_of (SwiGLU)
    ffn_multiple_of: int = 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attn_backend: Literal["sdpa", "flash", "reference"] = "sdpa"
    init_std: float = 0.02
    # a frozen base stored quantized (lumina.quant; bitsandbytes' formats): the attention, FFN and
    # expert matrices as int8 (a scale per row) or 4-bit nf4 / fp4 codes (a scale per 64 elements);
    # needs train.lora.rank > 0 (the adapters are what trains)
    quant: Literal["none", "int8", "nf4", "fp4"] = "none"
    moe: MoEConfig = field(default_factory=MoEConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)

    def _derived(self) -> dict[str, Any]:
        m = self.ffn_multiple_of
        return {
            "n_kv_heads": self.n_heads,
            "head_dim": self.d_model // self.n_heads if self.n_heads > 0 else None,
            "ffn_dim": m * math.ceil(8 * self.d_model / 3 / m) if m > 0 else None,
        }

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "ffn_multiple_of", "max_seq_len")
        _positive(self, "rope_theta", "norm_eps", "init_std")
        if self.head_dim is None:
            _check(
                self.d_model % self.n_heads == 0,
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} (or set head_dim)",
            )
        for name, value in self._derived().items():
            if getattr(self, name) is None:
                _set(self, name, value)
        _positive(self, "n_kv_heads", "head_dim", "ffn_dim")
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}",
        )
        _check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @property
    def expert_dim(self) -> int:
        return self.moe.d_expert or self.ffn_dim

    def moe_layers(self) -> list[bool]:
        """Which layers have an MoE FFN (the others a dense SwiGLU FFN)."""
        L, moe = self.n_layers, self.moe
        if not moe.enabled:
            return [False] * L
        if moe.pattern == "all":
            return [True] * L
        if moe.pattern == "every_n":
            return [i % moe.every_n == moe.every_n - 1 for i in range(L)]
        return [0 < i < L - 1 for i in range(L)]  # sandwich: dense first and last layers

    def mod_layers(self) -> list[bool]:
        """Which layers are Mixture-of-Depths routed."""
        n = self.mod.every_n
        return [self.mod.enabled and i % n == n - 1 for i in range(self.n_layers)]


# ----------------------------------------------------------------------------- train/data/orch


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv 2106.09685) on a frozen base (``lumina.quant``): a
    targeted matrix W [in, out] computes x W + (alpha / rank) (x A) B with A [in, rank] and B
    [rank, out] (B starts at zero: step 0 is the base model). ``rank=0``: off (every parameter trains).
    ``targets`` name matrices wherever they occur: wq/wk/wv/wo in attention, w_gate/w_up/w_down in
    dense FFNs, shared experts and the stacked routed experts (A [E, in, rank], B [E, rank, out])."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        _non_negative(self, "rank")
        _positive(self, "alpha")
        _check(bool(self.targets), "targets must name at least one matrix")
        for t in self.targets:
            _check(t in LORA_TARGETS, f"targets: unknown matrix {t!r}; choose from {', '.join(LORA_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int | None = None  # None -> batch_size (no gradient accumulation)
    seq_len: int = 256
    lr: float = 3e-4
    min_lr: float | None = None  # None -> lr / 10
    schedule: Literal["constant", "linear", "cosine", "onecycle"] = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None  # None -> round(warmup_ratio * steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # adamw8bit: moments as uint8 codes + an fp32 absmax per 256 elements (lumina.optim; bitsandbytes)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    # low-rank adapters on a frozen base (rank 0: off); with model.quant: QLoRA (lumina.quant)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # (--init-from) start from the weights of a Hugging Face Llama / Mixtral / Qwen2-MoE folder (its
    # config.json is then the model config), a Lumina checkpoint folder or run folder (its newest
    # checkpoint): the params are loaded (a LoRA run's merged), then quantized / adapted as configured;
    # the optimizer, step, schedule and data start fresh (lumina.weights, docs/export.md)
    init_from: str | None = None
    # fp8: bf16 with the attention / FFN / expert matmuls in fp8 (lumina.fp8; CUDA sm89+ or CPU)
    precision: Literal["fp32", "tf32", "bf16", "fp16", "fp8"] = "fp32"
    grad_checkpointing: Literal["none", "full", "attention"] = "none"
    # tokens per chunk of the fused LM head + cross-entropy (lumina.model.loss): the [B*T, V] logits
    # are never materialised whole; 0 = off (the plain full-logits path). 1024: a [1024, V] fp32
    # buffer per chunk (206 MB at V = 50304) and at most 32 chunks (unrolled when compiled) at 32k
    # tokens per micro-batch; the CPU debug preset uses 128 (docs/training.md)
    loss_chunk: int = 1024
    compile: bool = True
    # what train.compile compiles: "regional" — each kind of transformer layer once (every layer of the
    # kind reuses it) and the optimizer update on its own; "step" — the whole step as one graph
    # (longer compiles; no Python between the pieces). lumina.step, docs/training.md
    compile_mode: Literal["regional", "step"] = "regional"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 0  # 0 -> only at the end
    keep_last: int = 3
    patience: int = 0  # early stopping: evals without a new best eval loss before stopping; 0 = never
    min_delta: float = 0.0  # an eval loss must beat the best by more than this to count as better
    loss_scale_init: float = 65536.0  # fp16: initial dynamic loss scale
    loss_scale_window: int = 1000  # fp16: finite steps in a row before the scale doubles
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None -> lumina.metrics table
    lr_scale: float = 1.0  # multiplies the whole LR schedule (the orchestrator's LR actions change it)
    # faults the driver injects (never inside the step), e.g. "nan_grad@20", "lr_spike@200x100";
    # see lumina.inject
    inject: tuple[str, ...] = ()

    def _derived(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.batch_size,
            "min_lr": self.lr / 10,
            "warmup_steps": round(self.warmup_ratio * self.steps),
        }

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "lr", "eps", "log_every", "eval_every")
        _within(self, "warmup_ratio", "[0, 1)")
        for name, value in self._derived().items():
            if getattr(self, name) is None:
                _set(self, name, value)
        _positive(self, "micro_batch_size")
        _check(
            self.batch_size % self.micro_batch_size == 0,
            f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}",
        )
        _check(0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        _check(0 <= self.warmup_steps <= self.steps, f"warmup_steps must be in [0, steps={self.steps}]")
        _within(self, "beta1", "[0, 1)")
        _within(self, "beta2", "[0, 1)")
        _non_negative(self, "weight_decay", "clip_norm", "eval_batches", "ckpt_every")
        _non_negative(self, "patience", "min_delta", "loss_chunk")
        _check(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        _positive(self, "loss_scale_init", "loss_scale_window")
        pf = self.peak_flops
        _check(pf is None or pf > 0, f"peak_flops must be > 0 or none, got {pf}")
        _check(self.lr_scale > 0, f"lr_scale must be > 0, got {self.lr_scale}")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from. Empty file lists mean the packaged default corpora."""

    mode: Literal["base_only", "finetuning_only", "hybrid", "interleaved"] = "base_only"
    tokenizer: str = "gpt2"  # a tiktoken encoding name or a path to a local .tiktoken file
    train_files: tuple[str, ...] = ()  # .txt / .jsonl paths or globs (base text)
    eval_files: tuple[str, ...] = ()
    chat_files: tuple[str, ...] = ()  # JSONL conversations
    chat_eval_files: tuple[str, ...] = ()
    interleave_ratio: float = 0.5  # "interleaved": fraction of base (vs chat) batches
    hybrid_base_fraction: float = 0.7  # "hybrid": fraction of steps spent in the base phase
    eval_fraction: float = 0.05  # held-out share when no eval files are given
    on_bad_records: Literal["stop", "skip"] = "stop"  # stop: list the first 10 errors; skip: drop them

    def __post_init__(self) -> None:
        _within(self, "interleave_ratio", "[0, 1]")
        _within(self, "hybrid_base_fraction", "(0, 1)")
        _within(self, "eval_fraction", "(0, 1)")
        # Held-out files alone would train on the packaged corpus and evaluate on the user's files:
        # almost surely a forgotten --data, so refuse it (training files alone get a held-out split).
        flags = {"train_files": "--data", "chat_files": "--data with --mode finetuning_only"}
        for held_out, train in (("eval_files", "train_files"), ("chat_eval_files", "chat_files")):
            _check(
                not getattr(self, held_out) or bool(getattr(self, train)),
                f"{held_out} without data.{train}: held-out files need training files "
                f"(data.{train}, {flags[train]})",
            )


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """Training on several devices under torchrun (``lumina.distributed``; docs/distributed.md).

    ``train.batch_size`` stays the global batch: W ranks each run ``grad_accum / W`` of the
    micro-batches of one process with the same config, so ``grad_accum`` must divide by W."""

    # none: one process; ddp: replicated parameters, gradients all-reduced (torch's replicate);
    # fsdp: FSDP2 (parameters, gradients and moments sharded per layer); zero1/2/3: DeepSpeed ZeRO
    strategy: Literal["none", "ddp", "fsdp", "zero1", "zero2", "zero3"] = "none"
    offload: Literal["none", "cpu"] = "none"  # zero2/3: optimizer state (and zero3 params) in host memory
    reshard_after_forward: bool = True  # fsdp: free gathered layers after the forward (less memory)
    # fsdp mixed precision: the dtype parameters are all-gathered in (bf16 halves that traffic; the
    # fp32 masters stay sharded) and the dtype gradients are reduce-scattered in. "fp32": as stored
    # (the compute dtype of train.precision is applied after the gather, inside the forward)
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        _check(
            self.offload == "none" or self.strategy in ("zero2", "zero3"),
            f"dist.offload={self.offload} needs dist.strategy=zero2 or zero3, got {self.strategy}",
        )
        mixed = (self.param_dtype, self.reduce_dtype) != ("fp32", "fp32")
        _check(
            not mixed or self.strategy == "fsdp",
            f"dist.param_dtype / reduce_dtype are FSDP's mixed precision: they need dist.strategy=fsdp, "
            f"got {self.strategy}",
        )


# Confidence from evidence (OrchestratorConfig.evidence): per action label, "K/N" paired runs of
# benchmarks/orchestrator.py in which the on-run took the action and ended better than its off-run
# (``--report`` prints these entries; docs/orchestrator.md#confidence-from-evidence has the table,
# the cases and the machine). Measured on ``debug``, 150 steps, raw gate; the capacity-factor entries
# from the moe_capacity rerun at 904583a (4/5 each at 44e9380's numerics: the cut changed side).
ACTION_EVIDENCE: tuple[str, ...] = (
    "mod_capacity-=8/12", "set_knob:aux_loss_weight+=1/5", "capacity_factor+=2/5", "capacity_factor-=2/4",
    "mod_capacity+=2/4", "emergency_lr_cut-=0/3", "lr_scale-=0/2", "set_knob:expert_dropout+=1/2",
    "set_knob:router_temperature+=0/1",
)  # fmt: skip


def evidence_record(entry: str) -> tuple[str, int, int]:
    """(label, K, N) of an ``OrchestratorConfig.evidence`` entry ``LABEL=K/N``; ConfigError when it is
    not one."""
    m = re.fullmatch(r"([a-z_]+(?::[a-z_]+)?[+-]?)=(\d+)/(\d+)", entry)
    _check(
        m is not None and 0 <= int(m[2]) <= int(m[3]) and int(m[3]) > 0,
        f"evidence entry {entry!r}: expected ACTION=K/N with 0 <= K <= N, N >= 1 (e.g. lr_scale+=5/5)",
    )
    return m[1], int(m[2]), int(m[3])


@dataclass(frozen=True, kw_only=True)
class OrchestratorConfig:
    """The adaptive orchestrator (``lumina.orchestrator``): every threshold it uses, with its default.

    Levels: 1 soft, 2 medium, 3 hard, 4 critical. A detector's finding becomes a decision when its
    confidence reaches the threshold of its level (``conf_*``); the same action waits
    ``cooldown`` steps before firing again and at most ``max_changes_per_window`` changes happen per
    ``window`` steps (critical decisions — level 4: non-finite values, OOM — are exempt: they cannot
    wait; rollbacks are exempt too but capped at ``max_rollbacks_per_window``)."""

    enabled: bool = True
    observe_every: int = 1  # steps between observations
    window: int = 50  # history window (observations) for running statistics
    warmup: int = 20  # observations before statistical detectors may fire
    cooldown: int = 25  # steps before the same action may fire again
    max_changes_per_window: int = 3
    max_rollbacks_per_window: int = 3  # rollbacks skip cooldown and the change cap, but not this
    # confidence a finding needs to act, per level: soft (1), medium (2), hard (3), critical (4) — the
    # more an action changes, the surer it must be (before issue 18: 0.9 / 0.8 / 0.7 / 0.5)
    conf_soft: float = 0.7
    conf_medium: float = 0.8
    conf_hard: float = 0.9
    conf_critical: float = 0.0
    # the hard findings' (gradient explosion, divergence) doubt 1 - c of their statistic's confidence c
    # is multiplied by this, so they act at the evidence they did under conf_hard 0.7 (1/3 maps 0.7 to
    # 0.9: a grad norm 1.2x grad_abs has c 0.73 -> 0.91); 1: the raw statistic (logs before issue 18)
    hard_doubt_scale: float = 1 / 3
    # confidence from evidence: "LABEL=K/N" entries (labels as lumina.orchestrator.action_label names
    # decisions: lr_scale+ a raise, lr_scale- a cut, ...): of N paired benchmark runs whose on-run
    # took that action, K ended with a lower held-out loss than the same seed with the orchestrator
    # off (or survived where it failed). A soft or medium candidate action so measured acts at the
    # confidence min(its finding's, (K + 1) / (N + 2)), so an action that did not help is held back
    # by the gate levels above; hard and critical ones (answers to trouble too rare to measure) and
    # actions not in the table keep their finding's confidence. () : findings alone
    # (logs before issue 18's evidence table). The default is ACTION_EVIDENCE, measured by
    # benchmarks/orchestrator.py (docs/orchestrator.md#confidence-from-evidence)
    evidence: tuple[str, ...] = ACTION_EVIDENCE
    snapshot_every: int = 10  # steps between in-memory snapshots for rollback (healthy steps only)
    snapshot_ring: int = 3
    # where the ring's copies live (lumina.driver.rollback): in memory (on the state's device) while
    # the ones there plus the new one fit in snapshot_mb, else spilled to run_dir/.snapshots/ (one
    # safetensors file each). Unset: snapshot_memory x the run's memory limit (CUDA: the device's
    # total; CPU: the cgroup or physical limit per local rank), 2 GiB when the limit is unknown.
    # 0: every snapshot on disk. Distributed engines keep theirs in memory (shards).
    snapshot_mb: float | None = None
    snapshot_memory: float = 0.1
    # loss spike: robust z-score (x - median) / (1.4826 MAD) over the last spike_window observations
    spike_window: int = 20
    spike_z: float = 6.0
    spike_min_rel: float = 0.1  # ...and at least this much above the median (relative)
    spike_rollback_z: float = 20.0  # a spike this many MADs and ...
    spike_rollback_rel: float = 0.5  # ... this much above the median rolls back (smaller: recorded;
    # a second one within the window lowers the LR)
    # divergence: the loss EMA rises by this fraction above its minimum over the window
    diverge_rel: float = 0.2
    # gradient explosion: above grad_abs, or grad_rel x the window median
    grad_abs: float = 100.0
    grad_rel: float = 10.0
    grad_persist: int = 3  # ...for this many observations in a row (relative test only)
    emergency_lr_factor: float = 0.1
    # a gradient explosion's cut never takes the LR scale below this (one x0.1 cut from the configured
    # LR; non-finite recovery may go lower). On debug at LR x10 (benchmarks/orchestrator.py lr_high,
    # seeds 1 and 4) the grad norm passed 100 again at 0.1x and 0.01x the LR: cuts compounded to
    # 0.001x and the runs ended 0.38-0.42 above the off-runs. 0: no floor (logs before this field)
    emergency_lr_floor: float = 0.1
    # observations without trouble after a gradient-explosion cut before the LR scale it cut comes
    # back (once a run; a cut after that stays). 0: never (logs before this field)
    emergency_recover: int = 20
    soft_lr_factor: float = 0.5
    min_lr_scale: float = 1e-3  # the LR multiplier never goes below this
    # LR overshoot at the start: no LR warm-up and the grad norm after the first update > overshoot_ratio
    # x the first one (debug preset, 20 seeds: <= 2.86 at its LR, 16 of 20 above 3 at 3x; with its
    # warm-up <= 1.32) -> lr_scale x overshoot_lr_factor, once. 0: off (logs before this field)
    overshoot_ratio: float = 3.0
    overshoot_lr_factor: float = 0.5
    # LR too low: over the last lr_low_window observations at the current LR scale (past the LR
    # warm-up: the unscaled LR not rising), a straight-line fit of the loss falls lr_low_snr x its
    # residual noise or more, the window's second half falls >= lr_low_linearity x as fast as its
    # first (a steady descent: a good LR's early drop decelerates, 0.05-0.5 within 2 observations
    # of the detector warm-up on the debug preset), no loss spike, the grad norm's second-half
    # median <= lr_low_grad_rise x the first half's, not near convergence (forecast_ease_rel);
    # for lr_low_patience observations in a row -> lr_scale x lr_raise_factor, up to lr_raise_max.
    # After any LR cut or rollback the LR scale never rises again above where it was left.
    lr_low_window: int = 20
    lr_low_snr: float = 12.0
    lr_low_linearity: float = 0.7
    lr_low_grad_rise: float = 1.5
    # ... and the run still early on its curve: -d loss / d ln(step) >= this x the loss (slope x step /
    # loss; debug preset at LR 3e-4: 0.13-0.28 over steps 27-58; a power law 4 + 6/sqrt(t) with noise
    # 0.002: < 0.1 from step ~65, while its 50-observation halves are < 0.45x as fast)
    lr_low_elasticity: float = 0.1
    lr_low_patience: int = 3
    lr_raise_factor: float = 2.0  # 1: never raise (logs before issue 18)
    lr_raise_max: float = 10.0  # the LR scale a raise may reach (10: a 10x too low LR recovers)
    # plateau: |slope| of the window's loss below plateau_slope (per step, relative) and low variance
    plateau_slope: float = 1e-4
    plateau_patience: int = 100  # steps the plateau must last before acting
    # oscillation: the sign of the loss difference flips in this fraction of steps, with amplitude
    oscillation_flips: float = 0.8
    oscillation_amp: float = 0.1  # relative amplitude (std of differences / median loss)
    # chronic findings (routing, capacity, memory) gain confidence while they persist:
    # conf_n = 1 - (1 - conf_1) * persist_decay^(n-1) after n observations in a row
    persist_decay: float = 0.8
    # experts
    # collapse: a layer's effective number of experts exp(load entropy) <= k + margin * (E - k)
    collapse_margin: float = 0.25
    collapse_patience: int = 50  # observations in a row before acting on it
    dead_share: float = 0.02  # load share below this (x E: of a uniform share) is a dead expert
    dead_patience: int = 50  # steps an expert must stay dead before it is pruned
    overflow_drop: float = 0.05  # mean dropped fraction above this -> raise the capacity factor
    # ... below this for slack_patience observations in a row -> lower it (compute spent on padding
    # slots); between the two nothing changes, so a lowered factor is not raised straight back
    slack_drop: float = 0.01
    slack_patience: int = 50
    capacity_step: float = 1.25
    min_capacity_factor: float = 1.0
    max_capacity_factor: float = 4.0
    allow_expert_changes: bool = True  # add/prune experts (changes shapes: recompiles)
    min_experts: int = 2
    max_experts: int = 64
    # MoD: mean router weight sigmoid(r) of the selected tokens
    mod_high: float = 0.95  # saturated: the block is wanted at full strength -> more capacity
    mod_min_score_std: float = 1e-4  # router scores this close together: collapsed -> reset the router
    mod_capacity_step: float = 1.5
    mod_max_capacity: float = 0.5
    # every routed layer's selected-token weight below mod_low for slack_patience observations in a
    # row: the blocks add little to the tokens they take -> lower the capacity (not below the min)
    mod_low: float = 0.1
    mod_min_capacity: float = 0.0625
    # resources
    # memory pressure above memory_high x this budget; unset: x the device's memory (CUDA: its total;
    # CPU: the cgroup or physical limit shared by the ranks on the machine; lumina.metrics)
    memory_budget_mb: float | None = None
    memory_high: float = 0.9
    throughput_drop: float = 0.5  # tokens/s below this x the window median
    # micro-batch growth (an opportunity): with more than one micro-batch per step, double the
    # micro-batch (halving the accumulation: the batch is kept) when 2 x the peak memory stays below
    # grow_memory x the limit (memory_budget_mb, else the device's). Judged over grow_window
    # observations after the first grow_settle at the new size (a rebuilt step, a warming allocator):
    # kept when the median tokens/s beats the grow_window before by grow_gain, else shrunk back and
    # never tried again; memory pressure shrinks a grown micro-batch back first
    grow_micro_batch: bool = True
    grow_memory: float = 0.7
    grow_gain: float = 0.05
    grow_settle: int = 3
    grow_window: int = 10
    # run registry (lumina.orchestrator.registry): "auto" = <run_dir>/.registry, "none" = no registry
    registry: str = "auto"
    registry_mode: Literal["off", "log", "apply"] = "log"  # suggestions at start: logged or applied
    registry_max_distance: float = 1.0  # fingerprint distance of a "similar" run
    registry_min_runs: int = 2  # similar successful runs needed before suggesting
    registry_top: int = 3  # the best this many of them are averaged
    # convergence forecast: fit loss ~ a + b ln(step) over the window, checked every forecast_every
    forecast_every: int = 25
    forecast_horizon: int = 100
    # near convergence: a forecast whose fitted curve still falls but by less than forecast_ease_rel
    # (relative) over the next forecast_horizon steps (0.5 %: a fitted slope ~5e-5 of the loss per
    # step at step >= 100, half the plateau threshold; the debug preset's runs at its LR forecast
    # >= 1 % to step 250), once the loss EMA is forecast_min_fall below the first loss -> once per
    # run the LR scale x forecast_ease_factor and evaluations forecast_eval_factor x as often
    # (train.eval_every / factor, at least 1); 0: never (logs before issue 18). No LR raise then.
    forecast_ease_rel: float = 0.005
    forecast_min_fall: float = 0.1
    forecast_ease_factor: float = 0.5
    forecast_eval_factor: int = 2

    def __post_init__(self) -> None:
        _positive(self, "observe_every", "window", "snapshot_every", "snapshot_ring", "forecast_every")
        _positive(
            self, "spike_z", "grad_abs", "grad_rel", "grad_persist", "capacity_step", "mod_capacity_step"
        )
        _non_negative(self, "cooldown", "warmup", "max_rollbacks_per_window", "registry_max_distance")
        _check(
            self.snapshot_mb is None or self.snapshot_mb >= 0,
            f"snapshot_mb must be >= 0 (or unset), got {self.snapshot_mb}",
        )
        _within(self, "snapshot_memory", "[0, 1]")
        _within(self, "grow_memory", "(0, 1]")
        _non_negative(self, "grow_gain", "grow_settle")
        _positive(self, "grow_window")
        _check(
            self.max_changes_per_window >= 1,
            f"max_changes_per_window must be >= 1, got {self.max_changes_per_window}",
        )
        for n in ("conf_soft", "conf_medium", "conf_hard", "conf_critical"):
            _within(self, n, "[0, 1]")
        _within(self, "persist_decay", "[0, 1)")
        _positive(self, "registry_min_runs", "registry_top", "slack_patience", "min_capacity_factor")
        _check(
            0 <= self.slack_drop < self.overflow_drop,
            f"slack_drop must be in [0, overflow_drop={self.overflow_drop}), got {self.slack_drop}",
        )
        _check(
            0 <= self.mod_low < self.mod_high,
            f"mod_low must be in [0, mod_high={self.mod_high}), got {self.mod_low}",
        )
        _check(
            0 < self.mod_min_capacity <= self.mod_max_capacity,
            f"mod_min_capacity must be in (0, mod_max_capacity={self.mod_max_capacity}], "
            f"got {self.mod_min_capacity}",
        )
        _check(
            self.min_capacity_factor <= self.max_capacity_factor,
            f"min_capacity_factor ({self.min_capacity_factor}) must be <= max_capacity_factor "
            f"({self.max_capacity_factor})",
        )
        _within(self, "emergency_lr_factor", "(0, 1)")  # an emergency cut must cut
        _within(self, "emergency_lr_floor", "[0, 1]")
        _non_negative(self, "emergency_recover")
        _within(self, "soft_lr_factor", "(0, 1)")
        _within(self, "overshoot_lr_factor", "(0, 1)")
        _check(
            self.overshoot_ratio == 0 or self.overshoot_ratio > 1,
            f"overshoot_ratio must be > 1 (or 0: off), got {self.overshoot_ratio}",
        )
        _check(self.min_experts >= 2, f"min_experts must be >= 2, got {self.min_experts}")
        _check(
            self.max_experts >= self.min_experts,
            f"max_experts={self.max_experts} must be >= min_experts={self.min_experts}",
        )
        _within(self, "mod_max_capacity", "(0, 1]")
        mb = self.memory_budget_mb
        _check(mb is None or mb > 0, f"memory_budget_mb must be > 0 or none, got {mb}")
        _within(self, "hard_doubt_scale", "(0, 1]")
        for entry in self.evidence:
            evidence_record(entry)
        _check(
            4 <= self.lr_low_window <= self.window,
            f"lr_low_window must be in [4, window={self.window}], got {self.lr_low_window}",
        )
        _positive(self, "lr_low_snr", "lr_low_grad_rise", "lr_low_patience", "forecast_eval_factor")
        _non_negative(self, "lr_low_elasticity")
        _within(self, "lr_low_linearity", "[0, 1]")
        _check(self.lr_raise_factor >= 1, f"lr_raise_factor must be >= 1, got {self.lr_raise_factor}")
        _check(self.lr_raise_max >= 1, f"lr_raise_max must be >= 1, got {self.lr_raise_max}")
        _within(self, "forecast_ease_rel", "[0, 1)")
        _within(self, "forecast_ease_factor", "(0, 1]")
        _within(self, "forecast_min_fall", "[0, 1)")


# OrchestratorConfig fields added after run folders were first written, with the value that gives the
# orchestrator as it was before each existed: ``replay`` fills them in where a run's config.json lacks
# them, so older logs replay bit for bit (a new run's config.json holds every field).
ORCHESTRATOR_BEFORE: dict[str, Any] = {
    "evidence": (),
    "hard_doubt_scale": 1.0,
    "lr_raise_factor": 1.0,
    "forecast_ease_rel": 0.0,
    "emergency_lr_floor": 0.0,
    "emergency_recover": 0,
    "overshoot_ratio": 0.0,
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preset: str = "custom"
    name: str | None = None  # None -> the preset name
    run_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda when available, else cpu

    def _derived(self) -> dict[str, Any]:
        return {"name": self.preset}

    def __post_init__(self) -> None:
        for name, value in self._derived().items():
            if getattr(self, name) is None:
                _set(self, name, value)
        _check(bool(re.fullmatch(r"[\w.-]+", self.name)), f"name={self.name!r}: use letters, digits, . _ -")
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        moe = self.model.moe
        dropless_moe = moe.enabled and moe.capacity_factor is None  # where the grouped matmul runs
        _check(  # fp8 runs its expert GEMMs in bf16 (lumina.fp8), so it qualifies too
            not dropless_moe or moe.grouped_mm != "torch" or self.train.precision in ("bf16", "fp8"),
            "model.moe.grouped_mm=torch needs train.precision=bf16 (torch's grouped_mm is bf16-only), "
            f"got {self.train.precision}",
        )
        quant, lora = self.model.quant, self.train.lora
        _check(
            quant == "none" or lora.enabled,
            f"model.quant={quant} freezes the base weights: set train.lora.rank > 0 (the adapters train)",
        )
        _check(
            quant == "none" or self.train.precision != "fp8",
            f"model.quant={quant} does not combine with train.precision=fp8; use bf16",
        )
        _check(
            self.device == "auto" or re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", self.device) is not None,
            f"device={self.device!r}: expected auto, cpu, cuda or cuda:N",
        )


# ------------------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config; derived fields that still equal their derivation become None."""
    derived = cfg._derived() if hasattr(cfg, "_derived") else {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif f.name in derived and v == derived[f.name]:
            v = None
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or none"
    if origin is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _coerce(value: Any, tp: Any, *, from_cli: bool) -> Any:
    """Convert ``value`` (a TOML value, or a CLI string when ``from_cli``) to type ``tp``.
    Raises TypeError with a short reason on mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], from_cli=from_cli)
    if origin is Literal:
        if value in args:
            return value
        raise TypeError(f"expected {_describe(tp)}, got {value!r}")
    if origin is tuple:
        if from_cli:
            return tuple(s for s in (p.strip() for p in value.split(",")) if s)
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise TypeError(f"expected {_describe(tp)}, got {value!r}")
    if from_cli:
        try:
            if tp is bool:
                if value.lower() in _TRUE | _FALSE:
                    return value.lower() in _TRUE
                raise ValueError
            return tp(value)
        except ValueError:
            raise TypeError(f"expected {_describe(tp)}, got {value!r}") from None
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TypeError(f"expected {_describe(tp)}, got {value!r}")


# Names other libraries use for our fields, so a familiar-but-wrong key gets a useful suggestion.
_ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "hidden_size": "d_model",
    "dim": "d_model",
    "num_layers": "n_layers",
    "num_hidden_layers": "n_layers",
    "num_heads": "n_heads",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "n_kv": "n_kv_heads",
    "intermediate_size": "ffn_dim",
    "vocab": "vocab_size",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "max_position_embeddings": "max_seq_len",
    "n_experts": "num_experts",
    "experts": "num_experts",
    "topk": "top_k",
    "k": "top_k",
}


def _did_you_mean(key: str, options: Iterable[str]) -> str:
    options = list(options)
    if _ALIASES.get(key) in options:
        return f" (did you mean '{_ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def from_dict(
    cls: type,
    data: Mapping[str, Any],
    *,
    where: str = "",
    origin: Mapping[str, str] | None = None,
    from_cli: frozenset[str] = frozenset(),
) -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys and types.

    ``origin`` maps a dotted key to where its value came from ("my.toml:12", "--train.lr"), used to
    prefix error messages; keys in ``from_cli`` hold unparsed CLI strings.
    """
    origin = origin or {}
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}{key}"
        src = origin.get(path, "")
        prefix = f"{src}: " if src else ""
        if key not in names:
            raise ConfigError(f"{prefix}unknown key '{path}'{_did_you_mean(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}'{path}' must be a table of fields, got {value!r}")
            kwargs[key] = from_dict(tp, value, where=f"{path}.", origin=origin, from_cli=from_cli)
            continue
        if value is None:
            kwargs[key] = None  # to_dict's marker for "derive it" / an explicit none
            continue
        try:
            kwargs[key] = _coerce(value, tp, from_cli=path in from_cli)
        except TypeError as e:
            where_ = src if src.startswith("--") else f"{prefix}{path}"  # a CLI flag already names it
            raise ConfigError(f"{where_}: {e}") from None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        section = where.rstrip(".") or "run"
        files = sorted({origin[k].split(":")[0] for k in origin if k.startswith(where) and ":" in origin[k]})
        src = f"{', '.join(files)}: " if files else ""
        raise ConfigError(f"{src}{section}: {e}") from None
    except TypeError as e:  # a required field is missing
        missing = re.search(r"argument: '(\w+)'", str(e))
        what = f"'{where}{missing.group(1)}'" if missing else str(e)
        raise ConfigError(f"{where.rstrip('.') or 'run'}: missing required field {what}") from None
