// Launchers for MoE dispatch (permute rows into expert order) and combine (unpermute and sum
// each token's K rows). Deterministic: every output row is written by one block, in k order.
// Legend: T tokens, K top-k, N = T*K slots, D row width.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace llama4::kernels {

struct MoePermuteParams {
  const void* x;  // [T, D] rows, row stride `x_row_stride` elements
  int64_t x_row_stride;
  DType dtype;                  // of x and out
  const int32_t* sorted_slots;  // [N] slot s = t*K + k for each output row
  const float* slot_weights;    // [T*K] float32 multiplier per slot, or nullptr
  int64_t num_tokens;           // T
  int32_t top_k;                // K
  int64_t width;                // D
  void* out;                    // [N, D] contiguous
};

// out[p] = x[sorted_slots[p] / K] (* slot_weights[sorted_slots[p]]), products in float32.
Status moe_permute(const MoePermuteParams& params, cudaStream_t stream);

struct MoeUnpermuteParams {
  const void* y;  // [N, D] rows, row stride `y_row_stride` elements
  int64_t y_row_stride;
  DType dtype;                    // of y and out
  const int32_t* slot_positions;  // [T, K] row of y holding slot t*K + k
  const float* slot_weights;      // [T, K] float32, or nullptr
  int64_t num_tokens;             // T
  int32_t top_k;                  // K
  int64_t width;                  // D
  void* out;                      // [T, D] contiguous
};

// out[t] = sum_k (slot_weights[t, k] *) y[slot_positions[t, k]], accumulated in float32 in k order.
Status moe_unpermute(const MoeUnpermuteParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
