// Fused MoE top-k router for CUDA (built for sm_90a; nothing Hopper-only is needed, so it also
// runs on sm_80+): scores, top-k, expert histogram, exclusive offsets and the stable dispatch
// order, with no host synchronisation.
//
// Legend: T tokens, E experts, K top-k, N = T*K slots (slot s = t*K + k), W warps per block,
// VPT experts held per lane (E <= 32 * VPT).
//
// Two paths:
//  * decode (N <= kFusedMaxSlots): ONE launch of one block does everything. Decode batches are
//    latency-bound, so one launch and a handful of __syncthreads is the whole cost.
//  * prefill (larger N): three launches. route_rank_blocks: many blocks route a few tokens per
//    warp and rank their slots locally; scan_block_counts: one block per expert turns the
//    per-block counts into per-block bases; finalize_positions: every slot gets its position.
//
// Top-k: each warp owns one token at a time; lane l holds experts [l*VPT, l*VPT + VPT) as
// order-preserving uint32 keys, so a round of selection is one local max, one REDUX.MAX
// (__reduce_max_sync) and one ballot: the lowest lane among equal maxima owns the lowest expert
// index, which gives "ties to the lower expert" for free.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "route_topk.h"

namespace llama4::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Slots routed by the single-launch path: T = 128 tokens x K = 8 is 1024; 2048 leaves headroom
// and keeps the block's shared memory (ids + ranks + rank table) under the 48 KB default.
constexpr int kFusedMaxSlots = 2048;
// Tokens one warp routes back to back with all their logits loaded up front: the loads of
// several tokens are in flight together, which hides most of the memory latency.
constexpr int kTokensPerWarp = 4;
// Per-(warp, expert) rank table in shared memory: W * E ints <= 16 KB.
constexpr int kRankTableInts = 4096;
constexpr int kMultiWarps = 8;                // prefill path: 256-thread blocks, many per SM
constexpr int kMultiMaxSlotsPerBlock = 2048;  // bounds the ids kept in shared memory
constexpr int kScanThreads = 256;             // scan_block_counts: one block per expert
constexpr int kFinalizeThreads = 256;
constexpr int kFinalizeSlotsPerThread = 4;

// Keys: 0 = taken or padding (never chosen), 1 = NaN (below every number), numbers >= 0x007fffff.
constexpr uint32_t kKeyTaken = 0u;
constexpr uint32_t kKeyNaN = 1u;

__device__ __forceinline__ uint32_t order_key(float v) {
  if (isnan(v)) return kKeyNaN;
  if (v == 0.0f) v = 0.0f;  // -0 and +0 tie (then the lower expert wins)
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <int VPT>
__device__ __forceinline__ void load_logits(const RouteTopkParams& p, int64_t token, int lane, float (&raw)[VPT]) {
  const int64_t row = token * p.logits_row_stride;
  const int first = lane * VPT;
  switch (p.logits_dtype) {
    case DType::kFloat32: {
      const float* src = static_cast<const float*>(p.logits) + row;
#pragma unroll
      for (int j = 0; j < VPT; ++j) raw[j] = first + j < p.num_experts ? src[first + j] : 0.0f;
      break;
    }
    case DType::kFloat16: {
      const __half* src = static_cast<const __half*>(p.logits) + row;
#pragma unroll
      for (int j = 0; j < VPT; ++j) raw[j] = first + j < p.num_experts ? __half2float(src[first + j]) : 0.0f;
      break;
    }
    default: {
      const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(p.logits) + row;
#pragma unroll
      for (int j = 0; j < VPT; ++j) raw[j] = first + j < p.num_experts ? __bfloat162float(src[first + j]) : 0.0f;
      break;
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float sigmoid(float x) {
  return 1.0f / (1.0f + expf(-x));
}

// Routes one token with its logits already in registers: writes topk_ids / topk_weights and the
// chosen experts into ids_smem[0..K). Called by all 32 lanes of a warp.
template <int VPT>
__device__ __forceinline__ void select_topk(const RouteTopkParams& p, int64_t token, int lane, const float (&raw)[VPT],
                                            int32_t* ids_smem) {
  const int E = p.num_experts;
  const int K = p.top_k;
  const int first = lane * VPT;
  uint32_t key[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = first + j;
    const float biased = (p.expert_bias != nullptr && e < E) ? raw[j] + p.expert_bias[e] : raw[j];
    key[j] = e < E ? order_key(biased) : kKeyTaken;
  }

  // Softmax statistics over all E experts (fmaxf skips NaN; a NaN logit then poisons the sum,
  // so the whole row comes out NaN, as torch.softmax does). The sum runs in double so that it
  // stays within an ulp of the exact sum for any E.
  float row_max = 0.0f;
  float inv_denom = 0.0f;
  if (p.score_func == ScoreFunc::kSoftmax) {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (first + j < E) m = fmaxf(m, raw[j]);
    row_max = warp_max(m);
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (first + j < E) s += static_cast<double>(expf(raw[j] - row_max));
    inv_denom = 1.0f / static_cast<float>(warp_sum(s));
  }

  float* weights_out = p.topk_weights + token * K;
  int32_t* ids_out = p.topk_ids + token * K;
  double selected_sum = 0.0;  // this lane's share of sum_k w (renormalisation)
  for (int k = 0; k < K; ++k) {
    uint32_t best = kKeyTaken;
    int best_j = 0;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (key[j] > best) {  // strict: the lowest j wins ties inside a lane
        best = key[j];
        best_j = j;
      }
    }
    const uint32_t warp_best = __reduce_max_sync(kFullMask, best);
    const unsigned holders = __ballot_sync(kFullMask, best == warp_best);
    if (lane == __ffs(holders) - 1) {  // lowest lane = lowest expert index among the ties
      float logit = 0.0f;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {  // compile-time indices only: key/raw stay in registers
        if (j == best_j) {
          logit = raw[j];
          key[j] = kKeyTaken;
        }
      }
      const float w = p.score_func == ScoreFunc::kSigmoid ? sigmoid(logit) : expf(logit - row_max) * inv_denom;
      const int expert = first + best_j;
      weights_out[k] = w;
      ids_out[k] = expert;
      ids_smem[k] = expert;
      selected_sum += static_cast<double>(w);
    }
  }
  if (p.renormalize) {
    const float denom = fmaxf(static_cast<float>(warp_sum(selected_sum)), FLT_MIN);
    __syncwarp();  // orders the winners' writes before the lanes below read them back
    for (int k = lane; k < K; k += kWarpSize) weights_out[k] = weights_out[k] / denom;
  }
}

// Routes tokens [token_begin, token_end) with the block's warps; chosen experts of token t go
// to ids_smem[(t - token_begin) * K + k].
template <int VPT>
__device__ __forceinline__ void route_tokens(const RouteTopkParams& p, int64_t token_begin, int64_t token_end,
                                             int32_t* ids_smem) {
  constexpr int kBatch = VPT >= kTokensPerWarp * 4 ? 1 : kTokensPerWarp;  // bounds registers for large E
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int64_t t0 = token_begin + static_cast<int64_t>(warp) * kBatch; t0 < token_end;
       t0 += static_cast<int64_t>(warps) * kBatch) {
    float raw[kBatch][VPT];
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      if (t0 + b < token_end) load_logits<VPT>(p, t0 + b, lane, raw[b]);
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      if (t0 + b < token_end) select_topk<VPT>(p, t0 + b, lane, raw[b], ids_smem + (t0 + b - token_begin) * p.top_k);
  }
}

// Ranks slots [0, n) of this block stably by expert: rank_out[s] = number of slots s' < s in
// the block with the same expert; block_count[e] = the block's slots of expert e.
// warp_hist holds W * E ints. Slots are taken blockDim at a time; inside a warp the rank comes
// from one __match_any_sync, across warps from a scan of the (warp, expert) table.
__device__ void rank_slots(const int32_t* ids_smem, int n, int num_experts, int32_t* warp_hist, int32_t* block_count,
                           int32_t* rank_out) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) block_count[e] = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    for (int i = threadIdx.x; i < warps * num_experts; i += blockDim.x) warp_hist[i] = 0;
    __syncthreads();
    const int s = base + threadIdx.x;
    const bool valid = s < n;
    const int expert = valid ? ids_smem[s] : -1;
    const unsigned peers = __match_any_sync(kFullMask, expert);
    const int rank_in_warp = __popc(peers & lanes_below);
    if (valid && rank_in_warp == 0) warp_hist[warp * num_experts + expert] = __popc(peers);
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int running = block_count[e];
#pragma unroll 8
      for (int w = 0; w < warps; ++w) {
        const int c = warp_hist[w * num_experts + e];
        warp_hist[w * num_experts + e] = running;
        running += c;
      }
      block_count[e] = running;
    }
    __syncthreads();
    if (valid) rank_out[s] = warp_hist[warp * num_experts + expert] + rank_in_warp;
    __syncthreads();  // the next round clears warp_hist
  }
  __syncthreads();  // block_count is complete (also when n == 0 and the loop never ran)
}

// Exclusive prefix sum of counts[0..E) into offsets[0..E], by the calling warp (E <= 1024:
// each lane sums a contiguous segment, then one warp scan of the segment sums).
__device__ void warp_exclusive_scan(const int32_t* counts, int num_experts, int32_t* offsets) {
  const int lane = threadIdx.x % kWarpSize;
  const int seg = (num_experts + kWarpSize - 1) / kWarpSize;
  const int begin = min(lane * seg, num_experts);
  const int end = min(begin + seg, num_experts);
  int local = 0;
  for (int e = begin; e < end; ++e) local += counts[e];
  int inclusive = local;
#pragma unroll
  for (int off = 1; off < kWarpSize; off *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, off);
    if (lane >= off) inclusive += up;
  }
  int running = inclusive - local;
  for (int e = begin; e < end; ++e) {
    offsets[e] = running;
    running += counts[e];
  }
  if (lane == kWarpSize - 1) offsets[num_experts] = inclusive;
}

// ---- decode path: one block does everything ------------------------------------------------
// Threads per block the fused kernel is compiled for: 1024 (64 registers a thread) up to 128
// experts; 512 beyond, where 8 or 32 logits per lane need the registers (and the rank table
// allows at most 4096 / 129 = 31 warps anyway).
constexpr int fused_max_threads(int vpt) {
  return vpt >= 8 ? 512 : 1024;
}

template <int VPT>
__global__ void __launch_bounds__(fused_max_threads(VPT)) route_topk_fused_kernel(const RouteTopkParams p) {
  extern __shared__ int32_t smem[];
  const int n = static_cast<int>(p.num_tokens * p.top_k);
  const int E = p.num_experts;
  const int warps = blockDim.x / kWarpSize;
  int32_t* ids_smem = smem;                 // [n]
  int32_t* rank_smem = ids_smem + n;        // [n]
  int32_t* warp_hist = rank_smem + n;       // [W * E]
  int32_t* counts = warp_hist + warps * E;  // [E]
  int32_t* offsets = counts + E;            // [E + 1]

  route_tokens<VPT>(p, 0, p.num_tokens, ids_smem);
  __syncthreads();
  rank_slots(ids_smem, n, E, warp_hist, counts, rank_smem);
  if (threadIdx.x < kWarpSize) warp_exclusive_scan(counts, E, offsets);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) p.tokens_per_expert[e] = counts[e];
  for (int e = threadIdx.x; e <= E; e += blockDim.x) p.expert_offsets[e] = offsets[e];
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int pos = offsets[ids_smem[s]] + rank_smem[s];
    p.slot_positions[s] = pos;
    p.sorted_slots[pos] = s;
  }
}

// ---- prefill path, launch 1: route a tile of tokens, rank its slots locally ----------------
// Writes the local rank of each slot into slot_positions (finalised by launch 3) and the tile's
// per-expert counts into block_counts[block * E + e].
template <int VPT>
__global__ void __launch_bounds__(kMultiWarps* kWarpSize)
    route_rank_blocks_kernel(const RouteTopkParams p, int tokens_per_block, int32_t* block_counts) {
  extern __shared__ int32_t smem[];
  const int E = p.num_experts;
  const int warps = blockDim.x / kWarpSize;
  const int64_t token_begin = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int64_t token_end = min(token_begin + tokens_per_block, p.num_tokens);
  const int n = static_cast<int>((token_end - token_begin) * p.top_k);
  int32_t* ids_smem = smem;                                    // [tokens_per_block * K]
  int32_t* warp_hist = ids_smem + tokens_per_block * p.top_k;  // [W * E]
  int32_t* counts = warp_hist + warps * E;                     // [E]

  route_tokens<VPT>(p, token_begin, token_end, ids_smem);
  __syncthreads();
  rank_slots(ids_smem, n, E, warp_hist, counts, p.slot_positions + token_begin * p.top_k);
  for (int e = threadIdx.x; e < E; e += blockDim.x) block_counts[static_cast<int64_t>(blockIdx.x) * E + e] = counts[e];
}

// ---- prefill path, launch 2: per expert, exclusive scan of the block counts ----------------
// Block e turns block_counts[:, e] into per-block bases and writes tokens_per_expert[e].
__global__ void scan_block_counts_kernel(int32_t* block_counts, int num_blocks, int num_experts,
                                         int32_t* tokens_per_expert) {
  __shared__ int32_t warp_totals[kScanThreads / kWarpSize];
  const int e = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int per_thread = (num_blocks + kScanThreads - 1) / kScanThreads;
  const int begin = min(static_cast<int>(threadIdx.x) * per_thread, num_blocks);
  const int end = min(begin + per_thread, num_blocks);
  int local = 0;
  for (int b = begin; b < end; ++b) local += block_counts[static_cast<int64_t>(b) * num_experts + e];
  int inclusive = local;
#pragma unroll
  for (int off = 1; off < kWarpSize; off *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, off);
    if (lane >= off) inclusive += up;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int warp_base = 0;
  for (int w = 0; w < warp; ++w) warp_base += warp_totals[w];
  int running = warp_base + inclusive - local;
  for (int b = begin; b < end; ++b) {
    int32_t* cell = block_counts + static_cast<int64_t>(b) * num_experts + e;
    const int c = *cell;
    *cell = running;
    running += c;
  }
  if (threadIdx.x == kScanThreads - 1) tokens_per_expert[e] = running;
}

// ---- prefill path, launch 3: final positions -----------------------------------------------
__global__ void finalize_positions_kernel(const RouteTopkParams p, int tokens_per_block, const int32_t* block_bases) {
  extern __shared__ int32_t offsets[];  // [E + 1]
  const int E = p.num_experts;
  if (threadIdx.x < kWarpSize) warp_exclusive_scan(p.tokens_per_expert, E, offsets);
  __syncthreads();
  if (blockIdx.x == 0)
    for (int e = threadIdx.x; e <= E; e += blockDim.x) p.expert_offsets[e] = offsets[e];
  const int64_t n = p.num_tokens * p.top_k;
  const int64_t slots_per_block = static_cast<int64_t>(kFinalizeThreads) * kFinalizeSlotsPerThread;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * slots_per_block;
  const int64_t end = min(begin + slots_per_block, n);
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int expert = p.topk_ids[s];
    const int64_t block = (s / p.top_k) / tokens_per_block;
    const int pos = offsets[expert] + block_bases[block * E + expert] + p.slot_positions[s];
    p.slot_positions[s] = pos;
    p.sorted_slots[pos] = static_cast<int32_t>(s);
  }
}

// ---- host side -------------------------------------------------------------------------------
int experts_per_lane(int num_experts) {
  if (num_experts <= 32) return 1;
  if (num_experts <= 128) return 4;
  if (num_experts <= 256) return 8;
  return 32;
}

int rank_table_warps(int num_experts, int cap) {
  const int by_table = kRankTableInts / num_experts;
  return by_table < 1 ? 1 : (by_table < cap ? by_table : cap);
}

struct MultiPlan {
  int warps;
  int tokens_per_block;
  int64_t num_blocks;
};

MultiPlan multi_plan(int64_t num_tokens, int num_experts, int top_k) {
  MultiPlan plan{};
  plan.warps = rank_table_warps(num_experts, kMultiWarps);
  const int by_slots = kMultiMaxSlotsPerBlock / top_k;
  const int by_warps = plan.warps * kTokensPerWarp;
  plan.tokens_per_block = by_slots < 1 ? 1 : (by_slots < by_warps ? by_slots : by_warps);
  plan.num_blocks = (num_tokens + plan.tokens_per_block - 1) / plan.tokens_per_block;
  return plan;
}

bool use_fused(int64_t num_tokens, int top_k) {
  return num_tokens * top_k <= kFusedMaxSlots;
}

template <int VPT>
Status launch(const RouteTopkParams& p, cudaStream_t stream) {
  const int E = p.num_experts;
  const int64_t n = p.num_tokens * p.top_k;
  if (use_fused(p.num_tokens, p.top_k)) {
    // Enough warps for the tokens and for the slots, no more: every extra warp lengthens the
    // rank-table clear and scan, which is the critical path of a tiny batch.
    const int64_t want_tokens = (p.num_tokens + kTokensPerWarp - 1) / kTokensPerWarp;
    const int64_t want_slots = (n + kWarpSize - 1) / kWarpSize;
    int warps = static_cast<int>(want_tokens > want_slots ? want_tokens : want_slots);
    const int cap = rank_table_warps(E, fused_max_threads(VPT) / kWarpSize);
    warps = warps < 1 ? 1 : (warps > cap ? cap : warps);
    const size_t smem = sizeof(int32_t) * (2 * n + static_cast<size_t>(warps) * E + 2 * E + 1);
    route_topk_fused_kernel<VPT><<<1, warps * kWarpSize, smem, stream>>>(p);
    return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
  }
  const MultiPlan plan = multi_plan(p.num_tokens, E, p.top_k);
  int32_t* block_counts = static_cast<int32_t*>(p.workspace);
  const size_t smem1 = sizeof(int32_t) *
                       (static_cast<size_t>(plan.tokens_per_block) * p.top_k + static_cast<size_t>(plan.warps) * E + E);
  route_rank_blocks_kernel<VPT><<<static_cast<unsigned>(plan.num_blocks), plan.warps * kWarpSize, smem1, stream>>>(
      p, plan.tokens_per_block, block_counts);
  scan_block_counts_kernel<<<E, kScanThreads, 0, stream>>>(block_counts, static_cast<int>(plan.num_blocks), E,
                                                           p.tokens_per_expert);
  const int64_t slots_per_block = static_cast<int64_t>(kFinalizeThreads) * kFinalizeSlotsPerThread;
  const unsigned finalize_blocks = static_cast<unsigned>((n + slots_per_block - 1) / slots_per_block);
  finalize_positions_kernel<<<finalize_blocks, kFinalizeThreads, sizeof(int32_t) * (E + 1), stream>>>(
      p, plan.tokens_per_block, block_counts);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace

size_t route_topk_workspace_bytes(int64_t num_tokens, int32_t num_experts, int32_t top_k) {
  if (num_experts < 1 || top_k < 1 || use_fused(num_tokens, top_k)) return 0;
  const MultiPlan plan = multi_plan(num_tokens, num_experts, top_k);
  return sizeof(int32_t) * static_cast<size_t>(plan.num_blocks) * num_experts;
}

int route_topk_num_launches(int64_t num_tokens, int32_t num_experts, int32_t top_k) {
  (void)num_experts;
  return use_fused(num_tokens, top_k) ? 1 : 3;
}

Status route_topk(const RouteTopkParams& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.num_experts > kRouteMaxExperts || p.top_k < 1 || p.top_k > p.num_experts ||
      p.num_tokens < 0 || p.num_tokens > kMaxSlots / p.top_k || p.logits_row_stride < 0)
    return Status::kInvalidArgument;
  if (p.num_tokens > 0 && p.logits == nullptr) return Status::kInvalidArgument;
  if (!use_fused(p.num_tokens, p.top_k) && p.workspace == nullptr) return Status::kInvalidArgument;
  switch (experts_per_lane(p.num_experts)) {
    case 1: return launch<1>(p, stream);
    case 4: return launch<4>(p, stream);
    case 8: return launch<8>(p, stream);
    default: return launch<32>(p, stream);
  }
}

}  // namespace llama4::kernels
