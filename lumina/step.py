"""The pure train and eval steps.

Legend: A micro-batches per step (gradient accumulation), B sequences per micro-batch, T positions.

    state = init_train_state(cfg, seed)
    step = make_train_step(cfg)                   # compiled once (torch.compile) unless compile=False
    state, metrics = step(state, batch, hp)       # batch: {"inputs", "targets"} [A * B, T]; hp: lr...

``train_step(state, batch, hp)`` is pure — no I/O, no globals, no ``.item()``: it returns a new state.
Gradients come from ``torch.func.grad_and_value(loss_fn, has_aux=True)``, summed over the A
micro-batches so that the cross-entropy part equals the gradient of the whole batch's token-mean
loss (aux losses are averaged over micro-batches; the MoE balance loss, a product of batch
statistics, is computed per micro-batch as in Megatron-LM); then global-norm clipping and
functional AdamW. Targets equal to the tokenizer's ``pad_id`` carry no
loss (masking and padding, see ``lumina.data.chat``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from lumina.config import RunConfig
from lumina.model import apply, default_knobs, init
from lumina.optim import adamw_init, adamw_update, clip_by_global_norm

__all__ = ["eval_step", "init_train_state", "loss_fn", "make_train_step", "train_step"]


def init_train_state(cfg: RunConfig, device: torch.device | str = "cpu") -> TensorDict:
    """{params, opt {m, v}, step, knobs}: everything a step reads and writes, as one TensorDict."""
    params = init(cfg.model, seed=cfg.seed, device=device)
    return TensorDict(
        {
            "params": params,
            "opt": adamw_init(params),
            "step": torch.zeros((), dtype=torch.int64, device=device),
            "knobs": default_knobs(cfg.model, device),
        },
        batch_size=[],
    )


def loss_fn(
    params: TensorDict,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    knobs: TensorDict,
    cfg: RunConfig,
    *,
    n_tokens: torch.Tensor,
    pad_id: int,
    aux_scale: float = 1.0,
) -> tuple[torch.Tensor, TensorDict]:
    """Summed token cross-entropy / ``n_tokens`` + ``aux_scale`` * aux losses, and metrics."""
    logits, aux = apply(params, inputs, cfg.model, knobs, train=True)
    ce_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id, reduction="sum"
    )
    loss = ce_sum / n_tokens + aux_scale * aux["loss"]
    return loss, TensorDict({"ce_sum": ce_sum.detach(), "aux_loss": aux["loss"].detach()}, batch_size=[])


def train_step(
    state: TensorDict, batch: TensorDict, hp: TensorDict, *, cfg: RunConfig, pad_id: int
) -> tuple[TensorDict, TensorDict]:
    A = cfg.train.grad_accum
    inputs = batch["inputs"].unflatten(0, (A, -1))  # [A, B, T]
    targets = batch["targets"].unflatten(0, (A, -1))
    n_tokens = (targets != pad_id).sum().clamp(min=1)
    grad_fn = torch.func.grad_and_value(
        functools.partial(loss_fn, cfg=cfg, n_tokens=n_tokens, pad_id=pad_id, aux_scale=1.0 / A), has_aux=True
    )
    grads = ce_sum = aux_loss = None
    for a in range(A):  # unrolled: A is config, so the compiled graph is fixed
        g, (_, m) = grad_fn(state["params"], inputs[a], targets[a], state["knobs"])
        grads = g if grads is None else grads + g
        ce_sum = m["ce_sum"] if ce_sum is None else ce_sum + m["ce_sum"]
        aux_loss = m["aux_loss"] / A if aux_loss is None else aux_loss + m["aux_loss"] / A
    grads, grad_norm = clip_by_global_norm(grads, hp["clip_norm"])
    step = state["step"] + 1
    params, opt = adamw_update(state["params"], grads, state["opt"], step, hp, cfg.train)
    new_state = TensorDict(
        {"params": params, "opt": opt, "step": step, "knobs": state["knobs"]}, batch_size=[]
    )
    loss = ce_sum / n_tokens
    metrics = TensorDict(
        {"loss": loss, "aux_loss": aux_loss, "grad_norm": grad_norm, "tokens": n_tokens, "lr": hp["lr"]},
        batch_size=[],
    )
    return new_state, metrics


def eval_step(
    params: TensorDict, batch: TensorDict, *, cfg: RunConfig, pad_id: int, knobs: TensorDict | None = None
) -> TensorDict:
    """Loss, perplexity and next-token accuracy over the non-pad targets (no dropout, no jitter).
    Pass the run's live ``knobs`` (``state["knobs"]``): a changed router temperature changes the
    model being evaluated. Default: the config's initial knob values."""
    logits, _ = apply(params, batch["inputs"], cfg.model, knobs, train=False)
    targets = batch["targets"]
    mask = targets != pad_id
    n = mask.sum().clamp(min=1)
    loss = (
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id, reduction="sum")
        / n
    )
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return TensorDict({"loss": loss, "ppl": loss.exp(), "accuracy": correct / n, "tokens": n}, batch_size=[])


def make_train_step(cfg: RunConfig, pad_id: int):
    """``train_step`` bound to this config, compiled once with ``torch.compile`` when
    ``train.compile`` (hp and knob *values* may change freely: they are tensors)."""
    fn = functools.partial(train_step, cfg=cfg, pad_id=pad_id)
    return torch.compile(fn, fullgraph=True) if cfg.train.compile else fn
