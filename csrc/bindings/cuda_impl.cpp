// CUDA implementations of the llama4 ops: validate (bindings/checks.h), allocate outputs with the
// caching allocator, and call the plain launchers of csrc/kernels on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/checks.h"
#include "kernels/adamw8bit.h"
#include "kernels/fp8_quant.h"
#include "kernels/fp8_quant_grouped.h"
#include "kernels/grouped_gemm.h"
#include "kernels/grouped_gemm_wgrad.h"
#include "kernels/moe_permute.h"
#include "kernels/route_topk.h"
#include "kernels/sparse_attention.h"
#include "kernels/sparse_attention_bwd.h"
#include "kernels/sparse_attention_decode.h"

namespace llama4 {
namespace {

kernels::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "llama4: unsupported dtype ", t);
  }
}

void check_launch(kernels::Status status, const char* op) {
  if (status == kernels::Status::kCudaError) {
    C10_CUDA_CHECK(cudaGetLastError());
  }
  TORCH_CHECK(status == kernels::Status::kOk, op, ": kernel launch refused its arguments (",
              kernels::status_string(status), ")");
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& router_logits, int64_t top_k, c10::string_view score_func,
    const std::optional<at::Tensor>& expert_bias, bool renormalize) {
  const ScoreFuncId func = parse_score_func(std::string(score_func));
  const RouteSizes sz = check_route_args(router_logits, top_k, expert_bias, kernels::kRouteMaxExperts);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const int64_t T = sz.tokens, E = sz.experts, K = sz.top_k;
  const auto i32 = router_logits.options().dtype(at::kInt);
  at::Tensor weights = at::empty({T, K}, router_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, K}, i32);
  at::Tensor counts = at::empty({E}, i32);
  at::Tensor offsets = at::empty({E + 1}, i32);
  at::Tensor sorted_slots = at::empty({T * K}, i32);
  at::Tensor positions = at::empty({T, K}, i32);
  const size_t ws_bytes = kernels::route_topk_workspace_bytes(T, static_cast<int32_t>(E), static_cast<int32_t>(K));
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, router_logits.options().dtype(at::kByte));

  kernels::RouteTopkParams p{};
  p.logits = router_logits.data_ptr();
  p.logits_dtype = to_kernel_dtype(router_logits.scalar_type());
  p.logits_row_stride = router_logits.stride(0);
  p.expert_bias = expert_bias.has_value() ? expert_bias->data_ptr<float>() : nullptr;
  p.num_tokens = T;
  p.num_experts = static_cast<int32_t>(E);
  p.top_k = static_cast<int32_t>(K);
  p.score_func = func == ScoreFuncId::kSigmoid ? kernels::ScoreFunc::kSigmoid : kernels::ScoreFunc::kSoftmax;
  p.renormalize = renormalize;
  p.topk_weights = weights.data_ptr<float>();
  p.topk_ids = ids.data_ptr<int32_t>();
  p.tokens_per_expert = counts.data_ptr<int32_t>();
  p.expert_offsets = offsets.data_ptr<int32_t>();
  p.sorted_slots = sorted_slots.data_ptr<int32_t>();
  p.slot_positions = positions.data_ptr<int32_t>();
  p.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  check_launch(kernels::route_topk(p, c10::cuda::getCurrentCUDAStream()), "moe_route");
  return {weights, ids, counts, offsets, sorted_slots, positions};
}

at::Tensor moe_permute_cuda(const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                            const std::optional<at::Tensor>& topk_weights) {
  const RowsSizes sz =
      check_rows_args("moe_permute", "x", x, sorted_slots, slot_positions, topk_weights, /*rows_are_slots=*/false);
  check_cuda(x, "moe_permute", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({sz.tokens * sz.top_k, sz.width}, x.options());
  kernels::MoePermuteParams p{};
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.dtype = to_kernel_dtype(x.scalar_type());
  p.sorted_slots = sorted_slots.data_ptr<int32_t>();
  p.slot_weights = topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr;
  p.num_tokens = sz.tokens;
  p.top_k = static_cast<int32_t>(sz.top_k);
  p.width = sz.width;
  p.out = out.data_ptr();
  check_launch(kernels::moe_permute(p, c10::cuda::getCurrentCUDAStream()), "moe_permute");
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                              const std::optional<at::Tensor>& topk_weights) {
  const RowsSizes sz =
      check_rows_args("moe_unpermute", "y", y, sorted_slots, slot_positions, topk_weights, /*rows_are_slots=*/true);
  check_cuda(y, "moe_unpermute", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty({sz.tokens, sz.width}, y.options());
  kernels::MoeUnpermuteParams p{};
  p.y = y.data_ptr();
  p.y_row_stride = y.stride(0);
  p.dtype = to_kernel_dtype(y.scalar_type());
  p.slot_positions = slot_positions.data_ptr<int32_t>();
  p.slot_weights = topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr;
  p.num_tokens = sz.tokens;
  p.top_k = static_cast<int32_t>(sz.top_k);
  p.width = sz.width;
  p.out = out.data_ptr();
  check_launch(kernels::moe_unpermute(p, c10::cuda::getCurrentCUDAStream()), "moe_unpermute");
  return out;
}

void adamw8bit_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const at::Tensor& absmax_exp_avg,
                         const at::Tensor& absmax_exp_avg_sq, const at::Tensor& qmap_signed,
                         const at::Tensor& qmap_unsigned, int64_t step, double lr, double beta1, double beta2,
                         double eps, double weight_decay, int64_t block_size, int64_t seed) {
  const AdamWArgs a = check_adamw_args(param, grad, exp_avg, exp_avg_sq, absmax_exp_avg, absmax_exp_avg_sq, qmap_signed,
                                       qmap_unsigned, step, lr, beta1, beta2, eps, weight_decay, block_size, seed);
  check_cuda(param, "adamw8bit_step", "param");
  const c10::cuda::CUDAGuard guard(param.device());
  kernels::AdamW8bitParams p{};
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.param_dtype = to_kernel_dtype(param.scalar_type());
  p.quantized = a.quantized;
  p.exp_avg = exp_avg.data_ptr();
  p.exp_avg_sq = exp_avg_sq.data_ptr();
  p.absmax_exp_avg = a.quantized ? absmax_exp_avg.data_ptr<float>() : nullptr;
  p.absmax_exp_avg_sq = a.quantized ? absmax_exp_avg_sq.data_ptr<float>() : nullptr;
  p.qmap_signed = a.quantized ? qmap_signed.data_ptr<float>() : nullptr;
  p.qmap_unsigned = a.quantized ? qmap_unsigned.data_ptr<float>() : nullptr;
  p.numel = a.numel;
  p.block_size = static_cast<int32_t>(a.block_size);
  p.scalars = a.scalars;
  p.seed = a.seed;
  p.step = a.step;
  check_launch(kernels::adamw8bit_step(p, c10::cuda::getCurrentCUDAStream()), "adamw8bit_step");
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, const at::Tensor& qmap,
                                                           int64_t block_size) {
  check_quantize_args(x, qmap, block_size);
  check_cuda(x, "quantize_blockwise", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + block_size - 1) / block_size}, x.options().dtype(at::kFloat));
  kernels::BlockwiseQuantParams p{x.data_ptr(),
                                  to_kernel_dtype(x.scalar_type()),
                                  n,
                                  static_cast<int32_t>(block_size),
                                  qmap.data_ptr<float>(),
                                  codes.data_ptr<uint8_t>(),
                                  absmax.data_ptr<float>()};
  check_launch(kernels::quantize_blockwise(p, c10::cuda::getCurrentCUDAStream()), "quantize_blockwise");
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                     int64_t block_size) {
  check_dequantize_args(codes, absmax, qmap, block_size);
  check_cuda(codes, "dequantize_blockwise", "codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty({codes.numel()}, codes.options().dtype(at::kFloat));
  kernels::BlockwiseDequantParams p{codes.data_ptr<uint8_t>(),        absmax.data_ptr<float>(),
                                    qmap.data_ptr<float>(),           codes.numel(),
                                    static_cast<int32_t>(block_size), out.data_ptr<float>()};
  check_launch(kernels::dequantize_blockwise(p, c10::cuda::getCurrentCUDAStream()), "dequantize_blockwise");
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_impl(const char* op, const at::Tensor& x, c10::string_view granularity,
                                                     at::ScalarType fp8_dtype, bool swiglu) {
  const Fp8QuantSizes sz = check_fp8_quant_args(op, x, std::string(granularity), fp8_dtype, swiglu);
  check_cuda(x, op, swiglu ? "h" : "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({sz.rows, sz.cols}, x.options().dtype(fp8_dtype));
  at::Tensor scale = at::empty(fp8_scale_shape(sz.granularity, sz.rows, sz.cols), x.options().dtype(at::kFloat));
  at::Tensor workspace;
  if (sz.granularity == kernels::QuantGranularity::kTensor) workspace = at::empty({1}, x.options().dtype(at::kFloat));
  kernels::Fp8QuantParams p{};
  p.x = x.data_ptr();
  p.x_dtype = to_kernel_dtype(x.scalar_type());
  p.rows = sz.rows;
  p.cols = sz.cols;
  p.x_row_stride = x.stride(0);
  p.swiglu = swiglu;
  p.granularity = sz.granularity;
  p.kind = sz.kind;
  p.out = static_cast<uint8_t*>(out.data_ptr());
  p.scale = scale.data_ptr<float>();
  p.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  check_launch(kernels::quantize_fp8(p, c10::cuda::getCurrentCUDAStream()), op);
  return {out, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, c10::string_view granularity,
                                                     at::ScalarType fp8_dtype) {
  return quantize_fp8_impl("quantize_fp8", x, granularity, fp8_dtype, false);
}

std::tuple<at::Tensor, at::Tensor> swiglu_quant_cuda(const at::Tensor& h, c10::string_view granularity,
                                                     at::ScalarType fp8_dtype) {
  return quantize_fp8_impl("swiglu_quant", h, granularity, fp8_dtype, true);
}

at::Tensor dequantize_fp8_cuda(const at::Tensor& x_fp8, const at::Tensor& scale, c10::string_view granularity,
                               at::ScalarType out_dtype) {
  const Fp8QuantSizes sz = check_fp8_dequant_args(x_fp8, scale, std::string(granularity), out_dtype);
  check_cuda(x_fp8, "dequantize_fp8", "x_fp8");
  const c10::cuda::CUDAGuard guard(x_fp8.device());
  at::Tensor out = at::empty({sz.rows, sz.cols}, x_fp8.options().dtype(out_dtype));
  kernels::Fp8DequantParams p{static_cast<const uint8_t*>(x_fp8.data_ptr()),
                              sz.kind,
                              sz.rows,
                              sz.cols,
                              sz.granularity,
                              scale.data_ptr<float>(),
                              out.data_ptr(),
                              to_kernel_dtype(out_dtype)};
  check_launch(kernels::dequantize_fp8(p, c10::cuda::getCurrentCUDAStream()), "dequantize_fp8");
  return out;
}

at::Tensor swiglu_cuda(const at::Tensor& h) {
  check_swiglu_args("swiglu", h);
  check_cuda(h, "swiglu", "h");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty({h.size(0), h.size(1) / 2}, h.options());
  kernels::SwigluParams p{h.data_ptr(),  to_kernel_dtype(h.scalar_type()), h.size(0), h.size(1) / 2, h.stride(0),
                          out.data_ptr()};
  check_launch(kernels::swiglu(p, c10::cuda::getCurrentCUDAStream()), "swiglu");
  return out;
}

at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                             const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                             std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "grouped_gemm";
  const at::ScalarType dtype = out_dtype.value_or(at::kBFloat16);
  const GroupedGemmSizes sz = check_grouped_gemm_args(x, w, group_sizes, x_scale, w_scale, dtype);
  check_cuda(x, op, "x");
  const int64_t align = sz.fp8 ? kernels::kGroupedGemmAlignFp8 : kernels::kGroupedGemmAlignBf16;
  TORCH_CHECK_VALUE(sz.K % align == 0 && sz.N % align == 0, op, ": on CUDA, K and N must be multiples of ", align,
                    " for ", sz.fp8 ? "float8" : "bfloat16", " inputs (TMA moves 16-byte rows), got K = ", sz.K,
                    ", N = ", sz.N);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({sz.M, sz.N}, x.options().dtype(dtype));
  if (sz.M == 0 || sz.N == 0) return out;
  if (sz.K == 0) return out.zero_();  // an empty reduction: every owned row is 0 (unowned rows may be too)
  const kernels::GemmInput input = sz.fp8 ? kernels::GemmInput::kFloat8E4M3 : kernels::GemmInput::kBFloat16;
  const kernels::ScaleKind kind = !sz.fp8           ? kernels::ScaleKind::kNone
                                  : sz.block_scales ? kernels::ScaleKind::kBlock128
                                                    : kernels::ScaleKind::kRowAndChannel;
  const size_t ws_bytes =
      kernels::grouped_gemm_workspace_bytes(static_cast<int32_t>(sz.E), sz.M, sz.N, sz.K, input, kind);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  kernels::GroupedGemmParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.group_sizes = group_sizes.data_ptr<int32_t>();
  p.M = sz.M;
  p.N = sz.N;
  p.K = sz.K;
  p.E = static_cast<int32_t>(sz.E);
  p.input = input;
  p.scale_kind = kind;
  p.x_scale = sz.fp8 ? x_scale->data_ptr<float>() : nullptr;
  p.w_scale = sz.fp8 ? w_scale->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  check_launch(kernels::grouped_gemm(p, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& group_sizes,
                                   const std::optional<at::Tensor>& dy_scale, const std::optional<at::Tensor>& x_scale,
                                   std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "grouped_gemm_wgrad";
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  const GroupedWgradSizes sz = check_grouped_wgrad_args(dy, x, group_sizes, dy_scale, x_scale, dtype);
  check_cuda(dy, op, "dy");
  const int64_t align = sz.fp8 ? kernels::kGroupedGemmAlignFp8 : kernels::kGroupedGemmAlignBf16;
  TORCH_CHECK_VALUE(sz.N % align == 0 && sz.K % align == 0, op, ": on CUDA, N and K must be multiples of ", align,
                    " for ", sz.fp8 ? "float8" : "bfloat16", " inputs (TMA moves 16-byte rows), got N = ", sz.N,
                    ", K = ", sz.K);
  TORCH_CHECK_VALUE(sz.M <= kernels::kGroupedGemmMaxDim, op, ": on CUDA, M must be at most 2^31 - 1, got ", sz.M);
  TORCH_CHECK_VALUE(sz.E <= kernels::kWgradMaxExperts, op, ": on CUDA, at most ", kernels::kWgradMaxExperts,
                    " experts (group_sizes [E]), got E = ", sz.E);
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, std::pair{&x, "x"}}) {
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t->data_ptr()) % kernels::kGroupedGemmPtrAlign == 0, op,
                      ": on CUDA, ", name, " must start at a 16-byte aligned address (TMA), got a view at offset ",
                      t->storage_offset());
  }
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto dw_options = dy.options().dtype(dtype);
  if (sz.M == 0 || sz.N == 0 || sz.K == 0) return at::zeros({sz.E, sz.N, sz.K}, dw_options);  // empty reductions
  at::Tensor dw = at::empty({sz.E, sz.N, sz.K}, dw_options);
  const kernels::GemmInput input = sz.fp8 ? kernels::GemmInput::kFloat8E4M3 : kernels::GemmInput::kBFloat16;
  const kernels::WgradOut out_kind = dtype == at::kFloat ? kernels::WgradOut::kFloat32 : kernels::WgradOut::kBFloat16;
  const size_t ws_bytes =
      kernels::grouped_gemm_wgrad_workspace_bytes(static_cast<int32_t>(sz.E), sz.M, sz.N, sz.K, input, out_kind);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, dy.options().dtype(at::kByte));
  kernels::GroupedWgradParams p{};
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.group_sizes = group_sizes.data_ptr<int32_t>();
  p.M = sz.M;
  p.N = sz.N;
  p.K = sz.K;
  p.E = static_cast<int32_t>(sz.E);
  p.input = input;
  p.dy_scale = sz.fp8 ? dy_scale->data_ptr<float>() : nullptr;
  p.x_scale = sz.fp8 ? x_scale->data_ptr<float>() : nullptr;
  p.out_dtype = out_kind;
  p.dw = dw.data_ptr();
  p.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  check_launch(kernels::grouped_gemm_wgrad(p, c10::cuda::getCurrentCUDAStream()), op);
  return dw;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_grouped_cuda(const at::Tensor& x, const at::Tensor& group_sizes,
                                                             at::ScalarType fp8_dtype) {
  constexpr const char* op = "quantize_fp8_grouped";
  const Fp8GroupedQuantSizes sz = check_fp8_quant_grouped_args(x, group_sizes, fp8_dtype);
  check_cuda(x, op, "x");
  TORCH_CHECK_VALUE(sz.E <= kernels::kQuantGroupedMaxExperts, op, ": on CUDA, at most ",
                    kernels::kQuantGroupedMaxExperts, " experts (group_sizes [E]), got E = ", sz.E);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({sz.M, sz.C}, x.options().dtype(fp8_dtype));
  at::Tensor scale = at::empty({sz.E, sz.C}, x.options().dtype(at::kFloat));
  kernels::Fp8GroupedQuantParams p{};
  p.x = x.data_ptr();
  p.x_dtype = to_kernel_dtype(x.scalar_type());
  p.rows = sz.M;
  p.cols = sz.C;
  p.group_sizes = group_sizes.data_ptr<int32_t>();
  p.E = static_cast<int32_t>(sz.E);
  p.kind = sz.kind;
  p.out = static_cast<uint8_t*>(out.data_ptr());
  p.scale = scale.data_ptr<float>();
  check_launch(kernels::quantize_fp8_grouped(p, c10::cuda::getCurrentCUDAStream()), op);
  return {out, scale};
}

// The launch parameters the forward and the backward share: q, k, v and their strides, the sizes, the varlen offsets,
// the mask and the scale.
template <class Params>
void set_attention_params(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                          const AttentionSizes& sz, double softmax_scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = to_kernel_dtype(q.scalar_type());
  p.batch = sz.batch;
  p.seqlen_q = sz.seqlen_q;
  p.seqlen_k = sz.seqlen_k;
  p.heads = static_cast<int32_t>(sz.heads);
  p.kv_heads = static_cast<int32_t>(sz.kv_heads);
  p.head_dim = static_cast<int32_t>(sz.head_dim);
  for (int d = 0; d < 3; ++d) {
    p.q_strides[d] = q.stride(d);
    p.k_strides[d] = k.stride(d);
    p.v_strides[d] = v.stride(d);
  }
  if (cu_seqlens_q.has_value()) {
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
    p.num_seqs = static_cast<int32_t>(sz.num_seqs);
    // The longest sequence is not known on the host without a sync: bound it by the total (tiles past a
    // sequence's end exit at once).
    p.max_seqlen_q = static_cast<int32_t>(sz.seqlen_q);
  }
  p.mask = sz.mask;
  p.softmax_scale = static_cast<float>(softmax_scale);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const std::optional<at::Tensor>& cu_seqlens_q,
                                                             const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
                                                             int64_t window, int64_t chunk, int64_t global_stride,
                                                             int64_t sinks, double softmax_scale) {
  constexpr const char* op = "sparse_attention";
  const AttentionSizes sz = check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, chunk,
                                                 global_stride, sinks, softmax_scale);
  check_cuda(q, op, "q");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
                   ": on CUDA, q, k and v must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(sz.head_dim == 64 || sz.head_dim == 128, op, ": on CUDA, head_dim must be 64 or 128, got ",
                    sz.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({sz.batch, sz.seqlen_q, sz.heads, sz.head_dim}, q.options());
  at::Tensor lse = at::empty({sz.batch, sz.heads, sz.seqlen_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  kernels::SparseAttentionParams p{};
  set_attention_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, sz, softmax_scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(kernels::sparse_attention_fwd(p, c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    bool causal, int64_t window, int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale,
    bool deterministic) {
  constexpr const char* op = "sparse_attention_bwd";
  const AttentionSizes sz = check_attention_bwd_args(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                                     window, chunk, global_stride, sinks, softmax_scale);
  check_cuda(q, op, "q");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
                   ": on CUDA, q, k, v, out and dout must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(sz.head_dim == 64 || sz.head_dim == 128, op, ": on CUDA, head_dim must be 64 or 128, got ",
                    sz.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty({sz.batch, sz.seqlen_q, sz.heads, sz.head_dim}, q.options());
  at::Tensor dk = at::empty({sz.batch, sz.seqlen_k, sz.kv_heads, sz.head_dim}, k.options());
  at::Tensor dv = at::empty({sz.batch, sz.seqlen_k, sz.kv_heads, sz.head_dim}, v.options());
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  // delta = rowsum(dout * out) and lse in log2 units: two [B, H, S] float32 arrays.
  const size_t ws_bytes =
      kernels::sparse_attention_bwd_workspace_bytes(sz.batch, static_cast<int32_t>(sz.heads), sz.seqlen_q);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  kernels::SparseAttentionBwdParams p{};
  set_attention_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, sz, softmax_scale);
  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  for (int d = 0; d < 3; ++d) {
    p.dout_strides[d] = dout.stride(d);
    p.out_strides[d] = out.stride(d);
  }
  // Varlen: the longest key sequence is bounded by the total too (as max_seqlen_q in set_attention_params).
  if (cu_seqlens_q.has_value()) p.max_seqlen_k = static_cast<int32_t>(sz.seqlen_k);
  p.deterministic = deterministic;  // always deterministic (no atomics): see sparse_attention_bwd.h
  check_launch(kernels::sparse_attention_bwd(p, c10::cuda::getCurrentCUDAStream()), op);
  return {dq, dk, dv};
}

int32_t multiprocessor_count(int device) {
  static int32_t counts[64] = {};  // per device, read once: cudaDeviceGetAttribute is cheap but not free
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device] = n;
  }
  return counts[device];
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_decode_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& key_positions, const std::optional<at::Tensor>& query_positions,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale, bool causal, int64_t window,
    int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale) {
  constexpr const char* op = "sparse_attention_decode";
  const DecodeSizes sz = check_decode_args(q, k_cache, v_cache, cache_seqlens, key_positions, query_positions, k_scale,
                                           v_scale, causal, window, chunk, global_stride, sinks, softmax_scale);
  check_cuda(q, op, "q");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
                   ": on CUDA, q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(sz.head_dim == 64 || sz.head_dim == 128, op, ": on CUDA, head_dim must be 64 or 128, got ",
                    sz.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({sz.batch, sz.heads, sz.head_dim}, q.options());
  at::Tensor lse = at::empty({sz.batch, sz.heads}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  kernels::SparseDecodeParams p{};
  p.q = q.data_ptr();
  p.q_dtype = to_kernel_dtype(q.scalar_type());
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kv_dtype = sz.fp8_cache                         ? kernels::KvCacheDType::kFloat8E4M3
               : k_cache.scalar_type() == at::kHalf ? kernels::KvCacheDType::kFloat16
                                                    : kernels::KvCacheDType::kBFloat16;
  p.k_scale = sz.fp8_cache ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = sz.fp8_cache ? v_scale->data_ptr<float>() : nullptr;
  for (int d = 0; d < 3; ++d) {
    p.k_strides[d] = k_cache.stride(d);
    p.v_strides[d] = v_cache.stride(d);
  }
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.key_positions = key_positions.has_value() ? key_positions->data_ptr<int32_t>() : nullptr;
  p.key_positions_stride = key_positions.has_value() ? key_positions->stride(0) : 0;
  p.query_positions = query_positions.has_value() ? query_positions->data_ptr<int32_t>() : nullptr;
  p.batch = sz.batch;
  p.max_slots = sz.max_slots;
  p.heads = static_cast<int32_t>(sz.heads);
  p.kv_heads = static_cast<int32_t>(sz.kv_heads);
  p.head_dim = static_cast<int32_t>(sz.head_dim);
  p.mask = sz.mask;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const int32_t splits = kernels::sparse_attention_decode_num_splits(sz.batch, p.kv_heads, sz.max_slots,
                                                                     multiprocessor_count(q.get_device()));
  const size_t ws_bytes = kernels::sparse_attention_decode_workspace_bytes(sz.batch, p.heads, p.head_dim, splits);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  p.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  check_launch(kernels::sparse_attention_decode(p, splits, c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama4, CUDA, m) {
  m.impl("sparse_attention_decode", &sparse_attention_decode_cuda);
  m.impl("sparse_attention_fwd", &sparse_attention_fwd_cuda);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd_cuda);
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
  m.impl("quantize_fp8_grouped", &quantize_fp8_grouped_cuda);
  m.impl("quantize_fp8", &quantize_fp8_cuda);
  m.impl("dequantize_fp8", &dequantize_fp8_cuda);
  m.impl("swiglu_quant", &swiglu_quant_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("adamw8bit_step", &adamw8bit_step_cuda);
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
}

}  // namespace llama4
