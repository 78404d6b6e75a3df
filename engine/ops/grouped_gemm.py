"""Public grouped expert GEMM: x rows sorted by expert (moe_permute's order) times each expert's
weight. Legend: M rows, K depth, N outputs, E experts.
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
