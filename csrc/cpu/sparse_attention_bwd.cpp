// CPU sparse-global attention backward, FlashAttention-2's tiling on the CPU: (query tile, key tile) pairs of
// kTileQ x kTileK, visited only when kernels/attention_mask.h's mask_tile_may_be_visible() allows a visible pair
// (the tiles the CUDA kernels visit), with the exact per-element rule inside. Per tile, P and dP are two BLAS
// GEMMs (P recomputed from the forward's lse) and each gradient one more:
//   dk/dv pass, one task per (sequence, kv head, key tile): walks every query head of its group and the query
//               tiles that can see its keys, accumulating dV += P^T dO and dK += dS^T Q in its own buffers;
//   dq pass,    one task per (sequence, head, query tile): walks the key tiles it can see, dQ += dS K.
// Every output row has one owner and a fixed order (no atomics): bitwise deterministic. Work is O(S x visible
// tiles), extra memory O(S) (delta) plus a few tiles per thread: never an S x Sk tensor.
// With p = exp(scale q.k - lse), dP = dout.v, delta = rowsum(dout * out), dS = p (dP - delta):
// dv = sum_i p dout_i, dk = scale sum_i dS q_i, dq = scale sum_j dS k_j. float32 maths (float64 for
// float64 inputs).
// Legend: B batch, S queries, Sk keys, H query heads, G kv heads, D head dim.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/sparse_attention_keys.h"

// MKL's thread-local thread count, C interface (mkl_service.h maps mkl_set_num_threads_local to it; the lowercase
// symbol is the Fortran one, by reference). Exported by x86 torch builds, which link MKL; weak, so a build without
// MKL loads and simply skips the call.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace llama4::cpu {
namespace {

// Keeps MKL to the calling thread while it lives: the tile GEMMs are 128 x 128 x D, far too small to fork a team
// of threads for each (measured: 10x slower than serial on a 2-core machine with other load), and the tasks above
// them are the unit of parallelism.
class MklSerialGuard {
 public:
  MklSerialGuard() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~MklSerialGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  MklSerialGuard(const MklSerialGuard&) = delete;
  MklSerialGuard& operator=(const MklSerialGuard&) = delete;

 private:
  int previous_;
};

namespace kn = llama4::kernels;
using attention::Span;
// 128 x 128 tiles: each GEMM is 2 * 128 * 128 * D FLOPs, enough to amortise the ATen call around it, and a
// float32 tile (64 KiB) stays in L2 between its GEMMs and its element-wise passes.
constexpr int64_t kTileQ = 128;  // query rows per tile
constexpr int64_t kTileK = 128;  // keys per tile

template <typename acc_t>
struct BwdTensors {
  const acc_t *Q, *K, *V, *dO, *O;  // acc_t copies: [B, S, H, D], [B, Sk, G, D] x2, [B, S, H, D] x2
  const float* L;                   // lse [B, H, S]
  acc_t* delta;                     // [B, H, S]
  acc_t *dQ, *dK, *dV;              // acc_t results: [B, S, H, D], [B, Sk, G, D] x2
};

struct Problem {
  int64_t B, S, Sk, H, G, D;
  kn::AttentionMask mask;
  at::TensorOptions options;  // acc_t on the CPU
};

// Rows [r0, r0 + n) of a [B, rows, heads, D] tensor at (batch b, head h): an [n, D] view, row stride heads * D.
template <typename acc_t>
at::Tensor rows_view(const acc_t* base, int64_t b, int64_t rows, int64_t heads, int64_t h, int64_t r0, int64_t n,
                     int64_t D, const at::TensorOptions& options) {
  acc_t* p = const_cast<acc_t*>(base) + ((b * rows + r0) * heads + h) * D;
  return at::from_blob(p, {n, D}, {heads * D, 1}, options);
}

// One tile: P [nq, nk] (0 where invisible, and on rows that saw no key) and dS [nq, nk] for the query rows
// [r0, r1) of head h against the keys [j0, j1) of kv head g (rows and keys relative to the span).
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> tile_p_ds(const BwdTensors<acc_t>& t, const Problem& pr, const Span& sp, int64_t h,
                                            int64_t g, int64_t r0, int64_t r1, int64_t j0, int64_t j1, acc_t scale) {
  const int64_t nq = r1 - r0, nk = j1 - j0, D = pr.D;
  const at::Tensor q = rows_view(t.Q, sp.b, pr.S, pr.H, h, sp.q0 + r0, nq, D, pr.options);
  const at::Tensor dout = rows_view(t.dO, sp.b, pr.S, pr.H, h, sp.q0 + r0, nq, D, pr.options);
  const at::Tensor k = rows_view(t.K, sp.b, pr.Sk, pr.G, g, sp.k0 + j0, nk, D, pr.options);
  const at::Tensor v = rows_view(t.V, sp.b, pr.Sk, pr.G, g, sp.k0 + j0, nk, D, pr.options);
  at::Tensor p = at::mm(q, k.t());      // scores, then probabilities
  at::Tensor ds = at::mm(dout, v.t());  // dP, then dS
  acc_t* P = p.data_ptr<acc_t>();
  acc_t* dS = ds.data_ptr<acc_t>();
  const float* lse = t.L + (sp.b * pr.H + h) * pr.S + sp.q0 + r0;
  const acc_t* delta = t.delta + (sp.b * pr.H + h) * pr.S + sp.q0 + r0;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < nq; ++r) {
    // A row that saw no key (lse = -inf) is zeroed below; subtracting 0 keeps its exp finite meanwhile.
    const acc_t l = static_cast<acc_t>(lse[r]) == neg_inf ? acc_t(0) : static_cast<acc_t>(lse[r]);
    acc_t* row = P + r * nk;
    // exp in the loop, not p.exp_(): ATen would fork its thread team for every tile.
    for (int64_t c = 0; c < nk; ++c) row[c] = std::exp(row[c] * scale - l);
  }
  // The exact rule: mask_visible() with its per-key and per-query terms hoisted out of the pair loop.
  const kn::AttentionMask& m = pr.mask;
  const bool pattern = kn::mask_has_pattern(m);
  const int64_t shift = sp.len_k - sp.len_q;  // query row r sits at position r + shift
  const bool full_tile = !pattern && (!m.causal || j1 - 1 <= r0 + shift);
  std::vector<char> key_any(full_tile ? 0 : nk);  // a strided global key or a sink: seen by every later query
  std::vector<int64_t> key_chunk(full_tile ? 0 : nk);
  for (int64_t c = 0; c < static_cast<int64_t>(key_any.size()); ++c) {
    const int64_t j = j0 + c;
    key_any[c] = (m.global_stride > 0 && j % m.global_stride == 0) || (m.sinks > 0 && j < m.sinks);
    key_chunk[c] = m.chunk > 0 ? kn::floor_div(j, m.chunk) : 0;
  }
  for (int64_t r = 0; r < nq; ++r) {
    acc_t* prow = P + r * nk;
    acc_t* drow = dS + r * nk;
    if (static_cast<acc_t>(lse[r]) == neg_inf) {
      std::fill(prow, prow + nk, acc_t(0));
      std::fill(drow, drow + nk, acc_t(0));
      continue;
    }
    if (!full_tile) {
      const int64_t i = r0 + r + shift;
      const int64_t row_chunk = m.chunk > 0 ? kn::floor_div(i, m.chunk) : 0;
      for (int64_t c = 0; c < nk; ++c) {
        const int64_t j = j0 + c;
        const bool visible = (!m.causal || j <= i) && (!pattern || (m.window > 0 && i - j < m.window) ||
                                                       (m.chunk > 0 && key_chunk[c] == row_chunk) || key_any[c]);
        if (!visible) prow[c] = 0;
      }
    }
    const acc_t d = delta[r];
    for (int64_t c = 0; c < nk; ++c) drow[c] = prow[c] * (drow[c] - d);
  }
  return {p, ds};
}

template <typename acc_t>
void sparse_attention_bwd_impl(const BwdTensors<acc_t>& t, const std::vector<Span>& spans, const Problem& pr,
                               double softmax_scale) {
  const int64_t S = pr.S, H = pr.H, G = pr.G, D = pr.D, group = H / G;
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const kn::AttentionMask& m = pr.mask;

  // delta[b, h, i] = sum_d dout * out: one fixed-order dot per row.
  at::parallel_for(0, pr.B * S * H, 256, [&](int64_t begin, int64_t end) {
    for (int64_t bsh = begin; bsh < end; ++bsh) {
      const int64_t h = bsh % H, bs = bsh / H, b = bs / S, i = bs % S;
      t.delta[(b * H + h) * S + i] = attention::dot(t.dO + bsh * D, t.O + bsh * D, D);
    }
  });

  // Flat task lists over the spans: (head or kv head, tile).
  std::vector<int64_t> q_tasks(spans.size() + 1, 0), k_tasks(spans.size() + 1, 0);
  for (size_t s = 0; s < spans.size(); ++s) {
    q_tasks[s + 1] = q_tasks[s] + H * ((spans[s].len_q + kTileQ - 1) / kTileQ);
    k_tasks[s + 1] = k_tasks[s] + G * ((spans[s].len_k + kTileK - 1) / kTileK);
  }

  // dk / dv: each key tile over the query tiles of every head of its group that can see it.
  at::parallel_for(0, k_tasks.back(), 1, [&](int64_t begin, int64_t end) {
    const MklSerialGuard serial_blas;
    for (int64_t task = begin; task < end; ++task) {
      const size_t s = std::upper_bound(k_tasks.begin(), k_tasks.end(), task) - k_tasks.begin() - 1;
      const Span& sp = spans[s];
      const int64_t tiles = (sp.len_k + kTileK - 1) / kTileK, local = task - k_tasks[s];
      const int64_t g = local / tiles, j0 = (local % tiles) * kTileK, j1 = std::min(sp.len_k, j0 + kTileK);
      const int64_t shift = sp.len_k - sp.len_q;
      at::Tensor dk = at::zeros({j1 - j0, D}, pr.options), dv = at::zeros({j1 - j0, D}, pr.options);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t r0 = 0; r0 < sp.len_q; r0 += kTileQ) {
          const int64_t r1 = std::min(sp.len_q, r0 + kTileQ);
          if (!kn::mask_tile_may_be_visible(m, r0 + shift, r1 + shift, j0, j1)) continue;
          const auto [p, ds] = tile_p_ds(t, pr, sp, h, g, r0, r1, j0, j1, scale);
          dv.addmm_(p.t(), rows_view(t.dO, sp.b, S, H, h, sp.q0 + r0, r1 - r0, D, pr.options));
          dk.addmm_(ds.t(), rows_view(t.Q, sp.b, S, H, h, sp.q0 + r0, r1 - r0, D, pr.options));
        }
      }
      rows_view(t.dK, sp.b, pr.Sk, G, g, sp.k0 + j0, j1 - j0, D, pr.options).copy_(dk.mul_(scale));
      rows_view(t.dV, sp.b, pr.Sk, G, g, sp.k0 + j0, j1 - j0, D, pr.options).copy_(dv);
    }
  });

  // dq: each query tile over the key tiles it can see, in key order.
  at::parallel_for(0, q_tasks.back(), 1, [&](int64_t begin, int64_t end) {
    const MklSerialGuard serial_blas;
    for (int64_t task = begin; task < end; ++task) {
      const size_t s = std::upper_bound(q_tasks.begin(), q_tasks.end(), task) - q_tasks.begin() - 1;
      const Span& sp = spans[s];
      const int64_t tiles = (sp.len_q + kTileQ - 1) / kTileQ, local = task - q_tasks[s];
      const int64_t h = local / tiles, g = h / group;
      const int64_t r0 = (local % tiles) * kTileQ, r1 = std::min(sp.len_q, r0 + kTileQ);
      const int64_t shift = sp.len_k - sp.len_q;
      at::Tensor dq = at::zeros({r1 - r0, D}, pr.options);
      for (int64_t j0 = 0; j0 < sp.len_k; j0 += kTileK) {
        const int64_t j1 = std::min(sp.len_k, j0 + kTileK);
        if (!kn::mask_tile_may_be_visible(m, r0 + shift, r1 + shift, j0, j1)) continue;
        const auto [p, ds] = tile_p_ds(t, pr, sp, h, g, r0, r1, j0, j1, scale);
        dq.addmm_(ds, rows_view(t.K, sp.b, pr.Sk, G, g, sp.k0 + j0, j1 - j0, D, pr.options));
      }
      rows_view(t.dQ, sp.b, S, H, h, sp.q0 + r0, r1 - r0, D, pr.options).copy_(dq.mul_(scale));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const std::optional<at::Tensor>& cu_seqlens_q,
                                                                    const std::optional<at::Tensor>& cu_seqlens_k,
                                                                    const AttentionSizes& sz, double softmax_scale) {
  const int64_t B = sz.batch, S = sz.seqlen_q, H = sz.heads;
  const at::ScalarType acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Zero-initialised: keys no query sees and rows with no visible key get exactly zero gradient.
  at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(acc_type));
  at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(acc_type));
  at::Tensor dv = at::zeros(v.sizes(), v.options().dtype(acc_type));
  if (B * S * H > 0 && k.numel() > 0) {
    // Accumulation-precision contiguous copies, converted once.
    const at::Tensor qf = q.to(acc_type).contiguous(), kf = k.to(acc_type).contiguous();
    const at::Tensor vf = v.to(acc_type).contiguous(), dof = dout.to(acc_type).contiguous();
    const at::Tensor of = out.to(acc_type).contiguous();
    at::Tensor delta = at::empty({B, H, S}, q.options().dtype(acc_type));
    const std::vector<attention::Span> spans = attention::make_spans(
        cu_seqlens_q.has_value() ? cu_seqlens_q->data_ptr<int32_t>() : nullptr,
        cu_seqlens_k.has_value() ? cu_seqlens_k->data_ptr<int32_t>() : nullptr, sz.num_seqs, B, S, sz.seqlen_k);
    const Problem pr{B, S, sz.seqlen_k, H, sz.kv_heads, sz.head_dim, sz.mask, q.options().dtype(acc_type)};
    AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_attention_bwd", [&] {
      const BwdTensors<scalar_t> t{qf.data_ptr<scalar_t>(),    kf.data_ptr<scalar_t>(), vf.data_ptr<scalar_t>(),
                                   dof.data_ptr<scalar_t>(),   of.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                                   delta.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                   dv.data_ptr<scalar_t>()};
      sparse_attention_bwd_impl<scalar_t>(t, spans, pr, softmax_scale);
    });
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace llama4::cpu
