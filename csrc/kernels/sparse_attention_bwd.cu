// Sparse-global attention backward on CUDA: FlashAttention-2-style recomputation on mma.sync tensor cores that
// visits exactly the (query tile, key tile) pairs the forward visits, with bf16/fp16 inputs and fp32 accumulation.
// Legend: B batch, S query positions, Sk key positions, H query heads, G kv heads, D head dim,
// Br = kBlockM query rows per tile, Bc = kBlockN keys per tile, P = softmax probabilities, dS = score gradients.
//
// Maths (per head; scores scaled by s = softmax_scale, lse the forward's natural log-sum-exp):
//   P = exp(s * Q K^T - lse),  dV = P^T dO,  dP = dO V^T,  delta = rowsum(dO * O),  dS = P * (dP - delta),
//   dQ = s * dS K,  dK = s * dS^T Q  (dK, dV summed over the H / G query heads of a kv head).
//
// Three launches, deterministic by construction (no float atomics: every output element is summed by one
// thread in a fixed order, so the `deterministic` flag changes nothing):
//  1. preprocess: delta[b, h, i] = rowsum(dO * O) in fp32 and lse in log2 units (-inf -> +inf, so that
//     exp2(x - lse) = 0 for a row that saw no key), one [B, H, S] fp32 array each: O(S) memory, and the
//     dot product is done once per row instead of once per key tile.
//  2. dK/dV: one CTA of 4 warps per (key tile of Bc = 64 keys, kv head, batch or varlen sequence); each warp
//     owns 16 keys. K and V stay in shared memory for the whole CTA, and dK, dV (16 x D each per warp) stay in
//     fp32 registers while the CTA walks every query head of the group and, per head, the query tiles that can
//     see this key tile (next_query_tile(): the exact inverse of the forward's walk, one or two contiguous
//     ranges for window / chunk / causal, every later tile for a sink or global key tile). Q, dO tiles and
//     their lse / delta are double-buffered with cp.async so the next tile loads while the tensor cores work.
//     Per query tile (transposed so that keys are the MMA rows and dK / dV never leave registers):
//       S^T = K Q^T, P^T = exp2(S^T * s*log2(e) - lse_log2) (element mask only on partial tiles),
//       dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q.
//     The C fragments of two n8 tiles of P^T / dS^T are exactly the A fragment of one k16 step, so P^T and dS^T
//     go from the softmax recomputation into the next MMA without shared memory (as P in the forward).
//     dk / dv are written once per CTA (zeros for a key tile that no query sees).
//  3. dQ: one CTA of 4 warps per (query tile of Br = 64 rows, head, batch); each warp owns 16 rows and keeps
//     dQ (16 x D) in registers. It walks exactly the forward's key tiles (next_key_tile()) with K / V
//     double-buffered: S = Q K^T, dP = dO V^T, dS = P * (dP - delta), dQ += dS K (K through ldmatrix.trans).
//     Recomputing S and dP in both kernels costs 2 extra GEMMs of the 7 (FA2's trade-off) and buys freedom from
//     atomics: dQ is summed along keys by one CTA, dK / dV along queries by another.
//
// Sparsity: both kernels cost O(S x visible keys): the tile walks turn each pattern into tile ranges once per
// CTA, and only tiles that are not provably fully visible (diagonal, window and chunk edges, global-key tiles,
// partial tiles) pay for the per-element mask, which is compares only (query terms hoisted per row in dQ,
// key terms hoisted per key in dK/dV: key_mask_terms()).
//
// Future work (the FlashAttention-3-class Hopper version): TMA loads and wgmma with operands read from shared
// memory (mma.sync stages every operand through registers with ldmatrix), warp-specialised producer /
// consumer warpgroups, Bc = 128 keys per dK/dV CTA with two consumer warpgroups, and dQ accumulated in the
// same pass (FA3's atomic-add dQ in fp32, an opt-in non-deterministic variant, worth it only if measured faster).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "mma_sm80.cuh"
#include "sparse_attention_bwd.h"
#include "sparse_attention_common.cuh"
#include "sparse_attention_tiles.cuh"

namespace llama4::kernels {
namespace {

using namespace attention_sm80;  // cp.async, tile loads, sequence decoding, kChunkElems, kSmemPadElems

constexpr int kWarpSize = 32;
constexpr int kBlockM = 64;       // query rows per tile (dQ: 4 warps of 16 rows; dK/dV: the n of S^T)
constexpr int kBlockN = 64;       // keys per tile (dK/dV: 4 warps of 16 keys; dQ: the n of S)
constexpr int kRowsPerWarp = 16;  // the M of one m16n8k16 MMA
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMmaK = 16;   // K of one m16n8k16 MMA
constexpr int kMmaN = 8;    // N of one m16n8k16 MMA
constexpr int kStages = 2;  // double buffering of the streamed tiles
constexpr int kPreprocessThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

static_assert(kBlockM == kWarps * kRowsPerWarp && kBlockN == kWarps * kRowsPerWarp, "16 rows per warp");
static_assert(kBlockM == kBlockN, "the dK/dV epilogue stages dK and dV in the two Q buffers");
static_assert(kThreads == 2 * kBlockM, "the dK/dV row statistics: one thread per lse and per delta value");
static_assert(kBlockM % (2 * kMmaN) == 0 && kBlockN % (2 * kMmaN) == 0, "n8 tiles in pairs (one k16 step)");

template <int kHeadDim>
struct Shape {
  static constexpr int kPitch = kHeadDim + kSmemPadElems;  // shared-memory row pitch in elements
  static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  static constexpr int kDTiles = kHeadDim / kMmaN;  // n8 tiles of a dQ / dK / dV accumulator
  static constexpr int kTileElems = kBlockM * kPitch;
  // dQ: Q and dO, then K and V double-buffered.
  static constexpr size_t kDqSmemBytes = sizeof(uint16_t) * (2 + 2 * kStages) * kTileElems;
  // dK/dV: K and V, then Q and dO double-buffered, then lse and delta of each Q buffer.
  static constexpr size_t kDkvSmemBytes =
      sizeof(uint16_t) * (2 + 2 * kStages) * kTileElems + sizeof(float) * 2 * kStages * kBlockM;
};

// What the kernels need beyond the launcher's parameters, computed once on the host.
struct BwdArgs {
  SparseAttentionBwdParams p;
  float* delta;          // [B, H, S] rowsum(dO * O)
  float* lse_log2;       // [B, H, S] lse * log2(e), +inf for a row with no visible key
  int64_t num_m_blocks;  // query tiles per (sequence, head) in the dQ grid
  int64_t num_n_blocks;  // key tiles per (sequence, kv head) in the dK/dV grid
  float scale_log2;      // softmax_scale * log2(e)
  bool vec_in;           // q, k, v, dout rows are 16-byte aligned: cp.async, else element copies
  bool vec_pre;          // dout and out rows are 16-byte aligned: vector loads in the preprocess
  bool vec_out;          // dq, dk, dv are 16-byte aligned: 16-byte stores
};

// ---- PTX wrappers ----------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src) : "memory");
}

// ldmatrix on a shared-memory byte address: callers add compile-time offsets to one per-thread base, which
// ptxas folds into the instruction's immediate, so no per-(kk, n) address stays live across the key loop.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

using mma_sm80::MmaOps;  // the element type's MMA and its fp32 -> 2 x 16-bit packing

template <typename Element>
__device__ __forceinline__ float to_float(uint16_t bits);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
template <>
__device__ __forceinline__ float to_float<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

// ---- tile stores ------------------------------------------------------------------------------
// Writes rows [0, valid_rows) of a staged [kBlockM][pitch] smem tile to dst (row r at dst + r * row_stride).
template <int kHeadDim>
__device__ __forceinline__ void store_tile(uint16_t* dst, int64_t row_stride, const uint16_t* smem, int64_t valid_rows,
                                           bool vec) {
  using S = Shape<kHeadDim>;
  constexpr int kChunks = kBlockM * S::kChunksPerRow;
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int c = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = c / S::kChunksPerRow;
    const int col = (c % S::kChunksPerRow) * kChunkElems;
    if (r >= valid_rows) continue;
    const uint16_t* from = smem + r * S::kPitch + col;
    uint16_t* to = dst + r * row_stride + col;
    if (vec) {
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
    } else {
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) to[e] = from[e];
    }
  }
}

// Packs a warp's 16 x (8 * kTiles) fp32 accumulator, times `scale`, into rows of a [kBlockM][pitch] smem tile.
template <typename Element, int kHeadDim>
__device__ __forceinline__ void stage_accumulator(uint16_t* smem, const float (&acc)[kHeadDim / kMmaN][4], float scale,
                                                  int warp_row0, int group, int lane_in_group) {
  using Ops = MmaOps<Element>;
#pragma unroll
  for (int d = 0; d < kHeadDim / kMmaN; ++d)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + group + r * 8;
      const int col = d * kMmaN + 2 * lane_in_group;
      *reinterpret_cast<uint32_t*>(smem + row * Shape<kHeadDim>::kPitch + col) =
          Ops::pack(acc[d][2 * r] * scale, acc[d][2 * r + 1] * scale);
    }
}

// Per-lane byte offsets of the ldmatrix.x4 row addresses inside a [rows][pitch] tile. The four 8x8 matrices:
//  A (rows r0.. of a 16 x 16 step): rows 0-7 / 8-15 x k 0-7, then rows 0-7 / 8-15 x k 8-15 (the m16n8k16 A order);
//  B (two n8 tiles of a 16 x 16 step): rows 0-7 x k 0-7, rows 0-7 x k 8-15, rows 8-15 x k 0-7, rows 8-15 x k 8-15;
//  B transposed (k rows, n columns): k 0-7 / 8-15 x n 0-7, then k 0-7 / 8-15 x n 8-15.
template <int kHeadDim>
struct LaneOffsets {
  uint32_t a, b, b_trans;
  __device__ __forceinline__ explicit LaneOffsets(int lane) {
    constexpr int kPitch = Shape<kHeadDim>::kPitch;
    constexpr int kBytes = static_cast<int>(sizeof(uint16_t));
    a = static_cast<uint32_t>(((lane % 16) * kPitch + (lane / 16) * 8) * kBytes);
    b = static_cast<uint32_t>((((lane / 16) * 8 + lane % 8) * kPitch + ((lane / 8) % 2) * 8) * kBytes);
    b_trans = static_cast<uint32_t>(((((lane / 8) % 2) * 8 + lane % 8) * kPitch + (lane / 16) * 8) * kBytes);
  }
};

// acc[16 x 8*kNTiles] = A[16 rows] x B^T with B 8*kNTiles rows: the score-shaped GEMM of both kernels (S = Q K^T and
// dP = dO V^T in dQ; S^T = K Q^T and dP^T = V dO^T in dK/dV). a_addr: the shared address of the warp's first A
// row plus LaneOffsets::a; b_addr: the B tile's address plus LaneOffsets::b.
template <typename Element, int kHeadDim, int kNTiles>
__device__ __forceinline__ void gemm_scores(float (&acc)[kNTiles][4], uint32_t a_addr, uint32_t b_addr) {
  using Ops = MmaOps<Element>;
  constexpr uint32_t kRowBytes = Shape<kHeadDim>::kPitch * sizeof(uint16_t);
  constexpr uint32_t kStepBytes = kMmaK * sizeof(uint16_t);
  static_assert(kNTiles % 2 == 0, "n8 tiles in pairs");
#pragma unroll
  for (int n = 0; n < kNTiles; ++n)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[n][c] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_addr + kk * kStepBytes);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_addr + np * 16 * kRowBytes + kk * kStepBytes);
      Ops::mma(acc[2 * np], a, b[0], b[1]);
      Ops::mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x D] += A x B with A the 16 x 8*kNTiles fp32 C fragments `x` (packed to the element type: n8 tiles 2kk and
// 2kk + 1 are the A fragment of k16 step kk) and B = 8*kNTiles rows x D read by ldmatrix.trans (b_addr: the tile's
// address plus LaneOffsets::b_trans): dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <typename Element, int kHeadDim, int kNTiles>
__device__ __forceinline__ void gemm_accumulate(float (&acc)[kHeadDim / kMmaN][4], const float (&x)[kNTiles][4],
                                                uint32_t b_addr) {
  using Ops = MmaOps<Element>;
  constexpr uint32_t kRowBytes = Shape<kHeadDim>::kPitch * sizeof(uint16_t);
#pragma unroll
  for (int kk = 0; kk < kNTiles / 2; ++kk) {
    uint32_t a[4];
    a[0] = Ops::pack(x[2 * kk][0], x[2 * kk][1]);          // row group,     k 2l, 2l+1
    a[1] = Ops::pack(x[2 * kk][2], x[2 * kk][3]);          // row group + 8, k 2l, 2l+1
    a[2] = Ops::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);  // row group,     k 8+2l, 8+2l+1
    a[3] = Ops::pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);  // row group + 8, k 8+2l, 8+2l+1
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr + kk * kMmaK * kRowBytes + dp * 16 * sizeof(uint16_t));
      Ops::mma(acc[2 * dp], a, b[0], b[1]);
      Ops::mma(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// ---- 1. preprocess: delta and lse in log2 units ----------------------------------------------
// kHeadDim / 8 threads per (token, head) row, each with one 16-byte chunk of dO and of O, reduced by shuffles
// inside the row's aligned lane group; rows are taken in memory order ([B, S, H]) so loads are coalesced.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kPreprocessThreads) sparse_attention_bwd_preprocess_kernel(const BwdArgs args) {
  constexpr int kThreadsPerRow = kHeadDim / kChunkElems;
  constexpr int kRowsPerBlock = kPreprocessThreads / kThreadsPerRow;
  static_assert(kWarpSize % kThreadsPerRow == 0, "a row's lanes sit in one warp");
  const SparseAttentionBwdParams& p = args.p;
  const int64_t num_rows = p.batch * p.seqlen_q * p.heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int col = (static_cast<int>(threadIdx.x) % kThreadsPerRow) * kChunkElems;
  float dot = 0.0f;
  int64_t b = 0, s = 0, h = 0;
  if (row < num_rows) {
    h = row % p.heads;
    s = (row / p.heads) % p.seqlen_q;
    b = row / (p.heads * p.seqlen_q);
    const uint16_t* dout = static_cast<const uint16_t*>(p.dout) + b * p.dout_strides[0] + s * p.dout_strides[1] +
                           h * p.dout_strides[2] + col;
    const uint16_t* out =
        static_cast<const uint16_t*>(p.out) + b * p.out_strides[0] + s * p.out_strides[1] + h * p.out_strides[2] + col;
    uint16_t x[kChunkElems], y[kChunkElems];
    if (args.vec_pre) {
      const uint4 xv = *reinterpret_cast<const uint4*>(dout);
      const uint4 yv = *reinterpret_cast<const uint4*>(out);
      memcpy(x, &xv, sizeof(x));
      memcpy(y, &yv, sizeof(y));
    } else {
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) {
        x[e] = dout[e];
        y[e] = out[e];
      }
    }
#pragma unroll
    for (int e = 0; e < kChunkElems; ++e) dot = fmaf(to_float<Element>(x[e]), to_float<Element>(y[e]), dot);
  }
#pragma unroll
  for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  if (row < num_rows && col == 0) {
    const int64_t at = (b * p.heads + h) * p.seqlen_q + s;
    args.delta[at] = dot;
    const float lse = p.lse[at];
    args.lse_log2[at] = lse == -INFINITY ? INFINITY : lse * kLog2e;  // no visible key: every P = exp2(-inf) = 0
  }
}

// ---- 2. dK / dV --------------------------------------------------------------------------------
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) sparse_attention_bwd_dkdv_kernel(const BwdArgs args) {
  using S = Shape<kHeadDim>;
  // Query columns per pass: with D = 128, dK and dV hold 128 fp32 registers per thread, and S^T and dP^T over all
  // 64 columns (64 more) would spill; two passes of 32 columns cost one more ldmatrix of K and V per k16 step.
  constexpr int kColPasses = kHeadDim == 128 ? 2 : 1;
  constexpr int kPassCols = kBlockM / kColPasses;
  constexpr int kNTiles = kPassCols / kMmaN;  // n8 tiles of S^T (query columns) per pass
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);  // [Bc][pitch]
  uint16_t* sV = sK + S::kTileElems;                     // [Bc][pitch]
  uint16_t* sQ = sV + S::kTileElems;                     // [stages][Br][pitch], reused to stage dK and dV
  uint16_t* sdO = sQ + kStages * S::kTileElems;          // [stages][Br][pitch]
  float* sLse = reinterpret_cast<float*>(sdO + kStages * S::kTileElems);  // [stages][Br], log2 units
  float* sDelta = sLse + kStages * kBlockM;                               // [stages][Br]

  const SparseAttentionBwdParams& p = args.p;
  // Decode the 1-D block index: kv head fastest, then key tile (from the first: with a causal mask the earliest
  // key tiles are seen by the most queries, so the longest CTAs start first), then sequence. The CTAs resident
  // together are neighbouring key tiles of every kv head, whose query-tile ranges overlap (window, chunk, causal):
  // their Q / dO reads hit in L2.
  // 32-bit arithmetic (the grid is < 2^31 CTAs): 64-bit divisions are calls, and cost registers.
  uint32_t bid = blockIdx.x;
  const int g = static_cast<int>(bid % static_cast<uint32_t>(p.kv_heads));
  bid /= static_cast<uint32_t>(p.kv_heads);
  const int64_t n_block = bid % static_cast<uint32_t>(args.num_n_blocks);
  const int64_t seq = bid / static_cast<uint32_t>(args.num_n_blocks);

  int64_t b, q_begin, seqlen_q, k_begin, seqlen_k;
  sequence_rows(p, seq, b, q_begin, seqlen_q, k_begin, seqlen_k);
  const int64_t j0 = n_block * kBlockN;
  if (j0 >= seqlen_k) return;  // past this sequence's keys (varlen grids cover the longest one)
  const int64_t key_rows = seqlen_k - j0 < kBlockN ? seqlen_k - j0 : kBlockN;
  const int group_size = p.heads / p.kv_heads;
  const int h_begin = g * group_size;
  const int h_end = h_begin + group_size;

  const uint16_t* k =
      static_cast<const uint16_t*>(p.k) + b * p.k_strides[0] + (k_begin + j0) * p.k_strides[1] + g * p.k_strides[2];
  const uint16_t* v =
      static_cast<const uint16_t*>(p.v) + b * p.v_strides[0] + (k_begin + j0) * p.v_strides[1] + g * p.v_strides[2];
  const uint16_t* q_seq = static_cast<const uint16_t*>(p.q) + b * p.q_strides[0] + q_begin * p.q_strides[1];
  const uint16_t* do_seq = static_cast<const uint16_t*>(p.dout) + b * p.dout_strides[0] + q_begin * p.dout_strides[1];
  const int64_t stats_seq = b * p.heads * p.seqlen_q + q_begin;  // + h * S + row: the [B, H, S] arrays

  // dk / dv rows of this key tile (one offset live across the loop instead of b, k_begin and j0).
  const int64_t kv_offset = ((b * p.seqlen_k + k_begin + j0) * p.kv_heads + g) * kHeadDim;
  const int64_t offset = seqlen_k - seqlen_q;  // query row r sits at position r + offset
  const QueryTileWalk walk = make_query_tile_walk(p.mask, n_block, seqlen_q, seqlen_k, kBlockM, kBlockN);

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;
  const int lane_in_group = lane % 4;
  const int warp_row0 = warp * kRowsPerWarp;
  // mask_visible() for this thread's two keys as int32 bounds on the query row, computed once (the divisions
  // of the chunk terms stay out of the loop) and shifted per query tile: compares only per element.
  KeyColumnMask key_masks[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = warp_row0 + group + r * 8;
    key_masks[r] = key_column_mask(p.mask, key_mask_terms(p.mask, j0 + key), offset, key < key_rows ? seqlen_q : 0);
  }
  const LaneOffsets<kHeadDim> lanes(lane);
  const uint32_t k_a_addr = smem_addr(sK + warp_row0 * S::kPitch) + lanes.a;  // this warp's 16 keys
  const uint32_t v_a_addr = smem_addr(sV + warp_row0 * S::kPitch) + lanes.a;

  // Loads query tile t of head h (Q, dO, lse, delta) into buffer `stage`; rows past the sequence are zero
  // (Q, dO, delta) and +inf (lse): P = 0 there, on top of the element mask.
  auto load_query_tile = [&](int h, int64_t t, int stage) {
    const int64_t r0 = t * kBlockM;
    const int64_t rows = seqlen_q - r0 < kBlockM ? seqlen_q - r0 : kBlockM;
    load_tile<kThreads, kHeadDim, kBlockM>(sQ + stage * S::kTileElems, q_seq + r0 * p.q_strides[1] + h * p.q_strides[2],
                                           p.q_strides[1], rows, args.vec_in);
    load_tile<kThreads, kHeadDim, kBlockM>(sdO + stage * S::kTileElems,
                                           do_seq + r0 * p.dout_strides[1] + h * p.dout_strides[2], p.dout_strides[1],
                                           rows, args.vec_in);
    const int tid = static_cast<int>(threadIdx.x);
    const int r = tid % kBlockM;
    const bool is_lse = tid < kBlockM;
    float* dst = (is_lse ? sLse : sDelta) + stage * kBlockM + r;
    if (r < rows) {
      cp_async_4(dst, (is_lse ? args.lse_log2 : args.delta) + stats_seq + h * p.seqlen_q + r0 + r);
    } else {
      *dst = is_lse ? INFINITY : 0.0f;
    }
  };

  float acc_dk[S::kDTiles][4], acc_dv[S::kDTiles][4];
#pragma unroll
  for (int d = 0; d < S::kDTiles; ++d)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      acc_dk[d][c] = 0.0f;
      acc_dv[d][c] = 0.0f;
    }

  // Prologue: K, V and the first query tile in one cp.async group.
  load_tile<kThreads, kHeadDim, kBlockN>(sK, k, p.k_strides[1], key_rows, args.vec_in);
  load_tile<kThreads, kHeadDim, kBlockN>(sV, v, p.v_strides[1], key_rows, args.vec_in);
  int h = h_begin;
  int64_t tile = next_query_tile(walk, 0);
  if (tile < walk.end) load_query_tile(h, tile, 0);
  cp_async_commit();

  // One flat loop over (head, query tile) so that the prefetch crosses head boundaries.
  for (int stage = 0; tile < walk.end; stage ^= 1) {
    int next_h = h;
    int64_t next = next_query_tile(walk, tile + 1);
    if (next >= walk.end) {
      ++next_h;
      next = next_h < h_end ? next_query_tile(walk, 0) : walk.end;  // recomputed: a few compares, no register
    }
    __syncthreads();  // every warp is done with buffer stage ^ 1 (read in the previous iteration)
    if (next < walk.end) load_query_tile(next_h, next, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning "this tile"
    cp_async_wait<1>();
    __syncthreads();  // this tile's Q / dO / lse / delta (and K / V) from every thread are in shared memory

    const uint16_t* q_s = sQ + stage * S::kTileElems;
    const uint16_t* do_s = sdO + stage * S::kTileElems;
    const float* lse_s = sLse + stage * kBlockM;
    const float* delta_s = sDelta + stage * kBlockM;
    const int64_t r0 = tile * kBlockM;
    const int64_t rows = seqlen_q - r0 < kBlockM ? seqlen_q - r0 : kBlockM;
    const int64_t i0 = r0 + offset;

    const bool full = rows == kBlockM && key_rows == kBlockN && query_tile_fully_visible(walk, i0, i0 + kBlockM);
    // The query columns in kColPasses passes of kPassCols (see kColPasses); not unrolled, so that the
    // scheduler cannot interleave the passes and hold both passes' fragments at once.
#pragma unroll 1
    for (int pass = 0; pass < kColPasses; ++pass) {
      const int c0 = pass * kPassCols;
      const uint32_t q_addr = smem_addr(q_s + c0 * S::kPitch), do_addr = smem_addr(do_s + c0 * S::kPitch);

      // P^T = exp2(S^T * scale * log2(e) - lse_log2), S^T = K Q^T: 16 keys x kPassCols queries per warp.
      float pt[kNTiles][4];
      gemm_scores<Element, kHeadDim, kNTiles>(pt, k_a_addr, q_addr + lanes.b);
      if (!full) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const KeyColumnMask cols =
              shift_column_mask(key_masks[r], static_cast<int32_t>(r0), static_cast<int32_t>(rows));
#pragma unroll
          for (int n = 0; n < kNTiles; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)  // the thread's two query columns of n8 tile n
              if (!column_visible(cols, c0 + n * kMmaN + 2 * lane_in_group + e)) pt[n][2 * r + e] = -INFINITY;
        }
      }
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        const float2 lse = *reinterpret_cast<const float2*>(lse_s + c0 + n * kMmaN + 2 * lane_in_group);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          pt[n][2 * r] = exp2f(fmaf(pt[n][2 * r], args.scale_log2, -lse.x));
          pt[n][2 * r + 1] = exp2f(fmaf(pt[n][2 * r + 1], args.scale_log2, -lse.y));
        }
      }

      // dV += P^T dO.
      gemm_accumulate<Element, kHeadDim, kNTiles>(acc_dv, pt, do_addr + lanes.b_trans);

      // dS^T = P^T * (dP^T - delta), dP^T = V dO^T.
      float dst[kNTiles][4];
      gemm_scores<Element, kHeadDim, kNTiles>(dst, v_a_addr, do_addr + lanes.b);
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        const float2 delta = *reinterpret_cast<const float2*>(delta_s + c0 + n * kMmaN + 2 * lane_in_group);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          dst[n][2 * r] = pt[n][2 * r] * (dst[n][2 * r] - delta.x);
          dst[n][2 * r + 1] = pt[n][2 * r + 1] * (dst[n][2 * r + 1] - delta.y);
        }
      }

      // dK += dS^T Q (times the softmax scale in the epilogue).
      gemm_accumulate<Element, kHeadDim, kNTiles>(acc_dk, dst, q_addr + lanes.b_trans);
    }

    h = next_h;
    tile = next;
  }

  // Epilogue: stage dK and dV through the Q buffers, then 16-byte row stores. Drain the copies first (with no
  // query tile the K / V loads may still be in flight).
  cp_async_wait<0>();
  __syncthreads();
  stage_accumulator<Element, kHeadDim>(sQ, acc_dk, p.softmax_scale, warp_row0, group, lane_in_group);
  stage_accumulator<Element, kHeadDim>(sQ + S::kTileElems, acc_dv, 1.0f, warp_row0, group, lane_in_group);
  __syncthreads();
  const int64_t kv_row_stride = static_cast<int64_t>(p.kv_heads) * kHeadDim;
  store_tile<kHeadDim>(static_cast<uint16_t*>(p.dk) + kv_offset, kv_row_stride, sQ, key_rows, args.vec_out);
  store_tile<kHeadDim>(static_cast<uint16_t*>(p.dv) + kv_offset, kv_row_stride, sQ + S::kTileElems, key_rows,
                       args.vec_out);
}

// ---- 3. dQ -------------------------------------------------------------------------------------
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) sparse_attention_bwd_dq_kernel(const BwdArgs args) {
  using S = Shape<kHeadDim>;
  constexpr int kNTiles = kBlockN / kMmaN;  // n8 tiles of S (key columns)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);  // [Br][pitch], reused to stage dQ
  uint16_t* sdO = sQ + S::kTileElems;                    // [Br][pitch]
  uint16_t* sK = sdO + S::kTileElems;                    // [stages][Bc][pitch]
  uint16_t* sV = sK + kStages * S::kTileElems;           // [stages][Bc][pitch]

  const SparseAttentionBwdParams& p = args.p;
  // As the forward: head fastest (a GQA group's K / V shared in L2), query tile last first, then sequence.
  uint32_t bid = blockIdx.x;  // 32-bit arithmetic: the grid is < 2^31 CTAs
  const int h = static_cast<int>(bid % static_cast<uint32_t>(p.heads));
  bid /= static_cast<uint32_t>(p.heads);
  const int64_t m_block = args.num_m_blocks - 1 - bid % static_cast<uint32_t>(args.num_m_blocks);
  const int64_t seq = bid / static_cast<uint32_t>(args.num_m_blocks);

  int64_t b, q_begin, seqlen_q, k_begin, seqlen_k;
  sequence_rows(p, seq, b, q_begin, seqlen_q, k_begin, seqlen_k);
  const int64_t m0 = m_block * kBlockM;
  if (m0 >= seqlen_q) return;
  const int64_t rows = seqlen_q - m0 < kBlockM ? seqlen_q - m0 : kBlockM;
  const int kv_head = h / (p.heads / p.kv_heads);

  const uint16_t* q =
      static_cast<const uint16_t*>(p.q) + b * p.q_strides[0] + (q_begin + m0) * p.q_strides[1] + h * p.q_strides[2];
  const uint16_t* dout = static_cast<const uint16_t*>(p.dout) + b * p.dout_strides[0] +
                         (q_begin + m0) * p.dout_strides[1] + h * p.dout_strides[2];
  const uint16_t* k =
      static_cast<const uint16_t*>(p.k) + b * p.k_strides[0] + k_begin * p.k_strides[1] + kv_head * p.k_strides[2];
  const uint16_t* v =
      static_cast<const uint16_t*>(p.v) + b * p.v_strides[0] + k_begin * p.v_strides[1] + kv_head * p.v_strides[2];

  const int64_t i0 = m0 + seqlen_k - seqlen_q;
  const KeyTileWalk walk = make_key_tile_walk(p.mask, i0, i0 + rows, seqlen_k, kBlockN);

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;
  const int lane_in_group = lane % 4;
  const int warp_row0 = warp * kRowsPerWarp;
  const QueryMaskTerms query_terms[2] = {query_mask_terms(p.mask, i0 + warp_row0 + group),
                                         query_mask_terms(p.mask, i0 + warp_row0 + group + 8)};
  const LaneOffsets<kHeadDim> lanes(lane);
  const uint32_t q_a_addr = smem_addr(sQ + warp_row0 * S::kPitch) + lanes.a;  // this warp's 16 rows
  const uint32_t do_a_addr = smem_addr(sdO + warp_row0 * S::kPitch) + lanes.a;
  // lse (log2 units) and delta of this thread's two rows; rows past the sequence get P = 0.
  float row_lse[2], row_delta[2];
  const int64_t stats = (b * p.heads + h) * p.seqlen_q + q_begin + m0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + group + r * 8;
    row_lse[r] = row < rows ? args.lse_log2[stats + row] : INFINITY;
    row_delta[r] = row < rows ? args.delta[stats + row] : 0.0f;
  }

  float acc_dq[S::kDTiles][4];
#pragma unroll
  for (int d = 0; d < S::kDTiles; ++d)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc_dq[d][c] = 0.0f;

  // Prologue: Q, dO and the first visible K / V tile in one cp.async group.
  load_tile<kThreads, kHeadDim, kBlockM>(sQ, q, p.q_strides[1], rows, args.vec_in);
  load_tile<kThreads, kHeadDim, kBlockM>(sdO, dout, p.dout_strides[1], rows, args.vec_in);
  int64_t tile = next_key_tile(walk, 0);
  if (tile < walk.end) {
    const int64_t j0 = tile * kBlockN;
    load_tile<kThreads, kHeadDim, kBlockN>(sK, k + j0 * p.k_strides[1], p.k_strides[1], seqlen_k - j0, args.vec_in);
    load_tile<kThreads, kHeadDim, kBlockN>(sV, v + j0 * p.v_strides[1], p.v_strides[1], seqlen_k - j0, args.vec_in);
  }
  cp_async_commit();

  for (int stage = 0; tile < walk.end; stage ^= 1) {
    const int64_t next = next_key_tile(walk, tile + 1);
    __syncthreads();  // every warp is done with buffer stage ^ 1
    if (next < walk.end) {
      const int64_t j0 = next * kBlockN;
      load_tile<kThreads, kHeadDim, kBlockN>(sK + (stage ^ 1) * S::kTileElems, k + j0 * p.k_strides[1], p.k_strides[1],
                                             seqlen_k - j0, args.vec_in);
      load_tile<kThreads, kHeadDim, kBlockN>(sV + (stage ^ 1) * S::kTileElems, v + j0 * p.v_strides[1], p.v_strides[1],
                                             seqlen_k - j0, args.vec_in);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint16_t* k_s = sK + stage * S::kTileElems;
    const uint16_t* v_s = sV + stage * S::kTileElems;

    // P = exp2(S * scale * log2(e) - lse_log2), S = Q K^T: 16 rows x 64 keys per warp.
    float ps[kNTiles][4];
    const uint32_t k_addr = smem_addr(k_s), v_addr = smem_addr(v_s);
    gemm_scores<Element, kHeadDim, kNTiles>(ps, q_a_addr, k_addr + lanes.b);
    const int64_t j0 = tile * kBlockN;
    const bool full = j0 + kBlockN <= seqlen_k && tile_fully_visible(walk, j0, j0 + kBlockN);
    if (!full) {
      const int64_t first_global = first_global_key(p.mask, j0);
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = j0 + n * kMmaN + 2 * lane_in_group + e;
          const bool to_all = key_visible_to_all(p.mask, j, first_global);
#pragma unroll
          for (int r = 0; r < 2; ++r)
            if (j >= seqlen_k || !key_visible(p.mask, query_terms[r], j, to_all)) ps[n][2 * r + e] = -INFINITY;
        }
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) ps[n][c] = exp2f(fmaf(ps[n][c], args.scale_log2, -row_lse[c / 2]));

    // dS = P * (dP - delta), dP = dO V^T.
    float ds[kNTiles][4];
    gemm_scores<Element, kHeadDim, kNTiles>(ds, do_a_addr, v_addr + lanes.b);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) ds[n][c] = ps[n][c] * (ds[n][c] - row_delta[c / 2]);

    // dQ += dS K (times the softmax scale in the epilogue).
    gemm_accumulate<Element, kHeadDim, kNTiles>(acc_dq, ds, k_addr + lanes.b_trans);
    tile = next;
  }

  cp_async_wait<0>();
  __syncthreads();
  stage_accumulator<Element, kHeadDim>(sQ, acc_dq, p.softmax_scale, warp_row0, group, lane_in_group);
  __syncthreads();
  uint16_t* dq = static_cast<uint16_t*>(p.dq) + ((b * p.seqlen_q + q_begin + m0) * p.heads + h) * kHeadDim;
  store_tile<kHeadDim>(dq, static_cast<int64_t>(p.heads) * kHeadDim, sQ, rows, args.vec_out);
}

// ---- host side -------------------------------------------------------------------------------
template <typename Kernel>
Status launch_kernel(Kernel kernel, int64_t num_blocks, int threads, size_t smem, const BwdArgs& args,
                     cudaStream_t stream) {
  if (num_blocks <= 0) return Status::kOk;
  if (num_blocks > 2147483647LL) return Status::kUnsupported;  // gridDim.x limit
  // Above 48 KB (hd 128: ~102 KB) the kernel must opt in; cheap enough to repeat on every launch.
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess)
    return Status::kCudaError;
  kernel<<<static_cast<unsigned>(num_blocks), threads, smem, stream>>>(args);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

template <typename Element, int kHeadDim>
Status launch(const BwdArgs& args, int64_t units, cudaStream_t stream) {
  using S = Shape<kHeadDim>;
  const SparseAttentionBwdParams& p = args.p;
  constexpr int64_t kPreRowsPerBlock = kPreprocessThreads / (kHeadDim / kChunkElems);
  const int64_t num_rows = p.batch * p.seqlen_q * p.heads;
  Status st = launch_kernel(sparse_attention_bwd_preprocess_kernel<Element, kHeadDim>,
                            (num_rows + kPreRowsPerBlock - 1) / kPreRowsPerBlock, kPreprocessThreads, 0, args, stream);
  if (st != Status::kOk) return st;
  // dK/dV runs even when S = 0 (it writes the zeros); dQ only when there are queries.
  st = launch_kernel(sparse_attention_bwd_dkdv_kernel<Element, kHeadDim>, args.num_n_blocks * p.kv_heads * units,
                     kThreads, S::kDkvSmemBytes, args, stream);
  if (st != Status::kOk) return st;
  return launch_kernel(sparse_attention_bwd_dq_kernel<Element, kHeadDim>, args.num_m_blocks * p.heads * units, kThreads,
                       S::kDqSmemBytes, args, stream);
}

}  // namespace

size_t sparse_attention_bwd_workspace_bytes(int64_t batch, int32_t heads, int64_t seqlen_q) {
  if (batch <= 0 || heads <= 0 || seqlen_q <= 0) return 0;
  return 2 * sizeof(float) * static_cast<size_t>(batch) * static_cast<size_t>(heads) * static_cast<size_t>(seqlen_q);
}

Status sparse_attention_bwd(const SparseAttentionBwdParams& p, cudaStream_t stream) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return Status::kInvalidArgument;
  if (p.head_dim != 64 && p.head_dim != 128) return Status::kInvalidArgument;
  if (p.heads < 1 || p.kv_heads < 1 || p.heads % p.kv_heads != 0) return Status::kInvalidArgument;
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return Status::kInvalidArgument;
  // The dK/dV kernel's per-key masks are int32 row bounds (KeyColumnMask).
  if (p.seqlen_q > INT32_MAX || p.seqlen_k > INT32_MAX) return Status::kUnsupported;
  const bool varlen = p.cu_seqlens_q != nullptr;
  if (varlen != (p.cu_seqlens_k != nullptr)) return Status::kInvalidArgument;
  if (varlen && (p.batch != 1 || p.num_seqs < 0 || p.max_seqlen_q < 0 || p.max_seqlen_k < 0))
    return Status::kInvalidArgument;
  const int64_t units = varlen ? p.num_seqs : p.batch;
  const int64_t max_q = varlen ? p.max_seqlen_q : p.seqlen_q;
  const int64_t max_k = varlen ? p.max_seqlen_k : p.seqlen_k;
  if (units == 0 || (p.seqlen_q == 0 && p.seqlen_k == 0)) return Status::kOk;  // dq, dk and dv are empty
  if (p.seqlen_q > 0 && (p.q == nullptr || p.dout == nullptr || p.out == nullptr || p.lse == nullptr ||
                         p.dq == nullptr || p.workspace == nullptr || !aligned16(p.workspace)))
    return Status::kInvalidArgument;
  if (p.seqlen_k > 0 && (p.k == nullptr || p.v == nullptr || p.dk == nullptr || p.dv == nullptr))
    return Status::kInvalidArgument;

  BwdArgs args{};
  args.p = p;
  const int64_t stats = p.batch * p.heads * p.seqlen_q;
  args.delta = static_cast<float*>(p.workspace);
  args.lse_log2 = args.delta == nullptr ? nullptr : args.delta + stats;
  args.num_m_blocks = p.seqlen_q == 0 ? 0 : (max_q + kBlockM - 1) / kBlockM;
  args.num_n_blocks = (max_k + kBlockN - 1) / kBlockN;
  args.scale_log2 = p.softmax_scale * kLog2e;
  args.vec_in = (p.seqlen_q == 0 || (rows_aligned16(p.q, p.q_strides) && rows_aligned16(p.dout, p.dout_strides))) &&
                (p.seqlen_k == 0 || (rows_aligned16(p.k, p.k_strides) && rows_aligned16(p.v, p.v_strides)));
  args.vec_pre = p.seqlen_q == 0 || (rows_aligned16(p.dout, p.dout_strides) && rows_aligned16(p.out, p.out_strides));
  // Contiguous rows of D = 64 or 128 elements are 16-byte multiples: the bases decide.
  args.vec_out = (p.seqlen_q == 0 || aligned16(p.dq)) && (p.seqlen_k == 0 || (aligned16(p.dk) && aligned16(p.dv)));

  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64)
    return bf16 ? launch<__nv_bfloat16, 64>(args, units, stream) : launch<__half, 64>(args, units, stream);
  return bf16 ? launch<__nv_bfloat16, 128>(args, units, stream) : launch<__half, 128>(args, units, stream);
}

}  // namespace llama4::kernels
