// FP8 quantisation kernels (quantize_fp8_sm90, dequantize_fp8_sm90, swiglu_quant_sm90, swiglu_sm90).
// Memory-bound: the design goal is one HBM read and one HBM write per element. A row (or a
// 128-column block) is owned by one CTA (or one warp): its amax is reduced in registers and
// shared memory, then the same CTA re-reads its row, which is still in L2, and writes FP8.
// Legend: M rows, K columns, G = ceil(K / 128) column blocks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "fp8_quant.h"

namespace llama4::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRowThreads = 256;                      // one CTA per row: 8 warps stream a 5120-wide row
constexpr int kBlockWarps = 8;                        // block128: one warp per 128-column block, 8 per CTA
constexpr int kBlockItems = kQuantBlock / kWarpSize;  // 4 columns per lane
constexpr int64_t kMaxGrid = 65535;

__device__ __forceinline__ float load_element(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
}

__device__ __forceinline__ void store_element(void* base, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[i] = v; break;
    case DType::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
  }
}

// The value to quantise at (row, col): x itself, or silu(gate) * up.
__device__ __forceinline__ float source_value(const Fp8QuantParams& p, int64_t row, int64_t col) {
  const int64_t base = row * p.x_row_stride;
  if (!p.swiglu) return load_element(p.x, p.x_dtype, base + col);
  return swiglu_value(load_element(p.x, p.x_dtype, base + col), load_element(p.x, p.x_dtype, base + p.cols + col));
}

__device__ __forceinline__ uint8_t to_fp8(float v, Fp8Kind kind) {
  // Round to nearest even; the value is already saturated, so SATFINITE only guards rounding.
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, kind == Fp8Kind::kE4M3 ? __NV_E4M3 : __NV_E5M2));
}

__device__ __forceinline__ float from_fp8(uint8_t b, Fp8Kind kind) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(b, kind == Fp8Kind::kE4M3 ? __NV_E4M3 : __NV_E5M2);
  return __half2float(__half(h));
}

// max that keeps NaN (fmaxf drops it): a NaN anywhere in a group makes its scale NaN.
__device__ __forceinline__ float nan_max(float a, float b) {
  return (b > a || b != b) ? b : a;
}

__device__ __forceinline__ float warp_amax(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = nan_max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ float cta_amax(float v) {
  __shared__ float partial[kRowThreads / kWarpSize];
  v = warp_amax(v);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) partial[warp] = v;
  __syncthreads();
  float all = partial[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarpSize); ++w) all = nan_max(all, partial[w]);
  __syncthreads();  // partial may be reused by the caller's next row
  return all;
}

__global__ void __launch_bounds__(kRowThreads) quantize_rows_kernel(const Fp8QuantParams p) {
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    float amax = 0.0f;
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) amax = nan_max(amax, fabsf(source_value(p, row, c)));
    const float scale = fp8_scale_from_amax(cta_amax(amax), p.kind);
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x)
      p.out[row * p.cols + c] = to_fp8(fp8_scaled_saturated(source_value(p, row, c), scale, p.kind), p.kind);
    if (threadIdx.x == 0) p.scale[row] = scale;
  }
}

__global__ void __launch_bounds__(kBlockWarps* kWarpSize) quantize_blocks_kernel(const Fp8QuantParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t groups = (p.cols + kQuantBlock - 1) / kQuantBlock;
  const int64_t total = p.rows * groups;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kBlockWarps + threadIdx.x / kWarpSize; g < total;
       g += static_cast<int64_t>(gridDim.x) * kBlockWarps) {
    const int64_t row = g / groups;
    const int64_t col0 = (g % groups) * kQuantBlock + lane * kBlockItems;
    float v[kBlockItems];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kBlockItems; ++j) {
      v[j] = col0 + j < p.cols ? source_value(p, row, col0 + j) : 0.0f;
      amax = nan_max(amax, fabsf(v[j]));
    }
    const float scale = fp8_scale_from_amax(warp_amax(amax), p.kind);
#pragma unroll
    for (int j = 0; j < kBlockItems; ++j)
      if (col0 + j < p.cols) p.out[row * p.cols + col0 + j] = to_fp8(fp8_scaled_saturated(v[j], scale, p.kind), p.kind);
    if (lane == 0) p.scale[g] = scale;
  }
}

// Tensor granularity, pass 1: amax of everything into workspace[0] (zeroed by the launcher).
// Non-negative floats order like their bits, so an integer atomicMax is exact (and NaN wins).
__global__ void __launch_bounds__(kRowThreads) tensor_amax_kernel(const Fp8QuantParams p) {
  float amax = 0.0f;
  const int64_t total = p.rows * p.cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    amax = nan_max(amax, fabsf(source_value(p, i / p.cols, i % p.cols)));
  amax = cta_amax(amax);
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned*>(p.workspace), __float_as_uint(amax));
}

__global__ void __launch_bounds__(kRowThreads) tensor_quantize_kernel(const Fp8QuantParams p) {
  const float scale = fp8_scale_from_amax(p.workspace[0], p.kind);
  const int64_t total = p.rows * p.cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p.out[i] = to_fp8(fp8_scaled_saturated(source_value(p, i / p.cols, i % p.cols), scale, p.kind), p.kind);
  if (blockIdx.x == 0 && threadIdx.x == 0) p.scale[0] = scale;
}

__global__ void __launch_bounds__(kRowThreads) dequantize_kernel(const Fp8DequantParams p) {
  const int64_t total = p.rows * p.cols;
  const int64_t groups = (p.cols + kQuantBlock - 1) / kQuantBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.cols;
    float scale;
    switch (p.granularity) {
      case QuantGranularity::kTensor: scale = p.scale[0]; break;
      case QuantGranularity::kRow: scale = p.scale[row]; break;
      default: scale = p.scale[row * groups + (i % p.cols) / kQuantBlock]; break;
    }
    store_element(p.out, p.out_dtype, i, from_fp8(p.q[i], p.kind) * scale);
  }
}

__global__ void __launch_bounds__(kRowThreads) swiglu_kernel(const SwigluParams p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.cols, col = i % p.cols;
    const int64_t base = row * p.h_row_stride;
    store_element(
        p.out, p.dtype, i,
        swiglu_value(load_element(p.h, p.dtype, base + col), load_element(p.h, p.dtype, base + p.cols + col)));
  }
}

unsigned grid_for(int64_t items, int64_t per_cta) {
  const int64_t ctas = (items + per_cta - 1) / per_cta;
  return static_cast<unsigned>(ctas < 1 ? 1 : (ctas < kMaxGrid ? ctas : kMaxGrid));
}

Status last_status() {
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace

Status quantize_fp8(const Fp8QuantParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.x_row_stride < 0) return Status::kInvalidArgument;
  if (p.granularity == QuantGranularity::kTensor) {
    if (p.workspace == nullptr) return Status::kInvalidArgument;
    if (cudaMemsetAsync(p.workspace, 0, sizeof(float), stream) != cudaSuccess) return Status::kCudaError;
    const int64_t total = p.rows * p.cols;
    if (total > 0) tensor_amax_kernel<<<grid_for(total, kRowThreads * 8), kRowThreads, 0, stream>>>(p);
    tensor_quantize_kernel<<<grid_for(total, kRowThreads * 8), kRowThreads, 0, stream>>>(p);
    return last_status();
  }
  if (p.rows == 0) return Status::kOk;
  if (p.granularity == QuantGranularity::kRow) {
    quantize_rows_kernel<<<grid_for(p.rows, 1), kRowThreads, 0, stream>>>(p);
  } else {
    if (p.cols == 0) return Status::kOk;
    const int64_t groups = p.rows * ((p.cols + kQuantBlock - 1) / kQuantBlock);
    quantize_blocks_kernel<<<grid_for(groups, kBlockWarps), kBlockWarps * kWarpSize, 0, stream>>>(p);
  }
  return last_status();
}

Status dequantize_fp8(const Fp8DequantParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0) return Status::kInvalidArgument;
  if (p.rows * p.cols == 0) return Status::kOk;
  dequantize_kernel<<<grid_for(p.rows * p.cols, kRowThreads * 4), kRowThreads, 0, stream>>>(p);
  return last_status();
}

Status swiglu(const SwigluParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.h_row_stride < 0) return Status::kInvalidArgument;
  if (p.rows * p.cols == 0) return Status::kOk;
  swiglu_kernel<<<grid_for(p.rows * p.cols, kRowThreads * 4), kRowThreads, 0, stream>>>(p);
  return last_status();
}

}  // namespace llama4::kernels
