// CPU MoE dispatch (permute rows into expert order) and combine (sum each token's K rows).
// Legend: T tokens, K top-k, N = T*K slots, D row width. Products and sums in float32.
// The inner loops work on raw element bits with branch-free conversions, so the compiler
// vectorises them (c10::BFloat16's conversion has a NaN branch that blocks that).
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpu_ops.h"

namespace llama4::cpu {
namespace {

constexpr int64_t kRowsPerTask = 16;
constexpr uint16_t kBf16QuietNaN = 0x7FC0;

// Element codecs: float32 as is; bfloat16 as its 16 bits (round-to-nearest-even, NaN kept:
// bit-identical to c10::BFloat16); float16 through c10::Half.
struct F32 {
  using raw = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
struct BF16 {
  using raw = uint16_t;
  static float load(uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? kBf16QuietNaN : rounded;
  }
};
struct F16 {
  using raw = c10::Half;
  static float load(c10::Half h) { return static_cast<float>(h); }
  static c10::Half store(float f) { return c10::Half(f); }
};

template <typename Codec>
void permute_rows(const at::Tensor& x, const int32_t* slots, const float* w, int64_t K, int64_t D, int64_t N,
                  at::Tensor& out) {
  using raw = typename Codec::raw;
  const raw* src = reinterpret_cast<const raw*>(x.data_ptr());
  raw* dst = reinterpret_cast<raw*>(out.data_ptr());
  const int64_t stride = x.stride(0);
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t s = slots[p];
      const raw* row = src + (s / K) * stride;
      raw* o = dst + p * D;
      if (w == nullptr) {
        std::memcpy(o, row, sizeof(raw) * D);
      } else {
        const float ws = w[s];
        for (int64_t d = 0; d < D; ++d) o[d] = Codec::store(Codec::load(row[d]) * ws);
      }
    }
  });
}

template <typename Codec>
void unpermute_rows(const at::Tensor& y, const int32_t* pos, const float* w, int64_t T, int64_t K, int64_t D,
                    at::Tensor& out) {
  using raw = typename Codec::raw;
  const raw* src = reinterpret_cast<const raw*>(y.data_ptr());
  raw* dst = reinterpret_cast<raw*>(out.data_ptr());
  const int64_t stride = y.stride(0);
  at::parallel_for(0, T, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {  // k order: the sum is bitwise deterministic
        const raw* row = src + static_cast<int64_t>(pos[t * K + k]) * stride;
        const float wk = w ? w[t * K + k] : 1.0f;
        for (int64_t d = 0; d < D; ++d) acc[d] += Codec::load(row[d]) * wk;
      }
      raw* o = dst + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = Codec::store(acc[d]);
    }
  });
}

}  // namespace

at::Tensor moe_permute(const at::Tensor& x, const at::Tensor& sorted_slots,
                       const std::optional<at::Tensor>& topk_weights, const RowsSizes& sizes) {
  const int64_t K = sizes.top_k, D = sizes.width, N = sizes.tokens * sizes.top_k;
  at::Tensor out = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return out;
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  const float* w = topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: permute_rows<F32>(x, slots, w, K, D, N, out); break;
    case at::kBFloat16: permute_rows<BF16>(x, slots, w, K, D, N, out); break;
    default: permute_rows<F16>(x, slots, w, K, D, N, out); break;
  }
  return out;
}

at::Tensor moe_unpermute(const at::Tensor& y, const at::Tensor& slot_positions,
                         const std::optional<at::Tensor>& topk_weights, const RowsSizes& sizes) {
  const int64_t T = sizes.tokens, K = sizes.top_k, D = sizes.width;
  at::Tensor out = at::empty({T, D}, y.options());
  if (T == 0 || D == 0) return out;
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  const float* w = topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr;
  switch (y.scalar_type()) {
    case at::kFloat: unpermute_rows<F32>(y, pos, w, T, K, D, out); break;
    case at::kBFloat16: unpermute_rows<BF16>(y, pos, w, T, K, D, out); break;
    default: unpermute_rows<F16>(y, pos, w, T, K, D, out); break;
  }
  return out;
}

}  // namespace llama4::cpu
