// Argument validation shared by the CPU and CUDA implementations of every llama4 op.
#include "bindings/checks.h"

#include <cmath>
#include <limits>

#include "kernels/adamw8bit.h"

namespace llama4 {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

ScoreFuncId parse_score_func(const std::string& score_func) {
  if (score_func == "sigmoid") return ScoreFuncId::kSigmoid;
  if (score_func == "softmax") return ScoreFuncId::kSoftmax;
  TORCH_CHECK_VALUE(false, "moe_route: score_func must be \"sigmoid\" or \"softmax\", got \"", score_func, "\"");
}

RouteSizes check_route_args(const at::Tensor& router_logits, int64_t top_k,
                            const std::optional<at::Tensor>& expert_bias, int64_t max_experts) {
  TORCH_CHECK_VALUE(router_logits.dim() == 2, "moe_route: router_logits must be 2-D [T, E], got ", router_logits.dim(),
                    "-D with shape ", router_logits.sizes());
  TORCH_CHECK_TYPE(is_supported_float(router_logits.scalar_type()),
                   "moe_route: router_logits must be float32, float16 or bfloat16, got ", router_logits.scalar_type());
  const int64_t T = router_logits.size(0);
  const int64_t E = router_logits.size(1);
  TORCH_CHECK_VALUE(E >= 1, "moe_route: router_logits must have at least one expert column, got shape ",
                    router_logits.sizes());
  TORCH_CHECK_VALUE(router_logits.stride(1) == 1 || E == 1,
                    "moe_route: router_logits must have unit stride along experts (dim 1), got strides ",
                    router_logits.strides(), "; call .contiguous() first");
  TORCH_CHECK_VALUE(router_logits.stride(0) >= 0, "moe_route: router_logits must have a non-negative row stride");
  TORCH_CHECK_VALUE(max_experts < 0 || E <= max_experts, "moe_route: router_logits has E = ", E, " experts; the ",
                    router_logits.device().type(), " kernel supports at most ", max_experts);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "moe_route: top_k must be in [1, E = ", E, "], got ", top_k);
  TORCH_CHECK_VALUE(T <= std::numeric_limits<int32_t>::max() / top_k,
                    "moe_route: T * top_k must fit the int32 slot indices (<= 2147483647), got T = ", T,
                    ", top_k = ", top_k, "; route in smaller batches");
  if (expert_bias.has_value()) {
    const at::Tensor& b = *expert_bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == E, "moe_route: expert_bias must have shape [E] = [", E, "], got ",
                      b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == at::kFloat, "moe_route: expert_bias must be float32, got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == router_logits.device(), "moe_route: expert_bias must be on ",
                      router_logits.device(), " like router_logits, got ", b.device());
    TORCH_CHECK_VALUE(b.stride(0) == 1 || E == 1, "moe_route: expert_bias must be contiguous");
  }
  return {T, E, top_k};
}

RowsSizes check_rows_args(const char* op, const char* rows_name, const at::Tensor& rows, const at::Tensor& sorted_slots,
                          const at::Tensor& slot_positions, const std::optional<at::Tensor>& topk_weights,
                          bool rows_are_slots) {
  TORCH_CHECK_VALUE(rows.dim() == 2, op, ": ", rows_name, " must be 2-D [rows, D], got ", rows.dim(), "-D with shape ",
                    rows.sizes());
  TORCH_CHECK_TYPE(is_supported_float(rows.scalar_type()), op, ": ", rows_name,
                   " must be float32, float16 or bfloat16, got ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.stride(1) == 1 || rows.size(1) <= 1, op, ": ", rows_name,
                    " must have unit stride along D (dim 1), got strides ", rows.strides());
  TORCH_CHECK_VALUE(rows.stride(0) >= 0, op, ": ", rows_name, " must have a non-negative row stride");
  TORCH_CHECK_VALUE(slot_positions.dim() == 2, op, ": slot_positions must be 2-D [T, K], got shape ",
                    slot_positions.sizes());
  TORCH_CHECK_TYPE(slot_positions.scalar_type() == at::kInt, op, ": slot_positions must be int32, got ",
                   slot_positions.scalar_type());
  TORCH_CHECK_TYPE(sorted_slots.scalar_type() == at::kInt, op, ": sorted_slots must be int32, got ",
                   sorted_slots.scalar_type());
  const int64_t T = slot_positions.size(0);
  const int64_t K = slot_positions.size(1);
  TORCH_CHECK_VALUE(K >= 1, op, ": slot_positions must have K >= 1 columns, got shape ", slot_positions.sizes());
  TORCH_CHECK_VALUE(sorted_slots.dim() == 1 && sorted_slots.size(0) == T * K, op,
                    ": sorted_slots must have shape [T * K] = [", T * K, "], got ", sorted_slots.sizes());
  TORCH_CHECK_VALUE(sorted_slots.is_contiguous() && slot_positions.is_contiguous(), op,
                    ": sorted_slots and slot_positions must be contiguous");
  const int64_t expected_rows = rows_are_slots ? T * K : T;
  TORCH_CHECK_VALUE(rows.size(0) == expected_rows, op, ": ", rows_name, " must have ",
                    rows_are_slots ? "T * K = " : "T = ", expected_rows,
                    " rows (from slot_positions [T, K] = ", slot_positions.sizes(), "), got ", rows.size(0));
  for (const at::Tensor* t : {&sorted_slots, &slot_positions}) {
    TORCH_CHECK_VALUE(t->device() == rows.device(), op, ": sorted_slots and slot_positions must be on ", rows.device(),
                      " like ", rows_name, ", got ", t->device());
  }
  if (topk_weights.has_value()) {
    const at::Tensor& w = *topk_weights;
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == T && w.size(1) == K, op, ": topk_weights must have shape [T, K] = [",
                      T, ", ", K, "], got ", w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, op, ": topk_weights must be float32, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == rows.device(), op, ": topk_weights must be on ", rows.device(), " like ", rows_name,
                      ", got ", w.device());
    TORCH_CHECK_VALUE(w.is_contiguous(), op, ": topk_weights must be contiguous");
  }
  return {T, K, rows.size(1)};
}

namespace {

void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like ", ref_name,
                    ", got ", t.device());
}

void check_qmap(const char* op, const at::Tensor& qmap, const char* name) {
  TORCH_CHECK_VALUE(qmap.dim() == 1 && qmap.size(0) == kernels::adamw::kQmapSize && qmap.is_contiguous(), op, ": ",
                    name, " must be a contiguous [256] map, got shape ", qmap.sizes());
  TORCH_CHECK_TYPE(qmap.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", qmap.scalar_type());
}

void check_block_size(const char* op, int64_t block_size) {
  TORCH_CHECK_VALUE(kernels::adamw_block_size_supported(block_size), op, ": block_size must be 128, 256 or 512, got ",
                    block_size);
}

}  // namespace

AdamWArgs check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const at::Tensor& absmax_exp_avg,
                           const at::Tensor& absmax_exp_avg_sq, const at::Tensor& qmap_signed,
                           const at::Tensor& qmap_unsigned, int64_t step, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int64_t block_size, int64_t seed) {
  constexpr const char* op = "adamw8bit_step";
  TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16, op,
                   ": param must be float32 or bfloat16 (bfloat16 uses stochastic rounding; float16 is not "
                   "supported), got ",
                   param.scalar_type());
  TORCH_CHECK_VALUE(param.layout() == at::kStrided && param.is_contiguous(), op,
                    ": param must be a dense contiguous tensor");
  TORCH_CHECK_VALUE(grad.layout() == at::kStrided, op, ": grad must be dense (sparse gradients are not supported)");
  TORCH_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), op, ": grad must have param's dtype ",
                   param.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.numel() == param.numel() && grad.is_contiguous(), op,
                    ": grad must be contiguous with param's ", param.numel(), " elements, got shape ", grad.sizes());
  const int64_t n = param.numel();
  const bool quantized = exp_avg.scalar_type() == at::kByte;
  TORCH_CHECK_TYPE(quantized || exp_avg.scalar_type() == at::kFloat, op,
                   ": exp_avg must be uint8 (8-bit state) or float32, got ", exp_avg.scalar_type());
  TORCH_CHECK_TYPE(exp_avg_sq.scalar_type() == exp_avg.scalar_type(), op, ": exp_avg_sq must have exp_avg's dtype ",
                   exp_avg.scalar_type(), ", got ", exp_avg_sq.scalar_type());
  for (const auto& [t, name] : {std::pair{&exp_avg, "exp_avg"}, std::pair{&exp_avg_sq, "exp_avg_sq"}}) {
    TORCH_CHECK_VALUE(t->numel() == n && t->is_contiguous(), op, ": ", name, " must be contiguous with ", n,
                      " elements, got shape ", t->sizes());
  }
  for (const auto& [t, name] :
       {std::pair{&grad, "grad"}, std::pair{&exp_avg, "exp_avg"}, std::pair{&exp_avg_sq, "exp_avg_sq"}}) {
    check_same_device(op, param, "param", *t, name);
  }
  if (quantized) {
    check_block_size(op, block_size);
    const int64_t blocks = (n + block_size - 1) / block_size;
    for (const auto& [t, name] :
         {std::pair{&absmax_exp_avg, "absmax_exp_avg"}, std::pair{&absmax_exp_avg_sq, "absmax_exp_avg_sq"}}) {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == blocks && t->is_contiguous(), op, ": ", name,
                        " must be a contiguous [ceil(n / block_size)] = [", blocks, "] tensor, got ", t->sizes());
      TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
      check_same_device(op, param, "param", *t, name);
    }
    check_qmap(op, qmap_signed, "qmap_signed");
    check_qmap(op, qmap_unsigned, "qmap_unsigned");
    check_same_device(op, param, "param", qmap_signed, "qmap_signed");
    check_same_device(op, param, "param", qmap_unsigned, "qmap_unsigned");
  }
  TORCH_CHECK_VALUE(step >= 1, op, ": step must be >= 1 (the count including this step), got ", step);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0.0, op, ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0.0, op, ": weight_decay must be >= 0, got ",
                    weight_decay);

  AdamWArgs a{param, grad, exp_avg, exp_avg_sq, absmax_exp_avg, absmax_exp_avg_sq, qmap_signed, qmap_unsigned};
  a.quantized = quantized;
  a.numel = n;
  a.block_size = block_size;
  const double t = static_cast<double>(step);
  a.scalars.lr = static_cast<float>(lr);
  a.scalars.beta1 = static_cast<float>(beta1);
  a.scalars.beta2 = static_cast<float>(beta2);
  a.scalars.eps = static_cast<float>(eps);
  a.scalars.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  a.scalars.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  a.scalars.decay = static_cast<float>(1.0 - lr * weight_decay);
  a.scalars.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  a.scalars.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, t)));
  a.seed = static_cast<uint64_t>(seed);
  a.step = static_cast<uint64_t>(step);
  return a;
}

void check_quantize_args(const at::Tensor& x, const at::Tensor& qmap, int64_t block_size) {
  constexpr const char* op = "quantize_blockwise";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
                   ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  check_qmap(op, qmap, "qmap");
  check_same_device(op, x, "x", qmap, "qmap");
  check_block_size(op, block_size);
}

void check_dequantize_args(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                           int64_t block_size) {
  constexpr const char* op = "dequantize_blockwise";
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.is_contiguous(), op, ": codes must be contiguous");
  check_block_size(op, block_size);
  const int64_t blocks = (codes.numel() + block_size - 1) / block_size;
  TORCH_CHECK_VALUE(absmax.dim() == 1 && absmax.size(0) == blocks && absmax.is_contiguous(), op,
                    ": absmax must be a contiguous [ceil(n / block_size)] = [", blocks, "] tensor, got ",
                    absmax.sizes());
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ", absmax.scalar_type());
  check_qmap(op, qmap, "qmap");
  check_same_device(op, codes, "codes", absmax, "absmax");
  check_same_device(op, codes, "codes", qmap, "qmap");
}

kernels::QuantGranularity parse_granularity(const char* op, const std::string& granularity) {
  if (granularity == "tensor") return kernels::QuantGranularity::kTensor;
  if (granularity == "row") return kernels::QuantGranularity::kRow;
  if (granularity == "block128") return kernels::QuantGranularity::kBlock128;
  TORCH_CHECK_VALUE(false, op, ": granularity must be \"tensor\", \"row\" or \"block128\", got \"", granularity, "\"");
}

std::vector<int64_t> fp8_scale_shape(kernels::QuantGranularity g, int64_t rows, int64_t cols) {
  switch (g) {
    case kernels::QuantGranularity::kTensor: return {};
    case kernels::QuantGranularity::kRow: return {rows};
    default: return {rows, (cols + kernels::kQuantBlock - 1) / kernels::kQuantBlock};
  }
}

namespace {

kernels::Fp8Kind parse_fp8_dtype(const char* op, const char* name, at::ScalarType t) {
  if (t == at::kFloat8_e4m3fn) return kernels::Fp8Kind::kE4M3;
  if (t == at::kFloat8_e5m2) return kernels::Fp8Kind::kE5M2;
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be torch.float8_e4m3fn or torch.float8_e5m2, got ", t);
}

}  // namespace

void check_swiglu_args(const char* op, const at::Tensor& h) {
  TORCH_CHECK_VALUE(h.dim() == 2, op, ": h must be 2-D [M, 2F], got shape ", h.sizes());
  TORCH_CHECK_TYPE(is_supported_float(h.scalar_type()), op, ": h must be float32, float16 or bfloat16, got ",
                   h.scalar_type());
  TORCH_CHECK_VALUE(h.size(1) % 2 == 0, op, ": h must have an even number of columns [gate | up], got ", h.size(1));
  TORCH_CHECK_VALUE(h.stride(1) == 1 || h.size(1) <= 1, op, ": h must have unit stride along columns, got strides ",
                    h.strides());
  TORCH_CHECK_VALUE(h.stride(0) >= 0, op, ": h must have a non-negative row stride");
}

Fp8QuantSizes check_fp8_quant_args(const char* op, const at::Tensor& x, const std::string& granularity,
                                   at::ScalarType fp8_dtype, bool swiglu) {
  const kernels::QuantGranularity g = parse_granularity(op, granularity);
  const kernels::Fp8Kind kind = parse_fp8_dtype(op, "fp8_dtype", fp8_dtype);
  if (swiglu) {
    check_swiglu_args(op, x);
  } else {
    TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
    TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(x.stride(1) == 1 || x.size(1) <= 1, op, ": x must have unit stride along K, got strides ",
                      x.strides());
    TORCH_CHECK_VALUE(x.stride(0) >= 0, op, ": x must have a non-negative row stride");
  }
  return {x.size(0), swiglu ? x.size(1) / 2 : x.size(1), g, kind};
}

Fp8QuantSizes check_fp8_dequant_args(const at::Tensor& q, const at::Tensor& scale, const std::string& granularity,
                                     at::ScalarType out_dtype) {
  constexpr const char* op = "dequantize_fp8";
  const kernels::QuantGranularity g = parse_granularity(op, granularity);
  TORCH_CHECK_VALUE(q.dim() == 2 && q.is_contiguous(), op, ": x_fp8 must be a contiguous 2-D tensor, got shape ",
                    q.sizes());
  const kernels::Fp8Kind kind = parse_fp8_dtype(op, "x_fp8", q.scalar_type());
  const auto expected = fp8_scale_shape(g, q.size(0), q.size(1));
  TORCH_CHECK_VALUE(scale.sizes().vec() == expected && scale.is_contiguous(), op,
                    ": scale must be contiguous with shape ", at::IntArrayRef(expected), " for granularity \"",
                    granularity, "\", got ", scale.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.device() == q.device(), op, ": scale must be on ", q.device(), " like x_fp8, got ",
                    scale.device());
  TORCH_CHECK_TYPE(is_supported_float(out_dtype), op, ": out_dtype must be float32, float16 or bfloat16, got ",
                   out_dtype);
  return {q.size(0), q.size(1), g, kind};
}

GroupedGemmSizes check_grouped_gemm_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                                         const std::optional<at::Tensor>& x_scale,
                                         const std::optional<at::Tensor>& w_scale, at::ScalarType out_dtype) {
  constexpr const char* op = "grouped_gemm";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 3, op, ": w must be 3-D [E, N, K], got shape ", w.sizes());
  const bool fp8 = x.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(fp8 || x.scalar_type() == at::kBFloat16 || (x.is_cpu() && x.scalar_type() == at::kFloat), op,
                   ": x must be bfloat16 or float8_e4m3fn (or float32 on CPU), got ", x.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op, ": w must have x's dtype ", x.scalar_type(), ", got ",
                   w.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  TORCH_CHECK_VALUE(w.size(2) == K, op, ": w must be [E, N, K] with K = ", K, " (x's columns), got shape ", w.sizes());
  TORCH_CHECK_VALUE(E >= 1, op, ": w must hold at least one expert, got shape ", w.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous() && w.is_contiguous(), op, ": x and w must be contiguous (K innermost)");
  TORCH_CHECK_VALUE(group_sizes.dim() == 1 && group_sizes.size(0) == E, op, ": group_sizes must have shape [E] = [", E,
                    "], got ", group_sizes.sizes());
  TORCH_CHECK_TYPE(group_sizes.scalar_type() == at::kInt, op, ": group_sizes must be int32, got ",
                   group_sizes.scalar_type());
  TORCH_CHECK_VALUE(group_sizes.is_contiguous(), op, ": group_sizes must be contiguous");
  for (const auto& [t, name] : {std::pair{&w, "w"}, std::pair{&group_sizes, "group_sizes"}}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ",
                      t->device());
  }
  TORCH_CHECK_TYPE(out_dtype == at::kBFloat16 || (x.is_cpu() && out_dtype == at::kFloat), op,
                   ": out_dtype must be bfloat16 (or float32 on CPU), got ", out_dtype);
  bool block_scales = false;
  if (!fp8) {
    TORCH_CHECK_VALUE(!x_scale.has_value() && !w_scale.has_value(), op,
                      ": x_scale and w_scale apply to float8 inputs only (x is ", x.scalar_type(), ")");
  } else {
    TORCH_CHECK_VALUE(x_scale.has_value() && w_scale.has_value(), op,
                      ": float8 inputs need x_scale ([M] or [M, ceil(K/128)]) and w_scale ([E, N] or "
                      "[E, ceil(N/128), ceil(K/128)])");
    const at::Tensor& xs = *x_scale;
    const at::Tensor& ws = *w_scale;
    const int64_t kb = (K + kernels::kQuantBlock - 1) / kernels::kQuantBlock;
    const int64_t nb = (N + kernels::kQuantBlock - 1) / kernels::kQuantBlock;
    block_scales = xs.dim() == 2;
    if (block_scales) {
      TORCH_CHECK_VALUE(xs.size(0) == M && xs.size(1) == kb, op,
                        ": x_scale per 1x128 block must be [M, ceil(K/128)] = [", M, ", ", kb, "], got ", xs.sizes());
      TORCH_CHECK_VALUE(ws.dim() == 3 && ws.size(0) == E && ws.size(1) == nb && ws.size(2) == kb, op,
                        ": with block x_scale, w_scale must be per 128x128 block [E, ceil(N/128), ceil(K/128)] = [", E,
                        ", ", nb, ", ", kb, "], got ", ws.sizes());
    } else {
      TORCH_CHECK_VALUE(xs.dim() == 1 && xs.size(0) == M, op, ": x_scale per row must be [M] = [", M, "], got ",
                        xs.sizes());
      TORCH_CHECK_VALUE(ws.dim() == 2 && ws.size(0) == E && ws.size(1) == N, op,
                        ": with per-row x_scale, w_scale must be per expert and channel [E, N] = [", E, ", ", N,
                        "], got ", ws.sizes());
    }
    for (const auto& [t, name] : {std::pair{&xs, "x_scale"}, std::pair{&ws, "w_scale"}}) {
      TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", name, " must be contiguous");
      TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ",
                        t->device());
    }
  }
  return {M, N, K, E, fp8, block_scales};
}

GroupedWgradSizes check_grouped_wgrad_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& group_sizes,
                                           const std::optional<at::Tensor>& dy_scale,
                                           const std::optional<at::Tensor>& x_scale, at::ScalarType out_dtype) {
  constexpr const char* op = "grouped_gemm_wgrad";
  TORCH_CHECK_VALUE(dy.dim() == 2, op, ": dy must be 2-D [M, N], got shape ", dy.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  const bool fp8 = dy.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(fp8 || dy.scalar_type() == at::kBFloat16 || (dy.is_cpu() && dy.scalar_type() == at::kFloat), op,
                   ": dy must be bfloat16 or float8_e4m3fn (or float32 on CPU), got ", dy.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == dy.scalar_type(), op, ": x must have dy's dtype ", dy.scalar_type(), ", got ",
                   x.scalar_type());
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1), E = group_sizes.dim() == 1 ? group_sizes.size(0) : 0;
  TORCH_CHECK_VALUE(x.size(0) == M, op, ": x must have dy's M = ", M, " rows (the same routed rows), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(dy.is_contiguous() && x.is_contiguous(), op,
                    ": dy and x must be contiguous (row-major [M, N] and [M, K])");
  TORCH_CHECK_VALUE(group_sizes.dim() == 1 && E >= 1, op, ": group_sizes must have shape [E] with E >= 1, got ",
                    group_sizes.sizes());
  TORCH_CHECK_TYPE(group_sizes.scalar_type() == at::kInt, op, ": group_sizes must be int32, got ",
                   group_sizes.scalar_type());
  TORCH_CHECK_VALUE(group_sizes.is_contiguous(), op, ": group_sizes must be contiguous");
  for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{&group_sizes, "group_sizes"}}) {
    TORCH_CHECK_VALUE(t->device() == dy.device(), op, ": ", name, " must be on ", dy.device(), " like dy, got ",
                      t->device());
  }
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kBFloat16, op,
                   ": out_dtype must be float32 (the master-gradient dtype) or bfloat16, got ", out_dtype);
  if (!fp8) {
    TORCH_CHECK_VALUE(!dy_scale.has_value() && !x_scale.has_value(), op,
                      ": dy_scale and x_scale apply to float8 inputs only (dy is ", dy.scalar_type(), ")");
    return {M, N, K, E, fp8};
  }
  TORCH_CHECK_VALUE(dy_scale.has_value() && x_scale.has_value(), op,
                    ": float8 inputs need dy_scale [E, N] and x_scale [E, K] (per expert and channel)");
  for (const auto& [t, name, cols] : {std::tuple{&*dy_scale, "dy_scale", N}, std::tuple{&*x_scale, "x_scale", K}}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == E && t->size(1) == cols, op, ": ", name,
                      " must be per expert and channel [E, ", cols, "] = [", E, ", ", cols, "], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK_VALUE(t->device() == dy.device(), op, ": ", name, " must be on ", dy.device(), " like dy, got ",
                      t->device());
  }
  return {M, N, K, E, fp8};
}

Fp8GroupedQuantSizes check_fp8_quant_grouped_args(const at::Tensor& x, const at::Tensor& group_sizes,
                                                  at::ScalarType fp8_dtype) {
  constexpr const char* op = "quantize_fp8_grouped";
  const kernels::Fp8Kind kind = parse_fp8_dtype(op, "fp8_dtype", fp8_dtype);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, C], got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous, got strides ", x.strides());
  TORCH_CHECK_VALUE(group_sizes.dim() == 1 && group_sizes.size(0) >= 1, op,
                    ": group_sizes must have shape [E] with E >= 1, got ", group_sizes.sizes());
  TORCH_CHECK_TYPE(group_sizes.scalar_type() == at::kInt, op, ": group_sizes must be int32, got ",
                   group_sizes.scalar_type());
  TORCH_CHECK_VALUE(group_sizes.is_contiguous(), op, ": group_sizes must be contiguous");
  TORCH_CHECK_VALUE(group_sizes.device() == x.device(), op, ": group_sizes must be on ", x.device(), " like x, got ",
                    group_sizes.device());
  return {x.size(0), x.size(1), group_sizes.size(0), kind};
}

AttentionSizes check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& cu_seqlens_q,
                                    const std::optional<at::Tensor>& cu_seqlens_k, bool causal, int64_t window,
                                    int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale) {
  constexpr const char* op = "sparse_attention";
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must be 4-D [B, S, heads, D], got shape ", t->sizes());
    // float64: CPU only, the precision torch.autograd.gradcheck needs.
    TORCH_CHECK_TYPE(is_supported_float(t->scalar_type()) || (t->is_cpu() && t->scalar_type() == at::kDouble), op, ": ",
                     name, " must be bfloat16, float16 or float32 (or float64 on CPU), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->stride(3) == 1, op, ": ", name, " must have unit stride along D, got strides ", t->strides());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
                      t->device());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), G = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": k must be [B = ", B, ", Sk, G, D = ", D, "], got ",
                    k.sizes());
  TORCH_CHECK_VALUE(D >= 1 && H >= 1 && G >= 1, op, ": heads and head_dim must be >= 1");
  TORCH_CHECK_VALUE(H % G == 0, op, ": the GQA ratio must be integral: q heads H = ", H,
                    " is not a multiple of kv heads G = ", G);
  TORCH_CHECK_VALUE(window >= 0 && chunk >= 0 && global_stride >= 0 && sinks >= 0, op,
                    ": window, chunk, global_stride and sinks must be >= 0 (0 or None: off), got ", window, ", ", chunk,
                    ", ", global_stride, ", ", sinks);
  for (const int64_t x : {window, chunk, global_stride, sinks}) {
    TORCH_CHECK_VALUE(x <= std::numeric_limits<int32_t>::max(), op, ": mask sizes must fit int32, got ", x);
  }
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0.0, op,
                    ": softmax_scale must be finite and > 0, got ", softmax_scale);
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
                    ": pass both cu_seqlens_q and cu_seqlens_k, or neither");
  int64_t num_seqs = 0;
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK_VALUE(B == 1, op, ": with cu_seqlens, q/k/v pack the sequences along S with B = 1, got B = ", B);
    for (const auto& [t, name] :
         {std::pair{&*cu_seqlens_q, "cu_seqlens_q"}, std::pair{&*cu_seqlens_k, "cu_seqlens_k"}}) {
      TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) >= 1 && t->is_contiguous(), op, ": ", name,
                        " must be a contiguous 1-D [num_seqs + 1] tensor, got shape ", t->sizes());
      TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ", t->device());
    }
    TORCH_CHECK_VALUE(cu_seqlens_q->size(0) == cu_seqlens_k->size(0), op,
                      ": cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_seqlens_q->size(0), " and ",
                      cu_seqlens_k->size(0));
    num_seqs = cu_seqlens_q->size(0) - 1;
    if (q.is_cpu()) {  // on a GPU these values stay on the device (no host sync): the kernel trusts them
      const int32_t* cq = cu_seqlens_q->data_ptr<int32_t>();
      const int32_t* ck = cu_seqlens_k->data_ptr<int32_t>();
      TORCH_CHECK_VALUE(cq[0] == 0 && ck[0] == 0, op, ": cu_seqlens must start at 0");
      for (int64_t s = 0; s < num_seqs; ++s) {
        TORCH_CHECK_VALUE(cq[s + 1] >= cq[s] && ck[s + 1] >= ck[s], op,
                          ": cu_seqlens must be non-decreasing (sequence ", s, ")");
      }
      TORCH_CHECK_VALUE(cq[num_seqs] == S && ck[num_seqs] == Sk, op, ": cu_seqlens_q must end at S = ", S,
                        " and cu_seqlens_k at Sk = ", Sk, ", got ", cq[num_seqs], " and ", ck[num_seqs]);
    }
  }
  const kernels::AttentionMask mask{causal, static_cast<int32_t>(window), static_cast<int32_t>(chunk),
                                    static_cast<int32_t>(global_stride), static_cast<int32_t>(sinks)};
  return {B, S, Sk, H, G, D, num_seqs, mask};
}

AttentionSizes check_attention_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& cu_seqlens_q,
                                        const std::optional<at::Tensor>& cu_seqlens_k, bool causal, int64_t window,
                                        int64_t chunk, int64_t global_stride, int64_t sinks, double softmax_scale) {
  constexpr const char* op = "sparse_attention_bwd";
  const AttentionSizes sz = check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, chunk,
                                                 global_stride, sinks, softmax_scale);
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), op, ": ", name, " must have q's shape [B, S, H, D] = ", q.sizes(),
                      ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                     ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
                      t->device());
    TORCH_CHECK_VALUE(t->stride(3) == 1, op, ": ", name, " must have unit stride along D, got strides ", t->strides());
  }
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == sz.batch && lse.size(1) == sz.heads && lse.size(2) == sz.seqlen_q,
                    op, ": lse must be the forward's [B, H, S] = [", sz.batch, ", ", sz.heads, ", ", sz.seqlen_q,
                    "], got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), op, ": lse must be on ", q.device(), " like q, got ", lse.device());
  TORCH_CHECK_VALUE(lse.is_contiguous(), op, ": lse must be contiguous, got strides ", lse.strides());
  return sz;
}

DecodeSizes check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& key_positions,
                              const std::optional<at::Tensor>& query_positions,
                              const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                              bool causal, int64_t window, int64_t chunk, int64_t global_stride, int64_t sinks,
                              double softmax_scale) {
  constexpr const char* op = "sparse_attention_decode";
  TORCH_CHECK_VALUE(q.dim() == 3 && q.is_contiguous(), op, ": q must be a contiguous [B, H, D] tensor, got shape ",
                    q.sizes());
  TORCH_CHECK_TYPE(is_supported_float(q.scalar_type()), op, ": q must be bfloat16, float16 or float32, got ",
                   q.scalar_type());
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must be 4-D [B, Smax, G, D], got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->stride(3) == 1, op, ": ", name, " must have unit stride along D");
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ", t->device());
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), op, ": k_cache and v_cache must have the same shape, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Smax = k_cache.size(1), G = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) == B && k_cache.size(3) == D, op, ": k_cache must be [B = ", B,
                    ", Smax, G, D = ", D, "], got ", k_cache.sizes());
  TORCH_CHECK_VALUE(G >= 1 && H % G == 0, op, ": the GQA ratio must be integral: q heads H = ", H,
                    " is not a multiple of kv heads G = ", G);
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), op, ": k_cache and v_cache must share a dtype");
  TORCH_CHECK_TYPE(fp8 || k_cache.scalar_type() == q.scalar_type(), op,
                   ": the KV cache must have q's dtype or be float8_e4m3fn, got ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(fp8 == (k_scale.has_value() && v_scale.has_value()), op,
                    fp8 ? ": a float8 KV cache needs k_scale and v_scale (float32 [G])"
                        : ": k_scale / v_scale apply to a float8 KV cache only");
  if (fp8) {
    for (const auto& [t, name] : {std::pair{&*k_scale, "k_scale"}, std::pair{&*v_scale, "v_scale"}}) {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == G && t->is_contiguous(), op, ": ", name,
                        " must be a contiguous [G] = [", G, "] tensor, got ", t->sizes());
      TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device());
    }
  }
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B && cache_seqlens.is_contiguous(), op,
                    ": cache_seqlens must be a contiguous [B] = [", B, "] tensor, got ", cache_seqlens.sizes());
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, op, ": cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.device() == q.device(), op, ": cache_seqlens must be on ", q.device());
  if (key_positions.has_value()) {
    const at::Tensor& kp = *key_positions;
    TORCH_CHECK_VALUE(kp.dim() == 2 && kp.size(0) == B && kp.size(1) == Smax && kp.stride(1) == 1, op,
                      ": key_positions must be [B, Smax] = [", B, ", ", Smax, "] with unit stride, got ", kp.sizes());
    TORCH_CHECK_TYPE(kp.scalar_type() == at::kInt, op, ": key_positions must be int32, got ", kp.scalar_type());
    TORCH_CHECK_VALUE(kp.device() == q.device(), op, ": key_positions must be on ", q.device());
  }
  if (query_positions.has_value()) {
    const at::Tensor& qp = *query_positions;
    TORCH_CHECK_VALUE(qp.dim() == 1 && qp.size(0) == B && qp.is_contiguous(), op,
                      ": query_positions must be a contiguous [B] tensor, got ", qp.sizes());
    TORCH_CHECK_TYPE(qp.scalar_type() == at::kInt, op, ": query_positions must be int32, got ", qp.scalar_type());
    TORCH_CHECK_VALUE(qp.device() == q.device(), op, ": query_positions must be on ", q.device());
  }
  if (q.is_cpu()) {  // values on a GPU stay there (no host sync): the kernel clamps to [0, Smax]
    const int32_t* lens = cache_seqlens.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= Smax, op, ": cache_seqlens[", b, "] = ", lens[b],
                        " must be in [0, Smax = ", Smax, "]");
    }
  }
  TORCH_CHECK_VALUE(window >= 0 && chunk >= 0 && global_stride >= 0 && sinks >= 0, op,
                    ": window, chunk, global_stride and sinks must be >= 0 (0: off)");
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0.0, op,
                    ": softmax_scale must be finite and > 0, got ", softmax_scale);
  const kernels::AttentionMask mask{causal, static_cast<int32_t>(window), static_cast<int32_t>(chunk),
                                    static_cast<int32_t>(global_stride), static_cast<int32_t>(sinks)};
  return {B, Smax, H, G, D, fp8, mask};
}

}  // namespace llama4
