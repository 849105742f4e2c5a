"""Plain tensor functions the blocks are built from. No state, no modules.

Legend: B batch, T positions, D d_model, H query heads, C head dim, F FFN hidden size.
Weights are stored [in, out] so a projection is ``x @ w`` (experts stack on a leading E axis).
``fp8=True`` (train.precision=fp8) sends a projection through ``lumina.fp8.fp8_linear``. A weight
may also be a quantized / LoRA-adapted sub-tree (``lumina.quant``): ``linear`` computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from lumina.fp8 import fp8_linear
from lumina.quant import adapted_mm

__all__ = ["apply_rope", "at_least_fp32", "linear", "rms_norm", "rope_cos_sin", "swiglu"]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 for routing math; never downcast fp64 (gradchecks run in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear(x: torch.Tensor, w: torch.Tensor | TensorDict, fp8: bool = False) -> torch.Tensor:
    mm = fp8_linear if fp8 else torch.matmul
    return adapted_mm(x, w, mm) if isinstance(w, TensorDict) else mm(x, w)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the gain, as Llama does: bf16 sums of squares lose digits.
    xf = at_least_fp32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * w


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., T, C] (fp32) for absolute ``positions`` [T] or [B, T].

    Computed from the positions themselves (not sliced from a table), so a chunk decoded with a KV
    cache at offset p gets exactly the rotation it would get inside the full sequence."""
    inv_freq_c = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq_c  # [..., T, C/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout (HF Llama), not interleaved pairs
    return emb.cos(), emb.sin()


def apply_rope(x_BHTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key heads. cos/sin are [T, C] or [B, T, C]; the head axis is broadcast."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = at_least_fp32(x_BHTC)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x_BHTC.dtype)


def swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, fp8: bool = False
) -> torch.Tensor:
    return linear(F.silu(linear(x, w_gate, fp8)) * linear(x, w_up, fp8), w_down, fp8)
