// CPU FP8 quantisation, dequantisation and SwiGLU: the same maths as the CUDA kernels
// (kernels/fp8_math.h: scale from amax with a floor, division, saturation, round-to-nearest-even
// cast), so both paths produce the same bits. Legend: M rows, K columns, G = ceil(K / 128).
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <cmath>

#include "cpu/cpu_ops.h"

namespace llama4::cpu {
namespace {

namespace kn = llama4::kernels;
constexpr int64_t kRowsPerTask = 8;
constexpr int64_t kElementsPerTask = 1 << 15;

inline float nan_max(float a, float b) {
  return (b > a || b != b) ? b : a;
}

// Reads element (row, col) of the source: x, or silu(gate) * up of a [M, 2K] input.
template <typename scalar_t>
struct Source {
  const scalar_t* base;
  int64_t row_stride;
  int64_t cols;
  bool swiglu;
  float operator()(int64_t row, int64_t col) const {
    const scalar_t* r = base + row * row_stride;
    if (!swiglu) return static_cast<float>(r[col]);
    return kn::swiglu_value(static_cast<float>(r[col]), static_cast<float>(r[cols + col]));
  }
};

template <typename fp8_t, typename scalar_t>
void quantize_typed(const Source<scalar_t>& src, const Fp8QuantSizes& sz, fp8_t* out, float* scale) {
  const int64_t M = sz.rows, K = sz.cols;
  const auto quantize_range = [&](int64_t row, int64_t c0, int64_t c1, float s) {
    for (int64_t c = c0; c < c1; ++c) out[row * K + c] = fp8_t(kn::fp8_scaled_saturated(src(row, c), s, sz.kind));
  };
  if (sz.granularity == kn::QuantGranularity::kTensor) {
    float amax = 0.0f;  // serial max: exact, and the result cannot depend on the thread count
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < K; ++c) amax = nan_max(amax, std::fabs(src(r, c)));
    const float s = kn::fp8_scale_from_amax(amax, sz.kind);
    at::parallel_for(0, M, kRowsPerTask, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) quantize_range(r, 0, K, s);
    });
    scale[0] = s;
    return;
  }
  const int64_t group = sz.granularity == kn::QuantGranularity::kRow ? K : kn::kQuantBlock;
  const int64_t groups = sz.granularity == kn::QuantGranularity::kRow ? 1 : (K + group - 1) / group;
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * group, c1 = std::min(K, c0 + group);
        float amax = 0.0f;
        for (int64_t c = c0; c < c1; ++c) amax = nan_max(amax, std::fabs(src(r, c)));
        const float s = kn::fp8_scale_from_amax(amax, sz.kind);
        quantize_range(r, c0, c1, s);
        scale[r * groups + g] = s;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const Fp8QuantSizes& sz, bool swiglu) {
  const at::ScalarType fp8 = sz.kind == kn::Fp8Kind::kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
  at::Tensor out = at::empty({sz.rows, sz.cols}, x.options().dtype(fp8));
  at::Tensor scale = at::empty(fp8_scale_shape(sz.granularity, sz.rows, sz.cols), x.options().dtype(at::kFloat));
  if (sz.rows == 0 && sz.granularity != kn::QuantGranularity::kTensor) return {out, scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_fp8_cpu", [&] {
    const Source<scalar_t> src{x.data_ptr<scalar_t>(), x.stride(0), sz.cols, swiglu};
    if (sz.kind == kn::Fp8Kind::kE4M3) {
      quantize_typed(src, sz, out.data_ptr<c10::Float8_e4m3fn>(), scale.data_ptr<float>());
    } else {
      quantize_typed(src, sz, out.data_ptr<c10::Float8_e5m2>(), scale.data_ptr<float>());
    }
  });
  return {out, scale};
}

at::Tensor dequantize_fp8(const at::Tensor& q, const at::Tensor& scale, const Fp8QuantSizes& sz,
                          at::ScalarType out_dtype) {
  at::Tensor out = at::empty({sz.rows, sz.cols}, q.options().dtype(out_dtype));
  const int64_t total = sz.rows * sz.cols;
  if (total == 0) return out;
  const int64_t K = sz.cols, groups = (K + kn::kQuantBlock - 1) / kn::kQuantBlock;
  const float* s = scale.data_ptr<float>();
  const auto scale_of = [&](int64_t i) {
    switch (sz.granularity) {
      case kn::QuantGranularity::kTensor: return s[0];
      case kn::QuantGranularity::kRow: return s[i / K];
      default: return s[(i / K) * groups + (i % K) / kn::kQuantBlock];
    }
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_fp8_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const auto run = [&](const auto* in) {
      at::parallel_for(0, total, kElementsPerTask, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = static_cast<scalar_t>(static_cast<float>(in[i]) * scale_of(i));
      });
    };
    if (sz.kind == kn::Fp8Kind::kE4M3) {
      run(q.data_ptr<c10::Float8_e4m3fn>());
    } else {
      run(q.data_ptr<c10::Float8_e5m2>());
    }
  });
  return out;
}

at::Tensor swiglu(const at::Tensor& h) {
  const int64_t M = h.size(0), K = h.size(1) / 2;
  at::Tensor out = at::empty({M, K}, h.options());
  if (M * K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "swiglu_cpu", [&] {
    const Source<scalar_t> src{h.data_ptr<scalar_t>(), h.stride(0), K, true};
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, kRowsPerTask, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t c = 0; c < K; ++c) o[r * K + c] = static_cast<scalar_t>(src(r, c));
    });
  });
  return out;
}

}  // namespace llama4::cpu
