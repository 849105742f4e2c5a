"""Grouped-query causal attention with three interchangeable backends.

Legend: B batch, T query positions, S key positions, H query heads, G kv heads, C head dim.

- ``sdpa`` (default): torch's scaled_dot_product_attention (flash / mem-efficient / math kernels).
- ``flash``: the flash-attn package; used only when it is importable, the tensors are on CUDA in
  fp16/bf16 and there is no KV cache — otherwise it falls back to ``sdpa`` and says so once.
- ``reference``: plain fp32 math, the ground truth for tests.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

from lumina.model.layers import at_least_fp32

__all__ = ["BACKENDS", "attention", "flash_available"]

BACKENDS = ("sdpa", "flash", "reference")
log = logging.getLogger(__name__)


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def flash_available() -> bool:
    return torch.cuda.is_available() and _flash_attn_func() is not None


@functools.cache
def _warn_once(msg: str) -> None:
    log.warning(msg)


def _reference(q_BHTC, k_BGSC, v_BGSC, mask_TS) -> torch.Tensor:
    H, G = q_BHTC.shape[1], k_BGSC.shape[1]
    k = at_least_fp32(k_BGSC).repeat_interleave(H // G, dim=1)
    v = at_least_fp32(v_BGSC).repeat_interleave(H // G, dim=1)
    scores_BHTS = (at_least_fp32(q_BHTC) @ k.transpose(-1, -2)) / math.sqrt(q_BHTC.shape[-1])
    scores_BHTS = scores_BHTS.masked_fill(~mask_TS, float("-inf"))
    return (scores_BHTS.softmax(dim=-1) @ v).to(q_BHTC.dtype)


def attention(
    q_BHTC: torch.Tensor,
    k_BGSC: torch.Tensor,
    v_BGSC: torch.Tensor,
    *,
    backend: str = "sdpa",
    q_positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of T queries over S keys.

    Without ``q_positions`` queries and keys are the same positions (T == S, plain causal mask).
    With ``q_positions`` ([T] or [B, T] absolute positions; keys are positions 0..S-1 of a KV cache),
    a key is visible when its position is <= the query's: slots beyond what was written are masked.
    An explicit boolean ``mask`` (broadcastable to [B, H, T, S], True = visible) overrides both.
    """
    B, H, T, C = q_BHTC.shape
    G, S = k_BGSC.shape[1], k_BGSC.shape[2]
    if mask is not None:
        pass
    elif q_positions is None:
        mask = None  # plain causal, T == S
    else:
        key_pos_S = torch.arange(S, device=q_BHTC.device)
        mask = key_pos_S <= q_positions[..., None]  # [T, S] or [B, T, S]
        if mask.dim() == 3:
            mask = mask[:, None]  # [B, 1, T, S]

    if backend == "flash":
        flash = _flash_attn_func() if q_BHTC.is_cuda else None
        if flash is not None and mask is None and q_BHTC.dtype in (torch.float16, torch.bfloat16):
            out_BTHC = flash(
                q_BHTC.transpose(1, 2), k_BGSC.transpose(1, 2), v_BGSC.transpose(1, 2), causal=True
            )
            return out_BTHC.transpose(1, 2)
        _warn_once("attn_backend='flash' needs flash-attn, CUDA, fp16/bf16 and no KV cache; using sdpa here")
        backend = "sdpa"
    if backend == "sdpa":
        # torch's CPU attention kernels are slower in bf16 than in fp32 (B8 H4/2 T128 C64, forward +
        # backward: 7.5 ms bf16, 3.4 ms with this fp32 round trip, on the CI machine type): the softmax
        # and the rescaling convert per block. So on the CPU: cast up, attend in fp32, cast back.
        up = q_BHTC.device.type == "cpu" and q_BHTC.dtype in (torch.bfloat16, torch.float16)
        q, k, v = (t.float() for t in (q_BHTC, k_BGSC, v_BGSC)) if up else (q_BHTC, k_BGSC, v_BGSC)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != G
        )
        return out.to(q_BHTC.dtype)
    if backend == "reference":
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTC.device).tril()
        return _reference(q_BHTC, k_BGSC, v_BGSC, mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
