"""The tolerance policy of the test suite (DESIGN.md): one rule per op family, each with its reason.
Tests take every tolerance from here; no test file hard-codes one.
Legend: T tokens, K top-k, D row width, N = T*K routed rows.
"""

from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def eps(dtype: torch.dtype) -> float:
    """Relative spacing of `dtype` at 1.0: one ulp of a value v is at most eps * |v| (normal range)."""
    return torch.finfo(dtype).eps


def smallest_subnormal(dtype: torch.dtype) -> float:
    """One ulp of `dtype` in its subnormal range, where eps * |v| no longer bounds an ulp."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


# --------------------------------------------------------------------------------------------
# Router (moe_route): ids, counts, offsets and orders exact; weights within float32 rounding.
# --------------------------------------------------------------------------------------------
# Reason: the kernel computes sigmoid/softmax (exp, a sum, a division) and the renormalisation in
# float32, the reference in float64; each fp32 step loses a few ulp, 16 ulp catches any wrong
# formula or a shortcut through bf16. atol only forgives weights below the float32 normal range
# (sigmoid(-100) ~ 4e-44 is 0 when exp(100) overflows float32).
ROUTER_WEIGHTS_TOL = dict(rtol=16 * FP32_EPS, atol=1e-30)


# --------------------------------------------------------------------------------------------
# Dispatch (moe_permute).
# --------------------------------------------------------------------------------------------
def permute_tol(dtype: torch.dtype) -> dict:
    """Weighted permute, as assert_close kwargs (unweighted permute is a pure copy: exact).

    Reason: the kernel rounds the float32 product float(x) * w, then rounds that to `dtype`; the
    reference rounds the exact product (a float64 product of two float32 values is exact) once.
    The double rounding differs by at most one ulp of `dtype`, and not at all for float32.
    """
    if dtype == torch.float32:
        return dict(rtol=0.0, atol=0.0)
    return dict(rtol=eps(dtype), atol=smallest_subnormal(dtype))


# --------------------------------------------------------------------------------------------
# Combine (moe_unpermute).
# --------------------------------------------------------------------------------------------
def unpermute_tol(dtype: torch.dtype, top_k: int) -> dict:
    """Per-element bound |out - ref| <= rtol * |ref| + term_rtol * sum_k |w_k y_k| + atol.

    Reason: the kernel forms K float32 products and K - 1 float32 additions (each off by at most
    half an fp32 ulp of |product| or of the running sum <= sum_k |w_k y_k|), then rounds once to
    `dtype` (one ulp: rtol); the reference sums in float64 and rounds once. The bound is relative
    to the sum of |terms|, not to |result|, because signed terms cancel.
    """
    return dict(rtol=eps(dtype), term_rtol=top_k * FP32_EPS, atol=smallest_subnormal(dtype))


def assert_unpermute_close(out_TD: torch.Tensor, ref_TD: torch.Tensor, abs_sum_TD: torch.Tensor, top_k: int) -> None:
    """Checks `unpermute_tol` element-wise; abs_sum_TD = sum_k |w_k| |y_k| (float64, from the reference)."""
    assert out_TD.dtype == ref_TD.dtype, (out_TD.dtype, ref_TD.dtype)
    assert out_TD.shape == ref_TD.shape, (out_TD.shape, ref_TD.shape)
    tol = unpermute_tol(out_TD.dtype, top_k)
    out, ref, abs_sum = out_TD.double().cpu(), ref_TD.double().cpu(), abs_sum_TD.double().cpu()
    bound = tol["rtol"] * ref.abs() + tol["term_rtol"] * abs_sum + tol["atol"]
    err = (out - ref).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"unpermute: {int(bad.sum())} of {bad.numel()} elements out of tolerance; first at {idx}: "
            f"got {out[tuple(idx)].item()!r}, expected {ref[tuple(idx)].item()!r}, "
            f"allowed {bound[tuple(idx)].item():.3e}, max err/bound {(err / bound).max().item():.3f}"
        )


# --------------------------------------------------------------------------------------------
# Gradients of the routing ops (float32 maths vs autograd through a float64 reference).
# --------------------------------------------------------------------------------------------
# Reason: the backward formulas are a few float32 operations and sums of <= 1024 terms on O(1)
# values, so 1e-5 relative; the absolute part is 1e-5 of the gradient's largest entry, because
# (g - sum g*w) and dot products cancel and leave small entries with no relative accuracy.
# A gradient returned in float16/bfloat16 adds one rounding to that dtype.
GRAD_RTOL_FP32 = 1e-5
# Reason: a gradient formed as (g - sum g*w) in float32 carries one fp32 rounding of the upstream
# gradient g however small the result (analytically zero for top-1 with renormalisation, where the
# float64 reference itself leaves ~1e-16 * |g|), so the floor is a few fp32 ulps of max |g|.
GRAD_UPSTREAM_ULPS = 4


def grad_tol(expected: torch.Tensor, dtype: torch.dtype = torch.float32, upstream_max: float = 0.0) -> dict:
    """assert_close kwargs for a gradient in `dtype` against a float64 reference gradient.

    upstream_max: max |upstream gradient| where the backward subtracts O(|g|) terms.
    """
    rtol = max(GRAD_RTOL_FP32, eps(dtype))
    scale = expected.abs().max().item() if expected.numel() else 0.0
    floor = GRAD_UPSTREAM_ULPS * FP32_EPS * upstream_max
    return dict(rtol=rtol, atol=rtol * scale + floor + smallest_subnormal(dtype))


def assert_grad_close(actual: torch.Tensor, expected64: torch.Tensor, upstream_max: float = 0.0) -> None:
    assert actual is not None, "no gradient"
    assert actual.shape == expected64.shape, (actual.shape, expected64.shape)
    tol = grad_tol(expected64, actual.dtype, upstream_max)
    torch.testing.assert_close(actual.double().cpu(), expected64.cpu(), **tol)


# --------------------------------------------------------------------------------------------
# FP8 grouped GEMM (DeepGEMM's metric).
# --------------------------------------------------------------------------------------------
# Reason: FP8 inputs make element-wise tolerances meaningless; calc_diff is 1 - cosine-like
# similarity of the whole output vs float64 on the dequantised inputs. With small-integer inputs
# the accumulation is exact and tests compare with equality instead.
FP8_GEMM_MAX_DIFF = 1e-3


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 * sum(x*y) / sum(x*x + y*y), in float64 (0 when x == y; DeepGEMM's metric)."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return (1.0 - 2.0 * (x * y).sum() / denominator).item()


# --------------------------------------------------------------------------------------------
# Attention (FlashAttention's rule).
# --------------------------------------------------------------------------------------------
# Reason: a low-precision attention cannot beat the rounding of its own dtype; we allow at most
# `factor` times the error that a plain same-dtype torch implementation makes against the float64
# reference, plus a noise floor: the rounding error of the reference's own values in that dtype.
ATTENTION_ERROR_FACTOR = 2.0


def attention_tolerance(out_torch_lowp: torch.Tensor, out_ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest allowed max|out - out_ref64| for a kernel output in `dtype`.

    out_torch_lowp: the same attention computed by plain torch in `dtype`; out_ref64: float64.
    """
    ref = out_ref64.double()
    torch_error = (out_torch_lowp.double() - ref).abs().max().item()
    # FlashAttention's floor: how far values of this size move when they pass through `dtype`.
    ref_lowp = ref.to(dtype)
    noise_floor = 2 * ((ref_lowp + 0.3 - 0.3) - ref_lowp).abs().max().item()
    return ATTENTION_ERROR_FACTOR * torch_error + noise_floor


def assert_attention_close(
    out: torch.Tensor, out_torch_lowp: torch.Tensor, out_ref64: torch.Tensor, dtype: torch.dtype
) -> None:
    error = (out.double() - out_ref64.double()).abs().max().item()
    allowed = attention_tolerance(out_torch_lowp, out_ref64, dtype)
    assert error <= allowed, f"attention error {error:.3e} > allowed {allowed:.3e}"


# Float32 inputs (CPU only). Reason: FlashAttention's rule is made for half dtypes, where the plain torch
# attention rounds its scores and probabilities to the dtype. In float32 the plain implementation is as
# exact as a kernel's own float32 accumulation, and the ratio of the two errors depends only on the order
# of the sums (a sequential D-term dot product vs a blocked BLAS one: measured 2.01x at D = 256), not on a
# defect. So float32 adds a floor of 1e-5 (~80 float32 ulps of an O(1) output); any shortcut through a
# half dtype costs >= 1e-3 and still fails.
ATTENTION_FP32_FLOOR = 1e-5


def sparse_attention_tolerance(out_torch_lowp: torch.Tensor, out_ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """attention_tolerance, plus ATTENTION_FP32_FLOOR for float32 inputs."""
    floor = ATTENTION_FP32_FLOOR if dtype == torch.float32 else 0.0
    return attention_tolerance(out_torch_lowp, out_ref64, dtype) + floor


def assert_sparse_attention_close(
    out: torch.Tensor, out_torch_lowp: torch.Tensor, out_ref64: torch.Tensor, dtype: torch.dtype
) -> None:
    error = (out.double() - out_ref64.double()).abs().max().item()
    allowed = sparse_attention_tolerance(out_torch_lowp, out_ref64, dtype)
    assert error <= allowed, f"attention error {error:.3e} > allowed {allowed:.3e}"


# Attention gradients (dq, dk, dv of sparse_attention's backward), each against float64 autograd of the dense
# reference: the same rule, with plain torch autograd of the same dtype's dense attention as the yardstick, plus
# ATTENTION_FP32_FLOOR relative to the gradient's largest entry (at least 1), for every dtype. Reasons: unlike the
# forward's output (a convex combination of values, |out| <= max|v|), a gradient sums up to S (query, key) terms
# (dk / dv of a key every query sees), so its magnitude, and its float32 rounding, grow with that count; and a
# gradient that is analytically 0 (dS = p (dP - delta) of a row that sees one key, where delta = dP exactly) is
# the difference of two float32 sums taken in different orders (a GEMM and a row dot, on CPU and GPU alike),
# which the same-dtype yardstick and the rounding floor (both 0 there) do not cover. For half dtypes the floor is
# ~1/400 of a bf16 ulp at 1: any shortcut through a half dtype still costs >= 1e-3 relative and fails.
def sparse_attention_grad_tolerance(
    grad_torch_lowp: torch.Tensor, grad_ref64: torch.Tensor, dtype: torch.dtype
) -> float:
    """Largest allowed max|grad - grad_ref64| for a gradient of an attention with inputs in `dtype`."""
    if grad_ref64.numel() == 0:
        return 0.0
    floor = ATTENTION_FP32_FLOOR * max(1.0, grad_ref64.double().abs().max().item())
    return attention_tolerance(grad_torch_lowp, grad_ref64, dtype) + floor


def assert_sparse_attention_grad_close(
    name: str, grad: torch.Tensor, grad_torch_lowp: torch.Tensor, grad_ref64: torch.Tensor, dtype: torch.dtype
) -> None:
    assert grad is not None, f"{name}: no gradient"
    assert grad.shape == grad_ref64.shape, (name, grad.shape, grad_ref64.shape)
    assert not grad.isnan().any(), f"{name} has NaN"
    if grad.numel() == 0:
        return
    error = (grad.double().cpu() - grad_ref64.double().cpu()).abs().max().item()
    allowed = sparse_attention_grad_tolerance(grad_torch_lowp.cpu(), grad_ref64.cpu(), dtype)
    assert error <= allowed, f"{name}: attention gradient error {error:.3e} > allowed {allowed:.3e}"


# The log-sum-exp (lse, float32) of float32 inputs, against float64. Reason: the kernel forms each score
# as a float32 dot product of D terms and sums the exponentials in float32/float64, so lse = max + log(sum)
# carries a few float32 ulps of the scores: 1e-5 relative; the absolute part covers an lse near 0, where
# the absolute float32 error of a score (~sqrt(D) ulps of sum_d |q_d k_d| * scale) is what remains.
# Half-precision inputs: the attention rule above, applied to the lse.
ATTENTION_LSE_TOL_FP32 = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# FP8 quantisation (quantize_fp8, dequantize_fp8) and SwiGLU (swiglu, swiglu_quant).
# --------------------------------------------------------------------------------------------
# quantize_fp8 and dequantize_fp8 are bit-exact against the reference (the same float32 division,
# saturation and round-to-nearest-even cast): no tolerance.
#
# swiglu: gate / (1 + exp(-gate)) * up in float32. Reason: the kernel's exp (expf, CUDA's expf) and
# torch's vectorised exp may differ by one ulp; with the addition, the division and the product that
# is a few float32 ulps, and 1e-6 (~8 ulps) catches any other formula. A result in float16/bfloat16
# is then rounded once more: the two float32 values may straddle a rounding boundary (one ulp of dtype).
SWIGLU_RTOL_FP32 = 1e-6


def swiglu_tol(dtype: torch.dtype) -> dict:
    """assert_close kwargs for swiglu's output in `dtype` against reference.swiglu rounded to `dtype`."""
    return dict(rtol=max(SWIGLU_RTOL_FP32, eps(dtype)), atol=smallest_subnormal(dtype))


# swiglu_quant against quantize_fp8(reference.swiglu(h)): the same maths except that exp rounding.
# Reason: a one-ulp difference in a float32 value (or in the group's amax, hence its scale) moves an
# fp8 code only when the value sits within ulps of a rounding midpoint between two codes, a chance of
# ~2^-19 per element; so codes may differ by one step, in at most this fraction of elements (a wrong
# formula, a bf16 intermediate or a wrong scale moves many percent of the codes).
SWIGLU_QUANT_MAX_CODE_STEPS = 1
SWIGLU_QUANT_MAX_MISMATCH_FRACTION = 1e-3
# Scales come from the amax of such values: a few float32 ulps apart at most.
SWIGLU_QUANT_SCALE_RTOL = 4 * FP32_EPS


def fp8_rounding_bound(ref: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Largest |dequantised - ref| of one fp8 rounding, element-wise: one fp8 ulp relative to |ref| in
    the normal range (eps: 2^-3 for e4m3, 2^-2 for e5m2; round to nearest needs half of it) plus one
    subnormal step of the element's scale (where eps * |v| no longer bounds an ulp).
    scale: the scale of each element (broadcastable to ref)."""
    return eps(fp8_dtype) * ref.abs() + smallest_subnormal(fp8_dtype) * scale


# Per-row vs block128 on rows with a few huge outliers (1e5 x the rest, "massive activations"): with
# a per-row scale the ordinary values of the row fall into e4m3's subnormals; block128 confines that
# to the outlier's own block. Measured on the test's data the block128 mean relative error is ~0.3x the
# per-row one; we require it to be below half.
BLOCK128_VS_ROW_MAX_ERROR_RATIO = 0.5


# --------------------------------------------------------------------------------------------
# Chunked cross-entropy (engine.ops.chunked_cross_entropy).
# --------------------------------------------------------------------------------------------
# Reason: the same rule as attention (a factor over the error of plain torch in the same dtype, against
# float64): the loss and its gradients are dot products over D and a log-sum-exp over V, whose float32
# rounding depends on the order of the sums (blocked BLAS vs chunked); a chunking bug (a wrong row, a
# missed chunk, a lost lse) is off by O(1). Half-precision inputs: plain torch rounds the logits to the
# dtype, we keep them in float32, so we must be at least as close. The floor is 64 float32 ulps of the
# largest reference value (a sum of V terms loses up to log2(V) ulps in pairwise summation).
LOSS_ERROR_FACTOR = 2.0
LOSS_FLOOR_ULPS = 64


def assert_loss_close(actual: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor) -> None:
    """max|actual - ref64| <= LOSS_ERROR_FACTOR * max|torch_same_dtype - ref64| + floor."""
    assert actual is not None, "no value / gradient"
    assert actual.shape == ref64.shape, (actual.shape, ref64.shape)
    ref = ref64.double().cpu()
    error = (actual.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    torch_error = (torch_same_dtype.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    floor = LOSS_FLOOR_ULPS * FP32_EPS * (ref.abs().max().item() if ref.numel() else 0.0)
    allowed = LOSS_ERROR_FACTOR * torch_error + floor
    assert error <= allowed, f"error {error:.3e} > allowed {allowed:.3e} (plain torch: {torch_error:.3e})"


# --------------------------------------------------------------------------------------------
# The MoE layer in low precision (engine.moe.MoE, precision "bf16" / "fp8"), against the float64 MoE.
# --------------------------------------------------------------------------------------------
# Reason: here the error is the rounding of the operands themselves, not of the GEMMs (those have their
# own rule above), so DeepGEMM's calc_diff, taken against the *unquantised* float64 layer, for the output,
# x's gradient and every parameter's gradient. One rounding to a format with m mantissa bits has a
# relative error uniform in +-2^-(m+1) within a binade; its mean square over the binade is about
# 2^-2(m+1) / 6, and a GEMM rounds two operands: calc_diff ~ 0.5 * 2 * 2^-2(m+1) / 6 per GEMM. e4m3 (m=3):
# ~3e-4 per GEMM; the forward chains 2 GEMMs of the routed experts (and the shared expert's 2), a weight
# gradient sees up to 4 quantised GEMMs upstream: measured 2.0e-3 (e4m3 everywhere) and 3.8e-3 (e5m2
# gradients, m=2: 4x the variance of the gradient roundings) on the tests' shapes. Bounds: 2.5x those.
# A wrong scale, transpose, expert or group boundary costs >= 1e-1.
# The router's weight gradient is a sum over rows of <upstream gradient, x> dot products (x scaled by
# the routing weight), each a sum of D signed terms: a single row's dot product may cancel to nearly 0,
# and then its FP8 error is relative to the terms, not to the result (measured calc_diff 0.2 at T = 1).
# Averaged over >= 32 rows the measured worst case over 12 seeds is 2.6e-3 (e4m3), 6.3e-3 (e5m2 grads).
FP8_LAYER_ROUTER_MIN_ROWS = 32
FP8_LAYER_MAX_DIFF_E4M3 = 5e-3
FP8_LAYER_MAX_DIFF_E5M2_GRADS = 1e-2
# BF16 (m=7): 256x less per rounding than e4m3, and the layer keeps float32 accumulators; measured
# ~1e-5 on the tests' shapes, bound 1e-4.
BF16_LAYER_MAX_DIFF = 1e-4


def fp8_layer_max_diff(grad_dtype: torch.dtype) -> float:
    """calc_diff bound of the FP8 MoE layer vs float64, by the dtype its gradients are quantised to."""
    return FP8_LAYER_MAX_DIFF_E5M2_GRADS if grad_dtype == torch.float8_e5m2 else FP8_LAYER_MAX_DIFF_E4M3


# --------------------------------------------------------------------------------------------
# Grouped weight gradient (grouped_gemm_wgrad) with BF16 / float32 inputs. FP8 inputs: calc_diff above.
# --------------------------------------------------------------------------------------------
# Reason: each dw[e, n, k] is a float32 sum over the expert's R rows of products that are exact (bf16 x bf16) or
# rounded once (float32 x float32, CPU), in an order the kernel picks (blocked BLAS, tensor-core k-slices). Any
# order's error is at most R * u * sum |terms| with u = eps / 2, so R * FP32_EPS * sum |terms| holds for every order
# with 2x to spare (tensor cores need not round to nearest inside an MMA); it is relative to sum |terms|, not to
# |result|, because signed terms cancel. A bfloat16 result rounds once more: eps(bf16) * |ref|.
def assert_wgrad_close(dw_ENK: torch.Tensor, ref_ENK: torch.Tensor, abs_sum_ENK: torch.Tensor, rows: int) -> None:
    """Element-wise |dw - ref| <= rows * FP32_EPS * abs_sum + eps(dw.dtype) * |ref| (bf16 only) + a subnormal;
    ref_ENK / abs_sum_ENK = sum_m dy x / sum_m |dy x| in float64; rows = the largest group size."""
    assert dw_ENK.shape == ref_ENK.shape, (dw_ENK.shape, ref_ENK.shape)
    out, ref, abs_sum = dw_ENK.double().cpu(), ref_ENK.double().cpu(), abs_sum_ENK.double().cpu()
    rounding = eps(dw_ENK.dtype) if dw_ENK.dtype != torch.float32 else 0.0
    bound = max(rows, 1) * FP32_EPS * abs_sum + rounding * ref.abs() + smallest_subnormal(dw_ENK.dtype)
    err = (out - ref).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"grouped_gemm_wgrad: {int(bad.sum())} of {bad.numel()} elements out of tolerance; first at {idx}: "
            f"got {out[tuple(idx)].item()!r}, expected {ref[tuple(idx)].item()!r}, "
            f"allowed {bound[tuple(idx)].item():.3e}"
        )


# --------------------------------------------------------------------------------------------
# The whole model (engine.model) against transformers and against itself.
# --------------------------------------------------------------------------------------------
# Float32 against transformers' float32 Llama4ForCausalLM (issue #8's bound), logits and parameter gradients,
# relative to the largest |value|: the two run the same maths in another order (blocked attention vs an eager
# softmax, grouped expert GEMMs vs bmm), which moves them by float32 rounding (measured ~5e-7); a wrong mask,
# RoPE pairing, scale or routing moves them by > 1e-2.
MODEL_PARITY_RTOL = 1e-4
# Float32 model against itself in another grouping (whole sequence vs token-by-token decode through the KV
# cache, checkpointed vs stored activations): float32 rounding only (measured ~1e-6 of the largest logit).
MODEL_SELF_RTOL = 1e-5
# A bfloat16 model on CUDA against the float32 reference: at most this many times the error of transformers'
# own bfloat16 model on the same GPU (FlashAttention's rule, applied to logits), plus one bf16 ulp of max |logit|.
MODEL_BF16_ERROR_FACTOR = 2.0


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (float64; NaN fails)."""
    a, e = actual.double().cpu(), expected.double().cpu()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
    assert err <= rtol, f"{what}: max relative error {err:.2e} > {rtol:.1e}"


# --------------------------------------------------------------------------------------------
# Greedy generation in bf16 (CUDA): cached decode vs a full forward.
# --------------------------------------------------------------------------------------------
# Reason: in bf16 a decode step (one query against the KV cache) and a full forward (every query at once)
# sum in different orders and round the hidden states differently, so two logits closer than that rounding
# may swap. A token is accepted when its full-forward logit is below the row's maximum by at most 4 bf16
# ulps of the row's largest |logit| (the residual stream of a few layers carries a few roundings); a wrong
# token (a cache bug, a wrong position) misses by O(1).
GREEDY_TIE_BF16_ULPS = 4


def greedy_tie_tol(logits_BNV: torch.Tensor) -> torch.Tensor:
    """Per row: how far below the maximum logit a greedily chosen token may be (bf16 rounding)."""
    return GREEDY_TIE_BF16_ULPS * eps(torch.bfloat16) * logits_BNV.abs().amax(-1)


# --------------------------------------------------------------------------------------------
# RMSNorm and RoPE + QK-norm + query scale (engine.ops.rms_norm, engine.ops.rope_qk_norm).
# --------------------------------------------------------------------------------------------
# Against the reference in the SAME dtype (the same chain of float32 stages, each rounded to the dtype): the CPU
# op runs the same torch maths and must be bit-exact. A kernel's float32 stage may differ from torch's by a few
# float32 ulps (the mean of squares summed in another order, an FMA in the rotation), which moves a value rounded
# to the dtype by one ulp where it sits at a rounding boundary; each later rounded stage can carry that one ulp
# on: rtol = (rounded stages) * eps(dtype). The absolute part is float32 noise of the largest value (a rotation
# that cancels to ~0 keeps the float32 error of its terms, not one relative to itself). Float32 inputs:
# NORM_RTOL_FP32 (~80 ulps) covers a D-term sum of squares in another order; a bf16 shortcut costs >= 4e-3.
NORM_RTOL_FP32 = 1e-5
NORM_ATOL_FP32_ULPS = 16


def norm_same_dtype_tol(dtype: torch.dtype, rounded_stages: int, ref: torch.Tensor) -> dict:
    """assert_close kwargs for a norm / RoPE kernel output in `dtype` against the reference in `dtype`."""
    rtol = NORM_RTOL_FP32 if dtype == torch.float32 else max(1, rounded_stages) * eps(dtype)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return dict(rtol=rtol, atol=NORM_ATOL_FP32_ULPS * FP32_EPS * scale + smallest_subnormal(dtype))


# Against float64 (values and gradients): the attention / loss rule. At most NORM_ERROR_FACTOR times the error of
# plain torch in the same dtype (the reference's maths, autograd for the gradients) plus a floor of
# NORM_FLOOR_ULPS float32 ulps of the largest value. Reason: the forward rounds exactly where plain torch does,
# so its error is torch's; the backward is float32 maths rounded once, where torch's autograd rounds the
# gradient at every stage, so it is at least as close. A wrong pairing, sign, missing Jacobian term or scale
# is off by O(1) and fails.
NORM_ERROR_FACTOR = 2.0
NORM_FLOOR_ULPS = 64


def assert_norm_close(
    actual: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor, what: str = ""
) -> None:
    """max|actual - ref64| <= NORM_ERROR_FACTOR * max|torch_same_dtype - ref64| + floor (NaN fails)."""
    assert actual is not None, f"{what}: no value / gradient"
    assert actual.shape == ref64.shape, (what, actual.shape, ref64.shape)
    ref = ref64.double().cpu()
    if ref.numel() == 0:
        return
    error = (actual.double().cpu() - ref).abs().max().item()
    torch_error = (torch_same_dtype.double().cpu() - ref).abs().max().item()
    allowed = NORM_ERROR_FACTOR * torch_error + NORM_FLOOR_ULPS * FP32_EPS * ref.abs().max().item()
    assert error <= allowed, f"{what}: error {error:.3e} > allowed {allowed:.3e} (plain torch: {torch_error:.3e})"
