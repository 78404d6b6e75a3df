// Per-(expert, channel) FP8 quantisation (quantize_fp8_grouped_sm90): x [M, C] with rows sorted by expert ->
// x_fp8 [M, C] and scale [E, C], one scale per channel over each expert's rows. The weight gradient dw[e] =
// dy_e^T x_e sums over those rows, so such scales factor out of its reduction (GROUPED_GEMM.md).
// Legend: M rows, C channels, E experts.
//
// Memory-bound: two reads of x (amax, then quantise) and one write of the codes. Each CTA owns a 1024-channel
// slab of a 32-row chunk; a warp reads 32 consecutive channels of a row per load (coalesced), and the chunk's rows
// are walked in order, so the expert of a row advances with a pointer instead of a search per row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "fp8_quant_grouped.h"

namespace llama4::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kColsPerThread = 4;  // strided by kThreads: every load instruction of a warp is 32 adjacent channels
constexpr int kColsPerCta = kThreads * kColsPerThread;
constexpr int kRowsPerCta = 32;  // a chunk long enough to amortise the expert table, short enough to fill the GPU
constexpr int64_t kMaxGridY = 65535;
constexpr int kScaleThreads = 256;

__device__ __forceinline__ float load_element(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
}

__device__ __forceinline__ uint8_t to_fp8(float v, Fp8Kind kind) {
  // Round to nearest even; the value is already saturated, so SATFINITE only guards rounding.
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, kind == Fp8Kind::kE4M3 ? __NV_E4M3 : __NV_E5M2));
}

// max that keeps NaN (fmaxf drops it): a NaN anywhere in an expert's channel makes its scale NaN.
__device__ __forceinline__ float nan_max(float a, float b) {
  return (b > a || b != b) ? b : a;
}

// ends[e] = first row after expert e (sizes clamped at 0, the running total cut at M), built by one thread: E is
// at most a few hundred, and every CTA needs the whole table.
__device__ void load_expert_ends(const Fp8GroupedQuantParams& p, int64_t* ends) {
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int32_t e = 0; e < p.E; ++e) {
      const int32_t size = p.group_sizes[e];
      total += size > 0 ? size : 0;
      ends[e] = total < p.rows ? total : p.rows;
    }
  }
  __syncthreads();
}

// The expert owning row r (the first e with ends[e] > r; E for rows past the last group).
__device__ __forceinline__ int32_t expert_of_row(const int64_t* ends, int32_t E, int64_t r) {
  int32_t lo = 0, hi = E;
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (ends[mid] <= r) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Calls body(r0, r1) for each kRowsPerCta-row chunk [r0, r1) this CTA owns: a grid-stride loop along grid.y, which
// the launcher caps at kMaxGridY.
template <typename Body>
__device__ __forceinline__ void for_each_row_chunk(int64_t rows, Body body) {
  const int64_t chunks = (rows + kRowsPerCta - 1) / kRowsPerCta;
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t r0 = chunk * kRowsPerCta;
    body(r0, r0 + kRowsPerCta < rows ? r0 + kRowsPerCta : rows);
  }
}

// Non-negative floats order like their bits, so an integer atomicMax is an exact max (and NaN, whose bits are
// above +inf once the sign is cleared, wins): the result does not depend on the order the CTAs arrive in.
__device__ __forceinline__ void flush_amax(const Fp8GroupedQuantParams& p, int32_t e, int64_t c0, const float* m) {
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) {
    const int64_t c = c0 + static_cast<int64_t>(j) * kThreads;
    if (c < p.cols && m[j] != 0.0f)
      atomicMax(reinterpret_cast<unsigned*>(p.scale + e * p.cols + c), __float_as_uint(m[j]));
  }
}

__global__ void __launch_bounds__(kThreads) grouped_amax_kernel(const Fp8GroupedQuantParams p) {
  __shared__ int64_t ends[kQuantGroupedMaxExperts];
  load_expert_ends(p, ends);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kColsPerCta + threadIdx.x;
  for_each_row_chunk(p.rows, [&](int64_t r0, int64_t r1) {
    int32_t e = expert_of_row(ends, p.E, r0);
    float m[kColsPerThread] = {};
    for (int64_t r = r0; r < r1; ++r) {
      if (e < p.E && ends[e] <= r) {  // the chunk crosses into the next non-empty expert
        flush_amax(p, e, c0, m);
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) m[j] = 0.0f;
        e = expert_of_row(ends, p.E, r);
      }
      if (e >= p.E) break;  // rows past sum(group_sizes) belong to nobody
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t c = c0 + static_cast<int64_t>(j) * kThreads;
        if (c < p.cols) m[j] = nan_max(m[j], fabsf(load_element(p.x, p.x_dtype, r * p.cols + c)));
      }
    }
    if (e < p.E) flush_amax(p, e, c0, m);
  });
}

__global__ void __launch_bounds__(kScaleThreads) amax_to_scale_kernel(float* scale, int64_t n, Fp8Kind kind) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kScaleThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kScaleThreads)
    scale[i] = fp8_scale_from_amax(scale[i], kind);
}

__global__ void __launch_bounds__(kThreads) grouped_quantize_kernel(const Fp8GroupedQuantParams p) {
  __shared__ int64_t ends[kQuantGroupedMaxExperts];
  load_expert_ends(p, ends);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kColsPerCta + threadIdx.x;
  for_each_row_chunk(p.rows, [&](int64_t r0, int64_t r1) {
    int32_t e = -1;
    float s[kColsPerThread] = {};
    for (int64_t r = r0; r < r1; ++r) {
      if (e < 0 || (e < p.E && ends[e] <= r)) {
        e = expert_of_row(ends, p.E, r);
        if (e < p.E) {
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) {
            const int64_t c = c0 + static_cast<int64_t>(j) * kThreads;
            s[j] = c < p.cols ? p.scale[e * p.cols + c] : 1.0f;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t c = c0 + static_cast<int64_t>(j) * kThreads;
        if (c >= p.cols) continue;
        const int64_t i = r * p.cols + c;
        p.out[i] = e < p.E ? to_fp8(fp8_scaled_saturated(load_element(p.x, p.x_dtype, i), s[j], p.kind), p.kind) : 0;
      }
    }
  });
}

}  // namespace

Status quantize_fp8_grouped(const Fp8GroupedQuantParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.E < 1 || p.E > kQuantGroupedMaxExperts) return Status::kInvalidArgument;
  if (p.cols == 0) return Status::kOk;
  if (p.x == nullptr && p.rows > 0) return Status::kInvalidArgument;
  if (p.group_sizes == nullptr || p.out == nullptr || p.scale == nullptr) return Status::kInvalidArgument;
  const int64_t n_scales = static_cast<int64_t>(p.E) * p.cols;
  if (cudaMemsetAsync(p.scale, 0, static_cast<size_t>(n_scales) * sizeof(float), stream) != cudaSuccess)
    return Status::kCudaError;
  const int64_t col_ctas = (p.cols + kColsPerCta - 1) / kColsPerCta;
  const int64_t chunks = (p.rows + kRowsPerCta - 1) / kRowsPerCta;
  const dim3 grid(static_cast<unsigned>(col_ctas), static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY));
  if (p.rows > 0) grouped_amax_kernel<<<grid, kThreads, 0, stream>>>(p);
  const int64_t scale_ctas = (n_scales + kScaleThreads - 1) / kScaleThreads;
  amax_to_scale_kernel<<<static_cast<unsigned>(scale_ctas < kMaxGridY ? scale_ctas : kMaxGridY), kScaleThreads, 0,
                         stream>>>(p.scale, n_scales, p.kind);
  if (p.rows > 0) grouped_quantize_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace llama4::kernels
