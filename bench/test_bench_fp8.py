"""Benchmarks of the FP8 expert path: the grouped expert GEMM (FP8 vs torch._scaled_grouped_mm, BF16 vs
torch._grouped_mm) at the Scout / Maverick prefill and decode shapes, and quantize_fp8 / swiglu_quant.

Legend: M routed rows (sorted by expert), K depth, N outputs, E experts, F SwiGLU width.
CUDA cases use bench.shapes' GROUPED_GEMM_PREFILL / _DECODE and FP8_QUANT_BENCH with the issue's targets; the
FP8 dense ceiling (a large torch._scaled_mm) is measured in the same run. CPU cases are small, against the
reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from bench import harness
from bench.shapes import (
    FP8_QUANT_BENCH,
    FP8_QUANT_BENCH_CPU,
    GROUPED_GEMM_BENCH_CPU,
    GROUPED_GEMM_DECODE,
    GROUPED_GEMM_PREFILL,
    GroupedGemmShape,
)
from engine import ops
from engine.ops import reference

SEED = 0
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
ACT_DTYPE = torch.bfloat16  # activations as the model produces them
SCALE_BYTES = 4  # float32 scales
BF16_BYTES, FP8_BYTES = 2, 1

# Targets (issue 3), CUDA only.
FP8_TARGET_TFLOPS = 1300.0  # DeepGEMM reaches 1234-1346 TFLOP/s on grouped FP8 at similar sizes
FP8_TARGET_SPEEDUP = 1.5  # vs torch._scaled_grouped_mm in the same run
BF16_TARGET_SPEEDUP = 1.1  # vs torch._grouped_mm in the same run
DECODE_TARGET_PCT_OF_CEILING = 70.0  # of the copy ceiling, on the weight bytes actually read
QUANT_TARGET_PCT_OF_CEILING = 80.0  # quantize_fp8 / swiglu_quant, of the copy ceiling

# The FP8 dense ceiling: e4m3 [n, n] @ [n, n] -> bf16 with torch._scaled_mm (2.2 PFLOP at n = 8192: ~2 ms).
FP8_CEILING_N = 8192
# Rows checked against float64 before timing (a correct op is the only one worth timing).
CHECK_GROUPS = 8
# DESIGN's FP8 GEMM metric, for those checks.
MAX_CALC_DIFF = 1e-3


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# The FP8 dense ceiling, measured once per session into the harness's ceilings (so it lands in the JSON).
# --------------------------------------------------------------------------------------------
def fp8_matmul_ceiling(ceilings: dict, budget: harness.Budget) -> float | None:
    """TFLOP/s of the faster of torch._scaled_mm with and without fast accumulation (None if unavailable)."""
    if "matmul_tflops_fp8" not in ceilings:
        best_us = _time_scaled_mm(FP8_CEILING_N, budget)
        torch.cuda.empty_cache()  # give the ceiling's buffers back before the benchmark allocates
        n = FP8_CEILING_N
        ceilings["matmul_tflops_fp8"] = None if best_us is None else 2 * n**3 / (best_us * 1e-6) / 1e12
        ceilings["matmul_fp8_n"] = n
    return ceilings["matmul_tflops_fp8"]


def _time_scaled_mm(n: int, budget: harness.Budget) -> float | None:
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    a_NN = torch.randn(n, n, generator=gen, device="cuda", dtype=ACT_DTYPE).to(FP8)
    b_NN = torch.randn(n, n, generator=gen, device="cuda", dtype=ACT_DTYPE).to(FP8)
    one = torch.ones((), device="cuda")
    best_us = None
    for fast in (False, True):

        def run(fast=fast):
            return torch._scaled_mm(a_NN, b_NN.t(), scale_a=one, scale_b=one, out_dtype=ACT_DTYPE, use_fast_accum=fast)

        try:
            t = harness.time_op(
                run, "cuda", warmup=2, iters=budget.ceiling_iters, flush_l2=False, label="ceiling.matmul_fp8"
            )
        except RuntimeError as exc:  # no FP8 tensor cores / no _scaled_mm for this device
            warnings.warn(f"FP8 ceiling unavailable: {exc}", stacklevel=2)
            continue
        best_us = t["median_us"] if best_us is None else min(best_us, t["median_us"])
    return best_us


# --------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------
def balanced_group_sizes(M: int, E: int) -> list[int]:
    """Top-1 routing of M rows over E equally popular experts (multinomial): balanced, random, sum = M."""
    gen = torch.Generator().manual_seed(SEED + M + E)
    ids = torch.randint(E, (M,), generator=gen)
    return torch.bincount(ids, minlength=E).tolist()


def make_weights(kind: str, E: int, N: int, K: int, device: str) -> dict:
    """w [E, N, K] ~ randn / sqrt(K): bf16, or e4m3 with per-expert-and-channel scales [E, N] (quantised one
    expert at a time with quantize_fp8, so no [E, N, K] float32 copy is ever made)."""
    gen = torch.Generator(device=device).manual_seed(SEED + E + N + K)
    if kind == "bf16":
        w = torch.empty(E, N, K, device=device, dtype=ACT_DTYPE)
        for e in range(E):
            w[e] = torch.randn(N, K, generator=gen, device=device, dtype=ACT_DTYPE) / K**0.5
        return dict(w_ENK=w)
    w = torch.empty(E, N, K, device=device, dtype=FP8)
    w_scale = torch.empty(E, N, device=device)
    for e in range(E):
        q, s = ops.quantize_fp8(torch.randn(N, K, generator=gen, device=device, dtype=ACT_DTYPE) / K**0.5)
        w[e], w_scale[e] = q, s
    return dict(w_ENK=w, w_scale=w_scale)


def make_x(kind: str, M: int, K: int, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(SEED + M + K)
    x = torch.randn(M, K, generator=gen, device=device, dtype=ACT_DTYPE)
    if kind == "bf16":
        return dict(x_MK=x)
    q, s = ops.quantize_fp8(x, granularity="row")
    return dict(x_MK=q, x_scale=s)


def check_sampled_rows(out_MN: torch.Tensor, args: dict, sizes: list[int]) -> None:
    """First and last row of up to CHECK_GROUPS non-empty groups against float64 on the dequantised inputs."""
    starts = [sum(sizes[:e]) for e in range(len(sizes))]
    groups = [e for e, size in enumerate(sizes) if size][:CHECK_GROUPS]
    for e in groups:
        rows = sorted({starts[e], starts[e] + sizes[e] - 1})
        x = torch.stack([args["x_MK"][r].float() for r in rows]).double()
        w = args["w_ENK"][e].float().double()
        if "x_scale" in args:
            x = x * args["x_scale"][rows].double()[:, None]
            w = w * args["w_scale"][e].double()[:, None]
        want, got = x @ w.T, torch.stack([out_MN[r] for r in rows]).double()
        diff = 1.0 - 2.0 * (got * want).sum() / (got * got + want * want).sum()
        assert torch.isfinite(got).all() and diff < MAX_CALC_DIFF, f"expert {e}: calc_diff {diff.item():.3e}"


def checked_gemm(kind: str, sizes: list[int], M: int, E: int, N: int, K: int, device: str):
    """(inputs, group sizes, a call of ours) for one grouped GEMM, ours checked on sampled rows before timing."""
    args = {**make_x(kind, M, K, device), **make_weights(kind, E, N, K, device)}
    group_sizes_E = torch.tensor(sizes, dtype=torch.int32, device=device)

    def run_ours():
        return ops.grouped_gemm(**args, group_sizes_E=group_sizes_E)

    check_sampled_rows(run_ours(), args, sizes)
    return args, group_sizes_E, run_ours


def torch_grouped_baseline(kind: str, args: dict, sizes: list[int]) -> tuple[dict[str, Callable], str | None]:
    """torch's own grouped GEMMs on the same inputs: {name: fn}, or ({}, why not). offs = cumulative group ends."""
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32).to(args["x_MK"].device)
    w_EKN = args["w_ENK"].transpose(-2, -1)  # column-major per expert, as both torch ops want
    if kind == "bf16":
        if not hasattr(torch, "_grouped_mm"):
            return {}, f"torch {torch.__version__} has no torch._grouped_mm"
        return {"torch._grouped_mm": lambda: torch._grouped_mm(args["x_MK"], w_EKN, offs=offs)}, None
    if not hasattr(torch, "_scaled_grouped_mm"):
        return {}, f"torch {torch.__version__} has no torch._scaled_grouped_mm"

    def scaled(fast: bool) -> Callable:
        return lambda: torch._scaled_grouped_mm(
            args["x_MK"], w_EKN, args["x_scale"], args["w_scale"], offs=offs, out_dtype=ACT_DTYPE, use_fast_accum=fast
        )

    return {
        "torch._scaled_grouped_mm": scaled(False),
        "torch._scaled_grouped_mm(use_fast_accum=True)": scaled(True),
    }, None


def time_baselines(
    baselines: dict[str, Callable],
    check: Callable[[torch.Tensor], None],
    device: str,
    budget: harness.Budget,
    label: str,
) -> dict:
    """Median us of each torch baseline that runs (an unsupported device raises: recorded, not fatal) and
    computes the same product (`check` on its output: a wrong baseline would make the speedup a lie)."""
    timings, errors = {}, {}
    for name, fn in baselines.items():
        try:
            out = fn()
        except RuntimeError as exc:
            errors[name] = str(exc).splitlines()[0][:200]
            continue
        check(out)
        del out
        b = budget
        timings[name] = harness.time_op(fn, device, warmup=b.warmup, iters=b.iters, label=f"{label}.{name}")[
            "median_us"
        ]
    return {"timings": timings, "errors": errors}


def baseline_fields(timed: dict, missing: str | None, label: str) -> dict:
    """extra_info from time_baselines: the fastest baseline, its us and every timing, or why none ran (warned:
    the row then has no speedup); and the baselines that raised."""
    extra: dict = {}
    if timed["timings"]:
        name, us = min(timed["timings"].items(), key=lambda item: item[1])
        extra |= {"baseline": name, "baseline_us": us, "baseline_timings_us": timed["timings"]}
    else:
        reason = missing or f"torch baselines failed: {timed['errors']}"
        warnings.warn(f"{label}: no torch baseline ({reason})", stacklevel=2)
        extra["baseline_skipped"] = reason
    if timed["errors"]:
        extra["baseline_errors"] = timed["errors"]
    return extra


def reference_fields(
    op: str, args: dict, group_sizes_E: torch.Tensor, device: str, budget: harness.Budget, label: str
) -> dict:
    """The CPU baseline as extra_info: engine.ops.reference.<op> on our inputs, timed like ours."""
    run_reference = getattr(reference, op)
    b = budget
    t_ref = harness.time_op(
        lambda: run_reference(**args, group_sizes_E=group_sizes_E),
        device,
        warmup=b.warmup,
        iters=b.iters,
        label=f"{label}.reference",
    )
    return {"baseline": f"engine.ops.reference.{op}", "baseline_us": t_ref["median_us"]}


def record_gemm(
    benchmark,
    ceilings: dict,
    budget: harness.Budget,
    device: str,
    t_ours: dict,
    run_ours: Callable,
    args: dict,
    flops: int,
    extra: dict,
    fields: dict,
) -> None:
    """Records ours (TFLOP/s on flops) against extra's baseline, then the wall clock; then frees the operands
    (the weights reach 21 GB) so the allocator has them back before the next shape."""
    baseline_us = extra.pop("baseline_us", None)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        flops=flops,
        baseline_us=baseline_us,
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        **extra,
        **fields,
    )
    harness.wall_clock(benchmark, run_ours, device, budget)
    args.clear()
    if device == "cuda":
        torch.cuda.empty_cache()


def gemm_fields(device: str, shape: GroupedGemmShape, kind: str, sizes: list[int]) -> dict:
    return {
        "device": device,
        "kind": kind,
        "dtype": "float8_e4m3fn" if kind != "bf16" else "bfloat16",
        "scales": "row x channel" if kind != "bf16" else None,
        "experts": shape.experts,
        "rows": shape.rows,
        "n": shape.n,
        "k": shape.k,
        "active_experts": sum(1 for s in sizes if s),
        "max_group": max(sizes),
    }


# --------------------------------------------------------------------------------------------
# Grouped GEMM, prefill (compute-bound): TFLOP/s, % of the FP8 and BF16 dense ceilings, speedup vs torch.
# --------------------------------------------------------------------------------------------
GEMM_CASES = [
    pytest.param("cpu", kind, s, id=f"cpu-{kind}-{s.id}") for s in GROUPED_GEMM_BENCH_CPU for kind in ("fp8", "bf16")
] + [
    pytest.param("cuda", kind, s, id=f"cuda-{kind}-{s.id}", marks=pytest.mark.gpu)
    for s in GROUPED_GEMM_PREFILL
    for kind in ("fp8", "bf16")
]


@pytest.mark.benchmark(group="grouped_gemm")
@pytest.mark.parametrize("device, kind, shape", GEMM_CASES)
def test_grouped_gemm(benchmark, device, kind, shape, budget, ceilings):
    E, M, N, K = shape.experts, shape.rows, shape.n, shape.k
    sizes = balanced_group_sizes(M, E)
    args, group_sizes_E, run_ours = checked_gemm(kind, sizes, M, E, N, K, device)
    b = budget
    label = f"grouped_gemm.{kind}.{shape.id}"
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"{label}.ours")
    us = t_ours["median_us"]
    extra: dict = {}
    if device == "cuda":
        baselines, missing = torch_grouped_baseline(kind, args, sizes)
        timed = time_baselines(baselines, lambda out: check_sampled_rows(out, args, sizes), device, b, label)
        extra |= baseline_fields(timed, missing, label)
        tflops = shape.flops / (us * 1e-6) / 1e12
        fp8_ceiling = fp8_matmul_ceiling(ceilings, b)
        extra["pct_of_bf16_ceiling"] = 100.0 * tflops / ceilings["matmul_tflops_bf16"]
        if fp8_ceiling:
            extra["pct_of_fp8_ceiling"] = 100.0 * tflops / fp8_ceiling
        if kind == "fp8":
            extra |= {"target_tflops": FP8_TARGET_TFLOPS, "target_speedup": FP8_TARGET_SPEEDUP}
            if fp8_ceiling:
                extra["pct_of_ceiling"] = extra["pct_of_fp8_ceiling"]  # FP8 is judged against the FP8 ceiling
        else:
            extra["target_speedup"] = BF16_TARGET_SPEEDUP
    else:
        extra |= reference_fields("grouped_gemm", args, group_sizes_E, device, b, label)
    fields = gemm_fields(device, shape, kind, sizes)
    record_gemm(benchmark, ceilings, budget, device, t_ours, run_ours, args, shape.flops, extra, fields)


# --------------------------------------------------------------------------------------------
# Grouped GEMM, decode (memory-bound): GB/s on the weight bytes of the experts that got rows.
# --------------------------------------------------------------------------------------------
def decode_group_sizes(M: int, E: int) -> list[int]:
    """Top-1 routing of a decode batch: M rows to uniformly random experts (some get none)."""
    return balanced_group_sizes(M, E)


@pytest.mark.gpu
@pytest.mark.benchmark(group="grouped_gemm_decode")
@pytest.mark.parametrize("shape", GROUPED_GEMM_DECODE, ids=lambda s: f"cuda-fp8-{s.id}")
def test_grouped_gemm_decode(benchmark, shape, budget, ceilings):
    device, kind = "cuda", "fp8"
    E, M, N, K = shape.experts, shape.rows, shape.n, shape.k
    sizes = decode_group_sizes(M, E)
    args, _, run_ours = checked_gemm(kind, sizes, M, E, N, K, device)
    b = budget
    label = f"grouped_gemm_decode.{shape.id}"
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"{label}.ours")
    baselines, missing = torch_grouped_baseline(kind, args, sizes)
    timed = time_baselines(baselines, lambda out: check_sampled_rows(out, args, sizes), device, b, label)
    extra: dict = {"baseline_timings_us": timed["timings"]}
    if timed["timings"]:
        extra["baseline"], extra["baseline_us"] = min(timed["timings"].items(), key=lambda item: item[1])
    else:
        extra["baseline_skipped"] = missing or f"torch baselines failed: {timed['errors']}"

    active = sum(1 for s in sizes if s)
    # The weights (and their channel scales) of the experts with rows: what a decode step must stream.
    weight_bytes = active * N * (K * FP8_BYTES + SCALE_BYTES)
    activation_bytes = M * (K * FP8_BYTES + SCALE_BYTES) + M * N * BF16_BYTES
    baseline_us = extra.pop("baseline_us", None)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        bytes_moved=weight_bytes,
        baseline_us=baseline_us,
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        activation_bytes=activation_bytes,
        achieved_tflops=shape.flops / (t_ours["median_us"] * 1e-6) / 1e12,
        target_pct_of_ceiling=DECODE_TARGET_PCT_OF_CEILING,
        **extra,
        **gemm_fields(device, shape, kind, sizes),
    )
    harness.wall_clock(benchmark, run_ours, device, budget)
    args.clear()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# quantize_fp8 and swiglu_quant (memory-bound): GB/s against the copy ceiling.
# --------------------------------------------------------------------------------------------
QUANT_OPS = [("quantize_fp8", "row"), ("quantize_fp8", "block128"), ("swiglu_quant", "row")]
QUANT_CASES = [
    pytest.param("cpu", op, g, s, id=f"cpu-{op}-{g}-{s.id}") for s in FP8_QUANT_BENCH_CPU for op, g in QUANT_OPS
] + [
    pytest.param("cuda", op, g, s, id=f"cuda-{op}-{g}-{s.id}", marks=pytest.mark.gpu)
    for s in FP8_QUANT_BENCH
    for op, g in QUANT_OPS
]


def quant_bytes(op: str, granularity: str, M: int, K: int) -> int:
    """One read of the input (h is [M, 2K] for swiglu_quant), one write of the codes and the scales."""
    reads = M * (2 * K if op == "swiglu_quant" else K) * BF16_BYTES
    scales = M if granularity == "row" else M * -(-K // reference.FP8_BLOCK)
    return reads + M * K * FP8_BYTES + scales * SCALE_BYTES


@pytest.mark.benchmark(group="fp8_quant")
@pytest.mark.parametrize("device, op, granularity, shape", QUANT_CASES)
def test_fp8_quant(benchmark, device, op, granularity, shape, budget, ceilings):
    M, K = shape.rows, shape.cols
    gen = torch.Generator(device=device).manual_seed(SEED)
    width = 2 * K if op == "swiglu_quant" else K
    x = torch.randn(M, width, generator=gen, device=device, dtype=ACT_DTYPE)

    if op == "quantize_fp8":

        def run_ours():
            return ops.quantize_fp8(x, granularity=granularity)

        def run_reference():
            return reference.quantize_fp8(x, granularity)

    else:

        def run_ours():
            return ops.swiglu_quant(x, granularity=granularity)

        def run_reference():
            return reference.quantize_fp8(reference.swiglu(x), granularity)

    (q, s), (q_ref, s_ref) = run_ours(), run_reference()
    steps = (q.view(torch.uint8).int() - q_ref.view(torch.uint8).int()).abs()
    if op == "quantize_fp8":  # bit-exact; swiglu_quant may move a rare code by one step (exp rounding)
        assert steps.max() == 0 and torch.equal(s, s_ref), "quantize_fp8 differs from the reference"
    else:
        assert steps.max() <= 1, "swiglu_quant differs from the reference by more than one code"

    b = budget
    label = f"{op}.{granularity}.{shape.id}"
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"{label}.ours")
    t_ref = harness.time_op(run_reference, device, warmup=b.warmup, iters=b.iters, label=f"{label}.reference")
    extra = {"target_pct_of_ceiling": QUANT_TARGET_PCT_OF_CEILING} if device == "cuda" else {}
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        bytes_moved=quant_bytes(op, granularity, M, K),
        baseline_us=t_ref["median_us"],
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        baseline=f"engine.ops.reference ({op})",
        device=device,
        op=op,
        granularity=granularity,
        dtype=_dtype_name(ACT_DTYPE),
        fp8_dtype=_dtype_name(FP8),
        rows=M,
        cols=K,
        **extra,
    )
    harness.wall_clock(benchmark, run_ours, device, budget)
