// Launcher for sparse-global attention decode on CUDA (sparse_attention_decode_sm90): one new
// query token per sequence against a KV cache, split over key tiles (flash-decoding) so a
// million-key cache spreads over every SM.
// Legend: B batch, Smax cache slots, H query heads, G kv heads, D head dim (64 or 128).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "attention_mask.h"
#include "common.h"

namespace llama4::kernels {

enum class KvCacheDType : int32_t { kBFloat16 = 0, kFloat16 = 1, kFloat8E4M3 = 2 };

struct SparseDecodeParams {
  const void* q;        // [B, H, D] bf16/fp16 (q_dtype), contiguous
  DType q_dtype;        // kBFloat16 or kFloat16; out has the same dtype
  const void* k_cache;  // [B, Smax, G, D], unit stride along D, strides below
  const void* v_cache;  // [B, Smax, G, D]
  KvCacheDType kv_dtype;
  const float* k_scale;  // [G] per kv head (FP8 cache only): key = fp8 * k_scale[g]
  const float* v_scale;  // [G]
  int64_t k_strides[3];  // element strides (batch, slot, head) of k_cache
  int64_t v_strides[3];
  const int32_t* cache_seqlens;  // [B] valid slots [0, cache_seqlens[b]) of each sequence
  // Absolute position of each slot [B, Smax] (ring buffers, global-only caches), or nullptr: slot j is at
  // position j. The query's position: query_positions[b], or nullptr: cache_seqlens[b] - 1 (the new
  // token's own key is already in the cache, FlashAttention's convention).
  const int32_t* key_positions;
  int64_t key_positions_stride;  // elements between batches of key_positions
  const int32_t* query_positions;
  int64_t batch, max_slots;
  int32_t heads, kv_heads, head_dim;
  AttentionMask mask;
  float softmax_scale;
  void* out;        // [B, H, D] contiguous, q's dtype
  float* lse;       // [B, H] float32 (-inf when no key is visible)
  void* workspace;  // sparse_attention_decode_workspace_bytes(...) bytes: split partials
};

// Splits of the key range: enough CTAs to fill the GPU for small B, one split for large B.
int32_t sparse_attention_decode_num_splits(int64_t batch, int32_t kv_heads, int64_t max_slots, int32_t num_sms);
size_t sparse_attention_decode_workspace_bytes(int64_t batch, int32_t heads, int32_t head_dim, int32_t num_splits);

// Enqueues the decode (a split pass and a combine pass). Never synchronises the host.
Status sparse_attention_decode(const SparseDecodeParams& params, int32_t num_splits, cudaStream_t stream);

}  // namespace llama4::kernels
