"""engine.ops.grouped_gemm (torch.ops.llama4.grouped_gemm) against engine.ops.reference.grouped_gemm: BF16 and
FP8 (per-row x per-channel scales, 1x128 x 128x128 block scales) within DESIGN's calc_diff, exact on small
integers, group-size edge cases, NaN rows past the last group, bad input, opcheck, torch.compile; on a GPU
also > 2^31-element operands, no host synchronisation and CUDA-graph replay.
Legend: M rows (sorted by expert), K depth, N outputs, E experts, G = ceil(K/128), H = ceil(N/128).
"""

from __future__ import annotations

import pytest
import torch
from cuda_graphs import capture_cuda_graph
from tolerances import FP8_GEMM_MAX_DIFF, calc_diff

from bench.shapes import GROUPED_GEMM_ISSUE_GROUP_SIZES, GROUPED_GEMM_TEST_K, GROUPED_GEMM_TEST_N
from engine import ops
from engine.ops import reference

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
FP8_NAN_CODE = 0x7F  # e4m3fn: S.1111.111
AMAX_FLOOR = reference.FP8_AMAX_FLOOR
BLOCK = reference.FP8_BLOCK
ERRORS = (RuntimeError, ValueError, TypeError)
# "bf16": no scales; "fp8_row": x_scale [M] per row, w_scale [E, N] per expert and channel;
# "fp8_block": x_scale [M, G] per 1x128 block, w_scale [E, H, G] per 128x128 block.
KINDS = ("bf16", "fp8_row", "fp8_block")
N, K = GROUPED_GEMM_TEST_N, GROUPED_GEMM_TEST_K
# The CUDA kernel's TMA alignment (elements of K and N) per input dtype.
CUDA_ALIGN = {"bf16": 8, "fp8": 16}

# Group sizes (E = len): the issue's case, empty first / last experts, one expert with every row, M not a
# multiple of 16, one row, and many experts with small and empty groups.
GROUP_CASES = {
    "issue": GROUPED_GEMM_ISSUE_GROUP_SIZES,
    "first_empty": (0, 31, 17),
    "last_empty": (40, 23, 0),
    "one_expert_all_rows": (0, 0, 77, 0),
    "m_not_multiple_of_16": (5, 19, 13),
    "one_row": (1,),
    "many_experts": tuple((7 * e) % 13 if e % 5 else 0 for e in range(64)),
}


# --------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------
def sizes_tensor(sizes, device) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int32, device=device)


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows], through a uint8 view for float8 (index kernels need not cover float8 on every device)."""
    if t.dtype == FP8:
        return t.view(torch.uint8)[rows].view(FP8)
    return t[rows]


def fill_nan_rows(t: torch.Tensor, start: int) -> None:
    """t[start:] = NaN in place (float8_e4m3fn through its NaN code, which fill kernels need not support)."""
    if t.dtype == FP8:
        t.view(torch.uint8)[start:] = FP8_NAN_CODE
    else:
        t[start:] = float("nan")


def quantize_weight_channel(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert and output channel: the reference's row quantisation of w.view(E*N, K) -> ([E, N, K], [E, N])."""
    E, N_, K_ = w_ENK.shape
    q, s = reference.quantize_fp8(w_ENK.reshape(E * N_, K_), "row", FP8)
    return q.view(E, N_, K_), s.view(E, N_)


def quantize_weight_block128(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block of each expert (partial blocks at the N and K edges): scale = max(amax, floor) / 448,
    q = saturate(w / scale) -> ([E, N, K] e4m3, [E, H, G] float32)."""
    E, N_, K_ = w_ENK.shape
    H, G = -(-N_ // BLOCK), -(-K_ // BLOCK)
    padded = w_ENK.float().new_zeros(E, H * BLOCK, G * BLOCK)
    padded[:, :N_, :K_] = w_ENK.float()
    amax_EHG = padded.abs().view(E, H, BLOCK, G, BLOCK).amax(dim=(2, 4))
    scale_EHG = amax_EHG.clamp_min(AMAX_FLOOR) / FP8_MAX
    expanded = scale_EHG.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)[:, :N_, :K_]
    q = (w_ENK.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale_EHG


def make_inputs(kind: str, gen: torch.Generator, M: int, E: int, n: int, k: int, device) -> dict:
    """Random x [M, K] (lognormal row magnitudes) and w [E, N, K] (~1/sqrt(K)), bf16 or quantised to e4m3 by
    the reference quantiser, as grouped_gemm's keyword arguments (without group sizes)."""
    x = torch.randn(M, k, generator=gen) * torch.exp(torch.randn(M, 1, generator=gen))
    w = torch.randn(E, n, k, generator=gen) / k**0.5
    if kind == "bf16":
        args = dict(x_MK=x.bfloat16(), w_ENK=w.bfloat16())
    elif kind == "fp8_row":
        xq, xs = reference.quantize_fp8(x, "row", FP8)
        wq, ws = quantize_weight_channel(w)
        args = dict(x_MK=xq, w_ENK=wq, x_scale=xs, w_scale=ws)
    else:
        xq, xs = reference.quantize_fp8(x, "block128", FP8)
        wq, ws = quantize_weight_block128(w)
        args = dict(x_MK=xq, w_ENK=wq, x_scale=xs, w_scale=ws)
    return {name: t.to(device) for name, t in args.items()}


def reference_out(args: dict, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """float64 [M, N] on the CPU, computed on the dequantised inputs."""
    cpu = {name: t.cpu() for name, t in args.items()}
    return reference.grouped_gemm(
        cpu["x_MK"],
        cpu["w_ENK"],
        group_sizes_E.cpu(),
        x_scale=cpu.get("x_scale"),
        w_scale=cpu.get("w_scale"),
    )


def row_diffs(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """DESIGN's calc_diff applied to each row (0 where both rows are 0), float64 [rows]."""
    x, y = out.double(), ref.double()
    denominator = (x * x + y * y).sum(1)
    diff = 1.0 - 2.0 * (x * y).sum(1) / denominator
    return torch.where(denominator == 0, torch.zeros_like(diff), diff)


def assert_gemm_close(out: torch.Tensor, ref: torch.Tensor, group_sizes) -> None:
    """calc_diff < FP8_GEMM_MAX_DIFF over the rows of the groups, for the whole, for each group and for each
    row (a single wrong row of a large group barely moves the whole's metric); every compared row finite.
    Rows past sum(group_sizes) are unspecified and never compared."""
    sizes = [int(s) for s in group_sizes]
    total = sum(sizes)
    got, want = out[:total].cpu().double(), ref[:total]
    assert torch.isfinite(got).all(), (
        f"non-finite values in rows {got.isfinite().all(1).logical_not().nonzero()[:8].flatten().tolist()}"
    )
    whole = calc_diff(got, want)
    assert whole < FP8_GEMM_MAX_DIFF, f"calc_diff {whole:.3e}"
    start = 0
    for e, size in enumerate(sizes):
        d = calc_diff(got[start : start + size], want[start : start + size])
        assert d < FP8_GEMM_MAX_DIFF, f"expert {e} (rows {start}..{start + size}): calc_diff {d:.3e}"
        start += size
    if total:
        per_row = row_diffs(got, want)
        worst = int(per_row.argmax())
        assert per_row[worst] < FP8_GEMM_MAX_DIFF, f"row {worst}: calc_diff {per_row[worst].item():.3e}"


def run_and_check(kind, sizes, device, gen, *, extra_rows: int = 0, n: int = N, k: int = K, out_dtype=None):
    M = sum(sizes) + extra_rows
    group_sizes_E = sizes_tensor(sizes, device)
    args = make_inputs(kind, gen, M, len(sizes), n, k, device)
    kwargs = {} if out_dtype is None else dict(out_dtype=out_dtype)
    out = ops.grouped_gemm(**args, group_sizes_E=group_sizes_E, **kwargs)
    assert out.shape == (M, n) and out.device.type == device.type
    assert out.dtype == (out_dtype or torch.bfloat16)
    assert_gemm_close(out, reference_out(args, group_sizes_E), sizes)
    return out, args


# --------------------------------------------------------------------------------------------
# Against the reference.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_matches_reference(case, kind, device, gen):
    run_and_check(kind, GROUP_CASES[case], device, gen)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_out_on_cpu(kind, gen):
    """CPU also writes float32 (no final bf16 rounding)."""
    run_and_check(kind, GROUP_CASES["issue"], torch.device("cpu"), gen, out_dtype=torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_any_k_and_n_on_cpu(kind, gen):
    """The CPU kernel takes any K and N (odd, below and above one 128 block)."""
    run_and_check(kind, (13, 0, 40), torch.device("cpu"), gen, n=50, k=131)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_rows_past_the_last_group_do_not_leak(kind, device, gen):
    """Rows of x past sum(group_sizes) hold NaN (and NaN scales): the rows of the groups stay finite and
    correct."""
    sizes = GROUP_CASES["issue"]
    total, pad = sum(sizes), 29
    group_sizes_E = sizes_tensor(sizes, device)
    args = make_inputs(kind, gen, total + pad, len(sizes), N, K, device)
    fill_nan_rows(args["x_MK"], total)
    assert args["x_MK"][total:].cpu().float().isnan().all()
    if "x_scale" in args:
        fill_nan_rows(args["x_scale"], total)
    out = ops.grouped_gemm(**args, group_sizes_E=group_sizes_E)
    assert out.shape == (total + pad, N)
    ref = reference_out({**args, "x_MK": args["x_MK"][:total], **_head(args, "x_scale", total)}, group_sizes_E)
    assert_gemm_close(out, ref, sizes)


def _head(args: dict, name: str, rows: int) -> dict:
    return {name: args[name][:rows]} if name in args else {}


# --------------------------------------------------------------------------------------------
# Exact on small integers: the float32 accumulation is exact, so the kernel's one rounding of the exact
# sum to bfloat16 equals the reference's.
# --------------------------------------------------------------------------------------------
# bf16 and per-row/channel scales: |x|, |w| <= 2 and K = 48 give |sum| <= 192 < 256, exact in bfloat16 too;
# the scales are powers of two, so scaling is exact as well.
EXACT_INT_MAX = 2
EXACT_K = 48
# Block scales: |x|, |w| <= 1 over K = 160 (a full and a partial 1x128 block) and N = 144 (a full and a partial
# 128-row block of w), partial sums <= 128 per block.
EXACT_BLOCK_N, EXACT_BLOCK_K = 144, 160
POW2_SCALES = torch.tensor([0.25, 0.5, 1.0, 2.0])


def small_ints(gen, shape, bound) -> torch.Tensor:
    return torch.randint(-bound, bound + 1, shape, generator=gen).float()


def pow2(gen, shape) -> torch.Tensor:
    return POW2_SCALES[torch.randint(len(POW2_SCALES), shape, generator=gen)]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_on_small_integers(kind, device, gen):
    sizes = GROUP_CASES["issue"]
    M, E = sum(sizes), len(sizes)
    if kind == "fp8_block":
        n, k = EXACT_BLOCK_N, EXACT_BLOCK_K
        x, w = small_ints(gen, (M, k), 1), small_ints(gen, (E, n, k), 1)
        scales = dict(x_scale=pow2(gen, (M, -(-k // BLOCK))), w_scale=pow2(gen, (E, -(-n // BLOCK), -(-k // BLOCK))))
    else:
        n, k = N, EXACT_K
        x, w = small_ints(gen, (M, k), EXACT_INT_MAX), small_ints(gen, (E, n, k), EXACT_INT_MAX)
        scales = {} if kind == "bf16" else dict(x_scale=pow2(gen, (M,)), w_scale=pow2(gen, (E, n)))
    dtype = torch.bfloat16 if kind == "bf16" else FP8
    args = dict(x_MK=x.to(dtype), w_ENK=w.to(dtype), **scales)
    assert torch.equal(args["x_MK"].float(), x) and torch.equal(args["w_ENK"].float(), w)
    group_sizes_E = sizes_tensor(sizes, device)
    ref = reference_out(args, group_sizes_E)
    assert ref.abs().max() > 0
    out = ops.grouped_gemm(**{name: t.to(device) for name, t in args.items()}, group_sizes_E=group_sizes_E)
    assert torch.equal(out.cpu(), ref.to(torch.bfloat16)), f"max |diff| {(out.cpu().double() - ref).abs().max()}"
    if device.type == "cpu":
        out32 = ops.grouped_gemm(**args, group_sizes_E=group_sizes_E, out_dtype=torch.float32)
        assert torch.equal(out32, ref.float())


# --------------------------------------------------------------------------------------------
# Empty problems.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_no_rows(kind, device, gen):
    """M = 0 (every group empty): out is [0, N]."""
    E = 4
    args = make_inputs(kind, gen, 0, E, N, K, device)
    out = ops.grouped_gemm(**args, group_sizes_E=torch.zeros(E, dtype=torch.int32, device=device))
    assert out.shape == (0, N) and out.dtype == torch.bfloat16 and out.device.type == device.type


@pytest.mark.parametrize("kind", KINDS)
def test_all_groups_empty_with_rows(kind, device, gen):
    """M > 0 but every group empty: nothing is computed (no row is defined) and nothing fails, even with NaN
    rows in x."""
    E, M = 3, 40
    args = make_inputs(kind, gen, M, E, N, K, device)
    fill_nan_rows(args["x_MK"], 0)
    out = ops.grouped_gemm(**args, group_sizes_E=torch.zeros(E, dtype=torch.int32, device=device))
    assert out.shape == (M, N) and out.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# --------------------------------------------------------------------------------------------
def _bad_call(case: str, device: torch.device, gen: torch.Generator) -> dict:
    """grouped_gemm's keyword arguments of one bad call."""
    sizes = (5, 0, 11)
    M, E = sum(sizes), len(sizes)
    bf16 = make_inputs("bf16", gen, M, E, N, K, device)
    fp8 = make_inputs("fp8_row", gen, M, E, N, K, device)
    fp8_block = make_inputs("fp8_block", gen, M, E, N, K, device)
    group_sizes_E = sizes_tensor(sizes, device)
    base = dict(**bf16, group_sizes_E=group_sizes_E)
    if case == "x_3d":
        return base | dict(x_MK=bf16["x_MK"].view(1, M, K))
    if case == "x_float16":  # float32 is the CPU reference-precision path; float16 is never accepted
        return base | dict(x_MK=bf16["x_MK"].half(), w_ENK=bf16["w_ENK"].half())
    if case == "x_e5m2":
        return dict(fp8, group_sizes_E=group_sizes_E) | dict(x_MK=fp8["x_MK"].view(torch.float8_e5m2))
    if case == "x_not_contiguous":
        return base | dict(x_MK=torch.randn(K, M, generator=gen).bfloat16().to(device).t())
    if case == "w_2d":
        return base | dict(w_ENK=bf16["w_ENK"][0])
    if case == "w_dtype_mismatch":
        return base | dict(w_ENK=fp8["w_ENK"])
    if case == "w_k_mismatch":
        return base | dict(w_ENK=bf16["w_ENK"][:, :, : K - 16].contiguous())
    if case == "w_not_contiguous":
        return base | dict(w_ENK=bf16["w_ENK"].transpose(1, 2).contiguous().transpose(1, 2))
    if case == "group_sizes_int64":
        return base | dict(group_sizes_E=group_sizes_E.long())
    if case == "group_sizes_wrong_length":
        return base | dict(group_sizes_E=sizes_tensor((*sizes, 0), device))
    if case == "group_sizes_2d":
        return base | dict(group_sizes_E=group_sizes_E.view(1, E))
    if case == "fp8_without_scales":
        return dict(x_MK=fp8["x_MK"], w_ENK=fp8["w_ENK"], group_sizes_E=group_sizes_E)
    if case == "fp8_without_w_scale":
        return dict(fp8, group_sizes_E=group_sizes_E, w_scale=None)
    if case == "bf16_with_scales":
        return base | dict(x_scale=fp8["x_scale"], w_scale=fp8["w_scale"])
    if case == "x_scale_shape":
        return dict(fp8, group_sizes_E=group_sizes_E) | dict(x_scale=fp8["x_scale"][:-1])
    if case == "x_scale_block_shape":
        return dict(fp8_block, group_sizes_E=group_sizes_E) | dict(x_scale=fp8_block["x_scale"][:, :1].contiguous())
    if case == "x_scale_float64":
        return dict(fp8, group_sizes_E=group_sizes_E) | dict(x_scale=fp8["x_scale"].double())
    if case == "w_scale_shape":
        return dict(fp8, group_sizes_E=group_sizes_E) | dict(w_scale=fp8["w_scale"][:, :-1].contiguous())
    if case == "w_scale_mixed_kinds":  # per-row x_scale with 128x128 w_scale
        return dict(fp8, group_sizes_E=group_sizes_E) | dict(w_scale=fp8_block["w_scale"])
    if case == "out_dtype":
        return base | dict(out_dtype=torch.float16)
    raise AssertionError(case)


BAD_CASES = {
    "x_3d": r"\bx\b",
    "x_float16": r"\bx\b",
    "x_e5m2": r"\bx\b",
    "x_not_contiguous": r"\bx\b",
    "w_2d": r"\bw\b",
    "w_dtype_mismatch": r"\bw\b",
    "w_k_mismatch": r"\bw\b",
    "w_not_contiguous": r"\bw\b",
    "group_sizes_int64": "group_sizes",
    "group_sizes_wrong_length": "group_sizes",
    "group_sizes_2d": "group_sizes",
    "fp8_without_scales": "x_scale",
    "fp8_without_w_scale": "w_scale",
    "bf16_with_scales": "x_scale",
    "x_scale_shape": "x_scale",
    "x_scale_block_shape": "x_scale",
    "x_scale_float64": "x_scale",
    "w_scale_shape": "w_scale",
    "w_scale_mixed_kinds": "w_scale",
    "out_dtype": "out_dtype",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_the_argument(case, device, gen):
    kwargs = _bad_call(case, device, gen)
    with pytest.raises(ERRORS, match=BAD_CASES[case]):
        ops.grouped_gemm(**kwargs)


@pytest.mark.parametrize("sizes", [(5, 0, 12), (-1, 10, 7)], ids=["sum_above_M", "negative"])
def test_bad_group_sizes_rejected_on_cpu(sizes, gen):
    """On the CPU the values are checked: a sum past M or a negative size is an error naming group_sizes.
    (On CUDA they stay on the device: the caller's contract, and the kernel never touches rows past M.)"""
    M = 16
    args = make_inputs("bf16", gen, M, len(sizes), N, K, torch.device("cpu"))
    with pytest.raises(ERRORS, match="group_sizes"):
        ops.grouped_gemm(**args, group_sizes_E=sizes_tensor(sizes, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind, n, k",
    [("fp8_row", 96, 152), ("fp8_row", 104, 160), ("fp8_block", 96, 136), ("bf16", 96, 164), ("bf16", 100, 160)],
    ids=["fp8-K152", "fp8-N104", "fp8block-K136", "bf16-K164", "bf16-N100"],
)
def test_cuda_alignment_error(kind, n, k, gen):
    """K or N not a multiple of 16 (FP8) / 8 (BF16): a clear error naming the requirement, no device assert."""
    device = torch.device("cuda")
    sizes = (7, 9)
    args = make_inputs(kind, gen, sum(sizes), len(sizes), n, k, device)
    align = CUDA_ALIGN["bf16" if kind == "bf16" else "fp8"]
    with pytest.raises(ERRORS, match=rf"\b{align}\b"):
        ops.grouped_gemm(**args, group_sizes_E=sizes_tensor(sizes, device))
    torch.cuda.synchronize()  # the context is still healthy


@pytest.mark.gpu
def test_cuda_rejects_float32_out_and_cpu_group_sizes(gen):
    device = torch.device("cuda")
    sizes = (7, 9)
    args = make_inputs("bf16", gen, sum(sizes), len(sizes), N, K, device)
    with pytest.raises(ERRORS, match="out_dtype"):
        ops.grouped_gemm(**args, group_sizes_E=sizes_tensor(sizes, device), out_dtype=torch.float32)
    with pytest.raises(ERRORS, match="group_sizes"):
        ops.grouped_gemm(**args, group_sizes_E=sizes_tensor(sizes, "cpu"))


# --------------------------------------------------------------------------------------------
# A real torch op: opcheck, torch.compile.
# --------------------------------------------------------------------------------------------
# opcheck's test_schema compares inputs with torch.allclose, which torch lacks for float8: fp8 runs the other
# utils and a bitwise check that no input is mutated.
OPCHECK_UTILS_FP8_INPUTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_fp8_inputs(op, args: tuple) -> None:
    """opcheck without test_schema (OPCHECK_UTILS_FP8_INPUTS), then the check it would have made: one call
    mutates no input, bit for bit (float8 compared as bytes)."""
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS_FP8_INPUTS)
    before = [None if t is None else t.clone() for t in args]
    op(*args)
    for t, b in zip(args, before, strict=True):
        if t is not None:
            assert torch.equal(t.view(torch.uint8), b.view(torch.uint8)) if t.element_size() == 1 else torch.equal(t, b)


def _opcheck_args(kind, gen, device, sizes=(9, 0, 23)):
    """Group sizes summing to exactly M, so every row of the output is defined."""
    args = make_inputs(kind, gen, sum(sizes), len(sizes), N, K, device)
    return (args["x_MK"], args["w_ENK"], sizes_tensor(sizes, device), args.get("x_scale"), args.get("w_scale"))


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind, device, gen):
    op = torch.ops.llama4.grouped_gemm.default
    args = _opcheck_args(kind, gen, device)
    if kind == "bf16":
        torch.library.opcheck(op, args)
        return
    opcheck_fp8_inputs(op, args)


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind, device, gen):
    def fn(x_MK, w_ENK, group_sizes_E, x_scale, w_scale):
        out = ops.grouped_gemm(x_MK, w_ENK, group_sizes_E, x_scale=x_scale, w_scale=w_scale)
        return out.float() * 2.0

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    args = _opcheck_args(kind, gen, device)
    assert torch.equal(compiled(*args), fn(*args))


def test_compile_dynamic_rows(device, gen):
    """One compiled graph for several M (and group sizes that change values, not shapes)."""

    def fn(x_MK, w_ENK, group_sizes_E):
        return ops.grouped_gemm(x_MK, w_ENK, group_sizes_E) * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for sizes in ((9, 0, 23), (1, 40, 2), (0, 0, 130)):
        x_MK, w_ENK, group_sizes_E, _, _ = _opcheck_args("bf16", gen, device, sizes)
        assert torch.equal(compiled(x_MK, w_ENK, group_sizes_E), fn(x_MK, w_ENK, group_sizes_E))


# --------------------------------------------------------------------------------------------
# GPU only: realistic sizes, > 2^31-element operands, no host synchronisation, CUDA graphs.
# --------------------------------------------------------------------------------------------
def random_group_sizes(gen: torch.Generator, M: int, E: int) -> list[int]:
    """Top-1 routing of M rows over E experts with a skewed (lognormal) popularity; some experts may get 0."""
    probs = torch.exp(torch.randn(E, generator=gen))
    ids = torch.multinomial(probs / probs.sum(), M, replacement=True, generator=gen)
    return torch.bincount(ids, minlength=E).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_realistic_shape_and_determinism(kind, gen):
    """Several tiles along M, N and K (K = 1024: 8 scale blocks), skewed groups; bitwise repeatable."""
    device = torch.device("cuda")
    sizes = random_group_sizes(gen, 4096, 16)
    out, args = run_and_check(kind, sizes, device, gen, n=512, k=1024)
    again = ops.grouped_gemm(**args, group_sizes_E=sizes_tensor(sizes, device))
    total = sum(sizes)
    assert torch.equal(out[:total], again[:total])


BIG_ROWS = 2**17 + 48  # with N or K = 16384: more than 2^31 elements
BIG_WIDTH = 16384
BIG_SMALL_DIM = 128


def _sampled_rows(sizes: list[int], width: int = BIG_WIDTH) -> list[int]:
    """First and last row of each group, and the rows around element 2^31 of a [*, width] tensor."""
    rows, start = set(), 0
    for size in sizes:
        if size:
            rows |= {start, start + size - 1}
        start += size
    boundary = 2**31 // width
    rows |= {boundary - 1, boundary, boundary + 1, start - 1}
    return sorted(r for r in rows if 0 <= r < start)


def _check_sampled_rows(out, args, sizes) -> None:
    """calc_diff of each sampled row against float64 on the CPU (the full reference would be 2^31 doubles)."""
    rows = _sampled_rows(sizes)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = take_rows(args["x_MK"], rows).cpu().double()
    if "x_scale" in args:
        x = x * args["x_scale"][rows].cpu().double()[:, None]
    for i, r in enumerate(rows):
        e = int(owner[r])
        w = args["w_ENK"][e].cpu().double()
        if "w_scale" in args:
            w = w * args["w_scale"][e].cpu().double()[:, None]
        want = x[i] @ w.T
        got = out[r].cpu().double()
        assert torch.isfinite(got).all(), f"row {r}"
        d = calc_diff(got, want)
        assert d < FP8_GEMM_MAX_DIFF, f"row {r} (expert {e}): calc_diff {d:.3e}"


def _big_inputs(kind: str, M: int, E: int, n: int, k: int, device: str = "cuda") -> dict:
    """Drawn on the device (billions of host normals would take minutes); fp8 with per-row/channel scales."""
    gen = torch.Generator(device=device).manual_seed(M + n + k)
    x = torch.randn(M, k, generator=gen, device=device, dtype=torch.bfloat16)
    w = torch.randn(E, n, k, generator=gen, device=device, dtype=torch.bfloat16) / k**0.5
    if kind == "bf16":
        return dict(x_MK=x, w_ENK=w)
    # randn codes (|v| < 448, e4m3 rounds them) with scales ~1 and ~1/sqrt(K): the dequantised inputs are
    # what the reference multiplies, whatever the codes.
    x_scale = torch.rand(M, generator=gen, device=device) + 0.5
    w_scale = (torch.rand(E, n, generator=gen, device=device) + 0.5) / k**0.5
    return dict(x_MK=x.to(FP8), w_ENK=(w * k**0.5).to(FP8), x_scale=x_scale, w_scale=w_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp8_row"])
@pytest.mark.parametrize("big", ["out", "x"])
def test_cuda_more_than_2_31_elements(big, kind):
    """out [M, 16384] (4.3 GB bf16) or x [M, 16384] with M = 2^17 + 48: more than 2^31 elements, so every
    offset must be 64-bit. Rows past element 2^31 are checked against float64 on the CPU."""
    M, E = BIG_ROWS, 4
    n, k = (BIG_WIDTH, BIG_SMALL_DIM) if big == "out" else (BIG_SMALL_DIM, BIG_WIDTH)
    sizes = [M // 4 - 16, M // 4 + 16, 0, M - 2 * (M // 4)]
    args = _big_inputs(kind, M, E, n, k)
    assert max(args["x_MK"].numel(), M * n) > 2**31
    out = ops.grouped_gemm(**args, group_sizes_E=sizes_tensor(sizes, "cuda"))
    assert out.shape == (M, n)
    _check_sampled_rows(out, args, sizes)
    del out, args
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_no_host_sync_and_graph_replay(kind, gen):
    """The group sizes never leave the device: no synchronisation under sync-debug "error", and a CUDA graph
    captured once follows new group sizes written into the same tensor before replay."""
    device = torch.device("cuda")
    sizes_a, sizes_b = [100, 0, 300, 57], [0, 257, 1, 199]
    M = sum(sizes_a)
    assert sum(sizes_b) == M
    args = make_inputs(kind, gen, M, len(sizes_a), 256, 512, device)
    group_sizes_E = sizes_tensor(sizes_a, device)
    ops.grouped_gemm(**args, group_sizes_E=group_sizes_E)  # warm-up: module load, workspace, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.grouped_gemm(**args, group_sizes_E=group_sizes_E)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_gemm_close(out, reference_out(args, group_sizes_E), sizes_a)

    graph, captured = capture_cuda_graph(lambda: ops.grouped_gemm(**args, group_sizes_E=group_sizes_E))
    group_sizes_E.copy_(sizes_tensor(sizes_b, device))
    graph.replay()
    torch.cuda.synchronize()
    assert_gemm_close(captured, reference_out(args, group_sizes_E), sizes_b)


def test_float32_inputs_on_cpu_give_float32(gen):
    """The CPU path also takes float32 (the MoE layer's reference-precision mode) and returns float32."""
    sizes = [5, 0, 9, 2]
    x_MK = torch.randn(16, 24, generator=gen)
    w_ENK = torch.randn(4, 8, 24, generator=gen)
    group_sizes_E = torch.tensor(sizes, dtype=torch.int32)
    out = ops.grouped_gemm(x_MK, w_ENK, group_sizes_E)
    assert out.dtype == torch.float32
    expected = reference.grouped_gemm(x_MK, w_ENK, group_sizes_E)
    torch.testing.assert_close(out[: sum(sizes)].double(), expected[: sum(sizes)], rtol=1e-5, atol=1e-5)
