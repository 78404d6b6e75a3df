// CPU implementations of the llama4 ops (real C++, at::parallel_for), registered for the CPU
// dispatch key in bindings/registry.cpp. Arguments are validated by the caller.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "bindings/checks.h"

namespace llama4::cpu {

// Returns (topk_weights [T,K] f32, topk_ids [T,K] i32, tokens_per_expert [E] i32,
//          expert_offsets [E+1] i32, sorted_slots [T*K] i32, slot_positions [T,K] i32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(
    const at::Tensor& router_logits, const RouteSizes& sizes, ScoreFuncId score_func,
    const std::optional<at::Tensor>& expert_bias, bool renormalize);

// out [T*K, D] = x[sorted_slots / K] (* topk_weights.flatten()[sorted_slots]).
at::Tensor moe_permute(const at::Tensor& x, const at::Tensor& sorted_slots,
                       const std::optional<at::Tensor>& topk_weights, const RowsSizes& sizes);

// out [T, D] = sum_k (topk_weights[t, k] *) y[slot_positions[t, k]], float32 accumulation.
at::Tensor moe_unpermute(const at::Tensor& y, const at::Tensor& slot_positions,
                         const std::optional<at::Tensor>& topk_weights, const RowsSizes& sizes);

// One 8-bit (or float32-state) AdamW step in place.
void adamw8bit_step(const AdamWArgs& args);

// x [n] -> (codes uint8 [n], absmax float32 [B]); codes -> float32 [n].
std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& qmap, int64_t block_size);
at::Tensor dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                int64_t block_size);

// FP8 quantisation of x [M, K] (or of silu(gate) * up for a [M, 2K] input when swiglu):
// (x_fp8 [M, K], scale float32 of fp8_scale_shape(granularity)).
std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const Fp8QuantSizes& sizes, bool swiglu);
at::Tensor dequantize_fp8(const at::Tensor& q, const at::Tensor& scale, const Fp8QuantSizes& sizes,
                          at::ScalarType out_dtype);
// silu(h[:, :K]) * h[:, K:] in float32, returned in h's dtype [M, K].
at::Tensor swiglu(const at::Tensor& h);

// out [M, N] = x[rows of group e] @ w[e]^T on dequantised inputs (float32 accumulation); rows past
// sum(group_sizes) are left unwritten.
at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                        const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                        const GroupedGemmSizes& sizes, at::ScalarType out_dtype);

// dw [E, N, K] = dy[rows of e]^T @ x[rows of e] in float32 (FP8: times dy_scale[e, n] * x_scale[e, k]), one expert
// per at::parallel_for task; an expert with no rows gets exactly 0; rows past sum(group_sizes) are never read.
at::Tensor grouped_gemm_wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& group_sizes,
                              const std::optional<at::Tensor>& dy_scale, const std::optional<at::Tensor>& x_scale,
                              const GroupedWgradSizes& sizes, at::ScalarType out_dtype);

// (x_fp8 [M, C], scale float32 [E, C]): one scale per expert and channel over that expert's rows (fp8_math.h's
// maths, the CUDA kernel's bits); rows past sum(group_sizes) become 0.
std::tuple<at::Tensor, at::Tensor> quantize_fp8_grouped(const at::Tensor& x, const at::Tensor& group_sizes,
                                                        const Fp8GroupedQuantSizes& sizes, at::ScalarType fp8_dtype);

// Sparse-global attention forward: (out [B, S, H, D] in q's dtype, lse [B, H, S] float32). Each query
// visits only its visible keys (window / chunk ranges, strided global keys, sinks): O(S x visible).
std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& cu_seqlens_q,
                                                        const std::optional<at::Tensor>& cu_seqlens_k,
                                                        const AttentionSizes& sizes, double softmax_scale);

// Sparse-global attention backward: (dq [B, S, H, D] in q's dtype, dk / dv [B, Sk, G, D] in k's dtype, summed over
// the query heads of each kv head) from dout, the forward's out and lse. Walks the forward's visible pairs twice
// (dq per query, dk / dv per key): O(S x visible), no atomics, bitwise deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const std::optional<at::Tensor>& cu_seqlens_q,
                                                                    const std::optional<at::Tensor>& cu_seqlens_k,
                                                                    const AttentionSizes& sizes, double softmax_scale);

// Decode: one query per sequence against a KV cache -> (out [B, H, D] in q's dtype, lse [B, H] float32).
std::tuple<at::Tensor, at::Tensor> sparse_attention_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                           const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                           const std::optional<at::Tensor>& key_positions,
                                                           const std::optional<at::Tensor>& query_positions,
                                                           const std::optional<at::Tensor>& k_scale,
                                                           const std::optional<at::Tensor>& v_scale,
                                                           const DecodeSizes& sizes, double softmax_scale);

}  // namespace llama4::cpu
