"""Benchmarks of engine.ops.rms_norm and engine.ops.rope_qk_norm (Triton on CUDA), forward and forward +
backward, against the same maths in eager torch (engine.ops.reference) and compiled by torch.compile.
Both ops are memory-bound: the number to read is GB/s against the measured device-copy ceiling.

Legend: T tokens, D model width, H query heads, G key/value heads, Dh head dim, R = Dh / 2.
CUDA: Scout's shapes (T = 8192 tokens of one sequence, D = 5120; H = 40, G = 8, Dh = 128), bf16.
CPU: a small shape (the CPU ops are plain torch; no compiled baseline, whose C++ build takes minutes there).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from bench import harness
from bench.shapes import SCOUT
from engine import ops
from engine.ops import reference

SEED = 0
DTYPE = torch.bfloat16
EPS = 1e-5
ROPE_THETA = 500000.0
COS_SIN_BYTES = 4  # float32 tables
SCOUT_TOKENS = 8192


@dataclass(frozen=True)
class NormShape:
    name: str
    tokens: int  # T = S (one sequence)
    width: int  # D
    heads: int  # H
    kv_heads: int  # G
    head_dim: int  # Dh

    @property
    def id(self) -> str:
        return f"{self.name}-T{self.tokens}"


SCOUT_NORM = NormShape("scout", SCOUT_TOKENS, SCOUT.d_model, SCOUT.n_heads, SCOUT.n_kv_heads, SCOUT.head_dim)
CPU_NORM = NormShape("small", 256, 512, 8, 2, 64)
CASES = [
    pytest.param("cpu", CPU_NORM, id=f"cpu-{CPU_NORM.id}"),
    pytest.param("cuda", SCOUT_NORM, id=f"cuda-{SCOUT_NORM.id}", marks=pytest.mark.gpu),
]
# (qk_norm, query scale): the model's RoPE layers (rotate + QK-norm) and NoPE layers (temperature scale only,
# the rotation skipped).
ROPE_VARIANTS = {"rope_layer": True, "nope_layer": False}

_COMPILED: dict[str, object] = {}


def _compiled(name: str, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _randn(*shape: int, device: str, dtype=DTYPE) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(SEED)
    return torch.randn(*shape, generator=gen, device=device, dtype=dtype)


def _fields(device: str, shape: NormShape, **extra) -> dict:
    return {"device": device, "dtype": str(DTYPE).removeprefix("torch."), "shape": shape.id, **extra}


def _timings(fns: dict, device: str, budget: harness.Budget, label: str) -> dict[str, float]:
    b = budget
    return {
        name: harness.time_op(fn, device, warmup=b.warmup, iters=b.iters, label=f"{label}.{name}")["median_us"]
        for name, fn in fns.items()
    }


def _record(benchmark, ceilings, times: dict[str, float], bytes_moved: int, device, shape, **extra) -> None:
    us = times["ours"]
    info = {"eager_us": times["eager"], "speedup_vs_eager": times["eager"] / us}
    if "compiled" in times:
        info |= {"compiled_us": times["compiled"], "speedup_vs_compiled": times["compiled"] / us}
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=us,
        bytes_moved=bytes_moved,
        baseline_us=times["eager"],
        baseline="eager torch (engine.ops.reference)",
        **info,
        **_fields(device, shape, **extra),
    )


def _add_compiled(fns: dict, device: str, make, *, skip: bool, extra: dict) -> None:
    """fns["compiled"] = make() on CUDA; with skip (forward + backward under --bench-quick: each compile of an
    autograd graph costs seconds) the skip is recorded instead."""
    if device != "cuda":
        return
    if skip:
        extra["compiled_skipped"] = "torch.compile baseline of forward + backward is skipped by --bench-quick"
    else:
        fns["compiled"] = make()


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="rms_norm")
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("device, shape", CASES)
def test_rms_norm(benchmark, device, shape, pass_, budget, ceilings, request):
    T, D = shape.tokens, shape.width
    x_TD = _randn(T, D, device=device)
    w_D = (1.0 + 0.1 * _randn(D, device=device, dtype=torch.float32)).to(DTYPE)
    dy_TD = _randn(T, D, device=device)
    quick = request.config.getoption("--bench-quick")
    # Time only a correct op: same rounding chain as eager torch, so equal to one bf16 ulp per rounding.
    torch.testing.assert_close(ops.rms_norm(x_TD, w_D, EPS), reference.rms_norm(x_TD, w_D, EPS), rtol=2**-6, atol=0)
    row_bytes = D * x_TD.element_size()
    extra: dict = {}
    if pass_ == "fwd":
        fns = {
            "ours": lambda: ops.rms_norm(x_TD, w_D, EPS),
            "eager": lambda: reference.rms_norm(x_TD, w_D, EPS),
        }

        def make():
            compiled = _compiled("rms_norm_fwd", reference.rms_norm)
            return lambda: compiled(x_TD, w_D, EPS)

        _add_compiled(fns, device, make, skip=False, extra=extra)
        bytes_moved = 2 * T * row_bytes + row_bytes  # x read, y written, w read
    else:
        x, w = x_TD.clone().requires_grad_(), w_D.clone().requires_grad_()

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(x, w, EPS), (x, w), dy_TD)

        fns = {"ours": fwd_bwd(ops.rms_norm), "eager": fwd_bwd(reference.rms_norm)}
        make = lambda: fwd_bwd(_compiled("rms_norm_fwd_bwd", reference.rms_norm))  # noqa: E731
        _add_compiled(fns, device, make, skip=quick, extra=extra)
        # Forward: x read, y written. Backward: x and dy read, dx written (the row statistics are recomputed).
        # w, dw and the dw partials are O(D * SMs), under 1 % at Scout's T.
        bytes_moved = 5 * T * row_bytes
    times = _timings(fns, device, budget, f"rms_norm.{pass_}.{shape.id}")
    _record(benchmark, ceilings, times, bytes_moved, device, shape, pass_=pass_, **extra)
    harness.wall_clock(benchmark, fns["ours"], device, budget)


# --------------------------------------------------------------------------------------------
# RoPE + QK-norm + query scale
# --------------------------------------------------------------------------------------------
def _rope_inputs(shape: NormShape, device: str, rope_layer: bool):
    S, H, G, Dh = shape.tokens, shape.heads, shape.kv_heads, shape.head_dim
    q = _randn(1, S, H, Dh, device=device)
    k = _randn(1, S, G, Dh, device=device)
    if rope_layer:
        inv_freq_R = 1.0 / (ROPE_THETA ** (torch.arange(0, Dh, 2, device=device, dtype=torch.float32) / Dh))
        angles_SR = torch.arange(S, device=device, dtype=torch.float32)[:, None] * inv_freq_R[None, :]
        return q, k, torch.cos(angles_SR), torch.sin(angles_SR), None
    positions_S = torch.arange(S, device=device, dtype=torch.float32)
    scale_S = torch.log1p(torch.floor((positions_S + 1.0) / 8192.0)) * 0.1 + 1.0  # Llama 4's temperature tuning
    return q, k, None, None, scale_S


@pytest.mark.benchmark(group="rope_qk_norm")
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
@pytest.mark.parametrize("device, shape", CASES)
def test_rope_qk_norm(benchmark, device, shape, variant, pass_, budget, ceilings, request):
    rope_layer = ROPE_VARIANTS[variant]
    q, k, cos, sin, scale = _rope_inputs(shape, device, rope_layer)
    quick = request.config.getoption("--bench-quick")
    kwargs = {"qk_norm": rope_layer, "eps": EPS, "q_scale_S": scale}
    ours_out = ops.rope_qk_norm(q, k, cos, sin, **kwargs)
    ref_out = reference.rope_qk_norm(q, k, cos, sin, **kwargs)
    for o, r in zip(ours_out, ref_out, strict=True):  # time only a correct op
        torch.testing.assert_close(o, r, rtol=2**-6, atol=2**-6 * r.abs().max().item())
    head_bytes = (q.numel() + k.numel()) * q.element_size()
    table_bytes = shape.tokens * (shape.head_dim // 2) * 2 * COS_SIN_BYTES if rope_layer else shape.tokens * 4
    extra: dict = {"variant": variant}
    if pass_ == "fwd":
        fns = {
            "ours": lambda: ops.rope_qk_norm(q, k, cos, sin, **kwargs),
            "eager": lambda: reference.rope_qk_norm(q, k, cos, sin, **kwargs),
        }

        def make():
            compiled = _compiled(f"rope_fwd_{variant}", reference.rope_qk_norm)
            return lambda: compiled(q, k, cos, sin, **kwargs)

        _add_compiled(fns, device, make, skip=False, extra=extra)
        bytes_moved = 2 * head_bytes + table_bytes
    else:
        q_, k_ = q.clone().requires_grad_(), k.clone().requires_grad_()
        g_q, g_k = torch.randn_like(q), torch.randn_like(k)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(q_, k_, cos, sin, **kwargs), (q_, k_), (g_q, g_k))

        fns = {"ours": fwd_bwd(ops.rope_qk_norm), "eager": fwd_bwd(reference.rope_qk_norm)}
        make = lambda: fwd_bwd(_compiled(f"rope_fwd_bwd_{variant}", reference.rope_qk_norm))  # noqa: E731
        _add_compiled(fns, device, make, skip=quick, extra=extra)
        # Forward: q, k read, outputs written. Backward: output gradients and (QK-norm) q, k read, dq, dk written.
        bytes_moved = (5 if rope_layer else 4) * head_bytes + 2 * table_bytes
    times = _timings(fns, device, budget, f"rope_qk_norm.{variant}.{pass_}.{shape.id}")
    _record(benchmark, ceilings, times, bytes_moved, device, shape, pass_=pass_, **extra)
    harness.wall_clock(benchmark, fns["ours"], device, budget)
