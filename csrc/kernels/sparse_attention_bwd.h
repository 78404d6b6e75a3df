// Launcher for the sparse-global attention backward on CUDA (sparse_attention_bwd_sm90): dq, dk, dv from the
// forward's out and lse. Legend: B batch, S query positions, Sk key positions, H query heads, G key/value heads
// (H % G == 0), D head dim (64 or 128).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "attention_mask.h"
#include "common.h"

namespace llama4::kernels {

struct SparseAttentionBwdParams {
  const void* dout;  // [B, S, H, D], unit stride along D: the gradient of out
  const void* q;     // [B, S, H, D]
  const void* k;     // [B, Sk, G, D]
  const void* v;     // [B, Sk, G, D]
  const void* out;   // [B, S, H, D]: the forward's output
  const float* lse;  // [B, H, S] float32 contiguous: the forward's natural log-sum-exp of the scaled scores
                     // (-inf for a row with no visible key: its dq is 0 and it adds nothing to dk / dv)
  void* dq;          // [B, S, H, D] contiguous, q's dtype
  void* dk;          // [B, Sk, G, D] contiguous, k's dtype: summed over the H / G query heads of kv head g
  void* dv;          // [B, Sk, G, D] contiguous
  void* workspace;   // sparse_attention_bwd_workspace_bytes(B, H, S) bytes, 16-byte aligned
  DType dtype;       // kBFloat16 or kFloat16 (every tensor above but lse)
  int64_t batch, seqlen_q, seqlen_k;
  int32_t heads, kv_heads, head_dim;
  // Element strides (batch, sequence, head) of the inputs; the head-dim stride is 1.
  int64_t dout_strides[3], q_strides[3], k_strides[3], v_strides[3], out_strides[3];
  // Varlen (batch must be 1): as SparseAttentionParams; nullptr for dense batches.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int32_t num_seqs;      // varlen: number of sequences
  int32_t max_seqlen_q;  // varlen: bound on queries per sequence (sizes the dq grid)
  int32_t max_seqlen_k;  // varlen: bound on keys per sequence (sizes the dk / dv grid)
  AttentionMask mask;
  float softmax_scale;
  // Accepted for the API: every kernel here is deterministic by construction (each dq, dk, dv element is
  // summed by one thread in a fixed order, no float atomics), so both values give bitwise-repeatable results.
  bool deterministic;
};

// Workspace: delta = rowsum(dout * out) and lse in log2 units, two [B, H, S] float32 arrays (O(S) memory).
size_t sparse_attention_bwd_workspace_bytes(int64_t batch, int32_t heads, int64_t seqlen_q);

// Enqueues the backward (a preprocess pass, then the dk / dv and dq kernels). Never synchronises the host.
Status sparse_attention_bwd(const SparseAttentionBwdParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
