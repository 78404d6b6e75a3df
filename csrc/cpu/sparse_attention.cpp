// CPU sparse-global attention forward. Each query enumerates only its visible keys (the union of
// its window / chunk / sink ranges and the strided global keys), so work and memory are
// O(S x visible keys): a 64K-token sequence with a small window runs in seconds, and no S x S
// tensor ever exists. Scores and the softmax run in float32 per query (float64 for float64 inputs,
// so torch.autograd.gradcheck can run on the CPU op).
// Legend: B batch, S queries, Sk keys, H query heads, G kv heads, D head dim.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/sparse_attention_keys.h"

namespace llama4::cpu {
namespace {

namespace kn = llama4::kernels;
using attention::Span;
constexpr int64_t kQueryBlock = 16;  // queries per task: enough work to amortise the task

// acc_t: float, or double for float64 inputs. q / k / v are contiguous acc_t copies.
template <typename acc_t>
void sparse_attention_fwd_impl(const at::Tensor& qf, const at::Tensor& kf, const at::Tensor& vf, at::Tensor& of,
                               at::Tensor& lse, const std::vector<Span>& spans, const AttentionSizes& sz,
                               double softmax_scale) {
  const int64_t S = sz.seqlen_q, H = sz.heads, G = sz.kv_heads, D = sz.head_dim, Sk = sz.seqlen_k;
  // Flat task list: (span, head, block of queries).
  std::vector<int64_t> first_task(spans.size() + 1, 0);
  for (size_t s = 0; s < spans.size(); ++s)
    first_task[s + 1] = first_task[s] + H * ((spans[s].len_q + kQueryBlock - 1) / kQueryBlock);

  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const acc_t* Q = qf.data_ptr<acc_t>();
  const acc_t* K = kf.data_ptr<acc_t>();
  const acc_t* V = vf.data_ptr<acc_t>();
  acc_t* O = of.data_ptr<acc_t>();
  float* L = lse.data_ptr<float>();

  at::parallel_for(0, first_task.back(), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys;
    std::vector<acc_t> scores, acc(D);
    for (int64_t task = begin; task < end; ++task) {
      const size_t s = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const Span& sp = spans[s];
      const int64_t local = task - first_task[s];
      const int64_t blocks = (sp.len_q + kQueryBlock - 1) / kQueryBlock;
      const int64_t h = local / blocks, g = h / (H / G);
      const int64_t r0 = (local % blocks) * kQueryBlock, r1 = std::min(sp.len_q, r0 + kQueryBlock);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t pos = r + sp.len_k - sp.len_q;  // bottom-right aligned
        attention::visible_keys(sz.mask, pos, sp.len_k, keys);
        const int64_t row = sp.q0 + r;
        const acc_t* qrow = Q + ((sp.b * S + row) * H + h) * D;
        if (keys.empty()) continue;  // out stays 0, lse stays -inf
        scores.resize(keys.size());
        acc_t row_max = -std::numeric_limits<acc_t>::infinity();
        for (size_t t = 0; t < keys.size(); ++t) {
          const acc_t* krow = K + ((sp.b * Sk + sp.k0 + keys[t]) * G + g) * D;
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qrow[d] * krow[d];
          scores[t] = dot * scale;
          row_max = std::max(row_max, scores[t]);
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        double denom = 0.0;
        for (size_t t = 0; t < keys.size(); ++t) {
          const acc_t p = std::exp(scores[t] - row_max);
          denom += p;
          const acc_t* vrow = V + ((sp.b * Sk + sp.k0 + keys[t]) * G + g) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * vrow[d];
        }
        acc_t* orow = O + ((sp.b * S + row) * H + h) * D;
        const acc_t inv = static_cast<acc_t>(1.0 / denom);
        for (int64_t d = 0; d < D; ++d) orow[d] = acc[d] * inv;
        L[(sp.b * H + h) * S + row] = static_cast<float>(row_max + static_cast<acc_t>(std::log(denom)));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& cu_seqlens_q,
                                                        const std::optional<at::Tensor>& cu_seqlens_k,
                                                        const AttentionSizes& sz, double softmax_scale) {
  const int64_t B = sz.batch, S = sz.seqlen_q, H = sz.heads, D = sz.head_dim;
  at::Tensor out = at::empty({B, S, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  if (B * S * H == 0) return {out, lse};
  // Accumulation-precision copies, converted once (not per query): [B, S, H, D] and [B, Sk, G, D] contiguous.
  const at::ScalarType acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor qf = q.to(acc_type).contiguous();
  const at::Tensor kf = k.to(acc_type).contiguous();
  const at::Tensor vf = v.to(acc_type).contiguous();
  at::Tensor of = at::zeros({B, S, H, D}, q.options().dtype(acc_type));  // empty rows stay 0
  lse.fill_(-std::numeric_limits<float>::infinity());                    // and their lse -inf
  const std::vector<Span> spans = attention::make_spans(
      cu_seqlens_q.has_value() ? cu_seqlens_q->data_ptr<int32_t>() : nullptr,
      cu_seqlens_k.has_value() ? cu_seqlens_k->data_ptr<int32_t>() : nullptr, sz.num_seqs, B, S, sz.seqlen_k);
  if (acc_type == at::kDouble) {
    sparse_attention_fwd_impl<double>(qf, kf, vf, of, lse, spans, sz, softmax_scale);
  } else {
    sparse_attention_fwd_impl<float>(qf, kf, vf, of, lse, spans, sz, softmax_scale);
  }
  out.copy_(of);
  return {out, lse};
}

}  // namespace llama4::cpu

namespace llama4::cpu {

std::tuple<at::Tensor, at::Tensor> sparse_attention_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                           const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                           const std::optional<at::Tensor>& key_positions,
                                                           const std::optional<at::Tensor>& query_positions,
                                                           const std::optional<at::Tensor>& k_scale,
                                                           const std::optional<at::Tensor>& v_scale,
                                                           const DecodeSizes& sz, double softmax_scale) {
  const int64_t B = sz.batch, H = sz.heads, G = sz.kv_heads, D = sz.head_dim, Smax = sz.max_slots;
  at::Tensor out = at::empty({B, H, D}, q.options());
  at::Tensor lse = at::full({B, H}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  if (B * H == 0) return {out, lse};
  // float32 copies of the cache (dequantised with the per-head scales for FP8), contiguous.
  at::Tensor kf = k_cache.to(at::kFloat);
  at::Tensor vf = v_cache.to(at::kFloat);
  if (sz.fp8_cache) {
    kf.mul_(k_scale->view({1, 1, G, 1}));
    vf.mul_(v_scale->view({1, 1, G, 1}));
  }
  kf = kf.contiguous();
  vf = vf.contiguous();
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor of = at::zeros({B, H, D}, q.options().dtype(at::kFloat));
  const int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  const int32_t* kpos = key_positions.has_value() ? key_positions->data_ptr<int32_t>() : nullptr;
  const int64_t kpos_stride = key_positions.has_value() ? key_positions->stride(0) : 0;
  const int32_t* qpos = query_positions.has_value() ? query_positions->data_ptr<int32_t>() : nullptr;
  const float scale = static_cast<float>(softmax_scale);
  const float* Q = qf.data_ptr<float>();
  const float* K = kf.data_ptr<float>();
  const float* V = vf.data_ptr<float>();
  float* O = of.data_ptr<float>();
  float* L = lse.data_ptr<float>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> slots;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / (H / G);
      const int64_t i = qpos ? qpos[b] : static_cast<int64_t>(lens[b]) - 1;
      const float* qrow = Q + bh * D;
      scores.clear();
      slots.clear();
      float row_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < lens[b]; ++j) {
        const int64_t p = kpos ? kpos[b * kpos_stride + j] : j;
        if (p < 0 || !kn::mask_visible(sz.mask, i, p)) continue;
        const float* krow = K + ((b * Smax + j) * G + g) * D;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qrow[d] * krow[d];
        scores.push_back(dot * scale);
        slots.push_back(j);
        row_max = std::max(row_max, scores.back());
      }
      if (slots.empty()) continue;  // out 0, lse -inf
      double denom = 0.0;
      float* orow = O + bh * D;
      for (size_t t = 0; t < slots.size(); ++t) {
        const float p = std::exp(scores[t] - row_max);
        denom += p;
        const float* vrow = V + ((b * Smax + slots[t]) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] += p * vrow[d];
      }
      const float inv = static_cast<float>(1.0 / denom);
      for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
      L[bh] = row_max + static_cast<float>(std::log(denom));
    }
  });
  out.copy_(of);
  return {out, lse};
}

}  // namespace llama4::cpu
