// FP8 quantisation maths shared verbatim by the CUDA kernels and the C++ CPU kernels (no CUDA or
// torch header), so both produce the same scales and the same bits.
#pragma once

#include <cmath>
#include <cstdint>

namespace llama4::kernels {

enum class Fp8Kind : int32_t { kE4M3 = 0, kE5M2 = 1 };
enum class QuantGranularity : int32_t { kTensor = 0, kRow = 1, kBlock128 = 2 };

inline constexpr int kQuantBlock = 128;      // columns per scale in kBlock128
inline constexpr float kAmaxFloor = 1e-12f;  // an all-zero group gets scale floor/fp8_max: 0 stays 0, never NaN
inline constexpr float kFp8E4M3Max = 448.0f;
inline constexpr float kFp8E5M2Max = 57344.0f;

#if defined(__CUDACC__)
#define LLAMA4_FP8_HD __host__ __device__ __forceinline__
#else
#define LLAMA4_FP8_HD inline
#endif

LLAMA4_FP8_HD float fp8_max(Fp8Kind kind) {
  return kind == Fp8Kind::kE4M3 ? kFp8E4M3Max : kFp8E5M2Max;
}

// scale = max(amax, floor) / fp8_max (NaN amax stays NaN: the group's values are NaN anyway).
LLAMA4_FP8_HD float fp8_scale_from_amax(float amax, Fp8Kind kind) {
  return (amax != amax ? amax : (amax > kAmaxFloor ? amax : kAmaxFloor)) / fp8_max(kind);
}

// x / scale saturated to +-fp8_max (NaN passes through), ready for a round-to-nearest-even cast.
LLAMA4_FP8_HD float fp8_scaled_saturated(float x, float scale, Fp8Kind kind) {
  const float v = x / scale;
  const float limit = fp8_max(kind);
  return v > limit ? limit : (v < -limit ? -limit : v);
}

// silu(gate) * up in float32.
LLAMA4_FP8_HD float swiglu_value(float gate, float up) {
  return gate / (1.0f + expf(-gate)) * up;
}

}  // namespace llama4::kernels
