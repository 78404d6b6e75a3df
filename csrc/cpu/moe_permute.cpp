// CPU MoE dispatch (permute rows into expert order) and combine (sum each token's K rows).
// Legend: T tokens, K top-k, N = T*K slots, D row width. Products and sums in float32.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/cpu_ops.h"

namespace llama4::cpu {
namespace {

constexpr int64_t kRowsPerTask = 16;

}  // namespace

at::Tensor moe_permute(const at::Tensor& x, const at::Tensor& sorted_slots,
                       const std::optional<at::Tensor>& topk_weights, const RowsSizes& sizes) {
  const int64_t K = sizes.top_k, D = sizes.width, N = sizes.tokens * sizes.top_k;
  at::Tensor out = at::empty({N, D}, x.options());
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  const float* w = topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr;
  const int64_t stride = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t s = slots[p];
        const scalar_t* row = src + (s / K) * stride;
        scalar_t* o = dst + p * D;
        if (w == nullptr) {
          std::copy(row, row + D, o);
        } else {
          const float ws = w[s];
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(static_cast<float>(row[d]) * ws);
        }
      }
    });
  });
  return out;
}

at::Tensor moe_unpermute(const at::Tensor& y, const at::Tensor& slot_positions,
                         const std::optional<at::Tensor>& topk_weights, const RowsSizes& sizes) {
  const int64_t T = sizes.tokens, K = sizes.top_k, D = sizes.width;
  at::Tensor out = at::empty({T, D}, y.options());
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  const float* w = topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr;
  const int64_t stride = y.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cpu", [&] {
    const scalar_t* src = y.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(D);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t k = 0; k < K; ++k) {  // k order: the sum is bitwise deterministic
          const scalar_t* row = src + static_cast<int64_t>(pos[t * K + k]) * stride;
          const float wk = w ? w[t * K + k] : 1.0f;
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(row[d]) * wk;
        }
        scalar_t* o = dst + t * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return out;
}

}  // namespace llama4::cpu
