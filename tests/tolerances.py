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
