"""Lumina: functional Mixture-of-Experts / Mixture-of-Depths transformer training with an adaptive
orchestrator. Parameters are TensorDict trees; models and steps are pure functions."""

__version__ = "0.1.0"
