// Launcher for the K-grouped weight-gradient GEMM on Hopper (grouped_gemm_wgrad_bf16_sm90,
// grouped_gemm_wgrad_fp8_sm90): dw[e] = dy_e^T @ x_e over each expert's contiguous block of rows, with the group
// sizes on the device. The group dimension is the reduction. Legend: M routed rows (sorted by expert), N rows of
// dw (dy's columns), K columns of dw (x's columns), E experts, M_e rows of expert e.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"
#include "grouped_gemm.h"

namespace llama4::kernels {

// FP8 operands are transposed into [N, Mpad] / [K, Mpad] (the reduction contiguous, as FP8 wgmma needs); each
// expert's columns start at a multiple of this many elements, so every group's TMA base address is 16-byte aligned.
inline constexpr int64_t kWgradPadRows = 16;

// The zeroing kernel runs one grid row per expert (gridDim.y).
inline constexpr int64_t kWgradMaxExperts = 65535;

enum class WgradOut : int32_t { kFloat32 = 0, kBFloat16 = 1 };

// Columns of the padded transposed FP8 operands: room for every expert's rows rounded up to kWgradPadRows.
// A pure function of (M, E): the host sizes it without reading the group sizes.
inline int64_t grouped_gemm_wgrad_padded_rows(int64_t M, int64_t E) {
  const int64_t rows = M + E * (kWgradPadRows - 1);
  return (rows + kWgradPadRows - 1) / kWgradPadRows * kWgradPadRows;
}

struct GroupedWgradParams {
  const void* dy;              // [M, N] row-major (N contiguous): rows sorted by expert
  const void* x;               // [M, K] row-major (K contiguous): same rows
  const int32_t* group_sizes;  // [E] int32 on the device: rows owned by each expert, in order (sum <= M)
  int64_t M, N, K;             // rows past sum(group_sizes) are never read
  int32_t E;
  GemmInput input;
  // FP8 only (both null for BF16): per (expert, channel) scales over each expert's rows, applied in the epilogue:
  // dw[e, n, k] = dy_scale[e, n] * x_scale[e, k] * sum_m dy_fp8[m, n] * x_fp8[m, k].
  const float* dy_scale;  // [E, N] contiguous float32
  const float* x_scale;   // [E, K] contiguous float32
  WgradOut out_dtype;
  void* dw;         // [E, N, K] row-major; every element is written (an expert with no rows gets exactly 0)
  void* workspace;  // grouped_gemm_wgrad_workspace_bytes(...) bytes, 256-byte aligned
};

// Device workspace: the per-expert problem shapes / pointers / strides the setup kernel writes, CUTLASS's per-SM
// TMA descriptors, and for FP8 the padded transposed operands ((N + K) * padded_rows bytes). A pure function of its
// arguments (no CUDA call); 0 when there is nothing to compute (E == 0) or the sizes are invalid.
size_t grouped_gemm_wgrad_workspace_bytes(int32_t E, int64_t M, int64_t N, int64_t K, GemmInput input,
                                          WgradOut out_dtype);

// Enqueues dw[e] = dy_e^T @ x_e (fp32 accumulation; FP8: times the per-(expert, channel) scales) for every expert,
// on `stream`, without synchronising the host: a one-block setup kernel, for FP8 a transpose of dy and x into the
// padded K-major layout, the CUTLASS grouped GEMM (experts with rows), and a kernel that zeroes dw[e] of the experts
// with no rows. Deterministic: each dw tile is one CTA's full reduction (no split-K, no atomics). Needs a compute
// capability 9.x device (kUnsupported otherwise). sum(group_sizes) <= M is the caller's contract; if it is broken,
// negative sizes count as 0 and groups are cut at row M. E == 0: kOk without a launch. kInvalidArgument: a null
// pointer, a size out of range, N or K not a multiple of 8 (BF16) / 16 (FP8), a misaligned pointer, BF16 with
// scales or FP8 without them.
Status grouped_gemm_wgrad(const GroupedWgradParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
