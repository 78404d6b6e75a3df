"""Kernel-level performance engine for Llama-4-class Mixture-of-Experts models.

`engine.ops` holds the ops (torch.ops.llama4.*); `engine.build_info()` says what was compiled.
`engine.from_pretrained(path)` / `engine.save_pretrained(model, path)`: Hugging Face Llama 4 checkpoints.
"""

__version__ = "0.1.0"


def build_info() -> dict:
    """Which kernels were built, for which CUDA arch, with which torch / CUDA / CUTLASS versions."""
    from engine.ops import build_info as _build_info

    return _build_info()


def from_pretrained(path, **kwargs):
    """engine.checkpoint.from_pretrained: a Hugging Face Llama 4 checkpoint folder -> Llama4ForCausalLM."""
    from engine.checkpoint import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)


def save_pretrained(model, path, **kwargs) -> None:
    """engine.checkpoint.save_pretrained: Llama4ForCausalLM -> a Hugging Face checkpoint folder."""
    from engine.checkpoint import save_pretrained as _save_pretrained

    _save_pretrained(model, path, **kwargs)


__all__ = ["__version__", "build_info", "from_pretrained", "save_pretrained"]
