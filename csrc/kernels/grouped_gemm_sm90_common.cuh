// What the two CUTLASS 3.x ptr-array grouped GEMMs for Hopper share (grouped_gemm_sm90.cu, the forward, and
// grouped_gemm_wgrad_sm90.cu, the K-grouped weight gradient): the constants, the epilogues, the workspace carving,
// the one-block prefix scan of the setup kernels, the cached cluster occupancy and the device query. See
// GROUPED_GEMM.md. Each launcher keeps its own configs, setup kernel and launch, so a tile or schedule choice
// of one never changes the other's instantiations.
//
// Include it first, after `#define NDEBUG` (checked below): CUTLASS's device-side asserts are function calls inside
// the main loop, and ptxas then serialises the wgmma pipeline (warning C7510: a large slowdown).
#pragma once

#ifndef NDEBUG
#error "define NDEBUG before including grouped_gemm_sm90_common.cuh (CUTLASS asserts serialise the wgmma pipeline)"
#endif

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/fusion/callbacks.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"

#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)

namespace llama4::kernels::grouped_sm90 {

// ---------------------------------------------------------------------------------------------------------------
// Named constants.
// ---------------------------------------------------------------------------------------------------------------

// The setup kernel is one block: E is at most a few hundred experts, so one block scan is cheaper than any
// multi-block scheme (and it is a single launch in a decode step).
constexpr int kSetupThreads = 256;
constexpr int kWarpSize = 32;
// CUTLASS keeps two or three 128-byte TMA descriptors per SM in the workspace (it rewrites them when a CTA moves
// to another group). The workspace is sized for this many SMs so that its size is a pure function of the problem
// (fake kernels and graph capture can size it with no device query); the grid uses min(SMs, this).
constexpr int kWorkspaceSmSlots = 256;
// Devices whose cluster occupancy is cached (a larger device id is simply queried on every call).
constexpr int kMaxCachedDevices = 64;
// Alignment of every array carved out of the workspace (TMA descriptors need 64 bytes; 256 keeps it simple).
constexpr size_t kCarveAlign = 256;
// fp32 accumulators are promoted (added into a separate fp32 sum) every 4 FP8 MMAs of K = 32, i.e. every 128 of
// the reduction: the tensor core's internal FP8 accumulation keeps too few mantissa bits for sums over K = 5120..8192
// (forward) or thousands of rows (weight gradient) otherwise.
constexpr uint32_t kFp8PromotionInterval = 4;

// ---------------------------------------------------------------------------------------------------------------
// CUTLASS types shared by both launchers.
// ---------------------------------------------------------------------------------------------------------------

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M', N', K') per group
using ProblemShapeMNK = ProblemShape::UnderlyingProblemShape;
using ElementAccum = float;
using ElementScale = float;

// out = ElementOut(row_scale[n] * (col_scale[m] * acc)): the column scale is a column vector of the output tile
// (one value per row m), the row scale a row vector (one per column n). Both come through arrays of per-group
// pointers (the tile's group picks its slice). Alignment 1: a group's scale pointer may start at an arbitrary
// element, so it cannot be loaded as 16-byte vectors. Arguments mirror the tree: op_0 = the row broadcast,
// op_1 = (the column broadcast * acc).
template <class TileShape, class ElementOut>
using ScaleEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementOut, ElementAccum,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementScale*, ElementAccum,
                                                cute::Stride<cute::_0, cute::_1, cute::_0>, 1>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementAccum, ElementAccum,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, ElementScale*, ElementAccum,
                                                    cute::Stride<cute::_1, cute::_0, cute::_0>, 1>,
        cutlass::epilogue::fusion::Sm90AccFetch>>;

// out = ElementOut(acc): no source tensor (ElementC = void), so C is never loaded and out is written, never
// accumulated into.
template <class ElementOut>
using PlainEpilogue = cutlass::epilogue::fusion::LinearCombination<ElementOut, ElementAccum, void, ElementAccum>;

// ---------------------------------------------------------------------------------------------------------------
// Workspace: CUTLASS's TMA descriptors first (64-byte aligned), then the per-group arrays of the setup kernel.
// ---------------------------------------------------------------------------------------------------------------

constexpr size_t align_up(size_t bytes) {
  return (bytes + kCarveAlign - 1) / kCarveAlign * kCarveAlign;
}

template <class G>
size_t cutlass_workspace_bytes() {
  typename G::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.hw_info.sm_count = kWorkspaceSmSlots;  // never 0: 0 would make CUTLASS query the device
  return align_up(G::Gemm::get_workspace_size(args));
}

// Walks a workspace layout once: with base == nullptr it only counts bytes (the sizing path runs it the same way
// as the launch, so the two can never disagree).
template <class G>
struct WorkspaceCarver {
  char* base;
  size_t offset = cutlass_workspace_bytes<G>();

  template <class T>
  void take(T*& ptr, size_t bytes) {
    ptr = base == nullptr ? nullptr : reinterpret_cast<T*>(base + offset);
    offset += align_up(bytes);
  }

  // The per-group arrays both launchers hand to CUTLASS, in this order, then (scaled kernels) the two per-group
  // scale pointers of the epilogue or the block-scaled main loop.
  template <class Arrays>
  void take_group_arrays(Arrays& g, int64_t E, bool scaled) {
    const size_t groups = static_cast<size_t>(E);
    take(g.shapes, sizeof(ProblemShapeMNK) * groups);
    take(g.a, sizeof(*g.a) * groups);
    take(g.b, sizeof(*g.b) * groups);
    take(g.d, sizeof(*g.d) * groups);
    take(g.stride_a, sizeof(*g.stride_a) * groups);
    take(g.stride_b, sizeof(*g.stride_b) * groups);
    take(g.stride_d, sizeof(*g.stride_d) * groups);
    if (scaled) {
      take(g.scale_a, sizeof(*g.scale_a) * groups);
      take(g.scale_b, sizeof(*g.scale_b) * groups);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Setup kernels.
// ---------------------------------------------------------------------------------------------------------------

// Inclusive prefix sum over the kSetupThreads block (int64: the row total may exceed 2^31 in principle).
__device__ __forceinline__ int64_t block_inclusive_scan(int64_t v, int64_t* warp_totals) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int off = 1; off < kWarpSize; off *= 2) {
    const int64_t n = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += n;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kSetupThreads / kWarpSize;
    int64_t t = lane < kWarps ? warp_totals[lane] : 0;
#pragma unroll
    for (int off = 1; off < kWarpSize; off *= 2) {
      const int64_t n = __shfl_up_sync(0xffffffffu, t, off);
      if (lane >= off) t += n;
    }
    if (lane < kWarps) warp_totals[lane] = t;
  }
  __syncthreads();
  return warp > 0 ? v + warp_totals[warp - 1] : v;
}

// ---------------------------------------------------------------------------------------------------------------
// Launch.
// ---------------------------------------------------------------------------------------------------------------

// How many clusters of this kernel fit on the device at once (0: let CUTLASS use the SM count). The grid is
// persistent with a static tile schedule, so a grid larger than what fits would leave some clusters waiting for a
// whole first wave and then running their full share of tiles after everyone else (up to a 2x tail). GPCs have
// SM counts that need not divide by the cluster size, so this is less than SMs / cluster size in general.
// Cached per device and kernel: the answer depends only on the kernel and the device.
template <class G>
int max_active_clusters(int device) {
  using Kernel = typename G::Kernel;
  constexpr int kClusterSize = cute::size(typename G::ClusterShape{});
  if constexpr (kClusterSize == 1) {
    return 0;
  } else {
    static std::atomic<int> cache[kMaxCachedDevices] = {};
    if (device >= 0 && device < kMaxCachedDevices) {
      const int cached = cache[device].load(std::memory_order_relaxed);
      if (cached > 0) return cached;
    }
    const void* kernel = reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>);
    const int smem_bytes = static_cast<int>(Kernel::SharedStorageSize);
    // The query accounts for the dynamic shared memory only once the kernel is allowed to use that much.
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) != cudaSuccess) {
      cudaGetLastError();  // clear it: fall back to CUTLASS's SM-count heuristic
      return 0;
    }
    cudaLaunchAttribute cluster_attr{};
    cluster_attr.id = cudaLaunchAttributeClusterDimension;
    cluster_attr.val.clusterDim.x = cute::size<0>(typename G::ClusterShape{});
    cluster_attr.val.clusterDim.y = cute::size<1>(typename G::ClusterShape{});
    cluster_attr.val.clusterDim.z = cute::size<2>(typename G::ClusterShape{});
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(cluster_attr.val.clusterDim.x, cluster_attr.val.clusterDim.y, cluster_attr.val.clusterDim.z);
    config.blockDim = dim3(Kernel::MaxThreadsPerBlock, 1, 1);
    config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
    config.attrs = &cluster_attr;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    if (clusters > 0 && device >= 0 && device < kMaxCachedDevices)
      cache[device].store(clusters, std::memory_order_relaxed);
    return clusters;
  }
}

// The per-group arrays in the CUTLASS arguments. No host copy of the shapes (that would need a synchronisation):
// CUTLASS then launches a persistent grid, schedules tiles from the device-side shapes, and skips its host-side
// per-group checks, which the launchers' validate_sizes() do instead. No source tensor C.
template <class G, class Arrays>
void set_group_arrays(typename G::Arguments& args, int32_t E, const Arrays& g) {
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = ProblemShape{E, g.shapes, nullptr};
  args.mainloop.ptr_A = g.a;
  args.mainloop.dA = g.stride_a;
  args.mainloop.ptr_B = g.b;
  args.mainloop.dB = g.stride_b;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = g.d;
  args.epilogue.dD = g.stride_d;
}

// The persistent grid: min(SMs, kWorkspaceSmSlots) CTAs, capped by the clusters that fit at once, with tiles
// rastered along M and no swizzle (each launcher says why along M is its fast order).
template <class G>
void set_persistent_schedule(typename G::Arguments& args, int device, int sm_count) {
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  args.hw_info.max_active_clusters = max_active_clusters<G>(device);
  using RasterOrderOptions = typename G::Kernel::TileScheduler::RasterOrderOptions;
  args.scheduler.raster_order = RasterOrderOptions::AlongM;
  args.scheduler.max_swizzle_size = 1;
}

template <class G>
Status run_cutlass(const typename G::Arguments& args, void* workspace, cudaStream_t stream) {
  typename G::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return Status::kUnsupported;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return Status::kCudaError;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return Status::kCudaError;
  return Status::kOk;
}

// The current device and its SM count, capped at the kWorkspaceSmSlots the workspace holds descriptors for.
inline Status query_hopper_device(int* device, int* sm_count) {
  int major = 0;
  if (cudaGetDevice(device) != cudaSuccess ||
      cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, *device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, *device) != cudaSuccess)
    return Status::kCudaError;
  if (major != 9) return Status::kUnsupported;  // sm_90a code runs on Hopper only
  *sm_count = *sm_count < kWorkspaceSmSlots ? *sm_count : kWorkspaceSmSlots;
  return Status::kOk;
}

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace llama4::kernels::grouped_sm90

#endif  // CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED
