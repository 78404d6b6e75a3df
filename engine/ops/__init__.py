"""The public ops of the engine. Each is a real torch op (`torch.ops.llama4.<name>`) with a C++
schema, CPU and CUDA kernels, a fake kernel for torch.compile and an autograd formula.
`engine.ops.reference` holds the pure-torch oracle of each.
"""

from engine.ops import reference
from engine.ops._library import build_info
from engine.ops.attention import AttentionPattern, sparse_attention, sparse_attention_bwd, sparse_attention_decode
from engine.ops.fp8 import dequantize_fp8, quantize_fp8, swiglu, swiglu_quant
from engine.ops.grouped_gemm import grouped_gemm, grouped_gemm_wgrad, quantize_fp8_grouped
from engine.ops.loss import chunked_cross_entropy
from engine.ops.norm import rms_norm, rope_qk_norm
from engine.ops.optim_ops import dequantize_blockwise, dynamic_qmap, quantize_blockwise
from engine.ops.reference import RouteResult
from engine.ops.routing import moe_permute, moe_route, moe_unpermute

__all__ = [
    "AttentionPattern",
    "RouteResult",
    "build_info",
    "chunked_cross_entropy",
    "dequantize_blockwise",
    "dequantize_fp8",
    "dynamic_qmap",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "quantize_blockwise",
    "quantize_fp8",
    "quantize_fp8_grouped",
    "reference",
    "rms_norm",
    "rope_qk_norm",
    "sparse_attention",
    "sparse_attention_bwd",
    "sparse_attention_decode",
    "swiglu",
    "swiglu_quant",
]
