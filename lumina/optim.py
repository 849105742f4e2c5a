"""Functional AdamW, learning-rate schedules and global-norm clipping: pure functions on TensorDicts.

AdamW (decoupled weight decay, Loshchilov & Hutter):
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr * wd * mask * p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
with the same update order and bias corrections as ``torch.optim.AdamW`` (a test compares them).
Weight decay applies to matrices only (``ndim >= 2``): norms, biases and the MoE balance bias are
never decayed. Hyper-parameters that may change during a run (lr, weight decay, clip norm) are 0-dim
tensors in ``hp``, so a compiled step never recompiles when they change.

8-bit AdamW (``train.optimizer=adamw8bit``; Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", the format of ``bitsandbytes.optim.AdamW8bit``): the same arithmetic on moments
stored as uint8 codes. A leaf of ``MIN_8BIT_SIZE`` (4096) elements or more keeps, per moment, uint8
codes in the parameter's shape and one fp32 ``absmax`` per ``BLOCK`` (256) consecutive elements of
the flattened leaf; a code indexes a 256-entry map (``m``: bitsandbytes' signed dynamic map, ``v``:
its unsigned one, since v >= 0) scaled by its block's absmax. Smaller leaves (norms, biases, small
routers) keep fp32 moments, as bitsandbytes does. Each step dequantizes, runs the fp32 AdamW
arithmetic above (the parameter update uses the fresh fp32 moments) and quantizes the new moments,
with bitsandbytes' pure custom ops ``torch.ops.bitsandbytes.{quantize,dequantize}_blockwise``
(they have fake implementations: the step still compiles to one graph). State per 8-bit leaf:
2 bytes + 8 bytes per 256 elements instead of AdamW's 8 bytes per element (0.254x).
"""

from __future__ import annotations

import logging
import math
import sys

import torch
from tensordict import TensorDict

from lumina import tree
from lumina.config import ConfigError, TrainConfig
from lumina.shards import is_dtensor, placed_like, whole
from lumina_kernels import native

__all__ = [
    "BLOCK",
    "MIN_8BIT_SIZE",
    "adamw8bit_init",
    "check_available",
    "adamw8bit_update",
    "adamw_init",
    "adamw_update",
    "clip_by_global_norm",
    "default_hp",
    "get_moments",
    "global_norm",
    "init_opt",
    "lr_at",
    "opt_state_bytes",
    "opt_format_problem",
    "put_moments",
    "quant_maps",
    "update",
]

BLOCK = 256  # elements per absmax (bitsandbytes' blockwise optimizers use 256)
MIN_8BIT_SIZE = 4096  # smaller leaves keep fp32 moments (bitsandbytes' ``min_8bit_size`` default)


def adamw_init(params: TensorDict) -> TensorDict:
    """First and second moments, fp32, zero."""
    zeros = params.apply(lambda p: torch.zeros_like(p, dtype=torch.float32))
    return TensorDict({"m": zeros, "v": zeros.clone()}, batch_size=[])


def global_norm(grads: TensorDict) -> torch.Tensor:
    """sqrt(sum of squares) over all leaves, summed in sorted-key order: a tree's insertion order
    (which differs between a fresh state and one loaded from a checkpoint) must not change the bits.

    Eager on CPU, fp32 plain tensors, the native kernel (``lumina_native::global_norm``): one pass
    at memory bandwidth, float64 sums in a fixed order, so the same bits whatever the thread count
    (torch's per-leaf ``vector_norm`` reads fp32 at about a third of the bandwidth and sums in fp32).
    Elsewhere (a compiled step, CUDA, DTensor shards, other dtypes), torch's norms: the two agree to
    the rounding of torch's fp32 sums (relative ~1e-5 over millions of elements), not bit for bit."""
    flat = tree.flatten(grads)
    leaves = [flat[k] for k in sorted(flat)]
    if _NATIVE_NORM and _plain_fp32_cpu(leaves):
        return torch.ops.lumina_native.global_norm([g.contiguous() for g in leaves])
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in leaves]))


_NATIVE_NORM = native.has_op("global_norm")


def _plain_fp32_cpu(ts: list[torch.Tensor]) -> bool:
    """Eager (a compiled graph fuses torch's norms itself), and every tensor a plain fp32 CPU one."""
    return (
        bool(ts)
        and not torch.compiler.is_compiling()
        and all(type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
    )


def clip_factor(norm: torch.Tensor, clip_norm: torch.Tensor) -> torch.Tensor:
    """What multiplies gradients of global norm ``norm`` so it is at most ``clip_norm`` (0 disables)."""
    return torch.where(clip_norm > 0, torch.clamp(clip_norm / (norm + 1e-6), max=1.0), torch.ones_like(norm))


def clip_by_global_norm(grads: TensorDict, clip_norm: torch.Tensor) -> tuple[TensorDict, torch.Tensor]:
    """Scale ``grads`` so their global norm is at most ``clip_norm`` (0 disables). Returns the
    clipped grads and the norm before clipping. (The train step passes the factor to the optimizer
    instead, ``grad_scale``: the fused update applies it on the fly, no pass over the gradients.)"""
    norm = global_norm(grads)
    scale = clip_factor(norm, clip_norm)
    return grads.apply(lambda g: g * scale.to(g.dtype)), norm


def _adamw_math(
    p32: list[torch.Tensor],
    g32: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    decay: list[int],
    step: torch.Tensor,
    hp: TensorDict,
    cfg: TrainConfig,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The AdamW arithmetic on lists of fp32 tensors: (new params, new m, new v). ``decay``: the
    indices of the leaves that take weight decay."""
    b1, b2, eps = cfg.beta1, cfg.beta2, cfg.eps
    lr, wd = hp["lr"], hp["weight_decay"]
    t = step.to(torch.float32)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    # The same arithmetic as torch.optim.AdamW, on whole lists of tensors (torch._foreach_*: one
    # dispatch per op for all leaves instead of one per leaf; pure — every op returns new tensors).
    m = torch._foreach_add(torch._foreach_mul(m, b1), torch._foreach_mul(g32, 1 - b1))
    v = torch._foreach_add(
        torch._foreach_mul(v, b2), torch._foreach_mul(torch._foreach_mul(g32, g32), 1 - b2)
    )
    p32 = _decayed(p32, decay, lr * wd)
    denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(v, bc2)), eps)
    step_ = torch._foreach_div(torch._foreach_mul(torch._foreach_div(m, bc1), lr), denom)
    return torch._foreach_sub(p32, step_), m, v


def _decayed(p32: list[torch.Tensor], decay: list[int], lr_wd: torch.Tensor) -> list[torch.Tensor]:
    """``p32`` with the leaves at the indices ``decay`` multiplied by 1 - lr * wd (new tensors, one
    foreach call); the others as they are."""
    out = list(p32)
    if decay:
        for i, d in zip(decay, torch._foreach_mul([p32[i] for i in decay], 1 - lr_wd), strict=True):
            out[i] = d
    return out


def adamw_update(
    params: TensorDict,
    grads: TensorDict,
    opt: TensorDict,
    step: torch.Tensor,
    hp: TensorDict,
    cfg: TrainConfig,
    grad_scale: torch.Tensor | None = None,
) -> tuple[TensorDict, TensorDict]:
    """One AdamW step (``step`` counts from 1) on ``grads`` times ``grad_scale`` (a 0-dim tensor,
    e.g. the clipping factor; None: 1). Returns new params and moments."""
    keys = list(tree.flatten(params))  # the input's order: a compiled step guards on key order
    flat_p, flat_g, flat_m, flat_v = (tree.flatten(x) for x in (params, grads, opt["m"], opt["v"]))
    stored, g32 = [flat_p[k] for k in keys], [flat_g[k].float() for k in keys]
    m, v = [flat_m[k] for k in keys], [flat_v[k] for k in keys]
    decay = [i for i, t in enumerate(stored) if t.ndim >= 2]  # matrices only
    shards = _local_shards((stored, g32, m, v))
    if shards is not None and _fusable(shards):
        # DTensor shards (FSDP): the fused kernel on each rank's local shards, which AdamW (elementwise)
        # updates as the whole tensors would be: the same bits as one process's fused step
        local = _adamw_fused(
            [t.float() for t in shards[0]], *shards[1:], decay, step, hp, cfg, grad_scale=whole(grad_scale)
        )
        p32, m, v = ([placed_like(t, ref) for t, ref in zip(ts, stored, strict=True)] for ts in local)
    else:
        fused = _fusable((stored, g32, m, v))  # on the params as stored: bf16 ones take the foreach path
        if grad_scale is not None and not fused:
            g32 = torch._foreach_mul(g32, grad_scale)
        args = ([t.float() for t in stored], g32, m, v, decay, step, hp, cfg)
        p32, m, v = _adamw_fused(*args, grad_scale=grad_scale) if fused else _adamw_math(*args)
    new_p = {k: p.to(flat_p[k].dtype) for k, p in zip(keys, p32, strict=True)}
    new_m, new_v = dict(zip(keys, m, strict=True)), dict(zip(keys, v, strict=True))
    opt = TensorDict({"m": tree.unflatten(new_m), "v": tree.unflatten(new_v)}, batch_size=[])
    return tree.unflatten(new_p), opt


def _local_shards(lists: tuple[list[torch.Tensor], ...]) -> tuple[list[torch.Tensor], ...] | None:
    """Each list's local tensors, when every tensor is a DTensor placed like the first list's tensor
    at its index (same mesh, placements and shape: a gradient or moment sharded like its param);
    else None."""
    if not lists[0] or not all(is_dtensor(t) for ts in lists for t in ts):
        return None
    for i, p in enumerate(lists[0]):
        for ts in lists[1:]:
            t = ts[i]
            if t.device_mesh != p.device_mesh or t.placements != p.placements or t.shape != p.shape:
                return None
    return tuple([t.to_local() for t in ts] for ts in lists)


def _fusable(lists: tuple[list[torch.Tensor], ...]) -> bool:
    """Whether torch's fused AdamW kernel can take these lists: an eager step (a compiled one fuses
    ``_adamw_math`` itself) over plain fp32 tensors on one device (DTensor shards: ask about their
    local tensors, ``_local_shards``)."""
    if torch.compiler.is_compiling():
        return False
    first = lists[0][0]
    return all(
        type(t) is torch.Tensor and t.dtype == torch.float32 and t.device == first.device
        for ts in lists
        for t in ts
    ) and all(t.is_contiguous() for ts in (lists[0], lists[2], lists[3]) for t in ts)


def _adamw_fused(
    p32: list[torch.Tensor],
    g32: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    decay: list[int],
    step: torch.Tensor,
    hp: TensorDict,
    cfg: TrainConfig,
    grad_scale: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``_adamw_math`` (on ``g32`` times ``grad_scale``) in one pass per leaf, into fresh tensors:
    the inputs stay untouched and the step pure (``adamw_``)."""
    out = tuple([torch.empty_like(t) for t in ts] for ts in (p32, m, v))
    adamw_(p32, g32, m, v, decay, step, hp, cfg, grad_scale, out=out)
    return out


_NATIVE_ADAMW = native.has_op("adamw_out")


def adamw_(
    p32: list[torch.Tensor],
    g32: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    decay: list[int],
    step: torch.Tensor,
    hp: TensorDict,
    cfg: TrainConfig,
    grad_scale: torch.Tensor | None = None,
    *,
    out: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> None:
    """One AdamW step written into ``out`` (new params, m, v; default: in place on ``p32``, ``m``,
    ``v``). Plain contiguous fp32 tensors on one device (``_fusable``); ``decay``: the indices of the
    leaves that take weight decay. The eager single-device step (into fresh tensors) and the ZeRO
    engine's optimizer (in place on DeepSpeed's partitions, ``lumina.distributed.zero``) share it,
    so the two stay bit for bit alike.

    On CPU, the native kernel (``lumina_native::adamw_out``): one pass per leaf, the arithmetic of
    ``_adamw_math`` in its order (moments bit-identical; params within ~2 ulps, where torch's
    vectorised sqrt is not correctly rounded). Elsewhere (or not built), torch's fused AdamW
    kernel, which updates in place, so the inputs are copied into ``out`` first (weight decay
    applied in that copy: it is a tensor the orchestrator may change, the kernel takes a float); it
    rounds differently from ``_adamw_math`` (e.g. ``lerp`` for the first moment): float32
    rounding, not bit for bit."""
    out_p, out_m, out_v = (p32, m, v) if out is None else out
    # both kernels walk every tensor as flat memory in the param's order: a transposed gradient
    # (a tied head's, [D, V] seen as [V, D]) must be laid out like its param first
    g32 = [g.contiguous() for g in g32]
    lr, wd, decayed = hp["lr"], hp["weight_decay"], set(decay)
    t = step.to(torch.float32)
    if _NATIVE_ADAMW and p32[0].device.type == "cpu":
        # the float constants of _adamw_math's tensor arithmetic, read once (CPU: no device sync)
        b1, b2 = cfg.beta1, cfg.beta2
        bc1, bc2, dec = (1 - b1**t).item(), (1 - b2**t).item(), (1 - lr * wd).item()
        scale, lr_ = 1.0 if grad_scale is None else grad_scale.float().item(), lr.item()
        for i, (p, g, m_, v_) in enumerate(zip(p32, g32, m, v, strict=True)):
            torch.ops.lumina_native.adamw_out(
                p, g, m_, v_, out_p[i], out_m[i], out_v[i], scale, dec if i in decayed else 1.0,
                lr_, b1, b2, bc1, bc2, cfg.eps,
            )  # fmt: skip
        return
    factor = 1 - lr * wd
    for i, (p, m_, v_) in enumerate(zip(p32, m, v, strict=True)):
        if i in decayed:
            torch.mul(p, factor, out=out_p[i])
        elif out_p[i] is not p:
            out_p[i].copy_(p)
        if out_m[i] is not m_:
            out_m[i].copy_(m_)
            out_v[i].copy_(v_)
    torch._fused_adamw_(
        out_p, g32, out_m, out_v, [], [t] * len(p32), lr=lr, beta1=cfg.beta1, beta2=cfg.beta2,
        weight_decay=0.0, eps=cfg.eps, amsgrad=False, maximize=False,
        grad_scale=None if grad_scale is None else 1 / grad_scale.float(),  # the kernel divides by it
    )  # fmt: skip


# ------------------------------------------------------------------------------- 8-bit AdamW


_QMAPS: dict[str, torch.Tensor] = {}


def _bitsandbytes(setting: str = "train.optimizer=adamw8bit"):
    """``bitsandbytes.functional`` (importing it registers ``torch.ops.bitsandbytes.*``); a
    ``ConfigError`` naming the ``setting`` that needs it when it is not installed."""
    if "bitsandbytes.functional" in sys.modules:
        return sys.modules["bitsandbytes.functional"]
    # its CPU backend warns at import when Hugging Face's ``kernels`` (for a 4-bit matmul we do not
    # use) is missing or will not load: not ours to report. (Run from the checkout's root, that bare
    # name reaches Hugging Face's package too: our kernels/ folder hands it over.)
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ConfigError(f"{setting} needs bitsandbytes (pip install bitsandbytes==0.50.2): {e}") from None
    finally:
        quiet.setLevel(level)
    return bnbf


def check_available(optimizer: str) -> None:
    """Raise ``ConfigError`` (one line) when ``train.optimizer`` needs a package that is missing."""
    if optimizer == "adamw8bit":
        _bitsandbytes()


def quant_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """(signed, unsigned) 256-entry dynamic quantization maps of bitsandbytes (its 8-bit
    optimizers' ``dynamic`` for the first moment and ``udynamic`` for the second), built once."""
    if not _QMAPS:
        bnbf = _bitsandbytes()
        _QMAPS["m"] = bnbf.create_dynamic_map(signed=True)
        _QMAPS["v"] = bnbf.create_dynamic_map(signed=False)
    return _QMAPS["m"], _QMAPS["v"]


def _quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes in ``x``'s shape, fp32 absmax per ``BLOCK`` elements of the flattened ``x``)."""
    return torch.ops.bitsandbytes.quantize_blockwise(x, qmap, BLOCK)


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, qmap, BLOCK, torch.float32)


def _is_8bit(flat_opt: dict[str, torch.Tensor]) -> bool:
    return "qmap_m" in flat_opt


def adamw8bit_init(params: TensorDict) -> TensorDict:
    """8-bit AdamW state, all moments zero:

        m_q, v_q            {leaf: uint8 codes, the leaf's shape}      leaves >= MIN_8BIT_SIZE elements
        m_absmax, v_absmax  {leaf: fp32 [ceil(numel / BLOCK)]}
        m, v                {leaf: fp32, the leaf's shape}             smaller leaves
        qmap_m, qmap_v      fp32 [256]: the maps the codes index (signed for m, unsigned for v)
        block_size          int64 0-dim: BLOCK

    The maps and the block size live in the state so a checkpoint says by itself how to decode its
    codes (m = qmap_m[m_q] * m_absmax[i // block_size], i the flat index) without bitsandbytes or
    this module; in the compiled step they are ordinary inputs passed through unchanged (2 KB)."""
    qm, qv = quant_maps()
    flat_p = tree.flatten(params)
    device = next(iter(flat_p.values())).device if flat_p else torch.device("cpu")
    flat: dict[str, torch.Tensor] = {
        "qmap_m": qm.to(device),
        "qmap_v": qv.to(device),
        "block_size": torch.tensor(BLOCK, dtype=torch.int64, device=device),
    }
    for k, p in flat_p.items():
        zero = torch.zeros_like(p, dtype=torch.float32)
        put_moments(flat, k, zero, zero)
    return tree.unflatten(flat)


def get_moments(flat_opt: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 (m, v) of parameter ``key`` from a flattened optimizer state (either optimizer;
    8-bit moments dequantized)."""
    if f"m_q.{key}" in flat_opt:
        m = _dequantize(flat_opt[f"m_q.{key}"], flat_opt[f"m_absmax.{key}"], flat_opt["qmap_m"])
        v = _dequantize(flat_opt[f"v_q.{key}"], flat_opt[f"v_absmax.{key}"], flat_opt["qmap_v"])
        return m, v
    return flat_opt[f"m.{key}"], flat_opt[f"v.{key}"]


def put_moments(flat_opt: dict[str, torch.Tensor], key: str, m: torch.Tensor, v: torch.Tensor) -> None:
    """Store fp32 moments of parameter ``key`` into ``flat_opt`` (a new dict the caller builds), in
    the layout ``init_opt`` gives a leaf of that size (quantized when the state is 8-bit and the leaf
    has >= MIN_8BIT_SIZE elements); the leaf's old entries are replaced (in place when the layout is
    unchanged: a compiled step guards on key order)."""
    if v is m:  # two leaves sharing memory cannot be saved (safetensors refuses them)
        v = v.clone()
    quantized = _is_8bit(flat_opt) and m.numel() >= MIN_8BIT_SIZE
    for n in ("m", "v") if quantized else ("m_q", "m_absmax", "v_q", "v_absmax"):
        flat_opt.pop(f"{n}.{key}", None)  # the other layout's entries; same-layout ones keep their place
    if quantized:
        for n, x in (("m", m), ("v", v)):
            codes, absmax = _quantize(x.float(), flat_opt[f"qmap_{n}"])
            flat_opt[f"{n}_q.{key}"], flat_opt[f"{n}_absmax.{key}"] = codes, absmax
    else:
        flat_opt[f"m.{key}"], flat_opt[f"v.{key}"] = m.float(), v.float()


def adamw8bit_update(
    params: TensorDict,
    grads: TensorDict,
    opt: TensorDict,
    step: torch.Tensor,
    hp: TensorDict,
    cfg: TrainConfig,
    grad_scale: torch.Tensor | None = None,
) -> tuple[TensorDict, TensorDict]:
    """One 8-bit AdamW step (``step`` counts from 1) on ``grads`` times ``grad_scale`` (None: 1):
    dequantize, the AdamW arithmetic of ``adamw_update`` in fp32, quantize the new moments. Returns
    new params and optimizer state."""
    if not torch.compiler.is_compiling():
        _bitsandbytes()  # registers the ops (a state loaded from a checkpoint may come first)
    keys = list(tree.flatten(params))
    flat_p, flat_g, flat_o = tree.flatten(params), tree.flatten(grads), tree.flatten(opt)
    new_o = {k: flat_o[k] for k in ("qmap_m", "qmap_v", "block_size")}
    new_p = {}
    # One leaf at a time: its fp32 moments exist only while it is updated, so the step's peak holds
    # one leaf's dequantized m and v (8 bytes per element of the largest leaf), not every leaf's —
    # dequantizing all of them first (as adamw_update's foreach lists would) cost the whole fp32
    # state the 8-bit format saves. Same arithmetic per element as the list form.
    for k in keys:
        mk, vk = get_moments(flat_o, k)
        gk = flat_g[k].float() if grad_scale is None else flat_g[k].float() * grad_scale
        (pk,), (mk,), (vk,) = _adamw_math(
            [flat_p[k].float()], [gk], [mk], [vk], [0] if flat_p[k].ndim >= 2 else [],
            step, hp, cfg,
        )  # fmt: skip
        put_moments(new_o, k, mk, vk)
        new_p[k] = pk.to(flat_p[k].dtype)
    return tree.unflatten(new_p), tree.unflatten(new_o)


def init_opt(params: TensorDict, optimizer: str) -> TensorDict:
    """The optimizer state ``train.optimizer`` starts from."""
    return adamw8bit_init(params) if optimizer == "adamw8bit" else adamw_init(params)


def update(optimizer: str, *args, **kwargs) -> tuple[TensorDict, TensorDict]:
    """``adamw_update`` or ``adamw8bit_update`` (same arguments) for ``train.optimizer``."""
    return (adamw8bit_update if optimizer == "adamw8bit" else adamw_update)(*args, **kwargs)


def opt_state_bytes(numels: list[int], optimizer: str) -> int:
    """Bytes of the optimizer state ``init_opt`` allocates for leaves of these sizes: 8 per
    element for AdamW's fp32 moments; for 8-bit AdamW, per leaf of >= MIN_8BIT_SIZE elements 2 per
    element (two uint8 codes) + 8 per BLOCK (two fp32 absmax), 8 per element below, + the two maps
    and the block size (2,056 bytes)."""
    if optimizer != "adamw8bit":
        return 8 * sum(numels)
    total = 2 * 256 * 4 + 8
    for n in numels:
        total += 2 * (n + 4 * -(-n // BLOCK)) if n >= MIN_8BIT_SIZE else 8 * n
    return total


def opt_format_problem(opt: TensorDict) -> str | None:
    """Why an 8-bit state (e.g. from a checkpoint) cannot be read by this module, or None."""
    flat = tree.flatten(opt)
    if not _is_8bit(flat):
        return None
    got = int(flat["block_size"]) if "block_size" in flat else None
    if got != BLOCK:
        return f"opt.block_size is {got}; this lumina reads 8-bit AdamW state of block size {BLOCK}"
    return None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The scheduled learning rate for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then ``constant`` / ``linear`` / ``cosine`` decay to ``min_lr`` at ``steps``;
    ``onecycle`` warms up from lr/25, then anneals (cosine) to ``min_lr``; all times ``lr_scale``
    (the orchestrator's multiplier)."""
    return cfg.lr_scale * _schedule(step, cfg)


def _schedule(step: int, cfg: TrainConfig) -> float:
    lr, floor, warm, total = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps
    if cfg.schedule == "onecycle":
        start = lr / 25
        if step < warm:
            return start + (lr - start) * step / max(1, warm)
    elif step < warm:
        return lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return lr
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if cfg.schedule == "linear":
        return lr + (floor - lr) * progress
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))  # cosine, onecycle's decay


def default_hp(cfg: TrainConfig, device: torch.device | str = "cpu") -> TensorDict:
    """The live hyper-parameters as 0-dim fp32 tensors (lr is set from ``lr_at`` each step)."""
    values = {"lr": lr_at(0, cfg), "weight_decay": cfg.weight_decay, "clip_norm": cfg.clip_norm}
    return TensorDict({k: torch.tensor(float(v), device=device) for k, v in values.items()}, batch_size=[])
