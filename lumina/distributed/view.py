"""A module view of the parameter tree: what FSDP2, DDP and DeepSpeed wrap.

Legend: B batch, T time, D model width, V vocabulary.

No distributed engine works inside ``torch.func.grad_and_value`` (DTensor parameters arrive as plain
tensors; torch's autograd-aware collectives lack ``setup_context``, pytorch/pytorch#168393), so the
distributed path differentiates with plain autograd over ``nn.Module``s. The view owns the tree's
tensors as ``nn.Parameter``s named after it (``layers.3.attn.wq`` is ``view.layers[3].p.attn.wq``),
one module per transformer layer (the unit an engine shards or buckets) plus the root (embedding,
final norm, head), and its ``forward`` runs the very functions ``lumina.model.apply`` composes
(``embed``, ``layer``, ``head``, ``aux_losses``), so the single-device and distributed models cannot
drift apart. The experts stay stacked on their leading axis ``[E, ...]``: an expert-parallel engine
can shard that axis later without changing the names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn

from lumina import tree
from lumina.config import ModelConfig
from lumina.model.layers import rope_cos_sin
from lumina.model.transformer import aux_losses, embed, final_norm, head, layer

__all__ = ["LayerModule", "ModelView", "TreeModule"]


def _compute(params: TensorDict, dtype: torch.dtype) -> TensorDict:
    """The fp32 masters in the compute dtype, inside the differentiated forward (as
    ``lumina.step``'s bf16 path): gradients arrive in fp32 on the masters."""
    return params if dtype == torch.float32 else tree.cast(params, dtype)


class TreeModule(nn.Module):
    """The tensors of a subtree as parameters, a child module per subtree, names unchanged."""

    def __init__(self, td: TensorDict, frozen: frozenset[str] = frozenset()):
        super().__init__()
        for key, value in td.items():
            if isinstance(value, TensorDict):
                self.add_module(key, TreeModule(value, frozen))
            else:
                trained = value.is_floating_point() and key not in frozen
                self.register_parameter(key, nn.Parameter(value, requires_grad=trained))

    def tree(self) -> TensorDict:
        """The subtree as a TensorDict of the current parameters (inside an FSDP forward: the
        unsharded ones), so the pure functions see the usual layout."""
        out: dict[str, object] = {name: child.tree() for name, child in self.named_children()}
        out.update(dict(self.named_parameters(recurse=False)))
        return TensorDict(out, batch_size=[])


class LayerModule(nn.Module):
    """Layer ``i``: ``params["layers", str(i)]`` under the attribute ``p``."""

    def __init__(self, i: int, p: TensorDict, cfg: ModelConfig, dtype: torch.dtype, frozen=frozenset()):
        super().__init__()
        self.i, self.cfg, self.dtype = i, cfg, dtype
        self.p = TreeModule(p, frozen)

    def forward(self, x_BTD, cos, sin, positions, knobs, rng, train: bool, remat_mode: str, fp8: bool):
        return layer(
            self.i,
            x_BTD,
            _compute(self.p.tree(), self.dtype),
            self.cfg,
            knobs,
            (cos, sin),
            positions,
            train=train,
            rng=rng,
            remat_mode=remat_mode,
            fp8=fp8,
        )


class ModelView(nn.Module):
    """The whole model over a parameter tree: ``forward`` equals ``lumina.model.apply`` (training,
    no KV cache) on the same parameters cast to ``dtype`` (the train precision's compute dtype)."""

    def __init__(
        self, params: TensorDict, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
        frozen: frozenset[str] = frozenset(),
    ):  # fmt: skip
        """``frozen``: leaf names (e.g. ``balance_bias``) registered without ``requires_grad``."""
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        rest = {k: v for k, v in params.items() if k != "layers"}
        self.root = TreeModule(TensorDict(rest, batch_size=[]), frozen)
        self.layers = nn.ModuleList(
            LayerModule(i, params["layers", str(i)], cfg, dtype, frozen) for i in range(cfg.n_layers)
        )

    def forward(
        self,
        tokens_BT: torch.Tensor,
        knobs: TensorDict,
        *,
        rng: torch.Tensor | None = None,
        train: bool = True,
        remat_mode: str = "none",
        fp8: bool = False,
        head_fn: Callable[[TensorDict, torch.Tensor], Any] | None = None,
    ) -> tuple[Any, TensorDict]:
        """(logits, aux); with ``head_fn``: (``head_fn(root params, final hidden states)``, aux) — the
        head applied inside the forward, where an engine holds the root's parameters unsharded (the
        train step passes ``lumina.step.head_loss``: the chunked loss, no full logits)."""
        root = _compute(self.root.tree(), self.dtype)
        positions = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x_BTD = embed(root, tokens_BT)
        moe_stats, mod_stats = {}, {}
        for i, module in enumerate(self.layers):
            x_BTD, layer_mod, layer_moe = module(
                x_BTD, cos, sin, positions, knobs, rng, train, remat_mode, fp8
            )
            if layer_mod is not None:
                mod_stats[str(i)] = layer_mod
            if layer_moe is not None:
                moe_stats[str(i)] = layer_moe
        aux = aux_losses(moe_stats, mod_stats, self.cfg, knobs, tokens_BT.device)
        if head_fn is not None:
            return head_fn(root, final_norm(root, x_BTD, self.cfg)), aux
        return head(root, x_BTD, self.cfg), aux

    def _leaves(self) -> dict[str, nn.Parameter]:
        """The parameters under their tree names (``root.embed.weight`` -> ``embed.weight``,
        ``layers.3.p.attn.wq`` -> ``layers.3.attn.wq``)."""
        return {name.removeprefix("root.").replace(".p.", ".", 1): p for name, p in self.named_parameters()}

    def params(self) -> TensorDict:
        """The parameter tree as the model's ``apply`` expects it (same leaves: no copy)."""
        return tree.unflatten(self._leaves())

    def grads(self) -> TensorDict:
        """The parameters' ``.grad`` as a tree (zeros where none arrived)."""
        return tree.unflatten(
            {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in self._leaves().items()}
        )
