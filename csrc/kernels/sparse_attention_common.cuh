// What the sparse-attention forward and backward kernels share (sparse_attention_fwd.cu, sparse_attention_bwd.cu):
// the cp.async wrappers, the padded shared-memory tile loads of 2-byte rows, the host-side alignment
// tests that pick the vector paths, and the decoding of one batch entry or varlen sequence. No torch header.
// Legend: D head dim; a tile is kRows rows of D elements at a padded shared-memory pitch of D + kSmemPadElems.
#pragma once

#include <cstdint>

namespace llama4::kernels::attention_sm80 {

constexpr int kChunkElems = 8;    // 16 bytes of 2-byte elements: one cp.async / one vector store
constexpr int kSmemPadElems = 8;  // 16 bytes per row: 8 ldmatrix rows land in 8 bank groups

// ---- PTX wrappers ----------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- tile loads -------------------------------------------------------------------
// Copies rows [0, kRows) of one head (row r at src + r * row_stride) into smem at the padded pitch; rows
// >= valid_rows become zeros (so that padding rows contribute exact zeros to every MMA, and stale shared memory
// never holds a NaN bit pattern that P = 0 would multiply). Asynchronous (cp.async) when vec, else plain copies;
// either way the data is visible after cp_async_wait + __syncthreads. Each of the kThreads threads owns one 16-byte
// column chunk and walks down the rows with one pointer: fully unrolled address arithmetic would keep a 64-bit
// address per row live across the key loop, and the kernels have no registers to spare next to their hd-128
// accumulators.
template <int kThreads, int kHeadDim, int kRows>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* src, int64_t row_stride, int64_t valid_rows,
                                          bool vec) {
  constexpr int kPitch = kHeadDim + kSmemPadElems;
  constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0, "uniform passes");
  const int row0 = static_cast<int>(threadIdx.x) / kChunksPerRow;
  const int col = (static_cast<int>(threadIdx.x) % kChunksPerRow) * kChunkElems;
  const uint16_t* from = src + row0 * row_stride + col;
  const int64_t pass_stride = kRowsPerPass * row_stride;
#pragma unroll 1
  for (int r = row0; r < kRows; r += kRowsPerPass, from += pass_stride) {
    uint16_t* dst = smem + r * kPitch + col;
    if (r < valid_rows) {
      if (vec) {
        cp_async_16(dst, from);
      } else {
#pragma unroll
        for (int e = 0; e < kChunkElems; ++e) dst[e] = from[e];
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// ---- one batch entry or varlen sequence ----------------------------------------------------------
// Where sequence `seq` of the grid lives: its batch index b and its first query / key row (varlen: one batch entry
// with the sequences packed along S at cu_seqlens), and its lengths. Output references rather than a returned
// struct: the kernels then compile to the same code as with the branches written inline (a struct changed the dQ
// kernel's register allocation).
template <typename Params>
__device__ __forceinline__ void sequence_rows(const Params& p, int64_t seq, int64_t& b, int64_t& q_begin,
                                              int64_t& seqlen_q, int64_t& k_begin, int64_t& seqlen_k) {
  if (p.cu_seqlens_q != nullptr) {
    b = 0;
    q_begin = p.cu_seqlens_q[seq];
    seqlen_q = p.cu_seqlens_q[seq + 1] - q_begin;
    k_begin = p.cu_seqlens_k[seq];
    seqlen_k = p.cu_seqlens_k[seq + 1] - k_begin;
  } else {
    b = seq;
    q_begin = 0;
    seqlen_q = p.seqlen_q;
    k_begin = 0;
    seqlen_k = p.seqlen_k;
  }
}

// ---- host side -------------------------------------------------------------------------------
inline bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Every row of a [B, S, H, D] tensor starts 16-byte aligned: the cp.async / vector paths may be used.
inline bool rows_aligned16(const void* ptr, const int64_t (&strides)[3]) {
  return aligned16(ptr) && strides[0] % kChunkElems == 0 && strides[1] % kChunkElems == 0 &&
         strides[2] % kChunkElems == 0;
}

}  // namespace llama4::kernels::attention_sm80
