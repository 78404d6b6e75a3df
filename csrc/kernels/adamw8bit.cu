// Fused 8-bit AdamW (adamw8bit_step) and blockwise dynamic quantisation on CUDA.
//
// The step is memory-bound (about 14 bytes moved per fp32 parameter, a few flops), so the design
// is about bytes and latency: one warp owns one quantisation block (BS = 32 * I elements, I per
// lane, contiguous so that a lane's loads are 16-byte vectors), the block's new absmax is one
// REDUX.MAX across the warp (no shared memory, no __syncthreads), and each element is read once
// and written once. The two 256-entry maps sit in shared memory for the nearest-code search.
// Legend: n elements, BS block size, B = ceil(n / BS) blocks, I = BS / 32 elements per lane.
#include <cuda_bf16.h>

#include <cstdint>

#include "adamw8bit.h"

namespace llama4::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerCta = 8;  // 256 threads: 8 quantisation blocks per CTA
constexpr int kThreads = kWarpsPerCta * kWarpSize;
constexpr int64_t kMaxGrid = 65535;  // grid-stride beyond: also amortises the map loads
constexpr int kFp32StateItems = 8;   // elements per lane when the state is float32

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads I contiguous elements starting at `first`, as one vector when the whole run is in bounds
// and the base pointer is aligned for it, element by element otherwise (tails, odd views).
template <int I, typename T>
__device__ __forceinline__ void load_run(const T* base, int64_t first, int64_t n, bool vector_ok, T (&out)[I]) {
  if (vector_ok && first + I <= n) {
    const Pack<T, I> pack = *reinterpret_cast<const Pack<T, I>*>(base + first);
#pragma unroll
    for (int j = 0; j < I; ++j) out[j] = pack.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < I; ++j) out[j] = first + j < n ? base[first + j] : T{};
  }
}

template <int I, typename T>
__device__ __forceinline__ void store_run(T* base, int64_t first, int64_t n, bool vector_ok, const T (&in)[I]) {
  if (vector_ok && first + I <= n) {
    Pack<T, I> pack;
#pragma unroll
    for (int j = 0; j < I; ++j) pack.v[j] = in[j];
    *reinterpret_cast<Pack<T, I>*>(base + first) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < I; ++j)
      if (first + j < n) base[first + j] = in[j];
  }
}

// Parameter element types: float, or bf16 carried as its 16 raw bits.
__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(uint16_t x) {
  return adamw::bf16_bits_to_float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x, uint64_t seed, uint64_t step, int64_t index);
template <>
__device__ __forceinline__ float from_float<float>(float x, uint64_t, uint64_t, int64_t) {
  return x;
}
template <>
__device__ __forceinline__ uint16_t from_float<uint16_t>(float x, uint64_t seed, uint64_t step, int64_t index) {
  return adamw::to_bf16_stochastic(x, adamw::random16(seed, step, static_cast<uint64_t>(index)));
}

// Max over the warp of non-negative floats: non-negative IEEE floats order like their bit
// patterns, so one integer REDUX does it, and a NaN (larger bits than +inf) wins.
__device__ __forceinline__ float warp_absmax(float local) {
  return __uint_as_float(__reduce_max_sync(kFullMask, __float_as_uint(local)));
}

bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename ParamT, int I>
__global__ void __launch_bounds__(kThreads) adamw8bit_step_kernel(const AdamW8bitParams p, bool vector_ok) {
  __shared__ float qmap_s[adamw::kQmapSize];
  __shared__ float qmap_u[adamw::kQmapSize];
  for (int i = threadIdx.x; i < adamw::kQmapSize; i += blockDim.x) {
    qmap_s[i] = p.qmap_signed[i];
    qmap_u[i] = p.qmap_unsigned[i];
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_blocks = (p.numel + p.block_size - 1) / p.block_size;
  auto* param = static_cast<ParamT*>(p.param);
  const auto* grad = static_cast<const ParamT*>(p.grad);
  auto* codes_m = static_cast<uint8_t*>(p.exp_avg);
  auto* codes_v = static_cast<uint8_t*>(p.exp_avg_sq);

  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarpSize; blk < num_blocks;
       blk += static_cast<int64_t>(gridDim.x) * kWarpsPerCta) {
    const int64_t first = blk * p.block_size + static_cast<int64_t>(lane) * I;
    ParamT p_raw[I], g_raw[I];
    uint8_t qm[I], qv[I];
    load_run<I>(param, first, p.numel, vector_ok, p_raw);
    load_run<I>(grad, first, p.numel, vector_ok, g_raw);
    load_run<I>(codes_m, first, p.numel, vector_ok, qm);
    load_run<I>(codes_v, first, p.numel, vector_ok, qv);
    const float old_absmax_m = p.absmax_exp_avg[blk];
    const float old_absmax_v = p.absmax_exp_avg_sq[blk];

    float m[I], v[I];
    float local_m = 0.0f, local_v = 0.0f;
#pragma unroll
    for (int j = 0; j < I; ++j) {
      float pj = to_float(p_raw[j]);
      m[j] = qmap_s[qm[j]] * old_absmax_m;
      v[j] = qmap_u[qv[j]] * old_absmax_v;
      adamw::adamw_update(p.scalars, to_float(g_raw[j]), pj, m[j], v[j]);
      p_raw[j] = from_float<ParamT>(pj, p.seed, p.step, first + j);
      if (first + j < p.numel) {  // padding lanes of the last block must not raise the absmax
        local_m = adamw::nan_max(local_m, fabsf(m[j]));
        local_v = adamw::nan_max(local_v, v[j]);
      }
    }
    const float absmax_m = warp_absmax(local_m);
    const float absmax_v = warp_absmax(local_v);
#pragma unroll
    for (int j = 0; j < I; ++j) {
      qm[j] = static_cast<uint8_t>(adamw::quantize_nearest(qmap_s, adamw::normalise(m[j], absmax_m)));
      qv[j] = static_cast<uint8_t>(adamw::quantize_nearest(qmap_u, adamw::normalise(v[j], absmax_v)));
    }
    store_run<I>(param, first, p.numel, vector_ok, p_raw);
    store_run<I>(codes_m, first, p.numel, vector_ok, qm);
    store_run<I>(codes_v, first, p.numel, vector_ok, qv);
    if (lane == 0) {
      p.absmax_exp_avg[blk] = absmax_m;
      p.absmax_exp_avg_sq[blk] = absmax_v;
    }
  }
}

// float32 state: the same update, no quantisation (small tensors and state_dtype="fp32").
template <typename ParamT>
__global__ void __launch_bounds__(kThreads) adamw_fp32_state_kernel(const AdamW8bitParams p, bool vector_ok) {
  constexpr int I = kFp32StateItems;
  auto* param = static_cast<ParamT*>(p.param);
  const auto* grad = static_cast<const ParamT*>(p.grad);
  auto* exp_avg = static_cast<float*>(p.exp_avg);
  auto* exp_avg_sq = static_cast<float*>(p.exp_avg_sq);
  const int64_t runs = (p.numel + I - 1) / I;
  for (int64_t run = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; run < runs;
       run += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = run * I;
    ParamT p_raw[I], g_raw[I];
    float m[I], v[I];
    load_run<I>(param, first, p.numel, vector_ok, p_raw);
    load_run<I>(grad, first, p.numel, vector_ok, g_raw);
    load_run<I>(exp_avg, first, p.numel, vector_ok, m);
    load_run<I>(exp_avg_sq, first, p.numel, vector_ok, v);
#pragma unroll
    for (int j = 0; j < I; ++j) {
      float pj = to_float(p_raw[j]);
      adamw::adamw_update(p.scalars, to_float(g_raw[j]), pj, m[j], v[j]);
      p_raw[j] = from_float<ParamT>(pj, p.seed, p.step, first + j);
    }
    store_run<I>(param, first, p.numel, vector_ok, p_raw);
    store_run<I>(exp_avg, first, p.numel, vector_ok, m);
    store_run<I>(exp_avg_sq, first, p.numel, vector_ok, v);
  }
}

template <typename T, int I>
__global__ void __launch_bounds__(kThreads) quantize_blockwise_kernel(const BlockwiseQuantParams p, bool vector_ok) {
  __shared__ float qmap[adamw::kQmapSize];
  for (int i = threadIdx.x; i < adamw::kQmapSize; i += blockDim.x) qmap[i] = p.qmap[i];
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_blocks = (p.numel + p.block_size - 1) / p.block_size;
  const auto* x = static_cast<const T*>(p.x);
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarpSize; blk < num_blocks;
       blk += static_cast<int64_t>(gridDim.x) * kWarpsPerCta) {
    const int64_t first = blk * p.block_size + static_cast<int64_t>(lane) * I;
    T raw[I];
    load_run<I>(x, first, p.numel, vector_ok, raw);
    float xf[I];
    float local = 0.0f;
#pragma unroll
    for (int j = 0; j < I; ++j) {
      xf[j] = to_float(raw[j]);
      if (first + j < p.numel) local = adamw::nan_max(local, fabsf(xf[j]));
    }
    const float absmax = warp_absmax(local);
    uint8_t q[I];
#pragma unroll
    for (int j = 0; j < I; ++j)
      q[j] = static_cast<uint8_t>(adamw::quantize_nearest(qmap, adamw::normalise(xf[j], absmax)));
    store_run<I>(p.codes, first, p.numel, vector_ok, q);
    if (lane == 0) p.absmax[blk] = absmax;
  }
}

__global__ void __launch_bounds__(kThreads) dequantize_blockwise_kernel(const BlockwiseDequantParams p) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.out[i] = p.qmap[p.codes[i]] * p.absmax[i / p.block_size];
  }
}

unsigned grid_for(int64_t work_items, int64_t per_cta) {
  const int64_t ctas = (work_items + per_cta - 1) / per_cta;
  return static_cast<unsigned>(ctas < 1 ? 1 : (ctas < kMaxGrid ? ctas : kMaxGrid));
}

Status last_status() {
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

template <typename ParamT, int I>
Status launch_quantized(const AdamW8bitParams& p, cudaStream_t stream) {
  const bool vector_ok = aligned_to(p.param, sizeof(ParamT) * I) && aligned_to(p.grad, sizeof(ParamT) * I) &&
                         aligned_to(p.exp_avg, I) && aligned_to(p.exp_avg_sq, I);
  const int64_t blocks = (p.numel + p.block_size - 1) / p.block_size;
  adamw8bit_step_kernel<ParamT, I><<<grid_for(blocks, kWarpsPerCta), kThreads, 0, stream>>>(p, vector_ok);
  return last_status();
}

template <typename ParamT>
Status launch_step(const AdamW8bitParams& p, cudaStream_t stream) {
  if (!p.quantized) {
    const bool vector_ok = aligned_to(p.param, sizeof(ParamT) * kFp32StateItems) &&
                           aligned_to(p.grad, sizeof(ParamT) * kFp32StateItems) &&
                           aligned_to(p.exp_avg, sizeof(float) * kFp32StateItems) &&
                           aligned_to(p.exp_avg_sq, sizeof(float) * kFp32StateItems);
    const int64_t runs = (p.numel + kFp32StateItems - 1) / kFp32StateItems;
    adamw_fp32_state_kernel<ParamT><<<grid_for(runs, kThreads), kThreads, 0, stream>>>(p, vector_ok);
    return last_status();
  }
  switch (p.block_size) {
    case 128: return launch_quantized<ParamT, 4>(p, stream);
    case 256: return launch_quantized<ParamT, 8>(p, stream);
    default: return launch_quantized<ParamT, 16>(p, stream);
  }
}

template <typename T, int I>
Status launch_quantize(const BlockwiseQuantParams& p, cudaStream_t stream) {
  const bool vector_ok = aligned_to(p.x, sizeof(T) * I) && aligned_to(p.codes, I);
  const int64_t blocks = (p.numel + p.block_size - 1) / p.block_size;
  quantize_blockwise_kernel<T, I><<<grid_for(blocks, kWarpsPerCta), kThreads, 0, stream>>>(p, vector_ok);
  return last_status();
}

template <typename T>
Status launch_quantize_typed(const BlockwiseQuantParams& p, cudaStream_t stream) {
  switch (p.block_size) {
    case 128: return launch_quantize<T, 4>(p, stream);
    case 256: return launch_quantize<T, 8>(p, stream);
    default: return launch_quantize<T, 16>(p, stream);
  }
}

}  // namespace

Status adamw8bit_step(const AdamW8bitParams& p, cudaStream_t stream) {
  if (p.numel < 0 || (p.quantized && !adamw_block_size_supported(p.block_size))) return Status::kInvalidArgument;
  if (p.numel == 0) return Status::kOk;
  switch (p.param_dtype) {
    case DType::kFloat32: return launch_step<float>(p, stream);
    case DType::kBFloat16: return launch_step<uint16_t>(p, stream);
    default: return Status::kUnsupported;
  }
}

Status quantize_blockwise(const BlockwiseQuantParams& p, cudaStream_t stream) {
  if (p.numel < 0 || !adamw_block_size_supported(p.block_size)) return Status::kInvalidArgument;
  if (p.numel == 0) return Status::kOk;
  switch (p.dtype) {
    case DType::kFloat32: return launch_quantize_typed<float>(p, stream);
    case DType::kBFloat16: return launch_quantize_typed<uint16_t>(p, stream);
    default: return Status::kUnsupported;
  }
}

Status dequantize_blockwise(const BlockwiseDequantParams& p, cudaStream_t stream) {
  if (p.numel < 0 || p.block_size < 1) return Status::kInvalidArgument;
  if (p.numel == 0) return Status::kOk;
  dequantize_blockwise_kernel<<<grid_for(p.numel, kThreads), kThreads, 0, stream>>>(p);
  return last_status();
}

}  // namespace llama4::kernels
