"""The Triton kernels of engine.triton_kernels.norm_rope run by Triton's interpreter on CPU, in float32 and
float16 (the interpreter computes bfloat16 wrongly; bf16 is tested on CUDA in tests/test_norm_rope.py): forward
against engine.ops.reference in the same dtype, values and gradients against float64, determinism of dw, strides.
Legend: T rows, D row width, B batch, S positions, H query heads, G key/value heads, Dh head dim.

Runs only with TRITON_INTERPRET=1 set before triton is imported: tests/test_norm_rope.py's
test_triton_kernels_in_the_interpreter runs this file so, in a subprocess (run it by hand the same way:
`TRITON_INTERPRET=1 python -m pytest tests/test_norm_rope_interpreter.py`).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "needs TRITON_INTERPRET=1 from the start (run by tests/test_norm_rope.py in a subprocess)",
        allow_module_level=True,
    )
pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction

from engine.ops import reference
from engine.triton_kernels import norm_rope as kernels
from tests import test_norm_rope as base
from tests.tolerances import assert_norm_close, norm_same_dtype_tol

EPS = base.EPS
INTERPRETER_DTYPES = [torch.float32, torch.float16]


def test_kernels_are_interpreted():
    assert isinstance(kernels.rms_norm_fwd_kernel, InterpretedFunction)
    assert isinstance(kernels.rope_qk_norm_bwd_kernel, InterpretedFunction)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (5, 100), (37, 48)])
def test_rms_norm_kernels(shape, dtype, gen):
    x, w = base._rms_inputs(gen, shape, dtype, "cpu")
    dy = torch.randn(shape, generator=gen).to(dtype)
    y = kernels.rms_norm_fwd(x, w, EPS)
    dx, dw = kernels.rms_norm_bwd(dy, x, w, EPS)
    (y_t,), (dx_t, dw_t) = base._grads(lambda a, b: reference.rms_norm(a, b, EPS), (x, w), (dy,))
    (y_64,), (dx_64, dw_64) = base._grads(
        lambda a, b: reference.rms_norm(a, b, EPS), (x.double(), w.double()), (dy.double(),)
    )
    torch.testing.assert_close(y, y_t, **norm_same_dtype_tol(dtype, 2, y_t))
    assert_norm_close(y, y_t, y_64, "y")
    assert_norm_close(dx, dx_t, dx_64, "dx")
    assert_norm_close(dw, dw_t, dw_64, "dw")
    assert dx.dtype == dtype and dw.dtype == dtype
    again = kernels.rms_norm_bwd(dy, x, w, EPS)
    assert torch.equal(again[0], dx) and torch.equal(again[1], dw)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("variant", list(base.VARIANTS))
@pytest.mark.parametrize("case", [base.ROPE_CASES[0], base.ROPE_CASES[2]])
def test_rope_qk_norm_kernels(case, variant, dtype, gen):
    q, k, cos, sin, scale, qk_norm = base._rope_inputs(gen, case, variant, dtype, "cpu")
    g_q, g_k = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
    qo, ko = kernels.rope_qk_norm_fwd(q, k, cos, sin, scale, qk_norm, EPS)
    dq, dk = kernels.rope_qk_norm_bwd(g_q, g_k, q, k, cos, sin, scale, qk_norm, EPS)

    def run(q_, k_, tables):
        fn = lambda a, b: reference.rope_qk_norm(a, b, *tables[:2], qk_norm=qk_norm, eps=EPS, q_scale_S=tables[2])  # noqa: E731
        return base._grads(fn, (q_, k_), (g_q.to(q_.dtype), g_k.to(k_.dtype)))

    (qo_t, ko_t), (dq_t, dk_t) = run(q, k, (cos, sin, scale))
    tables64 = tuple(None if t is None else t.double() for t in (cos, sin, scale))
    (qo_64, ko_64), (dq_64, dk_64) = run(q.double(), k.double(), tables64)
    torch.testing.assert_close(qo, qo_t, **norm_same_dtype_tol(dtype, base._rounded_stages(variant, "q"), qo_t))
    torch.testing.assert_close(ko, ko_t, **norm_same_dtype_tol(dtype, base._rounded_stages(variant, "k"), ko_t))
    for name, ours, plain, ref in (
        ("q", qo, qo_t, qo_64),
        ("k", ko, ko_t, ko_64),
        ("dq", dq, dq_t, dq_64),
        ("dk", dk, dk_t, dk_64),
    ):
        assert ours.dtype == dtype
        assert_norm_close(ours, plain, ref, name)


def test_rope_kernels_take_strides(gen):
    B, S, H, G, Dh = 2, 3, 4, 2, 16
    qkv = torch.randn(B, S, (H + 2 * G) * Dh, generator=gen)
    q = qkv[..., : H * Dh].view(B, S, H, Dh)
    k = qkv[..., H * Dh : (H + G) * Dh].view(B, S, G, Dh)
    cos, sin = base._rope_tables(S, Dh, gen, "cpu")
    ours = kernels.rope_qk_norm_fwd(q, k, cos, sin, None, True, EPS)
    ref = reference.rope_qk_norm(q.contiguous(), k.contiguous(), cos, sin, qk_norm=True, eps=EPS)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, **norm_same_dtype_tol(torch.float32, 2, r))


def test_cuda_op_wrappers(gen):
    """The ops' CUDA registrations (reshape of [..., D] rows, expanded gradients, strided heads) run the same
    launchers; here on CPU tensors through the interpreter, against the ops' CPU kernels."""
    from engine.ops import norm

    x, w = base._rms_inputs(gen, (2, 3, 40), torch.float32, "cpu")
    dy = torch.randn(1, 1, 40, generator=gen).expand(2, 3, 40)  # the gradient of a .sum(): stride 0
    expected = norm._rms_norm_op(x, w, EPS)
    torch.testing.assert_close(
        norm._rms_norm_cuda(x, w, EPS), expected, **norm_same_dtype_tol(torch.float32, 1, expected)
    )
    for ours, cpu in zip(norm._rms_norm_bwd_cuda(dy, x, w, EPS), norm._rms_norm_bwd_op(dy, x, w, EPS), strict=True):
        torch.testing.assert_close(ours, cpu, **norm_same_dtype_tol(torch.float32, 1, cpu))
    q, k, cos, sin, scale, qk_norm = base._rope_inputs(gen, (2, 3, 4, 2, 16), "all", torch.float32, "cpu")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, Dh] with heads outermost in memory
    g_q, g_k = torch.randn(q.shape, generator=gen), torch.randn(1, 1, 1, 16, generator=gen).expand(k.shape)
    args = (cos, sin, scale, qk_norm, EPS)
    for ours, cpu in zip(norm._rope_qk_norm_cuda(q, k, *args), norm._rope_qk_norm_op(q, k, *args), strict=True):
        torch.testing.assert_close(ours, cpu, **norm_same_dtype_tol(torch.float32, 1, cpu))
    ours = norm._rope_qk_norm_bwd_cuda(g_q, g_k, q, k, *args)
    cpu = norm._rope_qk_norm_bwd_op(g_q, g_k, q, k, *args)
    for o, c in zip(ours, cpu, strict=True):
        torch.testing.assert_close(o, c, **norm_same_dtype_tol(torch.float32, 1, c))
