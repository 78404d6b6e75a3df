"""Public grouped expert GEMM: x rows sorted by expert (moe_permute's order) times each expert's
weight, and its weight gradient (dw[e] = dy_e^T x_e). Legend: M rows, K depth, N outputs, E experts,
C channels of a quantised operand.
"""

from __future__ import annotations

import torch

from engine.ops._library import ops
from engine.profiling import nvtx_range


def grouped_gemm(
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    group_sizes_E: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out_MN[rows of e] = x_MK[rows of e] @ w_ENK[e]^T, accumulated in float32.

    x_MK: [M, K] bfloat16 or float8_e4m3fn (float32 too on CPU), rows sorted by expert: group e owns rows
    [offset_e, offset_e + group_sizes_E[e]) with offset the exclusive prefix sum.
    w_ENK: [E, N, K] (nn.Linear layout per expert, K contiguous), x's dtype.
    group_sizes_E: int32 [E] on x's device (stays there: no host synchronisation on CUDA); zero
    allowed. Rows of out past sum(group_sizes) are neither read into the result nor written.
    FP8 scales (float32): x_scale [M] per row with w_scale [E, N] per expert and channel, or
    x_scale [M, ceil(K/128)] per 1x128 block with w_scale [E, ceil(N/128), ceil(K/128)].
    On CUDA, K and N must be multiples of 16 (FP8) or 8 (BF16): the TMA's 16-byte rows.
    out_dtype: bfloat16 by default (float32 for float32 inputs; float32 is also allowed on CPU).
    """
    with nvtx_range("llama4.grouped_gemm"):
        return ops.grouped_gemm(x_MK, w_ENK, group_sizes_E, x_scale, w_scale, out_dtype)


@torch.library.register_fake("llama4::grouped_gemm")
def _grouped_gemm_fake(x, w, group_sizes, x_scale=None, w_scale=None, out_dtype=None):
    torch._check(x.dim() == 2 and w.dim() == 3, lambda: "grouped_gemm: x must be [M, K] and w [E, N, K]")
    default = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    return x.new_empty((x.shape[0], w.shape[1]), dtype=out_dtype or default)


def grouped_gemm_wgrad(
    dy_MN: torch.Tensor,
    x_MK: torch.Tensor,
    group_sizes_E: torch.Tensor,
    *,
    dy_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dw_ENK[e] = dy_MN[rows of e]^T @ x_MK[rows of e], accumulated in float32: the weight gradient of
    grouped_gemm (a K-grouped GEMM: each expert's rows are its reduction).

    dy_MN: [M, N] bfloat16 or float8_e4m3fn (float32 too on CPU), rows sorted by expert as in grouped_gemm.
    x_MK: [M, K] with dy's dtype, the same rows (the forward's input).
    group_sizes_E: int32 [E] on dy's device (no host synchronisation on CUDA); rows past sum(group_sizes)
    are never read. An expert with no rows gets exactly zero. Deterministic (no atomics, no split-K).
    FP8: dy_scale [E, N] and x_scale [E, K] float32, one scale per expert and channel over that expert's
    rows (quantize_fp8_grouped makes them): dw[e, n, k] = dy_scale[e, n] * x_scale[e, k] * sum_m dy[m, n] x[m, k].
    On CUDA, N and K must be multiples of 8 (BF16) or 16 (FP8).
    out_dtype: float32 (default, the master-gradient dtype) or bfloat16. Returns dw_ENK [E, N, K].
    """
    with nvtx_range("llama4.grouped_gemm_wgrad"):
        return ops.grouped_gemm_wgrad(dy_MN, x_MK, group_sizes_E, dy_scale, x_scale, out_dtype)


def quantize_fp8_grouped(
    x_MC: torch.Tensor, group_sizes_E: torch.Tensor, *, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (expert, channel) FP8 quantisation over each expert's rows, the scaling grouped_gemm_wgrad takes.

    x_MC: [M, C] float32/float16/bfloat16 contiguous, rows sorted by expert; group_sizes_E: int32 [E] on x's device.
    Returns (x_fp8 [M, C], scale float32 [E, C]) with scale[e, c] = max(amax over e's rows of |x[:, c]|, 1e-12)
    / fp8_max and x_fp8 = saturate(x / scale[e(m)]) rounded to nearest even (reference.quantize_fp8's maths);
    rows past sum(group_sizes) become 0. Deterministic (the amax is an exact max); on CUDA two reads of x and one
    write of the codes, no host synchronisation. fp8_dtype: float8_e4m3fn (what grouped_gemm_wgrad takes) or
    float8_e5m2.
    """
    with nvtx_range("llama4.quantize_fp8_grouped"):
        return ops.quantize_fp8_grouped(x_MC, group_sizes_E, fp8_dtype)


@torch.library.register_fake("llama4::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(dy, x, group_sizes, dy_scale=None, x_scale=None, out_dtype=None):
    torch._check(dy.dim() == 2 and x.dim() == 2, lambda: "grouped_gemm_wgrad: dy must be [M, N] and x [M, K]")
    return dy.new_empty((group_sizes.shape[0], dy.shape[1], x.shape[1]), dtype=out_dtype or torch.float32)


@torch.library.register_fake("llama4::quantize_fp8_grouped")
def _quantize_fp8_grouped_fake(x, group_sizes, fp8_dtype):
    torch._check(x.dim() == 2, lambda: "quantize_fp8_grouped: x must be [M, C]")
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((group_sizes.shape[0], x.shape[1]), dtype=torch.float32)
