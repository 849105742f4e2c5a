"""Hugging Face ``transformers`` interop: Llama (dense), Mixtral (MoE) and Qwen2-MoE (MoE with shared
experts) checkpoints, in memory and as folders on disk.

    cfg, params = from_hf(LlamaForCausalLM.from_pretrained(...))      # or (state_dict, config)
    state_dict, config_dict = to_hf(cfg, params)
    LlamaForCausalLM(LlamaConfig(**config_dict)).load_state_dict(state_dict, strict=not cfg.tie_embeddings)
    cfg, params = load_dir("out/model")                                # a folder: safetensors only

HF stores projections as torch ``Linear`` weights [out, in]; Lumina stores [in, out], so every matrix
is transposed on the way through. Routed experts are read in both layouts transformers has used
(v5 in memory: fused ``mlp.experts.gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``; files and
v4: per expert, Mixtral's ``block_sparse_moe.experts.<e>.w1/w2/w3``, Qwen2-MoE's
``mlp.experts.<e>.gate_proj/up_proj/down_proj``) and written in the installed transformers' in-memory
layout (``expert_layout="auto"``) or, for files, per expert (what ``save_pretrained`` writes). All
three use the half-split RoPE layout, so no head permutation is needed. A tied model's
``lm_head.weight`` is left out of the exported state dict (as ``save_pretrained`` does); the HF model
ties it to the embedding itself.

Qwen2-MoE's shared expert is gated, sigmoid(x g) * FFN(x); Lumina's is not. With g = 0 the factor is
exactly 1/2, so an export writes g = 0 and the shared w_down doubled (exact: a power of two), and an
import requires g = 0 (a trained gate has no Lumina equivalent). Its q/k/v biases are written as zeros
and must be zero on import.

``transformers`` is only needed by the caller (it is a dev/test dependency of Lumina): this module
works on plain state dicts, config dicts, JSON and safetensors files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from lumina import tree
from lumina.config import ConfigError, ModelConfig, MoEConfig

__all__ = ["export_problem", "from_hf", "is_hf_dir", "load_dir", "read_dir", "to_hf", "tokenizer_json"]

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
# The routed experts, per architecture: the router and the two layouts (fused: v5 in memory,
# gate_up_proj [E, 2F, D] = gate rows then up rows, down_proj [E, D, F]; per_expert: what files hold).
_EXPERTS = {
    "mixtral": {
        "router": {
            "fused": "model.layers.{i}.mlp.gate.weight",
            "per_expert": "model.layers.{i}.block_sparse_moe.gate.weight",
        },
        "per_expert": "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight",  # w1 gate, w3 up, w2 down
        "names": ("w1", "w3", "w2"),
    },
    "qwen2_moe": {
        "router": dict.fromkeys(("fused", "per_expert"), "model.layers.{i}.mlp.gate.weight"),
        "per_expert": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
        "names": ("gate_proj", "up_proj", "down_proj"),
    },
}  # fmt: skip
_FUSED_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"
_FUSED_DOWN = "model.layers.{i}.mlp.experts.down_proj"
# Qwen2-MoE's always-on shared expert, its sigmoid gate, and the q/k/v biases (written as zeros).
_SHARED = "model.layers.{i}.mlp.shared_expert.{w}.weight"
_SHARED_GATE = "model.layers.{i}.mlp.shared_expert_gate.weight"
_QKV_BIAS = "model.layers.{i}.self_attn.{w}_proj.bias"
_GLOBAL_MAP = (
    ("embed.weight", "model.embed_tokens.weight", False),
    ("final_norm.weight", "model.norm.weight", False),
)
_HEAD = ("head.weight", "lm_head.weight", True)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older transformers versions saved


def _arch(cfg: ModelConfig) -> str:
    """The transformers architecture a model exports as: llama (dense), mixtral (MoE), qwen2_moe
    (MoE with shared experts; MoE on some layers too)."""
    if not cfg.moe.enabled:
        return "llama"
    return "qwen2_moe" if cfg.moe.num_shared_experts else "mixtral"


def _name_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """The 1:1 rows (everything except the routed and shared experts)."""
    rows = list(_GLOBAL_MAP)
    for i, moe in enumerate(cfg.moe_layers()):
        layer_rows = _LAYER_MAP if moe else _LAYER_MAP + _DENSE_FFN_MAP
        rows += [(ours.format(i=i), theirs.format(i=i), t) for ours, theirs, t in layer_rows]
    if not cfg.tie_embeddings:
        rows.append(_HEAD)
    return rows


def _take(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ConfigError(f"hf state dict: missing {key!r}")
    return sd.pop(key).detach()


def _moe_indices(cfg: ModelConfig) -> list[int]:
    return [i for i, moe in enumerate(cfg.moe_layers()) if moe]


def _experts_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, flat: dict[str, torch.Tensor]) -> None:
    E, F = cfg.moe.num_experts, cfg.expert_dim
    names = _EXPERTS[_arch(cfg)]
    moe_layers = _moe_indices(cfg)
    layout = "fused" if _FUSED_GATE_UP.format(i=moe_layers[0]) in sd else "per_expert"
    for i in moe_layers:
        p = f"layers.{i}.moe"
        flat[f"{p}.router"] = _take(sd, names["router"][layout].format(i=i)).T.contiguous()
        if layout == "fused":
            gate_up = _take(sd, _FUSED_GATE_UP.format(i=i))  # [E, 2F, D]
            flat[f"{p}.w_gate"] = gate_up[:, :F].transpose(1, 2).contiguous()
            flat[f"{p}.w_up"] = gate_up[:, F:].transpose(1, 2).contiguous()
            flat[f"{p}.w_down"] = _take(sd, _FUSED_DOWN.format(i=i)).transpose(1, 2).contiguous()
        else:

            def stack(w: str, i: int = i) -> torch.Tensor:
                return torch.stack([_take(sd, names["per_expert"].format(i=i, e=e, w=w)).T for e in range(E)])

            for ours, w in zip(("w_gate", "w_up", "w_down"), names["names"], strict=True):
                flat[f"{p}.{ours}"] = stack(w)


def _experts_to_hf(flat, cfg: ModelConfig, layout: str, sd: dict[str, torch.Tensor]) -> None:
    names = _EXPERTS[_arch(cfg)]
    for i in _moe_indices(cfg):
        p = f"layers.{i}.moe"
        sd[names["router"][layout].format(i=i)] = flat[f"{p}.router"].T.contiguous()
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
                for w, t in zip(names["names"], (gate[e], up[e], down[e]), strict=True):
                    sd[names["per_expert"].format(i=i, e=e, w=w)] = t.T.contiguous()


# Qwen2-MoE adds sigmoid(x g) * shared_expert(x) to the routed experts: with g = 0 the factor is
# exactly 0.5, so Lumina's ungated shared FFN exports exactly with w_down doubled (a power of two:
# no rounding) and reads back halved. Its q/k/v projections have biases: written as zeros.
def _shared_to_hf(flat, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> None:
    for i in range(cfg.n_layers):
        for w in ("q", "k", "v"):
            width = flat[f"layers.{i}.attn.w{w}"].shape[1]
            sd[_QKV_BIAS.format(i=i, w=w)] = torch.zeros(width, dtype=flat["embed.weight"].dtype)
    for i in _moe_indices(cfg):
        s = f"layers.{i}.moe.shared"
        sd[_SHARED.format(i=i, w="gate_proj")] = flat[f"{s}.w_gate"].T.contiguous()
        sd[_SHARED.format(i=i, w="up_proj")] = flat[f"{s}.w_up"].T.contiguous()
        sd[_SHARED.format(i=i, w="down_proj")] = (2 * flat[f"{s}.w_down"]).T.contiguous()
        sd[_SHARED_GATE.format(i=i)] = torch.zeros(1, cfg.d_model, dtype=flat[f"{s}.w_gate"].dtype)


def _shared_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, flat: dict[str, torch.Tensor]) -> None:
    for i in range(cfg.n_layers):
        for w in ("q", "k", "v"):
            bias = sd.pop(_QKV_BIAS.format(i=i, w=w), None)
            if bias is not None and bias.any():
                raise ConfigError(
                    f"hf state dict: {_QKV_BIAS.format(i=i, w=w)} is not zero (Lumina has no biases)"
                )
    for i in _moe_indices(cfg):
        gate = _take(sd, _SHARED_GATE.format(i=i))
        if gate.any():
            raise ConfigError(
                f"hf state dict: {_SHARED_GATE.format(i=i)} is not zero (a gated shared expert has no Lumina "
                "equivalent)"
            )
        s = f"layers.{i}.moe.shared"
        flat[f"{s}.w_gate"] = _take(sd, _SHARED.format(i=i, w="gate_proj")).T.contiguous()
        flat[f"{s}.w_up"] = _take(sd, _SHARED.format(i=i, w="up_proj")).T.contiguous()
        flat[f"{s}.w_down"] = (_take(sd, _SHARED.format(i=i, w="down_proj")) / 2).T.contiguous()


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


def _moe_pattern(moe_layers: list[bool]) -> dict[str, Any]:
    """Lumina's ``pattern`` / ``every_n`` that gives these MoE layers, or ConfigError."""
    L = len(moe_layers)
    candidates = [{"pattern": "all"}, {"pattern": "sandwich"}]
    candidates += [{"pattern": "every_n", "every_n": n} for n in range(2, L + 1)]
    for c in candidates:
        probe = ModelConfig(
            vocab_size=1, d_model=2, n_layers=L, n_heads=1, moe=MoEConfig(num_experts=1, top_k=1, **c)
        )
        if probe.moe_layers() == moe_layers:
            return c
    moe = [i for i, m in enumerate(moe_layers) if m]
    raise ConfigError(f"hf config: MoE on layers {moe} matches no model.moe.pattern (all, every_n, sandwich)")


def _model_config(c: Mapping[str, Any]) -> ModelConfig:
    kind = c.get("model_type")
    if kind not in ("llama", "mixtral", "qwen2_moe"):
        raise ConfigError(
            f"hf config: model_type {kind!r} is not supported (supported: 'llama', 'mixtral', 'qwen2_moe')"
        )
    moe = MoEConfig()
    window = c.get("sliding_window")
    if (
        kind != "llama"
        and window
        and window < c.get("max_position_embeddings", 0)
        and c.get("use_sliding_window", True)
    ):
        raise ConfigError(f"hf config: sliding_window={window} is not supported (full causal attention only)")
    kinds = set(c.get("layer_types") or ()) - {"full_attention"}
    if kinds:
        raise ConfigError(
            f"hf config: layer_types {sorted(kinds)} are not supported (full causal attention only)"
        )
    # transformers' balance loss sums the expert shares over the k slots, so it is top_k x ours
    # (ours is 1.0 when balanced, theirs top_k): the same gradient needs top_k x the weight.
    if kind == "mixtral":
        moe = MoEConfig(
            num_experts=c["num_local_experts"],
            top_k=c["num_experts_per_tok"],
            d_expert=c["intermediate_size"],
            renormalize=True,
            router_jitter=float(c.get("router_jitter_noise") or 0.0),
            aux_loss_weight=float(c.get("router_aux_loss_coef", 1e-2)) * c["num_experts_per_tok"],
        )
    elif kind == "qwen2_moe":
        L, E, F = c["num_hidden_layers"], c["num_experts"], c["moe_intermediate_size"]
        step, dense = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or ())
        layers = [E > 0 and i not in dense and (i + 1) % step == 0 for i in range(L)]
        shared = c.get("shared_expert_intermediate_size", 0)
        if not shared or shared % F:
            raise ConfigError(
                f"hf config: shared_expert_intermediate_size={shared} is not a positive multiple of "
                f"moe_intermediate_size={F} (Lumina's shared experts are num_shared_experts x d_expert wide)"
            )
        moe = MoEConfig(
            num_experts=E,
            top_k=c["num_experts_per_tok"],
            d_expert=F,
            num_shared_experts=shared // F,
            renormalize=bool(c.get("norm_topk_prob", False)),
            aux_loss_weight=float(c.get("router_aux_loss_coef", 1e-3)) * c["num_experts_per_tok"],
            **_moe_pattern(layers),
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
    if _arch(cfg) == "qwen2_moe":
        _shared_from_hf(sd, cfg, flat)
    sd.pop(_HEAD[1], None)  # tied: lm_head aliases the embedding
    unexpected = [k for k in sd if not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ConfigError(f"hf state dict: unexpected keys {unexpected[:3]} (is this a Llama checkpoint?)")
    return cfg, tree.unflatten(flat)


def export_problem(cfg: ModelConfig) -> str | None:
    """Why ``cfg`` has no exact transformers equivalent (Llama: dense; Mixtral: MoE; Qwen2-MoE: MoE
    with shared experts), or None."""
    moe = cfg.moe
    problems = [
        (cfg.mod.enabled, "Mixture-of-Depths has no transformers equivalent (dense models export as "
         "Llama, MoE models as Mixtral, MoE with shared experts as Qwen2-MoE)"),
        (moe.enabled and not moe.num_shared_experts and any(not m for m in cfg.moe_layers()),
         "Mixtral needs MoE in every layer (model.moe.pattern='all'; with shared experts, Qwen2-MoE "
         "takes any pattern)"),
        (moe.enabled and moe.balance != "aux_loss",
         "Mixtral has no balance bias, nor has Qwen2-MoE (model.moe.balance='bias')"),
        (moe.enabled and not moe.num_shared_experts and not moe.renormalize,
         "Mixtral renormalises top-k weights (model.moe.renormalize)"),
    ]  # fmt: skip
    return next((why for bad, why in problems if bad), None)


def _check_exportable(cfg: ModelConfig) -> None:
    if (why := export_problem(cfg)) is not None:
        raise ConfigError(f"to_hf: cannot export this model: {why}")


def to_hf(
    cfg: ModelConfig, params: TensorDict, *, expert_layout: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Export ``(state_dict, config_dict)``: a dense model as Llama, an MoE model as Mixtral, an MoE
    model with shared experts as Qwen2-MoE (``LlamaForCausalLM(LlamaConfig(**config_dict))``,
    ``MixtralForCausalLM(MixtralConfig(...))``, ``Qwen2MoeForCausalLM(Qwen2MoeConfig(...))``)."""
    _check_exportable(cfg)
    flat = tree.flatten(params)
    state_dict = {}
    for ours, theirs, transpose in _name_map(cfg):
        t = flat[ours]
        state_dict[theirs] = (t.T if transpose else t).contiguous()
    if cfg.moe.enabled and cfg.moe.router_temperature != 1.0:  # softmax(x W / t) = softmax(x (W / t))
        flat = {**flat}
        for i in range(cfg.n_layers):
            flat[f"layers.{i}.moe.router"] = flat[f"layers.{i}.moe.router"] / cfg.moe.router_temperature
    if cfg.moe.enabled:
        layout = _installed_expert_layout() if expert_layout == "auto" else expert_layout
        if layout not in ("fused", "per_expert"):
            raise ValueError(f"expert_layout must be 'auto', 'fused' or 'per_expert', got {expert_layout!r}")
        _experts_to_hf(flat, cfg, layout, state_dict)
    if _arch(cfg) == "qwen2_moe":
        _shared_to_hf(flat, cfg, state_dict)
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
    if _arch(cfg) == "mixtral":
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
    elif _arch(cfg) == "qwen2_moe":
        config.update(
            architectures=["Qwen2MoeForCausalLM"],
            model_type="qwen2_moe",
            moe_intermediate_size=cfg.expert_dim,
            shared_expert_intermediate_size=cfg.moe.num_shared_experts * cfg.expert_dim,
            num_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            norm_topk_prob=cfg.moe.renormalize,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, moe in enumerate(cfg.moe_layers()) if not moe],
            qkv_bias=True,  # zeros; transformers < 5 always builds the biases
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layers,
            router_aux_loss_coef=cfg.moe.aux_loss_weight / cfg.moe.top_k,
        )
        for key in ("attention_bias", "mlp_bias"):
            config.pop(key)
    return state_dict, config


# ------------------------------------------------------------------ Hugging Face model folders
#
# A folder ``AutoModelForCausalLM.from_pretrained`` loads: config.json, model.safetensors (or
# model-0000i-of-0000n.safetensors + model.safetensors.index.json, transformers' names), and
# generation_config.json; our exports add tokenizer.json + tokenizer_config.json and lumina.json
# (which tiktoken encoding the tokenizer is, so ``--init-from`` / ``generate`` pick it up again).
# Reading is safetensors only: a pickle checkpoint (pytorch_model.bin) can execute code on load.

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
RECORD_FILE, RECORD_FORMAT = "lumina.json", "lumina.export/1"
FILE_EXPERT_LAYOUT = "per_expert"  # what save_pretrained writes for Mixtral (transformers 4.x and 5.24)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a Hugging Face model folder: a config.json, and neither a Lumina
    checkpoint (meta.msgpack) nor a run folder (checkpoints/, or a config.json that is a run's)."""
    p = Path(path)
    if not (p / CONFIG_FILE).is_file() or (p / "meta.msgpack").is_file() or (p / "checkpoints").is_dir():
        return False
    try:
        data = json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # read_dir names the problem
    return not (isinstance(data, dict) and "model" in data and "train" in data)  # a run's resolved config


def _dir_error(message: str) -> Exception:
    from lumina.checkpoint import CheckpointError  # (checkpoint imports torch.distributed: lazily)

    return CheckpointError(message)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _dir_error(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise _dir_error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _weight_files(p: Path) -> list[Path]:
    if (p / WEIGHTS_FILE).is_file():
        return [p / WEIGHTS_FILE]
    if (p / INDEX_FILE).is_file():
        weight_map = _read_json(p / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _dir_error(f"{p / INDEX_FILE}: no weight_map")
        names = sorted(set(weight_map.values()))
        bad = next((n for n in names if not isinstance(n, str) or Path(n).name != n), None)
        if bad is not None:
            raise _dir_error(f"{p / INDEX_FILE}: weight_map names {bad!r}, not a file in this folder")
        missing = next((n for n in names if not (p / n).is_file()), None)
        if missing is not None:
            raise _dir_error(f"{p / missing}: missing (listed in {INDEX_FILE})")
        return [p / n for n in names]
    pickles = sorted(f.name for f in p.iterdir() if f.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise _dir_error(
            f"{p / pickles[0]}: a pickle checkpoint, which Lumina never loads (unpickling can run code); "
            "convert it to safetensors first (save_pretrained writes model.safetensors)"
        )
    raise _dir_error(f"{p}: no {WEIGHTS_FILE} or {INDEX_FILE} (not a Hugging Face model folder)")


def read_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config dict) of a Hugging Face model folder, read from safetensors only.
    Every problem is one ``CheckpointError`` line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise _dir_error(f"{p}: {'no such folder' if not p.exists() else 'not a folder'}")
    if not (p / CONFIG_FILE).is_file():
        raise _dir_error(f"{p}: no {CONFIG_FILE} (not a Hugging Face model folder)")
    config = _read_json(p / CONFIG_FILE)
    state_dict: dict[str, torch.Tensor] = {}
    for f in _weight_files(p):
        try:
            state_dict.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise _dir_error(f"{f}: not a readable safetensors file ({e})") from None
    return state_dict, config


def read_record(path: str | Path) -> dict[str, Any] | None:
    """What a Lumina export recorded about itself (lumina.json), or None for a foreign folder."""
    f = Path(path) / RECORD_FILE
    if not f.is_file():
        return None
    record = _read_json(f)
    if record.get("format") != RECORD_FORMAT:
        raise _dir_error(f"{f}: format {record.get('format')!r}, expected {RECORD_FORMAT!r}")
    return record


def model_config_of_dir(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face folder's config.json (no tensors read; a folder without
    safetensors weights, e.g. only a pickle, is refused first)."""
    f = Path(path) / CONFIG_FILE
    _weight_files(Path(path))
    try:
        return _model_config(_read_json(f))
    except ConfigError as e:
        raise _dir_error(f"{f}: {str(e).removeprefix('hf config: ')}") from None
    except KeyError as e:
        raise _dir_error(f"{f}: missing field {e}") from None


def load_dir(path: str | Path) -> tuple[ModelConfig, TensorDict]:
    """(config, fp32 params in Lumina's layout) of a Hugging Face Llama / Mixtral folder."""
    cfg = model_config_of_dir(path)
    state_dict, config = read_dir(path)
    try:
        _, params = from_hf(state_dict, config)
    except ConfigError as e:
        raise _dir_error(f"{Path(path)}: {str(e).removeprefix('hf ')}") from None
    return cfg, tree.cast(params, torch.float32)


def parse_size(text: str) -> int:
    """Bytes of a size as transformers writes them: an int, or 5GB / 500MB / 10KB (powers of 10),
    2GiB / 100MiB / 4KiB (powers of 2)."""
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    s = text.strip().upper()
    for unit, scale in units.items():
        if s.endswith(unit) and s[: -len(unit)].strip().isdigit():
            n = int(s[: -len(unit)]) * scale
            break
    else:
        n = int(s) if s.isdigit() else 0
    if n <= 0:
        raise ConfigError(f"--max-shard-size: {text!r} is not a size such as 5GB, 500MB or 2GiB")
    return n


def _shards(state_dict: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Keys per shard, in order; a new shard when the next tensor would pass ``limit`` bytes (a
    tensor larger than the limit gets a shard of its own), as save_pretrained splits."""
    out: list[list[str]] = [[]]
    size = 0
    for k, t in state_dict.items():
        n = t.numel() * t.element_size()
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(k)
        size += n
    return out


def write_weights(
    out: Path, state_dict: dict[str, torch.Tensor], max_shard_size: int, log: Callable[[str], None] = print
) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above
    ``max_shard_size`` bytes; returns the file names written."""
    from safetensors.torch import save_file

    groups = _shards(state_dict, max_shard_size)
    n = len(groups)
    names = [WEIGHTS_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for i, (name, keys) in enumerate(zip(names, groups, strict=True), 1):
        part = {k: state_dict[k].contiguous() for k in keys}
        mb = sum(t.numel() * t.element_size() for t in part.values()) / 2**20
        log(f"[export] writing {name} ({len(keys)} tensors, {mb:.1f} MiB){f' [{i}/{n}]' if n > 1 else ''}")
        save_file(part, str(out / name), metadata={"format": "pt"})
    if n > 1:
        index = {
            "metadata": {
                "total_size": sum(t.numel() * t.element_size() for t in state_dict.values()),
                "total_parameters": sum(t.numel() for t in state_dict.values()),
            },
            "weight_map": {k: name for name, keys in zip(names, groups, strict=True) for k in keys},
        }
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


# ------------------------------------------------------------------ an exact tokenizer.json
#
# transformers' TikTokenConverter gives the specials consecutive ids after the ranks (cl100k's
# <|endoftext|> becomes 100256, not 100257), and its regex engine (Oniguruma) reads tiktoken's
# possessive ``{1,3}+`` as "one or more times {1,3}" ("2024" -> [508, 1187] instead of [2366, 19]).
# So the specials go into the vocab (and added_tokens) at their own ids, and ``{n,m}+`` is written
# ``{n,m}`` (possessive and greedy agree there: nothing in that alternative can backtrack into it).
# tests/test_export.py checks ids equal tiktoken's on random strings for every packaged encoding.


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_pattern(pat_str: str) -> str:
    """tiktoken's split regex in the form Oniguruma (the tokenizers library) reads the same way."""
    return re.sub(r"\{(\d+),(\d+)\}\+", r"{\1,\2}", pat_str)


def tokenizer_json(encoding: Any) -> dict[str, Any]:
    """tokenizer.json (the ``tokenizers`` library's format) of a ``tiktoken.Encoding``: byte-level
    BPE with tiktoken's ranks as ids, every split of a token into two tokens as a merge ranked by the
    token (as transformers' converter derives them), ``ignore_merges`` (tiktoken takes a whole
    piece that is a token as it is), and the special tokens at their own ids."""
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    specials: dict[str, int] = encoding._special_tokens
    byte_chars = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_chars[c] for c in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = []  # (rank of the merged token, rank of left, rank of right, left, right)
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort(key=lambda m: m[:3])
    vocab.update(specials)
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s, i in sorted(specials.items(), key=lambda item: item[1])
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": hf_pattern(encoding._pat_str)},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },  # fmt: skip
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [[text(a), text(b)] for *_, a, b in merges],
        },
    }


# ChatML as lumina.data.chat renders it: <|im_start|>{role}\n{content}<|im_end|>\n per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer_config(tok: Any, max_len: int) -> dict[str, Any]:
    """tokenizer_config.json for ``tokenizer_json``: the generic fast tokenizer (no BOS / EOS added,
    no clean-up of spaces when decoding), <|endoftext|> as EOS and pad, the ChatML template."""
    eot = tok.encoding.decode([tok.eot_id])
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "bos_token": None,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
