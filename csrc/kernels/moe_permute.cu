// MoE dispatch (permute) and combine (unpermute) on CUDA: pure data movement, so the whole game
// is bytes: 16-byte vector accesses when rows allow it, one block per row (or token) so every
// output row is written exactly once by one block, and the K-way combine sums in registers in k
// order (bitwise deterministic, no atomics).
// Legend: T tokens, K top-k, N = T*K slots, D row width, V elements per 16-byte vector.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "moe_permute.h"

namespace llama4::kernels {
namespace {

constexpr int kVectorBytes = 16;           // LDG.128 / STG.128
constexpr int kRowThreads = 128;           // D = 5120 bf16 is 640 vectors: 5 per thread
constexpr int64_t kMaxGridRows = 1 << 20;  // grid-stride beyond this many rows

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads) moe_permute_kernel(const MoePermuteParams p) {
  using VecT = Vec<T, V>;
  const int64_t n = p.num_tokens * p.top_k;
  const int64_t vecs = p.width / V;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const int32_t slot = p.sorted_slots[row];
    const VecT* src = reinterpret_cast<const VecT*>(static_cast<const T*>(p.x) + (slot / p.top_k) * p.x_row_stride);
    VecT* dst = reinterpret_cast<VecT*>(static_cast<T*>(p.out) + row * p.width);
    if (p.slot_weights == nullptr) {
      for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) dst[i] = src[i];
    } else {
      const float w = p.slot_weights[slot];
      for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
        VecT x = src[i];
#pragma unroll
        for (int j = 0; j < V; ++j) x.v[j] = from_float<T>(to_float(x.v[j]) * w);
        dst[i] = x;
      }
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads) moe_unpermute_kernel(const MoeUnpermuteParams p) {
  using VecT = Vec<T, V>;
  const int64_t vecs = p.width / V;
  const int K = p.top_k;
  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    VecT* dst = reinterpret_cast<VecT*>(static_cast<T*>(p.out) + t * p.width);
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
      float acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = 0.0f;
      for (int k = 0; k < K; ++k) {  // k order: deterministic
        const int64_t src_row = p.slot_positions[t * K + k];
        const float w = p.slot_weights != nullptr ? p.slot_weights[t * K + k] : 1.0f;
        const VecT y = reinterpret_cast<const VecT*>(static_cast<const T*>(p.y) + src_row * p.y_row_stride)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += to_float(y.v[j]) * w;
      }
      VecT out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = from_float<T>(acc[j]);
      dst[i] = out;
    }
  }
}

bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVectorBytes == 0;
}

unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGridRows ? rows : kMaxGridRows);
}

template <typename T>
Status launch_permute(const MoePermuteParams& p, cudaStream_t stream) {
  constexpr int V = kVectorBytes / sizeof(T);
  const int64_t rows = p.num_tokens * p.top_k;
  if (rows == 0 || p.width == 0) return Status::kOk;
  const bool vec = p.width % V == 0 && p.x_row_stride % V == 0 && aligned16(p.x) && aligned16(p.out);
  if (vec) {
    moe_permute_kernel<T, V><<<grid_for(rows), kRowThreads, 0, stream>>>(p);
  } else {
    moe_permute_kernel<T, 1><<<grid_for(rows), kRowThreads, 0, stream>>>(p);
  }
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

template <typename T>
Status launch_unpermute(const MoeUnpermuteParams& p, cudaStream_t stream) {
  constexpr int V = kVectorBytes / sizeof(T);
  if (p.num_tokens == 0 || p.width == 0) return Status::kOk;
  const bool vec = p.width % V == 0 && p.y_row_stride % V == 0 && aligned16(p.y) && aligned16(p.out);
  if (vec) {
    moe_unpermute_kernel<T, V><<<grid_for(p.num_tokens), kRowThreads, 0, stream>>>(p);
  } else {
    moe_unpermute_kernel<T, 1><<<grid_for(p.num_tokens), kRowThreads, 0, stream>>>(p);
  }
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace

Status moe_permute(const MoePermuteParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.top_k < 1 || p.width < 0 || p.x_row_stride < 0) return Status::kInvalidArgument;
  switch (p.dtype) {
    case DType::kFloat32: return launch_permute<float>(p, stream);
    case DType::kFloat16: return launch_permute<__half>(p, stream);
    case DType::kBFloat16: return launch_permute<__nv_bfloat16>(p, stream);
  }
  return Status::kInvalidArgument;
}

Status moe_unpermute(const MoeUnpermuteParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.top_k < 1 || p.width < 0 || p.y_row_stride < 0) return Status::kInvalidArgument;
  switch (p.dtype) {
    case DType::kFloat32: return launch_unpermute<float>(p, stream);
    case DType::kFloat16: return launch_unpermute<__half>(p, stream);
    case DType::kBFloat16: return launch_unpermute<__nv_bfloat16>(p, stream);
  }
  return Status::kInvalidArgument;
}

}  // namespace llama4::kernels
