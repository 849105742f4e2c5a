"""The pure train and eval steps.

Legend: A micro-batches per step (gradient accumulation), B sequences per micro-batch, T positions.

    state = init_train_state(cfg)
    step = make_train_step(cfg, pad_id)           # compiled once (torch.compile) unless compile=False
    state, metrics = step(state, batch, hp)       # batch: {"inputs", "targets"} [A * B, T]; hp: lr...

``train_step(state, batch, hp)`` is pure — no I/O, no globals, no ``.item()``, no global RNG: it
returns a new state. The train state is one TensorDict:

    params       fp32 master weights (the tree of ``lumina.model.init``); with ``train.lora`` a
                 frozen base (quantized with ``model.quant``) plus fp32 adapters, the only leaves
                 that are differentiated, updated and given optimizer state (``lumina.quant``)
    opt          the optimizer state (``train.optimizer``): AdamW's fp32 moments {m, v}, or 8-bit
                 AdamW's uint8 codes + block absmax (``lumina.optim.adamw8bit_init``)
    step         optimizer steps taken (int64); ``updates``: steps whose update was applied
    rng          a counter-based RNG key (``lumina.model.random``): jitter and expert dropout of
                 micro-batch a of this step draw from fold_in(rng, a); the key advances every step
    loss_scale   fp16's dynamic loss scale (1 otherwise); ``good_steps`` finite steps in a row
    knobs        the live routing knobs (0-dim tensors the orchestrator may change)
    data         the data position (``lumina.data.mix.MixState`` as int64 tensors; the driver
                 advances it, the step carries it) — so a checkpoint of the state resumes exactly

Gradients come from ``torch.func.grad_and_value(loss_fn, has_aux=True)``, summed over the A
micro-batches so that the cross-entropy part equals the gradient of the whole batch's token-mean
loss (aux losses are averaged over micro-batches; the MoE balance loss, a product of batch
statistics, is computed per micro-batch as in Megatron-LM); then global-norm clipping and
functional AdamW (or 8-bit AdamW, ``train.optimizer=adamw8bit``). Targets equal to the
tokenizer's ``pad_id`` carry no loss (see ``lumina.data.chat``).

Precision (``train.precision``): ``fp32``; ``tf32`` (fp32 step; the driver enables TF32 matmuls on
CUDA, a no-op on CPU); ``bf16`` and ``fp16`` cast the fp32 master weights to the compute dtype
inside the differentiated function, so gradients arrive in fp32 and AdamW updates fp32 masters.
``fp8`` is ``bf16`` with the attention projections, FFN and expert matmuls in fp8 (``lumina.fp8``:
e4m3 forward, e5m2 gradients, dynamic tensorwise scales); CUDA needs compute capability 8.9+.
``fp16`` multiplies the loss by ``loss_scale``, unscales the gradients, and when any gradient is
not finite skips the update (params, moments and ``updates`` unchanged), halves the scale and
resets ``good_steps``; after ``loss_scale_window`` finite steps in a row the scale doubles.
Gradient checkpointing (``train.grad_checkpointing`` none / full / attention) recomputes blocks
or attention sub-layers in the backward pass (``lumina.model.remat``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from tensordict import TensorDict

from lumina import allocator, fp8, optim, quant, tree
from lumina.config import RunConfig
from lumina.model import apply, default_knobs, init, random
from lumina.model.loss import linear_cross_entropy, plain_cross_entropy
from lumina.model.moe import update_balance_bias
from lumina.model.transformer import head_weight, layer_of_kind

__all__ = [
    "COMPUTE_DTYPES",
    "eval_step",
    "grad_and_value",
    "head_loss",
    "init_train_state",
    "loss_fn",
    "make_train_step",
    "train_step",
]

COMPUTE_DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.bfloat16,  # bf16 everywhere but the big matmuls (lumina.fp8)
}
_DATA_FIELDS = ("step", "base", "chat")  # lumina.data.mix.MixState


def init_train_state(
    cfg: RunConfig, device: torch.device | str = "cpu", params: TensorDict | None = None
) -> TensorDict:
    """Everything a step reads and writes, as one TensorDict (see the module docstring), from a
    fresh init or from full-precision ``params`` (``train.init_from``: ``lumina.weights``). With
    ``train.lora`` the params are quantized / adapted (``lumina.quant.prepare``) and the optimizer
    state covers the adapters only. Raises ``ConfigError`` when ``train.precision=fp8`` cannot run
    on ``device`` (``lumina.fp8.check_device``)."""
    if cfg.train.precision == "fp8":
        fp8.check_device(device)
    if params is None:
        params = init(cfg.model, seed=cfg.seed, device=device)
    params = quant.prepare(params, cfg, base_dtype=COMPUTE_DTYPES[cfg.train.precision])
    trainable = quant.split(params)[0] if quant.frozen_base(cfg) else params

    def scalar(v, dtype=torch.int64):
        return torch.tensor(v, dtype=dtype, device=device)

    scale = cfg.train.loss_scale_init if cfg.train.precision == "fp16" else 1.0
    return TensorDict(
        {
            "params": params,
            "opt": optim.init_opt(trainable, cfg.train.optimizer),
            "step": scalar(0),
            "updates": scalar(0),
            "rng": random.key_from_seed(cfg.seed, device),
            "loss_scale": scalar(scale, torch.float32),
            "good_steps": scalar(0),
            "knobs": default_knobs(cfg.model, device),
            "data": TensorDict({k: scalar(0) for k in _DATA_FIELDS}, batch_size=[]),
        },
        batch_size=[],
    )


def _compute_params(params: TensorDict, cfg: RunConfig) -> TensorDict:
    """The params the forward reads: cast to the compute dtype. A frozen base is already stored in
    it (``lumina.quant.prepare``) and its quantization scales must stay fp32: only adapters are cast."""
    dtype = COMPUTE_DTYPES[cfg.train.precision]
    if dtype == torch.float32:
        return params
    if quant.frozen_base(cfg):
        trainable, frozen = quant.split(params)
        return quant.join(tree.cast(trainable, dtype), frozen, params)
    return tree.cast(params, dtype)


def head_loss(
    params: TensorDict,
    x_BTD: torch.Tensor,
    targets_BT: torch.Tensor,
    cfg: RunConfig,
    pad_id: int,
    differentiable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct argmax count) of the LM head over the final hidden states,
    ``train.loss_chunk`` tokens at a time (``lumina.model.loss``: the [B*T, V] logits never exist
    whole), or through the full logits when it is 0."""
    x_ND, head_DV, t_N = x_BTD.flatten(0, 1), head_weight(params, cfg.model), targets_BT.flatten()
    if cfg.train.loss_chunk > 0:
        chunk = cfg.train.loss_chunk
        return linear_cross_entropy(
            x_ND, head_DV, t_N, ignore_index=pad_id, chunk=chunk, differentiable=differentiable
        )
    return plain_cross_entropy(x_ND, head_DV, t_N, ignore_index=pad_id)


def loss_fn(
    params: TensorDict,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    knobs: TensorDict,
    rng: torch.Tensor,
    loss_scale: torch.Tensor,
    cfg: RunConfig,
    *,
    n_tokens: torch.Tensor,
    pad_id: int,
    aux_scale: float = 1.0,
    frozen: TensorDict | None = None,
    layer_fn=None,
) -> tuple[torch.Tensor, TensorDict]:
    """``loss_scale`` * (summed token cross-entropy / ``n_tokens`` + ``aux_scale`` * aux losses),
    and metrics (unscaled). ``params`` are fp32 masters; the forward runs in the compute dtype.
    ``frozen``: the rest of the model when ``params`` are the adapters alone (``lumina.quant.split``).
    ``layer_fn``: compiled layers (``lumina.model.apply``'s argument; regional compilation)."""
    if frozen is not None:
        params = quant.join(params, frozen)
    compute = _compute_params(params, cfg)
    x_BTD, aux = apply(
        compute,
        inputs,
        cfg.model,
        knobs,
        train=True,
        rng=rng,
        remat_mode=cfg.train.grad_checkpointing,
        fp8=cfg.train.precision == "fp8",
        return_hidden=True,
        layer_fn=layer_fn,
    )
    ce_sum, correct = head_loss(compute, x_BTD, targets, cfg, pad_id)
    loss = ce_sum / n_tokens + aux_scale * aux["loss"]
    metrics = {"ce_sum": ce_sum.detach(), "aux_loss": aux["loss"].detach(), "correct": correct}
    for group in ("moe", "mod"):
        if group in aux:
            metrics[group] = aux[group].detach()
    return loss * loss_scale, TensorDict(metrics, batch_size=[])


def _layer_stats(per_micro: list[TensorDict]) -> TensorDict:
    """Routing stats over the micro-batches: expert loads summed, everything else averaged."""
    out = {}
    for group in ("moe", "mod"):
        if group not in per_micro[0]:
            continue
        flat = [tree.flatten(m[group]) for m in per_micro]
        out[group] = tree.unflatten(
            {k: sum(f[k] for f in flat) / (1 if k.endswith(".load") else len(flat)) for k in flat[0]}
        )
    return TensorDict(out, batch_size=[])


def _where_tree(cond: torch.Tensor, new: TensorDict, old: TensorDict) -> TensorDict:
    flat_old = tree.flatten(old)
    return tree.unflatten({k: torch.where(cond, v, flat_old[k]) for k, v in tree.flatten(new).items()})


def grad_and_value(fn):
    """``torch.func.grad_and_value(fn, has_aux=True)`` for a TensorDict first argument: (grads,
    (value, aux)), the grads a tree like the argument (zeros where the value does not depend on a
    leaf). Traced by ``torch.compile`` (the whole step compiled) it is ``torch.func``'s; run eagerly
    it is plain autograd on detached copies of the leaves — the same gradients, without
    ``torch.func``'s per-op wrapping, and able to run compiled regions inside (``torch.func``
    transforms refuse to call a compiled function from eager code)."""
    if torch.compiler.is_compiling():
        return torch.func.grad_and_value(fn, has_aux=True)

    def run(params: TensorDict, *args):
        flat = tree.flatten(params)
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in flat.items()}
        with torch.enable_grad():
            value, aux = fn(tree.unflatten(leaves), *args)
            diff = [k for k, v in leaves.items() if v.requires_grad]
            grads = torch.autograd.grad(value, [leaves[k] for k in diff], allow_unused=True)
        by_key = dict(zip(diff, grads, strict=True))
        out = {k: torch.zeros_like(v) if by_key.get(k) is None else by_key[k] for k, v in flat.items()}
        return tree.unflatten(out), (value.detach(), aux)

    return run


def train_step(
    state: TensorDict, batch: TensorDict, hp: TensorDict, *, cfg: RunConfig, pad_id: int, regions=None
) -> tuple[TensorDict, TensorDict]:
    """One optimizer step (see the module docstring). ``regions``: the compiled pieces of a
    regionally compiled step (``make_train_step``); None runs everything as written."""
    A, tc = cfg.train.grad_accum, cfg.train
    inputs = batch["inputs"].unflatten(0, (A, -1))  # [A, B, T]
    targets = batch["targets"].unflatten(0, (A, -1))
    n_tokens = (targets != pad_id).sum().clamp(min=1)
    # the scale only multiplies fp16 losses (an fp32 step ignores a state's scale, e.g. after resuming
    # an fp16 run in fp32)
    scale = state["loss_scale"] if tc.precision == "fp16" else torch.ones_like(state["loss_scale"])
    # a frozen base (train.lora): only the adapters are differentiated and updated; the rest of the
    # params (quantized codes, scales, frozen floats) is closed over and passed through unchanged
    trainable, frozen = quant.split(state["params"]) if quant.frozen_base(cfg) else (state["params"], None)
    grad_fn = grad_and_value(
        functools.partial(
            loss_fn,
            cfg=cfg,
            n_tokens=n_tokens,
            pad_id=pad_id,
            aux_scale=1.0 / A,
            frozen=frozen,
            layer_fn=None if regions is None else regions.layer,
        )  # fmt: skip
    )
    grads, per_micro = None, []
    for a in range(A):  # unrolled: A is config, so the compiled graph is fixed
        key = random.fold_in(state["rng"], a)
        g, (_, m) = grad_fn(trainable, inputs[a], targets[a], state["knobs"], key, scale)
        grads = g if grads is None else grads + g
        per_micro.append(m)
    return _update(state, trainable, frozen, grads, per_micro, n_tokens, scale, hp, cfg=cfg)


def _update(
    state: TensorDict,
    trainable: TensorDict,
    frozen: TensorDict | None,
    grads: TensorDict,
    per_micro: list[TensorDict],
    n_tokens: torch.Tensor,
    scale: torch.Tensor,
    hp: TensorDict,
    *,
    cfg: RunConfig,
) -> tuple[TensorDict, TensorDict]:
    """The step after the gradients: unscale (fp16), clip, the optimizer update, the balance-bias
    rule, fp16's skip-and-rescale, and the metrics."""
    A, tc = cfg.train.grad_accum, cfg.train
    frozen_base = frozen is not None
    if tc.precision == "fp16":
        grads = grads.apply(lambda g_: g_ / scale)
    grad_norm = optim.global_norm(grads)
    finite = torch.isfinite(grad_norm)

    step, updates = state["step"] + 1, state["updates"] + 1
    clip = optim.clip_factor(grad_norm, hp["clip_norm"])  # applied inside the update, on the fly
    params, opt = optim.update(tc.optimizer, trainable, grads, state["opt"], updates, hp, tc, grad_scale=clip)
    stats = _layer_stats(per_micro)
    if "moe" in stats and not frozen_base:  # a frozen base keeps its balance bias too
        params = update_balance_bias(params, stats, cfg.model)
    new = {"params": params, "opt": opt, "updates": updates}
    loss_scale, good_steps = state["loss_scale"], state["good_steps"]
    if tc.precision == "fp16":  # skip a non-finite update; adapt the scale (as torch.amp.GradScaler)
        new = {
            "params": _where_tree(finite, params, trainable),
            "opt": _where_tree(finite, opt, state["opt"]),
            "updates": torch.where(finite, updates, state["updates"]),
        }
        grown = (good_steps + 1) >= tc.loss_scale_window
        loss_scale = torch.where(finite, torch.where(grown, scale * 2, scale), scale / 2)
        good_steps = torch.where(finite & ~grown, good_steps + 1, torch.zeros_like(good_steps))
    if frozen_base:  # the adapters back into the whole tree, in its key order
        new["params"] = quant.join(new["params"], frozen, state["params"])
    new_state = TensorDict(
        {
            **new,
            "step": step,
            "rng": random.fold_in(state["rng"], A),
            "loss_scale": loss_scale,
            "good_steps": good_steps,
            "knobs": state["knobs"],
            "data": state["data"],
        },
        batch_size=[],
    )
    ce_sum = sum(m["ce_sum"] for m in per_micro)
    metrics = TensorDict(
        {
            "loss": ce_sum / n_tokens,
            "aux_loss": sum(m["aux_loss"] for m in per_micro) / A,
            "accuracy": sum(m["correct"] for m in per_micro) / n_tokens,
            "grad_norm": grad_norm,
            "tokens": n_tokens,
            "lr": hp["lr"],
            "loss_scale": scale,
            "skipped": (~finite).float() if tc.precision == "fp16" else torch.zeros_like(grad_norm),
            **stats,
        },
        batch_size=[],
    )
    return new_state, metrics


def eval_step(
    params: TensorDict, batch: TensorDict, *, cfg: RunConfig, pad_id: int, knobs: TensorDict | None = None
) -> TensorDict:
    """Loss, perplexity and next-token accuracy over the non-pad targets (no dropout, no jitter).
    Pass the run's live ``knobs`` (``state["knobs"]``): a changed router temperature changes the
    model being evaluated. Default: the config's initial knob values."""
    use_fp8 = cfg.train.precision == "fp8"  # evaluate the model as it trains
    compute = _compute_params(params, cfg)
    x_BTD, _ = apply(compute, batch["inputs"], cfg.model, knobs, train=False, fp8=use_fp8, return_hidden=True)
    targets = batch["targets"]
    n = (targets != pad_id).sum().clamp(min=1)
    ce_sum, correct = head_loss(compute, x_BTD, targets, cfg, pad_id, differentiable=False)
    loss = ce_sum / n
    return TensorDict({"loss": loss, "ppl": loss.exp(), "accuracy": correct / n, "tokens": n}, batch_size=[])


class _Regions:
    """The compiled pieces of a regionally compiled step (``train.compile_mode=regional``): one
    ``torch.compile`` of ``layer_of_kind`` per kind of layer (dense / MoE FFN, MoD-routed or not),
    which every layer of that kind reuses — its parameters are arguments, and same-shaped arguments
    pass the guards — so compile time does not grow with depth. The rest of the step (embedding,
    the LM head + loss, the micro-batch loop, autograd, clipping and the optimizer, whose eager
    AdamW is one fused kernel per leaf: ``lumina.optim``) runs eagerly between them.

    Each kind is compiled as a function with a code object of its own. Dynamo keeps compiled
    entries, and counts them against its recompile limit (8), per code object; a ``partial`` is
    compiled through one shared wrapper. Each orchestrator decision that changes a shape or a step
    constant (capacity factor, experts, micro-batch) builds a new step, so new regions: with one
    code object for all, the entries of every kind and config so far piled up, and after four
    capacity changes on the hybrid dynamo stopped compiling the layers (they ran eagerly, with a
    warning). Now a dropped config's entries go with its functions. ``dynamic=False``: a new
    config's constants are compiled as constants again — left to dynamo's automatic dynamic
    shapes, the second capacity factor became a symbolic float that failed an assertion in the
    MoE op's tracing (torch 2.13)."""

    def __init__(self, cfg: RunConfig, backend: str | Callable = "inductor"):
        self.cfg, self.backend = cfg, backend
        self._layers: dict[tuple[bool, bool], Callable] = {}

    def layer(self, moe: bool, mod: bool):
        fn = self._layers.get((moe, mod))
        if fn is None:
            m, t = self.cfg.model, self.cfg.train
            remat, fp8_on = t.grad_checkpointing, t.precision == "fp8"

            def kind(x_BTD, p, knobs, rope, positions, rng):
                return layer_of_kind(x_BTD, p, knobs, rope, positions, rng, cfg=m, moe=moe, mod=mod,
                                     train=True, remat_mode=remat, fp8=fp8_on)  # fmt: skip

            own = types.FunctionType(
                kind.__code__.replace(), kind.__globals__, "layer_of_kind", None, kind.__closure__
            )
            fn = self._layers[moe, mod] = torch.compile(
                own, fullgraph=True, backend=self.backend, dynamic=False
            )
        return fn


def make_train_step(cfg: RunConfig, pad_id: int):
    """``train_step`` bound to this config; with ``train.compile`` compiled with ``torch.compile``
    (hp and knob *values* may change freely: they are tensors) — by regions (each kind of layer
    once, the update once) or as one graph (``train.compile_mode``)."""
    allocator.tune()  # large CPU buffers stay with the process between steps (once per process)
    optim.check_available(cfg.train.optimizer)  # its custom ops must exist before tracing
    if cfg.model.quant != "none":
        quant.check_available()
    fn = functools.partial(train_step, cfg=cfg, pad_id=pad_id)
    if not cfg.train.compile:
        return fn
    if cfg.train.compile_mode == "step":
        return torch.compile(fn, fullgraph=True)
    return functools.partial(fn, regions=_Regions(cfg))
