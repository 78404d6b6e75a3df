// CPU grouped expert GEMM: dequantise (FP8 scales per row/channel or per block) and one at::mm per
// expert over its rows; its weight gradient dw[e] = dy_e^T @ x_e (the rows are the reduction), and the
// per-(expert, channel) FP8 quantisation that gradient's FP8 operands take.
// Legend: M rows (sorted by expert), K depth, N outputs, E experts, G = ceil(K/128).
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_ops.h"

namespace llama4::cpu {
namespace {

constexpr int64_t kBlock = kernels::kQuantBlock;

// Per-element scale of a [rows, cols] operand from a [ceil(rows/br), ceil(cols/128)] block grid.
at::Tensor expand_blocks(const at::Tensor& scale, int64_t rows, int64_t cols, int64_t row_block) {
  return scale.repeat_interleave(row_block, 0).repeat_interleave(kBlock, 1).narrow(0, 0, rows).narrow(1, 0, cols);
}

// First row of each expert: the prefix sums of group_sizes [E], which must be >= 0 and sum to at most the M rows of
// `operands` (named in the error with the op).
std::vector<int64_t> group_starts(const int32_t* sizes, int64_t E, int64_t M, const char* op, const char* operands) {
  std::vector<int64_t> starts(static_cast<size_t>(E));
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(sizes[e] >= 0, op, ": group_sizes must be >= 0, got ", sizes[e], " for expert ", e);
    starts[static_cast<size_t>(e)] = total;
    total += sizes[e];
  }
  TORCH_CHECK_VALUE(total <= M, op, ": sum(group_sizes) = ", total, " exceeds the M = ", M, " rows of ", operands);
  return starts;
}

}  // namespace

at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                        const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                        const GroupedGemmSizes& sz, at::ScalarType out_dtype) {
  at::Tensor out = at::empty({sz.M, sz.N}, x.options().dtype(out_dtype));
  const int32_t* sizes = group_sizes.data_ptr<int32_t>();
  group_starts(sizes, sz.E, sz.M, "grouped_gemm", "x");  // the checks only: the loop below walks the rows in order

  at::Tensor xf = x.to(at::kFloat);
  if (sz.fp8) {
    xf = sz.block_scales ? xf * expand_blocks(*x_scale, sz.M, sz.K, 1) : xf * x_scale->unsqueeze(1);
  }
  int64_t start = 0;
  for (int64_t e = 0; e < sz.E; ++e) {
    const int64_t rows = sizes[e];
    if (rows == 0) continue;
    at::Tensor we = w[e].to(at::kFloat);  // [N, K]
    if (sz.fp8) {
      we = sz.block_scales ? we * expand_blocks((*w_scale)[e], sz.N, sz.K, kBlock) : we * (*w_scale)[e].unsqueeze(1);
    }
    out.narrow(0, start, rows).copy_(at::mm(xf.narrow(0, start, rows), we.t()));
    start += rows;
  }
  return out;
}

}  // namespace llama4::cpu

namespace llama4::cpu {

at::Tensor grouped_gemm_wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& group_sizes,
                              const std::optional<at::Tensor>& dy_scale, const std::optional<at::Tensor>& x_scale,
                              const GroupedWgradSizes& sz, at::ScalarType out_dtype) {
  const int32_t* sizes = group_sizes.data_ptr<int32_t>();
  const std::vector<int64_t> starts = group_starts(sizes, sz.E, sz.M, "grouped_gemm_wgrad", "dy and x");

  at::Tensor dw = at::empty({sz.E, sz.N, sz.K}, dy.options().dtype(out_dtype));
  // One expert per task: each dw[e] is one float32 matmul over that expert's rows and nothing else, so the result
  // does not depend on how the experts are spread over threads (the matmul inside a task runs single-threaded).
  at::parallel_for(0, sz.E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t rows = sizes[e];
      at::Tensor dw_e = dw[e];
      if (rows == 0) {
        dw_e.zero_();  // an empty reduction: exactly zero, never stale memory
        continue;
      }
      const int64_t start = starts[static_cast<size_t>(e)];
      at::Tensor acc = at::mm(dy.narrow(0, start, rows).to(at::kFloat).t(), x.narrow(0, start, rows).to(at::kFloat));
      if (sz.fp8) {
        // The kernel's epilogue order: x_scale[k] * (dy_scale[n] * acc), each product rounded to float32.
        acc.mul_((*dy_scale)[e].unsqueeze(1)).mul_((*x_scale)[e].unsqueeze(0));
      }
      dw_e.copy_(acc);
    }
  });
  return dw;
}

}  // namespace llama4::cpu

namespace llama4::cpu {
namespace {

constexpr int64_t kQuantRowsPerTask = 64;

inline float nan_max(float a, float b) {
  return (b > a || b != b) ? b : a;
}

template <typename fp8_t>
void quantize_grouped_typed(const float* x, int64_t M, int64_t C, const std::vector<int64_t>& starts,
                            const int32_t* sizes, kernels::Fp8Kind kind, fp8_t* out, float* scale) {
  const int64_t E = static_cast<int64_t>(starts.size());
  // Pass 1, one expert per task: a serial max down its rows (exact, so independent of the thread count).
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      float* s = scale + e * C;
      std::fill(s, s + C, 0.0f);
      for (int64_t r = starts[e]; r < starts[e] + sizes[e]; ++r)
        for (int64_t c = 0; c < C; ++c) s[c] = nan_max(s[c], std::fabs(x[r * C + c]));
      for (int64_t c = 0; c < C; ++c) s[c] = kernels::fp8_scale_from_amax(s[c], kind);
    }
  });
  // Pass 2, rows: each row divided by its expert's scales; rows past the last group are 0.
  const int64_t total = E > 0 ? starts[E - 1] + sizes[E - 1] : 0;
  at::parallel_for(0, M, kQuantRowsPerTask, [&](int64_t begin, int64_t end) {
    int64_t e = 0;
    for (int64_t r = begin; r < end; ++r) {
      if (r >= total) {
        for (int64_t c = 0; c < C; ++c) out[r * C + c] = fp8_t(0.0f);
        continue;
      }
      while (r >= starts[e] + sizes[e]) ++e;
      const float* s = scale + e * C;
      for (int64_t c = 0; c < C; ++c) out[r * C + c] = fp8_t(kernels::fp8_scaled_saturated(x[r * C + c], s[c], kind));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_fp8_grouped(const at::Tensor& x, const at::Tensor& group_sizes,
                                                        const Fp8GroupedQuantSizes& sz, at::ScalarType fp8_dtype) {
  const int32_t* sizes = group_sizes.data_ptr<int32_t>();
  const std::vector<int64_t> starts = group_starts(sizes, sz.E, sz.M, "quantize_fp8_grouped", "x");
  at::Tensor out = at::empty({sz.M, sz.C}, x.options().dtype(fp8_dtype));
  at::Tensor scale = at::empty({sz.E, sz.C}, x.options().dtype(at::kFloat));
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  if (fp8_dtype == at::kFloat8_e4m3fn) {
    quantize_grouped_typed(xf.data_ptr<float>(), sz.M, sz.C, starts, sizes, sz.kind, out.data_ptr<c10::Float8_e4m3fn>(),
                           scale.data_ptr<float>());
  } else {
    quantize_grouped_typed(xf.data_ptr<float>(), sz.M, sz.C, starts, sizes, sz.kind, out.data_ptr<c10::Float8_e5m2>(),
                           scale.data_ptr<float>());
  }
  return {out, scale};
}

}  // namespace llama4::cpu
