"""Named starting points (``--preset NAME``): functions returning a RunConfig, kept in a registry.

``debug`` is a ~8M-parameter MoE + MoD hybrid that trains on 2 CPU cores; ``debug_200m`` a small
MoE + MoD hybrid for quick GPU runs; ``b1`` ... ``b300`` are MoE (and some hybrid) models named by
their nominal *active* parameter count.

Parameter counts are read off the real parameter shapes (``lumina.model.init`` on the meta device,
nothing allocated). *Active* = parameters a token's forward pass reads: everything except the
routed experts, plus ``top_k / num_experts`` of them (shared experts always count; the tied
embedding counts once). MoD does not change it: every token may still pass through any block; MoD
saves FLOPs, not parameters.

``check_fits(cfg, device)`` refuses (``ConfigError``) a config whose train state cannot fit the
device's memory, before anything is allocated. Importing this module does not import torch (the
CLI lists the preset names in ``--help``); the counting functions import it when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from lumina.config import (
    ConfigError,
    DataConfig,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    RunConfig,
    TrainConfig,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ParamCount",
    "check_fits",
    "count_params",
    "describe",
    "device_memory",
    "get",
    "names",
    "nominal_active",
    "table",
    "train_state_bytes",
]

_REGISTRY: dict[str, Callable[[], RunConfig]] = {}
_NOMINAL: dict[str, float] = {}

CL100K_VOCAB = 100_352  # cl100k_base (100,277 ids incl. specials) padded to a multiple of 128
GPT2_VOCAB = 50_304  # gpt2 / r50k_base (50,257 ids) padded to a multiple of 128


def register(name: str, nominal_active: float | None = None):
    def deco(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        _REGISTRY[name] = fn
        if nominal_active:
            _NOMINAL[name] = nominal_active
        return fn

    return deco


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> RunConfig:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def nominal_active(name: str) -> float | None:
    """The active-parameter count a ``b*`` preset is named after (b7 -> 7e9)."""
    return _NOMINAL.get(name)


# ------------------------------------------------------------------------------------ presets


@register("debug")
def debug() -> RunConfig:
    # A hybrid small enough for 2 CPU cores: MoE FFNs in every layer (4 experts, top-2, dropless) and
    # Mixture-of-Depths routing on every other block, so layers 1 and 3 are MoD blocks with MoE FFNs.
    model = ModelConfig(
        vocab_size=GPT2_VOCAB,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_multiple_of=32,
        max_seq_len=256,
        tie_embeddings=True,
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=192),
        mod=MoDConfig(enabled=True, capacity=0.25, every_n=2),
    )
    # Eager by default: on 2 CPU cores a cold regional compile of this step (its 2 kinds of layer)
    # takes ~44 s and saves ~11 ms of a ~330 ms step: over 90 % of the step's FLOPs are the
    # 50304-wide LM head (d_model 128), which runs eagerly either way, so a 250-step run is slower
    # compiled (2 m 18 s vs 1 m 30 s, docs/training.md#compilation). `--train.compile=true` turns it on.
    train = TrainConfig(
        steps=250,
        batch_size=8,
        seq_len=128,
        lr=3e-3,
        eval_every=50,
        log_every=25,
        compile=False,
        # 128 x 50304 fp32 logits = 25.8 MB per chunk: under the 32 MiB mmap threshold lumina.allocator
        # sets, so the chunk buffers are reused from the heap (30 steps: peak RSS 1.36 vs 2.05 GB with
        # loss_chunk=0, 1.85 GB with 1024; docs/training.md)
        loss_chunk=128,
    )
    return RunConfig(model=model, train=train, data=DataConfig(tokenizer="gpt2"), preset="debug")


@register("debug_200m")
def debug_200m() -> RunConfig:
    model = ModelConfig(
        vocab_size=GPT2_VOCAB,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_dim=2048,
        max_seq_len=1024,
        tie_embeddings=True,
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=1024, pattern="every_n", every_n=2),
        mod=MoDConfig(enabled=True, capacity=0.125, every_n=2),
    )
    train = TrainConfig(steps=2000, batch_size=32, seq_len=1024, lr=1e-3, precision="bf16")
    return RunConfig(model=model, train=train, data=DataConfig(tokenizer="gpt2"), preset="debug_200m")


def _big(
    name: str,
    *,
    d: int,
    layers: int,
    heads: int,
    kv: int,
    experts: int,
    top_k: int,
    d_expert: int,
    shared: int = 0,
    mod: bool = False,
    lr: float = 3e-4,
) -> RunConfig:
    model = ModelConfig(
        vocab_size=CL100K_VOCAB,
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=128,
        ffn_dim=d_expert,
        max_seq_len=4096,
        rope_theta=500_000.0,
        moe=MoEConfig(num_experts=experts, top_k=top_k, d_expert=d_expert, num_shared_experts=shared),
        mod=MoDConfig(enabled=mod),
    )
    train = TrainConfig(
        steps=100_000,
        batch_size=512,
        micro_batch_size=8,
        seq_len=4096,
        lr=lr,
        precision="bf16",
        grad_checkpointing="full",
        eval_every=1000,
        log_every=10,
        ckpt_every=1000,
    )
    return RunConfig(model=model, train=train, data=DataConfig(tokenizer="cl100k_base"), preset=name)


# Each shape: d_model / layers / heads (head_dim 128, GQA) from the usual width-depth ladder; the
# expert width d_expert is then solved so the active count lands on the nominal size.
_BIG = {
    "b1": (1e9, dict(d=2048, layers=16, heads=16, kv=8, experts=8, top_k=2, d_expert=2048, mod=True)),
    "b7": (7e9, dict(d=4096, layers=32, heads=32, kv=8, experts=8, top_k=2, d_expert=6144)),
    "b14": (14e9, dict(d=5120, layers=40, heads=40, kv=8, experts=16, top_k=2, d_expert=8448, mod=True)),
    "b30": (30e9, dict(d=6144, layers=56, heads=48, kv=8, experts=16, top_k=2, d_expert=7680, shared=1)),
    "b50": (
        50e9,
        dict(d=7168, layers=64, heads=56, kv=8, experts=16, top_k=4, d_expert=5888, shared=1, mod=True),
    ),
    "b100": (
        100e9,
        dict(d=8192, layers=80, heads=64, kv=8, experts=32, top_k=4, d_expert=8704, shared=1, lr=2e-4),
    ),
    "b200": (
        200e9,
        dict(d=12288, layers=96, heads=96, kv=16, experts=32, top_k=4, d_expert=9216, shared=1, lr=1.5e-4),
    ),
    "b300": (
        300e9,
        dict(d=16384, layers=112, heads=128, kv=16, experts=32, top_k=4, d_expert=8192, shared=1, lr=1.2e-4),
    ),
}
for _name, (_nominal, _kw) in _BIG.items():
    register(_name, _nominal)(lambda _name=_name, _kw=_kw: _big(_name, **_kw))


# ----------------------------------------------------------------------------------- counting


class ParamCount(NamedTuple):
    active: int
    total: int


def _meta_params(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The parameter tree's tensors by dotted name, on the meta device (shapes only)."""
    from lumina import tree
    from lumina.model import init

    return tree.flatten(init(cfg, device="meta"))


def count_params(cfg: ModelConfig) -> ParamCount:
    """Active and total parameters, from the real shapes on the meta device (nothing allocated)."""
    params = _meta_params(cfg)
    total = active = 0
    E, k = cfg.moe.num_experts, cfg.moe.top_k
    for path, t in params.items():
        n = t.numel()
        total += n
        routed = ".moe.w_" in path  # routed experts [E, ...]; shared experts live under .moe.shared.
        active += n // E * k if routed else n
    return ParamCount(active, total)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def describe(name: str) -> dict[str, str]:
    """One table row for a preset."""
    m = get(name).model
    count = count_params(m)
    moe = f"{m.moe.num_experts}/{m.moe.top_k}" if m.moe.enabled else "-"
    if m.moe.num_shared_experts:
        moe += f" +{m.moe.num_shared_experts}sh"
    mod = f"{m.mod.capacity:g}/every {m.mod.every_n}" if m.mod.enabled else "-"
    nominal = nominal_active(name)
    return {
        "preset": name,
        "layers": str(m.n_layers),
        "d_model": str(m.d_model),
        "heads/kv": f"{m.n_heads}/{m.n_kv_heads}",
        "experts/top-k": moe,
        "MoD": mod,
        "vocab": str(m.vocab_size),
        "active": _human(count.active),
        "total": _human(count.total),
        "active vs nominal": f"{count.active / nominal:.3f}" if nominal else "-",
    }


def table(fmt: str = "text") -> str:
    """The preset table as aligned text or a Markdown table."""
    rows = [describe(n) for n in names()]
    cols = list(rows[0])
    if fmt == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
        return "\n".join(lines)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}

    def line(r: dict[str, str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(r[c].rjust(widths[c]) if i else r[c].ljust(widths[c]) for i, c in enumerate(cols))

    return "\n".join([line({c: c for c in cols}), *(line(r) for r in rows)])


# ------------------------------------------------------------------------------- memory check


def _state_bytes(cfg: RunConfig, params: dict[str, torch.Tensor]) -> int:
    from lumina.optim import opt_state_bytes
    from lumina.step import COMPUTE_DTYPES

    numels = [t.numel() for t in params.values()]
    fp32 = 4
    compute = COMPUTE_DTYPES[cfg.train.precision].itemsize
    per = fp32 * 2 + (compute if compute != fp32 else 0)  # weights, gradients (+ compute copy)
    if cfg.train.lora.enabled:  # a frozen (quantized) base in the compute dtype; only adapters train
        from lumina.quant import state_bytes

        frozen, adapters = state_bytes(cfg, {k: tuple(t.shape) for k, t in params.items()}, compute)
        return frozen + per * sum(adapters) + opt_state_bytes(adapters, cfg.train.optimizer)
    return per * sum(numels) + opt_state_bytes(numels, cfg.train.optimizer)


def train_state_bytes(cfg: RunConfig) -> int:
    """A floor on the device memory a training step needs, from the parameter shapes.

    Counted (see ``lumina.step``): the fp32 master weights and the optimizer state that
    ``init_train_state`` allocates (AdamW: two fp32 moments; 8-bit AdamW: uint8 codes + an fp32
    absmax per 256 elements, fp32 moments for leaves under 4096 elements —
    ``lumina.optim.opt_state_bytes``), the fp32 gradients ``grad_and_value`` returns, and for bf16 /
    fp16 the compute-dtype copy of the weights the forward reads: 16 bytes per parameter with AdamW
    (18 in bf16 / fp16), ~10 with 8-bit AdamW. Not counted, so real use is higher: activations
    (batch x sequence x width, and the routing buffers), the second gradient tree a step with
    gradient accumulation holds while summing, the new weights and moments the functional update
    builds beside the old ones (and 8-bit AdamW's dequantized fp32 moments inside the step), the
    orchestrator's snapshot ring (up to ``snapshot_ring`` + 1 copies of weights and moments, those
    in memory within ``orchestrator.snapshot_mb``: 10 % of this limit by default), eval
    batches, torch.compile workspaces and the allocator's fragmentation.
    """
    return _state_bytes(cfg, _meta_params(cfg.model))


def _cgroup_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This container's memory limit in bytes (cgroup v2 ``memory.max``, else v1's
    ``memory/memory.limit_in_bytes``); None when unlimited or unreadable."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if not text.isdigit():
            return None  # "max": no limit
        limit = int(text)
        return limit if limit < 2**60 else None  # v1 writes "unlimited" as ~2^63 rounded to a page
    return None


def device_memory(device: str | torch.device) -> tuple[int, str] | None:
    """(bytes, what they are) the device can hold at most; None where unknown (mps ...).
    CPU: physical RAM or the cgroup limit, whichever is smaller; CUDA: the device's total memory."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], "total device memory"
    if device.type == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = _cgroup_limit()
        return (limit, "cgroup memory limit") if limit is not None and limit < ram else (ram, "physical RAM")
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(cfg: RunConfig, device: str | torch.device) -> int:
    """Raise ``ConfigError`` (one line) when ``train_state_bytes(cfg)`` exceeds what ``device`` can
    hold; else return that estimate. Allocates nothing (meta-device shapes); call it before
    building the train state. A floor: passing does not promise the run fits (see
    ``train_state_bytes``), failing means it cannot."""
    params = _meta_params(cfg.model)
    n, need = sum(t.numel() for t in params.values()), _state_bytes(cfg, params)
    have = device_memory(device)
    if have is None or need <= have[0]:
        return need
    name, largest = max(params.items(), key=lambda kv: kv[1].numel())
    copy = (
        ""
        if cfg.train.precision in ("fp32", "tf32")
        else f" and the {cfg.train.precision} copy of the weights"
    )
    per = need / n
    each = f"{per:.0f}" if per == int(per) else f"~{per:.1f}"
    moments = "two 8-bit AdamW moments" if cfg.train.optimizer == "adamw8bit" else "two AdamW moments"
    if cfg.train.lora.enabled:
        base = f"{cfg.model.quant} " if cfg.model.quant != "none" else ""
        copy, moments = "", f"{moments} of the adapters; a frozen {base}base"
    raise ConfigError(
        f"model: the train state does not fit on {device}: {_human(n)} parameters (largest {name} "
        f"{list(largest.shape)}) need at least {_gib(need)} ({each} bytes each: fp32 weights, "
        f"gradients, {moments}{copy}), but it has {_gib(have[0])} ({have[1]}); "
        "shrink the model or use a device with more memory"
    )
