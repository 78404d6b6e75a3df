"""Benchmarks of the backward of engine.ops.sparse_attention (llama4::sparse_attention_bwd through autograd).
CUDA: plain causal at 16K (Scout heads, hd 128) against torch SDPA's flash backward; window 4096 and chunk 8192 at
128K against compiled FlexAttention's backward with the same BlockMask; forward + backward of one Scout-width layer
at 256K (time and peak memory on one GPU). CPU: causal and window 256 at 4K against dense masked torch autograd.
Every backward is timed alone (autograd.grad of a retained forward graph, upstream gradient fixed), after its
gradients pass the tests' rule on the last queries and keys.

TFLOP/s are on the work done: backward FLOPs = 2.5 x forward FLOPs (FlashAttention's convention: five matmuls,
S = QK^T recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q, against the forward's two), with the forward
counting 4 * D FLOPs per visible (i, j) pair and head.
Legend: B batch, S query positions (= Sk keys), H query heads, G kv heads, D head dim, n checked tail rows.
"""

from __future__ import annotations

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
    ATTENTION_BWD_BENCH_LAYER,
    ATTENTION_BWD_BENCH_LAYER_PATTERNS,
    ATTENTION_BWD_BENCH_LOCAL_SEQLEN,
    AttentionPattern,
    AttentionShape,
)
from bench.test_bench_attention import (
    QUICK_ITERS,
    _shape_fields,
    _wall_clock,
    attention_flops,
    baseline_fields,
    flex_mask_mod,
    random_qkv,
    timing,
)
from engine import ops
from engine.ops import reference

DTYPE = torch.bfloat16
CPU_DTYPE = torch.float32
BWD_FLOPS_PER_FWD_FLOP = 2.5  # see the module docstring
FLOPS_CONVENTION = "backward = 2.5 x forward FLOPs (5 matmuls vs 2; QK^T recomputed), on the visible pairs"

# Targets (issue 6), CUDA only.
CAUSAL_BWD_TARGET_TFLOPS = 400.0  # plain causal, hd 128, 16K
LOCAL_BWD_TARGET_TFLOPS = 350.0  # window / chunk at 128K, on the work done
LOCAL_BWD_TARGET_SPEEDUP_VS_FLEX = 1.5
LAYER_MEMORY_BUDGET_GIB = 80.0  # one 80 GB GPU

# --bench-quick (make gpu-check, whole suite ~75 s): FlexAttention's backward (tens of seconds of compilation)
# and the 256K layer are skipped, and only this local pattern runs; QUICK_* warm-up / iterations.
QUICK_LOCAL_PATTERN = "window4096"
# CPU: the causal 4K backward takes ~0.6 s on the 2-core CI machine, dense torch autograd ~1-1.6 s.
CPU_ITERS = 2
CPU_BASELINE_ITERS = 1

# Before timing, the gradients of the last CHECK_TAIL queries and keys (a sub-problem holding every query that
# sees those keys and every key those queries see) against float64 autograd of the reference: the tests' rule
# (tests/tolerances.py, FlashAttention's: 2x the error of same-dtype torch autograd, plus the dtype's rounding).
CHECK_TAIL = 32
ATTENTION_ERROR_FACTOR = 2.0
ATTENTION_FP32_FLOOR = 1e-5  # float32 inputs (CPU), relative to max(1, max|grad|): tests/tolerances.py

GRAD_NAMES = ("dq", "dk", "dv")


def bwd_flops(shape: AttentionShape, pattern: AttentionPattern) -> int:
    return int(BWD_FLOPS_PER_FWD_FLOP * attention_flops(shape, pattern))


# --------------------------------------------------------------------------------------------
# The check before timing: the tail sub-problem.
# --------------------------------------------------------------------------------------------
def tail_problem(S: int, pattern: AttentionPattern, n: int) -> tuple[int, int]:
    """(q0, k0): queries [q0, S) and keys [k0, S) hold the last n queries, every key they see and, since a key
    is seen only by queries at or after it, every query that sees the last n keys. k0 keeps the pattern's
    positions (a window is translation invariant; a chunk needs k0 on a chunk start)."""
    q0 = S - n
    if pattern.window:
        return q0, max(0, q0 - pattern.window + 1)
    if pattern.chunk:
        return q0, q0 // pattern.chunk * pattern.chunk
    return q0, 0


def _dense_grads(q, k, v, dout, visible_SK, dtype):
    """Autograd of dense masked attention in `dtype` (float64: the reference; the input dtype: plain torch)."""
    H, G, D = q.shape[2], k.shape[2], q.shape[3]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    q_, k_, v_ = leaves
    k_ = k_.repeat_interleave(H // G, dim=2)
    v_ = v_.repeat_interleave(H // G, dim=2)
    scores = torch.einsum("bshd,bkhd->bhsk", q_, k_) * D**-0.5
    p = torch.softmax(scores.masked_fill(~visible_SK, float("-inf")), dim=-1)
    out = torch.einsum("bhsk,bkhd->bshd", p, v_)
    return torch.autograd.grad(out, leaves, dout.to(dtype))


def check_tail(grads, q, k, v, dout, pattern: AttentionPattern, name: str) -> None:
    """grads (dq [B, S, H, D], dk / dv [B, S, G, D]) on the last CHECK_TAIL queries and keys, against float64."""
    S = q.shape[1]
    q0, k0 = tail_problem(S, pattern, CHECK_TAIL)
    sub = [q[:, q0:], k[:, k0:], v[:, k0:], dout[:, q0:]]
    visible = reference.attention_visible(S - q0, S - k0, **pattern.kwargs, device=q.device)
    ref = _dense_grads(*sub, visible, torch.float64)
    naive = _dense_grads(*sub, visible, q.dtype)
    got = (grads[0][:, q0:], grads[1][:, S - CHECK_TAIL :], grads[2][:, S - CHECK_TAIL :])
    ref = (ref[0], ref[1][:, -CHECK_TAIL:], ref[2][:, -CHECK_TAIL:])
    naive = (naive[0], naive[1][:, -CHECK_TAIL:], naive[2][:, -CHECK_TAIL:])
    for g_name, g, r, nv in zip(GRAD_NAMES, got, ref, naive, strict=True):
        r_lowp = r.to(q.dtype)
        floor = 2 * ((r_lowp + 0.3 - 0.3) - r_lowp).abs().max().item()
        if q.dtype == torch.float32:
            floor += ATTENTION_FP32_FLOOR * max(1.0, r.abs().max().item())
        allowed = ATTENTION_ERROR_FACTOR * (nv.double() - r).abs().max().item() + floor
        error = (g.double() - r).abs().max().item()
        assert error <= allowed, f"{name}: {g_name} error {error:.3e} > allowed {allowed:.3e}"


def _upstream(q: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device=q.device.type).manual_seed(q.shape[1] + 1)
    return torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype)


# --------------------------------------------------------------------------------------------
# Ours and the baselines: each returns (run, grads in our layout) with the forward done once.
# --------------------------------------------------------------------------------------------
def ours_backward(q, k, v, dout, pattern: AttentionPattern):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.sparse_attention(*leaves, **pattern.kwargs)

    def run():
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)

    return run, run()


def checked_problem(shape: AttentionShape, pattern: AttentionPattern, dtype: torch.dtype, device: str):
    """(q, k, v, dout, run_ours): random inputs and upstream gradient, and our backward, whose gradients have
    passed check_tail before anything is timed."""
    q, k, v = random_qkv(shape, dtype, device)
    dout = _upstream(q)
    run_ours, grads = ours_backward(q, k, v, dout, pattern)
    check_tail(grads, q, k, v, dout, pattern, name="ours")
    return q, k, v, dout, run_ours


def _group_sum(d_BSHD: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """dk / dv of k / v expanded to H heads, summed back over each kv head's group: [B, S, G, D]."""
    return d_BSHD.unflatten(2, (kv_heads, d_BSHD.shape[2] // kv_heads)).sum(3)


def sdpa_flash_backward(q, k, v, dout, pattern: AttentionPattern):
    """torch SDPA's flash backward (causal) on [B, H, S, D] views, k / v expanded to H heads before the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, G = q.shape[2], k.shape[2]
    leaves = [t.detach().requires_grad_() for t in (q, k.repeat_interleave(H // G, 2), v.repeat_interleave(H // G, 2))]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True)
    dout_t = dout.transpose(1, 2)

    def run():
        return torch.autograd.grad(out, leaves, dout_t, retain_graph=True)

    dq, dk, dv = run()
    return run, (dq, _group_sum(dk, G), _group_sum(dv, G))


_FLEX_COMPILED: dict[str, Callable] = {}


def flex_backward(q, k, v, dout, pattern: AttentionPattern):
    """Compiled FlexAttention with the pattern's BlockMask (compiled create_block_mask, never a dense mask), on
    contiguous [B, H, S, D] copies, GQA native; its compiled backward is what is timed."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    if "flex" not in _FLEX_COMPILED:
        _FLEX_COMPILED["flex"] = torch.compile(flex)
    S = q.shape[1]
    block_mask = create_block_mask(flex_mask_mod(pattern), None, None, S, S, device=q.device, _compile=True)
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    out = _FLEX_COMPILED["flex"](*leaves, block_mask=block_mask, enable_gqa=True)
    dout_t = dout.transpose(1, 2).contiguous()

    def run():
        return torch.autograd.grad(out, leaves, dout_t, retain_graph=True)

    return run, tuple(g.transpose(1, 2) for g in run())


def dense_backward(q, k, v, dout, pattern: AttentionPattern):
    """Dense masked torch attention in q's dtype (a dense S x Sk mask built beforehand), its autograd backward."""
    H, G, D = q.shape[2], k.shape[2], q.shape[3]
    S, Sk = q.shape[1], k.shape[1]
    visible = reference.attention_visible(S, Sk, **pattern.kwargs, device=q.device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    q_ = leaves[0].transpose(1, 2)
    k_ = leaves[1].transpose(1, 2).repeat_interleave(H // G, dim=1)
    v_ = leaves[2].transpose(1, 2).repeat_interleave(H // G, dim=1)
    scores = (q_ @ k_.transpose(-1, -2)) * D**-0.5
    out = (torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v_).transpose(1, 2)

    def run():
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)

    return run, run()


def time_baseline(make: Callable, q, k, v, dout, pattern, t: dict, label: str) -> tuple[float | None, str]:
    """Median us of a baseline's backward, after its gradients pass the same check (a wrong baseline would make
    the speedup a lie); (None, why) when this torch / device cannot run it."""
    try:
        run, grads = make(q, k, v, dout, pattern)
    except Exception as exc:  # an unsupported torch / device: recorded, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    check_tail(grads, q, k, v, dout, pattern, name=label)
    del grads
    us = harness.time_op(run, q.device.type, warmup=t["warmup"], iters=t["iters"], label=label)["median_us"]
    del run
    return us, ""


def _fields(device: str, shape: AttentionShape, pattern: AttentionPattern) -> dict:
    return _shape_fields(device, shape, pattern) | {"pass": "backward", "flops_convention": FLOPS_CONVENTION}


# --------------------------------------------------------------------------------------------
# CUDA: plain causal, 16K, Scout heads, hd 128, vs SDPA's flash backward.
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.benchmark(group="sparse_attention_bwd")
def test_attention_bwd_causal_16k(benchmark, request, budget, ceilings):
    shape, pattern, device = ATTENTION_BENCH_CAUSAL, AttentionPattern(name="causal"), "cuda"
    q, k, v, dout, run_ours = checked_problem(shape, pattern, DTYPE, device)
    t = timing(request, budget)
    label = f"attention_bwd.causal.{shape.id}"
    t_ours = harness.time_op(run_ours, device, label=f"{label}.ours", **t)
    sdpa_us, sdpa_error = time_baseline(sdpa_flash_backward, q, k, v, dout, pattern, t, f"{label}.sdpa_flash")
    flops = bwd_flops(shape, pattern)
    extra = baseline_fields("torch SDPA flash backward", sdpa_us, sdpa_error, flops=flops)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        flops=flops,
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        target_tflops=CAUSAL_BWD_TARGET_TFLOPS,
        **extra,
        **_fields(device, shape, pattern),
    )
    _wall_clock(benchmark, run_ours, budget, quick=t["iters"] == QUICK_ITERS)


# --------------------------------------------------------------------------------------------
# CUDA: window 4096 / chunk 8192 at 128K vs FlexAttention's backward with the same BlockMask.
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.benchmark(group="sparse_attention_bwd")
@pytest.mark.parametrize("pattern", ATTENTION_BENCH_LOCAL_PATTERNS, ids=lambda p: f"cuda-{p.name}")
def test_attention_bwd_local(benchmark, request, budget, ceilings, pattern):
    quick = request.config.getoption("--bench-quick")
    if quick and pattern.name != QUICK_LOCAL_PATTERN:
        pytest.skip(f"{pattern.name} skipped by --bench-quick (only {QUICK_LOCAL_PATTERN} runs)")
    H, G, D = ATTENTION_BENCH_LOCAL_HEADS
    S = ATTENTION_BWD_BENCH_LOCAL_SEQLEN
    shape, device = AttentionShape(1, S, S, H, G, D), "cuda"
    q, k, v, dout, run_ours = checked_problem(shape, pattern, DTYPE, device)
    t = timing(request, budget)
    label = f"attention_bwd.{pattern.name}.{shape.id}"
    t_ours = harness.time_op(run_ours, device, label=f"{label}.ours", **t)
    extra: dict = {}
    if quick:
        extra["baseline_skipped"] = "FlexAttention's backward (tens of seconds to compile) is skipped by --bench-quick"
    else:
        flex_us, flex_error = time_baseline(flex_backward, q, k, v, dout, pattern, t, f"{label}.flex")
        torch.cuda.empty_cache()  # the baseline's copies, graph and BlockMask
        extra |= baseline_fields(
            "FlexAttention backward (compiled, same BlockMask)",
            flex_us,
            flex_error,
            target_speedup=LOCAL_BWD_TARGET_SPEEDUP_VS_FLEX,
        )
    us = t_ours["median_us"]
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=us,
        flops=bwd_flops(shape, pattern),
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        target_tflops=LOCAL_BWD_TARGET_TFLOPS,
        ns_per_query=us * 1e3 / S,
        **extra,
        **_fields(device, shape, pattern),
    )
    _wall_clock(benchmark, run_ours, budget, quick=t["iters"] == QUICK_ITERS)


# --------------------------------------------------------------------------------------------
# CUDA: forward + backward of one Scout-width attention layer at 256K: time and peak memory.
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.benchmark(group="sparse_attention_bwd")
@pytest.mark.parametrize("pattern", ATTENTION_BWD_BENCH_LAYER_PATTERNS, ids=lambda p: f"cuda-{p.name}")
def test_attention_layer_fwd_bwd_256k(benchmark, request, budget, ceilings, pattern):
    """q [1, 256K, 40, 128], k / v [1, 256K, 8, 128] bf16: forward, then backward, in one GPU's memory. Peak
    memory counts everything the two passes allocate (inputs, out, lse, dout, dq, dk, dv, workspaces)."""
    if request.config.getoption("--bench-quick"):
        pytest.skip("the 256K layer is skipped by --bench-quick")
    shape, device = ATTENTION_BWD_BENCH_LAYER, "cuda"
    q, k, v = random_qkv(shape, DTYPE, device)
    dout = _upstream(q)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    inputs_gib = sum(t.numel() * t.element_size() for t in (q, k, v, dout)) / harness.GiB

    def fwd_bwd():
        out = ops.sparse_attention(*leaves, **pattern.kwargs)
        return torch.autograd.grad(out, leaves, dout)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    grads = fwd_bwd()
    torch.cuda.synchronize()
    peak_gib = torch.cuda.max_memory_allocated() / harness.GiB
    check_tail(grads, q, k, v, dout, pattern, name="ours")
    del grads
    t = timing(request, budget)
    t = dict(warmup=min(t["warmup"], 1), iters=min(t["iters"], 3))  # seconds per call: a few suffice
    label = f"attention_layer.{pattern.name}.{shape.id}"
    t_fwd = harness.time_op(lambda: ops.sparse_attention(q, k, v, **pattern.kwargs), device, label=f"{label}.fwd", **t)
    t_both = harness.time_op(fwd_bwd, device, label=f"{label}.fwd_bwd", **t)
    fwd_flops = attention_flops(shape, pattern)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_both["median_us"],
        flops=fwd_flops + bwd_flops(shape, pattern),
        fwd_us=t_fwd["median_us"],
        bwd_us=t_both["median_us"] - t_fwd["median_us"],
        peak_memory_gib=peak_gib,
        inputs_and_dout_gib=inputs_gib,
        memory_budget_gib=LAYER_MEMORY_BUDGET_GIB,
        **_fields(device, shape, pattern) | {"pass": "forward + backward"},
    )
    assert peak_gib < LAYER_MEMORY_BUDGET_GIB, f"peak {peak_gib:.1f} GiB exceeds one {LAYER_MEMORY_BUDGET_GIB} GB GPU"
    _wall_clock(benchmark, fwd_bwd, budget, quick=True)


# --------------------------------------------------------------------------------------------
# CPU: causal and window 256 at 4K vs dense masked torch autograd (float32).
# --------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="sparse_attention_bwd")
@pytest.mark.parametrize("pattern", ATTENTION_BENCH_CPU_PATTERNS, ids=lambda p: f"cpu-{p.name}")
def test_attention_bwd_cpu(benchmark, budget, ceilings, pattern):
    shape, device = ATTENTION_BENCH_CPU, "cpu"
    q, k, v, dout, run_ours = checked_problem(shape, pattern, CPU_DTYPE, device)
    label = f"attention_bwd.{pattern.name}.{shape.id}"
    benchmark.pedantic(run_ours, rounds=1, iterations=1, warmup_rounds=0)  # pytest-benchmark's wall clock
    t_ours = harness.time_op(run_ours, device, warmup=0, iters=CPU_ITERS, label=f"{label}.ours")
    dense_us, dense_error = time_baseline(
        dense_backward, q, k, v, dout, pattern, dict(warmup=0, iters=CPU_BASELINE_ITERS), f"{label}.dense"
    )
    assert dense_us is not None, dense_error
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        flops=bwd_flops(shape, pattern),
        baseline_us=dense_us,
        baseline="dense masked torch attention, autograd backward (float32)",
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        **_fields(device, shape, pattern),
    )
