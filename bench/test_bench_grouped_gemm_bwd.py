"""Benchmarks of the expert GEMMs' backward: dgrad (dx = dy @ w[e], the forward grouped_gemm on the transposed
weights) and wgrad (dw[e] = dy_e^T @ x_e, grouped_gemm_wgrad), FP8 and BF16, at the Scout prefill shapes, against
torch._grouped_mm / torch._scaled_grouped_mm in the same run; and quantize_fp8_grouped (wgrad's FP8 operands,
memory-bound) against the same maths in plain torch.

Legend: M routed rows (sorted by expert), N forward output width (dy's columns), K forward depth (x's columns),
E experts. Every case is named by its forward GEMM (bench.shapes' GroupedGemmShape): dgrad computes [M, K] from
[M, N] and w^T [E, K, N]; wgrad computes [E, N, K] from dy [M, N] and x [M, K]. FLOPs 2 * M * N * K either way.
Targets (issue 4, FP8 Scout): dgrad >= 1200 TFLOP/s, wgrad >= 900 TFLOP/s (DeepGEMM: 1236 dgrad, 457-1044 wgrad).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench import harness
from bench.shapes import (
    FP8_QUANT_BENCH,
    FP8_QUANT_BENCH_CPU,
    GROUPED_GEMM_BENCH_CPU,
    GROUPED_GEMM_PREFILL,
    GroupedGemmShape,
)
from bench.test_bench_fp8 import (
    ACT_DTYPE,
    BF16_BYTES,
    FP8,
    FP8_BYTES,
    QUANT_TARGET_PCT_OF_CEILING,
    SCALE_BYTES,
    balanced_group_sizes,
    baseline_fields,
    check_sampled_rows,
    checked_gemm,
    gemm_fields,
    record_gemm,
    reference_fields,
    time_baselines,
    torch_grouped_baseline,
)
from engine import ops
from engine.ops import reference

SEED = 0
FP8_DGRAD_TARGET_TFLOPS = 1200.0
FP8_WGRAD_TARGET_TFLOPS = 900.0
BF16_TARGET_SPEEDUP = 1.1  # vs torch._grouped_mm in the same run
# The Scout expert GEMMs at 16384 routed rows (gate_up: N = 2F, K = D; down: N = D, K = F).
BWD_SHAPES_CUDA = [s for s in GROUPED_GEMM_PREFILL if s.name.startswith("scout") and s.rows == 16384]
# wgrad correctness before timing: this many experts, this many rows of dw[e] each, against float64.
CHECK_EXPERTS = 4
CHECK_ROWS = 64
MAX_CALC_DIFF = 1e-3  # DESIGN's FP8 GEMM metric (BF16 passes it by orders of magnitude)
# Group sizes rounded to this many rows for wgrad, so torch's K-grouped baselines (TMA: 16-byte aligned group
# offsets in the reduction) can run; ours pads on the device and takes any sizes.
BASELINE_GROUP_ALIGN = 16


# --bench-quick (make gpu-check) keeps one projection per pass: dgrad of gate_up (dx [M, D], the N = D) and
# wgrad of down (dw [E, D, F]) with a float32 result; the full run times both projections and both dw dtypes.
QUICK_DGRAD = "scout-gate_up"
QUICK_WGRAD = "scout-down"


def skip_if_quick(request, device: str, shape: GroupedGemmShape, keep: str, out_dtype=torch.float32) -> None:
    if (
        device == "cuda"
        and request.config.getoption("--bench-quick")
        and (shape.name != keep or out_dtype != torch.float32)
    ):
        pytest.skip(f"--bench-quick times only {keep} (float32 dw)")


def _cases(kinds: tuple[str, ...]) -> list:
    cpu = [pytest.param("cpu", k, s, id=f"cpu-{k}-{s.id}") for s in GROUPED_GEMM_BENCH_CPU for k in kinds]
    cuda = [
        pytest.param("cuda", k, s, id=f"cuda-{k}-{s.id}", marks=pytest.mark.gpu) for s in BWD_SHAPES_CUDA for k in kinds
    ]
    return cpu + cuda


def _targets(kind: str, fp8_target: float) -> dict:
    return {"target_tflops": fp8_target} if kind == "fp8" else {"target_speedup": BF16_TARGET_SPEEDUP}


# --------------------------------------------------------------------------------------------
# dgrad: the forward kernel on w^T (N and K swapped), exactly what engine/moe.py runs.
# --------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="grouped_gemm_dgrad")
@pytest.mark.parametrize("device, kind, shape", _cases(("fp8", "bf16")))
def test_grouped_gemm_dgrad(benchmark, request, device, kind, shape, budget, ceilings):
    skip_if_quick(request, device, shape, QUICK_DGRAD)
    E, M, N, K = shape.experts, shape.rows, shape.n, shape.k
    sizes = balanced_group_sizes(M, E)
    dgrad = GroupedGemmShape(f"{shape.name}-dgrad", E, M, K, N)  # out [M, K] = dy [M, N] @ w[e] (w^T: [E, K, N])
    args, group_sizes_E, run_ours = checked_gemm(kind, sizes, M, E, dgrad.n, dgrad.k, device)
    b = budget
    label = f"grouped_gemm_dgrad.{kind}.{shape.id}"
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"{label}.ours")
    extra: dict = {}
    if device == "cuda":
        baselines, missing = torch_grouped_baseline(kind, args, sizes)
        timed = time_baselines(baselines, lambda out: check_sampled_rows(out, args, sizes), device, b, label)
        extra |= baseline_fields(timed, missing, label) | _targets(kind, FP8_DGRAD_TARGET_TFLOPS)
    else:
        extra |= reference_fields("grouped_gemm", args, group_sizes_E, device, b, label)
    fields = gemm_fields(device, dgrad, kind, sizes)
    record_gemm(benchmark, ceilings, budget, device, t_ours, run_ours, args, dgrad.flops, extra, fields)


# --------------------------------------------------------------------------------------------
# wgrad: grouped_gemm_wgrad (float32 dw by default; bfloat16 too, the dtype torch's baselines return).
# --------------------------------------------------------------------------------------------
def aligned_group_sizes(M: int, E: int) -> list[int]:
    """balanced_group_sizes rounded down to multiples of BASELINE_GROUP_ALIGN, the remainder on the last expert
    (itself a multiple when M is)."""
    sizes = [s // BASELINE_GROUP_ALIGN * BASELINE_GROUP_ALIGN for s in balanced_group_sizes(M, E)]
    sizes[-1] += M - sum(sizes)
    return sizes


def make_wgrad_inputs(kind: str, sizes: list[int], M: int, N: int, K: int, device: str) -> dict:
    """dy [M, N] and x [M, K] (randn, bf16); FP8: quantised per expert and channel by quantize_fp8_grouped."""
    gen = torch.Generator(device=device).manual_seed(SEED + M + N + K)
    dy = torch.randn(M, N, generator=gen, device=device, dtype=ACT_DTYPE)
    x = torch.randn(M, K, generator=gen, device=device, dtype=ACT_DTYPE)
    group_sizes_E = torch.tensor(sizes, dtype=torch.int32, device=device)
    if kind == "bf16":
        return dict(dy_MN=dy, x_MK=x, group_sizes_E=group_sizes_E)
    dyq, dys = ops.quantize_fp8_grouped(dy, group_sizes_E)
    del dy
    xq, xs = ops.quantize_fp8_grouped(x, group_sizes_E)
    return dict(dy_MN=dyq, x_MK=xq, group_sizes_E=group_sizes_E, dy_scale=dys, x_scale=xs)


def check_wgrad(dw_ENK: torch.Tensor, args: dict, sizes: list[int]) -> None:
    """CHECK_ROWS rows of dw[e] for up to CHECK_EXPERTS non-empty experts against float64 on dequantised inputs."""
    starts = [sum(sizes[:e]) for e in range(len(sizes))]
    N = args["dy_MN"].shape[1]
    rows_n = torch.randperm(N, generator=torch.Generator().manual_seed(SEED))[:CHECK_ROWS].to(dw_ENK.device)
    for e in [e for e, size in enumerate(sizes) if size][:CHECK_EXPERTS]:
        lo, hi = starts[e], starts[e] + sizes[e]
        dy = args["dy_MN"][lo:hi].float()[:, rows_n].double()
        x = args["x_MK"][lo:hi].float().double()
        if "dy_scale" in args:
            dy = dy * args["dy_scale"][e, rows_n].double()
            x = x * args["x_scale"][e].double()
        want, got = dy.T @ x, dw_ENK[e, rows_n].double()
        diff = 1.0 - 2.0 * (got * want).sum() / (got * got + want * want).sum()
        assert torch.isfinite(got).all() and diff < MAX_CALC_DIFF, f"wgrad expert {e}: calc_diff {diff.item():.3e}"


def torch_wgrad_baseline(kind: str, args: dict, sizes: list[int]) -> tuple[dict[str, Callable], str | None]:
    """torch's K-grouped GEMMs (2-D x 2-D with offs -> [E, N, K] bfloat16) on the same operands, given in the
    layout they need (dy^T row-major, x column-major; the FP8 transposes are made here, outside the timing)."""
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32).to(args["dy_MN"].device)
    if kind == "bf16":
        if not hasattr(torch, "_grouped_mm"):
            return {}, f"torch {torch.__version__} has no torch._grouped_mm"
        dy_t = args["dy_MN"].t().contiguous()  # [N, M], the reduction contiguous
        x = args["x_MK"]
        x_col = x.t().contiguous().t()  # the same [M, K], column-major (the layout torch may require of mat_b)
        return {
            "torch._grouped_mm": lambda: torch._grouped_mm(dy_t, x, offs=offs),
            "torch._grouped_mm(x column-major)": lambda: torch._grouped_mm(dy_t, x_col, offs=offs),
        }, None
    if not hasattr(torch, "_scaled_grouped_mm"):
        return {}, f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    dy_t = args["dy_MN"].view(torch.uint8).t().contiguous().view(FP8)  # [N, M]
    x_col = args["x_MK"].view(torch.uint8).t().contiguous().view(FP8).t()  # [M, K], column-major
    dys, xs = args["dy_scale"].reshape(-1), args["x_scale"].reshape(-1)

    def scaled(fast: bool) -> Callable:
        return lambda: torch._scaled_grouped_mm(
            dy_t, x_col, dys, xs, offs=offs, out_dtype=ACT_DTYPE, use_fast_accum=fast
        )

    return {
        "torch._scaled_grouped_mm": scaled(False),
        "torch._scaled_grouped_mm(use_fast_accum=True)": scaled(True),
    }, None


WGRAD_CASES = [
    pytest.param(device, kind, out_dtype, shape, id=f"{device}-{kind}-{str(out_dtype)[6:]}-{shape.id}", marks=marks)
    for device, shapes, marks in (("cpu", GROUPED_GEMM_BENCH_CPU, ()), ("cuda", BWD_SHAPES_CUDA, pytest.mark.gpu))
    for shape in shapes
    for kind in ("fp8", "bf16")
    for out_dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.benchmark(group="grouped_gemm_wgrad")
@pytest.mark.parametrize("device, kind, out_dtype, shape", WGRAD_CASES)
def test_grouped_gemm_wgrad(benchmark, request, device, kind, out_dtype, shape, budget, ceilings):
    skip_if_quick(request, device, shape, QUICK_WGRAD, out_dtype)
    E, M, N, K = shape.experts, shape.rows, shape.n, shape.k
    sizes = aligned_group_sizes(M, E)
    args = make_wgrad_inputs(kind, sizes, M, N, K, device)

    def run_ours():
        return ops.grouped_gemm_wgrad(**args, out_dtype=out_dtype)

    check_wgrad(run_ours(), args, sizes)
    b = budget
    label = f"grouped_gemm_wgrad.{kind}.{str(out_dtype)[6:]}.{shape.id}"
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"{label}.ours")
    extra: dict = {"out_dtype": str(out_dtype)[6:]}
    if device == "cuda":
        baselines, missing = torch_wgrad_baseline(kind, args, sizes)
        timed = time_baselines(baselines, lambda out: check_wgrad(out, args, sizes), device, b, label)
        extra |= baseline_fields(timed, missing, label) | _targets(kind, FP8_WGRAD_TARGET_TFLOPS)
    else:
        cpu_args = {name: t for name, t in args.items() if name != "group_sizes_E"}
        extra |= reference_fields("grouped_gemm_wgrad", cpu_args, args["group_sizes_E"], device, b, label)
    fields = gemm_fields(device, shape, kind, sizes) | ({"scales": "expert x channel"} if kind == "fp8" else {})
    record_gemm(benchmark, ceilings, budget, device, t_ours, run_ours, args, shape.flops, extra, fields)


# --------------------------------------------------------------------------------------------
# quantize_fp8_grouped (memory-bound): GB/s against the copy ceiling, vs the same maths in plain torch.
# --------------------------------------------------------------------------------------------
QUANT_EXPERTS = 16  # Scout's experts
QUANT_CASES = [pytest.param("cpu", s, id=f"cpu-{s.id}") for s in FP8_QUANT_BENCH_CPU] + [
    pytest.param("cuda", s, id=f"cuda-{s.id}", marks=pytest.mark.gpu) for s in FP8_QUANT_BENCH
]


def torch_quantize_grouped(x_MC: torch.Tensor, group_sizes_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-(expert, channel) quantisation in plain torch, no host sync: scatter_reduce amax over the rows'
    experts, then divide by the gathered scales (what engine.ops.fp8_training does without our op)."""
    fp8_max = torch.finfo(FP8).max
    M, C = x_MC.shape
    E = group_sizes_E.shape[0]
    expert_M = torch.searchsorted(
        torch.cumsum(group_sizes_E, 0, dtype=torch.int64), torch.arange(M, device=x_MC.device), right=True
    )
    xf_MC = x_MC.float()
    amax_EC = xf_MC.new_zeros(E + 1, C)
    amax_EC.scatter_reduce_(0, expert_M[:, None].expand(M, C), xf_MC.abs(), reduce="amax", include_self=True)
    scale_EC = amax_EC[:E].clamp_min(reference.FP8_AMAX_FLOOR) / fp8_max
    padded_EC = torch.cat([scale_EC, scale_EC.new_ones(1, C)])
    v_MC = (xf_MC / padded_EC.index_select(0, expert_M)).clamp(-fp8_max, fp8_max)
    return torch.where((expert_M < E)[:, None], v_MC, 0.0).to(FP8), scale_EC


@pytest.mark.benchmark(group="fp8_quant_grouped")
@pytest.mark.parametrize("device, shape", QUANT_CASES)
def test_quantize_fp8_grouped(benchmark, device, shape, budget, ceilings):
    M, C = shape.rows, shape.cols
    gen = torch.Generator(device=device).manual_seed(SEED)
    x = torch.randn(M, C, generator=gen, device=device, dtype=ACT_DTYPE)
    sizes = balanced_group_sizes(M, QUANT_EXPERTS)
    group_sizes_E = torch.tensor(sizes, dtype=torch.int32, device=device)

    def run_ours():
        return ops.quantize_fp8_grouped(x, group_sizes_E)

    def run_torch():
        return torch_quantize_grouped(x, group_sizes_E)

    (q, s), (q_ref, s_ref) = run_ours(), run_torch()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref), "not bit-exact"
    b = budget
    label = f"quantize_fp8_grouped.{shape.id}"
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"{label}.ours")
    t_torch = harness.time_op(run_torch, device, warmup=b.warmup, iters=b.iters, label=f"{label}.torch")
    # One read of x, one write of the codes and the scales (the kernel reads x twice; the second read may hit L2).
    bytes_moved = M * C * (BF16_BYTES + FP8_BYTES) + QUANT_EXPERTS * C * SCALE_BYTES
    extra = {"target_pct_of_ceiling": QUANT_TARGET_PCT_OF_CEILING} if device == "cuda" else {}
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        bytes_moved=bytes_moved,
        baseline_us=t_torch["median_us"],
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        baseline="plain torch (scatter_reduce amax, gather, divide)",
        device=device,
        rows=M,
        cols=C,
        experts=QUANT_EXPERTS,
        dtype=str(ACT_DTYPE)[6:],
        fp8_dtype=str(FP8)[6:],
        **extra,
    )
    harness.wall_clock(benchmark, run_ours, device, budget)
