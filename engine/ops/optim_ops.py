"""Public ops of the 8-bit optimizer: blockwise dynamic quantisation and the fused AdamW step.
Legend: n elements, B = ceil(n / block_size) blocks.
"""

from __future__ import annotations

import functools

import torch

from engine.ops import reference
from engine.ops._library import ops
from engine.profiling import nvtx_range

DEFAULT_BLOCK_SIZE = 256


@functools.cache
def _qmap_cached(signed: bool, device: str) -> torch.Tensor:
    return reference.dynamic_qmap(signed).to(device)


def dynamic_qmap(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry dynamic quantisation map (float32, sorted; see reference.dynamic_qmap), cached per device."""
    return _qmap_cached(signed, str(torch.device(device)))


def quantize_blockwise(
    x: torch.Tensor, *, signed: bool = True, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (float32/bfloat16, any shape, contiguous) -> (codes uint8 [n], absmax float32 [B]).

    absmax[b] = max |x| over block b; codes index the dynamic map entry nearest to x / absmax
    (ties to the lower entry). An all-zero block gets absmax 0 (it dequantises to exact zeros).
    """
    with nvtx_range("llama4.quantize_blockwise"):
        return ops.quantize_blockwise(x.reshape(-1), dynamic_qmap(signed, x.device), block_size)


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool = True, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """codes uint8 [n], absmax float32 [B] -> float32 [n] = qmap[code] * absmax[block]."""
    with nvtx_range("llama4.dequantize_blockwise"):
        return ops.dequantize_blockwise(codes, absmax, dynamic_qmap(signed, codes.device), block_size)


@torch.library.register_fake("llama4::quantize_blockwise")
def _quantize_fake(x, qmap, block_size):
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty(((n + block_size - 1) // block_size,), dtype=torch.float32)


@torch.library.register_fake("llama4::dequantize_blockwise")
def _dequantize_fake(codes, absmax, qmap, block_size):
    return codes.new_empty((codes.numel(),), dtype=torch.float32)


@torch.library.register_fake("llama4::adamw8bit_step")
def _adamw_fake(param, grad, exp_avg, exp_avg_sq, absmax_exp_avg, absmax_exp_avg_sq, *args):
    return None
