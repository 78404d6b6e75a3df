"""engine.ops.sparse_attention (torch.ops.llama4.sparse_attention_fwd, the prefill forward) against the float64
oracle engine.ops.reference.sparse_attention: every mask pattern and their unions, window / chunk / stride edges,
GQA, head dims, dtypes, S != Sk, varlen, rows with no key, lse, a 64K-token CPU case in O(S x window) memory,
bad input, opcheck, torch.compile and determinism.
Legend: B batch, S query rows, Sk keys, H query heads, G kv heads, D head dim, R selected rows, K selected keys.

Tolerance (tests/tolerances.py, FlashAttention's rule): max|out - ref64| <= 2 * max|naive - ref64| + floor, where
naive is `naive_attention` below (dense masked attention in the input dtype, as a plain torch user writes it) and
the floor is twice the largest change of ref64's values when they pass through the dtype (v + 0.3 - 0.3), plus
1e-5 for float32 inputs (tolerances.ATTENTION_FP32_FLOOR). lse: float32 rtol = atol = 1e-5 for float32 inputs,
the same rule (against the naive dtype lse) for half inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from memory_caps import host_allocation_cap
from tolerances import ATTENTION_LSE_TOL_FP32, assert_sparse_attention_close, sparse_attention_tolerance

from bench.shapes import ATTENTION_TEST, ATTENTION_TEST_CUDA, AttentionShape
from engine import ops
from engine.ops import reference

ERRORS = (RuntimeError, ValueError, TypeError)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dev_dtype(device: torch.device, dtype: torch.dtype):
    marks = [pytest.mark.gpu] if device.type == "cuda" else []
    return pytest.param(device, dtype, id=f"{device.type}-{dtype_id(dtype)}", marks=marks)


# CPU: float32 / bfloat16 / float16, any head dim. CUDA: bfloat16 / float16, head dim 64 or 128.
CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.bfloat16, torch.float16]
DEVICE_DTYPES = [_dev_dtype(CPU, d) for d in CPU_DTYPES] + [_dev_dtype(CUDA, d) for d in CUDA_DTYPES]
CPU_HEAD_DIMS = [1, 16, 40, 64, 128, 256]
CUDA_HEAD_DIMS = [64, 128]
CUDA_UNSUPPORTED_HEAD_DIM = 96

# Every pattern and their unions, on one shape (B, S = Sk, H, G, D): S spans several CUDA tiles, the
# window / chunk / stride are not tile multiples.
PATTERN_SHAPE = AttentionShape(2, 300, 300, 4, 2, 64)
PATTERNS = {
    "causal": dict(),
    "full": dict(causal=False),
    "window": dict(window=32),
    "chunk": dict(chunk=48),
    "global": dict(global_stride=29),
    "sinks": dict(sinks=3),
    "window+global": dict(window=32, global_stride=29),  # the hybrid local + global-sparse layer
    "chunk+sinks": dict(chunk=48, sinks=3),
    "window+chunk": dict(window=32, chunk=48),
    "all": dict(window=20, chunk=48, global_stride=29, sinks=3),
    "full+window": dict(causal=False, window=32),
    "full+chunk": dict(causal=False, chunk=48),
    "full+all": dict(causal=False, window=20, chunk=48, global_stride=29, sinks=3),
}
# The patterns every shape of ATTENTION_TEST runs with (sizes independent of S).
SHAPE_PATTERNS = {
    "causal": dict(),
    "window16": dict(window=16),
    "chunk16": dict(chunk=16),
    "window16+stride10": dict(window=16, global_stride=10),
    "all": dict(window=5, chunk=16, global_stride=11, sinks=2),
    "full+chunk16": dict(causal=False, chunk=16),
}

# Varlen: sequence lengths shorter than, equal to and longer than the chunk, of length 1 and 0.
VARLEN_CHUNK = 16
VARLEN_SEQLENS = [1, 0, 37, 16, 100, 15, 17]
# Queries continuing a cached prefix (Sk > S), a sequence with no queries, one with no keys (rows see nothing).
VARLEN_SEQLENS_Q = [5, 1, 0, 20, 3]
VARLEN_SEQLENS_K = [40, 1, 7, 20, 0]

# The long CPU case: O(S x window) work and memory; an S x S float32 score matrix would be 16 GiB.
LONG_SEQLEN_CPU = 65536
LONG_SAMPLED_ROWS = 64
# Extra address space the long CPU call may take: its float32 copies of q, k, v and out are ~100 MiB.
LONG_MEMORY_CAP_BYTES = 1 << 30
LONG_SEQLEN_CUDA = 32768


def random_qkv(gen, shape: AttentionShape, dtype, device, *, scale_q: float = 1.0):
    """q_BSHD, k_BSGD, v_BSGD: randn drawn in float32 on the CPU, then cast (rounded normal values)."""
    B, S, Sk, H, G, D = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.heads, shape.kv_heads, shape.head_dim
    q = (torch.randn(B, S, H, D, generator=gen) * scale_q).to(dtype).to(device)
    k = torch.randn(B, Sk, G, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Sk, G, D, generator=gen).to(dtype).to(device)
    return q, k, v


# --------------------------------------------------------------------------------------------
# The plain same-dtype torch implementation the tolerance is measured against, and the checks.
# --------------------------------------------------------------------------------------------
def visible_mask(S: int, Sk: int, cu_seqlens_q=None, cu_seqlens_k=None, **pattern) -> torch.Tensor:
    """Boolean [S, Sk] from the reference's rule; with cu_seqlens, block-diagonal over the packed sequences."""
    if cu_seqlens_q is None:
        return reference.attention_visible(S, Sk, **pattern)
    visible = torch.zeros(S, Sk, dtype=torch.bool)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        visible[cq[s] : cq[s + 1], ck[s] : ck[s + 1]] = reference.attention_visible(
            cq[s + 1] - cq[s], ck[s + 1] - ck[s], **pattern
        )
    return visible


def naive_attention(q_BSHD, k_BSGD, v_BSGD, visible_SK, scale: float):
    """Dense masked attention entirely in q's dtype on q's device (scores, softmax, lse and P @ V): what a
    plain torch user writes. Returns (out [B, S, H, D], lse [B, H, S]); a row with no visible key gives 0 / -inf.
    """
    H, G = q_BSHD.shape[2], k_BSGD.shape[2]
    visible_SK = visible_SK.to(q_BSHD.device)
    q_BHSD = q_BSHD.transpose(1, 2)
    k_BHSD = k_BSGD.transpose(1, 2).repeat_interleave(H // G, dim=1)
    v_BHSD = v_BSGD.transpose(1, 2).repeat_interleave(H // G, dim=1)
    scores_BHSK = (q_BHSD @ k_BHSD.transpose(-1, -2)) * scale
    scores_BHSK = scores_BHSK.masked_fill(~visible_SK, float("-inf"))
    lse_BHS = torch.logsumexp(scores_BHSK, dim=-1)
    p_BHSK = torch.softmax(scores_BHSK, dim=-1).masked_fill(~visible_SK, 0.0)  # an all-masked row is NaN: 0
    return (p_BHSK @ v_BHSD).transpose(1, 2), lse_BHS


def assert_lse_close(lse_BHS, naive_lse_BHS, ref_lse_BHS, dtype) -> None:
    """-inf exactly where the reference has no visible key; elsewhere float32 rounding for float32 inputs,
    the attention rule (against the naive dtype lse) for half inputs."""
    lse, naive, ref = (t.detach().double().cpu() for t in (lse_BHS, naive_lse_BHS, ref_lse_BHS))
    empty = ref.isneginf()
    assert not lse.isnan().any(), "lse has NaN"
    assert torch.equal(lse.isneginf(), empty), "lse is -inf exactly on the rows with no visible key"
    if empty.all():
        return
    if dtype == torch.float32:
        torch.testing.assert_close(lse[~empty], ref[~empty], **ATTENTION_LSE_TOL_FP32)
    else:
        assert_sparse_attention_close(lse[~empty], naive[~empty], ref[~empty], dtype)


def check_attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None, **pattern):
    """Runs the op with return_lse, checks layout, out against the tolerance rule and lse; returns (out, lse)."""
    B, S, H, D = q.shape
    Sk = k.shape[1]
    out, lse = ops.sparse_attention(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        softmax_scale=softmax_scale,
        return_lse=True,
        **pattern,
    )
    assert out.shape == (B, S, H, D) and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (B, H, S) and lse.dtype == torch.float32 and lse.device == q.device
    cpu_cu = [None if t is None else t.cpu() for t in (cu_seqlens_q, cu_seqlens_k)]
    ref_out, ref_lse = reference.sparse_attention(
        q.cpu(),
        k.cpu(),
        v.cpu(),
        cu_seqlens_q=cpu_cu[0],
        cu_seqlens_k=cpu_cu[1],
        softmax_scale=softmax_scale,
        **pattern,
    )
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    naive_out, naive_lse = naive_attention(q, k, v, visible_mask(S, Sk, *cpu_cu, **pattern), scale)
    assert not out.isnan().any(), "out has NaN"
    assert_sparse_attention_close(out.cpu(), naive_out.cpu(), ref_out, q.dtype)
    assert_lse_close(lse, naive_lse, ref_lse, q.dtype)
    return out, lse


def assert_equivalent(a, b, naive, ref, dtype, device) -> None:
    """Two kernel results of the same visible sets: bitwise on CPU (same keys in the same order); on CUDA
    their difference stays within the tolerance rule (the tiles visited may differ)."""
    if device.type == "cpu":
        assert torch.equal(a, b)
    else:
        diff = (a.double() - b.double()).abs().max().item()
        allowed = sparse_attention_tolerance(naive.cpu(), ref, dtype)
        assert diff <= allowed, f"{diff:.3e} > {allowed:.3e}"


def run(q, k, v, **kwargs):
    return ops.sparse_attention(q, k, v, **kwargs)


# --------------------------------------------------------------------------------------------
# Every pattern and their unions; the shape sweep; head dims.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_patterns(pattern, device, dtype, gen):
    q, k, v = random_qkv(gen, PATTERN_SHAPE, dtype, device)
    check_attention(q, k, v, **PATTERNS[pattern])


@pytest.mark.parametrize("pattern", list(SHAPE_PATTERNS))
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_TEST, ids=lambda s: s.id)
def test_shapes(shape, device, dtype, pattern, gen):
    q, k, v = random_qkv(gen, shape, dtype, device)
    check_attention(q, k, v, **SHAPE_PATTERNS[pattern])


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["causal", "window16+stride10", "all", "full+chunk16"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ATTENTION_TEST_CUDA, ids=lambda s: s.id)
def test_shapes_cuda_tile_sizes(shape, dtype, pattern, gen):
    q, k, v = random_qkv(gen, shape, dtype, CUDA)
    check_attention(q, k, v, **SHAPE_PATTERNS[pattern])


HEAD_DIM_CASES = [pytest.param(CPU, dt, d, id=f"cpu-{dtype_id(dt)}-D{d}") for dt in CPU_DTYPES for d in CPU_HEAD_DIMS]
HEAD_DIM_CASES += [
    pytest.param(CUDA, dt, d, id=f"cuda-{dtype_id(dt)}-D{d}", marks=pytest.mark.gpu)
    for dt in CUDA_DTYPES
    for d in CUDA_HEAD_DIMS
]


@pytest.mark.parametrize("pattern", ["causal", "window+global", "full+all"])
@pytest.mark.parametrize("device, dtype, head_dim", HEAD_DIM_CASES)
def test_head_dims(device, dtype, head_dim, pattern, gen):
    q, k, v = random_qkv(gen, AttentionShape(1, 90, 90, 4, 2, head_dim), dtype, device)
    check_attention(q, k, v, **PATTERNS[pattern])


@pytest.mark.parametrize("softmax_scale", [1.0, 0.01, 0.3])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_softmax_scale(softmax_scale, device, dtype, gen):
    """1.0 with D = 128 gives scores of std ~11 (a sharp softmax: the running max matters); 0.01 a flat one."""
    q, k, v = random_qkv(gen, AttentionShape(1, 200, 200, 4, 2, 128), dtype, device)
    check_attention(q, k, v, softmax_scale=softmax_scale, **PATTERNS["window+global"])


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_large_query_magnitude(device, dtype, gen):
    """q scaled by 8: scores up to ~ +-60, exp would overflow float32 without the max subtraction."""
    q, k, v = random_qkv(gen, AttentionShape(1, 150, 150, 2, 1, 64), dtype, device, scale_q=8.0)
    check_attention(q, k, v, **PATTERNS["all"])


# --------------------------------------------------------------------------------------------
# Edges of the window, the chunk, the stride and the sinks.
# --------------------------------------------------------------------------------------------
EDGE_SHAPE = AttentionShape(1, 130, 130, 4, 2, 64)
EDGE_S = EDGE_SHAPE.seqlen_q


def _gqa_values(v_BSGD: torch.Tensor, heads: int) -> torch.Tensor:
    """v per query head: [B, Sk, H, D] (query head h reads kv head h // (H // G))."""
    return v_BSGD.repeat_interleave(heads // v_BSGD.shape[2], dim=2)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_window_one_sees_only_itself(device, dtype, gen):
    """window = 1, causal: each query sees only its own key, so out is exactly v (p = 1)."""
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    out, _ = check_attention(q, k, v, window=1)
    assert torch.equal(out, _gqa_values(v, EDGE_SHAPE.heads))


@pytest.mark.parametrize("window", [EDGE_S - 1, EDGE_S, EDGE_S + 5, 10 * EDGE_S], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_window_edges(window, device, dtype, gen):
    """W = S - 1 drops only key 0 from the last row; W >= S is plain causal."""
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    out, _ = check_attention(q, k, v, window=window)
    if window >= EDGE_S:
        ref, _ = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu())
        naive, _ = naive_attention(q, k, v, visible_mask(EDGE_S, EDGE_S), EDGE_SHAPE.head_dim**-0.5)
        assert_equivalent(out, run(q, k, v), naive, ref, dtype, device)


@pytest.mark.parametrize("chunk", [EDGE_S, EDGE_S + 1, 4 * EDGE_S], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_chunk_at_least_seqlen_is_causal(chunk, device, dtype, gen):
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    out, _ = check_attention(q, k, v, chunk=chunk)
    ref, _ = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu())
    naive, _ = naive_attention(q, k, v, visible_mask(EDGE_S, EDGE_S), EDGE_SHAPE.head_dim**-0.5)
    assert_equivalent(out, run(q, k, v), naive, ref, dtype, device)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_global_stride_one_is_causal(device, dtype, gen):
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    out, _ = check_attention(q, k, v, global_stride=1)
    ref, _ = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu())
    naive, _ = naive_attention(q, k, v, visible_mask(EDGE_S, EDGE_S), EDGE_SHAPE.head_dim**-0.5)
    assert_equivalent(out, run(q, k, v), naive, ref, dtype, device)


# Stride and sink edges at EDGE_SHAPE (test_sparse_attention_bwd runs them too).
STRIDE_SINK_EDGES = [
    dict(global_stride=100),
    dict(window=4, global_stride=EDGE_S - 1),
    dict(chunk=32, global_stride=64),  # global keys at chunk starts
    dict(window=3, sinks=1),
    dict(window=3, sinks=EDGE_S + 7),  # every key is a sink
    dict(chunk=1),
    dict(chunk=1, sinks=4),
    dict(causal=False, global_stride=7),
    dict(causal=False, sinks=5),
]


def pattern_id(pattern: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in pattern.items())


@pytest.mark.parametrize("pattern", STRIDE_SINK_EDGES, ids=pattern_id)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_stride_and_sink_edges(pattern, device, dtype, gen):
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    check_attention(q, k, v, **pattern)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_large_stride_sees_only_key_zero(device, dtype, gen):
    """global_stride > S, causal: the only visible key of every row is key 0 (j % P == 0): out = v[0]."""
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    out, _ = check_attention(q, k, v, global_stride=EDGE_S + 10)
    v0 = _gqa_values(v, EDGE_SHAPE.heads)[:, :1]
    assert torch.equal(out, v0.expand_as(out))


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_query_in_second_chunk(device, dtype, gen):
    """chunk = 16, S = 40: row 20 sees exactly keys 16..20 (hand-computed softmax); row 16 sees only key 16
    (out = v[16] exactly); keys outside row 20's chunk do not change it by a single bit."""
    S, C, row = 40, 16, 20
    shape = AttentionShape(1, S, S, 2, 1, 64)
    q, k, v = random_qkv(gen, shape, dtype, device)
    out, _ = check_attention(q, k, v, chunk=C)
    assert torch.equal(out[:, C], _gqa_values(v, shape.heads)[:, C])

    # Row 20 from its own keys 16..20, written out by hand (independent of attention_visible).
    keys = torch.arange(C, row + 1)
    scale = shape.head_dim**-0.5
    q64, k64, v64 = (t.cpu().double() for t in (q, k, v))
    scores_HK = torch.einsum("hd,kd->hk", q64[0, row], k64[0, keys, 0]) * scale
    expected_HD = torch.softmax(scores_HK, dim=-1) @ v64[0, keys, 0]
    naive, _ = naive_attention(q[:, row : row + 1], k[:, keys], v[:, keys], torch.ones(1, len(keys), dtype=bool), scale)
    assert_sparse_attention_close(out[0, row].cpu(), naive[0, 0].cpu(), expected_HD, dtype)

    # Change every key and value outside the chunk: row 20 must not move; changing key 16 must move it.
    k2, v2 = k.clone(), v.clone()
    outside = torch.cat([torch.arange(0, C), torch.arange(row + 1, S)])
    k2[:, outside] = torch.randn(1, len(outside), 1, shape.head_dim, generator=gen).to(dtype).to(device)
    v2[:, outside] = torch.randn(1, len(outside), 1, shape.head_dim, generator=gen).to(dtype).to(device)
    assert torch.equal(run(q, k2, v2, chunk=C)[:, row], out[:, row])
    v2[:, C] += 1
    assert not torch.equal(run(q, k2, v2, chunk=C)[:, row], out[:, row])


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_queries_at_end_of_keys(device, dtype, gen):
    """S = 5 queries over Sk = 40 keys, causal + chunk 16: the queries sit at positions 35..39 (chunk 2, keys
    32..39), not at 0..4; so they match the last 5 rows of the full 40-query problem."""
    q_full, k, v = random_qkv(gen, AttentionShape(1, 40, 40, 2, 1, 64), dtype, device)
    q = q_full[:, 35:]
    out, _ = check_attention(q, k, v, chunk=16)
    last_rows = run(q_full, k, v, chunk=16)[:, 35:]
    ref, _ = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu(), chunk=16)
    naive, _ = naive_attention(q, k, v, visible_mask(5, 40, chunk=16), 64**-0.5)
    assert_equivalent(out, last_rows, naive, ref, dtype, device)


# --------------------------------------------------------------------------------------------
# Rows with no visible key: out exactly 0, lse -inf.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern", [dict(), dict(window=3), dict(chunk=4, sinks=1), dict(causal=False, chunk=4)], ids=str
)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_rows_without_keys(pattern, device, dtype, gen):
    """S = 40 > Sk = 5: rows 0..34 sit at negative positions. Causal (or a chunk, which never reaches a
    negative position) leaves them with no key: out 0 and lse -inf, never NaN."""
    S, Sk = 40, 5
    q, k, v = random_qkv(gen, AttentionShape(2, S, Sk, 4, 2, 64), dtype, device)
    out, lse = check_attention(q, k, v, **pattern)
    empty = S - Sk
    assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
    assert lse[:, :, :empty].isneginf().all()
    assert lse[:, :, empty:].isfinite().all()


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_no_keys_at_all(device, dtype, gen):
    """Sk = 0: every row sees nothing."""
    q, k, v = random_qkv(gen, AttentionShape(1, 7, 0, 2, 1, 64), dtype, device)
    out, lse = ops.sparse_attention(q, k, v, causal=False, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert lse.isneginf().all()


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_no_queries(device, dtype, gen):
    q, k, v = random_qkv(gen, AttentionShape(2, 0, 9, 2, 1, 64), dtype, device)
    out, lse = ops.sparse_attention(q, k, v, window=4, return_lse=True)
    assert out.shape == (2, 0, 2, 64) and lse.shape == (2, 2, 0)


# --------------------------------------------------------------------------------------------
# Varlen (cu_seqlens, B = 1).
# --------------------------------------------------------------------------------------------
def cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


VARLEN_PATTERNS = {
    "causal": dict(),
    "chunk16": dict(chunk=VARLEN_CHUNK),
    "window8+stride5": dict(window=8, global_stride=5),
    "all": dict(window=5, chunk=VARLEN_CHUNK, global_stride=7, sinks=2),
    "full": dict(causal=False),
    "full+chunk16": dict(causal=False, chunk=VARLEN_CHUNK),
}


@pytest.mark.parametrize("pattern", list(VARLEN_PATTERNS))
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_varlen(pattern, device, dtype, gen):
    """Packed sequences of lengths 1, 0, 37, 16, 100, 15, 17 (chunk 16): each starts at position 0, and
    each matches the same sequence run alone."""
    T = sum(VARLEN_SEQLENS)
    q, k, v = random_qkv(gen, AttentionShape(1, T, T, 4, 2, 64), dtype, device)
    cu = cu_seqlens(VARLEN_SEQLENS, device)
    out, _ = check_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, **VARLEN_PATTERNS[pattern])
    starts = cu.tolist()
    for s0, s1 in itertools.pairwise(starts):
        if s1 == s0:
            continue
        qs, ks, vs = q[:, s0:s1], k[:, s0:s1], v[:, s0:s1]
        alone = run(qs, ks, vs, **VARLEN_PATTERNS[pattern])
        ref, _ = reference.sparse_attention(qs.cpu(), ks.cpu(), vs.cpu(), **VARLEN_PATTERNS[pattern])
        naive, _ = naive_attention(qs, ks, vs, visible_mask(s1 - s0, s1 - s0, **VARLEN_PATTERNS[pattern]), 64**-0.5)
        assert_equivalent(out[:, s0:s1], alone, naive, ref, dtype, device)


@pytest.mark.parametrize("pattern", ["causal", "chunk16", "all", "full+chunk16"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_varlen_queries_after_prefix(pattern, device, dtype, gen):
    """Per-sequence Sk != S: queries at the end of each sequence's keys; a sequence with queries and no keys
    (rows: 0 / -inf), one with keys and no queries."""
    S, Sk = sum(VARLEN_SEQLENS_Q), sum(VARLEN_SEQLENS_K)
    q, k, v = random_qkv(gen, AttentionShape(1, S, Sk, 4, 2, 64), dtype, device)
    cu_q, cu_k = cu_seqlens(VARLEN_SEQLENS_Q, device), cu_seqlens(VARLEN_SEQLENS_K, device)
    out, lse = check_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **VARLEN_PATTERNS[pattern])
    last = S - VARLEN_SEQLENS_Q[-1]  # the last sequence has no keys
    assert torch.equal(out[:, last:], torch.zeros_like(out[:, last:]))
    assert lse[:, :, last:].isneginf().all()


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_varlen_single_sequence_equals_dense(device, dtype, gen):
    q, k, v = random_qkv(gen, AttentionShape(1, 77, 77, 4, 2, 64), dtype, device)
    cu = cu_seqlens([77], device)
    out, _ = check_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, window=9, global_stride=13)
    ref, _ = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu(), window=9, global_stride=13)
    naive, _ = naive_attention(q, k, v, visible_mask(77, 77, window=9, global_stride=13), 64**-0.5)
    assert_equivalent(out, run(q, k, v, window=9, global_stride=13), naive, ref, dtype, device)


# --------------------------------------------------------------------------------------------
# Layouts, return_lse, inputs untouched, determinism.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_strided_views(device, dtype, gen):
    """q, k, v as views of a packed qkv projection [B, S, H + 2G, D], and q as a transposed [B, H, S, D]
    tensor: unit stride along D is all the op needs; the result equals that of contiguous copies."""
    B, S, H, G, D = 2, 70, 4, 2, 64
    qkv = torch.randn(B, S, H + 2 * G, D, generator=gen).to(dtype).to(device)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + G], qkv[:, :, H + G :]
    assert not q.is_contiguous() and not k.is_contiguous()
    pattern = PATTERNS["all"]
    out, _ = check_attention(q, k, v, **pattern)
    contiguous = run(q.contiguous(), k.contiguous(), v.contiguous(), **pattern)
    ref, _ = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu(), **pattern)
    naive, _ = naive_attention(q, k, v, visible_mask(S, S, **pattern), D**-0.5)
    assert_equivalent(out, contiguous, naive, ref, dtype, device)

    q_BSHD = q.contiguous().transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] view of [B, H, S, D]
    assert q_BSHD.stride(1) == D and q_BSHD.stride(3) == 1
    out_t, _ = check_attention(q_BSHD, k, v, **pattern)
    assert_equivalent(out_t, contiguous, naive, ref, dtype, device)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_return_lse_false_returns_out(device, dtype, gen):
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    out = ops.sparse_attention(q, k, v, chunk=32)
    assert isinstance(out, torch.Tensor)
    out_lse, _ = ops.sparse_attention(q, k, v, chunk=32, return_lse=True)
    assert torch.equal(out, out_lse)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_inputs_unchanged_and_deterministic(device, dtype, gen):
    q, k, v = random_qkv(gen, AttentionShape(2, 200, 200, 8, 2, 64), dtype, device)
    before = [t.clone() for t in (q, k, v)]
    first = ops.sparse_attention(q, k, v, return_lse=True, **PATTERNS["all"])
    second = ops.sparse_attention(q, k, v, return_lse=True, **PATTERNS["all"])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "two calls differ"
    for t, t0 in zip((q, k, v), before, strict=True):
        assert torch.equal(t, t0), "the op modified its input"

    T = sum(VARLEN_SEQLENS)
    q, k, v = random_qkv(gen, AttentionShape(1, T, T, 4, 2, 64), dtype, device)
    cu = cu_seqlens(VARLEN_SEQLENS, device)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True, **VARLEN_PATTERNS["all"])
    for a, b in zip(ops.sparse_attention(q, k, v, **kw), ops.sparse_attention(q, k, v, **kw), strict=True):
        assert torch.equal(a, b), "two varlen calls differ"


# --------------------------------------------------------------------------------------------
# Long sequences, checked on sampled rows against a reference built from each row's visible keys.
# --------------------------------------------------------------------------------------------
def reference_rows(q_BSHD, k_BSGD, v_BSGD, rows: list[int], *, softmax_scale=None, **pattern):
    """For query rows `rows` of a dense causal call: (ref out [B, R, H, D] float64, ref lse [B, H, R] float64,
    naive out [B, R, H, D], naive lse [B, H, R]) computed from only the keys each row sees: the reference's
    own rule over keys 0..i gives them, then both attentions run non-causally on exactly those keys. Memory
    O(R x visible keys), never O(S x Sk)."""
    assert pattern.get("causal", True), "reference_rows handles causal calls"
    S, D = q_BSHD.shape[1], q_BSHD.shape[3]
    Sk = k_BSGD.shape[1]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    parts = []
    for r in rows:
        pos = r + Sk - S
        assert pos >= 0, "rows at negative positions see nothing: check them directly"
        keys_K = reference.attention_visible(1, pos + 1, **pattern)[0].nonzero().squeeze(1)
        q_r, k_r, v_r = q_BSHD[:, r : r + 1], k_BSGD[:, keys_K.to(k_BSGD.device)], v_BSGD[:, keys_K.to(v_BSGD.device)]
        ref_out, ref_lse = reference.sparse_attention(
            q_r.cpu(), k_r.cpu(), v_r.cpu(), causal=False, softmax_scale=scale
        )
        naive_out, naive_lse = naive_attention(q_r, k_r, v_r, torch.ones(1, len(keys_K), dtype=torch.bool), scale)
        parts.append((ref_out, ref_lse, naive_out.cpu(), naive_lse.cpu()))
    ref_out, ref_lse, naive_out, naive_lse = zip(*parts, strict=True)
    return torch.cat(ref_out, 1), torch.cat(ref_lse, 2), torch.cat(naive_out, 1), torch.cat(naive_lse, 2)


def sampled_rows(gen: torch.Generator, S: int, count: int, must: tuple[int, ...]) -> list[int]:
    picked = torch.randperm(S, generator=gen)[:count].tolist()
    return sorted(set(picked) | {r for r in must if 0 <= r < S})


@pytest.mark.parametrize("pattern", ["causal", "window", "chunk", "window+global", "all"])
def test_reference_rows_matches_full_reference(pattern, gen):
    """The row-wise reference of the long tests equals the full reference on a small problem."""
    q, k, v = random_qkv(gen, AttentionShape(2, 60, 90, 4, 2, 16), torch.float32, CPU)
    rows = [0, 1, 17, 31, 59]
    full_out, full_lse = reference.sparse_attention(q, k, v, **PATTERNS[pattern])
    ref_out, ref_lse, naive_out, _ = reference_rows(q, k, v, rows, **PATTERNS[pattern])
    # float64 both ways, the same maths over fewer (only the visible) keys: assert_close's float64 defaults.
    torch.testing.assert_close(ref_out, full_out[:, rows])
    torch.testing.assert_close(ref_lse, full_lse[:, :, rows])
    assert naive_out.shape == ref_out.shape


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, pattern",
    [(torch.float32, dict(window=128)), (torch.bfloat16, dict(chunk=256)), (torch.float32, dict(window=64, sinks=4))],
    ids=["float32-window128", "bfloat16-chunk256", "float32-window64+sinks4"],
)
def test_64k_tokens_cpu(dtype, pattern, gen):
    """S = 65536 on the CPU in O(S x window) memory (an S x S float32 tensor would be 16 GiB; the address
    space is capped at +1 GiB), checked on ~64 sampled rows, the first and last rows and chunk edges included."""
    S = LONG_SEQLEN_CPU
    q, k, v = random_qkv(gen, AttentionShape(1, S, S, 2, 1, 64), dtype, CPU)
    with host_allocation_cap(LONG_MEMORY_CAP_BYTES):
        out, lse = ops.sparse_attention(q, k, v, return_lse=True, **pattern)
    rows = sampled_rows(gen, S, LONG_SAMPLED_ROWS, must=(0, 1, 255, 256, 257, S // 2, S - 1))
    ref_out, ref_lse, naive_out, naive_lse = reference_rows(q, k, v, rows, **pattern)
    assert_sparse_attention_close(out[:, rows], naive_out, ref_out, dtype)
    assert_lse_close(lse[:, :, rows], naive_lse, ref_lse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pattern",
    [dict(window=4096), dict(chunk=8192), dict(window=4096, global_stride=1024, sinks=4)],
    ids=["window4096", "chunk8192", "window4096+stride1024+sinks4"],
)
def test_long_context_cuda(pattern, gen):
    """S = 32K, window 4096 / chunk 8192 / the hybrid on CUDA (bf16, Scout's GQA 5), on ~64 sampled rows."""
    S = LONG_SEQLEN_CUDA
    q, k, v = random_qkv(gen, AttentionShape(1, S, S, 10, 2, 128), torch.bfloat16, CUDA)
    out, lse = ops.sparse_attention(q, k, v, return_lse=True, **pattern)
    rows = sampled_rows(gen, S, LONG_SAMPLED_ROWS, must=(0, 4095, 4096, 8191, 8192, 8193, S - 1))
    ref_out, ref_lse, naive_out, naive_lse = reference_rows(q, k, v, rows, **pattern)
    assert_sparse_attention_close(out[:, rows].cpu(), naive_out, ref_out, torch.bfloat16)
    assert_lse_close(lse[:, :, rows], naive_lse, ref_lse, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem, before any work.
# --------------------------------------------------------------------------------------------
BAD_SHAPE = AttentionShape(1, 12, 12, 4, 2, 64)


def _bad_cases():
    """name -> (fn(q, k, v, device) -> (args, kwargs), match, cpu_only)."""

    def with_cu(cq, ck, dtype=torch.int32):
        def build(q, k, v, device):
            tq = torch.tensor(cq, dtype=dtype, device=device)
            tk = torch.tensor(ck, dtype=dtype, device=device)
            return (q, k, v), dict(cu_seqlens_q=tq, cu_seqlens_k=tk)

        return build

    return {
        "q-3d": (lambda q, k, v, d: ((q[0], k, v), {}), r"q must be 4-D", False),
        "k-3d": (lambda q, k, v, d: ((q, k[0], v), {}), r"k must be 4-D", False),
        "kv-shape-mismatch": (lambda q, k, v, d: ((q, k, v[:, :7]), {}), r"same shape", False),
        "k-batch": (lambda q, k, v, d: ((q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)), {}), r"\bk\b", False),
        "k-head-dim": (lambda q, k, v, d: ((q, k[..., :32], v[..., :32]), {}), r"\bk\b", False),
        "int-dtype": (lambda q, k, v, d: ((q.to(torch.int32), k, v), {}), r"bfloat16|dtype", False),
        "mixed-dtypes": (lambda q, k, v, d: ((q, k.to(torch.float64), v), {}), r"dtype|bfloat16", False),
        "mixed-half-dtypes": (
            lambda q, k, v, d: ((q.half(), k.bfloat16(), v.bfloat16()), {}),
            r"share a dtype",
            False,
        ),
        "gqa-not-integral": (
            lambda q, k, v, d: ((torch.cat([q, q[:, :, :2]], 2), k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1)), {}),
            r"GQA|multiple",
            False,
        ),
        "q-stride-d": (lambda q, k, v, d: ((q.repeat(1, 1, 1, 2)[..., ::2], k, v), {}), r"unit stride", False),
        "v-stride-d": (lambda q, k, v, d: ((q, k, v.repeat(1, 1, 1, 2)[..., ::2]), {}), r"unit stride", False),
        "window-0": (lambda q, k, v, d: ((q, k, v), dict(window=0)), r"window", False),
        "window-neg": (lambda q, k, v, d: ((q, k, v), dict(window=-3)), r"window", False),
        "chunk-0": (lambda q, k, v, d: ((q, k, v), dict(chunk=0)), r"chunk", False),
        "global-stride-neg": (lambda q, k, v, d: ((q, k, v), dict(global_stride=-1)), r"global_stride", False),
        "global-stride-0": (lambda q, k, v, d: ((q, k, v), dict(global_stride=0)), r"global_stride", False),
        "sinks-neg": (lambda q, k, v, d: ((q, k, v), dict(sinks=-1)), r"sinks", False),
        "window-over-int32": (lambda q, k, v, d: ((q, k, v), dict(window=2**31)), r"int32", False),
        "scale-0": (lambda q, k, v, d: ((q, k, v), dict(softmax_scale=0.0)), r"softmax_scale", False),
        "scale-neg": (lambda q, k, v, d: ((q, k, v), dict(softmax_scale=-0.1)), r"softmax_scale", False),
        "scale-nan": (lambda q, k, v, d: ((q, k, v), dict(softmax_scale=float("nan"))), r"softmax_scale", False),
        "scale-inf": (lambda q, k, v, d: ((q, k, v), dict(softmax_scale=float("inf"))), r"softmax_scale", False),
        "cu-only-q": (
            lambda q, k, v, d: ((q, k, v), dict(cu_seqlens_q=torch.tensor([0, 12], dtype=torch.int32, device=d))),
            r"cu_seqlens",
            False,
        ),
        "cu-only-k": (
            lambda q, k, v, d: ((q, k, v), dict(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32, device=d))),
            r"cu_seqlens",
            False,
        ),
        "cu-int64": (with_cu([0, 5, 12], [0, 5, 12], torch.int64), r"int32", False),
        "cu-2d": (with_cu([[0, 5, 12]], [[0, 5, 12]]), r"1-D", False),
        "cu-lengths-differ": (with_cu([0, 5, 12], [0, 12]), r"same length", False),
        "cu-batch-2": (
            lambda q, k, v, d: (
                (q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)),
                dict(
                    cu_seqlens_q=torch.tensor([0, 12], dtype=torch.int32, device=d),
                    cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32, device=d),
                ),
            ),
            r"B = 1",
            False,
        ),
        # The CUDA op keeps cu_seqlens on the device (no host sync): only the CPU op checks their values.
        "cu-not-from-0": (with_cu([1, 5, 12], [1, 5, 12]), r"start at 0", True),
        "cu-decreasing": (with_cu([0, 8, 5, 12], [0, 8, 5, 12]), r"non-decreasing", True),
        "cu-q-not-ending-at-S": (with_cu([0, 5, 11], [0, 5, 12]), r"end at S", True),
        "cu-k-not-ending-at-Sk": (with_cu([0, 5, 12], [0, 5, 13]), r"end at", True),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("device, dtype", [p for p in DEVICE_DTYPES if p.id in ("cpu-float32", "cuda-bfloat16")])
def test_bad_input(case, device, dtype, gen):
    build, match, cpu_only = BAD_CASES[case]
    if cpu_only and device.type != "cpu":
        pytest.skip("the CUDA op does not read cu_seqlens on the host")
    q, k, v = random_qkv(gen, BAD_SHAPE, dtype, device)
    args, kwargs = build(q, k, v, device)
    with pytest.raises(ERRORS, match=match):
        ops.sparse_attention(*args, **kwargs)


def test_bad_mask_arguments_are_value_errors():
    """The wrapper rejects a disabled-by-zero or negative pattern size as ValueError naming it."""
    q, k, v = random_qkv(torch.Generator().manual_seed(0), BAD_SHAPE, torch.float32, CPU)
    for name, value in [("window", 0), ("chunk", 0), ("global_stride", -1), ("sinks", -1)]:
        with pytest.raises(ValueError, match=name):
            ops.sparse_attention(q, k, v, **{name: value})


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [CUDA_UNSUPPORTED_HEAD_DIM, 32, 256])
def test_cuda_unsupported_head_dim(head_dim, gen):
    q, k, v = random_qkv(gen, AttentionShape(1, 16, 16, 2, 1, head_dim), torch.bfloat16, CUDA)
    with pytest.raises(ERRORS, match=rf"head_dim|head dim|\b{head_dim}\b"):
        ops.sparse_attention(q, k, v)


@pytest.mark.gpu
def test_cuda_rejects_float32_and_mixed_devices(gen):
    q, k, v = random_qkv(gen, BAD_SHAPE, torch.float32, CUDA)
    with pytest.raises(ERRORS, match=r"bfloat16|float16|Float"):
        ops.sparse_attention(q, k, v)
    q, k, v = random_qkv(gen, BAD_SHAPE, torch.bfloat16, CUDA)
    with pytest.raises(ERRORS, match=r"cuda|cpu|device"):
        ops.sparse_attention(q, k.cpu(), v)
    cu = torch.tensor([0, 12], dtype=torch.int32)  # on the host
    with pytest.raises(ERRORS, match=r"cu_seqlens"):
        ops.sparse_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


# --------------------------------------------------------------------------------------------
# A real torch op: opcheck, torch.compile.
# --------------------------------------------------------------------------------------------
OPCHECK_CASES = {
    # name: (shape, seqlens or None, causal, window, chunk, global_stride, sinks, softmax_scale)
    "dense-chunk": (AttentionShape(2, 33, 33, 4, 2, 64), None, True, 0, 16, 0, 0, 0.125),
    "dense-hybrid-sk": (AttentionShape(1, 20, 45, 5, 1, 64), None, True, 8, 0, 6, 2, 0.2),
    "dense-full": (AttentionShape(1, 17, 17, 2, 2, 128), None, False, 0, 0, 0, 0, 0.09),
    "varlen-all": (AttentionShape(1, 40, 40, 4, 2, 64), [3, 0, 17, 20], True, 5, 16, 7, 2, 0.125),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
@pytest.mark.parametrize("device, dtype", [p for p in DEVICE_DTYPES if p.id in ("cpu-float32", "cuda-bfloat16")])
def test_opcheck(case, device, dtype, gen):
    shape, seqlens, causal, window, chunk, stride, sinks, scale = OPCHECK_CASES[case]
    q, k, v = random_qkv(gen, shape, dtype, device)
    cu = None if seqlens is None else cu_seqlens(seqlens, device)
    torch.library.opcheck(
        torch.ops.llama4.sparse_attention_fwd.default, (q, k, v, cu, cu, causal, window, chunk, stride, sinks, scale)
    )


def _attention_layer(q, k, v, cu):
    # Use the result, as a model would: an output projection stand-in and the lse a combine step reads.
    out, lse = ops.sparse_attention(
        q, k, v, window=8, global_stride=5, sinks=1, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True
    )
    return out.float().sum(-1) * 2.0, lse.exp()


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("device, dtype", [p for p in DEVICE_DTYPES if p.id in ("cpu-float32", "cuda-bfloat16")])
def test_compile_fullgraph(varlen, device, dtype, gen):
    compiled = torch.compile(_attention_layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (37, 50):  # two sizes: the dynamic graph serves both
        q, k, v = random_qkv(gen, AttentionShape(1, T, T, 4, 2, 64), dtype, device)
        cu = cu_seqlens([T - 20, 0, 20], device) if varlen else None
        for got, want in zip(compiled(q, k, v, cu), _attention_layer(q, k, v, cu), strict=True):
            assert torch.equal(got, want)
