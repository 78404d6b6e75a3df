"""Triton kernels (CUDA) of the model's small memory-bound ops, forward and backward: RMSNorm with a weight,
and RoPE on interleaved pairs + weightless L2 QK-norm + a per-position query scale, fused in one launch for
q and k. Launchers at the bottom take tensors the caller (engine.ops.norm) has already validated.
Legend: T rows, D row width, B batch, S positions, H query heads, G key/value heads, Dh head dim,
R = Dh / 2 rotary pairs, P programs of the weight-gradient reduction.

Both ops are pure bandwidth: one read and one write of the activations, a few FLOPs per byte. So each kernel
holds whole rows (RMSNorm: one row of D; RoPE: a tile of heads of one token) in registers, reduces them
there, and never round-trips an intermediate through memory; the backward kernels recompute the forward's
row statistics from x instead of storing them.

Rounding follows engine.model.layers exactly: every stage computes in float32 and rounds to the input dtype
where the model's torch code does (RMSNorm: normalise, round, times the weight, round; RoPE + QK-norm +
scale: rotate, round, normalise, round, scale, round).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest RMSNorm row one program holds in registers (float32 [BLOCK_D] per live value). Llama 4 uses
# D = 5120; 32768 leaves room for other models without spilling at 16 warps.
RMS_NORM_MAX_D = 32768
# Elements of one RoPE tile (BLOCK_H heads x Dh): 1024 is 8 heads of Dh = 128, i.e. Scout's 40 query heads
# in 5 tiles and its 8 kv heads in one, with no masked (wasted) head.
ROPE_TILE_ELEMENTS = 1024
ROPE_NUM_WARPS = 4
# Programs of the RMSNorm backward: each owns a contiguous band of rows and writes one float32 partial
# sum of dw, reduced afterwards in a fixed order (deterministic, no float atomics). 2 per SM keeps every
# SM busy while each band stays long enough that the [P, D] partials stay a small fraction of traffic.
RMS_NORM_BWD_PROGRAMS_PER_SM = 2
# Programs of that backward when there is no GPU to ask (the interpreter on CPU).
RMS_NORM_BWD_PROGRAMS_CPU = 4


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
@triton.jit
def _rstd(x, D, eps):
    """1 / sqrt(mean(x^2) + eps) of a float32 row, correctly rounded (as torch computes it)."""
    mean_sq = tl.sum(x * x, axis=0) / D
    return tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))


@triton.jit
def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, stride_x_row, stride_y_row, D, eps, BLOCK_D: tl.constexpr):
    """y[t] = (x[t] * rstd(x[t])).to(dtype) * w, one row per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    normed = (x * _rstd(x, D, eps)).to(dtype).to(tl.float32)
    tl.store(y_ptr + row * stride_y_row + cols, (normed * w).to(dtype), mask=mask)


@triton.jit
def rms_norm_bwd_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    dx_ptr,
    dw_partial_ptr,
    stride_x_row,
    stride_dy_row,
    stride_dx_row,
    T,
    D,
    rows_per_program,
    eps,
    BLOCK_D: tl.constexpr,
):
    """dx[t] = rstd * (dn - n * mean(dn * n)) with n = x * rstd, dn = dy * w; and this program's partial
    dw = sum over its rows of dy * n (n rounded to x's dtype, the value the forward multiplied by w)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    # int64 bounds make the loop index int64: row * stride must not overflow int32.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, T)
    for row64 in range(row_start, row_end):
        x = tl.load(x_ptr + row64 * stride_x_row + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row64 * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        rstd = _rstd(xf, D, eps)
        normed = xf * rstd
        dw += dy * normed.to(x.dtype).to(tl.float32)
        dn = dy * w
        dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / D))
        tl.store(dx_ptr + row64 * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * D + cols, dw, mask=mask)


# --------------------------------------------------------------------------------------------
# RoPE (interleaved pairs) + QK-norm + query scale
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_pairs(ptr, offs, mask, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """One contiguous [BLOCK_H, 2 * BLOCK_R] load (vectorised), split into the (even, odd) = (re, im) halves."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, [BLOCK_H, BLOCK_R, 2]))


@triton.jit
def _store_pairs(ptr, offs, mask, re, im, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    x = tl.reshape(tl.join(re, im), [BLOCK_H, 2 * BLOCK_R])
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head_tile(b, s, h0, n_heads, stride_b, stride_s, stride_h, Dh, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Offsets and mask of heads [h0, h0 + BLOCK_H) of token (b, s) in a [B, S, heads, Dh] tensor."""
    heads = h0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, 2 * BLOCK_R)
    offs = b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + heads[:, None].to(tl.int64) * stride_h
    offs = offs + cols[None, :]
    mask = (heads[:, None] < n_heads) & (cols[None, :] < Dh)
    return offs, mask


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, s, R, BLOCK_R: tl.constexpr):
    """cos, sin [1, BLOCK_R] float32 of position s (pairs past R read as 0)."""
    pairs = tl.arange(0, BLOCK_R)
    cs_offs = s.to(tl.int64) * R + pairs
    cos = tl.load(cos_ptr + cs_offs, mask=pairs < R, other=0.0)[None, :]
    sin = tl.load(sin_ptr + cs_offs, mask=pairs < R, other=0.0)[None, :]
    return cos, sin


@triton.jit
def _rotate_rounded(re, im, cos, sin, dtype_ptr):
    """The forward rotation (re + i im) * (cos + i sin) in float32, rounded to dtype_ptr's element type."""
    dtype = dtype_ptr.dtype.element_ty
    re, im = re * cos - im * sin, re * sin + im * cos
    return re.to(dtype).to(tl.float32), im.to(dtype).to(tl.float32)


@triton.jit
def _rope_norm_fwd_tile(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    scale_ptr,
    b,
    s,
    h0,
    n_heads,
    stride_x_b,
    stride_x_s,
    stride_x_h,
    stride_o_b,
    stride_o_s,
    stride_o_h,
    R,
    eps,
    HAS_ROPE: tl.constexpr,
    QK_NORM: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    x_offs, x_mask = _head_tile(b, s, h0, n_heads, stride_x_b, stride_x_s, stride_x_h, 2 * R, BLOCK_H, BLOCK_R)
    re, im = _load_pairs(x_ptr, x_offs, x_mask, BLOCK_H, BLOCK_R)
    dtype = out_ptr.dtype.element_ty
    if HAS_ROPE:
        cos, sin = _load_cos_sin(cos_ptr, sin_ptr, s, R, BLOCK_R)
        re, im = _rotate_rounded(re, im, cos, sin, out_ptr)
    if QK_NORM:
        mean_sq = tl.sum(re * re + im * im, axis=1) / (2 * R)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))[:, None]
        re, im = (re * rstd).to(dtype).to(tl.float32), (im * rstd).to(dtype).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + s)
        re, im = re * scale, im * scale
    o_offs, o_mask = _head_tile(b, s, h0, n_heads, stride_o_b, stride_o_s, stride_o_h, 2 * R, BLOCK_H, BLOCK_R)
    _store_pairs(out_ptr, o_offs, o_mask, re, im, BLOCK_H, BLOCK_R)


@triton.jit
def rope_qk_norm_fwd_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    q_scale_ptr,
    S,
    H,
    G,
    R,
    stride_q_b,
    stride_q_s,
    stride_q_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_qo_b,
    stride_qo_s,
    stride_qo_h,
    stride_ko_b,
    stride_ko_s,
    stride_ko_h,
    eps,
    HAS_ROPE: tl.constexpr,
    QK_NORM: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (B*S, cdiv(H, BLOCK_H) + cdiv(G, BLOCK_H)): the first tiles of a token are its query heads, the
    rest its key heads, so q and k share one launch (and the token's cos / sin stay in L1)."""
    token = tl.program_id(0)
    tile = tl.program_id(1)
    b, s = token // S, token % S
    q_tiles = tl.cdiv(H, BLOCK_H)
    if tile < q_tiles:
        _rope_norm_fwd_tile(
            q_ptr, q_out_ptr, cos_ptr, sin_ptr, q_scale_ptr, b, s, tile * BLOCK_H, H,
            stride_q_b, stride_q_s, stride_q_h, stride_qo_b, stride_qo_s, stride_qo_h,
            R, eps, HAS_ROPE, QK_NORM, HAS_SCALE, BLOCK_H, BLOCK_R,
        )  # fmt: skip
    else:
        _rope_norm_fwd_tile(
            k_ptr, k_out_ptr, cos_ptr, sin_ptr, q_scale_ptr, b, s, (tile - q_tiles) * BLOCK_H, G,
            stride_k_b, stride_k_s, stride_k_h, stride_ko_b, stride_ko_s, stride_ko_h,
            R, eps, HAS_ROPE, QK_NORM, False, BLOCK_H, BLOCK_R,
        )  # fmt: skip


@triton.jit
def _rope_norm_bwd_tile(
    x_ptr,
    dout_ptr,
    dx_ptr,
    cos_ptr,
    sin_ptr,
    scale_ptr,
    b,
    s,
    h0,
    n_heads,
    stride_x_b,
    stride_x_s,
    stride_x_h,
    stride_g_b,
    stride_g_s,
    stride_g_h,
    stride_d_b,
    stride_d_s,
    stride_d_h,
    R,
    eps,
    HAS_ROPE: tl.constexpr,
    QK_NORM: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The forward's stages transposed in reverse order: times the scale, the norm's Jacobian (recomputed
    from the rotated input: n = rot * rstd, dn -> rstd * (dn - n * mean(dn * n))), the inverse rotation."""
    g_offs, g_mask = _head_tile(b, s, h0, n_heads, stride_g_b, stride_g_s, stride_g_h, 2 * R, BLOCK_H, BLOCK_R)
    g_re, g_im = _load_pairs(dout_ptr, g_offs, g_mask, BLOCK_H, BLOCK_R)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + s)
        g_re, g_im = g_re * scale, g_im * scale
    if HAS_ROPE:
        cos, sin = _load_cos_sin(cos_ptr, sin_ptr, s, R, BLOCK_R)
    if QK_NORM:
        x_offs, x_mask = _head_tile(b, s, h0, n_heads, stride_x_b, stride_x_s, stride_x_h, 2 * R, BLOCK_H, BLOCK_R)
        re, im = _load_pairs(x_ptr, x_offs, x_mask, BLOCK_H, BLOCK_R)
        if HAS_ROPE:
            re, im = _rotate_rounded(re, im, cos, sin, x_ptr)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(re * re + im * im, axis=1) / (2 * R) + eps))[:, None]
        re, im = re * rstd, im * rstd
        dot = (tl.sum(g_re * re + g_im * im, axis=1) / (2 * R))[:, None]
        g_re, g_im = rstd * (g_re - re * dot), rstd * (g_im - im * dot)
    if HAS_ROPE:
        g_re, g_im = g_re * cos + g_im * sin, g_im * cos - g_re * sin
    d_offs, d_mask = _head_tile(b, s, h0, n_heads, stride_d_b, stride_d_s, stride_d_h, 2 * R, BLOCK_H, BLOCK_R)
    _store_pairs(dx_ptr, d_offs, d_mask, g_re, g_im, BLOCK_H, BLOCK_R)


@triton.jit
def rope_qk_norm_bwd_kernel(
    q_ptr,
    k_ptr,
    dq_out_ptr,
    dk_out_ptr,
    dq_ptr,
    dk_ptr,
    cos_ptr,
    sin_ptr,
    q_scale_ptr,
    S,
    H,
    G,
    R,
    stride_q_b,
    stride_q_s,
    stride_q_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_gq_b,
    stride_gq_s,
    stride_gq_h,
    stride_gk_b,
    stride_gk_s,
    stride_gk_h,
    stride_dq_b,
    stride_dq_s,
    stride_dq_h,
    stride_dk_b,
    stride_dk_s,
    stride_dk_h,
    eps,
    HAS_ROPE: tl.constexpr,
    QK_NORM: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dq, dk from the gradients of the outputs and the forward's inputs; the grid of the forward."""
    token = tl.program_id(0)
    tile = tl.program_id(1)
    b, s = token // S, token % S
    q_tiles = tl.cdiv(H, BLOCK_H)
    if tile < q_tiles:
        _rope_norm_bwd_tile(
            q_ptr, dq_out_ptr, dq_ptr, cos_ptr, sin_ptr, q_scale_ptr, b, s, tile * BLOCK_H, H,
            stride_q_b, stride_q_s, stride_q_h, stride_gq_b, stride_gq_s, stride_gq_h,
            stride_dq_b, stride_dq_s, stride_dq_h, R, eps, HAS_ROPE, QK_NORM, HAS_SCALE, BLOCK_H, BLOCK_R,
        )  # fmt: skip
    else:
        _rope_norm_bwd_tile(
            k_ptr, dk_out_ptr, dk_ptr, cos_ptr, sin_ptr, q_scale_ptr, b, s, (tile - q_tiles) * BLOCK_H, G,
            stride_k_b, stride_k_s, stride_k_h, stride_gk_b, stride_gk_s, stride_gk_h,
            stride_dk_b, stride_dk_s, stride_dk_h, R, eps, HAS_ROPE, QK_NORM, False, BLOCK_H, BLOCK_R,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers: tensors already validated (engine.ops.norm); rows / last dims have stride 1.
# --------------------------------------------------------------------------------------------
def _rms_norm_warps(block_d: int) -> int:
    # ~8 float32 values of a row per thread: enough bytes in flight per SM without spilling.
    return max(1, min(16, block_d // 256))


def rms_norm_fwd(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """y [T, D] in x's dtype."""
    T, D = x_TD.shape
    y_TD = torch.empty((T, D), dtype=x_TD.dtype, device=x_TD.device)
    if T == 0:
        return y_TD
    block_d = triton.next_power_of_2(D)
    rms_norm_fwd_kernel[(T,)](
        x_TD, w_D, y_TD, x_TD.stride(0), y_TD.stride(0), D, eps, BLOCK_D=block_d, num_warps=_rms_norm_warps(block_d)
    )
    return y_TD


def rms_norm_bwd_programs(T: int, device: torch.device) -> int:
    """P: how many row bands (and dw partial sums) the backward uses; depends on T and the GPU only."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(T, RMS_NORM_BWD_PROGRAMS_PER_SM * sms))
    return max(1, min(T, RMS_NORM_BWD_PROGRAMS_CPU))


def rms_norm_bwd(
    dy_TD: torch.Tensor, x_TD: torch.Tensor, w_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [T, D] in x's dtype, dw [D] in w's dtype); dw summed over P float32 partials in a fixed order."""
    T, D = x_TD.shape
    dx_TD = torch.empty((T, D), dtype=x_TD.dtype, device=x_TD.device)
    if T == 0:
        return dx_TD, torch.zeros_like(w_D)
    programs = rms_norm_bwd_programs(T, x_TD.device)
    dw_partial_PD = torch.empty((programs, D), dtype=torch.float32, device=x_TD.device)
    block_d = triton.next_power_of_2(D)
    rows_per_program = triton.cdiv(T, programs)
    rms_norm_bwd_kernel[(programs,)](
        x_TD, w_D, dy_TD, dx_TD, dw_partial_PD, x_TD.stride(0), dy_TD.stride(0), dx_TD.stride(0), T, D,
        rows_per_program, eps, BLOCK_D=block_d, num_warps=_rms_norm_warps(block_d),
    )  # fmt: skip
    return dx_TD, dw_partial_PD.sum(0).to(w_D.dtype)


def _rope_blocks(Dh: int, heads: int) -> tuple[int, int]:
    block_r = triton.next_power_of_2(Dh // 2)
    block_h = max(1, min(ROPE_TILE_ELEMENTS // (2 * block_r), triton.next_power_of_2(heads)))
    return block_h, block_r


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _rope_launch(
    q_BSHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    cos_SR: torch.Tensor | None,
    sin_SR: torch.Tensor | None,
    q_scale_S: torch.Tensor | None,
    qk_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple, dict]:
    """What the forward and backward RoPE launches share (one grid, one tiling): (empty [B, S, H, Dh] and
    [B, S, G, Dh] outputs in the inputs' dtype, the grid (B * S tokens first: 0 means nothing to launch),
    the kernel arguments (cos, sin, q_scale, S, H, G, R), an absent table passed as a pointer never read,
    and the constexpr / launch keywords)."""
    B, S, H, Dh = q_BSHD.shape
    G = k_BSGD.shape[2]
    q_like = torch.empty((B, S, H, Dh), dtype=q_BSHD.dtype, device=q_BSHD.device)
    k_like = torch.empty((B, S, G, Dh), dtype=k_BSGD.dtype, device=k_BSGD.device)
    block_h, block_r = _rope_blocks(Dh, max(H, G))
    has_rope = cos_SR is not None
    dummy = q_scale_S if q_scale_S is not None else cos_SR if has_rope else q_BSHD  # never read
    grid = (B * S, triton.cdiv(H, block_h) + triton.cdiv(G, block_h))
    tables_and_dims = (
        cos_SR if has_rope else dummy, sin_SR if has_rope else dummy,
        q_scale_S if q_scale_S is not None else dummy, S, H, G, Dh // 2,
    )  # fmt: skip
    meta = dict(
        HAS_ROPE=has_rope, QK_NORM=qk_norm, HAS_SCALE=q_scale_S is not None,
        BLOCK_H=block_h, BLOCK_R=block_r, num_warps=ROPE_NUM_WARPS,
    )  # fmt: skip
    return q_like, k_like, grid, tables_and_dims, meta


def rope_qk_norm_fwd(
    q_BSHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    cos_SR: torch.Tensor | None,
    sin_SR: torch.Tensor | None,
    q_scale_S: torch.Tensor | None,
    qk_norm: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out [B, S, H, Dh], k_out [B, S, G, Dh]), contiguous, in the inputs' dtype."""
    q_out, k_out, grid, tables_and_dims, meta = _rope_launch(q_BSHD, k_BSGD, cos_SR, sin_SR, q_scale_S, qk_norm)
    if grid[0] == 0:
        return q_out, k_out
    rope_qk_norm_fwd_kernel[grid](
        q_BSHD, k_BSGD, q_out, k_out, *tables_and_dims,
        *_strides3(q_BSHD), *_strides3(k_BSGD), *_strides3(q_out), *_strides3(k_out), eps, **meta,
    )  # fmt: skip
    return q_out, k_out


def rope_qk_norm_bwd(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q_BSHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    cos_SR: torch.Tensor | None,
    sin_SR: torch.Tensor | None,
    q_scale_S: torch.Tensor | None,
    qk_norm: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq [B, S, H, Dh], dk [B, S, G, Dh]) in the inputs' dtype, from the outputs' gradients."""
    dq, dk, grid, tables_and_dims, meta = _rope_launch(q_BSHD, k_BSGD, cos_SR, sin_SR, q_scale_S, qk_norm)
    if grid[0] == 0:
        return dq, dk
    rope_qk_norm_bwd_kernel[grid](
        q_BSHD, k_BSGD, dq_out, dk_out, dq, dk, *tables_and_dims,
        *_strides3(q_BSHD), *_strides3(k_BSGD), *_strides3(dq_out), *_strides3(dk_out),
        *_strides3(dq), *_strides3(dk), eps, **meta,
    )  # fmt: skip
    return dq, dk
