"""Hugging Face ``transformers`` interop for Llama-architecture checkpoints.

    cfg, params = from_hf(LlamaForCausalLM.from_pretrained(...))      # or (state_dict, config)
    state_dict, config_dict = to_hf(cfg, params)
    LlamaForCausalLM(LlamaConfig(**config_dict)).load_state_dict(state_dict, strict=not cfg.tie_embeddings)

HF stores projections as torch ``Linear`` weights [out, in]; Lumina stores [in, out], so every matrix
is transposed on the way through. Both use the half-split RoPE layout, so no head permutation is
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

from lumina.config import ConfigError, ModelConfig

__all__ = ["from_hf", "to_hf"]

# (lumina path, HF path, transpose) per layer; "{i}" is the layer index.
_LAYER_MAP = (
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("layers.{i}.attn.wq", "model.layers.{i}.self_attn.q_proj.weight", True),
    ("layers.{i}.attn.wk", "model.layers.{i}.self_attn.k_proj.weight", True),
    ("layers.{i}.attn.wv", "model.layers.{i}.self_attn.v_proj.weight", True),
    ("layers.{i}.attn.wo", "model.layers.{i}.self_attn.o_proj.weight", True),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("layers.{i}.ffn.w_gate", "model.layers.{i}.mlp.gate_proj.weight", True),
    ("layers.{i}.ffn.w_up", "model.layers.{i}.mlp.up_proj.weight", True),
    ("layers.{i}.ffn.w_down", "model.layers.{i}.mlp.down_proj.weight", True),
)
_GLOBAL_MAP = (
    ("embed.weight", "model.embed_tokens.weight", False),
    ("final_norm.weight", "model.norm.weight", False),
)
_HEAD = ("head.weight", "lm_head.weight", True)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older transformers versions saved


def _name_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    rows = list(_GLOBAL_MAP)
    for i in range(cfg.n_layers):
        rows += [(ours.format(i=i), theirs.format(i=i), t) for ours, theirs, t in _LAYER_MAP]
    if not cfg.tie_embeddings:
        rows.append(_HEAD)
    return rows


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
    if kind != "llama":
        raise ConfigError(f"hf config: model_type {kind!r} is not supported (supported: 'llama')")
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
        if theirs not in sd:
            raise ConfigError(f"hf state dict: missing {theirs!r}")
        t = sd.pop(theirs).detach()
        flat[ours] = (t.T if transpose else t).contiguous()
    sd.pop(_HEAD[1], None)  # tied: lm_head aliases the embedding
    unexpected = [k for k in sd if not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ConfigError(f"hf state dict: unexpected keys {unexpected[:3]} (is this a Llama checkpoint?)")
    return cfg, TensorDict(flat, batch_size=[]).unflatten_keys(".")


def to_hf(cfg: ModelConfig, params: TensorDict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Export ``(state_dict, config_dict)`` for ``LlamaForCausalLM(LlamaConfig(**config_dict))``."""
    if cfg.moe.enabled or cfg.mod.enabled:
        raise ConfigError("to_hf: only dense models export to Llama (MoE/MoD export is not supported yet)")
    flat = params.flatten_keys(".")
    state_dict = {}
    for ours, theirs, transpose in _name_map(cfg):
        t = flat[ours]
        state_dict[theirs] = (t.T if transpose else t).contiguous()
    dtype = flat["embed.weight"].dtype
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
    return state_dict, config
