"""engine.ops.quantize_fp8 / dequantize_fp8 / swiglu_quant / swiglu against engine.ops.reference: bit-exact
quantisation (every granularity, both fp8 dtypes, every input dtype), zeros, saturation, subnormals, NaN,
block128 vs per-row accuracy, SwiGLU values and gradients, bad input, opcheck and torch.compile.
Legend: M rows, K columns, G = ceil(K / 128) column blocks, F SwiGLU width (h is [M, 2F]: gate | up).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import (
    BLOCK128_VS_ROW_MAX_ERROR_RATIO,
    SWIGLU_QUANT_MAX_CODE_STEPS,
    SWIGLU_QUANT_MAX_MISMATCH_FRACTION,
    SWIGLU_QUANT_SCALE_RTOL,
    assert_grad_close,
    fp8_rounding_bound,
    swiglu_tol,
)

from bench.shapes import FP8_QUANT_TEST, QuantShape
from engine import ops
from engine.ops import reference

GRANULARITIES = reference.FP8_GRANULARITIES
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AMAX_FLOOR = reference.FP8_AMAX_FLOOR
BLOCK = reference.FP8_BLOCK
ERRORS = (RuntimeError, ValueError, TypeError)
# Rows of random data span this many e-folds of magnitude (lognormal row scales), so scales differ.
ROW_LOG_SPREAD = 2.0


def shape_id(shape: QuantShape) -> str:
    return shape.id


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fp8_max(fp8_dtype: torch.dtype) -> float:
    return torch.finfo(fp8_dtype).max


def random_x(gen: torch.Generator, M: int, K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """randn rows with lognormal row magnitudes, drawn in float32 and cast."""
    x = torch.randn(M, K, generator=gen) * torch.exp(ROW_LOG_SPREAD * torch.randn(M, 1, generator=gen))
    return x.to(dtype).to(device)


def codes(x_fp8: torch.Tensor) -> torch.Tensor:
    return x_fp8.cpu().view(torch.uint8)


def expanded_scale(scale: torch.Tensor, granularity: str, M: int, K: int) -> torch.Tensor:
    return reference.fp8_expand_scale(scale.cpu(), granularity, M, K)


def quantize_both(x_MK: torch.Tensor, granularity: str, fp8_dtype: torch.dtype):
    """(kernel (x_fp8, scale), reference (x_fp8, scale) computed on a CPU copy)."""
    out = ops.quantize_fp8(x_MK, granularity=granularity, fp8_dtype=fp8_dtype)
    ref = reference.quantize_fp8(x_MK.cpu(), granularity, fp8_dtype)
    return out, ref


def assert_quant_equal(out, ref, device: torch.device, equal_nan: bool = False) -> None:
    """Same dtypes, shapes and device; codes and scales bit for bit (NaN codes and scales compared as NaN
    when equal_nan: a NaN's payload and sign are not specified)."""
    (q, s), (q_ref, s_ref) = out, ref
    assert q.device.type == device.type and s.device.type == device.type
    assert q.dtype == q_ref.dtype, (q.dtype, q_ref.dtype)
    assert s.dtype == torch.float32, s.dtype
    assert q.shape == q_ref.shape, (q.shape, q_ref.shape)
    assert s.shape == s_ref.shape, (s.shape, s_ref.shape)
    if equal_nan:
        torch.testing.assert_close(q.cpu().float(), q_ref.float(), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)
        return
    got, want = codes(q), codes(q_ref)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{len(bad)} of {got.numel()} codes differ; first at {i}: got {got[i].item():#04x}, "
            f"expected {want[i].item():#04x}"
        )
    assert torch.equal(s.cpu(), s_ref), f"scales differ: max |diff| {(s.cpu() - s_ref).abs().max().item()}"


# --------------------------------------------------------------------------------------------
# quantize_fp8: bit-exact against the reference.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", FP8_QUANT_TEST, ids=shape_id)
def test_quantize_matches_reference(shape, granularity, fp8_dtype, in_dtype, device, gen):
    M, K = shape.rows, shape.cols
    x_MK = random_x(gen, M, K, in_dtype, device)
    x_before = x_MK.clone()
    out, ref = quantize_both(x_MK, granularity, fp8_dtype)
    assert_quant_equal(out, ref, device)
    assert torch.equal(x_MK, x_before), "quantize_fp8 modified its input"


def test_quantize_default_arguments(device, gen):
    """granularity="row", fp8_dtype=float8_e4m3fn by default."""
    x_MK = random_x(gen, 9, 200, torch.bfloat16, device)
    q, s = ops.quantize_fp8(x_MK)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (9,)
    assert_quant_equal((q, s), reference.quantize_fp8(x_MK.cpu(), "row", torch.float8_e4m3fn), device)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantize_no_rows(granularity, fp8_dtype, device):
    """M = 0: empty codes; row / block128 scales are empty, the tensor scale is floor / fp8_max."""
    K = 300
    x_MK = torch.empty(0, K, device=device)
    (q, s), ref = quantize_both(x_MK, granularity, fp8_dtype)
    assert q.shape == (0, K)
    expected_scale_shape = {"tensor": (), "row": (0,), "block128": (0, -(-K // BLOCK))}[granularity]
    assert s.shape == expected_scale_shape
    if granularity == "tensor":
        floor_scale = torch.tensor(AMAX_FLOOR, dtype=torch.float32) / fp8_max(fp8_dtype)
        assert torch.equal(s.cpu(), floor_scale)
    assert_quant_equal((q, s), ref, device)


@pytest.mark.parametrize("layout", ["row_strided", "broadcast_rows"])
@pytest.mark.parametrize("in_dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantize_row_stride(granularity, in_dtype, layout, device, gen):
    """Only the column stride must be 1: a column slice of a wider tensor (row stride K + 7, base offset by
    3 elements, so not 16-byte aligned) or one row expanded (row stride 0) quantise like their copies."""
    M, K = 37, 300
    if layout == "row_strided":
        x_MK = random_x(gen, M, K + 7, in_dtype, device)[:, 3 : 3 + K]
    else:
        x_MK = random_x(gen, 1, K, in_dtype, device).expand(M, K)
    assert not x_MK.is_contiguous()
    for fp8_dtype in FP8_DTYPES:
        out, ref = quantize_both(x_MK, granularity, fp8_dtype)
        assert_quant_equal(out, ref, device)
        contiguous = ops.quantize_fp8(x_MK.contiguous(), granularity=granularity, fp8_dtype=fp8_dtype)
        assert_quant_equal(out, contiguous, device)


# --------------------------------------------------------------------------------------------
# Numerics: zeros, saturation, tiny values, NaN.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_rows_and_blocks_dequantise_to_zero(granularity, fp8_dtype, in_dtype, device, gen):
    """An all-zero row or 1x128 block (the last block of K = 300 is 44 wide) has scale floor / fp8_max
    and dequantises to exactly 0, never NaN; an all-zero tensor likewise."""
    M, K = 8, 300
    x_MK = random_x(gen, M, K, torch.float32, device)
    x_MK[1] = 0.0
    x_MK[5] = -0.0
    x_MK[3, BLOCK : 2 * BLOCK] = 0.0  # a full middle block
    x_MK[6, 2 * BLOCK :] = 0.0  # the partial last block
    if granularity == "tensor":
        x_MK.zero_()
    x_MK = x_MK.to(in_dtype)
    (q, s), ref = quantize_both(x_MK, granularity, fp8_dtype)
    assert_quant_equal((q, s), ref, device)

    deq = ops.dequantize_fp8(q, s, granularity=granularity, out_dtype=torch.float32).cpu()
    zeros = x_MK.cpu() == 0
    assert not deq.isnan().any() and not deq.isinf().any()
    assert torch.equal(deq[zeros], torch.zeros(int(zeros.sum()))), "an all-zero group did not dequantise to 0"
    floor_scale = torch.tensor(AMAX_FLOOR, dtype=torch.float32) / fp8_max(fp8_dtype)
    s = s.cpu()
    if granularity == "tensor":
        assert torch.equal(s, floor_scale)
    elif granularity == "row":
        assert torch.equal(s[[1, 5]], floor_scale.expand(2))
    else:
        assert torch.equal(s[[1, 5]], floor_scale.expand(2, 3))
        assert s[3, 1] == floor_scale and s[6, 2] == floor_scale


@pytest.mark.parametrize("in_dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_huge_values_saturate(granularity, fp8_dtype, in_dtype, device, gen):
    """A value far beyond the fp8 range (1e6, -1e6, the input dtype's max) gets the max code with its
    sign, never NaN or inf; the rest of its group keeps finite codes."""
    M, K = 6, 300
    x_MK = random_x(gen, M, K, torch.float32, device)
    big = min(1e6, torch.finfo(in_dtype).max)
    x_MK[0, 17] = big
    x_MK[1, 200] = -big
    x_MK[2, 5] = torch.finfo(in_dtype).max
    x_MK[3, 299] = -torch.finfo(in_dtype).max
    x_MK = x_MK.to(in_dtype)
    (q, s), ref = quantize_both(x_MK, granularity, fp8_dtype)
    assert_quant_equal((q, s), ref, device)

    max_code = codes(torch.tensor([fp8_max(fp8_dtype)]).to(fp8_dtype)).item()
    got = codes(q)
    assert got[2, 5] == max_code and got[3, 299] == max_code | 0x80
    if granularity != "tensor":  # with one scale for all, +-big is far below the dtype max's code
        assert got[0, 17] == max_code and got[1, 200] == max_code | 0x80
    assert torch.isfinite(q.cpu().float()).all(), "a code is NaN or inf"


def tiny_rows(in_dtype: torch.dtype, fp8_dtype: torch.dtype, gen: torch.Generator, K: int) -> torch.Tensor:
    """Rows of tiny magnitudes, float32 [7, K] cast to in_dtype (float16 flushes some to 0 or subnormals):
    amax below the floor (codes 0), amax below the floor with codes > 0 (1e-13 * 448 / 1e-12 ~ 45), just
    above the floor, float32 subnormals, the input dtype's own subnormals, and a row whose amax is large
    while the rest of it falls into the fp8 subnormals."""
    info, fp8 = torch.finfo(in_dtype), torch.finfo(fp8_dtype)
    r = torch.randn(7, K, generator=gen)
    rows = [
        1e-30 * r[0],
        1e-13 * r[1],
        1e-10 * r[2],
        1e-40 * r[3],  # float32 subnormals
        info.tiny * info.eps * torch.randint(-40, 41, (K,), generator=gen).float(),  # in_dtype subnormals
        # fp8 subnormals once the row's amax (448) sets its scale: below fp8's smallest normal times that scale
        0.5 * 448.0 / fp8.max * fp8.tiny * r[5],
        1e-20 * r[6],
    ]
    x = torch.stack(rows)
    x[5, 3] = 448.0
    return x.to(in_dtype)


@pytest.mark.parametrize("in_dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_tiny_and_subnormal_inputs(granularity, fp8_dtype, in_dtype, device, gen):
    K = 260
    x_MK = tiny_rows(in_dtype, fp8_dtype, gen, K).to(device)
    (q, s), ref = quantize_both(x_MK, granularity, fp8_dtype)
    assert_quant_equal((q, s), ref, device)
    if granularity != "row":
        return
    floor_scale = torch.tensor(AMAX_FLOOR, dtype=torch.float32) / fp8_max(fp8_dtype)
    s = s.cpu()
    assert s[0] == floor_scale and s[1] == floor_scale, "amax below the floor must use the floor"
    got = codes(q)
    if in_dtype != torch.float16:  # 1e-13 is 0 in float16
        assert (got[1] & 0x7F).any(), "the floor's scale must keep values of 1e-13 (codes ~45)"
    # Row 5 (scale 448 / fp8_max) reaches fp8 subnormal codes: exponent bits 0, mantissa bits not.
    mantissa_bits = 3 if fp8_dtype == torch.float8_e4m3fn else 2
    exponent_mask = 0x7F & ~((1 << mantissa_bits) - 1)
    row5 = got[5]
    assert ((row5 & exponent_mask == 0) & (row5 & 0x7F != 0)).any(), "no fp8 subnormal codes in row 5"


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nan_and_inf_inputs(granularity, fp8_dtype, device, gen):
    """A NaN makes its group's scale NaN and every code of the group NaN (the documented behaviour, the
    reference's); an inf makes the scale inf (finite values quantise to 0, the inf itself to NaN).
    Other groups are untouched."""
    M, K = 6, 300
    x_MK = random_x(gen, M, K, torch.float32, device)
    x_MK[1, 7] = float("nan")
    x_MK[3, 2 * BLOCK + 10] = float("nan")  # the partial last block of row 3
    x_MK[4, 130] = float("inf")
    out, ref = quantize_both(x_MK, granularity, fp8_dtype)
    assert_quant_equal(out, ref, device, equal_nan=True)

    q, s = out[0].cpu().float(), out[1].cpu()
    if granularity == "row":
        assert s[1].isnan() and s[3].isnan() and s[4].isinf()
        assert q[1].isnan().all() and q[3].isnan().all()
        assert not s[[0, 2, 5]].isnan().any() and not q[[0, 2, 5]].isnan().any()
    elif granularity == "block128":
        assert s[1, 0].isnan() and s[3, 2].isnan() and s[4, 1].isinf()
        assert q[1, :BLOCK].isnan().all() and q[3, 2 * BLOCK :].isnan().all()
        assert not q[1, BLOCK:].isnan().any() and not q[3, : 2 * BLOCK].isnan().any()
    else:
        assert s.isnan()


# --------------------------------------------------------------------------------------------
# Accuracy: per-row vs block128 on data with outliers, and the round trip.
# --------------------------------------------------------------------------------------------
# "Massive activations": a couple of values per row 1e5 times the rest.
OUTLIER_FACTOR = 1e5
OUTLIERS_PER_ROW = 2


def test_block128_more_accurate_than_row_with_outliers(device, gen):
    """Mean relative error of the ordinary (non-outlier) values: a per-row scale set by an outlier pushes
    the rest of the row into e4m3's subnormals; block128 confines that to the outlier's block."""
    M, K = 64, 1024
    x_MK = torch.randn(M, K, generator=gen)
    cols = torch.stack([torch.randperm(K, generator=gen)[:OUTLIERS_PER_ROW] for _ in range(M)])
    outlier = torch.zeros(M, K, dtype=torch.bool).scatter_(1, cols, True)
    x_MK[outlier] = OUTLIER_FACTOR * torch.sign(torch.randn(int(outlier.sum()), generator=gen))
    ordinary = ~outlier & (x_MK != 0)

    errors = {}
    for granularity in ("row", "block128"):
        q, s = ops.quantize_fp8(x_MK.to(device), granularity=granularity)
        deq = ops.dequantize_fp8(q, s, granularity=granularity, out_dtype=torch.float32).cpu()
        errors[granularity] = ((deq - x_MK).abs() / x_MK.abs())[ordinary].mean().item()
    ratio = errors["block128"] / errors["row"]
    assert ratio < BLOCK128_VS_ROW_MAX_ERROR_RATIO, f"block128 / row error = {ratio:.3f} ({errors})"


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_round_trip_within_fp8_rounding(granularity, fp8_dtype, device, gen):
    """Independently of the reference: dequantize(quantize(x)) is x to within one fp8 rounding."""
    M, K = 33, 700
    x_MK = random_x(gen, M, K, torch.float32, device)
    q, s = ops.quantize_fp8(x_MK, granularity=granularity, fp8_dtype=fp8_dtype)
    deq = ops.dequantize_fp8(q, s, granularity=granularity, out_dtype=torch.float32).cpu()
    x = x_MK.cpu()
    bound = fp8_rounding_bound(x, expanded_scale(s, granularity, M, K), fp8_dtype)
    err = (deq - x).abs()
    assert (err <= bound).all(), f"max err / bound {(err / bound).max().item():.3f}"


# --------------------------------------------------------------------------------------------
# dequantize_fp8.
# --------------------------------------------------------------------------------------------
def random_scale(gen: torch.Generator, granularity: str, M: int, K: int) -> torch.Tensor:
    shape = {"tensor": (), "row": (M,), "block128": (M, -(-K // BLOCK))}[granularity]
    return torch.exp(3.0 * torch.randn(shape, generator=gen))


@pytest.mark.parametrize("out_dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_dequantize_matches_reference(granularity, fp8_dtype, out_dtype, device, gen):
    """Every one of the 256 codes (subnormals, max, inf / NaN codes) times random scales, bit for bit."""
    M, K = 40, 300
    q = torch.randint(0, 256, (M, K), generator=gen, dtype=torch.uint8)
    q[0, :256] = torch.arange(256, dtype=torch.uint8)
    q = q.view(fp8_dtype)
    scale = random_scale(gen, granularity, M, K)
    out = ops.dequantize_fp8(q.to(device), scale.to(device), granularity=granularity, out_dtype=out_dtype)
    expected = reference.dequantize_fp8(q, scale, granularity, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, K) and out.device.type == device.type
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0, equal_nan=True)


def test_dequantize_default_out_dtype_is_bfloat16(device, gen):
    x_MK = random_x(gen, 5, 130, torch.float32, device)
    q, s = ops.quantize_fp8(x_MK)
    out = ops.dequantize_fp8(q, s)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.cpu(), reference.dequantize_fp8(q.cpu(), s.cpu(), "row", torch.bfloat16))


# --------------------------------------------------------------------------------------------
# swiglu_quant and swiglu.
# --------------------------------------------------------------------------------------------
def random_h(gen: torch.Generator, M: int, F: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """gate | up drawn as 3 * randn (gates well into both tails of silu), cast to dtype."""
    return (3.0 * torch.randn(M, 2 * F, generator=gen)).to(dtype).to(device)


def assert_swiglu_quant_close(out, h_M2F: torch.Tensor, granularity: str, fp8_dtype: torch.dtype) -> None:
    """Against quantize_fp8(reference.swiglu(h)): scales within float32 ulps, codes within one step in a
    tiny fraction of elements, dequantised values within one fp8 rounding of the float32 SwiGLU."""
    q, s = out
    a_ref = reference.swiglu(h_M2F.cpu())
    q_ref, s_ref = reference.quantize_fp8(a_ref, granularity, fp8_dtype)
    M, F = a_ref.shape
    assert q.dtype == fp8_dtype and q.shape == (M, F)
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    torch.testing.assert_close(s.cpu(), s_ref, rtol=SWIGLU_QUANT_SCALE_RTOL, atol=0)

    steps = (codes(q).int() - codes(q_ref).int()).abs()
    if steps.numel():
        assert steps.max() <= SWIGLU_QUANT_MAX_CODE_STEPS, f"a code is {steps.max().item()} steps off"
        mismatch = (steps > 0).float().mean().item()
        assert mismatch <= SWIGLU_QUANT_MAX_MISMATCH_FRACTION, f"{mismatch:.2e} of the codes differ"

    deq = reference.dequantize_fp8(q.cpu(), s.cpu(), granularity, torch.float32)
    bound = fp8_rounding_bound(a_ref, expanded_scale(s, granularity, M, F), fp8_dtype)
    err = (deq - a_ref).abs()
    assert (err <= bound).all(), f"max err / bound {(err / bound).max().item():.3f}"


@pytest.mark.parametrize("in_dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", FP8_QUANT_TEST, ids=shape_id)
def test_swiglu_quant_matches_reference(shape, granularity, fp8_dtype, in_dtype, device, gen):
    M, F = shape.rows, shape.cols
    h_M2F = random_h(gen, M, F, in_dtype, device)
    out = ops.swiglu_quant(h_M2F, granularity=granularity, fp8_dtype=fp8_dtype)
    assert out[0].device.type == device.type and out[1].device.type == device.type
    assert_swiglu_quant_close(out, h_M2F, granularity, fp8_dtype)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_swiglu_quant_zero_rows_and_row_stride(granularity, device, gen):
    """Zero gates or zero ups give all-zero rows (dequantised exactly 0); a row-strided h (a column slice
    of a wider tensor) gives what its contiguous copy gives."""
    M, F = 12, 200
    wide = random_h(gen, M, F + 5, torch.bfloat16, device)
    h_M2F = wide[:, 3 : 3 + 2 * F]
    h_M2F[2, :F] = 0.0  # gate 0: silu(0) = 0
    h_M2F[7, F:] = 0.0  # up 0
    out = ops.swiglu_quant(h_M2F, granularity=granularity)
    assert_swiglu_quant_close(out, h_M2F, granularity, torch.float8_e4m3fn)
    contiguous = ops.swiglu_quant(h_M2F.contiguous(), granularity=granularity)
    assert torch.equal(codes(out[0]), codes(contiguous[0])) and torch.equal(out[1].cpu(), contiguous[1].cpu())
    deq = ops.dequantize_fp8(*out, granularity=granularity, out_dtype=torch.float32).cpu()
    assert torch.equal(deq[[2, 7]], torch.zeros(2, F))


def test_swiglu_quant_no_rows(device):
    q, s = ops.swiglu_quant(torch.empty(0, 64, device=device), granularity="block128")
    assert q.shape == (0, 32) and s.shape == (0, 1)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", FP8_QUANT_TEST, ids=shape_id)
def test_swiglu_matches_reference(shape, dtype, device, gen):
    M, F = shape.rows, shape.cols
    h_M2F = random_h(gen, M, F, dtype, device)
    out = ops.swiglu(h_M2F)
    assert out.dtype == dtype and out.shape == (M, F) and out.device.type == device.type
    expected = reference.swiglu(h_M2F.cpu()).to(dtype)
    torch.testing.assert_close(out.cpu().double(), expected.double(), **swiglu_tol(dtype))


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=dtype_id)
def test_swiglu_backward(dtype, device, gen):
    """d/dh of sum(swiglu(h) * g) against autograd through silu(gate) * up in float64."""
    M, F = 37, 300
    h_M2F = random_h(gen, M, F, dtype, device).requires_grad_(True)
    g_MF = torch.randn(M, F, generator=gen).to(dtype).to(device)
    ops.swiglu(h_M2F).backward(g_MF)

    h64 = h_M2F.detach().cpu().double().requires_grad_(True)
    gate, up = h64.chunk(2, dim=1)
    (torch.nn.functional.silu(gate) * up * g_MF.cpu().double()).sum().backward()
    assert h_M2F.grad.dtype == dtype
    assert_grad_close(h_M2F.grad, h64.grad)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# --------------------------------------------------------------------------------------------
def _bad_call(case: str, device: torch.device, gen: torch.Generator):
    """(op, args, kwargs) of one bad call."""
    M, K = 8, 256
    x_MK = random_x(gen, M, K, torch.float32, device)
    q, s_row = ops.quantize_fp8(x_MK)
    if case == "granularity":
        return ops.quantize_fp8, (x_MK,), dict(granularity="col")
    if case == "fp8_dtype_int8":
        return ops.quantize_fp8, (x_MK,), dict(fp8_dtype=torch.int8)
    if case == "fp8_dtype_float16":
        return ops.quantize_fp8, (x_MK,), dict(fp8_dtype=torch.float16)
    if case == "x_3d":
        return ops.quantize_fp8, (x_MK.view(2, 4, K),), {}
    if case == "x_1d":
        return ops.quantize_fp8, (x_MK[0],), {}
    if case == "x_int32":
        return ops.quantize_fp8, (torch.randint(-3, 3, (M, K), generator=gen, dtype=torch.int32).to(device),), {}
    if case == "x_float64":
        return ops.quantize_fp8, (x_MK.double(),), {}
    if case == "x_column_stride":
        return ops.quantize_fp8, (random_x(gen, M, 2 * K, torch.float32, device)[:, ::2],), {}
    if case == "h_odd_columns":
        return ops.swiglu_quant, (x_MK[:, :-1],), {}
    if case == "h_3d":
        return ops.swiglu_quant, (x_MK.view(2, 4, K),), {}
    if case == "h_int32_swiglu":
        return ops.swiglu, (torch.randint(-3, 3, (M, K), generator=gen, dtype=torch.int32).to(device),), {}
    if case == "h_odd_columns_swiglu":
        return ops.swiglu, (x_MK[:, :-1],), {}
    if case == "swiglu_quant_granularity":
        return ops.swiglu_quant, (x_MK,), dict(granularity="tile")
    if case == "swiglu_quant_fp8_dtype":
        return ops.swiglu_quant, (x_MK,), dict(fp8_dtype=torch.uint8)
    if case == "scale_shape":
        return ops.dequantize_fp8, (q, s_row[:-1]), {}
    if case == "scale_granularity_mismatch":
        return ops.dequantize_fp8, (q, s_row), dict(granularity="block128")
    if case == "scale_float64":
        return ops.dequantize_fp8, (q, s_row.double()), {}
    if case == "x_fp8_not_fp8":
        return ops.dequantize_fp8, (q.view(torch.uint8), s_row), {}
    if case == "dequantize_granularity":
        return ops.dequantize_fp8, (q, s_row), dict(granularity="rows")
    if case == "out_dtype":
        return ops.dequantize_fp8, (q, s_row), dict(out_dtype=torch.int32)
    raise AssertionError(case)


BAD_CASES = {
    "granularity": "granularity",
    "fp8_dtype_int8": "fp8_dtype",
    "fp8_dtype_float16": "fp8_dtype",
    "x_3d": r"\bx\b",
    "x_1d": r"\bx\b",
    "x_int32": r"\bx\b",
    "x_float64": r"\bx\b",
    "x_column_stride": r"\bx\b.*stride",
    "h_odd_columns": r"\bh\b",
    "h_3d": r"\bh\b",
    "h_int32_swiglu": r"\bh\b",
    "h_odd_columns_swiglu": r"\bh\b",
    "swiglu_quant_granularity": "granularity",
    "swiglu_quant_fp8_dtype": "fp8_dtype",
    "scale_shape": r"\bscale\b",
    "scale_granularity_mismatch": r"\bscale\b",
    "scale_float64": r"\bscale\b",
    "x_fp8_not_fp8": "x_fp8",
    "dequantize_granularity": "granularity",
    "out_dtype": "out_dtype",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_the_argument(case, device, gen):
    op, args, kwargs = _bad_call(case, device, gen)
    with pytest.raises(ERRORS, match=BAD_CASES[case]):
        op(*args, **kwargs)


@pytest.mark.gpu
def test_scale_on_another_device_rejected(gen):
    q, s = ops.quantize_fp8(random_x(gen, 4, 64, torch.float32, torch.device("cuda")))
    with pytest.raises(ERRORS, match=r"\bscale\b"):
        ops.dequantize_fp8(q, s.cpu())


# --------------------------------------------------------------------------------------------
# Real torch ops: opcheck, torch.compile.
# --------------------------------------------------------------------------------------------
OPCHECK_QUANT_CASES = [
    # (M, K, granularity, fp8_dtype, in_dtype)
    (7, 300, "row", torch.float8_e4m3fn, torch.bfloat16),
    (5, 129, "block128", torch.float8_e5m2, torch.float32),
    (3, 64, "tensor", torch.float8_e4m3fn, torch.float16),
    (0, 256, "block128", torch.float8_e4m3fn, torch.bfloat16),
]


def _opcheck_id(case) -> str:
    M, K, granularity, fp8_dtype, in_dtype = case
    return f"M{M}-K{K}-{granularity}-{dtype_id(fp8_dtype)}-{dtype_id(in_dtype)}"


# opcheck's test_schema compares every input before and after the call with torch.allclose, which torch
# does not implement for float8 tensors ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'): ops
# that take fp8 inputs run the other utils, and `assert_fp8_schema` checks what test_schema would.
OPCHECK_UTILS_FP8_INPUTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def assert_fp8_schema(op, args: tuple) -> None:
    """What opcheck's test_schema checks, for a functional op with fp8 inputs: no input is mutated
    (bitwise) and no output aliases an input."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [t.clone() for t in tensors]
    out = op(*args)
    outs = out if isinstance(out, tuple) else (out,)
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(
            t.view(torch.uint8) if t.element_size() == 1 else t, b.view(torch.uint8) if b.element_size() == 1 else b
        ), "an input was mutated"
        for o in outs:
            assert o.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() or o.numel() == 0, (
                "output aliases an input"
            )


@pytest.mark.parametrize("case", OPCHECK_QUANT_CASES, ids=_opcheck_id)
def test_opcheck_quantize_dequantize(case, device, gen):
    M, K, granularity, fp8_dtype, in_dtype = case
    x_MK = random_x(gen, M, K, in_dtype, device)
    torch.library.opcheck(torch.ops.llama4.quantize_fp8.default, (x_MK, granularity, fp8_dtype))
    q, s = ops.quantize_fp8(x_MK, granularity=granularity, fp8_dtype=fp8_dtype)
    args = (q, s, granularity, in_dtype)
    torch.library.opcheck(torch.ops.llama4.dequantize_fp8.default, args, test_utils=OPCHECK_UTILS_FP8_INPUTS)
    assert_fp8_schema(torch.ops.llama4.dequantize_fp8.default, args)


@pytest.mark.parametrize("case", OPCHECK_QUANT_CASES, ids=_opcheck_id)
def test_opcheck_swiglu_quant(case, device, gen):
    M, F, granularity, fp8_dtype, in_dtype = case
    h_M2F = random_h(gen, M, F, in_dtype, device)
    torch.library.opcheck(torch.ops.llama4.swiglu_quant.default, (h_M2F, granularity, fp8_dtype))


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=dtype_id)
def test_opcheck_swiglu(dtype, device, gen):
    h_M2F = random_h(gen, 9, 200, dtype, device).requires_grad_(True)
    torch.library.opcheck(torch.ops.llama4.swiglu.default, (h_M2F,))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_compile_swiglu_quant_dequantize(granularity, device, gen):
    """swiglu_quant -> dequantize_fp8 in one fullgraph compile (dynamic M), equal to eager."""

    def fn(h_M2F):
        q, s = ops.swiglu_quant(h_M2F, granularity=granularity)
        return ops.dequantize_fp8(q, s, granularity=granularity, out_dtype=torch.float32) * 2.0

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for M in (5, 17, 130):
        h_M2F = random_h(gen, M, 160, torch.bfloat16, device)
        assert torch.equal(compiled(h_M2F), fn(h_M2F))


def test_compile_swiglu_backward(device, gen):
    def fn(h_M2F, g_MF):
        return (ops.swiglu(h_M2F) * g_MF).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    M, F = 21, 96
    h_M2F = random_h(gen, M, F, torch.float32, device)
    g_MF = torch.randn(M, F, generator=gen).to(device)
    h1 = h_M2F.clone().requires_grad_(True)
    h2 = h_M2F.clone().requires_grad_(True)
    compiled(h1, g_MF).backward()
    fn(h2, g_MF).backward()
    assert torch.equal(h1.grad, h2.grad)
