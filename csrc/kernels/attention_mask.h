// The sparse-global attention visibility rule, shared verbatim by the CUDA kernels and the C++
// CPU kernel (host+device inline functions, no CUDA or torch header).
// Positions are absolute within one sequence. Queries are aligned to the END of the keys
// (bottom-right, as FlashAttention): with Sq queries over Sk keys, query row r sits at position
// r + Sk - Sq, so a prefill continuing a cached prefix, or a decode step, sees the right keys.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLAMA4_ATTN_HD __host__ __device__ __forceinline__
#else
#define LLAMA4_ATTN_HD inline
#endif

namespace llama4::kernels {

struct AttentionMask {
  bool causal;            // j <= i
  int32_t window;         // > 0: i - j < window (sliding window including the query's own key)
  int32_t chunk;          // > 0: j / chunk == i / chunk (Llama 4's chunked local attention)
  int32_t global_stride;  // > 0: j % global_stride == 0 (strided global keys)
  int32_t sinks;          // > 0: j < sinks
};

// Floor division (Python's //): query positions can be negative when there are more queries
// than keys, and C++'s / truncates toward zero.
LLAMA4_ATTN_HD int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

LLAMA4_ATTN_HD bool mask_has_pattern(const AttentionMask& m) {
  return m.window > 0 || m.chunk > 0 || m.global_stride > 0 || m.sinks > 0;
}

// Is key position j visible to query position i? With no pattern: plain causal (or full).
LLAMA4_ATTN_HD bool mask_visible(const AttentionMask& m, int64_t i, int64_t j) {
  if (m.causal && j > i) return false;
  if (!mask_has_pattern(m)) return true;
  return (m.window > 0 && i - j < m.window) || (m.chunk > 0 && floor_div(j, m.chunk) == floor_div(i, m.chunk)) ||
         (m.global_stride > 0 && j % m.global_stride == 0) || (m.sinks > 0 && j < m.sinks);
}

// Could any key in [j0, j1) be visible to any query in [i0, i1)? Conservative (may say yes for
// a tile with no visible key, never no for a tile with one): kernels iterate only over tiles
// for which this holds, so the work is O(S x visible keys), never O(S^2) for local patterns.
LLAMA4_ATTN_HD bool mask_tile_may_be_visible(const AttentionMask& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (i1 <= i0 || j1 <= j0) return false;
  if (m.causal && j0 > i1 - 1) return false;
  if (!mask_has_pattern(m)) return true;
  if (m.sinks > 0 && j0 < m.sinks) return true;
  if (m.global_stride > 0) {
    const int64_t first = (j0 + m.global_stride - 1) / m.global_stride * m.global_stride;  // first multiple >= j0
    if (first < j1) return true;
  }
  if (m.window > 0 && (i0 - (j1 - 1)) < m.window) return true;  // the closest pair is within the window
  if (m.chunk > 0 && floor_div(j0, m.chunk) <= floor_div(i1 - 1, m.chunk) &&
      floor_div(i0, m.chunk) <= floor_div(j1 - 1, m.chunk))
    return true;
  return false;
}

}  // namespace llama4::kernels
