"""Pure-torch reference implementations: the test oracle, the benchmark baseline and the
documentation of the maths of every op. Written for clarity, computed in float32/float64.

Legend: T tokens, E experts, K top-k, D model width, N = T*K routed rows (slots).
A slot is the pair (token t, choice k) and has index s = t*K + k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RouteResult(NamedTuple):
    """What `moe_route` returns (shapes for T tokens, E experts, top-k K).

    topk_weights_TK:     float32 [T, K]   routing weight of each chosen expert
    topk_ids_TK:         int32   [T, K]   chosen experts, best first
    tokens_per_expert_E: int32   [E]      slots routed to each expert
    expert_offsets:      int32   [E + 1]  exclusive prefix sum of tokens_per_expert_E
    sorted_slots:        int32   [T * K]  slot indices t*K+k in expert order, stable by token
    slot_positions_TK:   int32   [T, K]   where each slot landed in that order
    """

    topk_weights_TK: torch.Tensor
    topk_ids_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_slots: torch.Tensor
    slot_positions_TK: torch.Tensor


SCORE_FUNCS = ("sigmoid", "softmax")


def selection_order_TE(router_logits_TE: torch.Tensor, expert_bias_E: torch.Tensor | None) -> torch.Tensor:
    """Expert indices of each token from best to worst, int64 [T, E].

    The key is `float32(logit) + bias`. Larger keys first; equal keys (also -0.0 == +0.0)
    go to the lower expert index; NaN keys rank below every number, -inf included.
    """
    key_TE = router_logits_TE.float()
    if expert_bias_E is not None:
        key_TE = key_TE + expert_bias_E.float()
    is_nan_TE = torch.isnan(key_TE)
    filled_TE = torch.where(is_nan_TE, torch.full_like(key_TE, float("-inf")), key_TE)
    # Two stable sorts: by value (descending), then by NaN-ness (numbers first).
    order_TE = torch.sort(filled_TE, dim=-1, descending=True, stable=True).indices
    nan_sorted_TE = torch.gather(is_nan_TE, 1, order_TE).to(torch.uint8)
    by_nan_TE = torch.sort(nan_sorted_TE, dim=-1, stable=True).indices
    return torch.gather(order_TE, 1, by_nan_TE)


def moe_route(
    router_logits_TE: torch.Tensor,
    top_k: int,
    *,
    score_func: str = "sigmoid",
    expert_bias_E: torch.Tensor | None = None,
    renormalize: bool = False,
) -> RouteResult:
    """Top-k MoE routing.

    router_logits_TE: [T, E] float32/float16/bfloat16. expert_bias_E: [E] float32 or None.
    Selection: the top_k largest `logit + bias` (the bias steers selection only).
    Weights (float32): "sigmoid" (Llama 4) w = sigmoid(logit); "softmax" w = softmax(logits)[id]
    over all E experts. renormalize: w /= max(sum_k w, FLT_MIN).
    Dispatch: slots s = t*K+k are ordered by expert, stable by s within an expert.
    """
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    T, E = router_logits_TE.shape
    device = router_logits_TE.device
    logits_TE = router_logits_TE.double()
    ids_TK = selection_order_TE(router_logits_TE, expert_bias_E)[:, :top_k]
    chosen_TK = torch.gather(logits_TE, 1, ids_TK)
    if score_func == "sigmoid":
        weights_TK = torch.sigmoid(chosen_TK)
    else:
        weights_TK = torch.gather(torch.softmax(logits_TE, dim=-1), 1, ids_TK)
    if renormalize:
        denom_T1 = weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        weights_TK = weights_TK / denom_T1

    flat_ids_N = ids_TK.reshape(-1)
    tokens_per_expert_E = torch.bincount(flat_ids_N, minlength=E)[:E]
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(tokens_per_expert_E, 0)
    sorted_slots_N = torch.sort(flat_ids_N, stable=True).indices
    positions_N = torch.empty_like(sorted_slots_N)
    positions_N[sorted_slots_N] = torch.arange(flat_ids_N.numel(), device=device)
    return RouteResult(
        weights_TK.float(),
        ids_TK.int(),
        tokens_per_expert_E.int(),
        offsets.int(),
        sorted_slots_N.int(),
        positions_N.view(T, top_k).int(),
    )


def moe_permute(x_TD: torch.Tensor, route: RouteResult, topk_weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch rows to expert order: x_sorted_ND[p] = x_TD[s // K] (* w[s]), s = sorted_slots[p].

    x_TD: [T, D]; returns [T*K, D] in x's dtype (weighting computed in float64 here).
    """
    K = route.slot_positions_TK.shape[1]
    slots_N = route.sorted_slots.long()
    rows_ND = x_TD.double()[slots_N // K]
    if topk_weights_TK is not None:
        rows_ND = rows_ND * topk_weights_TK.double().reshape(-1)[slots_N].unsqueeze(-1)
    return rows_ND.to(x_TD.dtype)


def moe_unpermute(y_ND: torch.Tensor, route: RouteResult, topk_weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Combine: y_TD[t] = sum_k (w[t, k] *) y_ND[slot_positions[t, k]], summed over k in order.

    y_ND: [T*K, D]; returns [T, D] in y's dtype (accumulated in float64 here).
    """
    T, K = route.slot_positions_TK.shape
    rows_TKD = y_ND.double()[route.slot_positions_TK.long().reshape(-1)].view(T, K, -1)
    if topk_weights_TK is not None:
        rows_TKD = rows_TKD * topk_weights_TK.double().unsqueeze(-1)
    return rows_TKD.sum(1).to(y_ND.dtype)


# ---------------------------------------------------------------------------------------------
# 8-bit optimizer state: dynamic (tree) quantisation maps and blockwise quantisation.
# Legend: n elements, B = ceil(n / block_size) blocks.
# ---------------------------------------------------------------------------------------------
QMAP_SIZE = 256
QMAP_DECADES = 7  # magnitudes from 1e-7 to 1, one decade per group of codes


def dynamic_qmap(signed: bool) -> torch.Tensor:
    """The 256-entry dynamic quantisation map (float32, sorted ascending).

    Non-linear "dynamic tree" code: decade i (i = 0..6) covers magnitudes 10^(i-7)..10^(i-6)
    with 2^i (signed) or 2^(i+1) (unsigned) linearly spaced fractions (the midpoints of
    linspace(0.1, 1, n+1), scaled by 10^(i-6)), plus exact 0 and +1. Signed: 2*127 + 2 = 256
    codes (the most negative is -0.993); unsigned: 254 + 2 = 256. Small values keep relative
    precision down to 1e-7 of the block maximum, which the second moment needs.
    """
    magnitudes: list[float] = []
    for i in range(QMAP_DECADES):
        n = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        magnitudes += ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - (QMAP_DECADES - 1))).tolist()
    values = [0.0, 1.0, *magnitudes] + ([-m for m in magnitudes] if signed else [])
    qmap = torch.tensor(sorted(values), dtype=torch.float32)
    assert qmap.numel() == QMAP_SIZE and bool((qmap.diff() > 0).all()), "the map must be 256 distinct sorted codes"
    return qmap


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, n elements) -> (codes uint8 [n], absmax float32 [B]). Brute-force nearest code.

    absmax[b] = max |x| over block b; codes index the qmap entry nearest to x / absmax (ties to the
    lower entry); an all-zero block has absmax 0 and quantises to the code of 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    absmax = padded.view(blocks, block_size).abs().amax(1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (padded.view(blocks, block_size) / scale[:, None]).reshape(-1)[:n]
    dist = (normed[:, None].double() - qmap.to(x.device).double()[None, :]).abs()
    codes = torch.argmin(dist, dim=1)  # first minimum: ties go to the lower entry
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int
) -> torch.Tensor:
    """codes uint8 [n], absmax float32 [B] -> float32 [n]: qmap[code] * absmax[block]."""
    n = codes.numel()
    block_of = torch.arange(n, device=codes.device) // block_size
    return qmap.to(codes.device)[codes.long()] * absmax[block_of]


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One torch.optim.AdamW step in float64 on unquantised state; returns (param, exp_avg, exp_avg_sq).

    p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """
    p, g, m, v = (t.double() for t in (param, grad, exp_avg, exp_avg_sq))
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    p = p - lr / bc1 * m / (v.sqrt() / bc2**0.5 + eps)
    return p, m, v


# ---------------------------------------------------------------------------------------------
# FP8 quantisation. Legend: M rows, K columns, G = ceil(K / 128) column blocks, F = K for SwiGLU.
# ---------------------------------------------------------------------------------------------
FP8_AMAX_FLOOR = 1e-12
FP8_BLOCK = 128
FP8_GRANULARITIES = ("tensor", "row", "block128")


def fp8_group_amax(x_MK: torch.Tensor, granularity: str) -> torch.Tensor:
    """max |x| per tensor ([]), row ([M]) or 1x128 block ([M, G]), float32; NaN propagates."""
    a = x_MK.float().abs()
    if granularity == "tensor":
        return a.amax() if a.numel() else a.new_zeros(())
    if granularity == "row":
        return a.amax(1) if a.shape[1] else a.new_zeros(a.shape[0])
    M, K = a.shape
    G = -(-K // FP8_BLOCK)
    padded = a.new_zeros(M, G * FP8_BLOCK)
    padded[:, :K] = a
    return padded.view(M, G, FP8_BLOCK).amax(-1)


def fp8_expand_scale(scale: torch.Tensor, granularity: str, M: int, K: int) -> torch.Tensor:
    """The scale of every element, [M, K]."""
    if granularity == "tensor":
        return scale.expand(M, K)
    if granularity == "row":
        return scale[:, None].expand(M, K)
    return scale.repeat_interleave(FP8_BLOCK, dim=1)[:, :K]


def quantize_fp8(
    x_MK: torch.Tensor, granularity: str = "row", fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K], scale float32 [] / [M] / [M, G]).

    scale = max(amax, 1e-12) / fp8_max (an all-zero group dequantises to exactly 0, never NaN);
    x_fp8 = round_to_nearest_even(clamp(x / scale, -fp8_max, fp8_max)) (saturates, never overflows
    to NaN); float32 maths throughout, so this is the bit-exact oracle of the kernels.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    M, K = x_MK.shape
    scale = fp8_group_amax(x_MK, granularity).clamp_min(FP8_AMAX_FLOOR) / fp8_max
    v = (x_MK.float() / fp8_expand_scale(scale, granularity, M, K)).clamp(-fp8_max, fp8_max)
    return v.to(fp8_dtype), scale


def dequantize_fp8(
    x_fp8_MK: torch.Tensor, scale: torch.Tensor, granularity: str = "row", out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x_fp8 * scale (broadcast per granularity), computed in float32, returned in out_dtype."""
    M, K = x_fp8_MK.shape
    return (x_fp8_MK.float() * fp8_expand_scale(scale, granularity, M, K)).to(out_dtype)


def swiglu(h_M2F: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with gate = h[:, :F], up = h[:, F:], in float32 (as gate / (1 + exp(-gate)) * up)."""
    gate, up = h_M2F.float().chunk(2, dim=1)
    return gate / (1.0 + torch.exp(-gate)) * up


def grouped_gemm(
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    group_sizes_E: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [M, N] float64: rows [offset_e, offset_e + size_e) of x times w[e]^T, on dequantised inputs.

    x_scale: [M] per row or [M, K/128] per block; w_scale: [E, N] per channel or [E, N/128, K/128]
    per block. Rows past sum(group_sizes) are zero here (the op leaves them unwritten).
    """
    M, K = x_MK.shape
    N = w_ENK.shape[1]
    x = x_MK.double()
    if x_scale is not None:
        x = x * (
            x_scale.double()[:, None] if x_scale.dim() == 1 else x_scale.double().repeat_interleave(FP8_BLOCK, 1)[:, :K]
        )
    w = w_ENK.double()
    if w_scale is not None:
        if w_scale.dim() == 2:
            w = w * w_scale.double()[:, :, None]
        else:
            expanded = w_scale.double().repeat_interleave(FP8_BLOCK, 1).repeat_interleave(FP8_BLOCK, 2)
            w = w * expanded[:, :N, :K]
    out = torch.zeros(M, N, dtype=torch.float64, device=x_MK.device)
    start = 0
    for e, size in enumerate(group_sizes_E.tolist()):
        out[start : start + size] = x[start : start + size] @ w[e].T
        start += size
    return out


def grouped_gemm_wgrad(
    dy_MN: torch.Tensor,
    x_MK: torch.Tensor,
    group_sizes_E: torch.Tensor,
    *,
    dy_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """dw [E, N, K] float64: dw[e] = dy[rows of e]^T @ x[rows of e] on dequantised inputs (zero for an
    expert with no rows; rows past sum(group_sizes) unused). dy_scale [E, N] / x_scale [E, K]: FP8 scales
    per expert and channel, dy[m, n] * dy_scale[e(m), n] and x[m, k] * x_scale[e(m), k].
    """
    E, N, K = group_sizes_E.shape[0], dy_MN.shape[1], x_MK.shape[1]
    dw = torch.zeros(E, N, K, dtype=torch.float64, device=dy_MN.device)
    start = 0
    for e, size in enumerate(group_sizes_E.tolist()):
        dy = dy_MN[start : start + size].double()
        x = x_MK[start : start + size].double()
        if dy_scale is not None:
            dy = dy * dy_scale[e].double()
            x = x * x_scale[e].double()
        dw[e] = dy.T @ x
        start += size
    return dw


def quantize_fp8_grouped(
    x_MC: torch.Tensor, group_sizes_E: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, C] -> (x_fp8 [M, C], scale float32 [E, C]): quantize_fp8's maths with one scale per expert and
    channel, from the amax of that channel over the expert's rows; rows past sum(group_sizes) become 0.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    M, C = x_MC.shape
    scale = torch.empty(group_sizes_E.shape[0], C, dtype=torch.float32, device=x_MC.device)
    v = torch.zeros(M, C, dtype=torch.float32, device=x_MC.device)
    start = 0
    for e, size in enumerate(group_sizes_E.tolist()):
        rows = x_MC[start : start + size].float()
        amax = rows.abs().amax(0) if size else rows.new_zeros(C)
        scale[e] = amax.clamp_min(FP8_AMAX_FLOOR) / fp8_max
        v[start : start + size] = (rows / scale[e]).clamp(-fp8_max, fp8_max)
        start += size
    return v.to(fp8_dtype), scale


# ---------------------------------------------------------------------------------------------
# Sparse-global attention. Legend: B batch, S queries, Sk keys, H query heads, G kv heads, D head dim.
# ---------------------------------------------------------------------------------------------
def attention_visible(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    global_stride: int | None = None,
    sinks: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean [S, Sk]: may query row r (at position r + Sk - S) see key position j?

    j <= i when causal, and, when any pattern is set, at least one of: i - j < window;
    j // chunk == i // chunk; j % global_stride == 0; j < sinks. No pattern: plain causal (or full).
    """
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    visible = (j <= i) if causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window or chunk or global_stride or sinks:
        pattern = torch.zeros_like(visible)
        if window:
            pattern |= (i - j) < window
        if chunk:
            pattern |= (j // chunk) == (i // chunk)
        if global_stride:
            pattern |= (j % global_stride) == 0
        if sinks:
            pattern |= j < sinks
        visible = visible & pattern
    return visible


def sparse_attention(
    q_BSHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    global_stride: int | None = None,
    sinks: int = 0,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 attention with the explicit mask: (out [B, S, H, D] float64, lse [B, H, S] float64).

    out = softmax(scale * q k^T + mask) v per head (kv head h // (H // G)); a row with no visible
    key has out = 0 and lse = -inf. With cu_seqlens (B = 1) each packed sequence starts at 0.
    """
    B, S, H, D = q_BSHD.shape
    G = k_BSGD.shape[2]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    if cu_seqlens_q is None:
        spans = [(b, 0, S, 0, k_BSGD.shape[1]) for b in range(B)]
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        spans = [(0, cq[s], cq[s + 1], ck[s], ck[s + 1]) for s in range(len(cq) - 1)]
    out = torch.zeros(B, S, H, D, dtype=torch.float64, device=q_BSHD.device)
    lse = torch.full((B, H, S), float("-inf"), dtype=torch.float64, device=q_BSHD.device)
    for b, q0, q1, k0, k1 in spans:
        visible = attention_visible(
            q1 - q0,
            k1 - k0,
            causal=causal,
            window=window,
            chunk=chunk,
            global_stride=global_stride,
            sinks=sinks,
            device=q_BSHD.device,
        )
        q = q_BSHD[b, q0:q1].double().transpose(0, 1)  # [H, s, D]
        k = k_BSGD[b, k0:k1].double().transpose(0, 1).repeat_interleave(H // G, 0)
        v = v_BSGD[b, k0:k1].double().transpose(0, 1).repeat_interleave(H // G, 0)
        scores = (scale * q @ k.transpose(1, 2)).masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with no visible key
        p = torch.exp(scores - row_lse[..., None].clamp_min(torch.finfo(torch.float64).min))
        p = torch.where(visible, p, torch.zeros_like(p))
        out[b, q0:q1] = (p @ v).transpose(0, 1)
        lse[b, :, q0:q1] = row_lse
    return out, lse


# --------------------------------------------------------------------------------------------
# RMSNorm and RoPE + QK-norm + query scale (engine.ops.norm). Maths in float32 (float64 for float64
# inputs, the oracle), rounded to the input dtype where engine.model.layers rounds; differentiable by autograd.
# Legend here: B batch, S positions, H / G query / key heads, Dh head dim, R = Dh / 2 rotary pairs.
# --------------------------------------------------------------------------------------------
def _norm_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype) * weight; x [..., D], weight [D]."""
    xc = x.to(_norm_compute_dtype(x.dtype))
    return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_interleaved(x_BSHD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotates the interleaved pairs (x[2j], x[2j+1]) by angle j (Meta's complex multiply), in x's dtype."""
    pairs = x_BSHD.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_SR[None, :, None, :].to(x_BSHD.dtype), sin_SR[None, :, None, :].to(x_BSHD.dtype)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def rope_qk_norm(
    q_BSHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    cos_SR: torch.Tensor | None,
    sin_SR: torch.Tensor | None,
    *,
    qk_norm: bool,
    eps: float,
    q_scale_S: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) after RoPE (when cos / sin are given), rounded; L2 norm over Dh (when qk_norm), rounded;
    q times q_scale_S[s] (when given), rounded. Each stage in float32 (float64 for float64 inputs)."""

    def one(x: torch.Tensor, scale_S: torch.Tensor | None) -> torch.Tensor:
        compute = _norm_compute_dtype(x.dtype)
        y = x.to(compute)
        if cos_SR is not None:
            y = rope_interleaved(y, cos_SR, sin_SR).to(x.dtype).to(compute)
        if qk_norm:
            y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).to(compute)
        if scale_S is not None:
            y = y * scale_S.to(compute)[None, :, None, None]
        return y.to(x.dtype)

    return one(q_BSHD, q_scale_S), one(k_BSGD, None)
