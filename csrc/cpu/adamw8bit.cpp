// CPU 8-bit AdamW step and blockwise dynamic quantisation: the same per-element maths as the CUDA
// kernel (kernels/adamw8bit_math.h), one quantisation block per task, at::parallel_for.
// Legend: n elements, BS block size, B = ceil(n / BS) blocks.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>

#include "cpu/cpu_ops.h"
#include "kernels/adamw8bit_math.h"

namespace llama4::cpu {
namespace {

namespace am = llama4::kernels::adamw;
constexpr int64_t kBlocksPerTask = 16;        // 4K elements: enough work per task
constexpr int64_t kFp32StateGrain = 1 << 14;  // elements per task for float32 state

// Parameter element access: float32, or bfloat16 through its raw bits (stochastic rounding).
inline float load_param(const float* p, int64_t i) {
  return p[i];
}
inline float load_param(const c10::BFloat16* p, int64_t i) {
  return static_cast<float>(p[i]);
}
inline void store_param(float* p, int64_t i, float x, uint64_t, uint64_t) {
  p[i] = x;
}
inline void store_param(c10::BFloat16* p, int64_t i, float x, uint64_t seed, uint64_t step) {
  p[i] = c10::BFloat16(am::to_bf16_stochastic(x, am::random16(seed, step, static_cast<uint64_t>(i))),
                       c10::BFloat16::from_bits());
}

// A lookup index over a quantisation map: for the top 16 bits of a float's order-preserving key
// (sign, exponent, 7 mantissa bits: buckets 0.8 % wide), the largest map entry <= the bucket's
// smallest value. One table load and usually no refinement step replace the eight dependent
// loads of a binary search; the result is exactly quantize_nearest's (same lower entry, same
// final neighbour test).
class QmapIndex {
 public:
  explicit QmapIndex(const float* qmap) : start_(kBuckets) {
    std::copy(qmap, qmap + am::kQmapSize, map_.begin());
    for (uint32_t b = 0; b < kBuckets; ++b) {
      const float lowest = from_key(b << kShift);
      const auto it = std::upper_bound(map_.begin(), map_.end(), lowest);
      start_[b] = lowest != lowest || it == map_.begin() ? 0 : static_cast<uint8_t>(it - map_.begin() - 1);
    }
  }
  bool matches(const float* qmap) const { return std::memcmp(qmap, map_.data(), sizeof(float) * am::kQmapSize) == 0; }
  int quantize(float x) const {
    if (x != x) return 0;
    int idx = start_[to_key(x) >> kShift];
    while (idx + 1 < am::kQmapSize && map_[idx + 1] <= x) ++idx;
    return am::nearest_from_lower(map_.data(), idx, x);
  }

 private:
  static constexpr int kShift = 16;
  static constexpr uint32_t kBuckets = 1u << (32 - kShift);
  static uint32_t to_key(float x) {  // monotone in x: flip negatives, set the sign bit of positives
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  static float from_key(uint32_t k) {
    const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
  std::array<float, am::kQmapSize> map_{};
  std::vector<uint8_t> start_;
};

// Indexes are built once per distinct map (the optimizer uses two) and kept for the process.
const QmapIndex& qmap_index(const float* qmap) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<QmapIndex>> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& index : cache)
    if (index->matches(qmap)) return *index;
  cache.push_back(std::make_unique<QmapIndex>(qmap));
  return *cache.back();
}

template <typename scalar_t>
void step_quantized(const AdamWArgs& a, scalar_t* param, const scalar_t* grad) {
  const int64_t n = a.numel, bs = a.block_size, blocks = (n + bs - 1) / bs;
  uint8_t* qm = a.exp_avg.data_ptr<uint8_t>();
  uint8_t* qv = a.exp_avg_sq.data_ptr<uint8_t>();
  float* absmax_m = a.absmax_exp_avg.data_ptr<float>();
  float* absmax_v = a.absmax_exp_avg_sq.data_ptr<float>();
  const float* map_s = a.qmap_signed.data_ptr<float>();
  const float* map_u = a.qmap_unsigned.data_ptr<float>();
  const QmapIndex& index_s = qmap_index(map_s);
  const QmapIndex& index_u = qmap_index(map_u);
  at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> m(bs), v(bs);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * bs, count = std::min(bs, n - first);
      float local_m = 0.0f, local_v = 0.0f;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t i = first + j;
        float p = load_param(param, i);
        m[j] = map_s[qm[i]] * absmax_m[blk];
        v[j] = map_u[qv[i]] * absmax_v[blk];
        am::adamw_update(a.scalars, load_param(grad, i), p, m[j], v[j]);
        store_param(param, i, p, a.seed, a.step);
        local_m = am::nan_max(local_m, std::fabs(m[j]));
        local_v = am::nan_max(local_v, v[j]);
      }
      for (int64_t j = 0; j < count; ++j) {
        qm[first + j] = static_cast<uint8_t>(index_s.quantize(am::normalise(m[j], local_m)));
        qv[first + j] = static_cast<uint8_t>(index_u.quantize(am::normalise(v[j], local_v)));
      }
      absmax_m[blk] = local_m;
      absmax_v[blk] = local_v;
    }
  });
}

template <typename scalar_t>
void step_fp32_state(const AdamWArgs& a, scalar_t* param, const scalar_t* grad) {
  float* m = a.exp_avg.data_ptr<float>();
  float* v = a.exp_avg_sq.data_ptr<float>();
  at::parallel_for(0, a.numel, kFp32StateGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float p = load_param(param, i);
      am::adamw_update(a.scalars, load_param(grad, i), p, m[i], v[i]);
      store_param(param, i, p, a.seed, a.step);
    }
  });
}

template <typename scalar_t>
void quantize_typed(const scalar_t* x, int64_t n, int64_t bs, const float* map, uint8_t* codes, float* absmax) {
  const int64_t blocks = (n + bs - 1) / bs;
  const QmapIndex& index = qmap_index(map);
  at::parallel_for(0, blocks, kBlocksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * bs, count = std::min(bs, n - first);
      float local = 0.0f;
      for (int64_t j = 0; j < count; ++j) local = am::nan_max(local, std::fabs(load_param(x, first + j)));
      for (int64_t j = 0; j < count; ++j)
        codes[first + j] = static_cast<uint8_t>(index.quantize(am::normalise(load_param(x, first + j), local)));
      absmax[blk] = local;
    }
  });
}

}  // namespace

void adamw8bit_step(const AdamWArgs& a) {
  if (a.numel == 0) return;
  AT_DISPATCH_SWITCH(a.param.scalar_type(), "adamw8bit_step_cpu", AT_DISPATCH_CASE(at::kFloat, [&] {
                       auto* p = a.param.data_ptr<float>();
                       const auto* g = a.grad.data_ptr<float>();
                       a.quantized ? step_quantized(a, p, g) : step_fp32_state(a, p, g);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       auto* p = a.param.data_ptr<c10::BFloat16>();
                       const auto* g = a.grad.data_ptr<c10::BFloat16>();
                       a.quantized ? step_quantized(a, p, g) : step_fp32_state(a, p, g);
                     }));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& qmap, int64_t block_size) {
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + block_size - 1) / block_size}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  if (x.scalar_type() == at::kFloat) {
    quantize_typed(x.data_ptr<float>(), n, block_size, qmap.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                   absmax.data_ptr<float>());
  } else {
    quantize_typed(x.data_ptr<c10::BFloat16>(), n, block_size, qmap.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                   absmax.data_ptr<float>());
  }
  return {codes, absmax};
}

at::Tensor dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                int64_t block_size) {
  const int64_t n = codes.numel();
  at::Tensor out = at::empty({n}, codes.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* am_ = absmax.data_ptr<float>();
  const float* map = qmap.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, kFp32StateGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = map[c[i]] * am_[i / block_size];
  });
  return out;
}

}  // namespace llama4::cpu
