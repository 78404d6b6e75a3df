"""Public FP8 ops: quantisation (per tensor, row, 1x128 block), dequantisation, and the fused
SwiGLU (+ FP8 quantisation) of the experts' hidden activations.
Legend: M rows, K columns, G = ceil(K / 128), F expert hidden width (h is [M, 2F]: gate | up).
"""

from __future__ import annotations

import torch

from engine.ops._library import ops
from engine.profiling import nvtx_range

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_BLOCK = 128


def quantize_fp8(
    x_MK: torch.Tensor, *, granularity: str = "row", fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32/float16/bfloat16 -> (x_fp8 [M, K], scale float32).

    granularity "tensor" (scale []), "row" (scale [M]) or "block128" (scale [M, ceil(K/128)]).
    scale = max(amax, 1e-12) / fp8_max; x_fp8 = saturate(x / scale) rounded to nearest even
    (448 for e4m3, 57344 for e5m2): an all-zero row or block dequantises to exactly 0, never NaN,
    and values beyond the fp8 range saturate instead of becoming NaN. NaN inputs give NaN.
    """
    with nvtx_range("llama4.quantize_fp8"):
        return ops.quantize_fp8(x_MK, granularity, fp8_dtype)


def dequantize_fp8(
    x_fp8_MK: torch.Tensor, scale: torch.Tensor, *, granularity: str = "row", out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """x_fp8 [M, K] * scale (broadcast per granularity) in float32, returned as out_dtype [M, K]."""
    with nvtx_range("llama4.dequantize_fp8"):
        return ops.dequantize_fp8(x_fp8_MK, scale, granularity, out_dtype)


def swiglu_quant(
    h_M2F: torch.Tensor, *, granularity: str = "row", fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(h[:, :F]) * h[:, F:] fused with FP8 quantisation in one pass -> (a_fp8 [M, F], scale)."""
    with nvtx_range("llama4.swiglu_quant"):
        return ops.swiglu_quant(h_M2F, granularity, fp8_dtype)


def swiglu(h_M2F: torch.Tensor) -> torch.Tensor:
    """silu(h[:, :F]) * h[:, F:] computed in float32, returned in h's dtype [M, F]. Differentiable."""
    with nvtx_range("llama4.swiglu"):
        return ops.swiglu(h_M2F)


def _fp8_scale_shape(granularity: str, M, K):
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return (M,)
    return (M, (K + FP8_BLOCK - 1) // FP8_BLOCK)


@torch.library.register_fake("llama4::quantize_fp8")
def _quantize_fp8_fake(x, granularity, fp8_dtype):
    torch._check(x.dim() == 2, lambda: f"quantize_fp8: x must be 2-D [M, K], got {x.dim()}-D")
    M, K = x.shape
    return x.new_empty((M, K), dtype=fp8_dtype), x.new_empty(_fp8_scale_shape(granularity, M, K), dtype=torch.float32)


@torch.library.register_fake("llama4::swiglu_quant")
def _swiglu_quant_fake(h, granularity, fp8_dtype):
    torch._check(h.dim() == 2, lambda: f"swiglu_quant: h must be 2-D [M, 2F], got {h.dim()}-D")
    M, F = h.shape[0], h.shape[1] // 2
    return h.new_empty((M, F), dtype=fp8_dtype), h.new_empty(_fp8_scale_shape(granularity, M, F), dtype=torch.float32)


@torch.library.register_fake("llama4::dequantize_fp8")
def _dequantize_fp8_fake(x_fp8, scale, granularity, out_dtype):
    return x_fp8.new_empty(x_fp8.shape, dtype=out_dtype)


@torch.library.register_fake("llama4::swiglu")
def _swiglu_fake(h):
    torch._check(h.dim() == 2, lambda: f"swiglu: h must be 2-D [M, 2F], got {h.dim()}-D")
    return h.new_empty((h.shape[0], h.shape[1] // 2))


def _swiglu_setup(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)


def _swiglu_backward(ctx, g_MF):
    """d gate = g * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))); d up = g * silu(gate)."""
    (h,) = ctx.saved_tensors
    gate, up = h.float().chunk(2, dim=1)
    sig = torch.sigmoid(gate)
    g = g_MF.float()
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = g * gate * sig
    return torch.cat([d_gate, d_up], dim=1).to(h.dtype)


torch.library.register_autograd("llama4::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
