// Sparse-global attention decode on CUDA (sparse_attention_decode_sm90): one new query token per
// sequence against a KV cache (bf16, fp16 or FP8 e4m3 with per-kv-head scales), split over the
// keys (flash-decoding) so that a million-key cache keeps every SM streaming.
// Legend: B batch, Smax cache slots, H query heads, G kv heads, R = H / G query heads per kv head,
// D head dim (64 or 128), N splits of the key range. Built for sm_90a with sm_80+ instructions
// (mma.sync) plus the sm_89+ FP8 -> f16 conversion.
//
// Design (two launches, no host synchronisation):
//  * Pass 1 (decode_split_kernel): one CTA of 4 warps per (kv head g, up to 16 of its query heads,
//    split s, sequence b). The CTA reads every key of its slot range ONCE for all of its query heads:
//    the 16 query heads are the M rows of m16n8k16 tensor-core MMAs, so a GQA group (Llama 4: 40/8 =
//    5 heads) costs one pass over K/V, not five. S = Q K^T has keys as the MMA's N and D as its K;
//    O += P V has keys as the K. Both are fed straight from global memory into registers, with no
//    shared memory: each lane's fragment needs contiguous bytes of one cache row once the head-dim
//    axis is permuted (an MMA's reduction index and output column may map to any head dim, as long
//    as both operands agree), so every load is a 16-byte vector load (8 bf16 or 16 fp8):
//      - K: lane (grp, tig) loads dims [tig*D/4, (tig+1)*D/4) of key (n-tile*8 + grp); its B
//        fragment for k-step ks is dims tig*D/4 + 4*ks + {0,1 | 2,3}, and Q's A fragment uses the same
//        permutation.
//      - V: lane (grp, tig) loads dims [grp*D/8, (grp+1)*D/8) of keys 16p + 2tig + {0, 1, 8, 9}; the B
//        fragment of d-tile dt is column n = grp <-> dim grp*D/8 + dt, and pairs of keys are packed into
//        one register with a byte permute (PRMT). FP8 bytes are paired the same way and widened with one
//        cvt.rn.f16x2.e4m3x2 (exact: every e4m3 value is an f16).
//    Each warp walks its own steps of 16 keys (2-byte caches) or 32 keys (FP8): 8 KB of K/V per step
//    at D = 128 either way. The loads of step i+1 are issued while step i computes (K right after
//    S = Q K^T, V right after O += P V), so every warp keeps up to two steps of loads in flight, and a
//    slot that is masked, empty or past the range is never loaded at all (its registers are zero).
//    Per head row: running max, sum and a D-wide fp32 accumulator (online softmax in the log2
//    domain, scores pre-multiplied by softmax_scale * log2(e) * k_scale). At the end the 4 warps
//    merge through shared memory and the CTA writes one partial (max, sum, acc[D]) per head, or,
//    with a single split, the final output directly (no second launch).
//  * Pass 2 (decode_combine_kernel): one warp per (b, h) merges the N partials in a fixed order
//    (deterministic, no atomics): out = sum_s acc_s 2^(m_s - m) / sum_s l_s 2^(m_s - m), lse = m + log(l).
//  * Slot ranges: with no key_positions and no global stride, the visible slots of a sequence lie in
//    [0, sinks) u [lo, hi) (hi: the causal bound / cache length; lo: the start of the window or the
//    query's chunk), so only those are visited, and the N splits divide each sequence's own work
//    (not [0, Smax), so ragged batches stay balanced): a 1M-slot cache with a window of 8K reads 8K
//    keys, spread over every split. A split with nothing to do writes an empty partial. Every visited slot
//    is still tested with the exact rule (mask_visible via key_visible), so the ranges only need to
//    be a superset. With key_positions (ring buffers, global-only caches) all of [0, len) is tested.
//  * Numerics: fp32 accumulation; P is rounded to the MMA type (bf16 for a bf16 cache, f16 otherwise),
//    as in FlashAttention. The MMA type is the cache's (f16 for FP8); a bf16 or fp32 query going into
//    an f16 MMA is first scaled per head by a power of two so that max|q| lies in [2^14, 2^15) (no
//    overflow; exact for bf16 q, fp32 q is rounded to f16's 11 bits), and the score undoes it. A q
//    dtype other than the 16-bit cache's is rounded to the cache's type (the bindings forbid that). A head with no used
//    slot gets out = 0 and lse = -inf; an all-masked step or split contributes exactly 0 (every exponent base of -inf
//    is replaced by 0, so -inf - -inf never happens), and unloaded V rows are zero, so garbage in an empty slot cannot
//    turn P = 0 into NaN.
//
// Why this should reach HBM bandwidth (not yet measured on a GPU): each byte of K/V is read once per
// kv head (GQA sharing through the MMA rows), with 16-byte loads; each warp keeps up to two 8 KB
// steps in flight and an SM runs 8 warps (2 CTAs), ~128 KB in flight per SM against the ~30 KB
// Little's law asks for. The arithmetic per byte is small on tensor cores: with FP8 and 5 query
// heads, CUDA-core FP32 would need ~10 FMA per byte, near the FP32 peak at HBM3 rates, while the
// MMAs plus conversions use well under a quarter of the issue slots. The number of splits is
// chosen so that the CTAs fill whole waves (see sparse_attention_decode_num_splits).
//
// Left for later: paged caches (a block table indirection per slot group), TMA / cp.async.bulk
// streaming of K/V with a deeper pipeline (fewer registers in flight, larger steps), FP8 MMAs
// (would need P and Q in FP8), per-page scales, and choosing N from the measured occupancy.
// With a global stride and no key_positions, every slot below the causal bound is visited (only
// the visible ones are loaded); a strided-global cache should store only its global keys and pass
// their key_positions, which the KV cache class does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mma_sm80.cuh"
#include "sparse_attention_decode.h"
#include "sparse_attention_tiles.cuh"

namespace llama4::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = 4;  // warps per split CTA: each walks its own key steps, merged at the end
constexpr int kThreads = kWarps * kWarpSize;
// Two CTAs per SM keep 8 warps (~16 steps of 8 KB) of loads in flight per SM, well above what
// Little's law asks for at HBM3 latency; the accumulators take ~64 + 32 registers a thread.
constexpr int kMinCtasPerSm = 2;
constexpr int kHeadRows = 16;         // query heads per CTA: the M of one m16n8k16 MMA
constexpr int kMmaN = 8;              // N of one m16n8k16 MMA
constexpr int kMmaK = 16;             // K of one m16n8k16 MMA
constexpr int kStepBytesPerDim = 32;  // a step holds 32 bytes of each key dim: 16 keys of 2 bytes, 32 of FP8
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// An f16 MMA operand converted from bf16/fp32 is scaled by 2^shift so that its row max lies in
// [2^14, 2^15): f16's largest finite value is 65504 < 2^16. The shift is clamped so that 2^shift
// and 2^-shift are normal floats; a row beyond that range is absurd (|q| < 2^-50 or > 2^78).
constexpr int kF16TopExponent = 14;
constexpr int kMaxQShift = 64;
// Split heuristics (sparse_attention_decode_num_splits): N minimises a wave model, waves(N) *
// (slots per split + kSplitOverheadSlots), where a wave is the kMinCtasPerSm * SMs CTAs resident at
// once and kSplitOverheadSlots prices a CTA's fixed cost (Q load, first-load latency, merge) in
// streamed slots. So one sequence of 8 kv heads on 132 SMs gets N = 33: exactly one full wave,
// where N = 35 would need a second, nearly empty one. No split under kMinSplitSlots slots, at most
// kMaxSplits (the combine reads N partials per head).
constexpr int64_t kMinSplitSlots = 256;
constexpr int64_t kSplitOverheadSlots = 256;
constexpr int kMaxSplits = 128;
constexpr int kCombineWarps = 4;  // combine: one warp per (b, h)

static_assert(kWarps * kWarpSize == kThreads, "whole warps");

// ---- cache element types -----------------------------------------------------------------------
struct Bf16Cache {
  using Mma = __nv_bfloat16;
  static constexpr int kBytes = 2;
  static constexpr bool kFp8 = false;
};
struct F16Cache {
  using Mma = __half;
  static constexpr int kBytes = 2;
  static constexpr bool kFp8 = false;
};
struct Fp8Cache {
  using Mma = __half;  // e4m3 -> f16 is exact (and one instruction per pair)
  static constexpr int kBytes = 1;
  static constexpr bool kFp8 = true;
};

template <typename Cache, int kHeadDim>
struct Shape {
  static constexpr int kBytes = Cache::kBytes;
  static constexpr int kStepKeys = kStepBytesPerDim / kBytes;  // keys per warp step: 16 or 32
  static constexpr int kNTiles = kStepKeys / kMmaN;            // n8 tiles of S per step
  static constexpr int kPvSteps = kStepKeys / kMmaK;           // k16 steps of P V per step
  static constexpr int kKSteps = kHeadDim / kMmaK;             // k16 steps of Q K^T
  static constexpr int kDTiles = kHeadDim / kMmaN;             // n8 tiles of O
  static constexpr int kKWords = kHeadDim / 4 * kBytes / 4;    // a lane's K slice (D/4 dims), 32-bit words
  static constexpr int kVWords = kHeadDim / 8 * kBytes / 4;    // a lane's V slice (D/8 dims)
  static constexpr int kQWords = kHeadDim / 4 * 2 / 4;         // a lane's Q slice, 2-byte q
  static constexpr int kQWords32 = kHeadDim / 4;               // a lane's Q slice, fp32 q
  static constexpr int kAccPitch = kHeadDim + 8;  // floats per row of the merge buffer: float2 stores conflict-free
  static_assert(kStepKeys <= kWarpSize, "one lane tests one key of a step");
  static_assert(kPvSteps * kMmaK == kStepKeys && kNTiles == 2 * kPvSteps, "S tiles pair up into P V k-steps");
  static_assert(kBytes == 2 ? kKWords == 2 * kKSteps : kKWords == kKSteps, "one or two K words per k-step");
  static_assert(kBytes == 2 ? 2 * kVWords == kDTiles : 4 * kVWords == kDTiles, "V dims per word");
};

// ---- fragment index maps (host+device: the layout is the whole trick, keep it in one place) -----
// m16n8k16 fragments (PTX ISA), with grp = lane / 4 and tig = lane % 4:
//   A (16 x 16, row): {a0,a1} (grp, 2tig..+1), {a2,a3} (grp+8, 2tig..), {a4,a5} (grp, 2tig+8..), {a6,a7} (grp+8,
//   2tig+8..) B (16 x 8, col):  {b0,b1} (k = 2tig..+1, n = grp), {b2,b3} (k = 2tig+8..+9, n = grp) C (16 x 8): {c0,c1}
//   (grp, 2tig..+1), {c2,c3} (grp+8, 2tig..+1)
// Key (within a step) of the K row that lane (grp, .) loads for S n-tile j: B's column n = grp.
LLAMA4_ATTN_HD int k_row_key(int j, int grp) {
  return j * kMmaN + grp;
}
// Key of S accumulator element c of n-tile j: C's column 2tig + (c & 1).
LLAMA4_ATTN_HD int s_col_key(int j, int c, int tig) {
  return j * kMmaN + 2 * tig + (c & 1);
}
// Key of V row r (0..3) that lane (., tig) loads for P V k-step pv: B's rows 2tig, 2tig+1, 2tig+8,
// 2tig+9 of the k16 step, which are the keys of A = P's columns (S n-tiles 2pv and 2pv + 1).
LLAMA4_ATTN_HD int v_row_key(int pv, int r, int tig) {
  return pv * kMmaK + 2 * tig + (r & 1) + 8 * (r >> 1);
}
// Head dim of MMA column n of O d-tile dt (lane grp loads dims [grp*D/8, (grp+1)*D/8) of V).
LLAMA4_ATTN_HD int o_dim(int dt, int n, int head_dim) {
  return n * (head_dim / kMmaN) + dt;
}
// Q K^T needs no map function: lane tig's Q and K slices are dims [tig*D/4, (tig+1)*D/4), and
// reduction index k = 2tig + e of k-step ks is slice element 4ks + e, k = 2tig + 8 + e is 4ks + 2 + e.

// The slots of one sequence that can hold a visible key, as a list of "virtual" indices
// [0, total): v < sink_end is slot v, the rest is slot v - sink_end + main_lo. The splits divide
// [0, total), so a sliding window over a long cache is spread over every split.
struct SlotRanges {
  int64_t sink_end;  // slots [0, sink_end): sinks
  int64_t main_lo;   // slots [main_lo, main_lo + total - sink_end); main_lo >= sink_end
  int64_t total;
  LLAMA4_ATTN_HD int64_t slot(int64_t v) const { return v < sink_end ? v : v - sink_end + main_lo; }
};

LLAMA4_ATTN_HD int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}
LLAMA4_ATTN_HD int64_t max64(int64_t a, int64_t b) {
  return a > b ? a : b;
}

// A superset of the slots j < seqlen with mask_visible(m, qpos, position(j)). Without key_positions
// a slot is its position, and the visible keys (no global stride) are sinks [0, N), the window
// [qpos - W + 1, .) and the query's chunk [floor(qpos / C) * C, + C), all below the causal bound;
// window and chunk both reach up to the bound (causal) or the window is unbounded (non-causal),
// so their union is one interval. With key_positions, or a global stride, every valid slot.
LLAMA4_ATTN_HD SlotRanges visible_slot_ranges(const AttentionMask& m, int64_t qpos, int64_t seqlen,
                                              bool has_key_positions) {
  if (seqlen <= 0) return {0, 0, 0};
  if (has_key_positions) return {0, 0, seqlen};
  const int64_t limit = m.causal ? min64(seqlen, qpos + 1) : seqlen;  // slots >= limit: never visible
  if (limit <= 0) return {0, 0, 0};
  if (!mask_has_pattern(m) || m.global_stride > 0) return {0, 0, limit};
  int64_t lo = limit;  // the window / chunk interval [lo, hi), empty until a pattern opens it
  int64_t hi = limit;
  if (m.window > 0) lo = min64(lo, qpos - m.window + 1);
  if (m.chunk > 0) {
    const int64_t chunk_lo = floor_div(qpos, m.chunk) * m.chunk;
    lo = min64(lo, chunk_lo);
    if (!m.causal && m.window <= 0) hi = min64(hi, chunk_lo + m.chunk);  // the chunk alone bounds it above
  }
  lo = max64(lo, 0);
  const int64_t sink_end = m.sinks > 0 ? min64(m.sinks, limit) : 0;
  lo = max64(lo, sink_end);  // the sinks cover the overlap: [0, sink_end) u [lo, hi) is unchanged
  hi = max64(hi, lo);
  return {sink_end, lo, sink_end + (hi - lo)};
}

// Virtual range [v0, v1) of split `split` of `splits`: equal parts of [0, total), in whole warp
// steps so that a step never straddles two CTAs. v0 >= total: an empty split.
LLAMA4_ATTN_HD void split_range(int64_t total, int64_t splits, int64_t split, int64_t step_keys, int64_t& v0,
                                int64_t& v1) {
  int64_t per_split = (total + splits - 1) / splits;
  per_split = (per_split + step_keys - 1) / step_keys * step_keys;
  v0 = split * per_split;
  v1 = min64(v0 + per_split, total);
  if (v1 < v0) v1 = v0;
}

// Is a key at position kpos used by the query (terms = query_mask_terms(m, qpos))? Exactly
// mask_visible(m, qpos, kpos), with a negative position meaning an empty slot. Positions are
// below 2^31 (int32 key_positions, or slots < kMaxSlots), so the stride test is 32-bit.
LLAMA4_ATTN_HD bool key_used(const AttentionMask& m, const QueryMaskTerms& terms, int64_t kpos) {
  if (kpos < 0) return false;
  const bool to_all =
      (m.sinks > 0 && kpos < m.sinks) ||
      (m.global_stride > 0 && static_cast<uint32_t>(kpos) % static_cast<uint32_t>(m.global_stride) == 0u);
  return key_visible(m, terms, kpos, to_all);
}

// 2^shift bringing a row with max |x| = amax into [2^14, 2^15) (0 for a zero or NaN row).
LLAMA4_ATTN_HD int f16_range_shift(float amax) {
  if (!(amax > 0.0f)) return 0;
  uint32_t bits;
  memcpy(&bits, &amax, sizeof(bits));
  const int exponent = static_cast<int>((bits >> 23) & 0xffu) - 127;  // amax in [2^e, 2^(e+1)) when normal
  const int shift = kF16TopExponent - exponent;
  return shift < -kMaxQShift ? -kMaxQShift : (shift > kMaxQShift ? kMaxQShift : shift);
}

LLAMA4_ATTN_HD float pow2f(int e) {  // exact for e in [-126, 127]
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---- device helpers ----------------------------------------------------------------------------
using mma_sm80::MmaOps;  // the element type's MMA and its fp32 -> 2 x 16-bit packing

// Two e4m3 bytes (the low one in bits 0-7) -> f16x2 (the low byte's value in the low half). Exact.
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t pair) {
  uint32_t r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(r) : "h"(static_cast<uint16_t>(pair & 0xffffu)));
  return r;
}

// One lane's 16-byte A fragment from shared memory. volatile: read at every use, so the Q fragments
// stay in shared memory instead of being hoisted into 32 registers that the K/V loads in flight need.
__device__ __forceinline__ void lds_fragment(uint32_t (&a)[4], const uint4* src) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(src))));
}

// Loads kWords 32-bit words (byte i of the slice in byte i % 4 of word i / 4) from src, or zeros
// when !valid (then nothing is read). vec: src is aligned to the vector width (16 bytes, or 8 for
// a two-word slice); otherwise byte loads, for caches with strides that are not 16-byte multiples.
template <int kWords>
__device__ __forceinline__ void load_words(uint32_t (&w)[kWords], const unsigned char* src, bool valid, bool vec) {
  static_assert(kWords % 4 == 0 || kWords == 2, "16-byte chunks, or one 8-byte chunk");
  if (!valid) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
    return;
  }
  if (vec) {
    if constexpr (kWords % 4 == 0) {
#pragma unroll
      for (int c = 0; c < kWords / 4; ++c) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(src) + c);
        w[4 * c] = x.x;
        w[4 * c + 1] = x.y;
        w[4 * c + 2] = x.z;
        w[4 * c + 3] = x.w;
      }
    } else {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(src));
      w[0] = x.x;
      w[1] = x.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      uint32_t word = 0u;
#pragma unroll
      for (int k = 0; k < 4; ++k) word |= static_cast<uint32_t>(__ldg(src + 4 * i + k)) << (8 * k);
      w[i] = word;
    }
  }
}

// Two 2-byte q values of one word -> floats (lower index in the low half).
__device__ __forceinline__ void unpack_q2(uint32_t w, bool bf16, float& lo, float& hi) {
  if (bf16) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
}

__device__ __forceinline__ void store_out(void* out, int64_t i, float v, DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v); break;
    case DType::kFloat16: static_cast<__half*>(out)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

// What the kernels need beyond the launcher's parameters, computed once on the host.
struct DecodeArgs {
  SparseDecodeParams p;
  int32_t num_splits;
  int32_t group_size;        // R = H / G
  int32_t head_blocks;       // ceil(R / 16): CTAs per (b, g, split), each for up to 16 query heads
  int64_t partials;          // B * H * N: rows of the workspace
  float scale_log2;          // softmax_scale * log2(e)
  bool vec_q, vec_k, vec_v;  // 16-byte aligned rows: vector loads, else byte loads
};

// Workspace layout (N > 1): acc [B*H*N][D], then max [B*H*N] (log2 units), then sum [B*H*N];
// partial row ((b * H + h) * N + s).
__device__ __forceinline__ float* ws_acc(const DecodeArgs& a) {
  return static_cast<float*>(a.p.workspace);
}
__device__ __forceinline__ float* ws_max(const DecodeArgs& a) {
  return static_cast<float*>(a.p.workspace) + a.partials * a.p.head_dim;
}
__device__ __forceinline__ float* ws_sum(const DecodeArgs& a) {
  return ws_max(a) + a.partials;
}

// ---- pass 1: one split of the keys, all query heads of a kv head ---------------------------------
template <typename Cache, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) decode_split_kernel(const DecodeArgs args) {
  using S = Shape<Cache, kHeadDim>;
  using Ops = MmaOps<typename Cache::Mma>;
  constexpr bool kMmaF16 = std::is_same<typename Cache::Mma, __half>::value;
  __shared__ __align__(16) float s_acc[kWarps][kHeadRows][S::kAccPitch];  // column dt * 8 + n (see o_dim)
  __shared__ uint4 s_q[S::kKSteps][kWarpSize];  // Q's A fragments, per k-step and lane (the same for every warp)
  __shared__ float s_row_scale[kHeadRows];      // raw score -> log2 units, per head row
  __shared__ float s_max[kWarps][kHeadRows];
  __shared__ float s_sum[kWarps][kHeadRows];
  __shared__ float s_weight[kWarps][kHeadRows];
  __shared__ float s_row_max[kHeadRows];
  __shared__ float s_row_sum[kHeadRows];

  const SparseDecodeParams& p = args.p;
  // Block index: head block fastest (CTAs sharing K/V run together), then split, kv head, sequence.
  int64_t bid = blockIdx.x;
  const int hblock = static_cast<int>(bid % args.head_blocks);
  bid /= args.head_blocks;
  const int split = static_cast<int>(bid % args.num_splits);
  bid /= args.num_splits;
  const int kvh = static_cast<int>(bid % p.kv_heads);
  const int64_t b = bid / p.kv_heads;
  const int head0 = kvh * args.group_size + hblock * kHeadRows;  // first query head of this CTA
  const int rows = min(kHeadRows, args.group_size - hblock * kHeadRows);

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int grp = lane / 4;  // MMA fragment row (and row + 8) / B column
  const int tig = lane % 4;  // MMA fragment column pair

  // The sequence: valid slots, the query's position, the slots that can be visible, this split.
  int64_t seqlen = p.cache_seqlens[b];
  seqlen = seqlen < 0 ? 0 : (seqlen > p.max_slots ? p.max_slots : seqlen);  // never read past the cache
  const int64_t qpos = p.query_positions != nullptr ? static_cast<int64_t>(p.query_positions[b]) : seqlen - 1;
  const SlotRanges ranges = visible_slot_ranges(p.mask, qpos, seqlen, p.key_positions != nullptr);
  int64_t v0, v1;
  split_range(ranges.total, args.num_splits, split, S::kStepKeys, v0, v1);
  const QueryMaskTerms terms = query_mask_terms(p.mask, qpos);

  const float k_scale = Cache::kFp8 ? __ldg(p.k_scale + kvh) : 1.0f;
  const float v_scale = Cache::kFp8 ? __ldg(p.v_scale + kvh) : 1.0f;

  // Q as the A operand of S = Q K^T, for rows grp and grp + 8 (heads head0 + row), dims of lane
  // tig's slice; rows past the group are zero. Warp 0 builds the fragments once for all warps.
  if (warp == 0) {
    float qf[2][kHeadDim / 4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = grp + 8 * r;
      const bool valid = row < rows;
      const int64_t q_row = (b * p.heads + head0 + (valid ? row : 0)) * kHeadDim + tig * (kHeadDim / 4);
      if (p.q_dtype == DType::kFloat32) {
        uint32_t w[S::kQWords32];
        load_words<S::kQWords32>(w, reinterpret_cast<const unsigned char*>(static_cast<const float*>(p.q) + q_row),
                                 valid, args.vec_q);
#pragma unroll
        for (int i = 0; i < S::kQWords32; ++i) qf[r][i] = __uint_as_float(w[i]);
      } else {
        uint32_t w[S::kQWords];
        load_words<S::kQWords>(w, reinterpret_cast<const unsigned char*>(static_cast<const uint16_t*>(p.q) + q_row),
                               valid, args.vec_q);
#pragma unroll
        for (int i = 0; i < S::kQWords; ++i)
          unpack_q2(w[i], p.q_dtype == DType::kBFloat16, qf[r][2 * i], qf[r][2 * i + 1]);
      }
    }
    float q_mul[2] = {1.0f, 1.0f};
    float q_unscale[2] = {1.0f, 1.0f};
    if (kMmaF16 && p.q_dtype != DType::kFloat16) {  // bf16 / fp32 q into f16: fit the range first
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float amax = 0.0f;
#pragma unroll
        for (int i = 0; i < kHeadDim / 4; ++i) amax = fmaxf(amax, fabsf(qf[r][i]));
        amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 1));  // the 4 lanes of a row hold all D dims
        amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 2));
        const int shift = f16_range_shift(amax);
        q_mul[r] = pow2f(shift);
        q_unscale[r] = pow2f(-shift);
      }
    }
#pragma unroll
    for (int ks = 0; ks < S::kKSteps; ++ks)
      s_q[ks][lane] = make_uint4(
          Ops::pack(qf[0][4 * ks] * q_mul[0], qf[0][4 * ks + 1] * q_mul[0]),       // a0a1: row grp, k 2tig..
          Ops::pack(qf[1][4 * ks] * q_mul[1], qf[1][4 * ks + 1] * q_mul[1]),       // a2a3: row grp+8, k 2tig..
          Ops::pack(qf[0][4 * ks + 2] * q_mul[0], qf[0][4 * ks + 3] * q_mul[0]),   // a4a5: row grp, k 2tig+8..
          Ops::pack(qf[1][4 * ks + 2] * q_mul[1], qf[1][4 * ks + 3] * q_mul[1]));  // a6a7: row grp+8, k 2tig+8..
    if (tig == 0) {
      s_row_scale[grp] = args.scale_log2 * k_scale * q_unscale[0];
      s_row_scale[grp + 8] = args.scale_log2 * k_scale * q_unscale[1];
    }
  }
  __syncthreads();
  const float row_scale[2] = {s_row_scale[grp], s_row_scale[grp + 8]};

  // This lane's slices of the cache rows of kv head kvh (bytes).
  const unsigned char* k_lane = static_cast<const unsigned char*>(p.k_cache) +
                                (b * p.k_strides[0] + kvh * p.k_strides[2] + tig * (kHeadDim / 4)) * S::kBytes;
  const unsigned char* v_lane = static_cast<const unsigned char*>(p.v_cache) +
                                (b * p.v_strides[0] + kvh * p.v_strides[2] + grp * (kHeadDim / 8)) * S::kBytes;
  const int64_t k_slot_bytes = p.k_strides[1] * S::kBytes;
  const int64_t v_slot_bytes = p.v_strides[1] * S::kBytes;
  const int32_t* key_pos = p.key_positions != nullptr ? p.key_positions + b * p.key_positions_stride : nullptr;

  // Position of key `lane` of the step starting at virtual index `step` (-1: none, past the range).
  // int32: slots are below max_slots <= kMaxSlots, and key_positions are int32.
  auto lane_key_position = [&](int64_t step) -> int32_t {
    const int64_t v = step + lane;
    if (lane >= S::kStepKeys || v >= v1) return -1;
    const int64_t slot = ranges.slot(v);
    return key_pos != nullptr ? __ldg(key_pos + slot) : static_cast<int32_t>(slot);
  };
  // Loads of one step; bit k of `used`: key k of the step is used (else its rows stay zero).
  auto load_k = [&](uint32_t (&kw)[S::kNTiles][S::kKWords], int64_t step, uint32_t used) {
#pragma unroll
    for (int j = 0; j < S::kNTiles; ++j) {
      const int key = k_row_key(j, grp);
      const bool valid = (used >> key) & 1u;
      const int64_t slot = valid ? ranges.slot(step + key) : 0;
      load_words<S::kKWords>(kw[j], k_lane + slot * k_slot_bytes, valid, args.vec_k);
    }
  };
  auto load_v = [&](uint32_t (&vw)[S::kPvSteps][4][S::kVWords], int64_t step, uint32_t used) {
#pragma unroll
    for (int pv = 0; pv < S::kPvSteps; ++pv)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int key = v_row_key(pv, r, tig);
        const bool valid = (used >> key) & 1u;
        const int64_t slot = valid ? ranges.slot(step + key) : 0;
        load_words<S::kVWords>(vw[pv][r], v_lane + slot * v_slot_bytes, valid, args.vec_v);
      }
  };

  float acc[S::kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < S::kDTiles; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[dt][c] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows grp and grp + 8, log2 units
  float row_sum[2] = {0.0f, 0.0f};            // this lane's share (its columns); the quad sums at the end

  // Warp w takes steps w, w + 4, ... of the split. Prologue: step 0's positions and loads, and
  // step 1's positions in flight.
  const int64_t step_stride = static_cast<int64_t>(kWarps) * S::kStepKeys;
  int64_t step = v0 + static_cast<int64_t>(warp) * S::kStepKeys;
  uint32_t used = __ballot_sync(kFullMask, key_used(p.mask, terms, lane_key_position(step)));
  int32_t pos_ahead = lane_key_position(step + step_stride);
  uint32_t kw[S::kNTiles][S::kKWords];
  uint32_t vw[S::kPvSteps][4][S::kVWords];
  load_k(kw, step, used);
  load_v(vw, step, used);

#pragma unroll 1
  for (; step < v1; step += step_stride) {  // warp-uniform
    const int64_t next = step + step_stride;
    const uint32_t used_next = __ballot_sync(kFullMask, key_used(p.mask, terms, pos_ahead));
    pos_ahead = lane_key_position(next + step_stride);  // two steps ahead: its latency hides behind this one
    if (used == 0u) {  // nothing visible in this step (sparse patterns): skip the maths
      load_k(kw, next, used_next);
      load_v(vw, next, used_next);
      used = used_next;
      continue;
    }

    // S = Q K^T: 16 head rows x kStepKeys keys.
    float s[S::kNTiles][4];
#pragma unroll
    for (int j = 0; j < S::kNTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[j][c] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < S::kKSteps; ++ks) {
      uint32_t qa[4];
      lds_fragment(qa, &s_q[ks][lane]);
#pragma unroll
      for (int j = 0; j < S::kNTiles; ++j) {
        uint32_t b0, b1;
        if constexpr (Cache::kFp8) {  // word ks = dims 4ks..4ks+3 of the slice
          b0 = e4m3x2_to_f16x2(kw[j][ks]);
          b1 = e4m3x2_to_f16x2(kw[j][ks] >> 16);
        } else {  // words 2ks, 2ks+1 = dims 4ks..4ks+1, 4ks+2..4ks+3
          b0 = kw[j][2 * ks];
          b1 = kw[j][2 * ks + 1];
        }
        Ops::mma(s[j], qa, b0, b1);
      }
    }
    load_k(kw, next, used_next);  // the K registers are free: the next step's keys load during the softmax and P V

    // Scale to log2 units and drop the keys that are not used (masked, empty, past the range).
#pragma unroll
    for (int j = 0; j < S::kNTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        s[j][c] = ((used >> s_col_key(j, c, tig)) & 1u) ? s[j][c] * row_scale[c / 2] : -INFINITY;

    // Online softmax per head row; the 4 lanes of a quad hold the row's keys between them.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < S::kNTiles; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float base = mx == -INFINITY ? 0.0f : mx;  // nothing used yet: exp2(-inf - 0) = 0, not NaN
      const float alpha = exp2f(row_max[r] - base);    // 0 while the row had nothing
      row_max[r] = mx;
      row_sum[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < S::kDTiles; ++dt) {
        acc[dt][2 * r] *= alpha;
        acc[dt][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int j = 0; j < S::kNTiles; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - base);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - base);
        row_sum[r] += s[j][2 * r] + s[j][2 * r + 1];
      }
    }

    // O += P V: S n-tiles 2pv and 2pv + 1 (C layout) are the A operand of k-step pv.
#pragma unroll
    for (int pv = 0; pv < S::kPvSteps; ++pv) {
      uint32_t a[4];
      a[0] = Ops::pack(s[2 * pv][0], s[2 * pv][1]);          // row grp,     keys 2tig, 2tig+1
      a[1] = Ops::pack(s[2 * pv][2], s[2 * pv][3]);          // row grp + 8, keys 2tig, 2tig+1
      a[2] = Ops::pack(s[2 * pv + 1][0], s[2 * pv + 1][1]);  // row grp,     keys 8+2tig, 8+2tig+1
      a[3] = Ops::pack(s[2 * pv + 1][2], s[2 * pv + 1][3]);  // row grp + 8, keys 8+2tig, 8+2tig+1
#pragma unroll
      for (int dt = 0; dt < S::kDTiles; ++dt) {
        // B: (V[key 2tig][dim], V[key 2tig+1][dim]) and (V[key 2tig+8][dim], V[key 2tig+9][dim]) for
        // dim = grp * D/8 + dt: element dt of the four rows this lane loaded.
        uint32_t b0, b1;
        if constexpr (Cache::kFp8) {
          constexpr int kDimsPerWord = 4;
          const int word = dt / kDimsPerWord;
          const int byte = dt % kDimsPerWord;
          const uint32_t sel = static_cast<uint32_t>(byte | ((byte + 4) << 4));  // [row0.byte, row1.byte, ..]
          b0 = e4m3x2_to_f16x2(__byte_perm(vw[pv][0][word], vw[pv][1][word], sel));
          b1 = e4m3x2_to_f16x2(__byte_perm(vw[pv][2][word], vw[pv][3][word], sel));
        } else {
          const int word = dt / 2;
          const uint32_t sel = (dt % 2 == 0) ? 0x5410u : 0x7632u;  // low halves / high halves of the two rows
          b0 = __byte_perm(vw[pv][0][word], vw[pv][1][word], sel);
          b1 = __byte_perm(vw[pv][2][word], vw[pv][3][word], sel);
        }
        Ops::mma(acc[dt], a, b0, b1);
      }
    }
    load_v(vw, next, used_next);
    used = used_next;
  }

  // Epilogue: merge the 4 warps' (max, sum, acc) per head row through shared memory.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    if (tig == 0) {
      s_max[warp][grp + 8 * r] = row_max[r];
      s_sum[warp][grp + 8 * r] = sum;
    }
  }
#pragma unroll
  for (int dt = 0; dt < S::kDTiles; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r)  // columns n = 2tig, 2tig + 1 of d-tile dt at dt * 8 + n
      *reinterpret_cast<float2*>(&s_acc[warp][grp + 8 * r][dt * kMmaN + 2 * tig]) =
          make_float2(acc[dt][2 * r], acc[dt][2 * r + 1]);
  __syncthreads();
  if (threadIdx.x < kHeadRows) {
    const int row = static_cast<int>(threadIdx.x);
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_max[w][row]);
    const float base = m == -INFINITY ? 0.0f : m;
    float l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2f(s_max[w][row] - base);  // 0 for a warp that saw nothing
      s_weight[w][row] = weight;
      l += s_sum[w][row] * weight;
    }
    s_row_max[row] = m;
    s_row_sum[row] = l;
  }
  __syncthreads();

  const bool direct = args.num_splits == 1;       // the only split: write the output, no combine launch
  const int64_t head_row0 = b * p.heads + head0;  // (b, h) row of head0
#pragma unroll 4
  for (int e = static_cast<int>(threadIdx.x); e < rows * kHeadDim; e += kThreads) {
    const int row = e / kHeadDim;
    const int col = e % kHeadDim;  // dt * 8 + n
    const int dim = o_dim(col / kMmaN, col % kMmaN, kHeadDim);
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a += s_weight[w][row] * s_acc[w][row][col];
    a *= v_scale;
    if (direct) {
      const float l = s_row_sum[row];
      store_out(p.out, (head_row0 + row) * kHeadDim + dim, l > 0.0f ? a / l : 0.0f, p.q_dtype);
    } else {
      ws_acc(args)[((head_row0 + row) * args.num_splits + split) * kHeadDim + dim] = a;
    }
  }
  if (threadIdx.x < static_cast<unsigned>(rows)) {
    const int row = static_cast<int>(threadIdx.x);
    const float m = s_row_max[row];
    const float l = s_row_sum[row];
    if (direct) {
      // Natural-log LSE of the scaled scores: m is in log2 units.
      if (p.lse != nullptr) p.lse[head_row0 + row] = l > 0.0f ? m * kLn2 + logf(l) : -INFINITY;
    } else {
      const int64_t i = (head_row0 + row) * args.num_splits + split;
      ws_max(args)[i] = m;
      ws_sum(args)[i] = l;
    }
  }
}

// ---- pass 2: merge the splits of each (b, h) ------------------------------------------------------
__global__ void __launch_bounds__(kCombineWarps* kWarpSize) decode_combine_kernel(const DecodeArgs args) {
  const SparseDecodeParams& p = args.p;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / kWarpSize;  // b * H + h
  if (row >= p.batch * p.heads) return;                                                            // warp-uniform
  const int n = args.num_splits;
  const int D = p.head_dim;
  const float* mx = ws_max(args) + row * n;
  const float* sm = ws_sum(args) + row * n;
  const float* ac = ws_acc(args) + row * n * D;

  float m = -INFINITY;
  for (int s = lane; s < n; s += kWarpSize) m = fmaxf(m, mx[s]);
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, off));
  const float base = m == -INFINITY ? 0.0f : m;  // no split saw a key: every weight is 0, not NaN
  float l = 0.0f;
  for (int s = lane; s < n; s += kWarpSize)
    if (mx[s] != -INFINITY) l += sm[s] * exp2f(mx[s] - base);
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) l += __shfl_xor_sync(kFullMask, l, off);  // same in every lane
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;

  for (int d = lane; d < D; d += kWarpSize) {
    float a = 0.0f;
    for (int s = 0; s < n; ++s) {  // fixed order: bitwise repeatable
      const float ms = mx[s];
      if (ms != -INFINITY) a += exp2f(ms - base) * ac[static_cast<int64_t>(s) * D + d];
    }
    store_out(p.out, row * D + d, a * inv, p.q_dtype);
  }
  if (lane == 0 && p.lse != nullptr) p.lse[row] = l > 0.0f ? m * kLn2 + logf(l) : -INFINITY;
}

// ---- host side ------------------------------------------------------------------------------------
bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Rows (and every slice a lane loads) are 16-byte aligned: the base and every stride in bytes.
bool rows_aligned16(const void* ptr, const int64_t (&strides)[3], int elem_bytes) {
  const int64_t elems = 16 / elem_bytes;
  return aligned16(ptr) && strides[0] % elems == 0 && strides[1] % elems == 0 && strides[2] % elems == 0;
}

template <typename Cache, int kHeadDim>
Status launch(const DecodeArgs& args, int64_t num_blocks, cudaStream_t stream) {
  decode_split_kernel<Cache, kHeadDim><<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(args);
  if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;
  if (args.num_splits > 1) {
    const int64_t rows = args.p.batch * args.p.heads;
    const unsigned blocks = static_cast<unsigned>((rows + kCombineWarps - 1) / kCombineWarps);
    decode_combine_kernel<<<blocks, kCombineWarps * kWarpSize, 0, stream>>>(args);
    if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;
  }
  return Status::kOk;
}

template <typename Cache>
Status launch_head_dim(const DecodeArgs& args, int64_t num_blocks, cudaStream_t stream) {
  return args.p.head_dim == 64 ? launch<Cache, 64>(args, num_blocks, stream)
                               : launch<Cache, 128>(args, num_blocks, stream);
}

}  // namespace

int32_t sparse_attention_decode_num_splits(int64_t batch, int32_t kv_heads, int64_t max_slots, int32_t num_sms) {
  if (batch < 1 || kv_heads < 1 || max_slots < 2 * kMinSplitSlots) return 1;
  const int64_t units = batch * kv_heads;  // CTAs per split (one per (b, g) for R <= 16)
  const int64_t wave = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * kMinCtasPerSm;  // CTAs resident at once
  const int64_t cap = min64(kMaxSplits, max_slots / kMinSplitSlots);
  int64_t best = 1;
  double best_cost = 0.0;
  for (int64_t n = 1; n <= cap; ++n) {  // strict <: ties keep the smaller N (fewer partials)
    const int64_t waves = (units * n + wave - 1) / wave;
    const double cost = static_cast<double>(waves) *
                        (static_cast<double>((max_slots + n - 1) / n) + static_cast<double>(kSplitOverheadSlots));
    if (n == 1 || cost < best_cost) {
      best = n;
      best_cost = cost;
    }
  }
  return static_cast<int32_t>(best);
}

size_t sparse_attention_decode_workspace_bytes(int64_t batch, int32_t heads, int32_t head_dim, int32_t num_splits) {
  if (num_splits <= 1 || batch < 1 || heads < 1 || head_dim < 1) return 0;  // one split writes the output directly
  return sizeof(float) * static_cast<size_t>(batch) * static_cast<size_t>(heads) * static_cast<size_t>(num_splits) *
         static_cast<size_t>(head_dim + 2);
}

Status sparse_attention_decode(const SparseDecodeParams& p, int32_t num_splits, cudaStream_t stream) {
  if (p.head_dim != 64 && p.head_dim != 128) return Status::kInvalidArgument;
  if (p.heads < 1 || p.kv_heads < 1 || p.heads % p.kv_heads != 0) return Status::kInvalidArgument;
  if (p.q_dtype != DType::kBFloat16 && p.q_dtype != DType::kFloat16 && p.q_dtype != DType::kFloat32)
    return Status::kInvalidArgument;
  if (p.kv_dtype != KvCacheDType::kBFloat16 && p.kv_dtype != KvCacheDType::kFloat16 &&
      p.kv_dtype != KvCacheDType::kFloat8E4M3)
    return Status::kInvalidArgument;
  if (num_splits < 1) return Status::kInvalidArgument;
  if (p.batch < 0 || p.max_slots < 0 || p.max_slots > kMaxSlots) return Status::kInvalidArgument;
  if (p.batch == 0) return Status::kOk;  // out and lse are empty
  if (p.q == nullptr || p.out == nullptr || p.cache_seqlens == nullptr) return Status::kInvalidArgument;
  if (p.max_slots > 0 && (p.k_cache == nullptr || p.v_cache == nullptr)) return Status::kInvalidArgument;
  const bool fp8 = p.kv_dtype == KvCacheDType::kFloat8E4M3;
  if (fp8 && (p.k_scale == nullptr || p.v_scale == nullptr)) return Status::kInvalidArgument;
  if (num_splits > 1 && p.workspace == nullptr) return Status::kInvalidArgument;

  DecodeArgs args{};
  args.p = p;
  args.num_splits = num_splits;
  args.group_size = p.heads / p.kv_heads;
  args.head_blocks = (args.group_size + kHeadRows - 1) / kHeadRows;
  args.partials = p.batch * p.heads * num_splits;
  args.scale_log2 = p.softmax_scale * kLog2e;
  const int elem_bytes = fp8 ? 1 : 2;
  args.vec_q = aligned16(p.q);  // contiguous rows of D = 64 or 128 elements: 16-byte multiples
  args.vec_k = rows_aligned16(p.k_cache, p.k_strides, elem_bytes);
  args.vec_v = rows_aligned16(p.v_cache, p.v_strides, elem_bytes);
  const int64_t num_blocks = p.batch * p.kv_heads * static_cast<int64_t>(args.head_blocks) * num_splits;
  if (num_blocks > 2147483647LL) return Status::kUnsupported;  // gridDim.x limit

  switch (p.kv_dtype) {
    case KvCacheDType::kBFloat16: return launch_head_dim<Bf16Cache>(args, num_blocks, stream);
    case KvCacheDType::kFloat16: return launch_head_dim<F16Cache>(args, num_blocks, stream);
    default: return launch_head_dim<Fp8Cache>(args, num_blocks, stream);
  }
}

}  // namespace llama4::kernels
