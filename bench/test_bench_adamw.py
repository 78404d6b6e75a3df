"""Benchmark of one optimizer step over many parameters: AdamW8bit (one fused llama4::adamw8bit_step per
tensor) against torch.optim.AdamW(fused=True) on CUDA and a pure-torch 8-bit step on CPU.

Legend: n parameters in all, B = n / block_size quantisation blocks. The step is memory-bound: the numbers
that matter are bytes moved per step, GB/s against the device's copy ceiling, and state bytes per parameter.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import harness
from engine import ops
from engine.optim import AdamW8bit

SEED = 0
BLOCK_SIZE = 256
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
# Sizes (these belong in bench/shapes.py): 1B parameters on CUDA as 8 tensors of 128M (the size of a
# Scout expert stack's slice; fp32: 4 GB params + 4 GB grads + 2 GB 8-bit state + torch's 8 GB state);
# ~10M on CPU, in 4 tensors, so the pure-torch 8-bit baseline fits in the CPU run's ~30 s.
CUDA_TENSORS, CUDA_TENSOR_NUMEL = 8, 128 * 2**20
CPU_TENSORS, CPU_TENSOR_NUMEL = 4, 10 * 2**20 // 4
CODE_BYTES = 1  # one uint8 code per element and moment
ABSMAX_BYTES = 4  # one float32 absmax per block and moment

# Targets (CUDA): 85% of the device-to-device copy bandwidth, 1.3x torch's fused AdamW (which moves
# 28 bytes per fp32 parameter to our 16), at most 2.1 bytes of state per parameter; CPU: 2x a plain
# torch implementation of the same 8-bit step.
TARGET_PCT_OF_CEILING = 85.0
TARGET_SPEEDUP_CUDA = 1.3
TARGET_SPEEDUP_CPU = 2.0
TARGET_STATE_BYTES_PER_PARAM = 2.1

CASES = [
    pytest.param("cpu", torch.float32, id="cpu-10M-float32"),
    pytest.param("cuda", torch.float32, id="cuda-1B-float32", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-1B-bfloat16", marks=pytest.mark.gpu),
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def step_bytes(n: int, param_dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
    """Bytes one fused 8-bit step moves: param read + written, grad read, two codes read + written,
    two absmax read + written per block."""
    p = torch.finfo(param_dtype).bits // 8
    blocks = math.ceil(n / block_size)
    return n * (2 * p + p + 2 * 2 * CODE_BYTES) + blocks * 2 * 2 * ABSMAX_BYTES


def torch_adamw_bytes(n: int, param_dtype: torch.dtype) -> int:
    """torch.optim.AdamW: param, exp_avg and exp_avg_sq read + written (in param's dtype), grad read."""
    p = torch.finfo(param_dtype).bits // 8
    return n * 7 * p


def _make_params(device: str, dtype: torch.dtype, tensors: int, numel: int) -> list[torch.Tensor]:
    # Drawn on the device: a billion host-side normals would take minutes.
    gen = torch.Generator(device=device).manual_seed(SEED)
    params = []
    for _ in range(tensors):
        p = torch.randn(numel, generator=gen, device=device, dtype=dtype)
        p.grad = torch.randn(numel, generator=gen, device=device, dtype=dtype)
        params.append(p)
    return params


# --------------------------------------------------------------------------------------------
# The plain-torch 8-bit step: the CPU baseline (what a user without our kernel would write).
# --------------------------------------------------------------------------------------------
def _nearest_codes(r_n: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Index of the qmap entry nearest to each r (ties to the lower entry), uint8 [n]."""
    hi = torch.searchsorted(qmap, r_n).clamp_(1, qmap.numel() - 1)
    lo = hi - 1
    return torch.where((qmap[hi] - r_n) < (r_n - qmap[lo]), hi, lo).to(torch.uint8)


def torch_adamw8bit_step(p: torch.Tensor, state: dict, *, step: int, block_size: int = BLOCK_SIZE) -> None:
    """One AdamW step with blockwise 8-bit state in torch ops (float32 params, n a multiple of block_size).

    state: exp_avg / exp_avg_sq uint8 [n] codes, absmax_exp_avg / absmax_exp_avg_sq float32 [B].
    """
    qs, qu = ops.dynamic_qmap(True).to(p.device), ops.dynamic_qmap(False).to(p.device)
    b1, b2 = BETAS
    g = p.grad
    m_Bb = qs[state["exp_avg"].long()].view(-1, block_size) * state["absmax_exp_avg"][:, None]
    v_Bb = qu[state["exp_avg_sq"].long()].view(-1, block_size) * state["absmax_exp_avg_sq"][:, None]
    m, v = m_Bb.view(-1), v_Bb.view(-1)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.mul_(1 - LR * WEIGHT_DECAY)
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(EPS)
    p.addcdiv_(m, denom, value=-LR / (1 - b1**step))
    for key, x_Bb, qmap in (("exp_avg", m_Bb, qs), ("exp_avg_sq", v_Bb, qu)):
        absmax_B = x_Bb.abs().amax(1)
        scale_B = torch.where(absmax_B > 0, absmax_B, torch.ones_like(absmax_B))
        state[key] = _nearest_codes((x_Bb / scale_B[:, None]).view(-1), qmap)
        state["absmax_" + key] = absmax_B


def _zero_8bit_state(n: int, device: str, block_size: int = BLOCK_SIZE) -> dict:
    zero_code = int(torch.argmin(ops.dynamic_qmap(True).abs()))
    blocks = n // block_size
    return {
        "exp_avg": torch.full((n,), zero_code, dtype=torch.uint8, device=device),
        "exp_avg_sq": torch.zeros(n, dtype=torch.uint8, device=device),
        "absmax_exp_avg": torch.zeros(blocks, device=device),
        "absmax_exp_avg_sq": torch.zeros(blocks, device=device),
    }


def _state_memory(opt: AdamW8bit, n: int, device: str) -> dict:
    """State bytes per parameter: counted from the state tensors and, on CUDA, from the allocator (the
    peak growth over the first step, which allocates the state: temporaries would show here)."""
    info: dict = {"target_state_bytes_per_param": TARGET_STATE_BYTES_PER_PARAM}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    opt.step()  # the first step allocates the state
    if device == "cuda":
        torch.cuda.synchronize()
        info["allocated_state_bytes_per_param"] = (torch.cuda.memory_allocated() - before) / n
        info["peak_state_bytes_per_param"] = (torch.cuda.max_memory_allocated() - before) / n
    info["state_bytes_per_param"] = opt.state_bytes() / n
    return info


@pytest.mark.benchmark(group="adamw8bit_step")
@pytest.mark.parametrize("device, dtype", CASES)
def test_adamw8bit_step(benchmark, device, dtype, budget, ceilings):
    tensors, numel = (CUDA_TENSORS, CUDA_TENSOR_NUMEL) if device == "cuda" else (CPU_TENSORS, CPU_TENSOR_NUMEL)
    n = tensors * numel
    params = _make_params(device, dtype, tensors, numel)
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    opt = AdamW8bit(params, **hyper, block_size=BLOCK_SIZE)
    memory = _state_memory(opt, n, device)

    b = budget
    t_ours = harness.time_op(opt.step, device, warmup=b.warmup, iters=b.iters, label=f"adamw8bit.ours.{device}")
    extra: dict = {}
    if device == "cuda":
        baseline_name = "torch.optim.AdamW(fused=True)"
        base_opt = torch.optim.AdamW(params, **hyper, fused=True)
        t_base = harness.time_op(
            base_opt.step, device, warmup=b.warmup, iters=b.iters, label=f"adamw8bit.torch_fused.{device}"
        )
        extra["baseline_gbps"] = torch_adamw_bytes(n, dtype) / (t_base["median_us"] * 1e-6) / 1e9
        extra["target_pct_of_ceiling"] = TARGET_PCT_OF_CEILING
        target_speedup = TARGET_SPEEDUP_CUDA
    else:
        baseline_name = "plain-torch 8-bit step (searchsorted requantisation)"
        states = [_zero_8bit_state(numel, device) for _ in params]
        step = [0]

        def run_torch_8bit() -> None:
            step[0] += 1
            for p, state in zip(params, states, strict=True):
                torch_adamw8bit_step(p, state, step=step[0])

        # The plain 8-bit step is ~10x slower than ours: fewer rounds keep the CPU run short.
        base_iters = max(1, b.iters // 3)
        t_base = harness.time_op(run_torch_8bit, device, warmup=1, iters=base_iters, label="adamw8bit.torch8bit.cpu")
        torch_opt = torch.optim.AdamW(params, **hyper, foreach=False)
        t_torch = harness.time_op(torch_opt.step, device, warmup=1, iters=b.iters, label="adamw8bit.torch_adamw.cpu")
        extra["torch_adamw_foreach_false_us"] = t_torch["median_us"]
        extra["speedup_vs_torch_adamw"] = t_torch["median_us"] / t_ours["median_us"]
        target_speedup = TARGET_SPEEDUP_CPU

    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        bytes_moved=step_bytes(n, dtype),
        baseline_us=t_base["median_us"],
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        baseline=baseline_name,
        target_speedup=target_speedup,
        device=device,
        dtype=_dtype_name(dtype),
        params=n,
        tensors=tensors,
        block_size=BLOCK_SIZE,
        **memory,
        **extra,
    )
    harness.wall_clock(benchmark, opt.step, device, budget)


def test_torch_8bit_baseline_is_the_same_step():
    """The CPU baseline computes the same step as the kernel (time only a like-for-like comparison): the
    first step lands on the same params (float32 rounding; both use the unquantised new moments) and
    nearly all the same codes (they may differ at float32 ties)."""
    numel = 64 * BLOCK_SIZE
    gen = torch.Generator().manual_seed(SEED)
    p_ref = torch.randn(numel, generator=gen)
    p_ref.grad = torch.randn(numel, generator=gen)
    p = p_ref.detach().clone()
    p.grad = p_ref.grad.clone()
    opt = AdamW8bit([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, block_size=BLOCK_SIZE)
    state = _zero_8bit_state(numel, "cpu")
    opt.step()
    torch_adamw8bit_step(p_ref, state, step=1)
    # The first update is lr * g / (|g| + eps), computed in float32 in two operation orders: 1e-5 of lr.
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5 * LR)
    for key in ("exp_avg", "exp_avg_sq"):
        same = (opt.state[p][key] == state[key]).double().mean().item()
        assert same > 0.99, (key, same)
