"""Benchmarks of engine.ops.sparse_attention (prefill forward). CUDA: plain causal at 16K (Scout heads, hd 128)
against torch SDPA's flash backend; window 4096 and chunk 8192 at 32K / 128K / 512K against compiled FlexAttention
with the same BlockMask; TFLOP/s on the work actually done (visible (i, j) pairs, counted analytically), and time
per query to show linear growth in S. CPU: causal and window 256 at 4K against a dense masked torch attention.
Legend: B batch, S query positions (= Sk keys), H query heads, G kv heads, D head dim, R sampled rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from bench import harness
from bench.shapes import (
    ATTENTION_BENCH_CAUSAL,
    ATTENTION_BENCH_CPU,
    ATTENTION_BENCH_CPU_PATTERNS,
    ATTENTION_BENCH_LOCAL_HEADS,
    ATTENTION_BENCH_LOCAL_PATTERNS,
    ATTENTION_BENCH_LOCAL_SEQLENS,
    AttentionPattern,
    AttentionShape,
)
from engine import ops
from engine.ops import reference

SEED = 0
DTYPE = torch.bfloat16  # CUDA inputs, as the model produces them
CPU_DTYPE = torch.float32
FLOPS_PER_PAIR_PER_DIM = 4  # q.k and p.v: two multiply-adds per visible (i, j) pair and head-dim element

# Targets (issue 5), CUDA only.
CAUSAL_TARGET_TFLOPS = 550.0  # plain causal, hd 128, 16K (FlashAttention-3: ~616)
LOCAL_TARGET_TFLOPS = 500.0  # window / chunk, on the work actually done
LOCAL_TARGET_SPEEDUP_VS_FLEX = 1.5

# The largest S is slow (seconds per call with the baseline) and skipped by --bench-quick.
QUICK_SKIPS_SEQLEN = 524288
# In quick mode FlexAttention (tens of seconds of compilation per pattern and size) runs only for this case;
# ours runs at every size.
QUICK_FLEX_CASE = ("window4096", 131072)
# --bench-quick (make gpu-check): one warm-up and two timed calls per case.
QUICK_WARMUP, QUICK_ITERS = 1, 2
# CPU: a causal 4K call takes ~1 s on the 2-core CI machine (the dense baseline ~0.7 s); the first, checked
# call of each is the warm-up.
CPU_ITERS = 2
CPU_BASELINE_ITERS = 1

# Rows checked against float64 before timing (a correct op is the only one worth timing), and the tests'
# tolerance rule on them (tests/tolerances.py: FlashAttention's rule).
CHECK_ROWS = 8
ATTENTION_ERROR_FACTOR = 2.0
ATTENTION_FP32_FLOOR = 1e-5  # float32 inputs (CPU): see tests/tolerances.py


# --------------------------------------------------------------------------------------------
# Work actually done: visible (i, j) pairs, S == Sk, causal.
# --------------------------------------------------------------------------------------------
def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def visible_pairs(S: int, pattern: AttentionPattern) -> int:
    """Visible (query, key) pairs of a causal S x S problem with no pattern, a window or a chunk."""
    assert pattern.causal and not pattern.global_stride and not pattern.sinks, pattern
    if pattern.window and pattern.chunk:
        raise NotImplementedError("window and chunk together")
    if pattern.window:
        W = min(pattern.window, S)
        return _triangle(W) + (S - W) * W  # rows 0..W-1 see i + 1 keys, later rows W
    if pattern.chunk:
        C = pattern.chunk
        return (S // C) * _triangle(C) + _triangle(S % C)
    return _triangle(S)


def attention_flops(shape: AttentionShape, pattern: AttentionPattern) -> int:
    assert shape.seqlen_q == shape.seqlen_k
    pairs = visible_pairs(shape.seqlen_q, pattern)
    return FLOPS_PER_PAIR_PER_DIM * shape.batch * shape.heads * shape.head_dim * pairs


@pytest.mark.parametrize(
    "pattern",
    [
        AttentionPattern(name="causal"),
        AttentionPattern(name="window1", window=1),
        AttentionPattern(name="window7", window=7),
        AttentionPattern(name="window200", window=200),
        AttentionPattern(name="chunk16", chunk=16),
        AttentionPattern(name="chunk33", chunk=33),
        AttentionPattern(name="chunk500", chunk=500),
    ],
    ids=lambda p: p.name,
)
@pytest.mark.parametrize("S", [1, 100, 129])
def test_visible_pairs_formula(S, pattern):
    """The analytic pair count the TFLOP/s rest on equals the reference's mask."""
    assert visible_pairs(S, pattern) == int(reference.attention_visible(S, S, **pattern.kwargs).sum())


# --------------------------------------------------------------------------------------------
# Inputs and the check before timing.
# --------------------------------------------------------------------------------------------
def random_qkv(shape: AttentionShape, dtype: torch.dtype, device: str):
    # Drawn on the device: the largest inputs (GBs) would take seconds on the host.
    gen = torch.Generator(device=device).manual_seed(SEED + shape.seqlen_q)
    B, S, Sk, H, G, D = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.heads, shape.kv_heads, shape.head_dim
    q = torch.randn(B, S, H, D, generator=gen, device=device, dtype=dtype)
    k = torch.randn(B, Sk, G, D, generator=gen, device=device, dtype=dtype)
    v = torch.randn(B, Sk, G, D, generator=gen, device=device, dtype=dtype)
    return q, k, v


def _row_attention(q_BSHD, k_BSGD, v_BSGD, row: int, pattern: AttentionPattern):
    """(float64 reference [B, H, D], same-dtype torch [B, H, D]) for one query row, from its visible keys only."""
    H, G, D = q_BSHD.shape[2], k_BSGD.shape[2], q_BSHD.shape[3]
    keys = reference.attention_visible(1, row + 1, **pattern.kwargs)[0].nonzero().squeeze(1).to(q_BSHD.device)
    q, k, v = q_BSHD[:, row : row + 1], k_BSGD[:, keys], v_BSGD[:, keys]
    ref, _ = reference.sparse_attention(q, k, v, causal=False)
    k_BHKD = k.transpose(1, 2).repeat_interleave(H // G, dim=1)
    v_BHKD = v.transpose(1, 2).repeat_interleave(H // G, dim=1)
    p_BH1K = torch.softmax((q.transpose(1, 2) @ k_BHKD.transpose(-1, -2)) * D**-0.5, dim=-1)
    return ref[:, 0], (p_BH1K @ v_BHKD)[:, :, 0]


def check_rows(out_BSHD, q_BSHD, k_BSGD, v_BSGD, pattern: AttentionPattern, name: str = "ours") -> None:
    """CHECK_ROWS rows (first, last and random) against float64 from their visible keys: max error at most
    2x that of a same-dtype torch attention on those rows, plus the dtype's rounding of the values (the tests'
    rule, tests/tolerances.py)."""
    S = q_BSHD.shape[1]
    gen = torch.Generator().manual_seed(SEED)
    rows = sorted({0, S - 1, *torch.randint(S, (CHECK_ROWS - 2,), generator=gen).tolist()})
    ref, naive = zip(*(_row_attention(q_BSHD, k_BSGD, v_BSGD, r, pattern) for r in rows), strict=True)
    ref, naive = torch.stack(ref, 1), torch.stack(naive, 1).double()
    got = out_BSHD[:, rows].double()
    ref_lowp = ref.to(out_BSHD.dtype)
    floor = 2 * ((ref_lowp + 0.3 - 0.3) - ref_lowp).abs().max().item()
    floor += ATTENTION_FP32_FLOOR if out_BSHD.dtype == torch.float32 else 0.0
    allowed = ATTENTION_ERROR_FACTOR * (naive - ref).abs().max().item() + floor
    error = (got - ref).abs().max().item()
    assert error <= allowed, f"{name}: attention error {error:.3e} > allowed {allowed:.3e} on rows {rows}"


def timing(request, budget: harness.Budget) -> dict:
    """time_op's warm-up / iterations on CUDA: the budget's, or QUICK_* with --bench-quick or --benchmark-disable."""
    if request.config.getoption("--bench-quick") or budget.iters <= QUICK_ITERS:
        return dict(warmup=QUICK_WARMUP, iters=QUICK_ITERS)
    return dict(warmup=budget.warmup, iters=budget.iters)


def _shape_fields(device: str, shape: AttentionShape, pattern: AttentionPattern) -> dict:
    return {
        "device": device,
        "dtype": str(DTYPE if device == "cuda" else CPU_DTYPE).removeprefix("torch."),
        "batch": shape.batch,
        "seqlen": shape.seqlen_q,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "pattern": pattern.name,
        "visible_pairs": visible_pairs(shape.seqlen_q, pattern),
    }


def _wall_clock(benchmark, fn: Callable[[], object], budget: harness.Budget, quick: bool) -> None:
    """pytest-benchmark's wall clock (CUDA): one round in quick mode, the budget's otherwise."""
    if quick:
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1, iterations=1, warmup_rounds=0)
    else:
        harness.wall_clock(benchmark, fn, "cuda", budget)


# --------------------------------------------------------------------------------------------
# Baselines.
# --------------------------------------------------------------------------------------------
def sdpa_flash(q_BSHD, k_BSGD, v_BSGD) -> Callable[[], torch.Tensor]:
    """torch SDPA, flash backend, causal, on [B, H, S, D] views; k / v expanded to H heads beforehand (not
    every torch's flash path takes GQA), so it reads G/H more k / v bytes: negligible in a compute-bound call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, G = q_BSHD.shape[2], k_BSGD.shape[2]
    q = q_BSHD.transpose(1, 2)
    k = k_BSGD.repeat_interleave(H // G, dim=2).transpose(1, 2)
    v = v_BSGD.repeat_interleave(H // G, dim=2).transpose(1, 2)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    return run


_FLEX_COMPILED: dict[str, Callable] = {}


def flex_mask_mod(pattern: AttentionPattern):
    """FlexAttention's mask_mod for the pattern (S == Sk, so positions are the indices)."""
    W, C = pattern.window, pattern.chunk
    assert pattern.causal and not pattern.global_stride and not pattern.sinks and not (W and C), pattern
    if W:
        return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < W)
    if C:
        return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx // C == kv_idx // C)
    return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx


def flex_attention(q_BSHD, k_BSGD, v_BSGD, pattern: AttentionPattern) -> Callable[[], torch.Tensor]:
    """Compiled flex_attention with the pattern's BlockMask (built once, outside the timing, with a compiled
    create_block_mask: never a dense S x S mask), on contiguous [B, H, S, D] copies (its preferred layout)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    if "flex" not in _FLEX_COMPILED:
        _FLEX_COMPILED["flex"] = torch.compile(flex)
    compiled = _FLEX_COMPILED["flex"]
    S = q_BSHD.shape[1]
    block_mask = create_block_mask(flex_mask_mod(pattern), None, None, S, S, device=q_BSHD.device, _compile=True)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q_BSHD, k_BSGD, v_BSGD))

    def run():
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

    return run


def dense_masked_attention(q_BSHD, k_BSGD, v_BSGD, pattern: AttentionPattern) -> Callable[[], torch.Tensor]:
    """The reference's way, in q's dtype: a dense S x Sk mask (built beforehand), scores, softmax, P @ V."""
    H, G, D = q_BSHD.shape[2], k_BSGD.shape[2], q_BSHD.shape[3]
    S, Sk = q_BSHD.shape[1], k_BSGD.shape[1]
    visible = reference.attention_visible(S, Sk, **pattern.kwargs, device=q_BSHD.device)
    q = q_BSHD.transpose(1, 2)
    k = k_BSGD.transpose(1, 2).repeat_interleave(H // G, dim=1)
    v = v_BSGD.transpose(1, 2).repeat_interleave(H // G, dim=1)

    def run():
        scores = (q @ k.transpose(-1, -2)) * D**-0.5
        return (torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v).transpose(1, 2)

    return run


def time_baseline(make: Callable[[], Callable], q, k, v, pattern, t: dict, label: str) -> tuple[float | None, str]:
    """Median us of a baseline that builds, runs and computes the same attention (checked first: a wrong
    baseline would make the speedup a lie); (None, why) when this torch / device cannot run it."""
    try:
        fn = make()
        out = fn()
    except Exception as exc:  # an unsupported torch / device: recorded, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    check_rows(out, q, k, v, pattern, name=label)
    del out
    device = q.device.type
    return harness.time_op(fn, device, warmup=t["warmup"], iters=t["iters"], label=label)["median_us"], ""


def baseline_fields(name: str, us: float | None, error: str, flops: int | None = None, **if_timed) -> dict:
    """extra_info of a baseline from time_baseline: its name, median us, TFLOP/s on `flops` (when given) and
    if_timed; or, when it could not run, why (warned: the row then has no speedup)."""
    if not us:
        warnings.warn(f"{name} unavailable: {error}", stacklevel=2)
        return {"baseline_skipped": error}
    extra = {"baseline": name, "baseline_us": us, **if_timed}
    if flops is not None:
        extra["baseline_tflops"] = flops / (us * 1e-6) / 1e12
    return extra


# --------------------------------------------------------------------------------------------
# CUDA: plain causal, 16K, Scout heads, hd 128, vs SDPA flash.
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.benchmark(group="sparse_attention")
def test_attention_causal_16k(benchmark, request, budget, ceilings):
    shape, pattern, device = ATTENTION_BENCH_CAUSAL, AttentionPattern(name="causal"), "cuda"
    q, k, v = random_qkv(shape, DTYPE, device)

    def run_ours():
        return ops.sparse_attention(q, k, v)

    check_rows(run_ours(), q, k, v, pattern)
    t = timing(request, budget)
    t_ours = harness.time_op(run_ours, device, label=f"attention.ours.causal.{shape.id}", **t)
    sdpa_us, sdpa_error = time_baseline(
        lambda: sdpa_flash(q, k, v), q, k, v, pattern, t, f"attention.sdpa_flash.causal.{shape.id}"
    )
    flops = attention_flops(shape, pattern)
    extra = baseline_fields("torch SDPA (flash backend)", sdpa_us, sdpa_error, flops=flops)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        flops=flops,
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        target_tflops=CAUSAL_TARGET_TFLOPS,
        **extra,
        **_shape_fields(device, shape, pattern),
    )
    _wall_clock(benchmark, run_ours, budget, quick=t["iters"] == QUICK_ITERS)


# --------------------------------------------------------------------------------------------
# CUDA: window 4096 / chunk 8192 at 32K, 128K, 512K vs FlexAttention with the same BlockMask.
# --------------------------------------------------------------------------------------------
LOCAL_CASES = [
    pytest.param(p, S, id=f"cuda-{p.name}-S{S}", marks=[pytest.mark.gpu] + ([pytest.mark.slow] if S >= 2**19 else []))
    for p in ATTENTION_BENCH_LOCAL_PATTERNS
    for S in ATTENTION_BENCH_LOCAL_SEQLENS
]


@pytest.mark.benchmark(group="sparse_attention")
@pytest.mark.parametrize("pattern, S", LOCAL_CASES)
def test_attention_local(benchmark, request, budget, ceilings, pattern, S):
    quick = request.config.getoption("--bench-quick")
    if quick and S >= QUICK_SKIPS_SEQLEN:
        pytest.skip(f"S = {S} skipped by --bench-quick")
    H, G, D = ATTENTION_BENCH_LOCAL_HEADS
    shape, device = AttentionShape(1, S, S, H, G, D), "cuda"
    q, k, v = random_qkv(shape, DTYPE, device)

    def run_ours():
        return ops.sparse_attention(q, k, v, **pattern.kwargs)

    check_rows(run_ours(), q, k, v, pattern)
    t = timing(request, budget)
    label = f"attention.{pattern.name}.{shape.id}"
    t_ours = harness.time_op(run_ours, device, label=f"{label}.ours", **t)
    extra: dict = {}
    if quick and (pattern.name, S) != QUICK_FLEX_CASE:
        extra["baseline_skipped"] = f"FlexAttention runs only for {QUICK_FLEX_CASE} with --bench-quick"
    else:
        flex_us, flex_error = time_baseline(
            lambda: flex_attention(q, k, v, pattern), q, k, v, pattern, t, f"{label}.flex"
        )
        torch.cuda.empty_cache()  # the baseline's copies and BlockMask
        extra |= baseline_fields(
            "FlexAttention (compiled, same BlockMask)",
            flex_us,
            flex_error,
            target_speedup=LOCAL_TARGET_SPEEDUP_VS_FLEX,
        )
    flops = attention_flops(shape, pattern)
    us = t_ours["median_us"]
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=us,
        flops=flops,
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        target_tflops=LOCAL_TARGET_TFLOPS,
        ns_per_query=us * 1e3 / S,  # constant across S when the time is linear in S
        **extra,
        **_shape_fields(device, shape, pattern),
    )
    _wall_clock(benchmark, run_ours, budget, quick=t["iters"] == QUICK_ITERS)


# --------------------------------------------------------------------------------------------
# CPU: causal and window 256 at 4K vs a dense masked torch attention (the reference's way, float32).
# --------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="sparse_attention")
@pytest.mark.parametrize("pattern", ATTENTION_BENCH_CPU_PATTERNS, ids=lambda p: f"cpu-{p.name}")
def test_attention_cpu(benchmark, budget, ceilings, pattern):
    shape, device = ATTENTION_BENCH_CPU, "cpu"
    q, k, v = random_qkv(shape, CPU_DTYPE, device)

    def run_ours():
        return ops.sparse_attention(q, k, v, **pattern.kwargs)

    # pytest-benchmark's wall clock first: one call, which is also the warm-up and the checked output.
    check_rows(benchmark.pedantic(run_ours, rounds=1, iterations=1, warmup_rounds=0), q, k, v, pattern)
    label = f"attention.{pattern.name}.{shape.id}"
    t_ours = harness.time_op(run_ours, device, warmup=0, iters=CPU_ITERS, label=f"{label}.ours")
    dense_us, dense_error = time_baseline(
        lambda: dense_masked_attention(q, k, v, pattern),
        q,
        k,
        v,
        pattern,
        dict(warmup=0, iters=CPU_BASELINE_ITERS),
        f"{label}.dense",
    )
    assert dense_us is not None, dense_error
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        flops=attention_flops(shape, pattern),
        baseline_us=dense_us,
        baseline="dense masked torch attention (float32)",
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        **_shape_fields(device, shape, pattern),
    )
