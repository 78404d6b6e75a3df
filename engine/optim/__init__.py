"""Optimizers: 8-bit AdamW with blockwise-quantised state, and layer-wise learning rates."""

from engine.optim.adamw8bit import AdamW8bit

__all__ = ["AdamW8bit"]

try:  # written alongside; exported when present
    from engine.optim.layerwise import layerwise_param_groups  # noqa: F401

    __all__.append("layerwise_param_groups")
except ImportError:  # pragma: no cover
    pass
