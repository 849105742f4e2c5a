"""The decoder-only transformer as two pure functions over a TensorDict of parameters.

Legend: B batch, T positions, S cache positions, D d_model, H query heads, G kv heads, C head dim,
F FFN hidden, E experts, V vocab, L layers.

Parameter tree (weights stored [in, out]; experts stacked on a leading E axis):

    embed.weight [V, D]                    final_norm.weight [D]        head.weight [D, V] (untied)
    layers.<i>.attn_norm.weight [D]        layers.<i>.ffn_norm.weight [D]
    layers.<i>.attn.{wq [D, H*C], wk [D, G*C], wv [D, G*C], wo [H*C, D]}
    layers.<i>.ffn.{w_gate [D, F], w_up [D, F], w_down [F, D]}                    (dense layers)
    layers.<i>.moe.router [D, E], layers.<i>.moe.{w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]}
    layers.<i>.moe.shared.{w_gate, w_up, w_down}  (dense FFN of width num_shared_experts * F, if any)
    layers.<i>.moe.balance_bias [E]           (balance="bias": selection bias, updated from load, no grad)
    layers.<i>.mod.router [D], layers.<i>.mod.predictor.{w1 [D, P], w2 [P, 1]}     (MoD-routed layers)

Init scheme: every matrix ~ N(0, init_std) except the two projections that write into the
residual stream (attn.wo, ffn/expert w_down), which get init_std / sqrt(2 * n_layers) so the
residual's variance stays O(1) with depth (GPT-2 / Megatron); norm gains start at 1. Each tensor is
drawn from its own generator seeded by (seed, path), so a tensor's values do not depend on which other
tensors exist (adding an expert leaves the others untouched) and CPU and GPU inits are identical.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from lumina import quant, tree
from lumina.config import ModelConfig
from lumina.model import random, remat
from lumina.model.attention import attention
from lumina.model.layers import apply_rope, linear, rms_norm, rope_cos_sin, swiglu
from lumina.model.mod import mod_block, mod_block_predicted
from lumina.model.moe import MOE_STAT_KEYS, moe_ffn, moe_layer_loss

__all__ = ["apply", "default_knobs", "init", "init_cache", "layer_of_kind", "param_shapes"]

Spec = dict[str, tuple[tuple[int, ...], float | str]]  # dotted path -> (shape, init std | "ones" | "zeros")


def _ffn_spec(prefix: str, D: int, F_: int, std: float, out_std: float, experts: int | None = None) -> Spec:
    lead = (experts,) if experts else ()
    return {
        f"{prefix}.w_gate": ((*lead, D, F_), std),
        f"{prefix}.w_up": ((*lead, D, F_), std),
        f"{prefix}.w_down": ((*lead, F_, D), out_std),
    }


def param_shapes(cfg: ModelConfig) -> Spec:
    """Every parameter's dotted path, shape and init std, in a fixed order."""
    D, V, L, C = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.head_dim
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * L)
    spec: Spec = {"embed.weight": ((V, D), std)}
    moe_layers, mod_layers = cfg.moe_layers(), cfg.mod_layers()
    for i in range(L):
        p = f"layers.{i}"
        spec[f"{p}.attn_norm.weight"] = ((D,), "ones")
        spec[f"{p}.attn.wq"] = ((D, cfg.n_heads * C), std)
        spec[f"{p}.attn.wk"] = ((D, cfg.n_kv_heads * C), std)
        spec[f"{p}.attn.wv"] = ((D, cfg.n_kv_heads * C), std)
        spec[f"{p}.attn.wo"] = ((cfg.n_heads * C, D), out_std)
        spec[f"{p}.ffn_norm.weight"] = ((D,), "ones")
        if moe_layers[i]:
            E, Fe = cfg.moe.num_experts, cfg.expert_dim
            spec[f"{p}.moe.router"] = ((D, E), std)
            spec.update(_ffn_spec(f"{p}.moe", D, Fe, std, out_std, experts=E))
            if cfg.moe.num_shared_experts:
                spec.update(_ffn_spec(f"{p}.moe.shared", D, cfg.moe.num_shared_experts * Fe, std, out_std))
            if cfg.moe.balance == "bias":
                spec[f"{p}.moe.balance_bias"] = ((E,), "zeros")  # updated from load, not by gradients
        else:
            spec.update(_ffn_spec(f"{p}.ffn", D, cfg.ffn_dim, std, out_std))
        if mod_layers[i]:
            P = cfg.mod.predictor_hidden
            spec[f"{p}.mod.router"] = ((D,), std)
            spec[f"{p}.mod.predictor.w1"] = ((D, P), std)
            spec[f"{p}.mod.predictor.w2"] = ((P, 1), std)
    spec["final_norm.weight"] = ((D,), "ones")
    if not cfg.tie_embeddings:
        spec["head.weight"] = ((D, V), std)
    return spec


def _leaf_seed(seed: int, path: str) -> int:
    # torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: hash (seed, path) into them.
    return int.from_bytes(hashlib.blake2b(f"{seed}/{path}".encode(), digest_size=4).digest(), "little")


def init(
    cfg: ModelConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TensorDict:
    """Fresh parameters. ``device="meta"`` allocates nothing (used to count parameters)."""
    flat = {}
    for path, (shape, std) in param_shapes(cfg).items():
        if torch.device(device).type == "meta":
            flat[path] = torch.empty(shape, device="meta", dtype=dtype)
        elif std in ("ones", "zeros"):
            flat[path] = (torch.ones if std == "ones" else torch.zeros)(shape, device=device, dtype=dtype)
        else:
            g = torch.Generator().manual_seed(_leaf_seed(seed, path))
            flat[path] = (torch.randn(shape, generator=g) * std).to(device=device, dtype=dtype)
    return tree.unflatten(flat)


def default_knobs(cfg: ModelConfig, device: torch.device | str = "cpu") -> TensorDict:
    """Live knobs as 0-dim fp32 tensors: changing a value never recompiles a compiled step."""
    moe = cfg.moe
    values = {
        "router_temperature": moe.router_temperature,
        "router_jitter": moe.router_jitter,
        "expert_dropout": moe.expert_dropout,
        "aux_loss_weight": moe.aux_loss_weight,
        "z_loss_weight": moe.z_loss_weight,
        "mod_predictor_loss_weight": cfg.mod.predictor_loss_weight,
    }
    return TensorDict({k: torch.tensor(v, device=device) for k, v in values.items()}, batch_size=[])


def init_cache(
    cfg: ModelConfig,
    batch_size: int,
    max_len: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TensorDict:
    """A static-shape KV cache: ``layers.<i>.{k,v}`` of shape [B, G, S, C] with S = max_len, and
    ``layers.<i>.valid`` [B, S] (bool): which slots hold a key later queries may see (False for a left
    pad, and in a MoD layer for a token the predictor routed around the block).

    The cache is the one buffer ``apply`` writes in place (at ``positions``), as gpt-fast does, so a
    decoding step has fixed shapes and compiles once."""
    S = max_len or cfg.max_seq_len
    shape = (batch_size, cfg.n_kv_heads, S, cfg.head_dim)
    layers = {
        str(i): {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "valid": torch.zeros(batch_size, S, device=device, dtype=torch.bool),
        }
        for i in range(cfg.n_layers)
    }
    return TensorDict({"layers": layers}, batch_size=[])


def _attn_block(
    h_BTD: torch.Tensor,
    p: TensorDict,
    cfg: ModelConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    cache: TensorDict | None,
    fp8: bool = False,
    key_valid_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """``key_valid_BT``: which of these tokens other queries may attend to; a query always sees its
    own key, so a row with no other visible key (a pad, a skipped token) stays finite."""
    B, T, _ = h_BTD.shape
    H, G, C = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q_BHTC = linear(h_BTD, p["wq"], fp8).view(B, T, H, C).transpose(1, 2)
    k_BGTC = linear(h_BTD, p["wk"], fp8).view(B, T, G, C).transpose(1, 2)
    v_BGTC = linear(h_BTD, p["wv"], fp8).view(B, T, G, C).transpose(1, 2)
    q_BHTC, k_BGTC = apply_rope(q_BHTC, cos, sin), apply_rope(k_BGTC, cos, sin)
    if cache is None and key_valid_BT is not None:
        idx_T = torch.arange(T, device=h_BTD.device)
        causal_TT = idx_T[None, :] <= idx_T[:, None]
        self_TT = torch.eye(T, dtype=torch.bool, device=h_BTD.device)
        mask_BTT = (causal_TT & key_valid_BT[:, None, :]) | self_TT
        o_BHTC = attention(q_BHTC, k_BGTC, v_BGTC, backend=cfg.attn_backend, mask=mask_BTT[:, None])
    elif cache is None:
        o_BHTC = attention(q_BHTC, k_BGTC, v_BGTC, backend=cfg.attn_backend)
    elif "valid" in cache.keys():  # noqa: SIM118 (TensorDict has no `in`)
        k_cache, v_cache, valid_BS = cache["k"], cache["v"], cache["valid"]
        k_cache.index_copy_(2, positions, k_BGTC.to(k_cache.dtype))  # [B, G, S, C] written at positions
        v_cache.index_copy_(2, positions, v_BGTC.to(v_cache.dtype))
        if key_valid_BT is None:
            key_valid_BT = torch.ones(B, T, dtype=torch.bool, device=h_BTD.device)
        valid_BS.index_copy_(1, positions, key_valid_BT)
        key_pos_S = torch.arange(valid_BS.shape[1], device=h_BTD.device)
        q_pos_T1 = positions[:, None]
        mask_BTS = ((key_pos_S <= q_pos_T1) & valid_BS[:, None, :]) | (key_pos_S == q_pos_T1)
        o_BHTC = attention(
            q_BHTC,
            k_cache.to(q_BHTC.dtype),
            v_cache.to(q_BHTC.dtype),
            backend=cfg.attn_backend,
            mask=mask_BTS[:, None],
        )
    else:
        k_cache, v_cache = cache["k"], cache["v"]
        k_cache.index_copy_(2, positions, k_BGTC.to(k_cache.dtype))  # [B, G, S, C] written at positions
        v_cache.index_copy_(2, positions, v_BGTC.to(v_cache.dtype))
        o_BHTC = attention(
            q_BHTC,
            k_cache.to(q_BHTC.dtype),
            v_cache.to(q_BHTC.dtype),
            backend=cfg.attn_backend,
            q_positions=positions,
        )
    return linear(o_BHTC.transpose(1, 2).reshape(B, T, H * C), p["wo"], fp8)


def _block(
    x_BTD: torch.Tensor,
    p: TensorDict,
    cfg: ModelConfig,
    knobs: TensorDict,
    rope: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    cache: TensorDict | None,
    *,
    moe: bool,
    train: bool,
    rng: torch.Tensor | None = None,
    remat_mode: str = "none",
    fp8: bool = False,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]:
    """One pre-norm block: (attention update, x + attention update, FFN update, MoE stats or None).
    ``remat_mode``: "full" recomputes the whole block in the backward pass, "attention" only the
    attention sub-layer (see ``lumina.model.remat``). ``fp8``: the projections and FFN / expert
    matmuls through ``lumina.fp8``."""
    cos, sin = rope
    if remat_mode == "full":
        (p_keys, p_vals), (f_keys, f_vals) = _remat_inputs(tree.flatten(p))
        k_flat = tree.flatten(knobs)
        static = (cfg, moe, train, p_keys, tuple(k_flat), rng is not None, fp8, f_keys)
        others = ((positions,) if rng is None else (positions, rng)) + f_vals
        outs = remat.remat("block", static, (x_BTD, cos, sin, *p_vals, *k_flat.values()), others)
        stats = dict(zip(MOE_STAT_KEYS, outs[3:], strict=True)) if moe else None
        return outs[0], outs[1], outs[2], stats
    h_BTD = rms_norm(x_BTD, p["attn_norm", "weight"], cfg.norm_eps)
    if remat_mode == "attention":
        (a_keys, a_vals), (f_keys, f_vals) = _remat_inputs(tree.flatten(p["attn"]), prefix="attn.")
        (attn_BTD,) = remat.remat(
            "attn", (cfg, fp8, a_keys, f_keys), (h_BTD, cos, sin, *a_vals), (positions, *f_vals)
        )
    else:
        attn_BTD = _attn_block(h_BTD, p["attn"], cfg, cos, sin, positions, cache, fp8, key_valid)
    x1_BTD = x_BTD + attn_BTD
    h_BTD = rms_norm(x1_BTD, p["ffn_norm", "weight"], cfg.norm_eps)
    if moe:
        ffn_BTD, stats = moe_ffn(h_BTD, p["moe"], cfg, knobs, train=train, rng=rng, fp8=fp8)
        return attn_BTD, x1_BTD, ffn_BTD, stats
    f = p["ffn"]
    return attn_BTD, x1_BTD, swiglu(h_BTD, f["w_gate"], f["w_up"], f["w_down"], fp8), None


def _remat_inputs(flat: dict[str, torch.Tensor], prefix: str = "") -> tuple[tuple, tuple]:
    """((keys, tensors) a remat segment differentiates, (keys, tensors) it only reads): the second
    holds the frozen parts of quantized / adapted weights (``lumina.quant``: codes, scales, a frozen
    base matrix), so the recomputed backward never forms gradients for them."""
    diff, frozen = {}, {}
    for k, v in flat.items():
        frozen_leaf = not v.is_floating_point() or quant.is_frozen_leaf(prefix + k)
        (frozen if frozen_leaf else diff)[k] = v
    return (tuple(diff), tuple(diff.values())), (tuple(frozen), tuple(frozen.values()))


def _attn_segment(static, h_BTD, cos, sin, *rest):
    cfg, fp8, a_keys, f_keys = static
    n = len(a_keys)
    flat = dict(zip(a_keys, rest[:n], strict=True)) | dict(zip(f_keys, rest[n + 1 :], strict=True))
    return (_attn_block(h_BTD, tree.unflatten(flat), cfg, cos, sin, rest[n], None, fp8),)


def _block_segment(static, x_BTD, cos, sin, *rest):
    cfg, moe, train, p_keys, k_keys, has_rng, fp8, f_keys = static
    n_p, n_k = len(p_keys), len(k_keys)
    positions = rest[n_p + n_k]
    rng = rest[n_p + n_k + 1] if has_rng else None
    frozen = rest[n_p + n_k + 1 + has_rng :]
    p = tree.unflatten(dict(zip(p_keys, rest[:n_p], strict=True)) | dict(zip(f_keys, frozen, strict=True)))
    knobs = tree.unflatten(dict(zip(k_keys, rest[n_p : n_p + n_k], strict=True)))
    attn, x1, ffn, stats = _block(
        x_BTD, p, cfg, knobs, (cos, sin), positions, None, moe=moe, train=train, rng=rng, fp8=fp8
    )
    return (attn, x1, ffn, *(stats[k] for k in MOE_STAT_KEYS)) if moe else (attn, x1, ffn)


remat.register("attn", _attn_segment)
remat.register("block", _block_segment)


def apply(
    params: TensorDict,
    tokens_BT: torch.Tensor,
    cfg: ModelConfig,
    knobs: TensorDict | None = None,
    *,
    cache: TensorDict | None = None,
    positions: torch.Tensor | None = None,
    train: bool = True,
    rng: torch.Tensor | None = None,
    remat_mode: str = "none",
    fp8: bool = False,
    return_hidden: bool = False,
    valid: torch.Tensor | None = None,
    mod_routing: str = "topk",
    layer_fn: Callable[[bool, bool], Callable] | None = None,
) -> tuple[torch.Tensor, TensorDict]:
    """Logits [B, T, V] and ``aux``: ``aux["loss"]`` (the weighted aux losses to add to the training
    loss: mean over MoE layers of their balance + z losses, plus mean over MoD layers of the predictor
    loss) and per-layer stats ``aux["moe", i, ...]``, ``aux["mod", i, ...]`` (see moe.py, mod.py).

    ``positions`` are the tokens' absolute positions ([T] or [B, T], default 0..T-1); they drive RoPE
    and, with a ``cache`` from ``init_cache``, where new keys/values are written and what each query
    sees. ``train`` enables router jitter and expert dropout, drawn from the key ``rng``
    (``lumina.model.random``; per layer ``fold_in(rng, i)``) or, when None, from torch's global
    generator. ``remat_mode`` = "none" | "full" | "attention": activation recomputation in the
    backward pass (gradient checkpointing), training only; it needs ``rng`` when jitter or expert
    dropout are on, so the recomputed forward draws the same numbers. ``fp8`` (train.precision=fp8):
    the attention projections, dense FFNs and experts multiply through ``lumina.fp8`` (e4m3 operands,
    e5m2 gradients); embedding, head, norms, attention scores and routers stay in the params' dtype.
    ``return_hidden``: return the final hidden states [B, T, D] (after the final norm) in place of the
    logits, for a loss that applies the head itself (``lumina.model.loss.linear_cross_entropy`` with
    ``head_weight(params, cfg)``: the train and eval steps, so the [B, T, V] logits never exist whole).

    Inference (``lumina.generate``): ``valid`` [B, T] bool marks real tokens (False: a left pad, which
    no other token attends to). ``mod_routing="predictor"`` routes each token of a MoD layer by the
    causal predictor (``lumina.model.mod.mod_block_predicted``: no look-ahead, so prefill and decoding
    over a cache agree with this no-cache forward); "topk" (training's per-sequence capacity top-k)
    looks at the whole sequence and therefore refuses a cache.

    ``layer_fn(moe, mod)`` (training without a cache): the function to run each layer of that kind
    with, called as ``layer_of_kind`` without its keyword arguments — ``lumina.step`` passes compiled copies
    (regional compilation: one compile per kind of layer, reused by every layer of the kind).
    """
    if mod_routing not in ("topk", "predictor"):
        raise ValueError(f"mod_routing={mod_routing!r}: expected topk or predictor")
    if remat_mode not in ("none", "full", "attention"):
        raise ValueError(f"remat_mode={remat_mode!r}: expected none, full or attention")
    if cache is not None or valid is not None or mod_routing == "predictor":
        remat_mode = "none"  # inference paths
    B, T = tokens_BT.shape
    if positions is None:
        if cache is not None:
            raise ValueError("apply(..., cache=...) needs positions: the absolute positions of these tokens")
        positions = torch.arange(T, device=tokens_BT.device)
    if cache is not None and positions.dim() != 1:
        raise ValueError("with a KV cache, positions must be 1-D [T] (shared by the batch)")
    if knobs is None:
        knobs = default_knobs(cfg, tokens_BT.device)
    rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    if cache is not None and any(cfg.mod_layers()) and mod_routing != "predictor":
        raise ValueError(
            "cached decoding of MoD-routed layers needs mod_routing='predictor' (top-k routing looks ahead)"
        )

    moe_stats, mod_stats = {}, {}
    x_BTD = embed(params, tokens_BT)
    for i in range(cfg.n_layers):
        if layer_fn is not None and cache is None:
            x_BTD, layer_mod, layer_moe = layer_fn(cfg.moe_layers()[i], cfg.mod_layers()[i])(
                x_BTD,
                params["layers", str(i)],
                knobs,
                rope,
                positions,
                None if rng is None else random.fold_in(rng, i),
            )
        else:
            x_BTD, layer_mod, layer_moe = layer(
                i,
                x_BTD,
                params["layers", str(i)],
                cfg,
                knobs,
                rope,
                positions,
                cache=None if cache is None else cache["layers", str(i)],
                train=train,
                rng=rng,
                remat_mode=remat_mode,
                fp8=fp8,
                valid=valid,
                mod_routing=mod_routing,
            )
        if layer_mod is not None:
            mod_stats[str(i)] = layer_mod
        if layer_moe is not None:
            moe_stats[str(i)] = layer_moe
    aux = aux_losses(moe_stats, mod_stats, cfg, knobs, tokens_BT.device)
    if return_hidden:
        return final_norm(params, x_BTD, cfg), aux
    return head(params, x_BTD, cfg), aux


# The pieces ``apply`` composes, public so that a module view of the parameters (one nn.Module per
# layer, as FSDP / DDP / DeepSpeed need: lumina.distributed) runs exactly the same functions.


def embed(params: TensorDict, tokens_BT: torch.Tensor) -> torch.Tensor:
    """The token embeddings [B, T, D]."""
    return F.embedding(tokens_BT, params["embed", "weight"])


def layer(
    i: int,
    x_BTD: torch.Tensor,
    p: TensorDict,
    cfg: ModelConfig,
    knobs: TensorDict,
    rope: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    *,
    cache: TensorDict | None = None,
    train: bool = True,
    rng: torch.Tensor | None = None,
    remat_mode: str = "none",
    fp8: bool = False,
    valid: torch.Tensor | None = None,
    mod_routing: str = "topk",
) -> tuple[torch.Tensor, dict | None, dict | None]:
    """Layer ``i`` (its parameters ``p`` = ``params["layers", str(i)]``): the new residual stream, its
    MoD stats (MoD layers) and its MoE stats (MoE layers), else None. ``rng`` is the model's key
    (this layer folds in ``i``)."""
    return layer_of_kind(
        x_BTD,
        p,
        knobs,
        rope,
        positions,
        None if rng is None else random.fold_in(rng, i),
        cfg=cfg,
        moe=cfg.moe_layers()[i],
        mod=cfg.mod_layers()[i],
        cache=cache,
        train=train,
        remat_mode=remat_mode,
        fp8=fp8,
        valid=valid,
        mod_routing=mod_routing,
    )


def layer_of_kind(
    x_BTD: torch.Tensor,
    p: TensorDict,
    knobs: TensorDict,
    rope: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    rng: torch.Tensor | None,
    *,
    cfg: ModelConfig,
    moe: bool,
    mod: bool,
    cache: TensorDict | None = None,
    train: bool = True,
    remat_mode: str = "none",
    fp8: bool = False,
    valid: torch.Tensor | None = None,
    mod_routing: str = "topk",
) -> tuple[torch.Tensor, dict | None, dict | None]:
    """A layer by its kind (MoE or dense FFN; MoD-routed or not) rather than its index, with the
    layer's own key ``rng`` (already folded with the index): every layer of a kind runs this same
    function on same-shaped arguments, so one compiled copy serves them all (``lumina.step``'s
    regional compilation)."""
    block = functools.partial(
        _block,
        p=p,
        cfg=cfg,
        knobs=knobs,
        cache=cache,
        moe=moe,
        train=train,
        rng=rng,
        remat_mode=remat_mode,
        fp8=fp8,
    )
    if mod and mod_routing == "predictor":

        def dense_delta(route_BT):
            attn_BTD, _, ffn_BTD, stats = block(x_BTD, rope=rope, positions=positions, key_valid=route_BT)
            return attn_BTD + ffn_BTD, stats

        return mod_block_predicted(x_BTD, p["mod"], dense_delta, valid)
    if mod:

        def delta(x_sel_BSD, pos_BS):
            rope_sel = rope_cos_sin(pos_BS, cfg.head_dim, cfg.rope_theta)
            attn_BSD, _, ffn_BSD, stats = block(x_sel_BSD, rope=rope_sel, positions=pos_BS)
            return attn_BSD + ffn_BSD, stats

        x_BTD, mod_stats, moe_stats = mod_block(x_BTD, p["mod"], delta, positions, cfg, knobs)
        return x_BTD, mod_stats, moe_stats
    _, x1_BTD, ffn_BTD, moe_stats = block(x_BTD, rope=rope, positions=positions, key_valid=valid)
    return x1_BTD + ffn_BTD, None, moe_stats  # (x + attn) + ffn: Llama's order, for bit-level parity


def head(params: TensorDict, x_BTD: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Final norm and the LM head (the embedding's transpose when tied): logits [B, T, V]."""
    return final_norm(params, x_BTD, cfg) @ head_weight(params, cfg)


def final_norm(params: TensorDict, x_BTD: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The residual stream after the final RMSNorm: what the LM head multiplies. [B, T, D]"""
    return rms_norm(x_BTD, params["final_norm", "weight"], cfg.norm_eps)


def head_weight(params: TensorDict, cfg: ModelConfig) -> torch.Tensor:
    """The LM head matrix [D, V]: the embedding's transpose (a view) when tied, else ``head.weight``."""
    return params["embed", "weight"].T if cfg.tie_embeddings else params["head", "weight"]


def aux_losses(
    moe_stats: dict, mod_stats: dict, cfg: ModelConfig, knobs: TensorDict, device: torch.device
) -> TensorDict:
    """``apply``'s aux: the weighted aux loss (mean over MoE layers of balance + z losses, plus the
    mean MoD predictor loss) and the per-layer stats."""
    loss = torch.zeros((), device=device)
    if moe_stats:
        loss = loss + sum(moe_layer_loss(s, cfg, knobs) for s in moe_stats.values()) / len(moe_stats)
    if mod_stats:
        pred = sum(s["predictor_loss"] for s in mod_stats.values()) / len(mod_stats)
        loss = loss + knobs["mod_predictor_loss_weight"] * pred
    aux = TensorDict({"loss": loss}, batch_size=[])
    if moe_stats:
        aux["moe"] = moe_stats
    if mod_stats:
        aux["mod"] = mod_stats
    return aux
