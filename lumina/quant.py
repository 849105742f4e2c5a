"""A frozen, quantized base with trainable low-rank adapters (QLoRA, Dettmers et al. 2023,
arXiv 2305.14314; LoRA, Hu et al. 2021) as data in the params tree and pure functions over it.

Legend: N rows (tokens), I a matrix's input dim, O its output dim, R the LoRA rank, E experts,
A expert-sorted rows, C capacity.

**Layout.** ``model.quant`` (int8 | nf4 | fp4) and ``train.lora`` change the params tree that
``init_train_state`` builds (``prepare``). A projection matrix — attention wq/wk/wv/wo, dense FFN,
shared- and routed-expert w_gate/w_up/w_down (experts stacked: [E, I, O]) — that is quantized or
adapted becomes a sub-tree in place of its tensor::

    layers.0.attn.wq.nf4          uint8 [I, O/2]      two 4-bit codes per byte (nf4 or fp4 key)
    layers.0.attn.wq.absmax       fp32 [ceil(I*O/64)]  the scale of each 64 consecutive elements
    layers.0.attn.wq.int8         int8 [I, O]          (int8: one code per element, and ...)
    layers.0.attn.wq.absmax       fp32 [I]             (... the absmax of each row)
    layers.0.attn.wq.weight       the plain base matrix (LoRA without quantization; compute dtype)
    layers.0.attn.wq.lora_a       fp32 [I, R]          trainable, U(-1/sqrt(I), 1/sqrt(I))
    layers.0.attn.wq.lora_b       fp32 [R, O]          trainable, zero: step 0 is the base model
    layers.0.attn.wq.lora_scale   fp32 []              alpha / rank

The sub-tree describes itself: ``apply`` needs no quantization config (the key names the format, the
codes' shape the matrix's), and a checkpoint holds exactly what trains and what is frozen. Blocks are
bitsandbytes' formats (``torch.ops.bitsandbytes.quantize_4bit`` with block size 64;
``int8_vectorwise_quant``: row-wise absmax), called as custom ops — their ``autograd.Function``s
(``matmul_4bit``, ``Linear4bit``) fail under ``torch.func`` (no ``setup_context``). Measured on
N(0, 1) [256, 512] weights: relative error (||W - deq(W)|| / ||W||) 0.092 nf4, 0.122 fp4, 0.0075
int8 (it grows with the row length: 0.0083 at rows of 2048); bytes per weight 0.5625 (4-bit: half a
byte + 4 per 64), 1 + 4 / row length (int8). The embedding, LM head,
norms and routers are not quantized (as QLoRA leaves them); with LoRA on, they are frozen too and,
like every frozen float, stored in the compute dtype (bf16 with ``train.precision=bf16``).

**What trains.** With ``train.lora.rank > 0`` only the ``lora_a`` / ``lora_b`` leaves
(``split``): the train step differentiates them alone (``torch.func.grad_and_value`` over the
trainable sub-tree, the frozen one closed over), the optimizer state covers them alone, and the frozen
leaves pass through the step unchanged (bit for bit; a test checks). The MoE balance bias is frozen
too.

**The quantized matmul** is the custom op ``lumina::quant_mm`` (fake + autograd; opcheck clean):
``x @ deq(W)`` (``torch.matmul``: [..., I] @ [I, O], or batched [E, C, I] @ [E, I, O] for capacity
buffers) or, given expert ``counts``, the grouped matmul over expert segments (``lumina.ops``). Its
backward saves only the codes and scales — never the dequantized matrix, which plain autograd through
``x @ dequantize(W)`` would keep for every layer until the backward — and dequantizes again to form
grad_x = g @ deq(W)^T, which is the same op with ``transpose`` flipped (so it is differentiable
again). There is no gradient for the frozen codes. As with every Lumina op, the model goes through an
``autograd.Function`` with the same formula (``lumina_kernels._autograd``: ``torch.func.grad`` cannot
use a custom op's ``register_autograd`` in torch 2.13).

``merge(params)`` turns an adapted tree back into a plain full-precision one: W = deq(W) +
(alpha / rank) A @ B per matrix (a test checks its logits against the adapted model's).
"""

from __future__ import annotations

import math
import re

import torch
from tensordict import TensorDict

from lumina import ops, tree
from lumina.config import ConfigError, RunConfig
from lumina_kernels._autograd import apply as _apply
from lumina_kernels._autograd import op_function

__all__ = [
    "ADAPTER_KEYS",
    "FORMATS",
    "QUANT_BLOCK",
    "adapted_mm",
    "bytes_per_weight",
    "check_available",
    "dequantize",
    "frozen_base",
    "is_frozen_leaf",
    "is_projection",
    "join",
    "merge",
    "prepare",
    "quant_mm",
    "quantize",
    "split",
    "state_bytes",
    "summary",
    "weight_format",
]

FORMATS = ("int8", "nf4", "fp4")
QUANT_BLOCK = 64  # elements per absmax of the 4-bit formats (bitsandbytes' and QLoRA's default)
ADAPTER_KEYS = ("lora_a", "lora_b")  # the leaves that train when the base is frozen
_SUBTREE_KEYS = frozenset((*FORMATS, "absmax", "weight", "lora_a", "lora_b", "lora_scale"))
_PROJECTION = re.compile(r"(?:^|\.)(?:attn\.w[qkvo]|(?:ffn|moe|moe\.shared)\.w_(?:gate|up|down))$")


def frozen_base(cfg: RunConfig) -> bool:
    """Whether the run trains adapters only (``train.lora.rank > 0``)."""
    return cfg.train.lora.enabled


def is_projection(path: str) -> bool:
    """Whether the dotted ``path`` is a matrix ``model.quant`` and LoRA apply to."""
    return _PROJECTION.search(path) is not None


def is_frozen_leaf(path: str) -> bool:
    """A leaf of a quantized / adapted sub-tree that never trains: codes, scales, the base matrix."""
    parent, _, leaf = path.rpartition(".")
    return leaf in _SUBTREE_KEYS and leaf not in ADAPTER_KEYS and is_projection(parent)


# ------------------------------------------------------------------------------------ formats


def check_available() -> None:
    """Raise ``ConfigError`` (one line) when bitsandbytes, which ``model.quant`` needs, is missing."""
    _bitsandbytes()


def _bitsandbytes() -> None:
    """Import bitsandbytes (registers ``torch.ops.bitsandbytes.*``); ``ConfigError`` when missing."""
    from lumina.optim import _bitsandbytes as load  # one place imports bitsandbytes (and its quirks)

    if not torch.compiler.is_compiling():
        load("model.quant")


def quantize(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """``{fmt: codes, "absmax": scales}`` of matrix ``w`` [..., I, O] (see the module docstring).
    4-bit formats need an even O (two codes per byte, along O)."""
    _bitsandbytes()
    w32 = w.detach().float().contiguous()
    if fmt == "int8":
        codes, absmax, _ = torch.ops.bitsandbytes.int8_vectorwise_quant(w32.reshape(-1, w.shape[-1]))
        return {"int8": codes.view(w.shape), "absmax": absmax.view(w.shape[:-1])}
    if fmt not in ("nf4", "fp4"):
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if w.shape[-1] % 2:
        raise ValueError(f"{fmt} packs two codes per byte along the last dim: it must be even, got {w.shape}")
    codes, absmax = torch.ops.bitsandbytes.quantize_4bit(w32, QUANT_BLOCK, fmt, torch.uint8)
    return {fmt: codes.view(*w.shape[:-1], w.shape[-1] // 2), "absmax": absmax}


def weight_format(w: TensorDict) -> str | None:
    """The quantization format of a weight sub-tree, None for a plain ``weight``."""
    return next((f for f in FORMATS if f in w), None)


def _shape(codes: torch.Tensor, fmt: str) -> list[int]:
    return [*codes.shape[:-1], codes.shape[-1] * (1 if fmt == "int8" else 2)]


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """The matrix ``quantize`` encoded, in ``dtype``."""
    _bitsandbytes()
    # bitsandbytes' kernels read the codes as flat memory: a non-contiguous view (e.g. the
    # column-major copy generate.decode_layout once made of every matrix) decodes to garbage
    codes = codes.contiguous()
    if fmt == "int8":
        rows = torch.ops.bitsandbytes.int8_vectorwise_dequant(
            codes.reshape(-1, codes.shape[-1]), absmax.reshape(-1)
        )
        return rows.view(codes.shape).to(dtype)
    # bitsandbytes' CPU kernel writes fp32 / bf16 / fp16 only (an fp64 output came back as garbage)
    direct = dtype in (torch.float32, torch.bfloat16, torch.float16)
    w = torch.ops.bitsandbytes.dequantize_4bit(
        codes, absmax, QUANT_BLOCK, fmt, _shape(codes, fmt), dtype if direct else torch.float32
    )
    return w if direct else w.to(dtype)


def bytes_per_weight(fmt: str, shape: tuple[int, ...], dtype_bytes: int = 4) -> float:
    """Storage of a matrix of ``shape`` in ``fmt`` ("none": ``dtype_bytes`` per element), in bytes."""
    n = math.prod(shape)
    if fmt == "none":
        return float(n * dtype_bytes)
    if fmt == "int8":
        return float(n + 4 * n // shape[-1])
    return float(n / 2 + 4 * -(-n // QUANT_BLOCK))


# --------------------------------------------------------------------------- the quantized matmul


@torch.library.custom_op("lumina::quant_mm", mutates_args=())
def _quant_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    counts: torch.Tensor | None,
    fmt: str,
    transpose: bool,
    grouped_mm: str,
) -> torch.Tensor:
    """x @ W (``transpose``: x @ W^T) with W = dequantize(codes, absmax, fmt) in x's dtype; with
    ``counts`` the grouped matmul of expert-sorted rows x [A, I] by W [E, I, O] (``grouped_mm``: the
    implementation, ``model.moe.grouped_mm``). W exists only inside this call."""
    with torch.no_grad():  # an op body: nothing here is differentiated (its formula is below)
        w = dequantize(codes, absmax, fmt, x.dtype)
        if transpose:
            w = w.transpose(-1, -2)
        if counts is None:
            return torch.matmul(x, w)
        return ops.grouped_mm(x, w, counts, grouped_mm)


@_quant_mm.register_fake
def _(x, codes, absmax, counts, fmt, transpose, grouped_mm):
    rows, cols = _shape(codes, fmt)[-2:]
    out = rows if transpose else cols
    if counts is not None:
        return x.new_empty(x.shape[0], out)
    lead = torch.broadcast_shapes(x.shape[:-2], codes.shape[:-2])
    return x.new_empty(*lead, x.shape[-2], out)


def _quant_mm_forward(x, codes, absmax, counts, fmt, transpose, grouped_mm):
    return torch.ops.lumina.quant_mm.default(x, codes, absmax, counts, fmt, transpose, grouped_mm)


def _quant_mm_grad(inputs, g):
    """grad_x = g @ W^T: the op again with ``transpose`` flipped, from the saved codes and scales
    (x is not saved: W is frozen, so no weight gradient needs it)."""
    _, codes, absmax, counts, fmt, transpose, grouped_mm = inputs
    grad_x = _apply(_QUANT_MM, g, codes, absmax, counts, fmt, not transpose, grouped_mm)
    return grad_x, None, None, None, None, None, None


# saves inputs 1-3 (codes, absmax, counts) only; x reaches the backward as its shape
_QUANT_MM = op_function("lumina::quant_mm", _quant_mm_forward, _quant_mm_grad, save=(1, 2, 3))
torch.library.register_autograd("lumina::quant_mm", _QUANT_MM.backward, setup_context=_QUANT_MM.setup_context)


def quant_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    fmt: str,
    *,
    counts: torch.Tensor | None = None,
    transpose: bool = False,
    grouped_mm: str = "auto",
) -> torch.Tensor:
    """``x @ dequantize(codes, absmax)`` differentiable in x (under torch.func and torch.compile),
    keeping only the codes for the backward. Without ``counts``: ``torch.matmul`` (x [..., I] with a
    matrix, or x [E, C, I] with stacked [E, I, O]); with them, the grouped expert matmul."""
    if counts is None and x.dim() < codes.dim():
        raise ValueError(f"quant_mm: x {list(x.shape)} must have at least the matrix's {codes.dim()} dims")
    return _apply(_QUANT_MM, x, codes, absmax, counts, fmt, transpose, grouped_mm)


def adapted_mm(x: torch.Tensor, w, mm=torch.matmul, *, counts=None, grouped_mm: str = "auto") -> torch.Tensor:
    """``mm(x, w)`` where ``w`` is a tensor or a quantized / adapted sub-tree (module docstring):
    base (``quant_mm`` for codes, ``mm`` for a plain ``weight``) + mm(mm(x, lora_scale * A), B).
    ``counts`` / ``grouped_mm``: the expert segments when ``mm`` is the grouped matmul."""
    if not isinstance(w, TensorDict):
        return mm(x, w)
    fmt = weight_format(w)
    if fmt is None:
        y = mm(x, w["weight"])
    else:
        y = quant_mm(x, w[fmt], w["absmax"], fmt, counts=counts, grouped_mm=grouped_mm)
    if "lora_a" in w:  # the scale folded into A ([I, R]), not applied to the [N, O] output
        y = y + mm(mm(x, w["lora_a"] * w["lora_scale"]), w["lora_b"])
    return y


# ------------------------------------------------------------------------- the params of a run


def _leaf_generator(seed: int, path: str) -> torch.Generator:
    from lumina.model.transformer import _leaf_seed

    return torch.Generator().manual_seed(_leaf_seed(seed, path))


def prepare(params: TensorDict, cfg: RunConfig, base_dtype: torch.dtype = torch.float32) -> TensorDict:
    """The params a run trains from, given full-precision ``params`` (a fresh init or loaded weights):
    unchanged without LoRA; else the projections quantized (``model.quant``) or kept as ``weight``,
    adapters on the ``train.lora.targets`` (A drawn from (seed, path), B zero), every other frozen
    float in ``base_dtype`` (the compute dtype). Adapters are fp32 masters."""
    quant, lora = cfg.model.quant, cfg.train.lora
    if not lora.enabled:
        return params
    out: dict[str, torch.Tensor] = {}
    for path, w in tree.flatten(params).items():
        name = path.rsplit(".", 1)[-1]
        targeted = is_projection(path) and name in lora.targets
        if not is_projection(path) or (quant == "none" and not targeted):
            out[path] = w.to(base_dtype) if w.is_floating_point() else w
            continue
        if quant != "none":
            try:
                out.update({f"{path}.{k}": v for k, v in quantize(w, quant).items()})
            except ValueError as e:
                raise ConfigError(f"model.quant={quant}: {path}: {e}") from None
        else:
            out[f"{path}.weight"] = w.to(base_dtype)
        if targeted:
            *lead, n_in, n_out = w.shape
            bound = 1 / math.sqrt(n_in)  # PEFT's A init (kaiming_uniform, a = sqrt(5))
            u = torch.rand((*lead, n_in, lora.rank), generator=_leaf_generator(cfg.seed, f"{path}.lora_a"))
            out[f"{path}.lora_a"] = ((2 * u - 1) * bound).to(w.device)
            out[f"{path}.lora_b"] = torch.zeros((*lead, lora.rank, n_out), device=w.device)
            out[f"{path}.lora_scale"] = torch.tensor(lora.alpha / lora.rank, device=w.device)
    return tree.unflatten(out)


def state_bytes(
    cfg: RunConfig, shapes: dict[str, tuple[int, ...]], compute_bytes: int
) -> tuple[int, list[int]]:
    """(bytes of the frozen base, element counts of the adapter leaves) ``prepare`` makes for params
    of these shapes (by path): the sizing ``lumina.presets.check_fits`` needs, from shapes alone."""
    q, lora = cfg.model.quant, cfg.train.lora
    frozen, adapters = 0.0, []
    for path, shape in shapes.items():
        projection = is_projection(path)
        fmt = q if projection else "none"
        frozen += bytes_per_weight(fmt, shape, compute_bytes)
        if projection and path.rsplit(".", 1)[-1] in lora.targets:
            lead = math.prod(shape[:-2])
            adapters += [lead * shape[-2] * lora.rank, lead * lora.rank * shape[-1]]
            frozen += 4  # lora_scale
    return int(frozen), adapters


def split(params: TensorDict) -> tuple[TensorDict, TensorDict]:
    """(trainable, frozen): the adapter leaves and all the others, by key name."""
    flat = tree.flatten(params)
    train = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}
    return tree.unflatten(train), tree.unflatten({k: v for k, v in flat.items() if k not in train})


def join(trainable: TensorDict, frozen: TensorDict, like: TensorDict | None = None) -> TensorDict:
    """One params tree of the two halves ``split`` made, in ``like``'s key order when given (a
    compiled step guards on the order of its inputs)."""
    flat_t, flat_f = tree.flatten(trainable), tree.flatten(frozen)
    keys = tree.flatten(like).keys() if like is not None else [*flat_f, *flat_t]
    return tree.unflatten({k: flat_t[k] if k in flat_t else flat_f[k] for k in keys})


def _merged(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    fmt = next((f for f in FORMATS if f in parts), None)
    if fmt is not None:
        w = dequantize(parts[fmt], parts["absmax"], fmt, torch.float32)
    else:
        w = parts["weight"].float()
    if "lora_a" in parts:
        w = w + parts["lora_scale"].float() * (parts["lora_a"].float() @ parts["lora_b"].float())
    return w


def merge(params: TensorDict) -> TensorDict:
    """A plain fp32 params tree (the layout ``lumina.model.init`` makes) of a quantized / adapted
    one: W = dequantize(codes) (or the base weight) + lora_scale * A @ B per matrix; every other
    float leaf in fp32. A plain tree comes back as an fp32 copy."""
    flat = tree.flatten(params)
    out: dict[str, torch.Tensor | None] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        parent, _, leaf = k.rpartition(".")
        if leaf in _SUBTREE_KEYS and is_projection(parent):
            parts.setdefault(parent, {})[leaf] = v
            out.setdefault(parent, None)  # the matrix keeps its place in the key order
        else:
            out[k] = v.float() if v.is_floating_point() else v
    if parts:
        _bitsandbytes()
    for parent, p in parts.items():
        out[parent] = _merged(p)
    return tree.unflatten(out)


def summary(params: TensorDict, cfg: RunConfig) -> str:
    """One header line for a run with a frozen base: what trains and what the frozen weights take."""
    flat = tree.flatten(params)
    trainable = sum(v.numel() for k, v in flat.items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS)
    frozen = sum(
        v.numel() * v.element_size() for k, v in flat.items() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS
    )
    lora, q = cfg.train.lora, cfg.model.quant
    base = f"{q}-quantized" if q != "none" else "frozen"
    return (
        f"[lumina] LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {','.join(lora.targets)}: "
        f"{trainable / 1e6:.3f}M trainable params; {base} base {frozen / 2**20:.1f} MiB"
    )
