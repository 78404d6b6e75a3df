"""Optimizers: 8-bit AdamW with blockwise-quantised state, and layer-wise learning rates."""

from engine.optim.adamw8bit import AdamW8bit
from engine.optim.layerwise import layerwise_param_groups

__all__ = ["AdamW8bit", "layerwise_param_groups"]
