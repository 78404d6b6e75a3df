"""engine.ops.rms_norm and engine.ops.rope_qk_norm: the CPU ops against engine.ops.reference (bit-exact in the
same dtype; values and gradients against float64; gradcheck), the Triton kernels run by Triton's interpreter on
CPU (float32 / float16: the interpreter computes bfloat16 wrongly), the CUDA kernels in bfloat16 (gpu), opcheck,
torch.compile and input validation.
Legend: T rows, D row width, B batch, S positions, H query heads, G key/value heads, Dh head dim, R = Dh / 2.

The interpreter tests live in tests/test_norm_rope_interpreter.py, which one test here runs in a subprocess
with TRITON_INTERPRET=1 (triton reads it at import and at each @triton.jit: one process cannot hold both).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import ops
from engine.ops import reference
from tests.tolerances import assert_norm_close, norm_same_dtype_tol

EPS = 1e-5  # Llama 4's rms_norm_eps
ROPE_THETA = 500000.0
ROOT = Path(__file__).resolve().parents[1]
INTERPRETER_TESTS = ROOT / "tests" / "test_norm_rope_interpreter.py"
INTERPRETER_TIMEOUT_S = 600

# (shape of x, ...D): one row, D not a power of two, a 3-D input, more rows than the backward's programs.
RMS_CASES = [(1, 8), (5, 100), (2, 3, 64), (37, 48)]
# (B, S, H, G, Dh): GQA like Scout (H = 5 G), one position, Dh where R is not a power of two, MHA.
ROPE_CASES = [(2, 5, 10, 2, 16), (1, 1, 4, 1, 8), (1, 7, 3, 3, 12), (3, 4, 2, 1, 32)]
# (rope, qk_norm, scale): the model's RoPE layer, its NoPE layer (temperature tuning), each stage alone, all, none.
VARIANTS = {
    "rope_layer": (True, True, False),
    "nope_layer": (False, False, True),
    "rope_only": (True, False, False),
    "norm_only": (False, True, False),
    "all": (True, True, True),
    "none": (False, False, False),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _rms_inputs(gen, shape, dtype, device):
    D = shape[-1]
    # Rows of different scales: the norm must remove them.
    x = torch.randn(*shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen).mul(4).add(0.1)
    w = 1.0 + 0.5 * torch.randn(D, generator=gen)
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def _rope_tables(S, Dh, gen, device, dtype=torch.float32):
    """cos / sin [S, R] as engine.model.layers.rope_cos_sin builds them (positions from a random offset)."""
    inv_freq_R = 1.0 / (ROPE_THETA ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh))
    positions_S = torch.arange(S, dtype=torch.float64) + torch.randint(0, 1000, (1,), generator=gen)
    angles_SR = positions_S[:, None] * inv_freq_R[None, :]
    return torch.cos(angles_SR).to(device, dtype), torch.sin(angles_SR).to(device, dtype)


def _rope_inputs(gen, case, variant, dtype, device, table_dtype=torch.float32):
    B, S, H, G, Dh = case
    rope, qk_norm, scaled = VARIANTS[variant]
    q = (torch.randn(B, S, H, Dh, generator=gen) * 3.0).to(device=device, dtype=dtype)
    k = (torch.randn(B, S, G, Dh, generator=gen) * 3.0).to(device=device, dtype=dtype)
    cos, sin = _rope_tables(S, Dh, gen, device, table_dtype) if rope else (None, None)
    # Temperature-tuning-like scales (>= 1); random, so a wrong position index shows.
    q_scale = (1.0 + torch.rand(S, generator=gen, dtype=torch.float64)).to(device, table_dtype) if scaled else None
    return q, k, cos, sin, q_scale, qk_norm


def _rounded_stages(variant: str, which: str) -> int:
    rope, qk_norm, scaled = VARIANTS[variant]
    return int(rope) + int(qk_norm) + int(scaled and which == "q")


def _grads(fn, inputs, upstream):
    """fn(*inputs) with grads of every floating input (those that require them): (outputs, grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs], [t.grad for t in leaves]


# --------------------------------------------------------------------------------------------
# RMSNorm: CPU and CUDA ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_CASES)
def test_rms_norm_cpu_is_the_reference_bitwise(shape, dtype, gen):
    x, w = _rms_inputs(gen, shape, dtype, "cpu")
    assert torch.equal(ops.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_CASES)
def test_rms_norm_values_and_grads_vs_float64(shape, dtype, device, gen):
    x, w = _rms_inputs(gen, shape, dtype, device)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    (y,), (dx, dw) = _grads(lambda a, b: ops.rms_norm(a, b, EPS), (x, w), (dy,))
    (y_t,), (dx_t, dw_t) = _grads(lambda a, b: reference.rms_norm(a, b, EPS), (x, w), (dy,))
    (y_64,), (dx_64, dw_64) = _grads(
        lambda a, b: reference.rms_norm(a, b, EPS), (x.double(), w.double()), (dy.double(),)
    )
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert_norm_close(y, y_t, y_64, "y")
    assert_norm_close(dx, dx_t, dx_64, "dx")
    assert_norm_close(dw, dw_t, dw_64, "dw")
    torch.testing.assert_close(y.cpu(), y_t.cpu(), **norm_same_dtype_tol(dtype, 2, y_t))


def test_rms_norm_gradcheck_float64(gen):
    x, w = _rms_inputs(gen, (3, 6), torch.float64, "cpu")
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, EPS), (x, w))


def test_rms_norm_weight_grad_is_deterministic(device, gen):
    x, w = _rms_inputs(gen, (257, 96), torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    dy = torch.randn(x.shape, generator=gen).to(device=device, dtype=x.dtype)
    first = torch.ops.llama4.rms_norm_bwd(dy, x, w, EPS)
    second = torch.ops.llama4.rms_norm_bwd(dy, x, w, EPS)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# --------------------------------------------------------------------------------------------
# RoPE + QK-norm + scale: CPU and CUDA ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", ROPE_CASES[:2])
def test_rope_qk_norm_cpu_is_the_reference_bitwise(case, variant, dtype, gen):
    q, k, cos, sin, scale, qk_norm = _rope_inputs(gen, case, variant, dtype, "cpu")
    ours = ops.rope_qk_norm(q, k, cos, sin, qk_norm=qk_norm, eps=EPS, q_scale_S=scale)
    ref = reference.rope_qk_norm(q, k, cos, sin, qk_norm=qk_norm, eps=EPS, q_scale_S=scale)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_rope_matches_the_models_complex_multiply(gen):
    """Interleaved pairs as Meta's view_as_complex(x.unflatten(-1, (-1, 2))) * exp(i angle): not rotate_half."""
    q, k, cos, sin, _, _ = _rope_inputs(gen, ROPE_CASES[0], "rope_only", torch.float64, "cpu", torch.float64)
    rot = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None, :]
    q_c = torch.view_as_real(torch.view_as_complex(q.unflatten(-1, (-1, 2)).contiguous()) * rot).flatten(-2)
    q_out, _ = ops.rope_qk_norm(q, k, cos, sin, qk_norm=False, eps=EPS)
    torch.testing.assert_close(q_out, q_c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_qk_norm_values_and_grads_vs_float64(case, variant, dtype, device, gen):
    q, k, cos, sin, scale, qk_norm = _rope_inputs(gen, case, variant, dtype, device)
    g_q = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    g_k = torch.randn(k.shape, generator=gen).to(device=device, dtype=dtype)

    def run(fn, q_, k_, tables):
        return _grads(
            lambda a, b: fn(a, b, *tables[:2], qk_norm=qk_norm, eps=EPS, q_scale_S=tables[2]),
            (q_, k_),
            (g_q.to(q_.dtype), g_k.to(k_.dtype)),
        )

    tables64 = tuple(None if t is None else t.double() for t in (cos, sin, scale))
    (qo, ko), (dq, dk) = run(ops.rope_qk_norm, q, k, (cos, sin, scale))
    (qo_t, ko_t), (dq_t, dk_t) = run(reference.rope_qk_norm, q, k, (cos, sin, scale))
    (qo_64, ko_64), (dq_64, dk_64) = run(reference.rope_qk_norm, q.double(), k.double(), tables64)
    assert qo.dtype == ko.dtype == dq.dtype == dk.dtype == dtype
    for name, ours, plain, ref in (
        ("q", qo, qo_t, qo_64),
        ("k", ko, ko_t, ko_64),
        ("dq", dq, dq_t, dq_64),
        ("dk", dk, dk_t, dk_64),
    ):
        assert_norm_close(ours, plain, ref, name)
    torch.testing.assert_close(qo.cpu(), qo_t.cpu(), **norm_same_dtype_tol(dtype, _rounded_stages(variant, "q"), qo_t))
    torch.testing.assert_close(ko.cpu(), ko_t.cpu(), **norm_same_dtype_tol(dtype, _rounded_stages(variant, "k"), ko_t))


@pytest.mark.parametrize("variant", ["rope_layer", "nope_layer", "all"])
def test_rope_qk_norm_gradcheck_float64(variant, gen):
    q, k, cos, sin, scale, qk_norm = _rope_inputs(gen, (1, 3, 2, 1, 8), variant, torch.float64, "cpu", torch.float64)
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: ops.rope_qk_norm(a, b, cos, sin, qk_norm=qk_norm, eps=EPS, q_scale_S=scale), (q, k)
    )


def test_rope_qk_norm_takes_strided_views(device, gen):
    """q and k as views of one fused qkv projection [B, S, (H + 2G) * Dh] (the heads not contiguous)."""
    B, S, H, G, Dh = 2, 3, 4, 2, 16
    qkv = torch.randn(B, S, (H + 2 * G) * Dh, generator=gen).to(device)
    q = qkv[..., : H * Dh].view(B, S, H, Dh)
    k = qkv[..., H * Dh : (H + G) * Dh].view(B, S, G, Dh)
    cos, sin = _rope_tables(S, Dh, gen, device)
    ours = ops.rope_qk_norm(q, k, cos, sin, qk_norm=True, eps=EPS)
    ref = reference.rope_qk_norm(q.contiguous(), k.contiguous(), cos, sin, qk_norm=True, eps=EPS)
    for o, r in zip(ours, ref, strict=True):
        assert o.is_contiguous()
        torch.testing.assert_close(o, r, **norm_same_dtype_tol(torch.float32, 2, r))


# --------------------------------------------------------------------------------------------
# The Triton kernels in Triton's interpreter (CPU): tests/test_norm_rope_interpreter.py, in a subprocess
# --------------------------------------------------------------------------------------------
def test_triton_kernels_in_the_interpreter():
    """Runs tests/test_norm_rope_interpreter.py with TRITON_INTERPRET=1 in a fresh Python: triton reads the
    variable when it is imported and when @triton.jit decorates (its own tl.sum included), so interpreted and
    compiled kernels cannot share one process."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INTERPRETER_TESTS)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=INTERPRETER_TIMEOUT_S)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{summary}\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert "passed" in summary and "skipped" not in summary, summary


# --------------------------------------------------------------------------------------------
# CUDA: bf16 against the reference in bf16 (the interpreter cannot run bf16), Scout's head shapes
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["rope_layer", "nope_layer", "all"])
def test_cuda_rope_qk_norm_scout_heads_bf16(variant, gen):
    q, k, cos, sin, scale, qk_norm = _rope_inputs(gen, (2, 33, 40, 8, 128), variant, torch.bfloat16, "cuda")
    qo, ko = ops.rope_qk_norm(q, k, cos, sin, qk_norm=qk_norm, eps=EPS, q_scale_S=scale)
    qo_t, ko_t = reference.rope_qk_norm(q, k, cos, sin, qk_norm=qk_norm, eps=EPS, q_scale_S=scale)
    torch.testing.assert_close(qo, qo_t, **norm_same_dtype_tol(torch.bfloat16, _rounded_stages(variant, "q"), qo_t))
    torch.testing.assert_close(ko, ko_t, **norm_same_dtype_tol(torch.bfloat16, _rounded_stages(variant, "k"), ko_t))


@pytest.mark.gpu
def test_cuda_rms_norm_scout_width_bf16(gen):
    x, w = _rms_inputs(gen, (300, 5120), torch.bfloat16, "cuda")
    dy = torch.randn(x.shape, generator=gen).to("cuda", torch.bfloat16)
    (y,), (dx, dw) = _grads(lambda a, b: ops.rms_norm(a, b, EPS), (x, w), (dy,))
    (y_t,), (dx_t, dw_t) = _grads(lambda a, b: reference.rms_norm(a, b, EPS), (x, w), (dy,))
    (y_64,), (dx_64, dw_64) = _grads(
        lambda a, b: reference.rms_norm(a, b, EPS), (x.double(), w.double()), (dy.double(),)
    )
    torch.testing.assert_close(y, y_t, **norm_same_dtype_tol(torch.bfloat16, 2, y_t))
    for name, ours, plain, ref in (("y", y, y_t, y_64), ("dx", dx, dx_t, dx_64), ("dw", dw, dw_t, dw_64)):
        assert_norm_close(ours, plain, ref, name)


# --------------------------------------------------------------------------------------------
# opcheck, torch.compile, validation
# --------------------------------------------------------------------------------------------
def test_opcheck(device, gen):
    x, w = _rms_inputs(gen, (6, 24), torch.float32, device)
    torch.library.opcheck(torch.ops.llama4.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), EPS))
    dy = torch.randn(x.shape, generator=gen).to(device)
    torch.library.opcheck(torch.ops.llama4.rms_norm_bwd.default, (dy, x.detach(), w.detach(), EPS))
    for variant in ("rope_layer", "nope_layer", "all"):
        q, k, cos, sin, scale, qk_norm = _rope_inputs(gen, ROPE_CASES[0], variant, torch.float32, device)
        args = (q.requires_grad_(), k.requires_grad_(), cos, sin, scale, qk_norm, EPS)
        torch.library.opcheck(torch.ops.llama4.rope_qk_norm.default, args)
        g_q, g_k = torch.randn_like(q), torch.randn_like(k)
        torch.library.opcheck(
            torch.ops.llama4.rope_qk_norm_bwd.default, (g_q, g_k, q.detach(), k.detach(), cos, sin, scale, qk_norm, EPS)
        )


def test_torch_compile_fullgraph(device, gen):
    x, w = _rms_inputs(gen, (4, 32), torch.float32, device)
    q, k, cos, sin, scale, _ = _rope_inputs(gen, ROPE_CASES[0], "all", torch.float32, device)

    def block(x_, w_, q_, k_):
        qo, ko = ops.rope_qk_norm(q_, k_, cos, sin, qk_norm=True, eps=EPS, q_scale_S=scale)
        return ops.rms_norm(x_, w_, EPS).sum() + qo.square().sum() + (ko * 0.5).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    _, grads = _grads(compiled, (x, w, q, k), (torch.tensor(1.0, device=device),))
    (_,), grads_eager = _grads(block, (x, w, q, k), (torch.tensor(1.0, device=device),))
    for g, e in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, e, rtol=0.0, atol=0.0)


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight must be"):
        ops.rms_norm(x, torch.randn(7), EPS)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ops.rms_norm(x, w.half(), EPS)
    with pytest.raises(TypeError, match="x must be one of"):
        ops.rms_norm(x.to(torch.int32), w.to(torch.int32), EPS)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.rms_norm(x, w, 0.0)
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="q_BSHD must be 4-D"):
        ops.rope_qk_norm(q[0], k, cos, sin, qk_norm=True, eps=EPS)
    with pytest.raises(ValueError, match="k_BSGD must be"):
        ops.rope_qk_norm(q, torch.randn(1, 2, 2, 8), cos, sin, qk_norm=True, eps=EPS)
    with pytest.raises(ValueError, match="must be even"):
        ops.rope_qk_norm(q[..., :7], k[..., :7], cos, sin, qk_norm=True, eps=EPS)
    with pytest.raises(TypeError, match="k_BSGD must have q_BSHD's dtype"):
        ops.rope_qk_norm(q, k.half(), cos, sin, qk_norm=True, eps=EPS)
    with pytest.raises(ValueError, match="both be given"):
        ops.rope_qk_norm(q, k, cos, None, qk_norm=True, eps=EPS)
    with pytest.raises(ValueError, match="cos_SR must be"):
        ops.rope_qk_norm(q, k, cos[:2], sin, qk_norm=True, eps=EPS)
    with pytest.raises(TypeError, match="sin_SR must be float32"):
        ops.rope_qk_norm(q, k, cos, sin.half(), qk_norm=True, eps=EPS)
    with pytest.raises(ValueError, match="q_scale_S must be"):
        ops.rope_qk_norm(q, k, cos, sin, qk_norm=True, eps=EPS, q_scale_S=torch.ones(4))
