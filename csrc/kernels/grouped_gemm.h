// Launcher for the grouped expert GEMM on Hopper (grouped_gemm_bf16_sm90, grouped_gemm_fp8_sm90):
// out = x @ w[e]^T for each expert's contiguous block of rows, with the group sizes on the device.
// Legend: M routed rows (sorted by expert), N output width, K depth (reduction), E experts.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace llama4::kernels {

enum class GemmInput : int32_t { kBFloat16 = 0, kFloat8E4M3 = 1 };
enum class ScaleKind : int32_t { kNone = 0, kRowAndChannel = 1, kBlock128 = 2 };

// Elements per scale block along K (and along N for the weight's 128x128 blocks).
inline constexpr int64_t kGroupedGemmScaleBlock = 128;
// TMA moves 16-byte rows: K and N must be multiples of this many elements.
inline constexpr int64_t kGroupedGemmAlignBf16 = 8;
inline constexpr int64_t kGroupedGemmAlignFp8 = 16;
// Base addresses of x, w and out must be 16-byte aligned (TMA); the workspace 256-byte aligned.
inline constexpr int64_t kGroupedGemmPtrAlign = 16;
inline constexpr int64_t kGroupedGemmWorkspaceAlign = 256;
// The CUTLASS problem shape holds (M_e, N, K) as int32.
inline constexpr int64_t kGroupedGemmMaxDim = 2147483647;

struct GroupedGemmParams {
  const void* x;               // [M, K] row-major (K contiguous): rows sorted by expert
  const void* w;               // [E, N, K] (K contiguous): each expert's weight in nn.Linear layout
  const int32_t* group_sizes;  // [E] int32 on the device: rows of x owned by each expert, in order (sum <= M)
  int64_t M, N, K;             // M >= 0; rows past sum(group_sizes) are neither read into the result nor written
  int32_t E;
  GemmInput input;
  // FP8 only (BF16 requires kNone):
  //   kNone:          no scales (unit scale); x_scale and w_scale ignored.
  //   kRowAndChannel: x_scale [M] per row, w_scale [E, N] per expert and output channel (applied in the epilogue).
  //   kBlock128:      x_scale [M, ceil(K/128)] per 1x128 block, w_scale [E, ceil(N/128), ceil(K/128)] per
  //                   128x128 block (applied in the main loop, every 128 of K).
  ScaleKind scale_kind;
  const float* x_scale;  // contiguous float32, 4-byte aligned
  const float* w_scale;  // contiguous float32, 4-byte aligned
  void* out;             // [M, N] bfloat16 row-major; only rows [0, sum(group_sizes)) are written
  void* workspace;       // grouped_gemm_workspace_bytes(...) bytes, 256-byte aligned
};

// Device workspace `grouped_gemm` needs: the per-expert problem shapes, pointers and strides that the setup
// kernel writes, plus CUTLASS's per-SM TMA descriptors. A pure function of its arguments (no CUDA call), so a
// fake/meta kernel or a CUDA-graph capture can size it; 0 when there is nothing to compute.
size_t grouped_gemm_workspace_bytes(int32_t E, int64_t M, int64_t N, int64_t K, GemmInput input, ScaleKind scale_kind);

// Enqueues out[m, :] = scales * (x[m, :] @ w[e(m)]^T) for every row m < sum(group_sizes), e(m) the expert owning
// row m, with fp32 accumulation and a bfloat16 result. Two launches on `stream` (a one-block setup kernel, then
// the CUTLASS grouped GEMM); never synchronises the host. Needs a compute capability 9.x device (kUnsupported
// otherwise). sum(group_sizes) <= M is the caller's contract (it cannot be checked without a synchronisation);
// if it is broken, the setup kernel counts negative sizes as 0 and cuts the groups at row M, so no row outside
// [0, M) of x, x_scale or out is ever touched. M == 0 or E == 0: nothing to do, kOk without a launch.
// kInvalidArgument: a null pointer, a size out of range, K or N not a multiple of 8 (BF16) / 16 (FP8), K == 0
// (the caller zero-fills instead), a misaligned pointer, or scales that do not fit the input type.
Status grouped_gemm(const GroupedGemmParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
