// Sparse-global attention forward on CUDA: FlashAttention-2-style tiles on mma.sync tensor cores
// that visit only the key tiles the mask pattern can make visible (sliding window, Llama 4 chunks,
// strided global keys, sinks, causal), with bf16/fp16 inputs, fp32 accumulation and online softmax.
// Legend: B batch, S query positions, Sk key positions, H query heads, G kv heads, D head dim,
// Br = kBlockM query rows per CTA, Bc = kBlockN keys per tile.
//
// Design (sm_80+ instructions only, compiled for sm_90a):
//  * One CTA of 4 warps per (query tile of Br = 64 rows, head, batch or varlen sequence); each warp
//    owns 16 query rows. The grid is 1-D (heads fastest, then query tiles from the last one down,
//    then sequences): the CTAs that run together share their K/V (all heads of a GQA group, and
//    neighbouring windows) in L2, and with a causal mask the longest query tiles start first.
//  * Q (Br x D) stays in shared memory; K and V tiles (Bc x D) are double-buffered with cp.async,
//    so the next visible tile loads while the tensor cores work on this one. Rows are padded by
//    16 bytes so the ldmatrix reads of 8 rows hit 8 different bank groups.
//  * S = Q K^T and O += P V are mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix (.trans for V).
//    The softmax is in registers: the S accumulator layout of two n8 tiles is exactly the A
//    operand layout of one k16 step, so P goes from the softmax to the second MMA without shared
//    memory. Scores are pre-multiplied by softmax_scale * log2(e), so every exponential is one ex2.
//  * Sparsity: the key tiles of a query tile are walked by next_key_tile() (sparse_attention_tiles.cuh):
//    the window / chunk / sink ranges and the causal bound are turned into tile ranges once per
//    CTA, so stepping to the next visible tile costs a few compares (plus one division with a
//    global stride: one tile per global key when the stride exceeds Bc). The tiles visited are
//    exactly those mask_tile_may_be_visible() accepts, a superset of the tiles with a visible key
//    (checked by brute force against mask_visible() on small shapes, see the tiles header). Work
//    is O(S x visible keys), never O(S^2) for local
//    patterns, and no S x S mask exists anywhere. Only tiles that are not provably fully visible
//    (tile_fully_visible: the diagonal, window and chunk edges, global-key tiles) pay for
//    the per-element mask, which is mask_visible() split into per-query terms computed once and
//    per-key compares (key_visible(); no division per element).
//  * Numerics: a row whose running max is still -inf uses 0 as its exponent base, so exp2(-inf)
//    gives 0 instead of exp2(-inf - -inf) = NaN; a row with no visible key ends with sum 0 and
//    writes out = 0, lse = -inf. Padding rows of K/V (past Sk) are zero-filled so that P = 0 times
//    V stays 0 (stale shared memory could hold a NaN bit pattern).
//
// Left for the Hopper version (sparse_attention_fwd_sm90 proper): TMA loads and wgmma reading its
// operands from shared memory (mma.sync needs every operand staged through registers by
// ldmatrix, and its 16x8x16 shape issues many more instructions per flop), warp-specialised
// producer/consumer warpgroups with a deeper K/V pipeline, Br = 128 per consumer warpgroup,
// softmax overlapped with the next tile's GEMM (ping-pong), and an FP8 path. Also: a persistent
// scheduler that balances causal work, and a split along keys for long rows with few query tiles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "mma_sm80.cuh"
#include "sparse_attention.h"
#include "sparse_attention_common.cuh"
#include "sparse_attention_tiles.cuh"

namespace llama4::kernels {
namespace {

using namespace attention_sm80;  // cp.async, tile loads, sequence decoding, kChunkElems, kSmemPadElems

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlockM = 64;       // query rows per CTA: 4 warps of 16 rows
constexpr int kBlockN = 64;       // keys per tile: 8 n8 MMA tiles of S per warp (32 fp32 registers)
constexpr int kRowsPerWarp = 16;  // the M of one m16n8k16 MMA
constexpr int kWarps = kBlockM / kRowsPerWarp;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMmaK = 16;      // K of one m16n8k16 MMA
constexpr int kMmaN = 8;       // N of one m16n8k16 MMA
constexpr int kStages = 2;     // K/V buffers: load tile n+1 while computing tile n
constexpr int kKVTensors = 2;  // K and V
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(kBlockM % kRowsPerWarp == 0, "whole m16 row blocks per warp");
static_assert(kBlockN % (2 * kMmaN) == 0, "S tiles are processed in pairs (one k16 step of P V)");

template <int kHeadDim>
struct Shape {
  static constexpr int kPitch = kHeadDim + kSmemPadElems;  // shared-memory row pitch in elements
  static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  static constexpr int kDTiles = kHeadDim / kMmaN;  // n8 tiles of the output accumulator
  static constexpr int kSTiles = kBlockN / kMmaN;   // n8 tiles of the score accumulator
  static constexpr int kQTileElems = kBlockM * kPitch;
  static constexpr int kKVTileElems = kBlockN * kPitch;
  static constexpr size_t kSmemBytes = sizeof(uint16_t) * (kQTileElems + kKVTensors * kStages * kKVTileElems);
};

// What the kernel needs beyond the launcher's parameters, computed once on the host.
struct FwdArgs {
  SparseAttentionParams p;
  int64_t num_m_blocks;  // query tiles per (sequence, head) in the grid
  float scale_log2;      // softmax_scale * log2(e)
  bool vec_in;           // q, k, v rows are 16-byte aligned: cp.async, else element copies
  bool vec_out;          // out rows are 16-byte aligned: 16-byte stores, else element stores
};

// ---- PTX wrappers ----------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

using mma_sm80::MmaOps;  // the element type's MMA and its fp32 -> 2 x 16-bit packing

// ---- the kernel ------------------------------------------------------------------------------
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) sparse_attention_fwd_kernel(const FwdArgs args) {
  using S = Shape<kHeadDim>;
  using Ops = MmaOps<Element>;
  constexpr int kPitch = S::kPitch;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);  // [Br][pitch], reused to stage O
  uint16_t* sK = sQ + S::kQTileElems;                    // [stages][Bc][pitch]
  uint16_t* sV = sK + kStages * S::kKVTileElems;         // [stages][Bc][pitch]

  const SparseAttentionParams& p = args.p;
  // Decode the 1-D block index: head fastest, then query tile (last first), then sequence.
  int64_t bid = blockIdx.x;
  const int h = static_cast<int>(bid % p.heads);
  bid /= p.heads;
  const int64_t m_block = args.num_m_blocks - 1 - bid % args.num_m_blocks;
  const int64_t seq = bid / args.num_m_blocks;

  int64_t b, q_begin, seqlen_q, k_begin, seqlen_k;  // q_begin / k_begin: first row of the sequence
  sequence_rows(p, seq, b, q_begin, seqlen_q, k_begin, seqlen_k);
  const int64_t m0 = m_block * kBlockM;
  if (m0 >= seqlen_q) return;  // past this sequence's queries (varlen grids cover the longest one)
  const int64_t rows = seqlen_q - m0 < kBlockM ? seqlen_q - m0 : kBlockM;
  const int kv_head = h / (p.heads / p.kv_heads);

  const uint16_t* q =
      static_cast<const uint16_t*>(p.q) + b * p.q_strides[0] + (q_begin + m0) * p.q_strides[1] + h * p.q_strides[2];
  const uint16_t* k =
      static_cast<const uint16_t*>(p.k) + b * p.k_strides[0] + k_begin * p.k_strides[1] + kv_head * p.k_strides[2];
  const uint16_t* v =
      static_cast<const uint16_t*>(p.v) + b * p.v_strides[0] + k_begin * p.v_strides[1] + kv_head * p.v_strides[2];

  // Query row r of the sequence sits at position r + Sk - Sq (bottom-right alignment).
  const int64_t i0 = m0 + seqlen_k - seqlen_q;
  const int64_t i1 = i0 + rows;
  const KeyTileWalk walk = make_key_tile_walk(p.mask, i0, i1, seqlen_k, kBlockN);

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;          // MMA fragment row (and row + 8)
  const int lane_in_group = lane % 4;  // MMA fragment column pair
  const int warp_row0 = warp * kRowsPerWarp;
  // mask_visible() split into per-query terms (computed once here) and per-key compares.
  const QueryMaskTerms query_terms[2] = {query_mask_terms(p.mask, i0 + warp_row0 + group),
                                         query_mask_terms(p.mask, i0 + warp_row0 + group + 8)};

  float acc_o[S::kDTiles][4];
#pragma unroll
  for (int d = 0; d < S::kDTiles; ++d)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc_o[d][c] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows group and group + 8, in scaled log2 units
  float row_sum[2] = {0.0f, 0.0f};            // this thread's partial sums (its 2 columns per n8 tile)

  // Prologue: Q and the first visible K/V tile in one cp.async group.
  load_tile<kThreads, kHeadDim, kBlockM>(sQ, q, p.q_strides[1], rows, args.vec_in);
  int64_t tile = next_key_tile(walk, 0);
  if (tile < walk.end) {
    const int64_t j0 = tile * kBlockN;
    load_tile<kThreads, kHeadDim, kBlockN>(sK, k + j0 * p.k_strides[1], p.k_strides[1], seqlen_k - j0, args.vec_in);
    load_tile<kThreads, kHeadDim, kBlockN>(sV, v + j0 * p.v_strides[1], p.v_strides[1], seqlen_k - j0, args.vec_in);
  }
  cp_async_commit();

  for (int stage = 0; tile < walk.end; stage ^= 1) {
    const int64_t next = next_key_tile(walk, tile + 1);
    __syncthreads();  // every warp is done with buffer stage ^ 1 (read in the previous iteration)
    if (next < walk.end) {
      const int64_t j0 = next * kBlockN;
      load_tile<kThreads, kHeadDim, kBlockN>(sK + (stage ^ 1) * S::kKVTileElems, k + j0 * p.k_strides[1],
                                             p.k_strides[1], seqlen_k - j0, args.vec_in);
      load_tile<kThreads, kHeadDim, kBlockN>(sV + (stage ^ 1) * S::kKVTileElems, v + j0 * p.v_strides[1],
                                             p.v_strides[1], seqlen_k - j0, args.vec_in);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning "this tile"
    cp_async_wait<1>();
    __syncthreads();  // this tile's K/V (and Q) from every thread are in shared memory

    const uint16_t* k_s = sK + stage * S::kKVTileElems;
    const uint16_t* v_s = sV + stage * S::kKVTileElems;

    // S = Q K^T for this warp's 16 rows x Bc keys.
    float s[S::kSTiles][4];
#pragma unroll
    for (int n = 0; n < S::kSTiles; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[n][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
      uint32_t a[4];  // 8x8 matrices: rows 0-7 / 8-15 x cols 0-7, then the same at cols 8-15
      ldmatrix_x4(a, sQ + (warp_row0 + lane % 16) * kPitch + kk * kMmaK + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < S::kSTiles / 2; ++np) {
        uint32_t bk[4];  // keys 0-7 x d 0-7, keys 0-7 x d 8-15, keys 8-15 x d 0-7, keys 8-15 x d 8-15
        ldmatrix_x4(bk, k_s + (np * 16 + (lane / 16) * 8 + lane % 8) * kPitch + kk * kMmaK + ((lane / 8) % 2) * 8);
        Ops::mma(s[2 * np], a, bk[0], bk[1]);
        Ops::mma(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    // Scale, then mask unless the whole tile is provably visible (interior tiles). The mask is
    // mask_visible() exactly (key_visible() equals it; the host test checks every element).
    const int64_t j0 = tile * kBlockN;
    const bool full = j0 + kBlockN <= seqlen_k && tile_fully_visible(walk, j0, j0 + kBlockN);
#pragma unroll
    for (int n = 0; n < S::kSTiles; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[n][c] *= args.scale_log2;
    if (!full) {
      const int64_t first_global = first_global_key(p.mask, j0);
#pragma unroll
      for (int n = 0; n < S::kSTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {  // the thread's two columns of n8 tile n, for both its rows
          const int64_t j = j0 + n * kMmaN + 2 * lane_in_group + e;
          const bool to_all = key_visible_to_all(p.mask, j, first_global);
#pragma unroll
          for (int r = 0; r < 2; ++r)
            if (j >= seqlen_k || !key_visible(p.mask, query_terms[r], j, to_all)) s[n][2 * r + e] = -INFINITY;
        }
    }

    // Online softmax per row; the 4 lanes of a group hold a row's 64 columns between them.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int n = 0; n < S::kSTiles; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float base = mx == -INFINITY ? 0.0f : mx;  // all masked so far: exp2(-inf - 0) = 0, not NaN
      const float alpha = exp2f(row_max[r] - base);    // 0 while the row had no visible key
      row_max[r] = mx;
      row_sum[r] *= alpha;
#pragma unroll
      for (int d = 0; d < S::kDTiles; ++d) {
        acc_o[d][2 * r] *= alpha;
        acc_o[d][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int n = 0; n < S::kSTiles; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
        row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];
      }
    }

    // O += P V: S tiles 2kk and 2kk+1 (fp32 C layout) are the A operand of k16 step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / kMmaK; ++kk) {
      uint32_t a[4];
      a[0] = Ops::pack(s[2 * kk][0], s[2 * kk][1]);          // row group,     keys 2l, 2l+1
      a[1] = Ops::pack(s[2 * kk][2], s[2 * kk][3]);          // row group + 8, keys 2l, 2l+1
      a[2] = Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);  // row group,     keys 8+2l, 8+2l+1
      a[3] = Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);  // row group + 8, keys 8+2l, 8+2l+1
#pragma unroll
      for (int dp = 0; dp < S::kDTiles / 2; ++dp) {
        uint32_t bv[4];  // transposed: keys 0-7 / 8-15 x d 0-7, then keys 0-7 / 8-15 x d 8-15
        ldmatrix_x4_trans(bv,
                          v_s + (kk * kMmaK + ((lane / 8) % 2) * 8 + lane % 8) * kPitch + dp * 16 + (lane / 16) * 8);
        Ops::mma(acc_o[2 * dp], a, bv[0], bv[1]);
        Ops::mma(acc_o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    tile = next;
  }

  // Epilogue. Drain the copies first: with no visible tile the Q load may still be in flight,
  // and any thread's copy may target the rows another warp is about to overwrite.
  cp_async_wait<0>();
  __syncthreads();
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;  // no visible key: out = 0
    const int64_t row = warp_row0 + group + r * 8;
    if (p.lse != nullptr && lane_in_group == 0 && row < rows) {
      // lse of the scaled scores in natural log: max * ln2 + ln(sum of exp2(x - max)).
      const float lse = sum > 0.0f ? row_max[r] * kLn2 + logf(sum) : -INFINITY;
      p.lse[(b * p.heads + h) * p.seqlen_q + q_begin + m0 + row] = lse;
    }
  }
  // Stage O through sQ so that the global stores are whole 16-byte row chunks.
#pragma unroll
  for (int d = 0; d < S::kDTiles; ++d)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + group + r * 8;
      const int col = d * kMmaN + 2 * lane_in_group;
      *reinterpret_cast<uint32_t*>(sQ + row * kPitch + col) =
          Ops::pack(acc_o[d][2 * r] * inv[r], acc_o[d][2 * r + 1] * inv[r]);
    }
  __syncthreads();
  uint16_t* out = static_cast<uint16_t*>(p.out) + ((b * p.seqlen_q + q_begin + m0) * p.heads + h) * kHeadDim;
  const int64_t out_row_stride = static_cast<int64_t>(p.heads) * kHeadDim;
  constexpr int kOutChunks = kBlockM * S::kChunksPerRow;
#pragma unroll
  for (int it = 0; it < kOutChunks / kThreads; ++it) {
    const int c = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = c / S::kChunksPerRow;
    const int col = (c % S::kChunksPerRow) * kChunkElems;
    if (r >= rows) continue;
    const uint16_t* from = sQ + r * kPitch + col;
    uint16_t* to = out + r * out_row_stride + col;
    if (args.vec_out) {
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
    } else {
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) to[e] = from[e];
    }
  }
}

// ---- host side -------------------------------------------------------------------------------
template <typename Element, int kHeadDim>
Status launch(const FwdArgs& args, int64_t num_blocks, cudaStream_t stream) {
  const auto kernel = sparse_attention_fwd_kernel<Element, kHeadDim>;
  const size_t smem = Shape<kHeadDim>::kSmemBytes;
  // Above 48 KB (hd 128: 85 KB) the kernel must opt in; cheap enough to repeat on every launch.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess)
    return Status::kCudaError;
  kernel<<<static_cast<unsigned>(num_blocks), kThreads, smem, stream>>>(args);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace

Status sparse_attention_fwd(const SparseAttentionParams& p, cudaStream_t stream) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return Status::kInvalidArgument;
  if (p.head_dim != 64 && p.head_dim != 128) return Status::kInvalidArgument;
  if (p.heads < 1 || p.kv_heads < 1 || p.heads % p.kv_heads != 0) return Status::kInvalidArgument;
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return Status::kInvalidArgument;
  const bool varlen = p.cu_seqlens_q != nullptr;
  if (varlen != (p.cu_seqlens_k != nullptr)) return Status::kInvalidArgument;
  if (varlen && (p.batch != 1 || p.num_seqs < 0 || p.max_seqlen_q < 0)) return Status::kInvalidArgument;
  const int64_t units = varlen ? p.num_seqs : p.batch;
  const int64_t max_q = varlen ? p.max_seqlen_q : p.seqlen_q;
  if (units == 0 || max_q == 0 || p.seqlen_q == 0) return Status::kOk;  // out and lse are empty
  if (p.q == nullptr || p.out == nullptr) return Status::kInvalidArgument;
  if (p.seqlen_k > 0 && (p.k == nullptr || p.v == nullptr)) return Status::kInvalidArgument;

  FwdArgs args{};
  args.p = p;
  args.num_m_blocks = (max_q + kBlockM - 1) / kBlockM;
  args.scale_log2 = p.softmax_scale * kLog2e;
  args.vec_in = rows_aligned16(p.q, p.q_strides) &&
                (p.seqlen_k == 0 || (rows_aligned16(p.k, p.k_strides) && rows_aligned16(p.v, p.v_strides)));
  args.vec_out = aligned16(p.out);  // contiguous rows of D = 64 or 128 elements: 16-byte multiples
  const int64_t num_blocks = args.num_m_blocks * p.heads * units;
  if (num_blocks > 2147483647LL) return Status::kUnsupported;  // gridDim.x limit

  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64)
    return bf16 ? launch<__nv_bfloat16, 64>(args, num_blocks, stream) : launch<__half, 64>(args, num_blocks, stream);
  return bf16 ? launch<__nv_bfloat16, 128>(args, num_blocks, stream) : launch<__half, 128>(args, num_blocks, stream);
}

}  // namespace llama4::kernels
