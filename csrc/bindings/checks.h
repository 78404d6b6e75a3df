// Argument validation shared by the CPU and CUDA implementations of every llama4 op.
// Each check names the op, the argument and the expectation, and runs before any launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#include "kernels/adamw8bit_math.h"
#include "kernels/attention_mask.h"
#include "kernels/fp8_math.h"

namespace llama4 {

// Problem sizes of a routing call, after validation.
struct RouteSizes {
  int64_t tokens;   // T
  int64_t experts;  // E
  int64_t top_k;    // K
};

// Problem sizes of a permute / unpermute call, after validation.
struct RowsSizes {
  int64_t tokens;  // T
  int64_t top_k;   // K
  int64_t width;   // D
};

enum class ScoreFuncId : int { kSigmoid = 0, kSoftmax = 1 };

ScoreFuncId parse_score_func(const std::string& score_func);

// router_logits [T, E] float32/float16/bfloat16, unit stride along E; expert_bias [E] float32 on
// the same device; 1 <= top_k <= E; T * top_k <= INT32_MAX. `max_experts` < 0 means no limit.
RouteSizes check_route_args(const at::Tensor& router_logits, int64_t top_k,
                            const std::optional<at::Tensor>& expert_bias, int64_t max_experts);

// rows [R, D] float32/float16/bfloat16 with unit stride along D; sorted_slots [T*K] int32;
// slot_positions [T, K] int32; topk_weights [T, K] float32; all on rows' device.
// `rows_are_slots` is false for permute (R must be T) and true for unpermute (R must be T*K).
RowsSizes check_rows_args(const char* op, const char* rows_name, const at::Tensor& rows, const at::Tensor& sorted_slots,
                          const at::Tensor& slot_positions, const std::optional<at::Tensor>& topk_weights,
                          bool rows_are_slots);

// A validated 8-bit AdamW step (see adamw8bit_step's schema in registry.cpp).
struct AdamWArgs {
  at::Tensor param, grad, exp_avg, exp_avg_sq, absmax_exp_avg, absmax_exp_avg_sq, qmap_signed, qmap_unsigned;
  bool quantized;  // uint8 state with absmax per block; false: float32 state
  int64_t numel;
  int64_t block_size;
  kernels::adamw::StepScalars scalars;
  uint64_t seed;
  uint64_t step;
};

AdamWArgs check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const at::Tensor& absmax_exp_avg,
                           const at::Tensor& absmax_exp_avg_sq, const at::Tensor& qmap_signed,
                           const at::Tensor& qmap_unsigned, int64_t step, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int64_t block_size, int64_t seed);

// x float32/bfloat16 contiguous; qmap float32 [256] on x's device; block_size supported.
void check_quantize_args(const at::Tensor& x, const at::Tensor& qmap, int64_t block_size);
// codes uint8 [n], absmax float32 [ceil(n / block_size)], qmap float32 [256], same device.
void check_dequantize_args(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                           int64_t block_size);

// A validated FP8 quantisation (quantize_fp8, swiglu_quant): x [M, K] or, with swiglu, [M, 2K].
struct Fp8QuantSizes {
  int64_t rows;  // M
  int64_t cols;  // K, the quantised width
  kernels::QuantGranularity granularity;
  kernels::Fp8Kind kind;
};

kernels::QuantGranularity parse_granularity(const char* op, const std::string& granularity);
// Shape of the scale tensor for a granularity: [] / [M] / [M, ceil(K / 128)].
std::vector<int64_t> fp8_scale_shape(kernels::QuantGranularity g, int64_t rows, int64_t cols);
Fp8QuantSizes check_fp8_quant_args(const char* op, const at::Tensor& x, const std::string& granularity,
                                   at::ScalarType fp8_dtype, bool swiglu);
// q [M, K] float8 contiguous; scale of the granularity's shape, float32; out_dtype float32/float16/bfloat16.
Fp8QuantSizes check_fp8_dequant_args(const at::Tensor& q, const at::Tensor& scale, const std::string& granularity,
                                     at::ScalarType out_dtype);
// h [M, 2K] float32/float16/bfloat16 with unit column stride.
void check_swiglu_args(const char* op, const at::Tensor& h);

// A validated grouped GEMM: x [M, K], w [E, N, K], group_sizes int32 [E], optional FP8 scales.
struct GroupedGemmSizes {
  int64_t M, N, K, E;
  bool fp8;
  bool block_scales;  // x_scale [M, ceil(K/128)] and w_scale [E, ceil(N/128), ceil(K/128)]; else [M] and [E, N]
};

GroupedGemmSizes check_grouped_gemm_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                                         const std::optional<at::Tensor>& x_scale,
                                         const std::optional<at::Tensor>& w_scale, at::ScalarType out_dtype);

// A validated grouped weight gradient: dy [M, N], x [M, K] (same dtype: bfloat16, float8_e4m3fn, or float32 on CPU),
// group_sizes int32 [E]; float8 needs dy_scale [E, N] and x_scale [E, K] float32; out_dtype float32 or bfloat16.
struct GroupedWgradSizes {
  int64_t M, N, K, E;
  bool fp8;
};

GroupedWgradSizes check_grouped_wgrad_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& group_sizes,
                                           const std::optional<at::Tensor>& dy_scale,
                                           const std::optional<at::Tensor>& x_scale, at::ScalarType out_dtype);

// A validated per-(expert, channel) FP8 quantisation: x [M, C] float32/float16/bfloat16 contiguous, group_sizes int32
// [E] (E >= 1) on x's device, fp8_dtype float8_e4m3fn or float8_e5m2.
struct Fp8GroupedQuantSizes {
  int64_t M, C, E;
  kernels::Fp8Kind kind;
};

Fp8GroupedQuantSizes check_fp8_quant_grouped_args(const at::Tensor& x, const at::Tensor& group_sizes,
                                                  at::ScalarType fp8_dtype);

// A validated sparse-global attention call. Dense: q [B, S, H, D], k/v [B, Sk, G, D]. Varlen: B = 1,
// cu_seqlens_q / cu_seqlens_k int32 [num_seqs + 1].
struct AttentionSizes {
  int64_t batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim;
  int64_t num_seqs;  // 0 when dense
  kernels::AttentionMask mask;
};

AttentionSizes check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& cu_seqlens_q,
                                    const std::optional<at::Tensor>& cu_seqlens_k, bool causal, int64_t window,
                                    int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale);

// A validated sparse-global attention backward: check_attention_args on (q, k, v, mask), then dout / out with
// q's shape and dtype and unit stride along D, lse float32 [B, H, S] contiguous, all on q's device.
AttentionSizes check_attention_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& cu_seqlens_q,
                                        const std::optional<at::Tensor>& cu_seqlens_k, bool causal, int64_t window,
                                        int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale);

// A validated decode call: q [B, H, D]; k_cache / v_cache [B, Smax, G, D] (q's dtype, or float8_e4m3fn with
// k_scale / v_scale float32 [G]); cache_seqlens int32 [B]; key_positions int32 [B, Smax]; query_positions int32 [B].
struct DecodeSizes {
  int64_t batch, max_slots, heads, kv_heads, head_dim;
  bool fp8_cache;
  kernels::AttentionMask mask;
};

DecodeSizes check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& key_positions,
                              const std::optional<at::Tensor>& query_positions,
                              const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                              bool causal, int64_t window, int64_t chunk, int64_t global_stride, int64_t sinks,
                              double softmax_scale);

}  // namespace llama4
