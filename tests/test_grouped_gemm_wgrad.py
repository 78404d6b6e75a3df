"""engine.ops.grouped_gemm_wgrad (torch.ops.llama4.grouped_gemm_wgrad), the K-grouped weight gradient
dw[e] = dy_e^T @ x_e, against engine.ops.reference.grouped_gemm_wgrad (float64): float32 / BF16 element-wise within
tests/tolerances.py's sum bound, FP8 (per expert-and-channel scales) within DESIGN's calc_diff and exact on small
integers; empty experts exactly zero in a poisoned output buffer, one expert owning every row, ragged sizes, NaN rows
past the last group, bad input, opcheck, torch.compile; quantize_fp8_grouped (the FP8 operands' per expert-and-channel
scaling) bit-exact against its reference; on a GPU also determinism, no host synchronisation and CUDA-graph replay.
Legend: M rows (sorted by expert), N dy columns (rows of dw), K x columns, E experts, R rows of one expert.
"""

from __future__ import annotations

import re

import pytest
import torch
from cuda_graphs import capture_cuda_graph
from test_grouped_gemm import opcheck_fp8_inputs, random_group_sizes
from tolerances import FP8_GEMM_MAX_DIFF, assert_wgrad_close, calc_diff

from bench.shapes import GROUPED_GEMM_ISSUE_GROUP_SIZES, GROUPED_GEMM_TEST_K, GROUPED_GEMM_TEST_N
from engine import ops
from engine.ops import reference

FP8 = torch.float8_e4m3fn
FP8_NAN_CODE = 0x7F  # e4m3fn: S.1111.111
ERRORS = (RuntimeError, ValueError, TypeError)
# "f32" (CPU only), "bf16", "fp8": dy and x quantised per expert and channel (dy_scale [E, N], x_scale [E, K]).
KINDS = ("f32", "bf16", "fp8")
N, K = GROUPED_GEMM_TEST_N, GROUPED_GEMM_TEST_K

# Group sizes (E = len): the issue's case (two empty experts, sizes not multiples of 16), empty first / last
# experts, one expert owning every row, one row, and many experts with small and empty groups.
GROUP_CASES = {
    "issue": GROUPED_GEMM_ISSUE_GROUP_SIZES,
    "first_empty": (0, 31, 17),
    "last_empty": (40, 23, 0),
    "one_expert_all_rows": (0, 0, 300, 0),
    "one_row": (1,),
    "many_experts": tuple((7 * e) % 13 if e % 5 else 0 for e in range(64)),
}


def skip_unsupported(kind: str, device: torch.device) -> None:
    if kind == "f32" and device.type != "cpu":
        pytest.skip("float32 inputs are a CPU-only (reference-precision) path")


# --------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------
def sizes_tensor(sizes, device) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int32, device=device)


def make_inputs(kind: str, gen: torch.Generator, sizes, M: int, n: int, k: int, device) -> dict:
    """Random dy [M, N] (lognormal row magnitudes, as gradients are) and x [M, K] in the kind's dtype, as
    grouped_gemm_wgrad's keyword arguments (without the group sizes). FP8: quantised per expert and channel by
    the reference quantiser."""
    dy = torch.randn(M, n, generator=gen) * torch.exp(torch.randn(M, 1, generator=gen))
    x = torch.randn(M, k, generator=gen)
    if kind == "f32":
        args = dict(dy_MN=dy, x_MK=x)
    elif kind == "bf16":
        args = dict(dy_MN=dy.bfloat16(), x_MK=x.bfloat16())
    else:
        group_sizes_E = sizes_tensor(sizes, "cpu")
        dyq, dys = reference.quantize_fp8_grouped(dy, group_sizes_E)
        xq, xs = reference.quantize_fp8_grouped(x, group_sizes_E)
        args = dict(dy_MN=dyq, x_MK=xq, dy_scale=dys, x_scale=xs)
    return {name: t.to(device) for name, t in args.items()}


def reference_dw(args: dict, group_sizes_E: torch.Tensor) -> torch.Tensor:
    cpu = {name: t.cpu() for name, t in args.items()}
    return reference.grouped_gemm_wgrad(
        cpu["dy_MN"], cpu["x_MK"], group_sizes_E.cpu(), dy_scale=cpu.get("dy_scale"), x_scale=cpu.get("x_scale")
    )


def abs_sum_dw(args: dict, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """sum_m |dy[m, n]| |x[m, k]| per expert, float64: the scale of the summation error."""
    cpu = {name: t.cpu() for name, t in args.items()}
    return reference.grouped_gemm_wgrad(cpu["dy_MN"].double().abs(), cpu["x_MK"].double().abs(), group_sizes_E.cpu())


def assert_dw_close(kind: str, dw: torch.Tensor, args: dict, sizes) -> None:
    """float32 / BF16: the element-wise sum bound; FP8: calc_diff for the whole and for each expert. Always: every
    element finite and each empty expert's gradient exactly zero."""
    group_sizes_E = sizes_tensor(sizes, "cpu")
    ref = reference_dw(args, group_sizes_E)
    got = dw.cpu()
    assert torch.isfinite(got).all(), f"non-finite dw in experts {(~got.isfinite()).flatten(1).any(1).nonzero()}"
    for e, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(got[e], torch.zeros_like(got[e])), f"expert {e} has no rows but a non-zero gradient"
    if kind != "fp8":
        assert_wgrad_close(got, ref, abs_sum_dw(args, group_sizes_E), max(sizes))
        return
    whole = calc_diff(got, ref)
    assert whole < FP8_GEMM_MAX_DIFF, f"calc_diff {whole:.3e}"
    for e, size in enumerate(sizes):
        if size:
            d = calc_diff(got[e], ref[e])
            assert d < FP8_GEMM_MAX_DIFF, f"expert {e} ({size} rows): calc_diff {d:.3e}"


def poison_allocator(shape, dtype, device) -> int:
    """Frees a NaN-filled block of dw's size so the allocator is likely to hand it to the op's output (an op that
    leaves an element unwritten then shows NaN); returns its address."""
    poison = torch.full(shape, float("nan"), dtype=dtype, device=device)
    address = poison.data_ptr()
    del poison
    return address


def run_and_check(kind, sizes, device, gen, *, extra_rows: int = 0, n: int = N, k: int = K, out_dtype=None):
    M = sum(sizes) + extra_rows
    group_sizes_E = sizes_tensor(sizes, device)
    args = make_inputs(kind, gen, sizes, M, n, k, device)
    dtype = out_dtype or torch.float32
    poisoned = poison_allocator((len(sizes), n, k), dtype, device)
    kwargs = {} if out_dtype is None else dict(out_dtype=out_dtype)
    dw = ops.grouped_gemm_wgrad(**args, group_sizes_E=group_sizes_E, **kwargs)
    del poisoned  # usually dw's block (the allocators reuse a freed block of the same size), not guaranteed: the
    # CUDA-graph test below replays into a buffer that certainly holds an earlier gradient of a now-empty expert
    assert dw.shape == (len(sizes), n, k) and dw.dtype == dtype and dw.device.type == device.type
    assert_dw_close(kind, dw, args, sizes)
    return dw, args


# --------------------------------------------------------------------------------------------
# Against the reference.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_matches_reference(case, kind, device, gen):
    skip_unsupported(kind, device)
    run_and_check(kind, GROUP_CASES[case], device, gen)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_out(kind, device, gen):
    skip_unsupported(kind, device)
    run_and_check(kind, (37, 0, 80, 5), device, gen, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
def test_any_n_and_k_on_cpu(kind, gen):
    """The CPU kernel has no TMA alignment: odd N and K work."""
    run_and_check(kind, (13, 0, 29), torch.device("cpu"), gen, n=7, k=33)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_rows_past_the_last_group_are_never_read(kind, device, gen):
    """Rows of dy and x past sum(group_sizes) hold NaN: a kernel that reads them (into any expert) shows NaN."""
    skip_unsupported(kind, device)
    sizes = (21, 0, 50, 9)
    total = sum(sizes)
    M = total + 19
    args = make_inputs(kind, gen, sizes, M, N, K, device)
    for name in ("dy_MN", "x_MK"):
        t = args[name]
        if t.dtype == FP8:
            t.view(torch.uint8)[total:] = FP8_NAN_CODE
        else:
            t[total:] = float("nan")
    dw = ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor(sizes, device))
    assert_dw_close(kind, dw, args, sizes)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_on_small_integers(kind, device, gen):
    """Small-integer operands and power-of-two scales: every product and partial sum is exact in float32, so the
    result must equal the float64 reference bit for bit, whatever the summation order."""
    skip_unsupported(kind, device)
    sizes = (33, 0, 70, 1)
    M = sum(sizes)
    dy = torch.randint(-4, 5, (M, N), generator=gen).float()
    x = torch.randint(-4, 5, (M, K), generator=gen).float()
    if kind == "fp8":
        E = len(sizes)
        dy_scale = 2.0 ** torch.randint(-3, 4, (E, N), generator=gen).float()
        x_scale = 2.0 ** torch.randint(-3, 4, (E, K), generator=gen).float()
        args = dict(dy_MN=dy.to(FP8), x_MK=x.to(FP8), dy_scale=dy_scale, x_scale=x_scale)
    else:
        dtype = torch.float32 if kind == "f32" else torch.bfloat16
        args = dict(dy_MN=dy.to(dtype), x_MK=x.to(dtype))
    args = {name: t.to(device) for name, t in args.items()}
    dw = ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor(sizes, device))
    ref = reference_dw(args, sizes_tensor(sizes, "cpu"))
    assert torch.equal(dw.cpu().double(), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_no_rows(kind, device, gen):
    """M = 0: every expert is empty, dw is all zeros."""
    skip_unsupported(kind, device)
    sizes = (0, 0, 0)
    args = make_inputs(kind, gen, sizes, 0, N, K, device)
    dw = ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor(sizes, device))
    assert dw.shape == (3, N, K) and torch.equal(dw.cpu(), torch.zeros(3, N, K))


@pytest.mark.parametrize("kind", KINDS)
def test_all_groups_empty_with_rows(kind, device, gen):
    """M > 0 but every group size 0: no row is read and dw is all zeros (written over a poisoned buffer)."""
    skip_unsupported(kind, device)
    sizes = (0, 0)
    args = make_inputs(kind, gen, (40,), 40, N, K, device)
    args = {name: t for name, t in args.items() if not name.endswith("scale")}
    if kind == "fp8":
        args.update(dy_scale=torch.ones(2, N, device=device), x_scale=torch.ones(2, K, device=device))
    poison_allocator((2, N, K), torch.float32, device)
    dw = ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor(sizes, device))
    assert torch.equal(dw.cpu(), torch.zeros(2, N, K))


def test_matches_autograd_of_the_forward(gen):
    """grouped_gemm_wgrad is the weight gradient of grouped_gemm: compare with autograd through a float64
    per-expert formula of the forward (float32 CPU inputs)."""
    sizes = (12, 0, 25, 3)
    M, E = sum(sizes), len(sizes)
    x_MK = torch.randn(M, K, generator=gen)
    w_ENK = torch.randn(E, N, K, generator=gen, dtype=torch.float64, requires_grad=True)
    dy_MN = torch.randn(M, N, generator=gen)
    y = torch.cat([x_MK[sum(sizes[:e]) : sum(sizes[: e + 1])].double() @ w_ENK[e].T for e in range(E)])
    (y * dy_MN.double()).sum().backward()
    dw = ops.grouped_gemm_wgrad(dy_MN, x_MK, sizes_tensor(sizes, "cpu"))
    args = dict(dy_MN=dy_MN, x_MK=x_MK)
    assert_wgrad_close(dw, w_ENK.grad, abs_sum_dw(args, sizes_tensor(sizes, "cpu")), max(sizes))


# --------------------------------------------------------------------------------------------
# quantize_fp8_grouped (per expert and channel, no host synchronisation).
# --------------------------------------------------------------------------------------------
QUANT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = (FP8, torch.float8_e5m2)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dtype", QUANT_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", ["issue", "first_empty", "many_experts"])
def test_quantize_fp8_grouped_matches_reference(case, dtype, fp8_dtype, device, gen):
    """Bit-exact codes and scales against reference.quantize_fp8_grouped (the same float32 maths); rows past the
    last group are 0; an all-zero channel gets the floor scale and code 0; values far beyond the scale saturate."""
    sizes = GROUP_CASES[case]
    M = sum(sizes) + 5
    x = torch.randn(M, K, generator=gen) * torch.exp(torch.randn(1, K, generator=gen))
    x[:, 3] = 0.0
    x = x.to(dtype).to(device)
    group_sizes_E = sizes_tensor(sizes, device)
    q, s = ops.quantize_fp8_grouped(x, group_sizes_E, fp8_dtype=fp8_dtype)
    q_ref, s_ref = reference.quantize_fp8_grouped(x.cpu(), group_sizes_E.cpu(), fp8_dtype)
    assert q.dtype == fp8_dtype and q.shape == (M, K) and s.shape == (len(sizes), K) and s.dtype == torch.float32
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(q.cpu()[sum(sizes) :].view(torch.uint8), torch.zeros(5, K, dtype=torch.uint8))


def test_quantize_fp8_grouped_nan_stays_in_its_expert_and_channel(device, gen):
    """A NaN makes its own (expert, channel) scale NaN, as torch's amax does, and that expert's codes of that
    channel; nothing else changes."""
    sizes = (6, 0, 9)
    x = torch.randn(sum(sizes), K, generator=gen)
    x[8, 5] = float("nan")  # row 8 belongs to expert 2
    q, s = ops.quantize_fp8_grouped(x.to(device), sizes_tensor(sizes, device))
    s = s.cpu()
    nan = torch.zeros_like(s, dtype=torch.bool)
    nan[2, 5] = True
    assert torch.equal(s.isnan(), nan)
    q_ref, s_ref = reference.quantize_fp8_grouped(x, sizes_tensor(sizes, "cpu"))
    assert torch.equal(s[~nan], s_ref[~nan])
    q = q.cpu()
    assert q[6:, 5].float().isnan().all()  # expert 2's rows of channel 5: x / NaN
    others = torch.ones(K, dtype=torch.bool)
    others[5] = False
    assert torch.equal(q[:, others].view(torch.uint8), q_ref[:, others].view(torch.uint8))


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any launch.
# --------------------------------------------------------------------------------------------
def _bad_case(name: str, device, gen):
    sizes = (5, 0, 7)
    ok = make_inputs("bf16", gen, sizes, 12, N, K, device)
    fp8 = make_inputs("fp8", gen, sizes, 12, N, K, device)
    gs = sizes_tensor(sizes, device)
    dy, x = ok["dy_MN"], ok["x_MK"]
    cases = {
        "dy_1d": ((dy[0], x, gs), "dy must be 2-D"),
        "x_rows": ((dy, x[:11], gs), "x must have dy's M"),
        "x_dtype": ((dy, x.half(), gs), "x must have dy's dtype"),
        "dy_dtype": ((dy.half(), x.half(), gs), "dy must be bfloat16 or float8_e4m3fn"),
        "not_contiguous": ((dy.t().contiguous().t(), x, gs), "must be contiguous"),
        "sizes_dtype": ((dy, x, gs.long()), "group_sizes must be int32"),
        "sizes_2d": ((dy, x, gs[None]), "group_sizes must have shape [E]"),
        "scale_for_bf16": ((dy, x, gs, fp8["dy_scale"], fp8["x_scale"]), "apply to float8 inputs only"),
        "fp8_no_scale": ((fp8["dy_MN"], fp8["x_MK"], gs), "float8 inputs need dy_scale"),
        "fp8_bad_dy_scale": (
            (fp8["dy_MN"], fp8["x_MK"], gs, fp8["dy_scale"][:, :-1], fp8["x_scale"]),
            "dy_scale must be per expert and channel",
        ),
        "fp8_bad_x_scale": (
            (fp8["dy_MN"], fp8["x_MK"], gs, fp8["dy_scale"], fp8["x_scale"].double()),
            "x_scale must be float32",
        ),
        "out_dtype": ((dy, x, gs, None, None, torch.float16), "out_dtype must be float32"),
    }
    return cases[name]


BAD_CASES = (
    "dy_1d",
    "x_rows",
    "x_dtype",
    "dy_dtype",
    "not_contiguous",
    "sizes_dtype",
    "sizes_2d",
    "scale_for_bf16",
    "fp8_no_scale",
    "fp8_bad_dy_scale",
    "fp8_bad_x_scale",
    "out_dtype",
)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_names_the_argument(case, device, gen):
    args, message = _bad_case(case, device, gen)
    with pytest.raises(ERRORS, match=re.escape(message)):
        torch.ops.llama4.grouped_gemm_wgrad(*args)


QUANT_BAD_CASES = {
    "x_1d": (lambda x, gs: (x[0], gs, FP8), "x must be 2-D"),
    "x_int": (lambda x, gs: (x.int(), gs, FP8), "x must be float32, float16 or bfloat16"),
    "x_strided": (lambda x, gs: (x.t().contiguous().t(), gs, FP8), "x must be contiguous"),
    "sizes_dtype": (lambda x, gs: (x, gs.long(), FP8), "group_sizes must be int32"),
    "sizes_empty": (lambda x, gs: (x, gs[:0], FP8), "group_sizes must have shape [E] with E >= 1"),
    "fp8_dtype": (lambda x, gs: (x, gs, torch.bfloat16), "fp8_dtype must be torch.float8_e4m3fn or"),
}


@pytest.mark.parametrize("case", list(QUANT_BAD_CASES))
def test_quantize_bad_input_names_the_argument(case, device, gen):
    make, message = QUANT_BAD_CASES[case]
    x = torch.randn(12, K, generator=gen).to(device)
    with pytest.raises(ERRORS, match=re.escape(message)):
        torch.ops.llama4.quantize_fp8_grouped(*make(x, sizes_tensor((5, 0, 7), device)))


@pytest.mark.parametrize("sizes", [(5, 0, 12), (-1, 10, 7)], ids=["sum_above_M", "negative"])
def test_bad_group_sizes_rejected_on_cpu(sizes, gen):
    """The CPU kernel reads the sizes anyway, so it checks the contract the CUDA kernel can only clamp."""
    args = make_inputs("f32", gen, (12,), 12, N, K, "cpu")
    with pytest.raises(ValueError, match="group_sizes"):
        ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor(sizes, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize(("kind", "n", "k"), [("bf16", 100, 160), ("fp8", 96, 104)])
def test_cuda_alignment_error(kind, n, k, gen):
    sizes = (10, 6)
    args = make_inputs(kind, gen, sizes, 16, n, k, torch.device("cuda"))
    with pytest.raises(ValueError, match="multiples of"):
        ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor(sizes, "cuda"))


@pytest.mark.gpu
def test_cuda_rejects_float32_inputs(gen):
    args = make_inputs("f32", gen, (8,), 8, N, K, torch.device("cuda"))
    with pytest.raises(TypeError, match="float32 on CPU"):
        ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor((8,), "cuda"))


# --------------------------------------------------------------------------------------------
# opcheck, torch.compile.
# --------------------------------------------------------------------------------------------
def _opcheck_args(kind, gen, device, sizes=(9, 0, 23)):
    args = make_inputs(kind, gen, sizes, sum(sizes) + 3, N, K, device)
    return (args["dy_MN"], args["x_MK"], sizes_tensor(sizes, device), args.get("dy_scale"), args.get("x_scale"))


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind, device, gen):
    skip_unsupported(kind, device)
    op = torch.ops.llama4.grouped_gemm_wgrad.default
    args = _opcheck_args(kind, gen, device)
    if kind != "fp8":
        torch.library.opcheck(op, args)
        return
    opcheck_fp8_inputs(op, args)


def test_quantize_opcheck_and_compile(device, gen):
    """opcheck (float8 outputs: the utils that do not compare inputs with allclose) and torch.compile fullgraph."""
    sizes = (9, 0, 23)
    x = torch.randn(sum(sizes) + 3, K, generator=gen).bfloat16().to(device)
    group_sizes_E = sizes_tensor(sizes, device)
    torch.library.opcheck(torch.ops.llama4.quantize_fp8_grouped.default, (x, group_sizes_E, FP8))

    def fn(x_MC, group_sizes_E):
        q, s = ops.quantize_fp8_grouped(x_MC, group_sizes_E)
        return q.view(torch.uint8), s * 2.0

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, group_sizes_E), fn(x, group_sizes_E), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind, device, gen):
    skip_unsupported(kind, device)

    def fn(dy_MN, x_MK, group_sizes_E, dy_scale, x_scale):
        return ops.grouped_gemm_wgrad(dy_MN, x_MK, group_sizes_E, dy_scale=dy_scale, x_scale=x_scale) * 2.0

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    args = _opcheck_args(kind, gen, device)
    assert torch.equal(compiled(*args), fn(*args))


def test_compile_dynamic_rows(device, gen):
    """One compiled graph for several M (and group sizes that change values, not shapes)."""

    def fn(dy_MN, x_MK, group_sizes_E):
        return ops.grouped_gemm_wgrad(dy_MN, x_MK, group_sizes_E, out_dtype=torch.bfloat16)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for sizes in ((9, 0, 23), (1, 40, 2), (0, 0, 130)):
        dy_MN, x_MK, group_sizes_E, _, _ = _opcheck_args("bf16", gen, device, sizes)
        assert torch.equal(compiled(dy_MN, x_MK, group_sizes_E), fn(dy_MN, x_MK, group_sizes_E))


# --------------------------------------------------------------------------------------------
# GPU only: realistic sizes, determinism, no host synchronisation, CUDA graphs.
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_cuda_realistic_shape_and_determinism(kind, out_dtype, gen):
    """Several tiles along N and K (partial last tiles: N = 640, K = 1040), thousands of rows per expert, skewed
    groups with an empty one; bitwise repeatable."""
    device = torch.device("cuda")
    sizes = random_group_sizes(gen, 8192, 16)
    sizes[5] = 0
    sizes[0] += 8192 - sum(sizes)
    dw, args = run_and_check(kind, sizes, device, gen, n=640, k=1040, out_dtype=out_dtype)
    again = ops.grouped_gemm_wgrad(**args, group_sizes_E=sizes_tensor(sizes, device), out_dtype=out_dtype)
    assert torch.equal(dw, again)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_cuda_no_host_sync_and_graph_replay(kind, gen):
    """The group sizes never leave the device: no synchronisation under sync-debug "error", and a CUDA graph
    captured once follows new group sizes and inputs written before each replay. Expert 0 has rows in the first
    replay and none in the second, which must overwrite its non-zero gradient in the graph's output buffer with
    exact zeros (a certain poison, where the allocator-based one elsewhere is only likely)."""
    device = torch.device("cuda")
    sizes_a, sizes_b = [100, 0, 300, 57], [0, 257, 1, 199]
    M = sum(sizes_a)
    assert sum(sizes_b) == M
    args_a = make_inputs(kind, gen, sizes_a, M, 256, 512, device)
    args_b = make_inputs(kind, gen, sizes_b, M, 256, 512, device)
    args = {name: t.clone() for name, t in args_a.items()}  # the graph's static inputs
    group_sizes_E = sizes_tensor(sizes_a, device)
    ops.grouped_gemm_wgrad(**args, group_sizes_E=group_sizes_E)  # warm-up: module load, workspace, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dw = ops.grouped_gemm_wgrad(**args, group_sizes_E=group_sizes_E)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_dw_close(kind, dw, args_a, sizes_a)

    graph, captured = capture_cuda_graph(lambda: ops.grouped_gemm_wgrad(**args, group_sizes_E=group_sizes_E))
    graph.replay()  # with sizes_a: expert 0's non-zero gradient lands in the graph's output buffer
    torch.cuda.synchronize()
    assert_dw_close(kind, captured, args_a, sizes_a)
    assert captured[0].abs().sum() > 0
    for name, t in args_b.items():
        args[name].copy_(t)
    group_sizes_E.copy_(sizes_tensor(sizes_b, device))
    graph.replay()
    torch.cuda.synchronize()
    assert_dw_close(kind, captured, args_b, sizes_b)


@pytest.mark.gpu
def test_cuda_quantize_then_wgrad_matches_bf16(gen):
    """The FP8 recipe end to end on the device, with no host synchronisation: quantize_fp8_grouped(dy),
    quantize_fp8_grouped(x), FP8 wgrad, within calc_diff of the float64 gradient of the unquantised bf16 inputs."""
    device = torch.device("cuda")
    sizes = random_group_sizes(gen, 4096, 8)
    M = sum(sizes)
    dy = (torch.randn(M, 512, generator=gen) * torch.exp(torch.randn(M, 1, generator=gen))).bfloat16().to(device)
    x = torch.randn(M, 768, generator=gen).bfloat16().to(device)
    group_sizes_E = sizes_tensor(sizes, device)
    ops.quantize_fp8_grouped(dy, group_sizes_E)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dyq, dys = ops.quantize_fp8_grouped(dy, group_sizes_E)
        xq, xs = ops.quantize_fp8_grouped(x, group_sizes_E)
        dw = ops.grouped_gemm_wgrad(dyq, xq, group_sizes_E, dy_scale=dys, x_scale=xs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = reference.grouped_gemm_wgrad(dy.cpu(), x.cpu(), group_sizes_E.cpu())
    assert calc_diff(dw.cpu(), ref) < FP8_GEMM_MAX_DIFF
