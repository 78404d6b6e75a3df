"""The backward of engine.ops.sparse_attention (torch.ops.llama4.sparse_attention_bwd, through the autograd formula
registered on sparse_attention_fwd) against float64 autograd of the dense oracle engine.ops.reference.sparse_attention:
every mask pattern and their unions, window / chunk / stride edges, rows and keys with no visible partner (exactly
zero gradient), GQA 1 / 5 / 8, S != Sk, ragged varlen, a gradient flowing into lse, gradcheck in float64, a 64K-token
CPU case in O(S x window) memory, bad input, opcheck, torch.compile and determinism.
Legend: B batch, S query rows, Sk keys, H query heads, G kv heads, D head dim.

Tolerance (tests/tolerances.py, FlashAttention's rule per gradient): max|grad - ref64| <= 2 * max|naive - ref64| +
floor, where naive is plain torch autograd of the dense masked attention in the input dtype (test_sparse_attention's
naive_attention), and the floor is the dtype's rounding of the reference values (plus 1e-5 x max(1, max|ref|) for
float32 inputs: tolerances.sparse_attention_grad_tolerance).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from memory_caps import host_allocation_cap
from test_sparse_attention import (
    BAD_SHAPE,
    CPU,
    CUDA,
    EDGE_SHAPE,
    ERRORS,
    OPCHECK_CASES,
    PATTERN_SHAPE,
    PATTERNS,
    SHAPE_PATTERNS,
    STRIDE_SINK_EDGES,
    VARLEN_PATTERNS,
    VARLEN_SEQLENS,
    VARLEN_SEQLENS_K,
    VARLEN_SEQLENS_Q,
    cu_seqlens,
    dtype_id,
    naive_attention,
    pattern_id,
    random_qkv,
    visible_mask,
)
from test_sparse_attention import DEVICE_DTYPES as FORWARD_DEVICE_DTYPES
from tolerances import assert_sparse_attention_grad_close

from bench.shapes import ATTENTION_TEST, ATTENTION_TEST_CUDA, AttentionShape
from engine import ops
from engine.ops import reference

CUDA_DTYPES = [torch.bfloat16, torch.float16]
# CPU: float32 (the precise path) and bfloat16 (the FlashAttention rule); float16 shares bfloat16's code path
# and its dense CPU yardstick is slow, so it runs in the GQA sweep only. CUDA: bfloat16 and float16.
DEVICE_DTYPES = [p for p in FORWARD_DEVICE_DTYPES if p.id != "cpu-float16"]
ALL_DEVICE_DTYPES = DEVICE_DTYPES + [p for p in FORWARD_DEVICE_DTYPES if p.id == "cpu-float16"]
ONE_PER_DEVICE = [p for p in DEVICE_DTYPES if p.id in ("cpu-float32", "cuda-bfloat16")]
GRAD_NAMES = ("dq", "dk", "dv")


# --------------------------------------------------------------------------------------------
# The check: forward + backward through autograd, against float64 autograd of the reference.
# --------------------------------------------------------------------------------------------
def random_upstream(gen, q, *, lse_grad: bool):
    """dout [B, S, H, D] in q's dtype, and dlse [B, H, S] float32 (or None): the gradients flowing into (out, lse)."""
    B, S, H, D = q.shape
    dout = torch.randn(B, S, H, D, generator=gen).to(q.dtype).to(q.device)
    dlse = torch.randn(B, H, S, generator=gen).to(q.device) if lse_grad else None
    return dout, dlse


def _loss(out, lse, dout, dlse, finite_BHS):
    """sum(out * dout) (+ sum(lse * dlse) over the rows that have a key), in out's precision or better."""
    acc = torch.promote_types(out.dtype, torch.float32)
    loss = (out.to(acc) * dout.to(acc)).sum()
    if dlse is not None:
        loss = loss + (lse.to(acc).where(finite_BHS, 0.0) * dlse.to(acc)).sum()
    return loss


def kernel_grads(q, k, v, dout, dlse, *, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None, **pattern):
    """(dq, dk, dv) of the op through autograd, and its (out, lse)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
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
    loss = _loss(out, lse, dout, dlse, lse.detach().isfinite())
    grads = torch.autograd.grad(loss, (q, k, v))
    return grads, (out.detach(), lse.detach())


def reference_grads(q, k, v, dout, dlse, *, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None, **pattern):
    """float64 autograd of the dense reference, on q's device (float64 on a GPU keeps the long CUDA cases'
    sub-problems fast): (dq, dk, dv) float64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.sparse_attention(
        q64, k64, v64, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, **pattern
    )
    dl = None if dlse is None else dlse.double()
    loss = _loss(out, lse, dout.double(), dl, lse.detach().isfinite())
    return torch.autograd.grad(loss, (q64, k64, v64))


def naive_grads(q, k, v, dout, dlse, *, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None, **pattern):
    """Plain torch autograd of the dense masked attention in q's dtype on q's device: the tolerance's yardstick."""
    S, D, Sk = q.shape[1], q.shape[3], k.shape[1]
    cpu_cu = [None if t is None else t.cpu() for t in (cu_seqlens_q, cu_seqlens_k)]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(q, k, v, visible_mask(S, Sk, *cpu_cu, **pattern), scale)
    loss = (out * dout).sum()  # in the dtype, as a plain user's backward would be
    if dlse is not None:
        finite = lse.detach().isfinite()
        loss = loss + (lse.where(finite, 0.0) * dlse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v))


def check_grads(q, k, v, gen, *, lse_grad: bool = False, **kwargs):
    """Runs forward + backward, checks layout and each gradient against the rule; returns (dq, dk, dv)."""
    dout, dlse = random_upstream(gen, q, lse_grad=lse_grad)
    grads, _ = kernel_grads(q, k, v, dout, dlse, **kwargs)
    ref = reference_grads(q, k, v, dout, dlse, **kwargs)
    naive = naive_grads(q, k, v, dout, dlse, **kwargs)
    for name, g, t, r, nv in zip(GRAD_NAMES, grads, (q, k, v), ref, naive, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype and g.device == t.device, (name, g.shape, g.dtype)
        assert_sparse_attention_grad_close(name, g, nv, r, q.dtype)
    return grads


def assert_grads_equivalent(a, b, device) -> None:
    """Two kernel gradients of the same visible sets: bitwise on CPU (same pairs in the same order); on CUDA the
    tiles visited may differ, so within a float32 accumulation's rounding of the larger one."""
    for name, x, y in zip(GRAD_NAMES, a, b, strict=True):
        if device.type == "cpu":
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=torch.finfo(x.dtype).eps, atol=torch.finfo(x.dtype).eps, msg=name)


# --------------------------------------------------------------------------------------------
# Every pattern and their unions; the shape sweep; GQA; head dims; scales.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_patterns(pattern, device, dtype, gen):
    q, k, v = random_qkv(gen, PATTERN_SHAPE, dtype, device)
    check_grads(q, k, v, gen, **PATTERNS[pattern])


@pytest.mark.parametrize("pattern", ["causal", "window16+stride10", "all", "full+chunk16"])
@pytest.mark.parametrize("device, dtype", ONE_PER_DEVICE + [p for p in DEVICE_DTYPES if p.id == "cpu-bfloat16"])
@pytest.mark.parametrize("shape", ATTENTION_TEST, ids=lambda s: s.id)
def test_shapes(shape, device, dtype, pattern, gen):
    q, k, v = random_qkv(gen, shape, dtype, device)
    check_grads(q, k, v, gen, **SHAPE_PATTERNS[pattern])


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["causal", "window16+stride10", "all", "full+chunk16"])
@pytest.mark.parametrize("shape", ATTENTION_TEST_CUDA, ids=lambda s: s.id)
def test_shapes_cuda_tile_sizes(shape, pattern, gen):
    q, k, v = random_qkv(gen, shape, torch.bfloat16, CUDA)
    check_grads(q, k, v, gen, **SHAPE_PATTERNS[pattern])


# GQA ratios H / G = 1, 5 (Scout), 8 (Maverick-like): dk / dv sum over the query heads of a kv head.
GQA_HEADS = {"gqa1": (4, 4), "gqa5": (10, 2), "gqa8": (8, 1)}


@pytest.mark.parametrize("pattern", ["causal", "window+global", "chunk+sinks"])
@pytest.mark.parametrize("gqa", list(GQA_HEADS))
@pytest.mark.parametrize("device, dtype", ALL_DEVICE_DTYPES)
def test_gqa(gqa, pattern, device, dtype, gen):
    H, G = GQA_HEADS[gqa]
    q, k, v = random_qkv(gen, AttentionShape(2, 97, 97, H, G, 64), dtype, device)
    check_grads(q, k, v, gen, **PATTERNS[pattern])


def test_gqa_sums_over_group(gen):
    """dk / dv of a GQA call equal the sums over each group of the same call with the kv heads repeated (H = G)."""
    H, G = 6, 2
    q, k, v = random_qkv(gen, AttentionShape(1, 50, 50, H, G, 16), torch.float64, CPU)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    (dq, dk, dv), _ = kernel_grads(q, k, v, dout, None, **PATTERNS["all"])
    k_rep, v_rep = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
    (dq_rep, dk_rep, dv_rep), _ = kernel_grads(q, k_rep, v_rep, dout, None, **PATTERNS["all"])
    torch.testing.assert_close(dq, dq_rep)
    torch.testing.assert_close(dk, dk_rep.unflatten(2, (G, H // G)).sum(3))
    torch.testing.assert_close(dv, dv_rep.unflatten(2, (G, H // G)).sum(3))


HEAD_DIM_CASES = [pytest.param(CPU, torch.float32, d, id=f"cpu-float32-D{d}") for d in (1, 16, 40, 128, 256)]
HEAD_DIM_CASES += [pytest.param(CPU, torch.bfloat16, d, id=f"cpu-bfloat16-D{d}") for d in (40, 256)]
HEAD_DIM_CASES += [
    pytest.param(CUDA, dt, d, id=f"cuda-{dtype_id(dt)}-D{d}", marks=pytest.mark.gpu)
    for dt in CUDA_DTYPES
    for d in (64, 128)
]


@pytest.mark.parametrize("pattern", ["causal", "window+global", "full+all"])
@pytest.mark.parametrize("device, dtype, head_dim", HEAD_DIM_CASES)
def test_head_dims(device, dtype, head_dim, pattern, gen):
    q, k, v = random_qkv(gen, AttentionShape(1, 90, 90, 4, 2, head_dim), dtype, device)
    check_grads(q, k, v, gen, **PATTERNS[pattern])


@pytest.mark.parametrize("softmax_scale", [1.0, 0.01])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_softmax_scale(softmax_scale, device, dtype, gen):
    """1.0 with D = 128: a sharp softmax (p near 0 / 1, dS from cancelling terms); 0.01: a flat one."""
    q, k, v = random_qkv(gen, AttentionShape(1, 200, 200, 4, 2, 128), dtype, device)
    check_grads(q, k, v, gen, softmax_scale=softmax_scale, **PATTERNS["window+global"])


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_large_query_magnitude(device, dtype, gen):
    """q scaled by 8: scores up to ~ +-60; p = exp(s - lse) must not overflow."""
    q, k, v = random_qkv(gen, AttentionShape(1, 150, 150, 2, 1, 64), dtype, device, scale_q=8.0)
    check_grads(q, k, v, gen, **PATTERNS["all"])


# --------------------------------------------------------------------------------------------
# A gradient flowing into lse (delta -= dlse).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["causal", "window+global", "chunk+sinks", "full+all"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_lse_gradient(pattern, device, dtype, gen):
    q, k, v = random_qkv(gen, PATTERN_SHAPE, dtype, device)
    check_grads(q, k, v, gen, lse_grad=True, **PATTERNS[pattern])


@pytest.mark.parametrize("device, dtype", ONE_PER_DEVICE)
def test_lse_gradient_rows_without_keys_and_varlen(device, dtype, gen):
    """dlse on rows with no key (lse = -inf, excluded from the loss by where()) and across packed sequences."""
    S, Sk = sum(VARLEN_SEQLENS_Q), sum(VARLEN_SEQLENS_K)
    q, k, v = random_qkv(gen, AttentionShape(1, S, Sk, 4, 2, 64), dtype, device)
    cu_q, cu_k = cu_seqlens(VARLEN_SEQLENS_Q, device), cu_seqlens(VARLEN_SEQLENS_K, device)
    check_grads(q, k, v, gen, lse_grad=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **VARLEN_PATTERNS["all"])


# --------------------------------------------------------------------------------------------
# Edges of the window, the chunk, the stride and the sinks.
# --------------------------------------------------------------------------------------------
EDGE_S = EDGE_SHAPE.seqlen_q


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_window_one(device, dtype, gen):
    """window = 1: p = 1 on the query's own key, so dS = p (dout.v - dout.out) = 0: dq = dk = 0 (the reference's,
    so check_grads bounds |dq|, |dk| by the rounding floor alone) and dv sums dout over the group's heads."""
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    check_grads(q, k, v, gen, window=1)


@pytest.mark.parametrize("window", [EDGE_S - 1, EDGE_S, EDGE_S + 5, 10 * EDGE_S], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_window_edges(window, device, dtype, gen):
    """W = S - 1 drops only key 0 from the last row; W >= S is plain causal."""
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    check_grads(q, k, v, gen, window=window)
    if window >= EDGE_S:
        dout, _ = random_upstream(gen, q, lse_grad=False)
        windowed, _ = kernel_grads(q, k, v, dout, None, window=window)
        causal, _ = kernel_grads(q, k, v, dout, None)
        assert_grads_equivalent(windowed, causal, device)


@pytest.mark.parametrize("chunk", [16, EDGE_S - 1, EDGE_S, 4 * EDGE_S], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_chunk_edges(chunk, device, dtype, gen):
    """Chunks that do not divide S (16, S - 1), one chunk (S) and a chunk past the end (4S, plain causal)."""
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    check_grads(q, k, v, gen, chunk=chunk)


@pytest.mark.parametrize("device, dtype", ONE_PER_DEVICE)
def test_chunks_do_not_leak(device, dtype, gen):
    """chunk = 16, S = 40: with dout zero on the rows of chunks 1 and 2, the keys of those chunks and those rows
    get exactly zero gradient, and the gradients of chunk 0 do not change when chunks 1 and 2 change."""
    C, S = 16, 40
    q, k, v = random_qkv(gen, AttentionShape(1, S, S, 4, 2, 64), dtype, device)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    dout[:, C:] = 0
    (dq, dk, dv), _ = kernel_grads(q, k, v, dout, None, chunk=C)
    for g in (dq, dk, dv):
        assert torch.equal(g[:, C:], torch.zeros_like(g[:, C:]))
        assert g[:, :C].abs().sum() > 0
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, C:] = torch.randn(t[:, C:].shape, generator=gen).to(dtype).to(device)
    (dq2, dk2, dv2), _ = kernel_grads(q2, k2, v2, dout, None, chunk=C)
    for a, b in zip((dq, dk, dv), (dq2, dk2, dv2), strict=True):
        assert torch.equal(a[:, :C], b[:, :C])


@pytest.mark.parametrize(
    "pattern",
    [
        dict(global_stride=1),
        dict(global_stride=EDGE_S + 10),  # only key 0 is visible: out = v[0], dq = dk = 0
        *STRIDE_SINK_EDGES,
    ],
    ids=pattern_id,
)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_stride_and_sink_edges(pattern, device, dtype, gen):
    q, k, v = random_qkv(gen, EDGE_SHAPE, dtype, device)
    check_grads(q, k, v, gen, **pattern)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_queries_at_end_of_keys(device, dtype, gen):
    """S = 5 queries over Sk = 40 keys, causal + chunk 16: keys 0..31 are outside every query's chunk and get
    exactly zero gradient."""
    q, k, v = random_qkv(gen, AttentionShape(1, 5, 40, 2, 1, 64), dtype, device)
    _, dk, dv = check_grads(q, k, v, gen, chunk=16)
    assert torch.equal(dk[:, :32], torch.zeros_like(dk[:, :32]))
    assert torch.equal(dv[:, :32], torch.zeros_like(dv[:, :32]))


# --------------------------------------------------------------------------------------------
# Rows with no visible key and keys no query sees: exactly zero gradient.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern", [dict(), dict(window=3), dict(chunk=4, sinks=1), dict(causal=False, chunk=4)], ids=str
)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_rows_without_keys(pattern, device, dtype, gen):
    """S = 40 > Sk = 5: rows 0..34 sit at negative positions and (causal, or a chunk) see nothing: their dq is
    exactly 0, never NaN, even with a gradient on lse (which is -inf there)."""
    S, Sk = 40, 5
    q, k, v = random_qkv(gen, AttentionShape(2, S, Sk, 4, 2, 64), dtype, device)
    dq, _, _ = check_grads(q, k, v, gen, lse_grad=True, **pattern)
    empty = S - Sk
    assert torch.equal(dq[:, :empty], torch.zeros_like(dq[:, :empty]))


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_keys_nobody_sees(device, dtype, gen):
    """S = 10 queries at positions 90..99 over Sk = 100 keys with window 8: keys 0..82 are out of every window."""
    q, k, v = random_qkv(gen, AttentionShape(1, 10, 100, 4, 2, 64), dtype, device)
    _, dk, dv = check_grads(q, k, v, gen, window=8)
    assert torch.equal(dk[:, :83], torch.zeros_like(dk[:, :83]))
    assert torch.equal(dv[:, :83], torch.zeros_like(dv[:, :83]))
    assert (dv[:, 83:].abs().sum((2, 3)) > 0).all(), "every key 83..99 is seen by some query"


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_no_keys_at_all(device, dtype, gen):
    """Sk = 0: zero dq; empty dk / dv."""
    q, k, v = random_qkv(gen, AttentionShape(1, 7, 0, 2, 1, 64), dtype, device)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    (dq, dk, dv), _ = kernel_grads(q, k, v, dout, None, causal=False)
    assert torch.equal(dq, torch.zeros_like(dq))
    assert dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_no_queries(device, dtype, gen):
    """S = 0: empty dq; zero dk / dv."""
    q, k, v = random_qkv(gen, AttentionShape(2, 0, 9, 2, 1, 64), dtype, device)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    (dq, dk, dv), _ = kernel_grads(q, k, v, dout, None, window=4)
    assert dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


# --------------------------------------------------------------------------------------------
# Varlen (cu_seqlens, B = 1): ragged sequences.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", list(VARLEN_PATTERNS))
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_varlen(pattern, device, dtype, gen):
    """Packed sequences of lengths 1, 0, 37, 16, 100, 15, 17: each one's gradients equal those of the sequence
    run alone (no gradient crosses a sequence boundary)."""
    T = sum(VARLEN_SEQLENS)
    q, k, v = random_qkv(gen, AttentionShape(1, T, T, 4, 2, 64), dtype, device)
    cu = cu_seqlens(VARLEN_SEQLENS, device)
    check_grads(q, k, v, gen, cu_seqlens_q=cu, cu_seqlens_k=cu, **VARLEN_PATTERNS[pattern])
    dout, _ = random_upstream(gen, q, lse_grad=False)
    packed, _ = kernel_grads(q, k, v, dout, None, cu_seqlens_q=cu, cu_seqlens_k=cu, **VARLEN_PATTERNS[pattern])
    starts = cu.tolist()
    for s0, s1 in itertools.pairwise(starts):
        if s1 == s0:
            continue
        alone, _ = kernel_grads(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], dout[:, s0:s1], None, **VARLEN_PATTERNS[pattern])
        assert_grads_equivalent([g[:, s0:s1] for g in packed], alone, device)


@pytest.mark.parametrize("pattern", ["causal", "chunk16", "all", "full+chunk16"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_varlen_queries_after_prefix(pattern, device, dtype, gen):
    """Per-sequence Sk != S: a sequence with queries and no keys (zero dq), one with keys and no queries (zero
    dk / dv)."""
    S, Sk = sum(VARLEN_SEQLENS_Q), sum(VARLEN_SEQLENS_K)
    q, k, v = random_qkv(gen, AttentionShape(1, S, Sk, 4, 2, 64), dtype, device)
    cu_q, cu_k = cu_seqlens(VARLEN_SEQLENS_Q, device), cu_seqlens(VARLEN_SEQLENS_K, device)
    dq, dk, dv = check_grads(q, k, v, gen, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **VARLEN_PATTERNS[pattern])
    last = S - VARLEN_SEQLENS_Q[-1]  # the last sequence has no keys
    assert torch.equal(dq[:, last:], torch.zeros_like(dq[:, last:]))
    no_q = slice(cu_k[2].item(), cu_k[3].item())  # the third sequence has keys and no queries
    assert torch.equal(dk[:, no_q], torch.zeros_like(dk[:, no_q]))
    assert torch.equal(dv[:, no_q], torch.zeros_like(dv[:, no_q]))


# --------------------------------------------------------------------------------------------
# The public backward op; layouts; determinism.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_public_bwd_matches_autograd(device, dtype, gen):
    """engine.ops.sparse_attention_bwd on the forward's (out, lse) gives what autograd gives, bitwise."""
    q, k, v = random_qkv(gen, AttentionShape(2, 120, 120, 4, 2, 64), dtype, device)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    pattern = PATTERNS["all"]
    grads, (out, lse) = kernel_grads(q, k, v, dout, None, **pattern)
    direct = ops.sparse_attention_bwd(dout, q, k, v, out, lse, **pattern)
    for name, a, b in zip(GRAD_NAMES, grads, direct, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_strided_views(device, dtype, gen):
    """q, k, v as views of a packed qkv projection [B, S, H + 2G, D]: the gradients equal those of contiguous
    copies. out.sum() hands the backward an expanded (stride-0) dout: the same as a contiguous dout of ones."""
    B, S, H, G, D = 2, 70, 4, 2, 64
    qkv = torch.randn(B, S, H + 2 * G, D, generator=gen).to(dtype).to(device)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + G], qkv[:, :, H + G :]
    assert not q.is_contiguous()
    check_grads(q, k, v, gen, **PATTERNS["all"])
    dout, _ = random_upstream(gen, q, lse_grad=False)
    views, _ = kernel_grads(q, k, v, dout, None, **PATTERNS["all"])
    copies, _ = kernel_grads(q.contiguous(), k.contiguous(), v.contiguous(), dout, None, **PATTERNS["all"])
    assert_grads_equivalent(views, copies, device)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expanded = torch.autograd.grad(ops.sparse_attention(*leaves, **PATTERNS["all"]).sum(), leaves)
    ones, _ = kernel_grads(q, k, v, torch.ones_like(dout), None, **PATTERNS["all"])
    assert_grads_equivalent(expanded, ones, device)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_deterministic(device, dtype, gen):
    """deterministic=True: two backward runs are bitwise equal (dq included), and inputs are untouched."""
    q, k, v = random_qkv(gen, AttentionShape(2, 300, 300, 8, 2, 64), dtype, device)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    out, lse = ops.sparse_attention(q, k, v, return_lse=True, **PATTERNS["all"])
    inputs = (dout, q, k, v, out, lse)
    before = [t.clone() for t in inputs]
    first = ops.sparse_attention_bwd(*inputs, deterministic=True, **PATTERNS["all"])
    second = ops.sparse_attention_bwd(*inputs, deterministic=True, **PATTERNS["all"])
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"two deterministic backward runs differ in {name}"
    for t, t0 in zip(inputs, before, strict=True):
        assert torch.equal(t, t0), "the backward modified an input"


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["causal", "window+global"])
def test_deterministic_cuda_long(pattern, gen):
    """Bitwise repeatable on CUDA at a size where many blocks contribute to every dq / dk row (S = 4096)."""
    q, k, v = random_qkv(gen, AttentionShape(1, 4096, 4096, 10, 2, 128), torch.bfloat16, CUDA)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    pat = dict(window=512, global_stride=64) if pattern == "window+global" else {}
    out, lse = ops.sparse_attention(q, k, v, return_lse=True, **pat)
    first = ops.sparse_attention_bwd(dout, q, k, v, out, lse, deterministic=True, **pat)
    for _ in range(2):
        again = ops.sparse_attention_bwd(dout, q, k, v, out, lse, deterministic=True, **pat)
        for name, a, b in zip(GRAD_NAMES, first, again, strict=True):
            assert torch.equal(a, b), f"two deterministic backward runs differ in {name}"


@pytest.mark.gpu
def test_nondeterministic_cuda_is_still_correct(gen):
    """deterministic=False may reorder the accumulation, never change the answer beyond the rule."""
    q, k, v = random_qkv(gen, AttentionShape(1, 1024, 1024, 8, 2, 128), torch.bfloat16, CUDA)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    out, lse = ops.sparse_attention(q, k, v, return_lse=True, **PATTERNS["window+global"])
    grads = ops.sparse_attention_bwd(dout, q, k, v, out, lse, deterministic=False, **PATTERNS["window+global"])
    ref = reference_grads(q, k, v, dout, None, **PATTERNS["window+global"])
    naive = naive_grads(q, k, v, dout, None, **PATTERNS["window+global"])
    for name, g, r, nv in zip(GRAD_NAMES, grads, ref, naive, strict=True):
        assert_sparse_attention_grad_close(name, g, nv, r, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# gradcheck (float64, CPU): the analytical backward against finite differences of the op itself.
# --------------------------------------------------------------------------------------------
GRADCHECK_CASES = {
    # name: (shape, seqlens or None, pattern)
    "causal": (AttentionShape(1, 9, 9, 2, 1, 4), None, dict()),
    "full": (AttentionShape(1, 6, 8, 2, 2, 3), None, dict(causal=False)),
    "window": (AttentionShape(2, 9, 9, 2, 1, 4), None, dict(window=3)),
    "chunk+sinks": (AttentionShape(1, 11, 11, 3, 1, 4), None, dict(chunk=4, sinks=1)),
    "window+global": (AttentionShape(1, 12, 12, 2, 2, 4), None, dict(window=2, global_stride=5)),
    "full+all": (AttentionShape(1, 10, 10, 2, 1, 4), None, dict(causal=False, window=2, chunk=4, global_stride=3)),
    "s-gt-sk": (AttentionShape(1, 8, 4, 2, 1, 4), None, dict(chunk=2)),  # rows without keys
    "varlen": (AttentionShape(1, 14, 14, 2, 1, 4), [3, 0, 6, 5], dict(window=2, chunk=4, global_stride=3, sinks=1)),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_float64(case, gen):
    shape, seqlens, pattern = GRADCHECK_CASES[case]
    q, k, v = (t.requires_grad_() for t in random_qkv(gen, shape, torch.float64, CPU))
    cu = None if seqlens is None else cu_seqlens(seqlens, CPU)

    def attention(q, k, v):
        return ops.sparse_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, softmax_scale=0.7, **pattern)

    # lse is float32 even for float64 inputs (the schema), so the backward's p = exp(s - lse) carries ~1e-7
    # relative error: far inside gradcheck's default atol = 1e-5, rtol = 1e-3.
    assert torch.autograd.gradcheck(attention, (q, k, v))


# --------------------------------------------------------------------------------------------
# A long CPU sequence in O(S x window) memory, checked on key / query blocks against a local reference.
# --------------------------------------------------------------------------------------------
LONG_SEQLEN_CPU = 65536
LONG_WINDOW = 64
LONG_MEMORY_CAP_BYTES = 1 << 30  # the float32 copies and gradients are ~300 MiB; S x S float32 would be 16 GiB
LONG_CHECKED_KEY_BLOCKS = (0, 1000, 32768, LONG_SEQLEN_CPU - 100)
LONG_KEY_BLOCK = 100


@pytest.mark.slow
def test_64k_tokens_cpu(gen):
    """S = 65536, window 64 on the CPU in O(S x window) memory (the address space is capped at +1 GiB). A window
    is translation invariant, so for keys [c, c + n) the sub-problem with queries [c, c + n + W - 1) (every query
    that sees them) and keys [c - W + 1, c + n + W - 1) (every key those queries see) gives their exact dk / dv
    and those queries' dq: checked against float64 autograd of the reference on that sub-problem."""
    S, W, n = LONG_SEQLEN_CPU, LONG_WINDOW, LONG_KEY_BLOCK
    q, k, v = random_qkv(gen, AttentionShape(1, S, S, 2, 1, 64), torch.float32, CPU)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    with host_allocation_cap(LONG_MEMORY_CAP_BYTES):
        (dq, dk, dv), _ = kernel_grads(q, k, v, dout, None, window=W)
    for c in LONG_CHECKED_KEY_BLOCKS:
        q0, q1 = c, min(S, c + n + W - 1)
        k0 = max(0, c - W + 1)
        sub = (q[:, q0:q1], k[:, k0:q1], v[:, k0:q1], dout[:, q0:q1], None)
        ref = reference_grads(*sub, window=W)
        naive = naive_grads(*sub, window=W)
        kc = slice(c - k0, c - k0 + n)  # keys [c, c + n) within the sub-problem
        assert_sparse_attention_grad_close("dq", dq[:, q0:q1], naive[0], ref[0], torch.float32)
        assert_sparse_attention_grad_close("dk", dk[:, c : c + n], naive[1][:, kc], ref[1][:, kc], torch.float32)
        assert_sparse_attention_grad_close("dv", dv[:, c : c + n], naive[2][:, kc], ref[2][:, kc], torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [dict(window=4096), dict(chunk=8192)], ids=["window4096", "chunk8192"])
def test_long_context_cuda(pattern, gen):
    """S = 32K bf16 with Scout's GQA 5: the key blocks [c, c + 128) at chunk / window boundaries, checked on the
    sub-problem of every query that sees them (translation invariant for the window; chunk-aligned for the chunk)."""
    S, n = 32768, 128
    q, k, v = random_qkv(gen, AttentionShape(1, S, S, 10, 2, 128), torch.bfloat16, CUDA)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    (dq, dk, dv), _ = kernel_grads(q, k, v, dout, None, **pattern)
    # Window: the first keys, a chunk-size boundary, the last keys. Chunk: a block inside a chunk and the last
    # keys (each chunk's float64 sub-problem is 8K x 8K x 10 heads).
    blocks = (0, 8192, S - n) if "window" in pattern else (8192 + 4096 - n, S - n)
    for c in blocks:
        if "window" in pattern:
            W = pattern["window"]
            q0, q1, k0 = c, min(S, c + n + W - 1), max(0, c - W + 1)
        else:
            C = pattern["chunk"]
            q0 = k0 = c // C * C
            q1 = q0 + C
        sub_pattern = pattern if "window" in pattern else dict(chunk=pattern["chunk"])
        sub = (q[:, q0:q1], k[:, k0:q1], v[:, k0:q1], dout[:, q0:q1], None)
        ref = reference_grads(*sub, **sub_pattern)
        naive = naive_grads(*sub, **sub_pattern)
        kc = slice(c - k0, c - k0 + n)
        assert_sparse_attention_grad_close("dk", dk[:, c : c + n], naive[1][:, kc], ref[1][:, kc], torch.bfloat16)
        assert_sparse_attention_grad_close("dv", dv[:, c : c + n], naive[2][:, kc], ref[2][:, kc], torch.bfloat16)
        assert_sparse_attention_grad_close("dq", dq[:, q0:q1], naive[0], ref[0], torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Bad input to the backward op: a clear error naming the problem, before any work.
# --------------------------------------------------------------------------------------------
def _bad_bwd_cases():
    """name -> (fn(dout, q, k, v, out, lse) -> args of ops.sparse_attention_bwd, match)."""
    return {
        "dout-shape": (lambda do, q, k, v, o, lse: (do[:, :5], q, k, v, o, lse), r"dout"),
        "dout-dtype": (lambda do, q, k, v, o, lse: (do.double(), q, k, v, o, lse), r"dout"),
        "dout-stride-d": (
            lambda do, q, k, v, o, lse: (do.repeat(1, 1, 1, 2)[..., ::2], q, k, v, o, lse),
            r"unit stride",
        ),
        "out-shape": (lambda do, q, k, v, o, lse: (do, q, k, v, o[..., :32], lse), r"\bout\b"),
        "out-dtype": (lambda do, q, k, v, o, lse: (do, q, k, v, o.double(), lse), r"\bout\b"),
        "lse-shape": (lambda do, q, k, v, o, lse: (do, q, k, v, o, lse[:, :1]), r"lse"),
        "lse-transposed": (lambda do, q, k, v, o, lse: (do, q, k, v, o, lse.transpose(1, 2)), r"lse"),
        "lse-dtype": (lambda do, q, k, v, o, lse: (do, q, k, v, o, lse.double()), r"lse.*float32"),
        "lse-not-contiguous": (
            lambda do, q, k, v, o, lse: (do, q, k, v, o, lse.repeat(1, 1, 2)[..., ::2]),
            r"contiguous",
        ),
        "k-3d": (lambda do, q, k, v, o, lse: (do, q, k[0], v, o, lse), r"k must be 4-D"),
        "qkv-dtypes": (lambda do, q, k, v, o, lse: (do, q, k.half(), v.half(), o, lse), r"share a dtype"),
    }


BAD_BWD_CASES = _bad_bwd_cases()


@pytest.mark.parametrize("case", list(BAD_BWD_CASES))
@pytest.mark.parametrize("device, dtype", ONE_PER_DEVICE)
def test_bad_input(case, device, dtype, gen):
    build, match = BAD_BWD_CASES[case]
    q, k, v = random_qkv(gen, BAD_SHAPE, dtype, device)
    out, lse = ops.sparse_attention(q, k, v, return_lse=True)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    with pytest.raises(ERRORS, match=match):
        ops.sparse_attention_bwd(*build(dout, q, k, v, out, lse))


def test_bad_mask_arguments_are_value_errors(gen):
    q, k, v = random_qkv(gen, BAD_SHAPE, torch.float32, CPU)
    out, lse = ops.sparse_attention(q, k, v, return_lse=True)
    for name, value in [("window", 0), ("chunk", -1), ("global_stride", 0), ("sinks", -1)]:
        with pytest.raises(ValueError, match=name):
            ops.sparse_attention_bwd(out, q, k, v, out, lse, **{name: value})


# --------------------------------------------------------------------------------------------
# A real torch op: opcheck (with aot_dispatch), torch.compile of forward + backward.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
@pytest.mark.parametrize("device, dtype", ONE_PER_DEVICE)
def test_opcheck_bwd(case, device, dtype, gen):
    shape, seqlens, causal, window, chunk, stride, sinks, scale = OPCHECK_CASES[case]
    q, k, v = random_qkv(gen, shape, dtype, device)
    cu = None if seqlens is None else cu_seqlens(seqlens, device)
    mask = (causal, window, chunk, stride, sinks)
    out, lse = torch.ops.llama4.sparse_attention_fwd(q, k, v, cu, cu, *mask, scale)
    dout, _ = random_upstream(gen, q, lse_grad=False)
    torch.library.opcheck(
        torch.ops.llama4.sparse_attention_bwd.default, (dout, q, k, v, out, lse, cu, cu, *mask, scale, True)
    )


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
@pytest.mark.parametrize("device, dtype", ONE_PER_DEVICE)
def test_opcheck_fwd_autograd(case, device, dtype, gen):
    """opcheck of the forward with inputs that require grad: the autograd registration and aot_dispatch of the
    forward + backward."""
    shape, seqlens, causal, window, chunk, stride, sinks, scale = OPCHECK_CASES[case]
    q, k, v = (t.requires_grad_() for t in random_qkv(gen, shape, dtype, device))
    cu = None if seqlens is None else cu_seqlens(seqlens, device)
    torch.library.opcheck(
        torch.ops.llama4.sparse_attention_fwd.default, (q, k, v, cu, cu, causal, window, chunk, stride, sinks, scale)
    )


def _attention_loss(q, k, v, cu, use_lse: bool):
    out, lse = ops.sparse_attention(
        q, k, v, window=8, global_stride=5, sinks=1, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True
    )
    loss = (out.float() ** 2).sum()
    if use_lse:
        loss = loss + lse.exp().sum()  # exp(-inf) = 0 on rows without keys
    return loss


@pytest.mark.parametrize("use_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("device, dtype", ONE_PER_DEVICE)
def test_compile_fullgraph_backward(varlen, use_lse, device, dtype, gen):
    compiled = torch.compile(_attention_loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (37, 50):  # two sizes: the dynamic graph serves both
        q, k, v = (t.requires_grad_() for t in random_qkv(gen, AttentionShape(1, T, T, 4, 2, 64), dtype, device))
        cu = cu_seqlens([T - 20, 0, 20], device) if varlen else None
        got = torch.autograd.grad(compiled(q, k, v, cu, use_lse), (q, k, v))
        want = torch.autograd.grad(_attention_loss(q, k, v, cu, use_lse), (q, k, v))
        for name, a, b in zip(GRAD_NAMES, got, want, strict=True):
            assert torch.equal(a, b), name
