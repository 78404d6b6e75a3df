// Grouped expert GEMM for Hopper (sm_90a) on CUTLASS 3.x ptr-array grouped kernels (TMA, warp-specialised,
// persistent): grouped_gemm_bf16_sm90 and grouped_gemm_fp8_sm90 (e4m3 on QGMMA; per-row x per-channel scales in
// the epilogue, or 1x128 / 128x128 block scales in the main loop). See GROUPED_GEMM.md.
//
// Legend: M routed rows (sorted by expert), N output width, K depth, E experts = CUTLASS groups, M_e rows of
// expert e, offset_e = sum_{j<e} M_j its first row. Group e computes out[offset_e : offset_e + M_e, :] =
// x[offset_e : offset_e + M_e, :] @ w[e]^T.
//
// Two launches, no host synchronisation: the group sizes never leave the device.
//  1. grouped_gemm_setup_kernel (one block): prefix-sums group_sizes and writes, per expert, the problem shape
//     (M_e, N, K), the operand / output / scale pointers and the strides into the workspace.
//  2. The CUTLASS grouped kernel, whose Arguments point at those device arrays and whose host problem-shape
//     array is nullptr. CUTLASS then launches one persistent CTA per SM (per cluster slot); the group tile
//     scheduler reads the shapes on the device, and a group with M_e = 0 owns zero tiles, so it is never
//     visited: nothing of it is read or written. TMA descriptors are rebuilt per group with dims (M_e, K) and
//     (M_e, N), so loads past a group's last row fill zeros and stores past it are dropped: rows of other
//     groups and rows past sum(group_sizes) are never read into a result nor written.

// CUTLASS's device-side asserts are function calls inside the main loop, and ptxas then serialises the wgmma
// pipeline (warning C7510: a large slowdown). setup.py's nvcc flags do not define NDEBUG, so this file does,
// before any header (nothing here relies on assert).
#ifndef NDEBUG
#define NDEBUG
#endif

#include "grouped_gemm_sm90_common.cuh"  // first after NDEBUG: the CUDA runtime and the shared CUTLASS headers

#include <cstdint>

#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "grouped_gemm.h"
#include "grouped_gemm_heuristics.h"

namespace llama4::kernels {

#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)

namespace {

using namespace cute;
using namespace grouped_sm90;  // constants, epilogues, workspace carving, scan, occupancy (shared with the wgrad)

// ---------------------------------------------------------------------------------------------------------------
// Named constants (the shared ones are in grouped_gemm_sm90_common.cuh).
// ---------------------------------------------------------------------------------------------------------------

// Block-scale granularity: x per 1 row x 128 of K, w per 128 of N x 128 of K (DeepSeek-V3 style).
constexpr int kScaleBlock = static_cast<int>(kGroupedGemmScaleBlock);

// How a config applies scales.
enum class Scaling { kNone, kRowChannel, kBlock };

// ---------------------------------------------------------------------------------------------------------------
// Kernel configurations (one CUTLASS instantiation each; grouped_gemm_heuristics.h picks among them).
// ---------------------------------------------------------------------------------------------------------------

// BF16, large groups: two consumer warpgroups share a 128x256 tile (64x256 fp32 accumulators each: 128 of the
// 232 registers a consumer thread gets), so each operand byte loaded feeds more MMAs than a 128x128 tile; a 1x2
// cluster multicasts each x tile to the two N tiles of the pair.
struct Bf16CooperativeConfig {
  using Element = cutlass::bfloat16_t;
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr Scaling kScaling = Scaling::kNone;
};

// BF16, few rows per expert (decode) or short K: 64-row tiles waste less of the MMA on padding rows, and the two
// consumer warpgroups alternate tiles so one's epilogue hides under the other's main loop. No cluster: small
// groups rarely have two N tiles' worth of work to pair, and weight bandwidth, not x reuse, is what counts here.
struct Bf16PingpongConfig {
  using Element = cutlass::bfloat16_t;
  using TileShape = Shape<_64, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  static constexpr Scaling kScaling = Scaling::kNone;
};

// FP8 with per-row x scales and per-(expert, channel) w scales: the scales factor out of the K sum, so they are
// applied once per output element in the epilogue. Not the FP8FastAccum schedule: promotion every 128 of K costs
// a second set of accumulators (64 + 64 registers per thread at 128x128), which is why the tile is not wider.
struct Fp8RowwiseConfig {
  using Element = cutlass::float_e4m3_t;
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr Scaling kScaling = Scaling::kRowChannel;
};

// FP8 with 1x128 x blocks and 128x128 w blocks: the scales change along K, so the main loop multiplies each
// 128-deep partial sum by x_scale[m, kb] * w_scale[e, nb, kb] before adding it to the fp32 accumulators.
struct Fp8BlockwiseConfig {
  using Element = cutlass::float_e4m3_t;
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr Scaling kScaling = Scaling::kBlock;
};

// ---------------------------------------------------------------------------------------------------------------
// CUTLASS type assembly shared by the configs.
// ---------------------------------------------------------------------------------------------------------------

// ProblemShape (grouped_gemm_sm90_common.cuh): (M_e, N, K) per group.
using ElementOut = cutlass::bfloat16_t;
// A = x_e [M_e, K], K contiguous. B = w_e^T, a K x N matrix stored as w_e [N, K]: "column-major" with K
// contiguous. D = out_e [M_e, N], N contiguous. The pointer tags mark per-group (ptr-array) strides.
using LayoutX = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;
using LayoutOut = cutlass::layout::RowMajor;
constexpr int kAlignOut = 16 / static_cast<int>(sizeof(ElementOut));  // elements per 16-byte TMA unit

// Block-scale layouts: both scale tensors are K-major, matching x_scale [M, K/128] and w_scale [E, N/128, K/128].
using BlockScaleConfig =
    cutlass::detail::Sm90BlockwiseScaleConfig<1, kScaleBlock, kScaleBlock, cute::GMMA::Major::K, cute::GMMA::Major::K>;
using LayoutSFA = decltype(BlockScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(BlockScaleConfig::deduce_layoutSFB());

// out = bf16(w_scale[n] * (x_scale[m] * acc)): the x scale is a column vector of the output tile (one value per
// row m), the w scale a row vector (one per channel n). Alignment 1: the x-scale pointer of a group starts at an
// arbitrary row, so it cannot be loaded as 16-byte vectors.
template <class TileShape>
using RowChannelScaleEpilogue = ScaleEpilogue<TileShape, ElementOut>;

template <class Config>
struct GroupedGemm {
  using Element = typename Config::Element;
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  static constexpr Scaling kScaling = Config::kScaling;
  static constexpr int kAlignIn = 16 / static_cast<int>(sizeof(Element));

  using FusionOp = cute::conditional_t<kScaling == Scaling::kRowChannel, RowChannelScaleEpilogue<TileShape>,
                                       PlainEpilogue<ElementOut>>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccum, ElementAccum, void, LayoutOut*, kAlignOut,
      ElementOut, LayoutOut*, kAlignOut, typename Config::EpilogueSchedule, FusionOp>::CollectiveOp;

  // The block-scaled main loop takes (layout, scale layout) pairs for A and B.
  using MainloopLayoutA = cute::conditional_t<kScaling == Scaling::kBlock, cute::tuple<LayoutX*, LayoutSFA*>, LayoutX*>;
  using MainloopLayoutB = cute::conditional_t<kScaling == Scaling::kBlock, cute::tuple<LayoutW*, LayoutSFB*>, LayoutW*>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, MainloopLayoutA, kAlignIn, Element, MainloopLayoutB,
      kAlignIn, ElementAccum, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Arguments = typename Gemm::Arguments;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  // Each stride is (leading dimension, 1, 0): the setup kernel fills in the leading dimension only.
  static_assert(cute::is_same_v<StrideA, Stride<int64_t, _1, _0>>, "x must be K-contiguous");
  static_assert(cute::is_same_v<StrideB, Stride<int64_t, _1, _0>>, "w must be K-contiguous");
  static_assert(cute::is_same_v<StrideD, Stride<int64_t, _1, _0>>, "out must be N-contiguous");
  static_assert(!cute::is_same_v<StrideA, typename Kernel::StrideA>, "must be a grouped (per-group stride) kernel");
};

// Per-group arrays in the workspace, written by the setup kernel and read by the CUTLASS kernel.
template <class G>
struct GroupArrays {
  ProblemShapeMNK* shapes;
  const typename G::Element** a;
  const typename G::Element** b;
  ElementOut** d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  const ElementScale** scale_a;  // kRowChannel: x_scale + offset_e; kBlock: x_scale + offset_e * ceil(K/128)
  const ElementScale** scale_b;  // kRowChannel: w_scale + e * N;    kBlock: w_scale + e * ceil(N/128) * ceil(K/128)
  LayoutSFA* layout_sfa;         // kBlock only (CUTLASS recomputes them on the device; kept for the API contract)
  LayoutSFB* layout_sfb;
};

// Walks the workspace layout once (base == nullptr only counts bytes): CUTLASS's descriptors, the per-group arrays,
// then (block scales) the per-group scale layouts.
template <class G>
size_t carve_group_arrays(char* base, int64_t E, GroupArrays<G>* out) {
  WorkspaceCarver<G> carver{base};
  GroupArrays<G> g{};
  carver.take_group_arrays(g, E, G::kScaling != Scaling::kNone);
  if (G::kScaling == Scaling::kBlock) {
    carver.take(g.layout_sfa, sizeof(*g.layout_sfa) * static_cast<size_t>(E));
    carver.take(g.layout_sfb, sizeof(*g.layout_sfb) * static_cast<size_t>(E));
  }
  if (out != nullptr) *out = g;
  return carver.offset;
}

template <class G>
size_t workspace_bytes_for(int64_t E) {
  return carve_group_arrays<G>(nullptr, E, nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// Setup kernel.
// ---------------------------------------------------------------------------------------------------------------

struct SetupArgs {
  const void* x;
  const void* w;
  void* out;
  const float* x_scale;  // nullptr: unit scales (FP8 without scales), no scale pointers written
  const float* w_scale;
  const int32_t* group_sizes;
  int64_t M, N, K;
  int32_t E;
  int64_t k_blocks;  // ceil(K / 128)
  int64_t n_blocks;  // ceil(N / 128)
};

// One block. Thread t owns experts [t * per_thread, (t + 1) * per_thread): it sums their sizes, the block scan
// gives its first row, and it writes its experts' entries in order.
template <class G>
__global__ void __launch_bounds__(kSetupThreads) grouped_gemm_setup_kernel(SetupArgs s, GroupArrays<G> g) {
  using Element = typename G::Element;
  __shared__ int64_t warp_totals[kSetupThreads / kWarpSize];

  const int64_t per_thread = (static_cast<int64_t>(s.E) + kSetupThreads - 1) / kSetupThreads;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * per_thread;
  const int64_t last = first + per_thread < s.E ? first + per_thread : s.E;

  int64_t mine = 0;
#pragma unroll 1
  for (int64_t e = first; e < last; ++e) mine += s.group_sizes[e] > 0 ? s.group_sizes[e] : 0;
  int64_t offset = block_inclusive_scan(mine, warp_totals) - mine;  // rows before this thread's first expert

  const Element* x = static_cast<const Element*>(s.x);
  const Element* w = static_cast<const Element*>(s.w);
  ElementOut* out = static_cast<ElementOut*>(s.out);
  // One expert per thread up to E = 256: unrolling would only add code and registers.
#pragma unroll 1
  for (int64_t e = first; e < last; ++e) {
    const int64_t size = s.group_sizes[e] > 0 ? s.group_sizes[e] : 0;
    // Clamp to [0, M): a prefix past M (a broken caller contract) yields empty groups, never an access past x/out.
    const int64_t begin = offset < s.M ? offset : s.M;
    const int64_t rows = size < s.M - begin ? size : s.M - begin;
    offset += size;

    g.shapes[e] = ProblemShapeMNK(static_cast<int>(rows), static_cast<int>(s.N), static_cast<int>(s.K));
    g.a[e] = x + begin * s.K;
    g.b[e] = w + e * s.N * s.K;
    g.d[e] = out + begin * s.N;
    g.stride_a[e] = typename G::StrideA{s.K, _1{}, _0{}};
    g.stride_b[e] = typename G::StrideB{s.K, _1{}, _0{}};
    g.stride_d[e] = typename G::StrideD{s.N, _1{}, _0{}};
    if constexpr (G::kScaling == Scaling::kRowChannel) {
      if (s.x_scale != nullptr) {
        g.scale_a[e] = s.x_scale + begin;
        g.scale_b[e] = s.w_scale + e * s.N;
      }
    } else if constexpr (G::kScaling == Scaling::kBlock) {
      g.scale_a[e] = s.x_scale + begin * s.k_blocks;
      g.scale_b[e] = s.w_scale + e * s.n_blocks * s.k_blocks;
      const auto mnkl = make_shape(static_cast<int>(rows), static_cast<int>(s.N), static_cast<int>(s.K), 1);
      g.layout_sfa[e] = BlockScaleConfig::tile_atom_to_shape_SFA(mnkl);
      g.layout_sfb[e] = BlockScaleConfig::tile_atom_to_shape_SFB(mnkl);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch.
// ---------------------------------------------------------------------------------------------------------------

template <class G>
Status run(const GroupedGemmParams& p, int device, int sm_count, cudaStream_t stream) {
  GroupArrays<G> g{};
  carve_group_arrays<G>(static_cast<char*>(p.workspace), p.E, &g);

  const bool unit_scales = G::kScaling == Scaling::kRowChannel && p.scale_kind == ScaleKind::kNone;
  SetupArgs s{};
  s.x = p.x;
  s.w = p.w;
  s.out = p.out;
  s.x_scale = unit_scales ? nullptr : p.x_scale;
  s.w_scale = unit_scales ? nullptr : p.w_scale;
  s.group_sizes = p.group_sizes;
  s.M = p.M;
  s.N = p.N;
  s.K = p.K;
  s.E = p.E;
  s.k_blocks = (p.K + kGroupedGemmScaleBlock - 1) / kGroupedGemmScaleBlock;
  s.n_blocks = (p.N + kGroupedGemmScaleBlock - 1) / kGroupedGemmScaleBlock;
  grouped_gemm_setup_kernel<G><<<1, kSetupThreads, 0, stream>>>(s, g);
  if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;

  typename G::Arguments args{};
  set_group_arrays<G>(args, p.E, g);  // device-side shapes: a persistent grid, no host synchronisation
  if constexpr (G::kScaling == Scaling::kBlock) {
    args.mainloop.ptr_SFA = g.scale_a;
    args.mainloop.layout_SFA = g.layout_sfa;
    args.mainloop.ptr_SFB = g.scale_b;
    args.mainloop.layout_SFB = g.layout_sfb;
  } else if constexpr (cute::is_same_v<typename G::Element, cutlass::float_e4m3_t>) {
    args.mainloop.mma_promotion_interval = kFp8PromotionInterval;
  }
  if constexpr (G::kScaling == Scaling::kRowChannel) {
    // EVT arguments mirror the tree: op_0 = w-scale row broadcast, op_1 = (x-scale column broadcast * acc).
    // Null pointer arrays (FP8 without scales) fall back to the broadcast's null_default, here 1.
    auto& evt = args.epilogue.thread;
    evt.op_0.ptr_row = unit_scales ? nullptr : g.scale_b;
    evt.op_0.null_default = ElementScale(1);
    evt.op_1.op_0.ptr_col = unit_scales ? nullptr : g.scale_a;
    evt.op_1.op_0.null_default = ElementScale(1);
  } else {
    args.epilogue.thread.alpha = ElementAccum(1);
    args.epilogue.thread.beta = ElementAccum(0);
  }
  // Along M: the CTAs of a wave walk a group's row tiles for the same N tile first, so each weight tile is read
  // from HBM once and re-used from L2 by all of the group's row tiles (the weights dominate the bytes in MoE).
  set_persistent_schedule<G>(args, device, sm_count);

  const Status status = run_cutlass<G>(args, p.workspace, stream);
  if (status != Status::kOk) return status;
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

using Bf16Cooperative = GroupedGemm<Bf16CooperativeConfig>;
using Bf16Pingpong = GroupedGemm<Bf16PingpongConfig>;
using Fp8Rowwise = GroupedGemm<Fp8RowwiseConfig>;
using Fp8Blockwise = GroupedGemm<Fp8BlockwiseConfig>;

// Everything the launcher can check without touching the device. Same rules for sizing and launching.
Status validate_sizes(int32_t E, int64_t M, int64_t N, int64_t K, GemmInput input, ScaleKind scale_kind) {
  if (input != GemmInput::kBFloat16 && input != GemmInput::kFloat8E4M3) return Status::kInvalidArgument;
  if (scale_kind != ScaleKind::kNone && scale_kind != ScaleKind::kRowAndChannel && scale_kind != ScaleKind::kBlock128)
    return Status::kInvalidArgument;
  if (input == GemmInput::kBFloat16 && scale_kind != ScaleKind::kNone) return Status::kInvalidArgument;
  if (E < 0 || M < 0 || N < 1 || K < 1 || N > kGroupedGemmMaxDim || K > kGroupedGemmMaxDim)
    return Status::kInvalidArgument;
  // TMA moves whole 16-byte units: every row of x, w and out must start 16-byte aligned.
  const int64_t align = input == GemmInput::kFloat8E4M3 ? kGroupedGemmAlignFp8 : kGroupedGemmAlignBf16;
  if (N % align != 0 || K % align != 0) return Status::kInvalidArgument;
  // int64 element offsets: E * N * K, M * K and M * N must be addressable; the block-scale layouts index with int32.
  if ((E > 0 && N > INT64_MAX / K / E) || M > INT64_MAX / K || M > INT64_MAX / N) return Status::kInvalidArgument;
  if (scale_kind == ScaleKind::kBlock128) {
    const int64_t k_blocks = (K + kGroupedGemmScaleBlock - 1) / kGroupedGemmScaleBlock;
    const int64_t n_blocks = (N + kGroupedGemmScaleBlock - 1) / kGroupedGemmScaleBlock;
    if (M > kGroupedGemmMaxDim / k_blocks || n_blocks > kGroupedGemmMaxDim / k_blocks) return Status::kInvalidArgument;
  }
  return Status::kOk;
}

}  // namespace

size_t grouped_gemm_workspace_bytes(int32_t E, int64_t M, int64_t N, int64_t K, GemmInput input, ScaleKind scale_kind) {
  if (validate_sizes(E, M, N, K, input, scale_kind) != Status::kOk || M == 0 || E == 0) return 0;
  switch (choose_grouped_gemm_kernel(input, scale_kind, M, E, N, K)) {
    case GroupedGemmKernel::kBf16Cooperative: return workspace_bytes_for<Bf16Cooperative>(E);
    case GroupedGemmKernel::kBf16Pingpong: return workspace_bytes_for<Bf16Pingpong>(E);
    case GroupedGemmKernel::kFp8RowwiseCooperative: return workspace_bytes_for<Fp8Rowwise>(E);
    case GroupedGemmKernel::kFp8BlockwiseCooperative: return workspace_bytes_for<Fp8Blockwise>(E);
  }
  return 0;
}

Status grouped_gemm(const GroupedGemmParams& p, cudaStream_t stream) {
  const Status sizes = validate_sizes(p.E, p.M, p.N, p.K, p.input, p.scale_kind);
  if (sizes != Status::kOk) return sizes;
  if (p.M == 0 || p.E == 0) return Status::kOk;  // no row belongs to any group: nothing to read or write
  if (p.x == nullptr || p.w == nullptr || p.out == nullptr || p.group_sizes == nullptr || p.workspace == nullptr)
    return Status::kInvalidArgument;
  if (!is_aligned(p.x, kGroupedGemmPtrAlign) || !is_aligned(p.w, kGroupedGemmPtrAlign) ||
      !is_aligned(p.out, kGroupedGemmPtrAlign) || !is_aligned(p.workspace, kGroupedGemmWorkspaceAlign) ||
      !is_aligned(p.group_sizes, sizeof(int32_t)))
    return Status::kInvalidArgument;
  if (p.scale_kind != ScaleKind::kNone) {
    if (p.x_scale == nullptr || p.w_scale == nullptr) return Status::kInvalidArgument;
    if (!is_aligned(p.x_scale, sizeof(float)) || !is_aligned(p.w_scale, sizeof(float))) return Status::kInvalidArgument;
  }

  int device = 0;
  int sm_count = 0;
  const Status device_status = query_hopper_device(&device, &sm_count);
  if (device_status != Status::kOk) return device_status;

  switch (choose_grouped_gemm_kernel(p.input, p.scale_kind, p.M, p.E, p.N, p.K)) {
    case GroupedGemmKernel::kBf16Cooperative: return run<Bf16Cooperative>(p, device, sm_count, stream);
    case GroupedGemmKernel::kBf16Pingpong: return run<Bf16Pingpong>(p, device, sm_count, stream);
    case GroupedGemmKernel::kFp8RowwiseCooperative: return run<Fp8Rowwise>(p, device, sm_count, stream);
    case GroupedGemmKernel::kFp8BlockwiseCooperative: return run<Fp8Blockwise>(p, device, sm_count, stream);
  }
  return Status::kUnsupported;
}

#else  // CUTLASS without modifiable TMA descriptors (CUDA < 12.3): nothing to run the grouped kernels with.

size_t grouped_gemm_workspace_bytes(int32_t, int64_t, int64_t, int64_t, GemmInput, ScaleKind) {
  return 0;
}

Status grouped_gemm(const GroupedGemmParams&, cudaStream_t) {
  return Status::kUnsupported;
}

#endif

}  // namespace llama4::kernels
