// K-grouped weight-gradient GEMM for Hopper (sm_90a) on the CUTLASS 3.x ptr-array grouped kernels:
// grouped_gemm_wgrad_bf16_sm90 and grouped_gemm_wgrad_fp8_sm90. See GROUPED_GEMM.md ("Weight gradient").
//
// Legend: M routed rows (sorted by expert), N rows of dw (dy's columns), K columns of dw (x's columns), E experts =
// CUTLASS groups, M_e rows of expert e, offset_e = sum_{j<e} M_j its first row, P padded rows of the FP8 transposes,
// poffset_e = sum_{j<e} roundup(M_e, 16) its first padded column. Group e computes the GEMM
// (M', N', K') = (N, K, M_e): dw[e] = dy_e^T @ x_e, the reduction running over the expert's rows.
//
// No host synchronisation: the group sizes never leave the device.
//  1. wgrad_setup_kernel (one block): prefix sums of the (clamped) sizes and of the padded sizes, then per expert
//     the problem shape, the operand / output / scale pointers and the strides. An expert with no rows gets the
//     empty problem (0, K, 0): zero tiles, so CUTLASS never visits it (its accumulators would never be written).
//  2. FP8 only: wgrad_transpose_fp8_kernel writes dy^T [N, P] and x^T [K, P] (the reduction contiguous, as FP8
//     wgmma needs K-major operands), each expert's columns at poffset_e (16-byte aligned TMA bases), padding zero.
//  3. The CUTLASS grouped GEMM (persistent, one CTA per SM or per cluster slot, tile scheduler on device shapes).
//  4. wgrad_zero_empty_kernel: dw[e] = 0 for each expert with no rows, so every element of dw is written.
//
// BF16 needs no transpose: wgmma reads 16-bit operands MN-major from shared memory, so A = dy_e^T is dy_e itself
// read as a column-major N x M_e matrix and B = x_e^T as a row-major (N-contiguous) one. That saves a read and a
// write of dy and x (~0.26 ms per Scout layer at HBM speed, ~11 % of the BF16 GEMM) and needs no padding, since
// dy + offset_e * N is 16-byte aligned whenever N is a multiple of 8. The BF16 kernels are new instantiations
// anyway (their layouts and their fp32 output differ from the forward's), so MN-major costs no extra build time.

// CUTLASS's device-side asserts serialise the wgmma pipeline (ptxas C7510); setup.py does not define NDEBUG.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "grouped_gemm_sm90_common.cuh"  // first after NDEBUG: the CUDA runtime and the shared CUTLASS headers

#include <cstdint>
#include <tuple>

#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "grouped_gemm_wgrad.h"

namespace llama4::kernels {

#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)

namespace {

using namespace cute;
using namespace grouped_sm90;  // constants, epilogues, workspace carving, scan, occupancy (shared with the forward)

// ---------------------------------------------------------------------------------------------------------------
// Named constants (the shared ones, kSetupThreads to kFp8PromotionInterval, are in grouped_gemm_sm90_common.cuh).
// ---------------------------------------------------------------------------------------------------------------

// Transpose tile: 64 padded rows x 64 channels per block, moved as 16-byte vectors (one per thread in each phase).
constexpr int kTransposeTile = 64;
constexpr int kTransposeThreads = 256;
constexpr int kVecBytes = 16;
constexpr int kVecsPerTileRow = kTransposeTile / kVecBytes;
// A shared-memory row of the tile is padded by one vector so the column gathers of the write phase spread banks.
constexpr int kTransposeSmemRow = kTransposeTile + kVecBytes;
// CUDA's limit on gridDim.y: the transpose loops over channel tiles past it (the zeroing kernel's grid.y is E, hence
// kWgradMaxExperts).
constexpr int64_t kMaxGridY = 65535;
// Zeroing the experts with no rows: blocks per expert (grid-stride inside), 16 bytes per thread per step.
constexpr int kZeroThreads = 256;
constexpr int kZeroBlocksPerExpert = 64;

static_assert(kTransposeTile * kVecsPerTileRow == kTransposeThreads, "one 16-byte vector per thread per phase");
static_assert(kWgradPadRows % kVecBytes == 0, "padded FP8 columns must start on 16-byte boundaries");

// ---------------------------------------------------------------------------------------------------------------
// Kernel configurations: one CUTLASS instantiation per (input, output dtype); the tile is fixed per input.
// ---------------------------------------------------------------------------------------------------------------

// BF16: the forward's cooperative 128x256x64 tile (two consumer warpgroups, 64x256 fp32 accumulators each) with a
// 1x2 cluster multicasting each dy^T tile to the two K tiles of the pair. Operands MN-major straight from dy and x.
template <class Out>
struct Bf16WgradConfig {
  using Element = cutlass::bfloat16_t;
  using ElementOut = Out;
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_1, _2, _1>;
  using LayoutA = cutlass::layout::ColumnMajor;  // dy_e [M_e, N] read as the N x M_e matrix dy_e^T: N contiguous
  using LayoutB = cutlass::layout::RowMajor;     // x_e [M_e, K] read as B (K x M_e in (N', K') order): K contiguous
  static constexpr bool kScaled = false;
};

// FP8: the forward's 128x128x128 cooperative tile with fp32 promotion (a second accumulator set is why the tile is
// not wider), K-major operands from the padded transposes, per-(expert, channel) scales in the epilogue.
template <class Out>
struct Fp8WgradConfig {
  using Element = cutlass::float_e4m3_t;
  using ElementOut = Out;
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _2, _1>;
  using LayoutA = cutlass::layout::RowMajor;     // dy^T [N, P]: the reduction contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // x^T [K, P]: the reduction contiguous
  static constexpr bool kScaled = true;
};

// ---------------------------------------------------------------------------------------------------------------
// CUTLASS type assembly.
// ---------------------------------------------------------------------------------------------------------------

// ProblemShape (grouped_gemm_sm90_common.cuh): (N, K, M_e) per group.
using LayoutOut = cutlass::layout::RowMajor;  // dw[e] [N, K], K contiguous

// dw = out(x_scale[k] * (dy_scale[n] * acc)): dy's scale is a column vector of the output tile (one per row n), x's
// a row vector (one per column k); both through arrays of per-group pointers (the tile's group picks the expert).
// dw = out(acc) without scales (PlainEpilogue): the gradient is written, never accumulated into.
template <class TileShape, class ElementOut>
using WgradScaleEpilogue = ScaleEpilogue<TileShape, ElementOut>;

template <class Config>
struct GroupedWgrad {
  using Element = typename Config::Element;
  using ElementOut = typename Config::ElementOut;
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  static constexpr bool kScaled = Config::kScaled;
  static constexpr int kAlignIn = 16 / static_cast<int>(sizeof(Element));
  static constexpr int kAlignOut = 16 / static_cast<int>(sizeof(ElementOut));

  using FusionOp = cute::conditional_t<kScaled, WgradScaleEpilogue<TileShape, ElementOut>, PlainEpilogue<ElementOut>>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccum, ElementAccum, void, LayoutOut*, kAlignOut,
      ElementOut, LayoutOut*, kAlignOut, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, typename Config::LayoutA*, kAlignIn, Element,
      typename Config::LayoutB*, kAlignIn, ElementAccum, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Arguments = typename Gemm::Arguments;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  static_assert(cute::is_same_v<StrideD, Stride<int64_t, _1, _0>>, "dw must be K-contiguous");
  static_assert(!cute::is_same_v<StrideA, typename Kernel::StrideA>, "must be a grouped (per-group stride) kernel");
};

// Per-group arrays in the workspace, written by the setup kernel and read by the CUTLASS kernel.
template <class G>
struct GroupArrays {
  ProblemShapeMNK* shapes;
  const typename G::Element** a;
  const typename G::Element** b;
  typename G::ElementOut** d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  const ElementScale** scale_a;  // FP8: dy_scale + e * N (one per row n of dw[e])
  const ElementScale** scale_b;  // FP8: x_scale + e * K (one per column k of dw[e])
};

// Per-expert bookkeeping shared by the transpose and zeroing kernels (int64: row totals may pass 2^31).
struct ExpertRows {
  int64_t* row_begin;  // [E] first row of expert e in dy / x (clamped to M)
  int64_t* pad_begin;  // [E + 1] first padded column of expert e in the FP8 transposes; pad_begin[E] = used columns
  int32_t* rows;       // [E] rows of expert e after clamping (0: dw[e] is zeroed)
};

// Walks the workspace layout once (base == nullptr only counts bytes): CUTLASS's descriptors, the per-group arrays,
// the per-expert rows, then (FP8) the transposes dy^T [N, P] and x^T [K, P].
template <class G>
size_t carve_workspace(char* base, int64_t E, int64_t N, int64_t K, int64_t padded_rows, GroupArrays<G>* arrays,
                       ExpertRows* experts, void** dy_t, void** x_t) {
  WorkspaceCarver<G> carver{base};
  const size_t groups = static_cast<size_t>(E);
  GroupArrays<G> g{};
  carver.take_group_arrays(g, E, G::kScaled);
  ExpertRows r{};
  carver.take(r.row_begin, sizeof(int64_t) * groups);
  carver.take(r.pad_begin, sizeof(int64_t) * (groups + 1));
  carver.take(r.rows, sizeof(int32_t) * groups);
  char* dyt = nullptr;
  char* xt = nullptr;
  if (G::kScaled) {
    carver.take(dyt, static_cast<size_t>(N) * static_cast<size_t>(padded_rows) * sizeof(typename G::Element));
    carver.take(xt, static_cast<size_t>(K) * static_cast<size_t>(padded_rows) * sizeof(typename G::Element));
  }
  if (arrays != nullptr) *arrays = g;
  if (experts != nullptr) *experts = r;
  if (dy_t != nullptr) *dy_t = dyt;
  if (x_t != nullptr) *x_t = xt;
  return carver.offset;
}

template <class G>
size_t workspace_bytes_for(int64_t E, int64_t M, int64_t N, int64_t K) {
  return carve_workspace<G>(nullptr, E, N, K, grouped_gemm_wgrad_padded_rows(M, E), nullptr, nullptr, nullptr, nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// Setup kernel.
// ---------------------------------------------------------------------------------------------------------------

struct SetupArgs {
  const void* a_base;  // BF16: dy [M, N]; FP8: dy^T [N, P]
  const void* b_base;  // BF16: x [M, K];  FP8: x^T [K, P]
  void* dw;
  const float* dy_scale;
  const float* x_scale;
  const int32_t* group_sizes;
  int64_t M, N, K, padded_rows;
  int32_t E;
};

// block_inclusive_scan (grouped_gemm_sm90_common.cuh) between two barriers, so it can be called back to back on
// the same warp_totals.
__device__ __forceinline__ int64_t block_inclusive_scan_fenced(int64_t v, int64_t* warp_totals) {
  __syncthreads();
  const int64_t result = block_inclusive_scan(v, warp_totals);
  __syncthreads();
  return result;
}

__device__ __forceinline__ int64_t round_up_pad(int64_t rows) {
  return (rows + kWgradPadRows - 1) / kWgradPadRows * kWgradPadRows;
}

// One block. Thread t owns experts [t * per_thread, (t + 1) * per_thread): a first scan of the sizes gives each
// expert its first row (clamped to [0, M) against a broken sum(group_sizes) <= M contract), a second scan of the
// padded clamped sizes its first padded column; then the thread writes its experts' entries in order.
template <class G>
__global__ void __launch_bounds__(kSetupThreads) wgrad_setup_kernel(SetupArgs s, GroupArrays<G> g, ExpertRows r) {
  using Element = typename G::Element;
  using ElementOut = typename G::ElementOut;
  __shared__ int64_t warp_totals[kSetupThreads / kWarpSize];

  const int64_t per_thread = (static_cast<int64_t>(s.E) + kSetupThreads - 1) / kSetupThreads;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * per_thread;
  const int64_t last = first + per_thread < s.E ? first + per_thread : s.E;
  auto size_of = [&](int64_t e) -> int64_t { return s.group_sizes[e] > 0 ? s.group_sizes[e] : 0; };

  int64_t mine = 0;
#pragma unroll 1
  for (int64_t e = first; e < last; ++e) mine += size_of(e);
  const int64_t row_start = block_inclusive_scan_fenced(mine, warp_totals) - mine;

  auto clamped_rows = [&](int64_t begin_unclamped, int64_t size) -> int64_t {
    const int64_t begin = begin_unclamped < s.M ? begin_unclamped : s.M;
    return size < s.M - begin ? size : s.M - begin;
  };
  int64_t mine_padded = 0;
  int64_t offset = row_start;
#pragma unroll 1
  for (int64_t e = first; e < last; ++e) {
    mine_padded += round_up_pad(clamped_rows(offset, size_of(e)));
    offset += size_of(e);
  }
  const int64_t pad_start = block_inclusive_scan_fenced(mine_padded, warp_totals) - mine_padded;
  if (threadIdx.x == kSetupThreads - 1) r.pad_begin[s.E] = pad_start + mine_padded;

  const Element* a_base = static_cast<const Element*>(s.a_base);
  const Element* b_base = static_cast<const Element*>(s.b_base);
  ElementOut* dw = static_cast<ElementOut*>(s.dw);
  offset = row_start;
  int64_t pad = pad_start;
#pragma unroll 1
  for (int64_t e = first; e < last; ++e) {
    const int64_t size = size_of(e);
    const int64_t begin = offset < s.M ? offset : s.M;
    const int64_t rows = clamped_rows(offset, size);
    offset += size;
    r.row_begin[e] = begin;
    r.pad_begin[e] = pad;
    r.rows[e] = static_cast<int32_t>(rows);

    // An expert with no rows gets zero tiles (M' = 0): CUTLASS never visits it, the zeroing kernel writes dw[e].
    g.shapes[e] = ProblemShapeMNK(rows > 0 ? static_cast<int>(s.N) : 0, static_cast<int>(s.K), static_cast<int>(rows));
    if constexpr (G::kScaled) {
      // K-major transposes: the group's reduction columns start at its padded offset; leading dimension P.
      g.a[e] = a_base + pad;
      g.b[e] = b_base + pad;
      g.stride_a[e] = typename G::StrideA{s.padded_rows, _1{}, _0{}};
      g.stride_b[e] = typename G::StrideB{s.padded_rows, _1{}, _0{}};
      g.scale_a[e] = s.dy_scale + e * s.N;
      g.scale_b[e] = s.x_scale + e * s.K;
    } else {
      // MN-major: dy_e^T is dy_e [M_e, N] (N contiguous, leading dimension N), x_e^T is x_e (leading dimension K).
      g.a[e] = a_base + begin * s.N;
      g.b[e] = b_base + begin * s.K;
      g.stride_a[e] = typename G::StrideA{_1{}, s.N, _0{}};
      g.stride_b[e] = typename G::StrideB{_1{}, s.K, _0{}};
    }
    g.d[e] = dw + e * s.N * s.K;
    g.stride_d[e] = typename G::StrideD{s.K, _1{}, _0{}};
    pad += round_up_pad(rows);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// FP8 transpose into the padded K-major layout, and the zeroing of empty experts.
// ---------------------------------------------------------------------------------------------------------------

// The expert whose padded columns hold column p: the e with pad_begin[e] <= p < pad_begin[e + 1] (empty experts
// have an empty range and are skipped), or E for p past the last expert.
__device__ __forceinline__ int32_t expert_of_padded_column(const int64_t* pad_begin, int32_t E, int64_t p) {
  int32_t lo = 0, hi = E;  // count of e in [1, E] with pad_begin[e] <= p
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (pad_begin[mid] <= p) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// dst [C, P] = src [M, C]^T with expert e's rows at columns [pad_begin[e], pad_begin[e] + rows[e]) and zeros in
// every other column. One block per 64 x 64 tile: coalesced 16-byte loads of 64 source rows into shared memory,
// then 16-byte stores of 64 destination rows gathered from its columns (a byte copy: FP8 codes are not changed).
__global__ void __launch_bounds__(kTransposeThreads)
    wgrad_transpose_fp8_kernel(const uint8_t* __restrict__ src, int64_t C, ExpertRows r, int32_t E, int64_t P,
                               uint8_t* __restrict__ dst) {
  __shared__ __align__(16) uint8_t tile[kTransposeTile][kTransposeSmemRow];
  const int tid = threadIdx.x;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTransposeTile;
  const int64_t c_tiles = (C + kTransposeTile - 1) / kTransposeTile;

  // The source row of this thread's padded column is fixed across channel tiles.
  const int load_p = tid / kVecsPerTileRow;
  const int load_v = tid % kVecsPerTileRow;
  const int64_t p = p0 + load_p;
  int64_t src_row = -1;
  if (p < P) {
    const int32_t e = expert_of_padded_column(r.pad_begin, E, p);
    if (e < E && p - r.pad_begin[e] < r.rows[e]) src_row = r.row_begin[e] + (p - r.pad_begin[e]);
  }

#pragma unroll 1
  for (int64_t ct = blockIdx.y; ct < c_tiles; ct += gridDim.y) {
    const int64_t c0 = ct * kTransposeTile;
    const int64_t c = c0 + load_v * kVecBytes;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (src_row >= 0 && c < C) v = *reinterpret_cast<const uint4*>(src + src_row * C + c);
    *reinterpret_cast<uint4*>(&tile[load_p][load_v * kVecBytes]) = v;
    __syncthreads();

    const int store_c = tid / kVecsPerTileRow;
    const int store_v = tid % kVecsPerTileRow;
    const int64_t cc = c0 + store_c;
    const int64_t pp = p0 + store_v * kVecBytes;
    if (cc < C && pp < P) {  // P is a multiple of 16, so a vector is either wholly inside or wholly past it
      alignas(16) uint8_t bytes[kVecBytes];
#pragma unroll
      for (int j = 0; j < kVecBytes; ++j) bytes[j] = tile[store_v * kVecBytes + j][store_c];
      *reinterpret_cast<uint4*>(dst + cc * P + pp) = *reinterpret_cast<const uint4*>(bytes);
    }
    __syncthreads();
  }
}

// dw[e] = 0 for every expert with no rows (grid.y = expert): CUTLASS writes nothing for a group with no tiles.
__global__ void __launch_bounds__(kZeroThreads)
    wgrad_zero_empty_kernel(const int32_t* __restrict__ rows, int64_t vecs_per_expert, uint4* __restrict__ dw) {
  const int64_t e = blockIdx.y;
  if (rows[e] != 0) return;
  uint4* out = dw + e * vecs_per_expert;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kZeroThreads + threadIdx.x; i < vecs_per_expert;
       i += static_cast<int64_t>(gridDim.x) * kZeroThreads)
    out[i] = zero;
}

// ---------------------------------------------------------------------------------------------------------------
// Launch.
// ---------------------------------------------------------------------------------------------------------------

template <class G>
Status run(const GroupedWgradParams& p, int device, int sm_count, cudaStream_t stream) {
  const int64_t padded_rows = grouped_gemm_wgrad_padded_rows(p.M, p.E);
  GroupArrays<G> g{};
  ExpertRows r{};
  void* dy_t = nullptr;
  void* x_t = nullptr;
  carve_workspace<G>(static_cast<char*>(p.workspace), p.E, p.N, p.K, padded_rows, &g, &r, &dy_t, &x_t);

  SetupArgs s{};
  s.a_base = G::kScaled ? dy_t : p.dy;
  s.b_base = G::kScaled ? x_t : p.x;
  s.dw = p.dw;
  s.dy_scale = p.dy_scale;
  s.x_scale = p.x_scale;
  s.group_sizes = p.group_sizes;
  s.M = p.M;
  s.N = p.N;
  s.K = p.K;
  s.padded_rows = padded_rows;
  s.E = p.E;
  wgrad_setup_kernel<G><<<1, kSetupThreads, 0, stream>>>(s, g, r);
  if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;

  if constexpr (G::kScaled) {
    const int64_t p_tiles = padded_rows / kTransposeTile + (padded_rows % kTransposeTile != 0);
    for (const auto& [src, cols, dst] : {std::tuple{p.dy, p.N, dy_t}, std::tuple{p.x, p.K, x_t}}) {
      const int64_t c_tiles = (cols + kTransposeTile - 1) / kTransposeTile;
      const dim3 grid(static_cast<unsigned>(p_tiles), static_cast<unsigned>(c_tiles < kMaxGridY ? c_tiles : kMaxGridY));
      wgrad_transpose_fp8_kernel<<<grid, kTransposeThreads, 0, stream>>>(static_cast<const uint8_t*>(src), cols, r, p.E,
                                                                         padded_rows, static_cast<uint8_t*>(dst));
      if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;
    }
  }

  typename G::Arguments args{};
  set_group_arrays<G>(args, p.E, g);  // device-side shapes: a persistent grid, no host synchronisation
  if constexpr (G::kScaled) args.mainloop.mma_promotion_interval = kFp8PromotionInterval;
  if constexpr (G::kScaled) {
    // EVT arguments mirror the tree: op_0 = x-scale row broadcast, op_1 = (dy-scale column broadcast * acc).
    auto& evt = args.epilogue.thread;
    evt.op_0.ptr_row = g.scale_b;
    evt.op_0.null_default = ElementScale(1);
    evt.op_1.op_0.ptr_col = g.scale_a;
    evt.op_1.op_0.null_default = ElementScale(1);
  } else {
    args.epilogue.thread.alpha = ElementAccum(1);
    args.epilogue.thread.beta = ElementAccum(0);
  }
  // Along M (dw's rows): the CTAs of a wave share the same x^T tile and walk dy^T tiles, and a whole expert's
  // operands (Scout FP8: (N + K) * ~1024 rows = 13 MB) stay in L2 while its tiles run.
  set_persistent_schedule<G>(args, device, sm_count);

  const Status status = run_cutlass<G>(args, p.workspace, stream);
  if (status != Status::kOk) return status;

  const int64_t vecs_per_expert =
      p.N * p.K * static_cast<int64_t>(sizeof(typename G::ElementOut)) / static_cast<int64_t>(sizeof(uint4));
  const dim3 zero_grid(kZeroBlocksPerExpert, static_cast<unsigned>(p.E));
  wgrad_zero_empty_kernel<<<zero_grid, kZeroThreads, 0, stream>>>(r.rows, vecs_per_expert, static_cast<uint4*>(p.dw));
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

using Bf16WgradF32 = GroupedWgrad<Bf16WgradConfig<float>>;
using Bf16WgradBf16 = GroupedWgrad<Bf16WgradConfig<cutlass::bfloat16_t>>;
using Fp8WgradF32 = GroupedWgrad<Fp8WgradConfig<float>>;
using Fp8WgradBf16 = GroupedWgrad<Fp8WgradConfig<cutlass::bfloat16_t>>;

// Everything the launcher can check without touching the device. Same rules for sizing and launching.
Status validate_sizes(int32_t E, int64_t M, int64_t N, int64_t K, GemmInput input, WgradOut out_dtype) {
  if (input != GemmInput::kBFloat16 && input != GemmInput::kFloat8E4M3) return Status::kInvalidArgument;
  if (out_dtype != WgradOut::kFloat32 && out_dtype != WgradOut::kBFloat16) return Status::kInvalidArgument;
  if (E < 0 || E > kWgradMaxExperts || M < 0 || N < 1 || K < 1 || N > kGroupedGemmMaxDim || K > kGroupedGemmMaxDim ||
      M > kGroupedGemmMaxDim)
    return Status::kInvalidArgument;
  // TMA moves whole 16-byte units: every row of dy, x (or their transposes) and dw must start 16-byte aligned.
  const int64_t align = input == GemmInput::kFloat8E4M3 ? kGroupedGemmAlignFp8 : kGroupedGemmAlignBf16;
  if (N % align != 0 || K % align != 0) return Status::kInvalidArgument;
  // int64 element offsets: E * N * K, M * N, M * K and the transposes (N + K) * P must be addressable.
  const int64_t padded_rows = grouped_gemm_wgrad_padded_rows(M, E);
  if ((E > 0 && N > INT64_MAX / K / E) || M > INT64_MAX / K || M > INT64_MAX / N ||
      padded_rows > INT64_MAX / 2 / (N + K))
    return Status::kInvalidArgument;
  return Status::kOk;
}

}  // namespace

size_t grouped_gemm_wgrad_workspace_bytes(int32_t E, int64_t M, int64_t N, int64_t K, GemmInput input,
                                          WgradOut out_dtype) {
  if (validate_sizes(E, M, N, K, input, out_dtype) != Status::kOk || E == 0) return 0;
  const bool f32 = out_dtype == WgradOut::kFloat32;
  if (input == GemmInput::kBFloat16)
    return f32 ? workspace_bytes_for<Bf16WgradF32>(E, M, N, K) : workspace_bytes_for<Bf16WgradBf16>(E, M, N, K);
  return f32 ? workspace_bytes_for<Fp8WgradF32>(E, M, N, K) : workspace_bytes_for<Fp8WgradBf16>(E, M, N, K);
}

Status grouped_gemm_wgrad(const GroupedWgradParams& p, cudaStream_t stream) {
  const Status sizes = validate_sizes(p.E, p.M, p.N, p.K, p.input, p.out_dtype);
  if (sizes != Status::kOk) return sizes;
  if (p.E == 0) return Status::kOk;  // dw is [0, N, K]: nothing to write
  if (p.dy == nullptr || p.x == nullptr || p.dw == nullptr || p.group_sizes == nullptr || p.workspace == nullptr)
    return Status::kInvalidArgument;
  if (!is_aligned(p.dy, kGroupedGemmPtrAlign) || !is_aligned(p.x, kGroupedGemmPtrAlign) ||
      !is_aligned(p.dw, kGroupedGemmPtrAlign) || !is_aligned(p.workspace, kGroupedGemmWorkspaceAlign) ||
      !is_aligned(p.group_sizes, sizeof(int32_t)))
    return Status::kInvalidArgument;
  const bool fp8 = p.input == GemmInput::kFloat8E4M3;
  if (fp8 != (p.dy_scale != nullptr) || fp8 != (p.x_scale != nullptr)) return Status::kInvalidArgument;
  if (fp8 && (!is_aligned(p.dy_scale, sizeof(float)) || !is_aligned(p.x_scale, sizeof(float))))
    return Status::kInvalidArgument;

  int device = 0;
  int sm_count = 0;
  const Status device_status = query_hopper_device(&device, &sm_count);
  if (device_status != Status::kOk) return device_status;

  const bool f32 = p.out_dtype == WgradOut::kFloat32;
  if (!fp8)
    return f32 ? run<Bf16WgradF32>(p, device, sm_count, stream) : run<Bf16WgradBf16>(p, device, sm_count, stream);
  return f32 ? run<Fp8WgradF32>(p, device, sm_count, stream) : run<Fp8WgradBf16>(p, device, sm_count, stream);
}

#else  // CUTLASS without modifiable TMA descriptors (CUDA < 12.3): nothing to run the grouped kernels with.

size_t grouped_gemm_wgrad_workspace_bytes(int32_t, int64_t, int64_t, int64_t, GemmInput, WgradOut) {
  return 0;
}

Status grouped_gemm_wgrad(const GroupedWgradParams&, cudaStream_t) {
  return Status::kUnsupported;
}

#endif

}  // namespace llama4::kernels
