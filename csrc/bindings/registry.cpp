// The one registry of llama4 ops: every schema lives here (TORCH_LIBRARY), with the CPU kernels.
// CUDA kernels register in cuda_impl.cpp; fake kernels and autograd in engine/ops/_library.py.
#include <torch/library.h>

#include "bindings/checks.h"
#include "cpu/cpu_ops.h"

namespace llama4 {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& router_logits, int64_t top_k, c10::string_view score_func,
    const std::optional<at::Tensor>& expert_bias, bool renormalize) {
  const ScoreFuncId func = parse_score_func(std::string(score_func));
  const RouteSizes sizes = check_route_args(router_logits, top_k, expert_bias, /*max_experts=*/-1);
  return cpu::moe_route(router_logits, sizes, func, expert_bias, renormalize);
}

at::Tensor moe_permute_cpu(const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                           const std::optional<at::Tensor>& topk_weights) {
  const RowsSizes sizes =
      check_rows_args("moe_permute", "x", x, sorted_slots, slot_positions, topk_weights, /*rows_are_slots=*/false);
  return cpu::moe_permute(x, sorted_slots, topk_weights, sizes);
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                             const std::optional<at::Tensor>& topk_weights) {
  const RowsSizes sizes =
      check_rows_args("moe_unpermute", "y", y, sorted_slots, slot_positions, topk_weights, /*rows_are_slots=*/true);
  return cpu::moe_unpermute(y, slot_positions, topk_weights, sizes);
}

void adamw8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& absmax_exp_avg,
                        const at::Tensor& absmax_exp_avg_sq, const at::Tensor& qmap_signed,
                        const at::Tensor& qmap_unsigned, int64_t step, double lr, double beta1, double beta2,
                        double eps, double weight_decay, int64_t block_size, int64_t seed) {
  cpu::adamw8bit_step(check_adamw_args(param, grad, exp_avg, exp_avg_sq, absmax_exp_avg, absmax_exp_avg_sq, qmap_signed,
                                       qmap_unsigned, step, lr, beta1, beta2, eps, weight_decay, block_size, seed));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& qmap,
                                                          int64_t block_size) {
  check_quantize_args(x, qmap, block_size);
  return cpu::quantize_blockwise(x, qmap, block_size);
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                    int64_t block_size) {
  check_dequantize_args(codes, absmax, qmap, block_size);
  return cpu::dequantize_blockwise(codes, absmax, qmap, block_size);
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu(const at::Tensor& x, c10::string_view granularity,
                                                    at::ScalarType fp8_dtype) {
  const Fp8QuantSizes sz = check_fp8_quant_args("quantize_fp8", x, std::string(granularity), fp8_dtype, false);
  return cpu::quantize_fp8(x, sz, /*swiglu=*/false);
}

std::tuple<at::Tensor, at::Tensor> swiglu_quant_cpu(const at::Tensor& h, c10::string_view granularity,
                                                    at::ScalarType fp8_dtype) {
  const Fp8QuantSizes sz = check_fp8_quant_args("swiglu_quant", h, std::string(granularity), fp8_dtype, true);
  return cpu::quantize_fp8(h, sz, /*swiglu=*/true);
}

at::Tensor dequantize_fp8_cpu(const at::Tensor& x_fp8, const at::Tensor& scale, c10::string_view granularity,
                              at::ScalarType out_dtype) {
  const Fp8QuantSizes sz = check_fp8_dequant_args(x_fp8, scale, std::string(granularity), out_dtype);
  return cpu::dequantize_fp8(x_fp8, scale, sz, out_dtype);
}

at::Tensor swiglu_cpu(const at::Tensor& h) {
  check_swiglu_args("swiglu", h);
  return cpu::swiglu(h);
}

at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                            const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                            std::optional<at::ScalarType> out_dtype) {
  // float32 inputs (CPU only: the reference-precision path) default to a float32 result.
  const at::ScalarType dtype = out_dtype.value_or(x.scalar_type() == at::kFloat ? at::kFloat : at::kBFloat16);
  const GroupedGemmSizes sz = check_grouped_gemm_args(x, w, group_sizes, x_scale, w_scale, dtype);
  return cpu::grouped_gemm(x, w, group_sizes, x_scale, w_scale, sz, dtype);
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& group_sizes,
                                  const std::optional<at::Tensor>& dy_scale, const std::optional<at::Tensor>& x_scale,
                                  std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  const GroupedWgradSizes sz = check_grouped_wgrad_args(dy, x, group_sizes, dy_scale, x_scale, dtype);
  return cpu::grouped_gemm_wgrad(dy, x, group_sizes, dy_scale, x_scale, sz, dtype);
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_grouped_cpu(const at::Tensor& x, const at::Tensor& group_sizes,
                                                            at::ScalarType fp8_dtype) {
  const Fp8GroupedQuantSizes sz = check_fp8_quant_grouped_args(x, group_sizes, fp8_dtype);
  return cpu::quantize_fp8_grouped(x, group_sizes, sz, fp8_dtype);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& cu_seqlens_q,
                                                            const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
                                                            int64_t window, int64_t chunk, int64_t global_stride,
                                                            int64_t sinks, double softmax_scale) {
  const AttentionSizes sz = check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, chunk,
                                                 global_stride, sinks, softmax_scale);
  return cpu::sparse_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, sz, softmax_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    bool causal, int64_t window, int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale,
    bool /*deterministic: the CPU kernel always is*/) {
  const AttentionSizes sz = check_attention_bwd_args(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                                     window, chunk, global_stride, sinks, softmax_scale);
  return cpu::sparse_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sz, softmax_scale);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_decode_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& key_positions, const std::optional<at::Tensor>& query_positions,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale, bool causal, int64_t window,
    int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale) {
  const DecodeSizes sz = check_decode_args(q, k_cache, v_cache, cache_seqlens, key_positions, query_positions, k_scale,
                                           v_scale, causal, window, chunk, global_stride, sinks, softmax_scale);
  return cpu::sparse_attention_decode(q, k_cache, v_cache, cache_seqlens, key_positions, query_positions, k_scale,
                                      v_scale, sz, softmax_scale);
}

}  // namespace

TORCH_LIBRARY(llama4, m) {
  // Fused MoE router. Returns (topk_weights f32 [T,K], topk_ids i32 [T,K], tokens_per_expert i32 [E],
  // expert_offsets i32 [E+1], sorted_slots i32 [T*K], slot_positions i32 [T,K]).
  m.def(
      "moe_route(Tensor router_logits, int top_k, str score_func=\"sigmoid\", Tensor? expert_bias=None, "
      "bool renormalize=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Dispatch: out [T*K, D] = x[sorted_slots // K] (* topk_weights). slot_positions gives K (and the backward).
  m.def("moe_permute(Tensor x, Tensor sorted_slots, Tensor slot_positions, Tensor? topk_weights=None) -> Tensor");
  // Combine: out [T, D] = sum_k (topk_weights[t,k] *) y[slot_positions[t,k]], in k order.
  m.def("moe_unpermute(Tensor y, Tensor sorted_slots, Tensor slot_positions, Tensor? topk_weights=None) -> Tensor");
  // Fused AdamW step with 8-bit blockwise-quantised state (uint8 exp_avg/exp_avg_sq + float32 absmax per
  // block) or float32 state (absmax tensors empty). Updates param and the state in place.
  m.def(
      "adamw8bit_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) absmax_exp_avg, Tensor(e!) absmax_exp_avg_sq, Tensor qmap_signed, Tensor qmap_unsigned, "
      "int step, float lr, float beta1, float beta2, float eps, float weight_decay, int block_size, int seed) -> ()");
  // Blockwise dynamic quantisation: x [n] -> (codes uint8 [n], absmax float32 [ceil(n / block_size)]).
  m.def("quantize_blockwise(Tensor x, Tensor qmap, int block_size) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor qmap, int block_size) -> Tensor");
  // FP8 quantisation of x [M, K]: scale = max(amax, 1e-12) / fp8_max per tensor ([]), row ([M]) or 1x128 block
  // ([M, ceil(K/128)]); x_fp8 = saturate(x / scale) rounded to nearest even.
  m.def("quantize_fp8(Tensor x, str granularity, ScalarType fp8_dtype) -> (Tensor, Tensor)");
  m.def("dequantize_fp8(Tensor x_fp8, Tensor scale, str granularity, ScalarType out_dtype) -> Tensor");
  // silu(h[:, :F]) * h[:, F:] of h [M, 2F] fused with FP8 quantisation (one pass), and the plain variant.
  m.def("swiglu_quant(Tensor h, str granularity, ScalarType fp8_dtype) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor h) -> Tensor");
  // Grouped expert GEMM: rows of x [M, K] sorted by expert, group e owns rows [offset_e, offset_e + group_sizes[e]);
  // out [M, N] = x_e @ w[e]^T (w [E, N, K]); FP8 scales per row/channel or per 1x128 / 128x128 block. Rows past
  // sum(group_sizes) are neither read into the result nor written. out_dtype None means bfloat16.
  m.def(
      "grouped_gemm(Tensor x, Tensor w, Tensor group_sizes, Tensor? x_scale=None, Tensor? w_scale=None, "
      "ScalarType? out_dtype=None) -> Tensor");
  // Its weight gradient, a K-grouped GEMM (the group dimension is the reduction): dy [M, N] and x [M, K] with rows
  // sorted by expert as in grouped_gemm; dw [E, N, K] with dw[e] = dy_e^T @ x_e in fp32 accumulation, exactly 0 for
  // an expert with no rows; rows past sum(group_sizes) are never read. float8_e4m3fn inputs take scales per expert
  // and channel over that expert's rows, dy_scale [E, N] and x_scale [E, K] (they factor out of the row sum, so they
  // are applied in the epilogue). out_dtype None means float32 (the master-gradient dtype); bfloat16 allowed.
  m.def(
      "grouped_gemm_wgrad(Tensor dy, Tensor x, Tensor group_sizes, Tensor? dy_scale=None, Tensor? x_scale=None, "
      "ScalarType? out_dtype=None) -> Tensor");
  // The scaling grouped_gemm_wgrad's FP8 operands take: x [M, C] (rows sorted by expert) -> (x_fp8 [M, C],
  // scale f32 [E, C]) with scale[e, c] = max(amax over expert e's rows of |x[:, c]|, 1e-12) / fp8_max and
  // x_fp8 = saturate(x / scale[e(m), c]) rounded to nearest even; rows past sum(group_sizes) become 0.
  m.def("quantize_fp8_grouped(Tensor x, Tensor group_sizes, ScalarType fp8_dtype) -> (Tensor, Tensor)");
  // Sparse-global attention forward: q [B, S, H, D], k/v [B, Sk, G, D] -> (out [B, S, H, D], lse [B, H, S] f32).
  // Key j visible to query i (bottom-right aligned positions): j <= i if causal, and, when any pattern is > 0,
  // i - j < window or j // chunk == i // chunk or j % global_stride == 0 or j < sinks. 0 disables a pattern.
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, bool causal, "
      "int window, int chunk, int global_stride, int sinks, float softmax_scale) -> (Tensor, Tensor)");
  // Backward of sparse_attention_fwd: (dq [B, S, H, D] in q's dtype, dk / dv [B, Sk, G, D] in k's dtype, summed
  // over the H / G query heads that share a kv head). Visits exactly the tiles the forward visits; out / lse are the
  // forward's outputs. deterministic: bitwise-repeatable (no float atomics). Rows with lse = -inf get zero gradient.
  m.def(
      "sparse_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, bool causal, int window, int chunk, int global_stride, int sinks, float softmax_scale, "
      "bool deterministic) -> (Tensor, Tensor, Tensor)");
  // Decode: q [B, H, D] (one new token per sequence) against k_cache / v_cache [B, Smax, G, D] (q's dtype, or
  // float8_e4m3fn with per-head k_scale / v_scale [G]). Slots [0, cache_seqlens[b]) are valid; slot j holds key
  // position key_positions[b, j] (default j; negative: empty) and the query sits at query_positions[b] (default
  // cache_seqlens[b] - 1). Same mask rule as sparse_attention_fwd. Returns (out [B, H, D], lse [B, H] f32).
  m.def(
      "sparse_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? key_positions, "
      "Tensor? query_positions, Tensor? k_scale, Tensor? v_scale, bool causal, int window, int chunk, "
      "int global_stride, int sinks, float softmax_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llama4, CPU, m) {
  m.impl("adamw8bit_step", &adamw8bit_step_cpu);
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("quantize_fp8", &quantize_fp8_cpu);
  m.impl("dequantize_fp8", &dequantize_fp8_cpu);
  m.impl("swiglu_quant", &swiglu_quant_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
  m.impl("quantize_fp8_grouped", &quantize_fp8_grouped_cpu);
  m.impl("sparse_attention_fwd", &sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd_cpu);
  m.impl("sparse_attention_decode", &sparse_attention_decode_cpu);
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
}

}  // namespace llama4
