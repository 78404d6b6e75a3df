// CPU MoE router: scores + top-k per token in parallel, then a serial O(T*K) counting sort for
// the dispatch order (histogram, exclusive offsets, stable positions).
// Legend: T tokens, E experts, K top-k, N = T*K slots (s = t*K + k).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/cpu_ops.h"

namespace llama4::cpu {
namespace {

constexpr int64_t kTokensPerTask = 32;  // parallel_for grain: a few microseconds of work each
constexpr int64_t kInsertionTopK = 16;  // above this K, a partial sort beats insertion

// Selection order: larger key first; NaN below every number; ties (also -0 == +0) to lower index.
inline bool ranks_before(float a, int32_t ia, float b, int32_t ib) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

// The K best experts of one token into order_K[0..K), best first.
void select_topk(const float* key_E, int64_t E, int64_t K, int32_t* order_K) {
  const auto before = [&](int32_t a, int32_t b) { return ranks_before(key_E[a], a, key_E[b], b); };
  if (K > kInsertionTopK) {
    std::vector<int32_t> all_E(E);
    std::iota(all_E.begin(), all_E.end(), 0);
    std::partial_sort(all_E.begin(), all_E.begin() + K, all_E.end(), before);
    std::copy(all_E.begin(), all_E.begin() + K, order_K);
    return;
  }
  // Insertion into a best-first buffer: on random data almost every expert loses to the current
  // K-th best at once, so this is one compare per expert. Experts arrive in index order, so an
  // equal key never moves ahead of an earlier (lower) expert.
  int64_t filled = 0;
  for (int32_t e = 0; e < E; ++e) {
    if (filled == K && !before(e, order_K[K - 1])) continue;
    int64_t j = filled < K ? filled++ : K - 1;
    while (j > 0 && before(e, order_K[j - 1])) {
      order_K[j] = order_K[j - 1];
      --j;
    }
    order_K[j] = e;
  }
}

template <typename scalar_t>
void route_tokens(const scalar_t* logits, int64_t row_stride, const float* bias, int64_t T, int64_t E, int64_t K,
                  ScoreFuncId score_func, bool renormalize, float* weights, int32_t* ids) {
  at::parallel_for(0, T, kTokensPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> logit_E(E), key_E(E);
    std::vector<int32_t> order_K(K);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * row_stride;
      for (int64_t e = 0; e < E; ++e) {
        logit_E[e] = static_cast<float>(row[e]);
        key_E[e] = bias ? logit_E[e] + bias[e] : logit_E[e];
      }
      select_topk(key_E.data(), E, K, order_K.data());

      float* w = weights + t * K;
      int32_t* id = ids + t * K;
      if (score_func == ScoreFuncId::kSigmoid) {
        for (int64_t k = 0; k < K; ++k) w[k] = 1.0f / (1.0f + std::exp(-logit_E[order_K[k]]));
      } else {
        // fmax ignores NaN like the CUDA kernel; a NaN logit then poisons the sum, so the row is NaN.
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t e = 0; e < E; ++e) row_max = std::fmax(row_max, logit_E[e]);
        double denom = 0.0;  // double accumulation keeps the sum within an ulp for any E
        for (int64_t e = 0; e < E; ++e) denom += std::exp(logit_E[e] - row_max);
        const float inv = 1.0f / static_cast<float>(denom);
        for (int64_t k = 0; k < K; ++k) w[k] = std::exp(logit_E[order_K[k]] - row_max) * inv;
      }
      if (renormalize) {
        double sum = 0.0;
        for (int64_t k = 0; k < K; ++k) sum += w[k];
        const float denom = std::max(static_cast<float>(sum), std::numeric_limits<float>::min());
        for (int64_t k = 0; k < K; ++k) w[k] = w[k] / denom;
      }
      for (int64_t k = 0; k < K; ++k) id[k] = order_K[k];
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(
    const at::Tensor& router_logits, const RouteSizes& sizes, ScoreFuncId score_func,
    const std::optional<at::Tensor>& expert_bias, bool renormalize) {
  const int64_t T = sizes.tokens, E = sizes.experts, K = sizes.top_k, N = T * K;
  const auto i32 = router_logits.options().dtype(at::kInt);
  at::Tensor weights = at::empty({T, K}, router_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, K}, i32);
  at::Tensor counts = at::zeros({E}, i32);
  at::Tensor offsets = at::empty({E + 1}, i32);
  at::Tensor sorted_slots = at::empty({N}, i32);
  at::Tensor positions = at::empty({T, K}, i32);

  const float* bias = expert_bias.has_value() ? expert_bias->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, router_logits.scalar_type(), "moe_route_cpu", [&] {
    route_tokens<scalar_t>(router_logits.data_ptr<scalar_t>(), router_logits.stride(0), bias, T, E, K, score_func,
                           renormalize, weights.data_ptr<float>(), ids.data_ptr<int32_t>());
  });

  // Counting sort of the slots by expert: serial and O(N), stable by construction.
  const int32_t* id = ids.data_ptr<int32_t>();
  int32_t* count = counts.data_ptr<int32_t>();
  int32_t* offset = offsets.data_ptr<int32_t>();
  for (int64_t s = 0; s < N; ++s) ++count[id[s]];
  offset[0] = 0;
  for (int64_t e = 0; e < E; ++e) offset[e + 1] = offset[e] + count[e];
  std::vector<int32_t> cursor(offset, offset + E);
  int32_t* sorted = sorted_slots.data_ptr<int32_t>();
  int32_t* position = positions.data_ptr<int32_t>();
  for (int64_t s = 0; s < N; ++s) {
    const int32_t p = cursor[id[s]]++;
    position[s] = p;
    sorted[p] = static_cast<int32_t>(s);
  }
  return {weights, ids, counts, offsets, sorted_slots, positions};
}

}  // namespace llama4::cpu
