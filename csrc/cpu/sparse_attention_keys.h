// Which keys a query sees and which queries see a key, enumerated directly from the mask's ranges
// (never by testing all S x Sk pairs): the CPU forward and backward of sparse_attention walk the
// same visible pairs, in O(S x visible keys). Both follow kernels/attention_mask.h's rule.
// Legend: B batch, S queries, Sk keys; positions are absolute within one sequence.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/attention_mask.h"

namespace llama4::cpu::attention {

namespace kn = llama4::kernels;

struct Span {  // one sequence: query rows [q0, q0 + len_q), key rows [k0, k0 + len_k) of batch b
  int64_t b, q0, len_q, k0, len_k;
};

using Range = std::pair<int64_t, int64_t>;  // inclusive [first, last]

// Sorts ranges[0, n) and merges overlapping or adjacent ones in place; returns the new count.
inline int merge_ranges(Range* ranges, int n) {
  std::sort(ranges, ranges + n);
  int out = 0;
  for (int r = 0; r < n; ++r) {
    if (ranges[r].first > ranges[r].second) continue;
    if (out > 0 && ranges[r].first <= ranges[out - 1].second + 1) {
      ranges[out - 1].second = std::max(ranges[out - 1].second, ranges[r].second);
    } else {
      ranges[out++] = ranges[r];
    }
  }
  return out;
}

// Sorted, duplicate-free key positions in [0, len_k) visible to query position pos.
inline void visible_keys(const kn::AttentionMask& m, int64_t pos, int64_t len_k, std::vector<int64_t>& keys) {
  keys.clear();
  const int64_t hi = m.causal ? std::min(pos, len_k - 1) : len_k - 1;
  if (hi < 0) return;
  if (!kn::mask_has_pattern(m)) {
    for (int64_t j = 0; j <= hi; ++j) keys.push_back(j);
    return;
  }
  // Up to three ranges (window, chunk, sinks), merged; then the strided keys outside them.
  Range ranges[3];
  int n = 0;
  if (m.window > 0) ranges[n++] = {std::max<int64_t>(0, pos - m.window + 1), hi};
  if (m.chunk > 0) {
    const int64_t c0 = kn::floor_div(pos, m.chunk) * m.chunk;
    ranges[n++] = {std::max<int64_t>(0, c0), std::min(hi, c0 + m.chunk - 1)};
  }
  if (m.sinks > 0) ranges[n++] = {0, std::min<int64_t>(hi, m.sinks - 1)};
  n = merge_ranges(ranges, n);
  int64_t j = 0;  // the next strided key: walk them and the merged ranges together, in order
  for (int r = 0; r < n; ++r) {
    const auto [lo, up] = ranges[r];
    if (m.global_stride > 0)
      for (; j < lo && j <= hi; j += m.global_stride) keys.push_back(j);
    for (int64_t x = lo; x <= up; ++x) keys.push_back(x);
    if (m.global_stride > 0) j = std::max(j, (up / m.global_stride + 1) * m.global_stride);
  }
  if (m.global_stride > 0)
    for (; j <= hi; j += m.global_stride) keys.push_back(j);
}

// The transpose of visible_keys: the query positions in [pos_lo, pos_hi] that see key position j >= 0, as at
// most two sorted disjoint ranges written to out; returns their count. A strided global key or a sink is seen by
// every query (at or after it when causal); otherwise the window reaches forward W - 1 positions and the chunk
// covers j's own chunk.
inline int visible_query_ranges(const kn::AttentionMask& m, int64_t j, int64_t pos_lo, int64_t pos_hi, Range out[2]) {
  const int64_t lo = m.causal ? std::max(j, pos_lo) : pos_lo;
  if (lo > pos_hi) return 0;
  const bool seen_by_all =
      !kn::mask_has_pattern(m) || (m.global_stride > 0 && j % m.global_stride == 0) || (m.sinks > 0 && j < m.sinks);
  if (seen_by_all) {
    out[0] = {lo, pos_hi};
    return 1;
  }
  int n = 0;
  if (m.window > 0) out[n++] = {lo, std::min(pos_hi, j + m.window - 1)};
  if (m.chunk > 0) {
    const int64_t c0 = kn::floor_div(j, m.chunk) * m.chunk;
    out[n++] = {std::max(lo, c0), std::min(pos_hi, c0 + m.chunk - 1)};
  }
  return merge_ranges(out, n);
}

// Spans of a dense ([B, S] x [B, Sk]) or varlen (cu_seqlens, B = 1) call.
inline std::vector<Span> make_spans(const int32_t* cu_q, const int32_t* cu_k, int64_t num_seqs, int64_t batch,
                                    int64_t seqlen_q, int64_t seqlen_k) {
  std::vector<Span> spans;
  if (cu_q != nullptr) {
    for (int64_t s = 0; s < num_seqs; ++s)
      spans.push_back({0, cu_q[s], cu_q[s + 1] - cu_q[s], cu_k[s], cu_k[s + 1] - cu_k[s]});
  } else {
    for (int64_t b = 0; b < batch; ++b) spans.push_back({b, 0, seqlen_q, 0, seqlen_k});
  }
  return spans;
}

// Dot product of two length-n rows with kLanes independent partial sums: the fixed order keeps results
// bitwise repeatable, and the independent lanes let the compiler vectorise without reassociating.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 8;
  T part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[d + l] * b[d + l];
  T sum = 0;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// y[0, n) += alpha * x[0, n).
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

}  // namespace llama4::cpu::attention
