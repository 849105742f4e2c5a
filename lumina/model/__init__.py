"""The functional model: ``init(cfg, seed, device, dtype) -> params`` and
``apply(params, tokens_BT, cfg, knobs, *, cache=None, positions=None, train=True) -> (logits, aux)``."""

from lumina.model.transformer import apply, default_knobs, init, init_cache, param_shapes

__all__ = ["apply", "default_knobs", "init", "init_cache", "param_shapes"]
