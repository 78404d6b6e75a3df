// Launcher of the per-(expert, channel) FP8 quantisation (quantize_fp8_grouped_sm90): the scaling of the
// K-grouped weight gradient, whose reduction runs over each expert's rows. Legend: M rows (sorted by expert),
// C channels (columns), E experts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "fp8_math.h"

namespace llama4::kernels {

// Experts whose row ends fit the kernels' shared-memory table (8 KB).
inline constexpr int32_t kQuantGroupedMaxExperts = 1024;

struct Fp8GroupedQuantParams {
  const void* x;               // [M, C] contiguous, rows sorted by expert
  DType x_dtype;               // float32, float16 or bfloat16
  int64_t rows;                // M
  int64_t cols;                // C
  const int32_t* group_sizes;  // [E] int32 on the device (sum <= M; negative sizes count as 0, a sum past M is cut)
  int32_t E;                   // 1 <= E <= kQuantGroupedMaxExperts
  Fp8Kind kind;
  uint8_t* out;  // [M, C] fp8 bits: saturate(x / scale[e(m), c]) rounded to nearest even; 0 past sum(group_sizes)
  float* scale;  // [E, C]: max(amax over expert e's rows of |x[:, c]|, 1e-12) / fp8_max (also the amax buffer)
};

// Four launches, no host synchronisation: zero the amax buffer, per-(expert, channel) amax (an integer atomicMax
// on the non-negative float bits: exact and order-independent, so deterministic), amax -> scale, quantise.
// The same maths as the CPU kernel and reference.quantize_fp8_grouped (fp8_math.h), so the same bits.
Status quantize_fp8_grouped(const Fp8GroupedQuantParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
