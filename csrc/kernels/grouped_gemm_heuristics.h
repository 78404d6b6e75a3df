// Which of the compiled grouped-GEMM kernels runs a given problem (see GROUPED_GEMM.md for the table).
// Plain C++ (no CUTLASS): the host knows only M, N, K and E, never the group sizes (they stay on the device).
// Legend: M routed rows, N output width, K depth, E experts.
#pragma once

#include <cstdint>

#include "grouped_gemm.h"

namespace llama4::kernels {

// The kernel instantiations built into grouped_gemm_sm90.cu. Each one costs ~40 s and ~3 GB of compile, so the
// list is short on purpose; add a member here and a config in the .cu together.
enum class GroupedGemmKernel : int32_t {
  kBf16Cooperative = 0,          // 128x256x64 tile, 2 consumer warpgroups on one tile, cluster 1x2
  kBf16Pingpong = 1,             // 64x128x64 tile, 2 consumer warpgroups on alternating tiles, no cluster
  kFp8RowwiseCooperative = 2,    // 128x128x128, fp32 promotion every 128 of K, x/w scales in the epilogue
  kFp8BlockwiseCooperative = 3,  // 128x128x128, 1x128 / 128x128 block scales applied in the main loop
};

// Rows per expert up to which a 128-row tile would be mostly padding: decode and small batches.
inline constexpr int64_t kPingpongMaxRowsPerExpert = 64;
// Depth up to which the main loop is so short that overlapping one tile's epilogue with the next tile's
// main loop (ping-pong) beats the bigger cooperative tile's operand reuse.
inline constexpr int64_t kPingpongMaxK = 256;
// Below this many cooperative tiles the machine is not full (132 SMs on an H100 SXM, 1 CTA each).
inline constexpr int64_t kMinTilesToFillGpu = 132;
// Cooperative BF16 tile (must match the config in grouped_gemm_sm90.cu).
inline constexpr int64_t kBf16CoopTileM = 128;
inline constexpr int64_t kBf16CoopTileN = 256;

// Pick the kernel from what the host knows. Rows per expert is the mean M / E (routing imbalance is unknown here;
// a real distribution only makes some groups larger, which favours the cooperative tile further).
inline GroupedGemmKernel choose_grouped_gemm_kernel(GemmInput input, ScaleKind scale_kind, int64_t M, int32_t E,
                                                    int64_t N, int64_t K) {
  if (input == GemmInput::kFloat8E4M3) {
    return scale_kind == ScaleKind::kBlock128 ? GroupedGemmKernel::kFp8BlockwiseCooperative
                                              : GroupedGemmKernel::kFp8RowwiseCooperative;
  }
  const int64_t experts = E > 0 ? E : 1;
  const int64_t rows_per_expert = (M + experts - 1) / experts;
  if (rows_per_expert <= kPingpongMaxRowsPerExpert || K <= kPingpongMaxK) return GroupedGemmKernel::kBf16Pingpong;
  // Experts that can hold rows at all (at most M of them), times the cooperative tiles each one needs.
  const int64_t busy_experts = M < experts ? M : experts;
  const int64_t coop_tiles = busy_experts * ((rows_per_expert + kBf16CoopTileM - 1) / kBf16CoopTileM) *
                             ((N + kBf16CoopTileN - 1) / kBf16CoopTileN);
  if (coop_tiles < kMinTilesToFillGpu) return GroupedGemmKernel::kBf16Pingpong;
  return GroupedGemmKernel::kBf16Cooperative;
}

}  // namespace llama4::kernels
