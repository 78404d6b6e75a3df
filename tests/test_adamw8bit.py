"""engine.optim.AdamW8bit and its ops (llama4::adamw8bit_step, quantize_blockwise, dequantize_blockwise)
against engine.ops.reference and torch.optim.AdamW: quantisation, one step vs the float64 oracle, 100 steps
beside torch, convergence, bf16 stochastic rounding, state_dict, non-finite gradients, bad input, opcheck.
Legend: n elements, B = ceil(n / block_size) blocks; r = x / absmax (a value in map units).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from tolerances import FP32_EPS

from engine import ops
from engine.ops import reference
from engine.optim import AdamW8bit

ERRORS = (RuntimeError, ValueError, TypeError)
BLOCK_SIZES = (128, 256, 512)
STATE_DTYPES = ("dynamic8", "fp32")
PARAM_DTYPES = (torch.float32, torch.bfloat16)
SIGNED = (True, False)
# One element, a partial block, exact blocks, many blocks with a ragged tail.
QUANT_SIZES = (1, 100, 512, 5000)
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
MIN_8BIT_SIZE = 4096  # the optimizer's default

# --------------------------------------------------------------------------------------------
# Tolerances (they belong in tests/tolerances.py; kept here until that file is edited).
# --------------------------------------------------------------------------------------------
# Nearest-code slack in ulps of max(|r|, |chosen entry|): the kernel forms r as x * (1 / absmax) (two
# roundings, <= 1 ulp of r) and compares two float32 distances (each rounded, <= 1 ulp), so it may pick
# the other of two codes only when r is within ~2 ulp of their midpoint; 4 covers both with room.
NEAREST_SLACK_ULPS = 4
# A new float32 moment is b*m + (1-b)*x: b and 1-b each rounded from the double hyper-parameter (<= 1/2
# ulp; 1-b must come from the double 1 - beta, as torch's value=1-beta2 does: formed in float32 from
# float32(beta) it is off by up to ulp(beta) / (1 - beta), 108 ulps for beta2 = 0.999), two products and a
# sum (<= 1/2 ulp each). Relative to |b*m| + |(1-b)*x| (the terms cancel for m), at most 2.5 ulps; 4 ulps.
STEP_STATE_ULPS = 4
# The new parameter: p * decay (decay rounded, product rounded) and the final subtraction: 2 ulps of |p|.
STEP_PARAM_ULPS = 2
# The update step_size * m / (sqrt(v) * inv_bc2 + eps): m and v within STEP_STATE_ULPS (v enters through a
# square root: half of it), four rounded host scalars and four operations: 8 ulps of the update's scale.
STEP_UPDATE_ULPS = 8
# fp32-state mode vs torch.optim.AdamW after 100 steps without re-sync. Both are float32 AdamW; they differ
# in operation order (torch: lerp, addcmul, addcdiv), each step adds a few ulps to the moments and to p,
# and v remembers ~1/(1-beta2) steps of them: 1e-5 (~80 ulps). atol: an element that crossed zero keeps
# the absolute error of its larger past, so 1e-5 of the tensor's largest magnitude.
FP32_MODE_RTOL = 1e-5
FP32_MODE_ATOL_OF_MAX = 1e-5
# Adam's update is bounded by lr * (1 - beta1) / sqrt(1 - beta2) when 1 - beta1 > sqrt(1 - beta2), as here
# (Kingma & Ba, sec. 2.1): the scale for absolute update errors.
ADAM_MAX_UPDATE_OVER_LR = (1 - BETAS[0]) / math.sqrt(1 - BETAS[1])
# 8-bit state beside torch (params re-synced each step): the dynamic map quantises a block's values with
# ~1.1-1.6% mean relative error (test_dequantised_error_on_normal_data); m remembers ~1/sqrt(1-beta1^2)
# ~ 2.3 steps of independent errors (~3.7%), v's errors random-walk (sqrt(100) * 0.7% = 7% at worst,
# 3-4.3% seen, block 128..512: they are correlated). Bound on the relative L1 error of the moments: 6%.
STATE_REL_L1_MAX = 0.06
# The update's relative error follows the moments' (~4% + half of v's ~4%, more in heavy-tailed blocks
# where v of small elements rounds to 0), and the mean |update| is ~0.4 lr: mean |dp| ~ 0.03 lr seen on
# heavy-tailed (log-normal scale) gradients; 0.05 lr bounds it.
MEAN_PARAM_ERROR_OVER_LR = 0.05
# Convergence: final training loss of AdamW8bit within 2% of torch.optim.AdamW (two-sided: a bug that
# changes the effective lr shows up as either side; the task sits near its noise floor, so the faithful
# 8-bit optimizer lands within ~1%).
CONVERGENCE_REL_DIFF = 0.02
# The dynamic map's headline error on N(0, 1) data (signed) and its square (unsigned), ratio of means
# sum|deq - x| / sum|x|: errors lie uniformly within half a code gap, so their mean is a quarter gap
# times absmax: ~1.3% for the top decade's 0.014 gap with absmax ~2.9 sigma and mean |x| 0.8 sigma.
NORMAL_DATA_REL_ERROR_MAX = {True: 0.015, False: 0.01}
# ... and the same measured against that quarter-gap expectation computed on the data itself
# (65536 samples: the mean of uniform errors is within ~0.5% of its expectation).
QUARTER_GAP_SLACK = 1.1
# Stochastic rounding: deviations of a mean of n independent roundings are judged at 5 sigma.
SIGMA_BOUND = 5.0


def qmap(signed: bool) -> torch.Tensor:
    return reference.dynamic_qmap(signed)


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def per_element(absmax_B: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    return absmax_B.repeat_interleave(block_size)[:n]


def draw(gen: torch.Generator, n: int, signed: bool, scale: float = 1.0) -> torch.Tensor:
    """N(0, scale^2) samples (signed map) or their squares (unsigned map, like a second moment)."""
    x = torch.randn(n, generator=gen) * scale
    return x if signed else x * x


def nearest_distance(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """|r - nearest entry of the sorted map q| in float64 (a bracket search, no n x 256 matrix)."""
    q = q.double()
    hi = torch.searchsorted(q, r).clamp(1, q.numel() - 1)
    return torch.minimum((q[hi] - r).abs(), (q[hi - 1] - r).abs())


def assert_nearest_codes(
    codes: torch.Tensor,
    x64: torch.Tensor,
    absmax64: torch.Tensor,
    signed: bool,
    block_size: int,
    extra_slack: torch.Tensor | float = 0.0,
    what: str = "codes",
) -> None:
    """Each code names a map entry nearest to r = x / absmax, up to the float32 slack of the kernel.

    x64: the exact values (float64 [n]); absmax64: their exact block maxima (float64 [B]). extra_slack
    (map units, per element) covers an error in x itself (a moment computed in float32).
    """
    q = qmap(signed).double()
    n = x64.numel()
    scale = per_element(absmax64, n, block_size)
    r = x64 / torch.where(scale > 0, scale, torch.ones_like(scale))
    chosen = q[codes.cpu().long()]
    d_got = (chosen - r).abs()
    d_best = nearest_distance(r, q)
    slack = NEAREST_SLACK_ULPS * FP32_EPS * torch.maximum(r.abs(), chosen.abs()) + extra_slack
    bad = ~(d_got <= d_best + slack)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {n} codes are not nearest; first at {i}: r={r[i].item()!r} got "
            f"code {int(codes.cpu()[i])} ({chosen[i].item()!r}, distance {d_got[i].item():.3e}), best distance "
            f"{d_best[i].item():.3e}, slack {slack[i].item():.3e}"
        )


def nearest_error_bound(x: torch.Tensor, absmax_B: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
    """Largest |dequant(quant(x)) - x| nearest rounding allows: half the gap of the two entries around r,
    times absmax (beyond the map's ends: the distance to the end entry), plus float32 rounding."""
    q = qmap(signed).double()
    n = x.numel()
    scale = per_element(absmax_B.double(), n, block_size)
    r = x.double() / torch.where(scale > 0, scale, torch.ones_like(scale))
    hi = torch.searchsorted(q, r).clamp(1, q.numel() - 1)
    half_gap = (q[hi] - q[hi - 1]) / 2
    beyond = torch.maximum(q[0] - r, r - q[-1]).clamp_min(0)
    return (torch.maximum(half_gap, beyond) + NEAREST_SLACK_ULPS * FP32_EPS * r.abs()) * scale


# --------------------------------------------------------------------------------------------
# Blockwise dynamic quantisation.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", SIGNED)
def test_dynamic_qmap_matches_reference(signed):
    got = ops.dynamic_qmap(signed)
    assert got.dtype == torch.float32 and got.shape == (256,)
    assert torch.equal(got.cpu(), reference.dynamic_qmap(signed))


@pytest.mark.parametrize("n", QUANT_SIZES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("signed", SIGNED)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_quantize_matches_reference(dtype, signed, block_size, n, device, gen):
    x = draw(gen, n, signed, scale=3.0).to(dtype)
    codes, absmax = ops.quantize_blockwise(x.to(device), signed=signed, block_size=block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (n,) and codes.device.type == device.type
    assert absmax.dtype == torch.float32 and absmax.shape == (num_blocks(n, block_size),)

    ref_codes, ref_absmax = reference.quantize_blockwise(x, qmap(signed), block_size)
    assert torch.equal(absmax.cpu(), ref_absmax), "absmax is an exact max of |x|"
    # Equal to the oracle's codes except at float32 ties: every code is nearest to the exact r.
    assert_nearest_codes(codes, x.double(), ref_absmax.double(), signed, block_size)
    differ = codes.cpu() != ref_codes
    assert int(differ.sum()) <= max(1, n // 100), f"{int(differ.sum())} of {n} codes differ from the oracle"
    # And the round trip is within nearest rounding of x.
    deq = ops.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size)
    assert deq.dtype == torch.float32 and deq.shape == (n,)
    err = (deq.cpu().double() - x.double()).abs()
    assert bool((err <= nearest_error_bound(x, ref_absmax, signed, block_size)).all())


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("signed", SIGNED)
def test_dequantize_matches_reference(signed, block_size, device, gen):
    """qmap[code] * absmax[block] is one float32 product: bitwise equal, for every code."""
    n = 3 * block_size + 17
    codes = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(num_blocks(n, block_size), generator=gen) * 10.0
    absmax[1] = 0.0  # an all-zero block
    got = ops.dequantize_blockwise(codes.to(device), absmax.to(device), signed=signed, block_size=block_size)
    assert torch.equal(got.cpu(), reference.dequantize_blockwise(codes, absmax, qmap(signed), block_size))


@pytest.mark.parametrize("block_size", [256, 512])
@pytest.mark.parametrize("signed", SIGNED)
def test_map_entries_quantise_to_themselves(signed, block_size, device):
    """Every entry of the map (absmax 1.0, the map's own maximum) gets its own code and comes back exactly."""
    q = qmap(signed)
    codes, absmax = ops.quantize_blockwise(q.to(device), signed=signed, block_size=block_size)
    assert torch.equal(absmax.cpu(), torch.ones(1))
    assert torch.equal(codes.cpu().long(), torch.arange(256))
    assert torch.equal(ops.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size).cpu(), q)


@pytest.mark.parametrize("signed", SIGNED)
def test_exact_midpoints_go_to_the_lower_code(signed, device):
    """x exactly halfway between entries i and i+1 (absmax 1.0, so r = x exactly) gets code i.

    Only midpoints that float32 holds exactly and whose two distances float32 computes exactly: there
    the tie is a real tie for the kernel too.
    """
    q64 = qmap(signed).double()
    mid = (q64[:-1] + q64[1:]) / 2
    exact = (mid.float().double() == mid) & ((q64[1:] - mid).float().double() == q64[1:] - mid)
    exact &= (mid - q64[:-1]).float().double() == mid - q64[:-1]
    lower = torch.arange(255)[exact]
    assert lower.numel() > 100, "the test needs many exact midpoints"
    x = torch.cat([mid[exact].float(), torch.ones(1)])  # the 1.0 fixes absmax at 1
    codes, absmax = ops.quantize_blockwise(x.to(device), signed=signed, block_size=512)
    assert float(absmax.cpu()) == 1.0
    assert torch.equal(codes.cpu()[:-1].long(), lower)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("signed", SIGNED)
def test_zero_blocks(signed, block_size, device, gen):
    """All-zero blocks (a whole one, and a ragged tail) get absmax 0 and the code of 0: exact zeros back."""
    n = 3 * block_size + 5
    x = draw(gen, n, signed)
    x[:block_size] = 0.0
    x[2 * block_size :] = 0.0
    codes, absmax = ops.quantize_blockwise(x.to(device), signed=signed, block_size=block_size)
    zero_code = int(torch.argmin(qmap(signed).abs()))
    assert absmax.cpu()[0] == 0 and absmax.cpu()[2] == 0 and absmax.cpu()[3] == 0
    codes = codes.cpu()
    assert bool((codes[:block_size] == zero_code).all()) and bool((codes[2 * block_size :] == zero_code).all())
    deq = ops.dequantize_blockwise(codes.to(device), absmax, signed=signed, block_size=block_size).cpu()
    assert torch.equal(deq[:block_size], torch.zeros(block_size))  # no NaN from 0 / 0
    assert torch.equal(deq[2 * block_size :], torch.zeros(n - 2 * block_size))


@pytest.mark.parametrize("signed", SIGNED)
def test_one_huge_value_in_a_block(signed, device, gen):
    """One value 1e7 times the others: it sets absmax and comes back exactly; the others land in the map's
    lowest decades (magnitudes 1e-7..1e-5 of absmax), each within nearest rounding of its value."""
    block_size, huge, small = 256, 1e4, 1e-3
    x = draw(gen, block_size, signed, scale=small)
    if not signed:
        x = x.sqrt()  # keep the small values ~1e-3, not 1e-6: r ~ 1e-7
    x[37] = huge
    codes, absmax = ops.quantize_blockwise(x.to(device), signed=signed, block_size=block_size)
    deq = ops.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size).cpu()
    assert float(absmax.cpu()) == huge and float(deq[37]) == huge
    others = torch.ones(block_size, dtype=torch.bool)
    others[37] = False
    q = qmap(signed)
    assert float(q[codes.cpu()[others].long()].abs().max()) < 1e-5, "small values must use the small codes"
    err = (deq.double() - x.double()).abs()
    assert bool((err <= nearest_error_bound(x, absmax.cpu(), signed, block_size)).all())


@pytest.mark.parametrize("signed", SIGNED)
def test_subnormal_absmax(signed, device, gen):
    """Blocks whose max |x| is a float32 subnormal (1 / absmax overflows) still quantise to nearest codes.

    Such blocks arise in the second moment of tiny gradients ((1 - beta2) * g^2 with |g| ~ 1e-18).
    """
    block_size, n = 256, 1024
    x = draw(gen, n, signed)
    x = x / x.abs().max() * 1e-39  # absmax 1e-39 < 1 / FLT_MAX: 1.0f / absmax is inf
    codes, absmax = ops.quantize_blockwise(x.to(device), signed=signed, block_size=block_size)
    _, ref_absmax = reference.quantize_blockwise(x, qmap(signed), block_size)
    assert torch.equal(absmax.cpu(), ref_absmax)
    assert_nearest_codes(codes, x.double(), ref_absmax.double(), signed, block_size)


@pytest.mark.parametrize("signed", SIGNED)
def test_dequantised_error_on_normal_data(signed, device, gen):
    """Mean error of the round trip on N(0, 1) (signed) and chi-square (unsigned) data, block 256."""
    block_size, n = 256, 1 << 16
    x = draw(gen, n, signed)
    codes, absmax = ops.quantize_blockwise(x.to(device), signed=signed, block_size=block_size)
    deq = ops.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size).cpu().double()
    x64 = x.double()
    rel_error = ((deq - x64).abs().sum() / x64.abs().sum()).item()
    assert rel_error < NORMAL_DATA_REL_ERROR_MAX[signed], rel_error
    # Nearest rounding leaves errors uniform in [0, gap / 2]: expected mean gap / 4 * absmax.
    q = qmap(signed).double()
    scale = per_element(absmax.cpu().double(), n, block_size)
    hi = torch.searchsorted(q, x64 / scale).clamp(1, 255)
    expected = ((q[hi] - q[hi - 1]) / 4 * scale).sum() / x64.abs().sum()
    assert rel_error <= QUARTER_GAP_SLACK * expected.item(), (rel_error, expected.item())


# --------------------------------------------------------------------------------------------
# One step of the op against the float64 oracle (reference.adamw_step on the dequantised state).
# --------------------------------------------------------------------------------------------
def _random_state(gen: torch.Generator, n: int, step: int, state_dtype: str, block_size: int):
    """(op state tensors on CPU, exact float32 m, v they hold). step 1 starts from zeros, as the optimizer."""
    if step == 1:
        m, v = torch.zeros(n), torch.zeros(n)
    else:
        m = torch.randn(n, generator=gen) * 0.1
        v = (torch.randn(n, generator=gen) * 0.1) ** 2 + 1e-4
    if state_dtype == "fp32":
        return (m.clone(), v.clone(), torch.empty(0), torch.empty(0)), m, v
    cm, am = reference.quantize_blockwise(m, qmap(True), block_size)
    cv, av = reference.quantize_blockwise(v, qmap(False), block_size)
    m_q = reference.dequantize_blockwise(cm, am, qmap(True), block_size)
    v_q = reference.dequantize_blockwise(cv, av, qmap(False), block_size)
    return (cm, cv, am, av), m_q, v_q


def _run_op(param, grad, state, *, step, block_size, seed, device, lr=LR, weight_decay=WEIGHT_DECAY):
    """Calls the op on device copies; returns (param, exp_avg, exp_avg_sq, absmax_m, absmax_v) on CPU."""
    p = param.to(device).clone()
    tensors = [t.to(device).clone() for t in state]
    torch.ops.llama4.adamw8bit_step(
        p,
        grad.to(device),
        *tensors,
        ops.dynamic_qmap(True).to(device),
        ops.dynamic_qmap(False).to(device),
        step,
        lr,
        BETAS[0],
        BETAS[1],
        EPS,
        weight_decay,
        block_size,
        seed,
    )
    return (p.cpu(), *(t.cpu() for t in tensors))


def _check_step_against_oracle(p_in, g, m_in, v_in, out, *, step, state_dtype, block_size, lr=LR):
    """out = the op's (param, exp_avg, exp_avg_sq, absmax_m, absmax_v), param in float32."""
    b1, b2 = BETAS
    p64, m64, v64 = reference.adamw_step(
        p_in, g, m_in, v_in, step=step, lr=lr, beta1=b1, beta2=b2, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    g64, m_in64 = g.double(), m_in.double()
    terms_m = (b1 * m_in64).abs() + ((1 - b1) * g64).abs()  # |m| may cancel; its error scales with these
    denom = v64.sqrt() / math.sqrt(1 - b2**step) + EPS
    update_scale = lr / (1 - b1**step) * terms_m / denom
    p_out, m_out, v_out, am_out, av_out = out

    p_err = (p_out.double() - p64).abs()
    p_tol = STEP_PARAM_ULPS * FP32_EPS * p_in.double().abs() + STEP_UPDATE_ULPS * FP32_EPS * update_scale
    bad = ~(p_err <= p_tol)
    assert not bad.any(), (
        f"param: {int(bad.sum())} of {p_err.numel()} out of tolerance, max err/tol {(p_err / p_tol).max().item():.1f}"
    )

    m_tol = STEP_STATE_ULPS * FP32_EPS * terms_m
    v_tol = STEP_STATE_ULPS * FP32_EPS * v64
    if state_dtype == "fp32":
        m_err, v_err = (m_out.double() - m64).abs(), (v_out.double() - v64).abs()
        assert bool((m_err <= m_tol).all()), f"exp_avg: max err/tol {(m_err / m_tol).max().item():.1f}"
        assert bool((v_err <= v_tol).all()), f"exp_avg_sq: max err/tol {(v_err / v_tol).max().item():.1f}"
        return
    n = p_in.numel()
    blocks = num_blocks(n, block_size)
    for name, x64, tol, codes, absmax, signed in (
        ("exp_avg", m64, m_tol, m_out, am_out, True),
        ("exp_avg_sq", v64, v_tol, v_out, av_out, False),
    ):
        pad = torch.zeros(blocks * block_size, dtype=torch.float64)
        pad[:n] = x64.abs()
        ref_absmax = pad.view(blocks, block_size).amax(1)
        pad[:n] = tol
        block_tol = pad.view(blocks, block_size).amax(1)
        assert absmax.dtype == torch.float32 and absmax.shape == (blocks,)
        a_err = (absmax.double() - ref_absmax).abs()
        assert bool((a_err <= block_tol).all()), f"absmax_{name}: max err/tol {(a_err / block_tol).max().item():.1f}"
        # r = x / absmax carries x's error and absmax's, relative to absmax.
        a = per_element(ref_absmax, n, block_size)
        a = torch.where(a > 0, a, torch.ones_like(a))
        r_slack = 2 * (tol + (x64 / a).abs() * per_element(block_tol, n, block_size)) / a
        assert_nearest_codes(codes, x64, ref_absmax, signed, block_size, extra_slack=r_slack, what=name)


STEP_CASES = [
    # (n, step): a partial single block, one block, many blocks with a ragged tail
    (100, 1),
    (256, 3),
    (4096 + 77, 1),
    (4096 + 77, 10),
]


@pytest.mark.parametrize("n, step", STEP_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_step_matches_oracle(state_dtype, block_size, n, step, device, gen):
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen))  # heavy-ish tails
    state, m_in, v_in = _random_state(gen, n, step, state_dtype, block_size)
    out = _run_op(p, g, state, step=step, block_size=block_size, seed=1234, device=device)
    _check_step_against_oracle(p, g, m_in, v_in, out, step=step, state_dtype=state_dtype, block_size=block_size)


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_bf16_step_is_a_stochastic_rounding_of_the_fp32_step(state_dtype, device, gen):
    """bf16 params: the state updates exactly as for the same values in float32, and each new param is
    one of the two bf16 values around the float32 result (the result itself when bf16 holds it)."""
    n, block_size, step = 4096 + 77, 256, 4
    p = torch.randn(n, generator=gen).bfloat16()
    g = torch.randn(n, generator=gen).bfloat16()
    state, _, _ = _random_state(gen, n, step, state_dtype, block_size)
    out16 = _run_op(p, g, state, step=step, block_size=block_size, seed=99, device=device)
    out32 = _run_op(p.float(), g.float(), state, step=step, block_size=block_size, seed=99, device=device)
    assert out16[0].dtype == torch.bfloat16
    for name, a, b in zip(
        ("exp_avg", "exp_avg_sq", "absmax_exp_avg", "absmax_exp_avg_sq"), out16[1:], out32[1:], strict=True
    ):
        assert torch.equal(a, b), f"{name} depends on the param dtype"
    bits32 = out32[0].view(torch.int32)
    truncated = bits32 & ~0xFFFF  # toward zero: the bf16 value with the same sign and exponent
    got = out16[0].float().view(torch.int32)
    exact = (bits32 & 0xFFFF) == 0
    ok = (got == truncated) | (~exact & (got == truncated + 0x10000))
    assert bool(ok.all()), f"{int((~ok).sum())} bf16 params are not a neighbour of the float32 result"
    # Unbiased: the count rounded away from zero matches the sum of the probabilities frac = low16 / 2^16.
    frac = (bits32 & 0xFFFF).double() / 65536
    rounded_up = (got != truncated).double()
    sigma = (frac * (1 - frac)).sum().sqrt().item()
    assert abs((rounded_up - frac).sum().item()) <= SIGMA_BOUND * sigma


def test_bf16_rounding_depends_on_seed_and_step_only(device, gen):
    """Same (seed, step): bitwise the same bits; another seed or step: other rounding decisions."""
    n, block_size = 8192, 256
    p = torch.randn(n, generator=gen).bfloat16()
    g = torch.randn(n, generator=gen).bfloat16()
    state, _, _ = _random_state(gen, n, 5, "dynamic8", block_size)

    def run(seed, step):
        return _run_op(p, g, state, step=step, block_size=block_size, seed=seed, device=device)[0]

    first = run(7, 5)
    assert torch.equal(first.view(torch.int16), run(7, 5).view(torch.int16))
    assert not torch.equal(first.view(torch.int16), run(8, 5).view(torch.int16)), "the seed is ignored"
    # A different step also changes the maths (bias correction); the rounding bits differ all the same.
    assert not torch.equal(first.view(torch.int16), run(7, 6).view(torch.int16))


# --------------------------------------------------------------------------------------------
# The optimizer beside torch.optim.AdamW.
# --------------------------------------------------------------------------------------------
# Three tensors with 8-bit state (one exactly at min_8bit_size, one with a ragged last block) and two
# below min_8bit_size (float32 state).
BESIDE_TORCH_SHAPES = [(96, 256), (MIN_8BIT_SIZE + 100,), (64, 64), (1000,), (7,)]
BESIDE_TORCH_STEPS = 100


class GradientStream:
    """Gradients like a network's: a per-element mean, noise, a log-normal per-element scale (heavy tails
    inside a block) and a per-tensor scale spanning four decades."""

    def __init__(self, gen: torch.Generator, shapes: list[tuple[int, ...]]):
        self.gen = gen
        self.mean = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
        self.scale = [torch.exp(torch.randn(s, generator=gen)) * 10.0 ** (-4 + i % 5) for i, s in enumerate(shapes)]

    def next(self) -> list[torch.Tensor]:
        return [
            (mu + torch.randn(mu.shape, generator=self.gen)) * s for mu, s in zip(self.mean, self.scale, strict=True)
        ]


def _dequantised_state(opt: AdamW8bit, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = opt.state[p]
    bs = opt.block_size
    m = reference.dequantize_blockwise(state["exp_avg"].cpu(), state["absmax_exp_avg"].cpu(), qmap(True), bs)
    v = reference.dequantize_blockwise(state["exp_avg_sq"].cpu(), state["absmax_exp_avg_sq"].cpu(), qmap(False), bs)
    return m.view(p.shape), v.view(p.shape)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_beside_torch_adamw_resynced(block_size, device, gen):
    """100 steps, our params reset to torch's before each step, the same gradients: per step, the mean
    |param difference| on 8-bit tensors is a small fraction of lr, float32-state tensors agree to float32
    rounding, and the dequantised moments stay close to torch's."""
    shapes = BESIDE_TORCH_SHAPES
    ref_params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    params = [p.clone() for p in ref_params]
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    ref_opt = torch.optim.AdamW(ref_params, **hyper)
    opt = AdamW8bit(params, **hyper, block_size=block_size, min_8bit_size=MIN_8BIT_SIZE)
    grads = GradientStream(gen, shapes)
    is_8bit = [p.numel() >= MIN_8BIT_SIZE for p in params]
    assert any(is_8bit) and not all(is_8bit)

    for step in range(1, BESIDE_TORCH_STEPS + 1):
        for p, ref in zip(params, ref_params, strict=True):
            p.copy_(ref)
        for p, ref, g in zip(params, ref_params, grads.next(), strict=True):
            p.grad, ref.grad = g.to(device, copy=True), g.to(device, copy=True)
        ref_opt.step()
        opt.step()
        for i, (p, ref) in enumerate(zip(params, ref_params, strict=True)):
            err = (p - ref).abs().double()
            if is_8bit[i]:
                mean_err = err.mean().item()
                assert mean_err <= MEAN_PARAM_ERROR_OVER_LR * LR, (step, shapes[i], mean_err / LR)
                m, v = _dequantised_state(opt, p)
                for name, ours, theirs in (
                    ("exp_avg", m, ref_opt.state[ref]["exp_avg"]),
                    ("exp_avg_sq", v, ref_opt.state[ref]["exp_avg_sq"]),
                ):
                    theirs = theirs.cpu().double()
                    rel = ((ours.double() - theirs).abs().sum() / theirs.abs().sum()).item()
                    assert rel <= STATE_REL_L1_MAX, (step, shapes[i], name, rel)
            else:
                # float32 state: the same AdamW in float32 up to operation order.
                tol = STEP_PARAM_ULPS * FP32_EPS * ref.abs().double() + FP32_MODE_RTOL * ADAM_MAX_UPDATE_OVER_LR * LR
                assert bool((err <= tol).all()), (step, shapes[i], (err / tol).max().item())


@pytest.mark.parametrize("dtype_case", ["explicit-fp32", "below-min-8bit-size"])
def test_fp32_state_matches_torch_adamw(dtype_case, device, gen):
    """state_dtype="fp32" (and tensors below min_8bit_size) track torch.optim.AdamW for 100 steps
    without re-sync: same float32 AdamW, params and moments within FP32_MODE_RTOL."""
    shapes = [(64, 96), (1000,), (7,)]
    ref_params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    params = [p.clone() for p in ref_params]
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    ref_opt = torch.optim.AdamW(ref_params, **hyper)
    if dtype_case == "explicit-fp32":
        opt = AdamW8bit(params, **hyper, state_dtype="fp32", min_8bit_size=0)
    else:
        opt = AdamW8bit(params, **hyper, min_8bit_size=10**9)
    grads = GradientStream(gen, shapes)
    for _ in range(BESIDE_TORCH_STEPS):
        for p, ref, g in zip(params, ref_params, grads.next(), strict=True):
            p.grad, ref.grad = g.to(device, copy=True), g.to(device, copy=True)
        ref_opt.step()
        opt.step()
    for p, ref in zip(params, ref_params, strict=True):
        state, ref_state = opt.state[p], ref_opt.state[ref]
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == p.shape
        for name, ours, theirs in (
            ("param", p, ref),
            ("exp_avg", state["exp_avg"], ref_state["exp_avg"]),
            ("exp_avg_sq", state["exp_avg_sq"], ref_state["exp_avg_sq"]),
        ):
            atol = FP32_MODE_ATOL_OF_MAX * theirs.abs().max().item()
            torch.testing.assert_close(
                ours, theirs, rtol=FP32_MODE_RTOL, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
            )


# --------------------------------------------------------------------------------------------
# Convergence: a small MLP regression, 300 full-batch steps from the same init.
# --------------------------------------------------------------------------------------------
CONVERGENCE_STEPS = 300
CONVERGENCE_SAMPLES = 2048
CONVERGENCE_NOISE = 0.3  # label noise: the loss floor is 0.09, which both optimizers approach
CONVERGENCE_LR = 1e-2
CONVERGENCE_MIN_8BIT_SIZE = 1024  # so both hidden matrices (2048 and 4096 elements) use 8-bit state


def _train(opt_factory, device: torch.device, seed: int) -> tuple[float, float]:
    """(first loss, final loss) of a 32-64-64-8 tanh MLP fitting a noisy random teacher."""
    data_gen = torch.Generator().manual_seed(seed)
    x = torch.randn(CONVERGENCE_SAMPLES, 32, generator=data_gen)
    w1 = torch.randn(32, 64, generator=data_gen) / 32**0.5
    w2 = torch.randn(64, 8, generator=data_gen) / 8**0.5
    y = torch.tanh(x @ w1) @ w2 + CONVERGENCE_NOISE * torch.randn(CONVERGENCE_SAMPLES, 8, generator=data_gen)
    x, y = x.to(device), y.to(device)
    init_gen = torch.Generator().manual_seed(seed + 1)
    layers = [
        torch.nn.Linear(32, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 8),
    ]
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=init_gen) / math.sqrt(p.shape[-1]))
    model.to(device)
    opt = opt_factory(model.parameters())
    first = None
    for _ in range(CONVERGENCE_STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, torch.nn.functional.mse_loss(model(x), y).item()


def test_convergence_like_torch_adamw(device):
    hyper = dict(lr=CONVERGENCE_LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    first_ref, final_ref = _train(lambda ps: torch.optim.AdamW(ps, **hyper), device, seed=0)
    first, final = _train(lambda ps: AdamW8bit(ps, **hyper, min_8bit_size=CONVERGENCE_MIN_8BIT_SIZE), device, seed=0)
    assert first == first_ref
    assert final_ref < 0.5 * first_ref, "the task must be learnable in the budget"
    assert abs(final - final_ref) <= CONVERGENCE_REL_DIFF * final_ref, (final, final_ref)


# --------------------------------------------------------------------------------------------
# State layout: min_8bit_size, state_bytes.
# --------------------------------------------------------------------------------------------
def _step_with_zero_grads(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_min_8bit_size_selects_the_state(block_size, device):
    sizes = [MIN_8BIT_SIZE - 1, MIN_8BIT_SIZE, 3 * MIN_8BIT_SIZE + 5]
    params = [torch.zeros(n, device=device) for n in sizes]
    opt = AdamW8bit(params, block_size=block_size, min_8bit_size=MIN_8BIT_SIZE)
    _step_with_zero_grads(opt, params)
    small, *large = params
    state = opt.state[small]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == small.shape
    assert state["exp_avg_sq"].dtype == torch.float32 and "absmax_exp_avg" not in state
    for p in large:
        state = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.uint8 and state[key].shape == (p.numel(),), key
            assert state[key].device == p.device
        for key in ("absmax_exp_avg", "absmax_exp_avg_sq"):
            assert state[key].dtype == torch.float32 and state[key].shape == (num_blocks(p.numel(), block_size),)
        assert isinstance(state["step"], int) and state["step"] == 1 and isinstance(state["seed"], int)

    fp32_params = [torch.zeros(n, device=device) for n in sizes]
    fp32_opt = AdamW8bit(fp32_params, state_dtype="fp32")
    _step_with_zero_grads(fp32_opt, fp32_params)
    for p in fp32_params:
        assert fp32_opt.state[p]["exp_avg"].dtype == torch.float32 and "absmax_exp_avg" not in fp32_opt.state[p]


# ~10M parameters in a few large tensors and two small ones.
STATE_BYTES_SHAPES = [(2048, 2048), (2048, 2048), (1536, 1000), (4000,), (64,)]
STATE_BYTES_PER_PARAM_MAX = 2.1  # (2 + 8 / 256) = 2.03 for the 8-bit tensors, 8 for the tiny ones


def test_state_bytes_per_parameter(device):
    params = [torch.zeros(s, device=device) for s in STATE_BYTES_SHAPES]
    opt = AdamW8bit(params)
    _step_with_zero_grads(opt, params)
    tensors_bytes = sum(
        v.numel() * v.element_size() for state in opt.state.values() for v in state.values() if torch.is_tensor(v)
    )
    expected = sum(
        2 * p.numel() + 2 * 4 * num_blocks(p.numel(), 256) if p.numel() >= MIN_8BIT_SIZE else 8 * p.numel()
        for p in params
    )
    assert opt.state_bytes() == tensors_bytes == expected
    n_params = sum(p.numel() for p in params)
    assert opt.state_bytes() / n_params <= STATE_BYTES_PER_PARAM_MAX
    fp32_opt = AdamW8bit(params, state_dtype="fp32")
    _step_with_zero_grads(fp32_opt, params)
    assert fp32_opt.state_bytes() == 8 * n_params


# --------------------------------------------------------------------------------------------
# bf16 parameters: stochastic rounding.
# --------------------------------------------------------------------------------------------
SR_ELEMENTS = 1 << 16
SR_STEPS = 100
SR_LR = 1e-4  # 1/39 of a bf16 ulp below 1.0 (2^-8): round-to-nearest never moves


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_bf16_tiny_updates_are_unbiased(state_dtype, device):
    """A constant gradient makes every Adam update exactly lr (m_hat = g, v_hat = g^2, also in 8 bits:
    a constant block quantises exactly). On bf16 params at 1.0, 100 updates of 1e-4 move the mean by
    0.01 with stochastic rounding; round-to-nearest (torch.optim.AdamW on bf16) does not move at all."""
    torch.manual_seed(0)
    p = torch.ones(SR_ELEMENTS, dtype=torch.bfloat16, device=device)
    p_torch = p.clone()
    hyper = dict(lr=SR_LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    opt = AdamW8bit([p], **hyper, state_dtype=state_dtype)
    torch_opt = torch.optim.AdamW([p_torch], **hyper)
    for _ in range(SR_STEPS):
        p.grad = torch.ones_like(p)
        p_torch.grad = torch.ones_like(p_torch)
        opt.step()
        torch_opt.step()
    assert bool((p_torch == 1).all()), "round-to-nearest should lose every update (the premise)"
    expected = 1.0 - SR_STEPS * SR_LR
    # Each rounding has variance <= ulp^2 / 4 (ulp = 2^-8 below 1.0); n elements, SR_STEPS roundings each.
    sigma = math.sqrt(SR_STEPS / 4) * 2.0**-8 / math.sqrt(SR_ELEMENTS)
    mean = p.double().mean().item()
    assert abs(mean - expected) <= SIGMA_BOUND * sigma, (mean, expected, sigma)


def _bf16_run(device, seed: int, steps: int = 5) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(MIN_8BIT_SIZE * 2, generator=gen).bfloat16().to(device)
    torch.manual_seed(seed)
    opt = AdamW8bit([p])
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(device)
        opt.step()
    return p, opt.state[p]


def test_bf16_deterministic_for_a_fixed_seed(device):
    p1, s1 = _bf16_run(device, seed=0)
    p2, s2 = _bf16_run(device, seed=0)
    assert torch.equal(p1.view(torch.int16), p2.view(torch.int16))
    assert s1["seed"] == s2["seed"]
    for key in ("exp_avg", "exp_avg_sq", "absmax_exp_avg", "absmax_exp_avg_sq"):
        assert torch.equal(s1[key], s2[key]), key
    p3, s3 = _bf16_run(device, seed=1)
    assert s3["seed"] != s1["seed"] and not torch.equal(p1.view(torch.int16), p3.view(torch.int16))


# --------------------------------------------------------------------------------------------
# state_dict: round trip and resume.
# --------------------------------------------------------------------------------------------
STATE_DICT_SHAPES = [(80, 64), (300,), (MIN_8BIT_SIZE + 3,)]


def _save_load_cpu(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu")


def _assert_states_equal(opt_a: AdamW8bit, params_a, opt_b: AdamW8bit, params_b) -> None:
    for pa, pb in zip(params_a, params_b, strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key, va in sa.items():
            vb = sb[key]
            if torch.is_tensor(va):
                assert va.dtype == vb.dtype and va.shape == vb.shape, (key, va.dtype, vb.dtype)
                assert vb.device == pb.device, key
                assert torch.equal(va.cpu().view(torch.uint8), vb.cpu().view(torch.uint8)), key
            else:
                assert type(va) is type(vb) and va == vb, key


def _params(gen, shapes, dtype, device):
    return [torch.randn(s, generator=gen).to(dtype=dtype, device=device) for s in shapes]


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_state_dict_round_trip(dtype, state_dtype, device, gen):
    """Through torch.save / torch.load(map_location="cpu") into a new optimizer on the same params:
    every state tensor bitwise equal, dtype (uint8 codes, float32 absmax and moments, also for bf16
    params) and device preserved, and the hyper-parameters restored."""
    params = _params(gen, STATE_DICT_SHAPES, dtype, device)
    opt = AdamW8bit(params, lr=2e-3, weight_decay=0.1, min_8bit_size=MIN_8BIT_SIZE, state_dtype=state_dtype)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype=dtype, device=device)
        opt.step()
    loaded = _save_load_cpu(opt.state_dict())
    opt2 = AdamW8bit(params, min_8bit_size=MIN_8BIT_SIZE, state_dtype=state_dtype)
    opt2.load_state_dict(loaded)
    _assert_states_equal(opt, params, opt2, params)
    assert opt2.param_groups[0]["lr"] == 2e-3 and opt2.param_groups[0]["weight_decay"] == 0.1
    # The loaded state is the optimizer's own: a step on it must not touch the loaded dict's tensors.
    before = _save_load_cpu(loaded)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype=dtype, device=device)
    opt2.step()
    for index, state in loaded["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(value, before["state"][index][key]), key


RESUME_STEPS = 10


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(dtype, state_dtype, device, gen):
    """10 steps, save (params + state_dict, via CPU), new params and optimizer, load, 10 more steps ==
    20 steps uninterrupted, bitwise (bf16: the stochastic rounding's seed and step come back too)."""
    init = _params(gen, STATE_DICT_SHAPES, dtype, "cpu")
    grads = [
        [torch.randn(p.shape, generator=gen).to(dtype=dtype, device=device) for p in init]
        for _ in range(2 * RESUME_STEPS)
    ]
    hyper = dict(lr=3e-3, weight_decay=0.05, min_8bit_size=MIN_8BIT_SIZE, state_dtype=state_dtype)

    def run(params, opt, step_grads):
        for gs in step_grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            opt.step()

    torch.manual_seed(0)
    full = [p.to(device, copy=True) for p in init]
    full_opt = AdamW8bit(full, **hyper)
    run(full, full_opt, grads)

    torch.manual_seed(0)
    first = [p.to(device, copy=True) for p in init]
    first_opt = AdamW8bit(first, **hyper)
    run(first, first_opt, grads[:RESUME_STEPS])
    checkpoint = _save_load_cpu({"params": [p.detach() for p in first], "optim": first_opt.state_dict()})
    del first, first_opt
    torch.manual_seed(12345)  # a resumed run must not depend on the global RNG
    resumed = [p.to(device) for p in checkpoint["params"]]
    resumed_opt = AdamW8bit(resumed, **hyper)
    resumed_opt.load_state_dict(checkpoint["optim"])
    run(resumed, resumed_opt, grads[RESUME_STEPS:])

    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    _assert_states_equal(full_opt, full, resumed_opt, resumed)


# --------------------------------------------------------------------------------------------
# Learning-rate changes.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_lr_changes_apply_at_the_next_step(state_dtype, device, gen):
    """Two optimizers on copies, same gradients. Step 3: B's lr is 0 -> B's params do not move (the
    decoupled decay lr*wd is 0 too), though its moments advance. Step 4: B's lr is 2*A's -> B's update
    is exactly twice A's (step_size doubles exactly; the moments never depend on lr)."""
    shape = (MIN_8BIT_SIZE + 50,)
    base = torch.randn(shape, generator=gen).to(device)
    pa, pb = base.clone(), base.clone()
    hyper = dict(lr=LR, weight_decay=0.0, state_dtype=state_dtype)
    opt_a, opt_b = AdamW8bit([pa], **hyper), AdamW8bit([pb], **hyper)
    grads = [torch.randn(shape, generator=gen).to(device) for _ in range(4)]
    for step, g in enumerate(grads, start=1):
        if step == 3:
            opt_b.param_groups[0]["lr"] = 0.0
        if step == 4:
            pb.copy_(pa)
            opt_b.param_groups[0]["lr"] = 2 * LR
        before = pa.clone()
        pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for key in opt_a.state[pa]:
            if torch.is_tensor(opt_a.state[pa][key]):
                assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), (step, key)
        if step < 3:
            assert torch.equal(pa, pb)
        elif step == 3:
            assert torch.equal(pb, before) and not torch.equal(pa, before)
        else:
            # Each side rounds p - u once (half an ulp of its result): beyond the exact 2x, 2 ulps.
            ulp = FP32_EPS * torch.maximum(before.abs(), torch.maximum(pa.abs(), pb.abs()))
            assert bool(((pb - before) - 2 * (pa - before)).abs().le(2 * ulp).all())


def test_weight_decay_is_decoupled_and_scaled_by_lr(device, gen):
    """A zero gradient leaves Adam's update at 0 (m = 0): the step is exactly p * (1 - lr * wd)."""
    p = torch.randn(MIN_8BIT_SIZE, generator=gen).to(device)
    expected = p * torch.tensor(1 - LR * 0.1, dtype=torch.float32)
    opt = AdamW8bit([p], lr=LR, weight_decay=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, expected)


# --------------------------------------------------------------------------------------------
# Non-finite gradients: they propagate like torch.optim.AdamW (documented in AdamW8bit).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_non_finite_gradient_poisons_its_element_then_its_block(state_dtype, bad_value, device, gen):
    """Step 1 with one bad gradient element: that param is NaN (as torch.optim.AdamW makes it), every
    other element equals a clean run. 8-bit state: the bad block's absmax is non-finite after step 1, so
    after step 2 (finite gradients) the whole block is NaN; other blocks stay equal to the clean run.
    float32 state: only the element itself stays poisoned."""
    block_size, n, bad = 256, 4 * 256, 300
    bad_block = slice(256, 512)
    base = torch.randn(n, generator=gen).to(device)
    g1 = torch.randn(n, generator=gen).to(device)
    g2 = torch.randn(n, generator=gen).to(device)
    clean, poisoned = base.clone(), base.clone()
    kw = dict(block_size=block_size, min_8bit_size=0, state_dtype=state_dtype)
    opt_clean, opt_poisoned = AdamW8bit([clean], **kw), AdamW8bit([poisoned], **kw)
    g1_bad = g1.clone()
    g1_bad[bad] = bad_value

    ref = base.clone()
    torch_opt = torch.optim.AdamW([ref])
    ref.grad = g1_bad.clone()
    torch_opt.step()
    assert bool(ref[bad].isnan()), "the premise: torch.optim.AdamW makes the element NaN"

    clean.grad, poisoned.grad = g1, g1_bad
    opt_clean.step()
    opt_poisoned.step()
    others = torch.ones(n, dtype=torch.bool, device=device)
    others[bad] = False
    assert bool(poisoned[bad].isnan())
    assert torch.equal(poisoned[others], clean[others])
    state = opt_poisoned.state[poisoned]
    if state_dtype == "dynamic8":
        for key in ("absmax_exp_avg", "absmax_exp_avg_sq"):
            absmax = state[key].cpu()
            assert not bool(absmax[1].isfinite()), key
            assert torch.equal(absmax[[0, 2, 3]], opt_clean.state[clean][key].cpu()[[0, 2, 3]]), key

    clean.grad, poisoned.grad = g2, g2.clone()
    opt_clean.step()
    opt_poisoned.step()
    if state_dtype == "dynamic8":
        assert bool(poisoned[bad_block].isnan().all()), "the whole block is poisoned"
        others[bad_block] = False
    else:
        assert bool(poisoned[bad].isnan())
    assert torch.equal(poisoned[others], clean[others])


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument or the thing.
# --------------------------------------------------------------------------------------------
BAD_CONSTRUCTOR_CASES = {
    "lr": (dict(lr=-1e-3), "lr"),
    "beta1": (dict(betas=(1.0, 0.999)), "betas"),
    "beta2": (dict(betas=(0.9, -0.1)), "betas"),
    "eps": (dict(eps=-1e-8), "eps"),
    "weight_decay": (dict(weight_decay=-0.1), "weight_decay"),
    "block_size": (dict(block_size=64), "block_size"),
    "block_size_odd": (dict(block_size=300), "block_size"),
    "state_dtype": (dict(state_dtype="int4"), "state_dtype"),
    "min_8bit_size": (dict(min_8bit_size=-1), "min_8bit_size"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTOR_CASES))
def test_bad_hyperparameters(case, device):
    kwargs, match = BAD_CONSTRUCTOR_CASES[case]
    with pytest.raises(ERRORS, match=match):
        AdamW8bit([torch.zeros(8, device=device)], **kwargs)


BAD_PARAM_CASES = {
    "complex": (torch.complex64, "complex"),
    "int64": (torch.int64, "floating"),
    "float16": (torch.float16, "float16"),
    "float64": (torch.float64, "float64"),
}


@pytest.mark.parametrize("case", list(BAD_PARAM_CASES))
def test_bad_param_dtype(case, device):
    dtype, match = BAD_PARAM_CASES[case]
    with pytest.raises(ERRORS, match=match):
        AdamW8bit([torch.zeros(8, dtype=dtype, device=device)])
    # Also when the tensor arrives later, through add_param_group.
    opt = AdamW8bit([torch.zeros(8, device=device)])
    with pytest.raises(ERRORS, match=match):
        opt.add_param_group({"params": [torch.zeros(8, dtype=dtype, device=device)]})


def test_sparse_gradient_rejected(device):
    p = torch.zeros(MIN_8BIT_SIZE, device=device)
    opt = AdamW8bit([p])
    indices, values = torch.tensor([[1, 5]]), torch.tensor([1.0, 2.0])
    p.grad = torch.sparse_coo_tensor(indices, values, (p.numel(),), check_invariants=True).to(device)
    with pytest.raises(ERRORS, match="sparse"):
        opt.step()


def _op_args(device, *, n=512, dtype=torch.float32, quantized=True, block_size=256):
    blocks = num_blocks(n, block_size)
    state_dtype = torch.uint8 if quantized else torch.float32
    return dict(
        param=torch.zeros(n, dtype=dtype, device=device),
        grad=torch.zeros(n, dtype=dtype, device=device),
        exp_avg=torch.zeros(n, dtype=state_dtype, device=device),
        exp_avg_sq=torch.zeros(n, dtype=state_dtype, device=device),
        absmax_exp_avg=torch.zeros(blocks if quantized else 0, device=device),
        absmax_exp_avg_sq=torch.zeros(blocks if quantized else 0, device=device),
        qmap_signed=ops.dynamic_qmap(True).to(device),
        qmap_unsigned=ops.dynamic_qmap(False).to(device),
        step=1,
        lr=LR,
        beta1=BETAS[0],
        beta2=BETAS[1],
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
        block_size=block_size,
        seed=0,
    )


def _bad_op_args(case: str, device) -> dict:
    a = _op_args(device)
    n = a["param"].numel()
    if case == "block_size":
        a["block_size"] = 64
    elif case == "param_float16":
        a["param"], a["grad"] = a["param"].half(), a["grad"].half()
    elif case == "param_float64":
        a["param"], a["grad"] = a["param"].double(), a["grad"].double()
    elif case == "param_strided":
        a["param"] = torch.zeros(2 * n, device=device)[::2]
    elif case == "grad_dtype":
        a["grad"] = a["grad"].bfloat16()
    elif case == "grad_size":
        a["grad"] = torch.zeros(n + 1, device=device)
    elif case == "exp_avg_size":
        a["exp_avg"] = torch.zeros(n - 1, dtype=torch.uint8, device=device)
    elif case == "exp_avg_dtype":
        a["exp_avg"] = torch.zeros(n, dtype=torch.int32, device=device)
    elif case == "exp_avg_sq_dtype":
        a["exp_avg_sq"] = torch.zeros(n, device=device)
    elif case == "absmax_size":
        a["absmax_exp_avg"] = torch.zeros(1, device=device)
    elif case == "absmax_dtype":
        a["absmax_exp_avg_sq"] = a["absmax_exp_avg_sq"].double()
    elif case == "qmap_shape":
        a["qmap_signed"] = a["qmap_signed"][:128]
    elif case == "qmap_dtype":
        a["qmap_unsigned"] = a["qmap_unsigned"].double()
    elif case == "step_0":
        a["step"] = 0
    elif case == "lr_negative":
        a["lr"] = -1.0
    elif case == "beta1_one":
        a["beta1"] = 1.0
    elif case == "beta2_negative":
        a["beta2"] = -0.5
    elif case == "eps_negative":
        a["eps"] = -1.0
    elif case == "weight_decay_negative":
        a["weight_decay"] = -1.0
    else:
        raise AssertionError(case)
    return a


BAD_OP_CASES = {
    "block_size": "block_size",
    "param_float16": "param",
    "param_float64": "param",
    "param_strided": "param",
    "grad_dtype": "grad",
    "grad_size": "grad",
    "exp_avg_size": "exp_avg",
    "exp_avg_dtype": "exp_avg",
    "exp_avg_sq_dtype": "exp_avg_sq",
    "absmax_size": "absmax_exp_avg",
    "absmax_dtype": "absmax_exp_avg_sq",
    "qmap_shape": "qmap_signed",
    "qmap_dtype": "qmap_unsigned",
    "step_0": "step",
    "lr_negative": "lr",
    "beta1_one": "beta1",
    "beta2_negative": "beta2",
    "eps_negative": "eps",
    "weight_decay_negative": "weight_decay",
}


@pytest.mark.parametrize("case", list(BAD_OP_CASES))
def test_bad_op_input_names_the_argument(case, device):
    a = _bad_op_args(case, device)
    with pytest.raises(ERRORS, match=BAD_OP_CASES[case]):
        torch.ops.llama4.adamw8bit_step(*a.values())


@pytest.mark.gpu
def test_op_rejects_state_on_another_device():
    a = _op_args("cuda")
    a["exp_avg"] = a["exp_avg"].cpu()
    with pytest.raises(ERRORS, match="exp_avg"):
        torch.ops.llama4.adamw8bit_step(*a.values())


BAD_QUANT_CASES = {
    "x_int32": r"\bx\b",
    "x_float64": r"\bx\b",
    "block_size": "block_size",
    "codes_dtype": "codes",
    "absmax_size": "absmax",
    "absmax_dtype": "absmax",
}


@pytest.mark.parametrize("case", list(BAD_QUANT_CASES))
def test_bad_quantize_input_names_the_argument(case, device):
    x = torch.zeros(300, device=device)
    codes = torch.zeros(300, dtype=torch.uint8, device=device)
    absmax = torch.zeros(2, device=device)
    with pytest.raises(ERRORS, match=BAD_QUANT_CASES[case]):
        if case == "x_int32":
            ops.quantize_blockwise(x.int())
        elif case == "x_float64":
            ops.quantize_blockwise(x.double())
        elif case == "block_size":
            ops.quantize_blockwise(x, block_size=100)
        elif case == "codes_dtype":
            ops.dequantize_blockwise(codes.float(), absmax)
        elif case == "absmax_size":
            ops.dequantize_blockwise(codes, absmax[:1])
        else:
            ops.dequantize_blockwise(codes, absmax.double())


# --------------------------------------------------------------------------------------------
# Real torch ops: opcheck, torch.compile.
# --------------------------------------------------------------------------------------------
OPCHECK_STEP_CASES = [
    # (n, param dtype, quantized)
    (300, torch.float32, True),
    (300, torch.bfloat16, True),
    (100, torch.float32, False),
    (100, torch.bfloat16, False),
]


@pytest.mark.parametrize(
    "n, dtype, quantized", OPCHECK_STEP_CASES, ids=lambda c: str(c).removeprefix("torch.") if c is not None else ""
)
def test_opcheck_step(n, dtype, quantized, device, gen):
    a = _op_args(device, n=n, dtype=dtype, quantized=quantized)
    a["param"] = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    a["grad"] = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    a["step"] = 1
    torch.library.opcheck(torch.ops.llama4.adamw8bit_step.default, tuple(a.values()))


@pytest.mark.parametrize("signed", SIGNED)
def test_opcheck_quantize_dequantize(signed, device, gen):
    x = draw(gen, 700, signed).to(device)
    q = ops.dynamic_qmap(signed).to(device)
    torch.library.opcheck(torch.ops.llama4.quantize_blockwise.default, (x, q, 256))
    codes, absmax = torch.ops.llama4.quantize_blockwise(x, q, 256)
    torch.library.opcheck(torch.ops.llama4.dequantize_blockwise.default, (codes, absmax, q, 256))


def test_compile_fullgraph_step(device, gen):
    """A captured step (the op mutating its inputs, then a quantise round trip) equals eager, bitwise."""

    def fn(a):
        torch.ops.llama4.adamw8bit_step(*a.values())
        codes, absmax = torch.ops.llama4.quantize_blockwise(a["param"], a["qmap_signed"], 256)
        return torch.ops.llama4.dequantize_blockwise(codes, absmax, a["qmap_signed"], 256)

    n = 1000
    args = _op_args(device, n=n)
    args["param"] = torch.randn(n, generator=gen).to(device)
    args["grad"] = torch.randn(n, generator=gen).to(device)
    eager = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}
    compiled = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}
    out_eager = fn(eager)
    out_compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(compiled)
    assert torch.equal(out_eager, out_compiled)
    for key, value in eager.items():
        if torch.is_tensor(value):
            assert torch.equal(value, compiled[key]), key
