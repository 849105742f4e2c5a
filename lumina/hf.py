"""Hugging Face ``transformers`` interop for Llama and Mixtral (MoE) checkpoints.

    cfg, params = from_hf(LlamaForCausalLM.from_pretrained(...))      # or (state_dict, config)
    state_dict, config_dict = to_hf(cfg, params)
    LlamaForCausalLM(LlamaConfig(**config_dict)).load_state_dict(state_dict, strict=not cfg.tie_embeddings)

HF stores projections as torch ``Linear`` weights [out, in]; Lumina stores [in, out], so every matrix
is transposed on the way through. Mixtral experts are read in both layouts transformers has used
(v5: fused ``mlp.experts.gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``; v4: per-expert
``block_sparse_moe.experts.<e>.w1/w2/w3``) and written in the installed transformers' layout
(``expert_layout="auto"``). Both use the half-split RoPE layout, so no head permutation is
needed. A tied model's ``lm_head.weight`` is left out of the exported state dict (as
``save_pretrained`` does); the HF model ties it to the embedding itself.

``transformers`` is only needed by the caller (it is a dev/test dependency of Lumina): this module
works on plain state dicts and config dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict

from lumina import tree
from lumina.config import ConfigError, ModelConfig, MoEConfig

__all__ = ["from_hf", "to_hf"]

# (lumina path, HF path, transpose) per layer; "{i}" is the layer index.
_LAYER_MAP = (
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("layers.{i}.attn.wq", "model.layers.{i}.self_attn.q_proj.weight", True),
    ("layers.{i}.attn.wk", "model.layers.{i}.self_attn.k_proj.weight", True),
    ("layers.{i}.attn.wv", "model.layers.{i}.self_attn.v_proj.weight", True),
    ("layers.{i}.attn.wo", "model.layers.{i}.self_attn.o_proj.weight", True),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
)
_DENSE_FFN_MAP = (
    ("layers.{i}.ffn.w_gate", "model.layers.{i}.mlp.gate_proj.weight", True),
    ("layers.{i}.ffn.w_up", "model.layers.{i}.mlp.up_proj.weight", True),
    ("layers.{i}.ffn.w_down", "model.layers.{i}.mlp.down_proj.weight", True),
)
# Mixtral router and the two expert layouts.
_ROUTER = {
    "fused": "model.layers.{i}.mlp.gate.weight",
    "per_expert": "model.layers.{i}.block_sparse_moe.gate.weight",
}
_FUSED_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"  # [E, 2F, D]: gate rows, then up rows
_FUSED_DOWN = "model.layers.{i}.mlp.experts.down_proj"  # [E, D, F]
_PER_EXPERT = (
    "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"  # w1 gate, w3 up [F, D]; w2 down [D, F]
)
_GLOBAL_MAP = (
    ("embed.weight", "model.embed_tokens.weight", False),
    ("final_norm.weight", "model.norm.weight", False),
)
_HEAD = ("head.weight", "lm_head.weight", True)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older transformers versions saved


def _name_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """The 1:1 rows (everything except Mixtral's experts)."""
    rows = list(_GLOBAL_MAP)
    layer_rows = _LAYER_MAP if cfg.moe.enabled else _LAYER_MAP + _DENSE_FFN_MAP
    for i in range(cfg.n_layers):
        rows += [(ours.format(i=i), theirs.format(i=i), t) for ours, theirs, t in layer_rows]
    if not cfg.tie_embeddings:
        rows.append(_HEAD)
    return rows


def _take(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ConfigError(f"hf state dict: missing {key!r}")
    return sd.pop(key).detach()


def _experts_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, flat: dict[str, torch.Tensor]) -> None:
    E, F = cfg.moe.num_experts, cfg.expert_dim
    layout = "fused" if _ROUTER["fused"].format(i=0) in sd else "per_expert"
    for i in range(cfg.n_layers):
        p = f"layers.{i}.moe"
        flat[f"{p}.router"] = _take(sd, _ROUTER[layout].format(i=i)).T.contiguous()
        if layout == "fused":
            gate_up = _take(sd, _FUSED_GATE_UP.format(i=i))  # [E, 2F, D]
            flat[f"{p}.w_gate"] = gate_up[:, :F].transpose(1, 2).contiguous()
            flat[f"{p}.w_up"] = gate_up[:, F:].transpose(1, 2).contiguous()
            flat[f"{p}.w_down"] = _take(sd, _FUSED_DOWN.format(i=i)).transpose(1, 2).contiguous()
        else:

            def stack(w: str, i: int = i) -> torch.Tensor:
                return torch.stack([_take(sd, _PER_EXPERT.format(i=i, e=e, w=w)).T for e in range(E)])

            flat[f"{p}.w_gate"], flat[f"{p}.w_up"], flat[f"{p}.w_down"] = (
                stack("w1"),
                stack("w3"),
                stack("w2"),
            )


def _experts_to_hf(flat, cfg: ModelConfig, layout: str, sd: dict[str, torch.Tensor]) -> None:
    for i in range(cfg.n_layers):
        p = f"layers.{i}.moe"
        sd[_ROUTER[layout].format(i=i)] = flat[f"{p}.router"].T.contiguous()
        gate, up, down = (
            flat[f"{p}.w_gate"],
            flat[f"{p}.w_up"],
            flat[f"{p}.w_down"],
        )  # [E,D,F] [E,D,F] [E,F,D]
        if layout == "fused":
            sd[_FUSED_GATE_UP.format(i=i)] = torch.cat([gate, up], dim=2).transpose(1, 2).contiguous()
            sd[_FUSED_DOWN.format(i=i)] = down.transpose(1, 2).contiguous()
        else:
            for e in range(cfg.moe.num_experts):
                for w, t in (("w1", gate[e]), ("w3", up[e]), ("w2", down[e])):
                    sd[_PER_EXPERT.format(i=i, e=e, w=w)] = t.T.contiguous()


def _installed_expert_layout() -> str:
    try:
        import transformers
    except ImportError:
        return "fused"
    return "fused" if int(transformers.__version__.split(".")[0]) >= 5 else "per_expert"


def _config_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"hf_config must be a transformers config or a dict, got {type(hf_config).__name__}")


def _rope_theta(c: Mapping[str, Any]) -> float:
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"hf config: rope type {kind!r} is not supported (only default RoPE)")
    return float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _model_config(c: Mapping[str, Any]) -> ModelConfig:
    kind = c.get("model_type")
    if kind not in ("llama", "mixtral"):
        raise ConfigError(f"hf config: model_type {kind!r} is not supported (supported: 'llama', 'mixtral')")
    moe = MoEConfig()
    if kind == "mixtral":
        window = c.get("sliding_window")
        if window is not None and window < c.get("max_position_embeddings", 0):
            raise ConfigError(
                f"hf config: sliding_window={window} is not supported (full causal attention only)"
            )
        moe = MoEConfig(
            num_experts=c["num_local_experts"],
            top_k=c["num_experts_per_tok"],
            d_expert=c["intermediate_size"],
            renormalize=True,
            router_jitter=float(c.get("router_jitter_noise") or 0.0),
            # transformers' balance loss sums the expert shares over the k slots, so it is top_k x ours
            # (ours is 1.0 when balanced, theirs top_k): the same gradient needs top_k x the weight.
            aux_loss_weight=float(c.get("router_aux_loss_coef", 1e-2)) * c["num_experts_per_tok"],
        )
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise ConfigError(f"hf config: {flag}=True is not supported (Lumina's projections have no bias)")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hf config: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    n_heads = c["num_attention_heads"]
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        ffn_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(c),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=float(c.get("initializer_range", 0.02)),
        moe=moe,
    )


def from_hf(model_or_state_dict: Any, hf_config: Any = None) -> tuple[ModelConfig, TensorDict]:
    """Convert a ``LlamaForCausalLM`` (or its state dict plus config) into ``(ModelConfig, params)``."""
    if hasattr(model_or_state_dict, "state_dict"):
        if hf_config is None:
            hf_config = model_or_state_dict.config
        sd = model_or_state_dict.state_dict()
    else:
        sd = dict(model_or_state_dict)
    if hf_config is None:
        raise TypeError("from_hf(state_dict, hf_config): the config is required with a bare state dict")
    cfg = _model_config(_config_dict(hf_config))
    sd = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in sd.items()}
    flat = {}
    for ours, theirs, transpose in _name_map(cfg):
        t = _take(sd, theirs)
        flat[ours] = (t.T if transpose else t).contiguous()
    if cfg.moe.enabled:
        _experts_from_hf(sd, cfg, flat)
    sd.pop(_HEAD[1], None)  # tied: lm_head aliases the embedding
    unexpected = [k for k in sd if not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ConfigError(f"hf state dict: unexpected keys {unexpected[:3]} (is this a Llama checkpoint?)")
    return cfg, tree.unflatten(flat)


def _check_exportable(cfg: ModelConfig) -> None:
    moe = cfg.moe
    problems = [
        (cfg.mod.enabled, "Mixture-of-Depths has no transformers equivalent"),
        (
            moe.enabled and any(not m for m in cfg.moe_layers()),
            "Mixtral needs MoE in every layer (pattern='all')",
        ),
        (moe.num_shared_experts > 0, "Mixtral has no shared experts"),
        (moe.enabled and moe.balance != "aux_loss", "Mixtral has no balance bias (balance='bias')"),
        (moe.enabled and not moe.renormalize, "Mixtral renormalises the top-k weights"),
    ]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"to_hf: cannot export this model: {why}")


def to_hf(
    cfg: ModelConfig, params: TensorDict, *, expert_layout: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Export ``(state_dict, config_dict)``: a dense model as Llama, an MoE model as Mixtral
    (``LlamaForCausalLM(LlamaConfig(**config_dict))`` / ``MixtralForCausalLM(MixtralConfig(...))``)."""
    _check_exportable(cfg)
    flat = tree.flatten(params)
    state_dict = {}
    for ours, theirs, transpose in _name_map(cfg):
        t = flat[ours]
        state_dict[theirs] = (t.T if transpose else t).contiguous()
    if cfg.moe.enabled:
        layout = _installed_expert_layout() if expert_layout == "auto" else expert_layout
        if layout not in _ROUTER:
            raise ValueError(f"expert_layout must be 'auto', 'fused' or 'per_expert', got {expert_layout!r}")
        _experts_to_hf(flat, cfg, layout, state_dict)
    dtype = flat["embed.weight"].dtype
    config = {
        "architectures": ["MixtralForCausalLM" if cfg.moe.enabled else "LlamaForCausalLM"],
        "model_type": "mixtral" if cfg.moe.enabled else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.moe.enabled:
        config.update(
            intermediate_size=cfg.expert_dim,
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_jitter_noise=cfg.moe.router_jitter,
            router_aux_loss_coef=cfg.moe.aux_loss_weight / cfg.moe.top_k,  # see from_hf
            sliding_window=None,
        )
        for key in ("attention_bias", "mlp_bias"):
            config.pop(key)
    return state_dict, config
