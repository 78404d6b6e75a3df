"""Benchmarks of sparse-global attention decode (one token per sequence against a KV cache) and of a
Scout-width chunked prefill at 1M tokens: bandwidth against the copy ceiling, memory on one GPU.
Legend: B batch, S cache positions, H query heads, G kv heads, D head dim.
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from bench.shapes import SCOUT
from engine import ops

# Decode target (issue 5): a full layer with a 1M-token FP8 cache streams at >= 80 % of HBM bandwidth.
DECODE_CACHE_TOKENS = 1 << 20
DECODE_TARGET_PCT = 80.0
# Scout-width layer prefill at 1M tokens with chunk 8192 must fit one 80 GB GPU (issue 5).
PREFILL_TOKENS = 1 << 20
PREFILL_CHUNK = 8192
GPU_MEMORY_BUDGET_GIB = 80.0


@pytest.mark.gpu
@pytest.mark.benchmark(group="attention_decode")
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_decode_1m_cache(benchmark, cache, budget, ceilings):
    B, S, H, G, D = 1, DECODE_CACHE_TOKENS, SCOUT.n_heads, SCOUT.n_kv_heads, SCOUT.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q_BHD = torch.randn(B, H, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, S, G, D, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, S, G, D, device="cuda", generator=gen).bfloat16()
    scales = {}
    if cache == "fp8":
        k_scale = (k.float().abs().amax(dim=(0, 1, 3)) / 448.0).contiguous()
        v_scale = (v.float().abs().amax(dim=(0, 1, 3)) / 448.0).contiguous()
        k = (k.float() / k_scale[None, None, :, None]).to(torch.float8_e4m3fn)
        v = (v.float() / v_scale[None, None, :, None]).to(torch.float8_e4m3fn)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")

    def run():
        return ops.sparse_attention_decode(q_BHD, k, v, lens, **scales)

    timing = harness.time_op(run, "cuda", warmup=budget.warmup, iters=budget.iters, label=f"decode-{cache}")
    # Baseline: SDPA over the same keys in bf16 (dequantised for FP8), expanded to H heads.
    k_ref = k.float() * scales["k_scale"][None, None, :, None] if scales else k
    v_ref = v.float() * scales["v_scale"][None, None, :, None] if scales else v
    k_ref = k_ref.bfloat16().transpose(1, 2).repeat_interleave(H // G, 1)
    v_ref = v_ref.bfloat16().transpose(1, 2).repeat_interleave(H // G, 1)
    q_ref = q_BHD[:, :, None, :]

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q_ref, k_ref, v_ref)

    base = harness.time_op(sdpa, "cuda", warmup=budget.warmup, iters=budget.iters, label="decode-sdpa")
    harness.wall_clock(benchmark, run, "cuda", budget)
    cache_bytes = k.numel() * k.element_size() * 2
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=timing["median_us"],
        bytes_moved=cache_bytes,
        baseline_us=base["median_us"],
        baseline="sdpa (bf16, heads expanded)",
        cache=cache,
        tokens=S,
        target_pct_of_ceiling=DECODE_TARGET_PCT,
    )


@pytest.mark.gpu
@pytest.mark.benchmark(group="attention_prefill_1m")
def test_scout_width_prefill_1m_chunked(benchmark, budget, ceilings):
    """One Scout-width attention layer (40 q heads, 8 kv heads, hd 128) over 1M tokens, chunk 8192."""
    S, H, G, D = PREFILL_TOKENS, SCOUT.n_heads, SCOUT.n_kv_heads, SCOUT.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    q = torch.randn(1, S, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, S, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, S, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)

    def run():
        return ops.sparse_attention(q, k, v, chunk=PREFILL_CHUNK)

    timing = harness.time_op(run, "cuda", warmup=1, iters=max(2, budget.iters // 20), label="prefill-1m")
    harness.wall_clock(benchmark, run, "cuda", budget)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    # Work done: each query sees the keys of its own chunk up to itself.
    pairs = (S // PREFILL_CHUNK) * PREFILL_CHUNK * (PREFILL_CHUNK + 1) // 2
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=timing["median_us"],
        flops=4 * pairs * D * H,
        peak_memory_gib=peak_gib,
        fits_80gb=peak_gib <= GPU_MEMORY_BUDGET_GIB,
        tokens=S,
        chunk=PREFILL_CHUNK,
    )
    assert peak_gib <= GPU_MEMORY_BUDGET_GIB


@pytest.mark.benchmark(group="attention_decode")
def test_decode_cpu(benchmark, budget, ceilings):
    B, S, H, G, D = 1, 8192, 8, 2, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=gen)
    k = torch.randn(B, S, G, D, generator=gen)
    v = torch.randn(B, S, G, D, generator=gen)
    lens = torch.full((B,), S, dtype=torch.int32)

    def run():
        return ops.sparse_attention_decode(q, k, v, lens, window=4096)

    timing = harness.time_op(run, "cpu", warmup=budget.warmup, iters=budget.iters, label="decode-cpu")
    harness.wall_clock(benchmark, run, "cpu", budget)
    harness.record(benchmark, ceilings=ceilings, us=timing["median_us"], bytes_moved=2 * 4096 * G * D * 4, tokens=S)
