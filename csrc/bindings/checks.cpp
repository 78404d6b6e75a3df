// Argument validation shared by the CPU and CUDA implementations of every llama4 op.
#include "bindings/checks.h"

#include <limits>

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

}  // namespace llama4
