// Launcher for the sparse-global attention forward on CUDA (sparse_attention_fwd_sm90).
// Legend: B batch, S query positions, Sk key positions, H query heads, G key/value heads (H % G == 0),
// D head dim (64 or 128).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_mask.h"
#include "common.h"

namespace llama4::kernels {

struct SparseAttentionParams {
  const void* q;  // [B, S, H, D], unit stride along D
  const void* k;  // [B, Sk, G, D]
  const void* v;  // [B, Sk, G, D]
  void* out;      // [B, S, H, D] contiguous, q's dtype
  float* lse;     // [B, H, S] float32 contiguous: log-sum-exp of the scaled scores (-inf for a row with no key)
  DType dtype;    // kBFloat16 or kFloat16 (all of q, k, v, out)
  int64_t batch, seqlen_q, seqlen_k;
  int32_t heads, kv_heads, head_dim;
  // Element strides (batch, sequence, head) of q, k, v; the head-dim stride is 1.
  int64_t q_strides[3], k_strides[3], v_strides[3];
  // Varlen (batch must be 1): sequence s owns queries [cu_seqlens_q[s], cu_seqlens_q[s+1]) and keys
  // [cu_seqlens_k[s], cu_seqlens_k[s+1]); int32 on the device; nullptr for dense batches.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int32_t num_seqs;      // varlen: number of sequences
  int32_t max_seqlen_q;  // varlen: bound on queries per sequence (sizes the grid)
  AttentionMask mask;
  float softmax_scale;
};

// Enqueues the forward. Never synchronises the host.
Status sparse_attention_fwd(const SparseAttentionParams& params, cudaStream_t stream);

}  // namespace llama4::kernels
