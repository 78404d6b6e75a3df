"""Decode attention (engine.ops.sparse_attention_decode) and the pattern-aware KV cache
(engine.kv_cache): decode vs the fp64 reference, prefill-then-decode equals one prefill, memory
that follows the pattern, FP8 caches, bad input. Legend: B batch, S positions, H/G heads, D dim.
"""

from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.kv_cache import AttentionPattern, LayerKVCache
from engine.ops import reference

PATTERNS = {
    "full": AttentionPattern(),
    "chunk8": AttentionPattern(chunk=8),
    "window5": AttentionPattern(window=5),
    "hybrid": AttentionPattern(window=6, global_stride=4),
    "sinks": AttentionPattern(window=4, sinks=3),
    "global_only": AttentionPattern(global_stride=3),
    "chunk_sinks": AttentionPattern(chunk=16, sinks=2),
}
FP32_ATOL = 2e-6  # float32 kernels vs float64: a few ulps of values of order 1


def decode_reference(q_BHD, k_cache, v_cache, lens_B, key_pos_BS, query_pos_B, pattern, scale):
    """fp64 decode: each sequence's used slots, masked by position, as one dense row."""
    B, H, D = q_BHD.shape
    G = k_cache.shape[2]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens_B[b])
        pos = key_pos_BS[b, :n].long() if key_pos_BS is not None else torch.arange(n)
        i = int(query_pos_B[b]) if query_pos_B is not None else n - 1
        n_pos = max(i, int(pos.max()) if n else 0) + 1  # positions index a square mask of that size
        rule = reference.attention_visible(n_pos, n_pos, **pattern.kwargs)
        vis = torch.tensor([p >= 0 and bool(rule[i, p]) for p in pos.tolist()], dtype=torch.bool)
        if not vis.any():
            continue
        k = k_cache[b, :n][vis].double().repeat_interleave(H // G, 1)  # [n', H, D]
        v = v_cache[b, :n][vis].double().repeat_interleave(H // G, 1)
        s = scale * torch.einsum("hd,nhd->hn", q_BHD[b].double(), k)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out


@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("with_positions", [False, True])
def test_decode_matches_reference(pattern_name, with_positions, gen):
    B, Smax, H, G, D = 3, 37, 4, 2, 16
    pattern = PATTERNS[pattern_name]
    q = torch.randn(B, H, D, generator=gen)
    k = torch.randn(B, Smax, G, D, generator=gen)
    v = torch.randn(B, Smax, G, D, generator=gen)
    lens = torch.tensor([1, 20, 37], dtype=torch.int32)
    key_pos = query_pos = None
    if with_positions:  # a shuffled slot layout with empty slots: positions decide, not slots
        key_pos = torch.stack([torch.randperm(Smax, generator=gen) for _ in range(B)]).int() + 3
        key_pos[:, ::5] = -1
        query_pos = torch.tensor([Smax + 2, 30, Smax + 2], dtype=torch.int32)
    out = ops.sparse_attention_decode(q, k, v, lens, key_positions=key_pos, query_positions=query_pos, **pattern.kwargs)
    expected = decode_reference(q, k, v, lens, key_pos, query_pos, pattern, D**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("prefill_len", [1, 7, 8, 9, 25])
def test_prefill_then_decode_equals_one_prefill(pattern_name, prefill_len, gen):
    B, S, H, G, D = 2, 40, 4, 2, 16
    pattern = PATTERNS[pattern_name]
    q = torch.randn(B, S, H, D, generator=gen)
    k = torch.randn(B, S, G, D, generator=gen)
    v = torch.randn(B, S, G, D, generator=gen)
    full = ops.sparse_attention(q, k, v, **pattern.kwargs)
    cache = LayerKVCache(B, G, D, S, pattern, dtype=torch.float32)
    cache.write(k[:, :prefill_len], v[:, :prefill_len])
    prefill = ops.sparse_attention(q[:, :prefill_len], k[:, :prefill_len], v[:, :prefill_len], **pattern.kwargs)
    torch.testing.assert_close(prefill, full[:, :prefill_len], atol=FP32_ATOL, rtol=0)
    for t in range(prefill_len, S):
        cache.write(k[:, t : t + 1], v[:, t : t + 1])
        step = cache.attend(q[:, t])
        torch.testing.assert_close(step, full[:, t], atol=FP32_ATOL, rtol=0, msg=f"position {t}")


def test_memory_follows_the_pattern():
    B, G, D, max_len = 1, 8, 128, 1 << 20
    chunked = LayerKVCache(B, G, D, max_len, AttentionPattern(chunk=8192), device="meta")
    windowed_global = LayerKVCache(B, G, D, max_len, AttentionPattern(window=4096, global_stride=4096), device="meta")
    full = LayerKVCache(B, G, D, 1 << 16, AttentionPattern(), device="meta")
    assert chunked.slots == 8192
    assert windowed_global.slots == 4096 + max_len // 4096
    assert full.slots == 1 << 16


def test_fp8_cache_is_half_the_bytes_and_close(gen):
    B, S, H, G, D = 2, 64, 8, 2, 64
    pattern = AttentionPattern(chunk=16)
    q = torch.randn(B, S, H, D, generator=gen)
    k = torch.randn(B, S, G, D, generator=gen)
    v = torch.randn(B, S, G, D, generator=gen)
    bf16 = LayerKVCache(B, G, D, S, pattern, dtype=torch.bfloat16)
    fp8 = LayerKVCache(B, G, D, S, pattern, fp8=True)
    assert fp8.k.element_size() * 2 == bf16.k.element_size()
    fp8.write(k, v)
    out = fp8.attend(q[:, -1])
    # Against the reference on the dequantised cache: only the decode maths may differ (float32).
    kd = fp8.k.float() * fp8.k_scale[None, None, :, None]
    vd = fp8.v.float() * fp8.v_scale[None, None, :, None]
    expected = decode_reference(
        q[:, -1], kd, vd, fp8.cache_seqlens, fp8.key_positions, torch.full((B,), S - 1), pattern, D**-0.5
    )
    torch.testing.assert_close(out.double(), expected, atol=FP32_ATOL, rtol=0)
    # And close to the unquantised attention (e4m3 keeps ~2 significant digits).
    exact = ops.sparse_attention(q, k, v, **pattern.kwargs)[:, -1]
    assert (out - exact).abs().max() < 0.1


@pytest.mark.parametrize("length", [1, 127, 128, 129])
def test_decode_lengths_across_chunk_boundaries(length, gen):
    B, H, G, D = 1, 2, 1, 64
    pattern = AttentionPattern(chunk=128)
    q = torch.randn(B, length, H, D, generator=gen).bfloat16()
    k = torch.randn(B, length, G, D, generator=gen).bfloat16()
    v = torch.randn(B, length, G, D, generator=gen).bfloat16()
    out = ops.sparse_attention_decode(q[:, -1], k, v, torch.tensor([length], dtype=torch.int32), chunk=128)
    expected = reference.sparse_attention(q, k, v, **pattern.kwargs)[0][:, -1]
    naive_err = (expected.bfloat16().double() - expected).abs().max()  # bf16 output rounding
    assert (out.double() - expected).abs().max() <= 2 * naive_err + 1e-3


def test_row_with_no_visible_key_is_zero(gen):
    q = torch.randn(1, 2, 16, generator=gen)
    k = torch.randn(1, 4, 1, 16, generator=gen)
    out, lse = ops.sparse_attention_decode(
        q,
        k,
        k,
        torch.tensor([4], dtype=torch.int32),
        key_positions=torch.full((1, 4), -1, dtype=torch.int32),
        return_lse=True,
    )
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.randn(2, 4)), "q"),
        (dict(k_cache=torch.randn(2, 8, 3, 16)), "k_cache"),
        (dict(cache_seqlens=torch.tensor([1, 9], dtype=torch.int32)), "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([1, 2])), "cache_seqlens"),
        (dict(k_cache=torch.randn(2, 8, 2, 16).to(torch.float8_e4m3fn)), "k_cache|k_scale|share"),
        (dict(key_positions=torch.zeros(2, 7, dtype=torch.int32)), "key_positions"),
        (dict(query_positions=torch.zeros(3, dtype=torch.int32)), "query_positions"),
    ],
)
def test_decode_bad_input(change, match, gen):
    args = dict(
        q=torch.randn(2, 4, 16),
        k_cache=torch.randn(2, 8, 2, 16),
        v_cache=torch.randn(2, 8, 2, 16),
        cache_seqlens=torch.tensor([1, 8], dtype=torch.int32),
    )
    args.update(change)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.sparse_attention_decode(
            args["q"],
            args["k_cache"],
            args["v_cache"],
            args["cache_seqlens"],
            key_positions=args.get("key_positions"),
            query_positions=args.get("query_positions"),
        )


def test_decode_opcheck_and_compile(gen):
    q = torch.randn(2, 4, 16, generator=gen)
    k = torch.randn(2, 8, 2, 16, generator=gen)
    v = torch.randn(2, 8, 2, 16, generator=gen)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    args = (q, k, v, lens, None, None, None, None, True, 4, 0, 2, 1, 0.25)
    torch.library.opcheck(torch.ops.llama4.sparse_attention_decode.default, args)
    fn = torch.compile(
        lambda q_: ops.sparse_attention_decode(q_, k, v, lens, window=4), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(q), ops.sparse_attention_decode(q, k, v, lens, window=4))
