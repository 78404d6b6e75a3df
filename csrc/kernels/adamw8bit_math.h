// The per-element maths of the 8-bit AdamW step, shared verbatim by the CUDA kernel and the
// C++ CPU kernel (host+device inline functions, no torch header), so both quantise the same way.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LLAMA4_HD __host__ __device__ __forceinline__
#else
#define LLAMA4_HD inline
#endif

namespace llama4::kernels::adamw {

// Entries of a quantisation map (a sorted table of 256 float32 values in [-1, 1] or [0, 1]).
inline constexpr int kQmapSize = 256;

// Final step of the nearest-code search: from idx = the largest entry <= x (or 0 when none is),
// step to idx + 1 if that entry is strictly nearer (ties stay on the lower entry).
LLAMA4_HD int nearest_from_lower(const float* qmap, int idx, float x) {
  const int next = idx + static_cast<int>(idx + 1 < kQmapSize);
  return idx + static_cast<int>(next != idx && (qmap[next] - x) < (x - qmap[idx]));
}

// Index of the map entry nearest to x (ties to the lower entry; NaN maps to 0). `qmap` is sorted
// ascending. Eight compare-and-step rounds of a branchless binary search, then one neighbour test.
LLAMA4_HD int quantize_nearest(const float* qmap, float x) {
  int idx = 0;
  for (int step = kQmapSize / 2; step > 0; step /= 2) {
    idx += step * static_cast<int>(qmap[idx + step] <= x);  // arithmetic, not a branch: no mispredicts
  }
  return nearest_from_lower(qmap, idx, x);
}

// x / absmax for the code search: exact division (a reciprocal of a subnormal absmax overflows),
// and an all-zero block normalises to 0.
LLAMA4_HD float normalise(float x, float absmax) {
  return absmax > 0.0f ? x / absmax : 0.0f;
}

// max(a, b) that keeps a NaN once seen (fmaxf drops it), so a poisoned block stays visible.
LLAMA4_HD float nan_max(float a, float b) {
  return (b > a || b != b) ? b : a;
}

// Scalars of one step, computed once on the host in double and rounded to float.
struct StepScalars {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float decay;            // 1 - lr * weight_decay (decoupled weight decay)
  float one_minus_beta1;  // 1 - beta1 rounded once from double (1 - float(beta) loses ~100 ulps)
  float one_minus_beta2;
  float step_size;     // lr / (1 - beta1^step)
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step)
};

// One AdamW update (torch.optim.AdamW's order: decay, moments, bias-corrected step) in float32.
LLAMA4_HD void adamw_update(const StepScalars& s, float grad, float& param, float& exp_avg, float& exp_avg_sq) {
  param *= s.decay;
  exp_avg = s.beta1 * exp_avg + s.one_minus_beta1 * grad;
  exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad);
#if defined(__CUDA_ARCH__)
  const float root = sqrtf(exp_avg_sq);
#else
  const float root = __builtin_sqrtf(exp_avg_sq);
#endif
  param -= s.step_size * exp_avg / (root * s.inv_bc2_sqrt + s.eps);
}

// Counter-based random 16 bits for element `index` at `step` (splitmix64 finaliser): the same
// bits on CPU and GPU, and on resume, whatever the launch shape.
LLAMA4_HD uint32_t random16(uint64_t seed, uint64_t step, uint64_t index) {
  uint64_t z = seed ^ (step * 0x9E3779B97F4A7C15ull) ^ (index * 0xD1B54A32D192ED03ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z & 0xFFFFu);
}

// float32 -> bfloat16 bits with stochastic rounding: add 16 random bits below the bf16 mantissa,
// then truncate. Unbiased in expectation, so small updates are not lost to round-to-nearest.
// NaN and infinities pass through unchanged.
LLAMA4_HD uint16_t to_bf16_stochastic(float x, uint32_t random_bits) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  if ((bits & 0x7F800000u) == 0x7F800000u) return static_cast<uint16_t>(bits >> 16 | ((bits & 0xFFFFu) ? 0x40u : 0u));
  bits += random_bits;
  return static_cast<uint16_t>(bits >> 16);
}

LLAMA4_HD float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

}  // namespace llama4::kernels::adamw
