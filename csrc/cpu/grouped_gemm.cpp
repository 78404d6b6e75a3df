// CPU grouped expert GEMM: dequantise (FP8 scales per row/channel or per block) and one at::mm per
// expert over its rows. Legend: M rows (sorted by expert), K depth, N outputs, E experts, G = ceil(K/128).
#include "cpu/cpu_ops.h"

namespace llama4::cpu {
namespace {

constexpr int64_t kBlock = kernels::kQuantBlock;

// Per-element scale of a [rows, cols] operand from a [ceil(rows/br), ceil(cols/128)] block grid.
at::Tensor expand_blocks(const at::Tensor& scale, int64_t rows, int64_t cols, int64_t row_block) {
  return scale.repeat_interleave(row_block, 0).repeat_interleave(kBlock, 1).narrow(0, 0, rows).narrow(1, 0, cols);
}

}  // namespace

at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                        const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                        const GroupedGemmSizes& sz, at::ScalarType out_dtype) {
  at::Tensor out = at::empty({sz.M, sz.N}, x.options().dtype(out_dtype));
  const int32_t* sizes = group_sizes.data_ptr<int32_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < sz.E; ++e) {
    TORCH_CHECK_VALUE(sizes[e] >= 0, "grouped_gemm: group_sizes must be >= 0, got ", sizes[e], " for expert ", e);
    total += sizes[e];
  }
  TORCH_CHECK_VALUE(total <= sz.M, "grouped_gemm: sum(group_sizes) = ", total, " exceeds the M = ", sz.M, " rows of x");

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
