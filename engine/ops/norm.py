"""Public norm ops of the model: RMSNorm with a weight, and RoPE (interleaved pairs) + weightless L2 QK-norm +
a per-position query scale on q and k in one op. Each is a torch op under `llama4::` (torch.library.custom_op,
so torch.compile sees a fake kernel and an autograd formula): Triton kernels on CUDA
(engine.triton_kernels.norm_rope), plain torch on CPU (the same maths, float32; float64 inputs stay float64).
Legend: T rows, D row width, B batch, S positions, H query heads, G key/value heads, Dh head dim, R = Dh / 2.

Rounding is the model's (engine.model.layers): every stage computes in float32 and rounds to the input dtype
where its torch code does, so a bf16 model gives the same activations through these ops as through torch.
Gradients are computed in float32 from the inputs and rounded once.
"""

from __future__ import annotations

import torch

from engine.profiling import nvtx_range

__all__ = ["rms_norm", "rope_qk_norm"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Widest RMSNorm row the CUDA kernel holds in registers (engine.triton_kernels.norm_rope.RMS_NORM_MAX_D;
# repeated so this module imports without triton).
RMS_NORM_MAX_D = 32768


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 maths for float32 / half inputs; float64 inputs (gradcheck, references) keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "llama4::rms_norm", mutates_args=(), device_types="cpu", schema="(Tensor x, Tensor weight, float eps) -> Tensor"
)
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The CPU kernel: normalise in float32, cast to x's dtype, times the weight (Llama 4's RMSNorm)."""
    xc = x.to(_compute_dtype(x.dtype))
    normed = (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed * weight).contiguous()


@_rms_norm_op.register_kernel("cuda")
def _rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from engine.triton_kernels import norm_rope

    D = x.shape[-1]
    return norm_rope.rms_norm_fwd(x.reshape(-1, D).contiguous(), weight.contiguous(), eps).view(x.shape)


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "llama4::rms_norm_bwd",
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor dy, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
)
def _rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = rstd * (dn - n * mean(dn * n)) with n = x * rstd, dn = dy * w; dw = sum_rows dy * round(n)."""
    compute = _compute_dtype(x.dtype)
    D = x.shape[-1]
    xc, dyc = x.to(compute).reshape(-1, D), dy.to(compute).reshape(-1, D)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    normed = xc * rstd
    dw = (dyc * normed.to(x.dtype).to(compute)).sum(0).to(weight.dtype)
    dn = dyc * weight.to(compute)
    dx = rstd * (dn - normed * (dn * normed).mean(-1, keepdim=True))
    return dx.to(x.dtype).view(x.shape), dw


@_rms_norm_bwd_op.register_kernel("cuda")
def _rms_norm_bwd_cuda(dy, x, weight, eps):
    from engine.triton_kernels import norm_rope

    D = x.shape[-1]
    dx, dw = norm_rope.rms_norm_bwd(
        dy.reshape(-1, D).contiguous(), x.reshape(-1, D).contiguous(), weight.contiguous(), eps
    )
    return dx.view(x.shape), dw


@_rms_norm_bwd_op.register_fake
def _rms_norm_bwd_fake(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, weight)


def _rms_norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(dy, x, weight, ctx.eps)
    return dx, dw, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    allowed = _CUDA_DTYPES if t.is_cuda else _FLOAT_DTYPES
    if t.dtype not in allowed:
        where = "on CUDA" if t.is_cuda else "on CPU"
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must be one of {names} {where}, got {t.dtype}")


def _check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's dtype and sit on ref's device (the ops never cast or move an input)."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype) * weight: Llama 4's RMSNorm, differentiable in x
    and weight.

    x [..., D] float32 / float16 / bfloat16 (float64 on CPU); weight [D] of x's dtype; eps > 0.
    The normalisation is float32 maths rounded to x's dtype, then multiplied by the weight in x's dtype
    (Llama 4's rounding order). Returns y [..., D] contiguous, in x's dtype.
    Backward: dx and dw in float32 maths, rounded once; dw is deterministic (per-band float32 partial
    sums reduced in a fixed order, no atomics).
    """
    op = "rms_norm"
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., D] with D >= 1, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"{op}: weight must be [D={D}] (x's last dim), got shape {tuple(weight.shape)}")
    _check_float(op, "x", x)
    _check_like(op, "weight", weight, "x", x)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    if x.is_cuda and D > RMS_NORM_MAX_D:
        raise ValueError(f"{op}: D must be <= {RMS_NORM_MAX_D} on CUDA (one row per program), got {D}")
    with nvtx_range("llama4.rms_norm"):
        return _rms_norm_op(x, weight, float(eps))


# --------------------------------------------------------------------------------------------
# RoPE + QK-norm + query scale
# --------------------------------------------------------------------------------------------
def _rope_cpu(x: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, sign: float) -> torch.Tensor:
    """Rotates the interleaved pairs (x[2j], x[2j+1]) of x [B, S, heads, Dh] (compute dtype) by +-angle j."""
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_SR[None, :, None, :], sign * sin_SR[None, :, None, :]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def _rope_norm_fwd_cpu(x, cos_SR, sin_SR, scale_S, qk_norm: bool, eps: float):
    dtype, compute = x.dtype, _compute_dtype(x.dtype)
    y = x.to(compute)
    if cos_SR is not None:
        y = _rope_cpu(y, cos_SR.to(compute), sin_SR.to(compute), 1.0).to(dtype).to(compute)
    if qk_norm:
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(dtype).to(compute)
    if scale_S is not None:
        y = y * scale_S.to(compute)[None, :, None, None]
    return _fresh(y, dtype)


def _rope_norm_bwd_cpu(g, x, cos_SR, sin_SR, scale_S, qk_norm: bool, eps: float):
    dtype, compute = x.dtype, _compute_dtype(x.dtype)
    g = g.to(compute)
    if scale_S is not None:
        g = g * scale_S.to(compute)[None, :, None, None]
    if qk_norm:
        y = x.to(compute)
        if cos_SR is not None:
            y = _rope_cpu(y, cos_SR.to(compute), sin_SR.to(compute), 1.0).to(dtype).to(compute)
        rstd = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
        normed = y * rstd
        g = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
    if cos_SR is not None:
        g = _rope_cpu(g, cos_SR.to(compute), sin_SR.to(compute), -1.0)  # the transpose: rotate back
    return _fresh(g, dtype)


def _fresh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, contiguous, in new memory (with every stage off, t may still be an input, which a
    custom op must not return)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


_ROPE_SCHEMA_ARGS = "Tensor? cos, Tensor? sin, Tensor? q_scale, bool qk_norm, float eps"


@torch.library.custom_op(
    "llama4::rope_qk_norm",
    mutates_args=(),
    device_types="cpu",
    schema=f"(Tensor q, Tensor k, {_ROPE_SCHEMA_ARGS}) -> (Tensor, Tensor)",
)
def _rope_qk_norm_op(q, k, cos, sin, q_scale, qk_norm, eps):
    """The CPU kernel: interleaved RoPE, weightless L2 QK-norm and the query scale in float32, rounded where Llama 4 rounds."""
    return (
        _rope_norm_fwd_cpu(q, cos, sin, q_scale, qk_norm, eps),
        _rope_norm_fwd_cpu(k, cos, sin, None, qk_norm, eps),
    )


@_rope_qk_norm_op.register_kernel("cuda")
def _rope_qk_norm_cuda(q, k, cos, sin, q_scale, qk_norm, eps):
    from engine.triton_kernels import norm_rope

    return norm_rope.rope_qk_norm_fwd(
        _last_dim_dense(q), _last_dim_dense(k), _contiguous(cos), _contiguous(sin), _contiguous(q_scale), qk_norm, eps
    )


@_rope_qk_norm_op.register_fake
def _rope_qk_norm_fake(q, k, cos, sin, q_scale, qk_norm, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op(
    "llama4::rope_qk_norm_bwd",
    mutates_args=(),
    device_types="cpu",
    schema=f"(Tensor dq_out, Tensor dk_out, Tensor q, Tensor k, {_ROPE_SCHEMA_ARGS}) -> (Tensor, Tensor)",
)
def _rope_qk_norm_bwd_op(dq_out, dk_out, q, k, cos, sin, q_scale, qk_norm, eps):
    return (
        _rope_norm_bwd_cpu(dq_out, q, cos, sin, q_scale, qk_norm, eps),
        _rope_norm_bwd_cpu(dk_out, k, cos, sin, None, qk_norm, eps),
    )


@_rope_qk_norm_bwd_op.register_kernel("cuda")
def _rope_qk_norm_bwd_cuda(dq_out, dk_out, q, k, cos, sin, q_scale, qk_norm, eps):
    from engine.triton_kernels import norm_rope

    return norm_rope.rope_qk_norm_bwd(
        _last_dim_dense(dq_out), _last_dim_dense(dk_out), _last_dim_dense(q), _last_dim_dense(k),
        _contiguous(cos), _contiguous(sin), _contiguous(q_scale), qk_norm, eps,
    )  # fmt: skip


@_rope_qk_norm_bwd_op.register_fake
def _rope_qk_norm_bwd_fake(dq_out, dk_out, q, k, cos, sin, q_scale, qk_norm, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides over B, S and heads but a unit stride over Dh (vectorised pair loads)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _rope_qk_norm_setup(ctx, inputs, output):
    q, k, cos, sin, q_scale, qk_norm, eps = inputs
    ctx.qk_norm, ctx.eps = qk_norm, eps
    ctx.save_for_backward(q, k, cos, sin, q_scale)


def _rope_qk_norm_backward(ctx, dq_out, dk_out):
    q, k, cos, sin, q_scale = ctx.saved_tensors
    # autograd hands a zero-filled gradient for an unused output only when asked; materialise it here.
    dq_out = torch.zeros_like(q) if dq_out is None else dq_out
    dk_out = torch.zeros_like(k) if dk_out is None else dk_out
    dq, dk = _rope_qk_norm_bwd_op(dq_out, dk_out, q, k, cos, sin, q_scale, ctx.qk_norm, ctx.eps)
    return dq, dk, None, None, None, None, None


_rope_qk_norm_op.register_autograd(_rope_qk_norm_backward, setup_context=_rope_qk_norm_setup)


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
    """RoPE, then QK-norm, then the query scale, on q and k in one op (one kernel launch on CUDA):

        rot  = rope(x).to(dtype)                  (x[2j], x[2j+1]) rotated by angle j of the position
        n    = (rot * rsqrt(mean(rot^2) + eps)).to(dtype)   when qk_norm (L2 QK-norm, no weight)
        q   <- (n_q * q_scale_S[s]).to(dtype)     when q_scale_S is given (keys are never scaled)

    q_BSHD [B, S, H, Dh], k_BSGD [B, S, G, Dh]: one dtype, float32 / float16 / bfloat16 (float64 on CPU), Dh
    even. cos_SR, sin_SR float32 [S, Dh / 2] (engine.model.layers.rope_cos_sin; float64 with float64 q / k),
    or both None to skip the rotation (NoPE layers). q_scale_S float32 [S] (Llama 4's temperature tuning:
    1 + attn_scale * log1p(floor((p + 1) / floor_scale))) or None. Every stage is float32 maths rounded to
    the inputs' dtype, in engine.model.layers.Attention's order. Returns (q_out [B, S, H, Dh],
    k_out [B, S, G, Dh]) contiguous. Differentiable in q and k (cos, sin and q_scale are constants).
    """
    op = "rope_qk_norm"
    if q_BSHD.dim() != 4:
        raise ValueError(f"{op}: q_BSHD must be 4-D [B, S, H, Dh], got shape {tuple(q_BSHD.shape)}")
    B, S, _, Dh = q_BSHD.shape
    if k_BSGD.dim() != 4 or k_BSGD.shape[0] != B or k_BSGD.shape[1] != S or k_BSGD.shape[3] != Dh:
        raise ValueError(f"{op}: k_BSGD must be [B={B}, S={S}, G, Dh={Dh}], got shape {tuple(k_BSGD.shape)}")
    if Dh == 0 or Dh % 2:
        raise ValueError(f"{op}: Dh (q_BSHD's last dim) must be even and >= 2 (rotary pairs), got {Dh}")
    _check_float(op, "q_BSHD", q_BSHD)
    _check_like(op, "k_BSGD", k_BSGD, "q_BSHD", q_BSHD)
    if (cos_SR is None) != (sin_SR is None):
        raise ValueError(f"{op}: cos_SR and sin_SR must both be given (RoPE) or both be None (no rotation)")
    table_dtypes = (torch.float32, torch.float64) if q_BSHD.dtype == torch.float64 else (torch.float32,)
    for name, t, shape in (
        ("cos_SR", cos_SR, (S, Dh // 2)),
        ("sin_SR", sin_SR, (S, Dh // 2)),
        ("q_scale_S", q_scale_S, (S,)),
    ):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be {list(shape)} ([S, Dh / 2] or [S]), got {tuple(t.shape)}")
        if t.dtype not in table_dtypes:
            allowed = "float32 (or float64 with float64 q_BSHD)"
            raise TypeError(f"{op}: {name} must be {allowed}, got {t.dtype}")
        if t.device != q_BSHD.device:
            raise ValueError(f"{op}: {name} must be on q_BSHD's device {q_BSHD.device}, got {t.device}")
    if qk_norm and not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    with nvtx_range("llama4.rope_qk_norm"):
        return _rope_qk_norm_op(q_BSHD, k_BSGD, cos_SR, sin_SR, q_scale_S, bool(qk_norm), float(eps))
