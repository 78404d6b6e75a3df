"""Benchmarks of the whole MoE block (engine.moe.MoE), forward + backward: our BF16 layer against the
same block written the torchtitan way (argsort dispatch, torch._grouped_mm experts, scatter_add combine),
and our FP8 layer (engine.ops.fp8_training's recipe) against our own BF16 layer.
Legend: T tokens, D width, E experts, F expert hidden, K top-k.
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from bench.shapes import SCOUT
from engine.moe import MoE
from engine.ops.fp8_training import Fp8Recipe

MOE_TARGET_SPEEDUP = 1.3  # issue 4: the whole layer, forward + backward, vs the torchtitan-style BF16 layer
FP8_TARGET_SPEEDUP = 1.25  # issue 4: the FP8 layer, forward + backward, vs our own BF16 layer
GPU_TOKENS = 16384
CPU_SHAPE = dict(T=256, D=256, F=128, E=8)


def torchtitan_style_moe(moe: MoE):
    """The same maths with plain torch: argsort dispatch, torch._grouped_mm, scatter_add combine."""
    w_gate_up_EKN = moe.gate_up_ENK.transpose(1, 2)  # views: torch._grouped_mm takes [E, K, N]
    w_down_EKN = moe.down_EDF.transpose(1, 2)
    F = moe.d_ff

    def forward(x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = moe.router(x_TD)
        top_TK = torch.topk(logits_TE + moe.expert_bias, moe.top_k, dim=-1).indices
        weights_TK = torch.sigmoid(torch.gather(logits_TE, 1, top_TK).float())
        order_N = torch.argsort(top_TK.reshape(-1), stable=True)
        token_N = order_N // moe.top_k
        counts_E = torch.bincount(top_TK.reshape(-1), minlength=moe.n_experts)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        x_ND = (x_TD[token_N].float() * weights_TK.reshape(-1)[order_N, None]).to(x_TD.dtype)
        h = torch._grouped_mm(x_ND, w_gate_up_EKN, offs=offs_E)
        a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        y_ND = torch._grouped_mm(a, w_down_EKN, offs=offs_E)
        out_TD = torch.zeros_like(x_TD).scatter_add_(0, token_N[:, None].expand_as(y_ND), y_ND)
        return out_TD + moe.shared_expert(x_TD)

    return forward


def layer_shape(device: str) -> tuple[int, int, int, int, torch.dtype]:
    """(T, D, F, E, dtype): Scout's expert widths at GPU_TOKENS in bfloat16 on CUDA, CPU_SHAPE in float32 on CPU."""
    if device == "cuda":
        return GPU_TOKENS, SCOUT.d_model, SCOUT.d_ff, SCOUT.n_experts, torch.bfloat16
    return CPU_SHAPE["T"], CPU_SHAPE["D"], CPU_SHAPE["F"], CPU_SHAPE["E"], torch.float32


def _layer_flops(T: int, D: int, F: int) -> int:
    """Forward + backward: 3x the forward's 2*T*D*2F + 2*T*F*D (routed, top-1) and the shared expert's same count."""
    return 3 * 2 * (2 * T * D * 2 * F + 2 * T * F * D)


def _fwd_bwd(fn, x_TD):
    def step():
        x = x_TD.detach().requires_grad_()
        fn(x).float().square().mean().backward()

    return step


@pytest.mark.benchmark(group="moe_layer")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_moe_layer_forward_backward(benchmark, device, budget, ceilings):
    T, D, F, E, dtype = layer_shape(device)
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm baseline")
    torch.manual_seed(0)
    moe = MoE(D, F, E, 1, dtype=dtype, device=device)
    x_TD = torch.randn(T, D, device=device, dtype=dtype)
    ours = _fwd_bwd(moe, x_TD)
    baseline = _fwd_bwd(torchtitan_style_moe(moe), x_TD)
    timing = harness.time_op(ours, device, warmup=budget.warmup, iters=budget.iters, label="moe-ours")
    base = harness.time_op(baseline, device, warmup=budget.warmup, iters=budget.iters, label="moe-torchtitan")
    harness.wall_clock(benchmark, ours, device, budget)
    flops = _layer_flops(T, D, F)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=timing["median_us"],
        flops=flops,
        baseline_us=base["median_us"],
        baseline="torchtitan-style (argsort, torch._grouped_mm, scatter_add)",
        tokens=T,
        experts=E,
        dtype=str(dtype).removeprefix("torch."),
        **({"target_speedup": MOE_TARGET_SPEEDUP} if device == "cuda" else {}),
    )


@pytest.mark.benchmark(group="moe_layer_fp8")
@pytest.mark.parametrize("granularity", ["block128", "row"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_moe_layer_fp8_vs_bf16_forward_backward(benchmark, device, granularity, budget, ceilings):
    """The FP8 layer (experts and shared expert on the FP8 grouped GEMM, FP8 wgrad) against our BF16
    layer with the same weights. On CPU the FP8 GEMMs dequantise (no speedup expected: a smoke run)."""
    T, D, F, E, dtype = layer_shape(device)
    torch.manual_seed(0)
    bf16 = MoE(D, F, E, 1, dtype=dtype, device=device)
    fp8 = MoE(D, F, E, 1, dtype=dtype, device=device, precision="fp8", fp8_recipe=Fp8Recipe(granularity))
    fp8.load_state_dict(bf16.state_dict())
    x_TD = torch.randn(T, D, device=device, dtype=dtype)
    ours = _fwd_bwd(fp8, x_TD)
    baseline = _fwd_bwd(bf16, x_TD)
    timing = harness.time_op(ours, device, warmup=budget.warmup, iters=budget.iters, label=f"moe-fp8-{granularity}")
    base = harness.time_op(baseline, device, warmup=budget.warmup, iters=budget.iters, label="moe-bf16")
    harness.wall_clock(benchmark, ours, device, budget)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=timing["median_us"],
        flops=_layer_flops(T, D, F),
        baseline_us=base["median_us"],
        baseline="our BF16 layer (same weights)",
        tokens=T,
        experts=E,
        granularity=granularity,
        dtype=str(dtype).removeprefix("torch."),
        **({"target_speedup": FP8_TARGET_SPEEDUP} if device == "cuda" else {}),
    )
