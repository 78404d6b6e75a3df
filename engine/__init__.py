"""Kernel-level performance engine for Llama-4-class Mixture-of-Experts models.

`engine.ops` holds the ops (torch.ops.llama4.*); `engine.build_info()` says what was compiled.
"""

__version__ = "0.1.0"


def build_info() -> dict:
    """Which kernels were built, for which CUDA arch, with which torch / CUDA / CUTLASS versions."""
    from engine.ops import build_info as _build_info

    return _build_info()


__all__ = ["__version__", "build_info"]
