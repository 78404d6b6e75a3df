// Launcher for the fused MoE top-k router on CUDA (route_topk_sm90 and friends).
// Legend: T tokens, E experts, K top-k, N = T*K slots (slot s = t*K + k).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace llama4::kernels {

enum class ScoreFunc : int32_t { kSigmoid = 0, kSoftmax = 1 };

// Largest expert count the CUDA router handles (each lane of a warp keeps E/32 logits in
// registers; 1024 experts = 32 per lane).
inline constexpr int kRouteMaxExperts = 1024;

struct RouteTopkParams {
  const void* logits;         // [T, E], row stride `logits_row_stride` elements, unit column stride
  DType logits_dtype;         // float32, float16 or bfloat16; all maths in float32
  int64_t logits_row_stride;  // elements between rows (E when contiguous; 0 allowed)
  const float* expert_bias;   // [E] float32 added to the selection key only, or nullptr
  int64_t num_tokens;         // T >= 0
  int32_t num_experts;        // 1 <= E <= kRouteMaxExperts
  int32_t top_k;              // 1 <= K <= E, T*K <= kMaxSlots
  ScoreFunc score_func;
  bool renormalize;  // w /= max(sum_k w, FLT_MIN)
  // Outputs (all written in full by one call).
  float* topk_weights;         // [T, K]
  int32_t* topk_ids;           // [T, K]
  int32_t* tokens_per_expert;  // [E]
  int32_t* expert_offsets;     // [E + 1]
  int32_t* sorted_slots;       // [N]
  int32_t* slot_positions;     // [T, K]
  void* workspace;             // route_topk_workspace_bytes(...) bytes, 16-byte aligned
};

// Device workspace the launcher needs (0 for the single-launch decode path).
size_t route_topk_workspace_bytes(int64_t num_tokens, int32_t num_experts, int32_t top_k);

// Number of kernel launches `route_topk` makes for this problem (1 for decode-sized batches).
int route_topk_num_launches(int64_t num_tokens, int32_t num_experts, int32_t top_k);

// Enqueues the routing on `stream`. Never synchronises the host.
Status route_topk(const RouteTopkParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
