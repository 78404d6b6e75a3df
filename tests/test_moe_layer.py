"""The MoE block (engine.moe.MoE): Llama 4's maths against a float64 pure-torch reference and
against transformers' Llama4TextMoe, gradients of every weight, determinism, edge routings, the
auxiliary-loss-free bias update, the FP8 training recipe (engine.ops.fp8_training), LoRA on the
experts, the auxiliary load-balance loss and load statistics, and (GPU) no host synchronisation and
CUDA-graph capture. Legend: T tokens, D width, E experts, F hidden, K top-k, M rows, N outputs.
"""

from __future__ import annotations

import pytest
import torch
from cuda_graphs import capture_cuda_graph
from tolerances import (
    BF16_LAYER_MAX_DIFF,
    FP8_GEMM_MAX_DIFF,
    FP8_LAYER_ROUTER_MIN_ROWS,
    calc_diff,
    fp8_layer_max_diff,
)

from engine.moe import MoE, grouped_linear, update_expert_bias
from engine.ops import reference
from engine.ops.fp8_training import (
    FP8_E4M3,
    FP8_E5M2,
    Fp8Recipe,
    grouped_wgrad_fp8,
    make_fp8_weight,
    quantize_per_expert_channel,
    quantize_weight_fp8,
)

RTOL = 1e-5  # float32 kernels against float64 (the bound for the transformers comparison)
D_FP8, F_FP8 = 160, 96  # FP8 tests: a partial 128-block in D, multiples of 16 (the CUDA kernels' rows)


def reference_moe(x_TD, moe: MoE, ids_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float64 Llama 4 MoE: every expert sees the input scaled by its score (0 if unselected).

    ids_TK: the experts to use (the layer's own choice, for low-precision layers whose logits may
    order a near tie differently; the router's selection has its own exact tests); LoRA adapters of
    `moe` are added to the expert weights.
    """
    x = x_TD.double()
    logits = x @ moe.router.weight.double().t()
    if ids_TK is None:
        keys = logits + moe.expert_bias.double()
        ids_TK = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, : moe.top_k]
    ids = ids_TK.long().cpu()
    scores = torch.zeros_like(logits).scatter(1, ids, torch.sigmoid(torch.gather(logits, 1, ids)))
    F = moe.d_ff
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        w_gate_up, w_down = moe.gate_up_ENK[e].double(), moe.down_EDF[e].double()
        if moe.lora_rank:
            s = moe.lora_scaling
            w_gate_up = w_gate_up + s * moe.lora_b_gate_up_ENR[e].double() @ moe.lora_a_gate_up_ERD[e].double()
            w_down = w_down + s * moe.lora_b_down_EDR[e].double() @ moe.lora_a_down_ERF[e].double()
        h = (x * scores[:, e : e + 1]) @ w_gate_up.t()
        a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        out = out + a @ w_down.t()
    if moe.shared_expert is not None:
        se = moe.shared_expert
        g = x @ se.gate_proj.weight.double().t()
        u = x @ se.up_proj.weight.double().t()
        out = out + (torch.nn.functional.silu(g) * u) @ se.down_proj.weight.double().t()
    return out


def make_moe(gen, D=32, F=24, E=6, K=1, shared=True) -> MoE:
    moe = MoE(D, F, E, K, shared_expert=shared, dtype=torch.float32)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return moe


@pytest.mark.parametrize("T, E, K, shared", [(1, 4, 1, True), (37, 6, 1, True), (64, 16, 2, False), (20, 5, 5, True)])
def test_forward_and_gradients_match_float64(T, E, K, shared, gen):
    moe = make_moe(gen, E=E, K=K, shared=shared)
    x = torch.randn(T, moe.d_model, generator=gen, requires_grad=True)
    out = moe(x)
    x_ref = x.detach().double().requires_grad_()
    # A float64 twin whose parameters are the leaves we differentiate.
    twin = make_moe(torch.Generator().manual_seed(0), E=E, K=K, shared=shared).double()
    torch.nn.utils.vector_to_parameters(
        torch.nn.utils.parameters_to_vector(moe.parameters()).double(), twin.parameters()
    )
    twin.expert_bias = moe.expert_bias.double()
    expected = reference_moe(x_ref, twin)
    torch.testing.assert_close(out.double(), expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())

    g = torch.randn(out.shape, generator=gen)
    (out * g).sum().backward()
    (expected * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=RTOL, atol=RTOL * x_ref.grad.abs().max().item())
    for (name, p), (_, p_ref) in zip(moe.named_parameters(), twin.named_parameters(), strict=True):
        scale = max(p_ref.grad.abs().max().item(), 1e-12)
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=RTOL, atol=RTOL * scale, msg=name)


def test_matches_transformers_llama4_text_moe(gen):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = transformers.Llama4TextConfig(
        hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=1, hidden_act="silu"
    )
    hf = Llama4TextMoe(config).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    moe = MoE(32, 24, 4, 1, dtype=torch.float32)
    with torch.no_grad():
        moe.router.weight.copy_(hf.router.weight)
        moe.gate_up_ENK.copy_(hf.experts.gate_up_proj.transpose(1, 2))  # HF [E, D, 2F] -> ours [E, 2F, D]
        moe.down_EDF.copy_(hf.experts.down_proj.transpose(1, 2))  # HF [E, F, D] -> ours [E, D, F]
        moe.shared_expert.load_state_dict(hf.shared_expert.state_dict())
    x = torch.randn(2, 9, 32, generator=gen)
    hf_out = hf(x)
    hf_out = hf_out[0] if isinstance(hf_out, tuple) else hf_out
    ours = moe(x)
    torch.testing.assert_close(ours, hf_out.reshape(ours.shape), rtol=RTOL, atol=RTOL * hf_out.abs().max().item())


def test_bitwise_deterministic(gen):
    moe = make_moe(gen, E=8, K=2)
    x = torch.randn(50, moe.d_model, generator=gen)
    results = []
    for _ in range(2):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        out = moe(xi)
        out.square().sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_all_tokens_to_one_expert_and_empty_experts_get_zero_gradient(gen):
    moe = make_moe(gen, E=5)
    moe.expert_bias[2] = 1e6  # steers every token to expert 2 (selection only: weights stay sigmoid(logit))
    x = torch.randn(12, moe.d_model, generator=gen)
    moe(x).sum().backward()
    assert moe.expert_load().tolist() == [0, 0, 12, 0, 0]
    for e in (0, 1, 3, 4):
        assert torch.equal(moe.gate_up_ENK.grad[e], torch.zeros_like(moe.gate_up_ENK.grad[e]))
        assert torch.equal(moe.down_EDF.grad[e], torch.zeros_like(moe.down_EDF.grad[e]))
    assert moe.gate_up_ENK.grad[2].abs().sum() > 0


def test_update_expert_bias_sign_rule():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 0, 5, 5], dtype=torch.int32), coeff=0.1)
    # mean load 5: expert 0 over-loaded (down), expert 1 under-loaded (up), others unchanged; zero mean.
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert abs(bias.sum().item()) < 1e-7


def test_unknown_precision_and_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="precision"):
        MoE(8, 8, 2, precision="int4")
    with pytest.raises(ValueError, match="lora_rank"):
        MoE(8, 8, 2, lora_rank=-1)
    with pytest.raises(ValueError, match="granularity"):
        Fp8Recipe(granularity="tensor")
    with pytest.raises(ValueError, match="grad_dtype"):
        Fp8Recipe(grad_dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Helpers for the low-precision layers: a float64 twin with the same parameters, and the comparison.
# --------------------------------------------------------------------------------------------
def float64_twin(moe: MoE) -> MoE:
    """A float64 MoE (on the CPU) with `moe`'s parameters as its own leaves, LoRA included."""
    twin = MoE(
        moe.d_model,
        moe.d_ff,
        moe.n_experts,
        moe.top_k,
        shared_expert=moe.shared_expert is not None,
        lora_rank=moe.lora_rank,
        lora_alpha=moe.lora_scaling * moe.lora_rank if moe.lora_rank else None,
        dtype=torch.float64,
    )
    twin.load_state_dict({k: v.double().cpu() for k, v in moe.state_dict().items()})
    for p, p_twin in zip(moe.parameters(), twin.parameters(), strict=True):
        p_twin.requires_grad_(p.requires_grad)
    return twin


def run_against_float64(moe: MoE, x_TD: torch.Tensor, gen: torch.Generator):
    """Forward + backward of `moe` and of its float64 twin (same experts chosen) on the same input
    and upstream gradient. Returns [(name, ours, float64)] for the output, x's gradient and every
    parameter that requires a gradient."""
    x = x_TD.clone().requires_grad_()
    out = moe(x)
    twin = float64_twin(moe)
    x64 = x_TD.detach().double().cpu().requires_grad_()
    expected = reference_moe(x64, twin, ids_TK=moe.last_route.topk_ids_TK)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (out.double() * g.to(out.device)).sum().backward()
    (expected * g).sum().backward()
    pairs = [("out", out.detach(), expected.detach()), ("x", x.grad, x64.grad)]
    for (name, p), p_twin in zip(moe.named_parameters(), twin.parameters(), strict=True):
        if p.requires_grad:
            pairs.append((name, p.grad, p_twin.grad))
    return pairs


def assert_calc_diff(pairs, max_diff: float, routed_rows: int | None = None) -> None:
    """calc_diff of every pair below max_diff; the router's gradient only over enough routed rows
    (tolerances.FP8_LAYER_ROUTER_MIN_ROWS: a few rows' dot products may cancel)."""
    for name, ours, expected in pairs:
        if name == "router.weight" and routed_rows is not None and routed_rows < FP8_LAYER_ROUTER_MIN_ROWS:
            continue
        assert ours is not None, f"{name}: no gradient"
        diff = calc_diff(ours.double().cpu(), expected)
        assert diff < max_diff, f"{name}: calc_diff {diff:.2e} >= {max_diff:.1e}"


def layer(D, F, E, K, gen, *, device="cpu", dtype=torch.float32, **kwargs) -> MoE:
    """A layer whose parameters (LoRA B included, so its gradient paths are live) are random."""
    moe = MoE(D, F, E, K, dtype=dtype, device=device, **kwargs)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5).to(p.device, p.dtype))
    return moe


FP8_RECIPES = [
    Fp8Recipe("block128"),
    Fp8Recipe("row"),
    Fp8Recipe("block128", fp8_wgrad=False),
    Fp8Recipe("row", grad_dtype=FP8_E5M2),
    Fp8Recipe("block128", grad_dtype=FP8_E5M2, fp8_wgrad=False),
]


def recipe_id(r: Fp8Recipe) -> str:
    return f"{r.granularity}-{str(r.grad_dtype).removeprefix('torch.float8_')}-{'fp8' if r.fp8_wgrad else 'bf16'}wgrad"


# --------------------------------------------------------------------------------------------
# FP8 recipe: the layer against float64, and each of its GEMMs against its own quantised operands.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", FP8_RECIPES, ids=recipe_id)
@pytest.mark.parametrize("T, E, K, shared", [(1, 4, 1, True), (37, 6, 1, True), (64, 8, 2, False)])
def test_fp8_layer_forward_and_gradients_vs_float64(T, E, K, shared, recipe, device, gen):
    """The FP8 layer (BF16 activations, as on the GPU) against the unquantised float64 MoE: output, x's
    gradient and every weight's gradient (router, experts, shared expert) within the FP8-layer rule."""
    fp8 = dict(precision="fp8", fp8_recipe=recipe)
    moe = layer(D_FP8, F_FP8, E, K, gen, device=device, dtype=torch.bfloat16, shared_expert=shared, **fp8)
    x_TD = torch.randn(T, D_FP8, generator=gen).to(device, torch.bfloat16)
    assert_calc_diff(run_against_float64(moe, x_TD, gen), fp8_layer_max_diff(recipe.grad_dtype), routed_rows=T * K)


def test_fp8_layer_float32_on_cpu_and_the_bf16_layer_vs_float64(gen):
    """float32 activations through the FP8 recipe (CPU), and the BF16 layer within its own, tighter rule."""
    fp8 = layer(D_FP8, F_FP8, 6, 2, gen, precision="fp8")
    x_TD = torch.randn(40, D_FP8, generator=gen)
    assert_calc_diff(run_against_float64(fp8, x_TD, gen), fp8_layer_max_diff(FP8_E4M3))
    bf16 = layer(D_FP8, F_FP8, 6, 2, gen, dtype=torch.bfloat16)
    assert_calc_diff(run_against_float64(bf16, x_TD.bfloat16(), gen), BF16_LAYER_MAX_DIFF)


@pytest.mark.parametrize("granularity", ["row", "block128"])
def test_fp8_weight_quantisation_is_bit_exact_and_the_block_transpose_needs_no_requantisation(granularity, gen):
    E, N, K = 3, 200, 136  # partial blocks in both directions
    w_ENK = torch.randn(E, N, K, generator=gen) * torch.logspace(-3, 2, N)[:, None]  # channels of very different size
    w_fp8, scale = quantize_weight_fp8(w_ENK, granularity)
    if granularity == "row":
        ref_fp8, ref_scale = reference.quantize_fp8(w_ENK.reshape(E * N, K), "row")
        assert torch.equal(scale, ref_scale.view(E, N))
        assert torch.equal(w_fp8.view(torch.uint8), ref_fp8.view(E, N, K).view(torch.uint8))
    else:
        assert scale.shape == (E, 2, 2)
        for e in range(E):
            for i in range(2):
                for j in range(2):
                    block = w_ENK[e, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                    ref_fp8, ref_scale = reference.quantize_fp8(block.contiguous(), "tensor")
                    assert torch.equal(scale[e, i, j], ref_scale)
                    got = w_fp8[e, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                    assert torch.equal(got.view(torch.uint8), ref_fp8.view(torch.uint8))
    # dgrad's copy of W^T: exactly the quantisation of the transposed weight, for both granularities.
    qw = make_fp8_weight(w_ENK, granularity)
    wt_fp8, wt_scale = quantize_weight_fp8(w_ENK.transpose(1, 2).contiguous(), granularity)
    assert torch.equal(qw.wt_fp8.view(torch.uint8), wt_fp8.view(torch.uint8))
    assert torch.equal(qw.wt_scale, wt_scale)


@pytest.mark.parametrize("fp8_dtype", [FP8_E4M3, FP8_E5M2])
def test_per_expert_channel_quantisation_matches_the_reference_per_expert(fp8_dtype, gen):
    """wgrad's scaling: one scale per (expert, column) over the expert's rows; empty experts get the floor."""
    sizes = [5, 0, 11, 1, 0]
    M = sum(sizes) + 3  # rows past the last group become 0
    x_MK = torch.randn(M, 40, generator=gen) * torch.logspace(-2, 2, 40)
    x_fp8, scale_EK = quantize_per_expert_channel(x_MK, torch.tensor(sizes, dtype=torch.int32), fp8_dtype)
    start = 0
    for e, rows in enumerate(sizes):
        part = x_MK[start : start + rows].t().contiguous()  # columns become rows: the "row" granularity
        ref_fp8, ref_scale = reference.quantize_fp8(part, "row", fp8_dtype)
        assert torch.equal(scale_EK[e], ref_scale), e
        assert torch.equal(x_fp8[start : start + rows].t().contiguous().view(torch.uint8), ref_fp8.view(torch.uint8))
        start += rows
    assert torch.equal(x_fp8[start:].float(), torch.zeros(M - start, 40))


def test_each_fp8_gemm_equals_float64_on_its_quantised_operands(gen):
    """Forward, dgrad and wgrad of the FP8 grouped linear against float64 GEMMs of the very operands they
    quantise (DESIGN's FP8 GEMM rule): the layer's extra error is quantisation only, never the GEMMs."""
    from engine.ops.fp8_training import fp8_grouped_linear

    sizes = torch.tensor([7, 0, 20, 1], dtype=torch.int32)
    M, N, K = 28, 48, 160
    x_MK = torch.randn(M, K, generator=gen).requires_grad_()
    w_ENK = (torch.randn(4, N, K, generator=gen) * K**-0.5).requires_grad_()
    dy_MN = torch.randn(M, N, generator=gen)
    for granularity in ("row", "block128"):
        recipe = Fp8Recipe(granularity)
        qw = make_fp8_weight(w_ENK.detach(), granularity)
        x_MK.grad = w_ENK.grad = None
        y_MN = fp8_grouped_linear(x_MK, sizes, qw, recipe, w_ENK)
        y_MN.backward(dy_MN)
        x_fp8, x_scale = reference.quantize_fp8(x_MK.detach(), granularity)
        assert calc_diff(y_MN, reference.grouped_gemm(x_fp8, qw.w_fp8, sizes, x_scale=x_scale, w_scale=qw.scale)) < (
            FP8_GEMM_MAX_DIFF
        )
        dy_fp8, dy_scale = reference.quantize_fp8(dy_MN, granularity)
        dx_ref = reference.grouped_gemm(dy_fp8, qw.wt_fp8, sizes, x_scale=dy_scale, w_scale=qw.wt_scale)
        assert calc_diff(x_MK.grad, dx_ref) < FP8_GEMM_MAX_DIFF
        dy_q, dy_s = quantize_per_expert_channel(dy_MN, sizes)
        x_q, x_s = quantize_per_expert_channel(x_MK.detach(), sizes)
        start = 0
        for e, rows in enumerate(sizes.tolist()):
            dy_e = dy_q[start : start + rows].double() * dy_s[e].double()
            x_e = x_q[start : start + rows].double() * x_s[e].double()
            if rows:
                assert calc_diff(w_ENK.grad[e], dy_e.t() @ x_e) < FP8_GEMM_MAX_DIFF
            else:
                assert torch.equal(w_ENK.grad[e], torch.zeros(N, K))
            start += rows
    dw = grouped_wgrad_fp8(dy_q, dy_s, x_q, x_s, sizes)
    assert torch.equal(dw[1], torch.zeros(N, K))


def test_fp8_empty_experts_all_tokens_to_one_expert_and_bitwise_determinism(device, gen):
    moe = layer(D_FP8, F_FP8, 5, 1, gen, device=device, dtype=torch.bfloat16, precision="fp8")
    moe.expert_bias[3] = 1e6  # every token to expert 3
    x_TD = torch.randn(24, D_FP8, generator=gen).to(device, torch.bfloat16)
    results = []
    for _ in range(2):
        moe.zero_grad()
        x = x_TD.clone().requires_grad_()
        out = moe(x)
        out.float().square().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert moe.expert_load().tolist() == [0, 0, 0, 24, 0]
    for e in (0, 1, 2, 4):
        assert torch.equal(moe.gate_up_ENK.grad[e], torch.zeros_like(moe.gate_up_ENK.grad[e]))
        assert torch.equal(moe.down_EDF.grad[e], torch.zeros_like(moe.down_EDF.grad[e]))
    assert moe.down_EDF.grad[3].abs().sum() > 0


def test_fp8_weights_are_quantised_once_per_update(gen):
    """The quantised weights (and dgrad's transposed copy) are reused until a parameter changes; an
    optimizer step is seen through the version counter and the next forward equals a fresh layer's."""
    moe = layer(D_FP8, F_FP8, 4, 1, gen, precision="fp8")
    x_TD = torch.randn(16, D_FP8, generator=gen)
    moe(x_TD).sum().backward()
    cached = moe._fp8_weights.get("gate_up", (moe.gate_up_ENK,), "block128")
    moe(x_TD).sum().backward()
    assert moe._fp8_weights.get("gate_up", (moe.gate_up_ENK,), "block128") is cached
    torch.optim.SGD(moe.parameters(), lr=0.5).step()
    fresh = MoE(D_FP8, F_FP8, 4, 1, precision="fp8", dtype=torch.float32)
    fresh.load_state_dict(moe.state_dict())
    assert torch.equal(moe(x_TD), fresh(x_TD))


# --------------------------------------------------------------------------------------------
# LoRA on the experts.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T, E, K", [(1, 4, 1), (33, 6, 2)])
def test_lora_layer_matches_float64_and_freezes_the_base(T, E, K, gen):
    moe = layer(32, 24, E, K, gen, lora_rank=4, lora_alpha=8.0)
    assert not moe.gate_up_ENK.requires_grad and not moe.down_EDF.requires_grad
    x_TD = torch.randn(T, 32, generator=gen)
    pairs = run_against_float64(moe, x_TD, gen)
    names = [name for name, _, _ in pairs]
    assert "gate_up_ENK" not in names and "lora_b_down_EDR" in names and "router.weight" in names
    for name, ours, expected in pairs:
        scale = max(expected.abs().max().item(), 1e-12)
        torch.testing.assert_close(ours.double(), expected, rtol=RTOL, atol=RTOL * scale, msg=name)
    assert moe.gate_up_ENK.grad is None and moe.down_EDF.grad is None


def test_lora_starts_as_the_base_layer(gen):
    base = make_moe(gen, E=4, K=2)
    lora = MoE(32, 24, 4, 2, lora_rank=8, dtype=torch.float32)
    lora.load_state_dict(base.state_dict(), strict=False)  # B = 0 from reset_parameters
    x_TD = torch.randn(9, 32, generator=gen)
    torch.testing.assert_close(lora(x_TD), base(x_TD), rtol=0, atol=0)


def test_lora_on_frozen_fp8_base(device, gen):
    moe = layer(D_FP8, F_FP8, 6, 2, gen, device=device, dtype=torch.bfloat16, precision="fp8", lora_rank=8)
    x_TD = torch.randn(40, D_FP8, generator=gen).to(device, torch.bfloat16)
    pairs = run_against_float64(moe, x_TD, gen)
    adapters = {"lora_a_gate_up_ERD", "lora_b_gate_up_ENR", "lora_a_down_ERF", "lora_b_down_EDR"}
    assert adapters <= {name for name, _, _ in pairs}
    assert_calc_diff(pairs, fp8_layer_max_diff(FP8_E4M3))
    assert moe.gate_up_ENK.grad is None and moe.down_EDF.grad is None


def test_gradcheck_float64_grouped_linear_and_lora(gen):
    """torch.autograd.gradcheck of the grouped linear's hand-written backward (dgrad on transposed weights,
    K-grouped wgrad), alone and as a LoRA branch, in float64 on tiny shapes with an empty expert."""
    sizes = torch.tensor([2, 0, 3], dtype=torch.int32)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: grouped_linear(x, w, sizes), (x, w))
    assert torch.autograd.gradcheck(
        lambda x, w, a, b: grouped_linear(x, w, sizes) + 0.5 * grouped_linear(grouped_linear(x, a, sizes), b, sizes),
        (x, w, a, b),
    )


# --------------------------------------------------------------------------------------------
# Auxiliary load-balance loss and load statistics.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_aux_loss_and_load_stats(score_func, gen):
    E, K, T, coeff = 6, 2, 30, 0.01
    moe = MoE(32, 24, E, K, score_func=score_func, aux_loss_coeff=coeff, dtype=torch.float32)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(E, 32, generator=gen))
    x_TD = torch.randn(T, 32, generator=gen)
    moe(x_TD)
    counts = moe.expert_load()
    w64 = moe.router.weight.detach().double().requires_grad_()
    logits = x_TD.double() @ w64.t()
    p = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True) if score_func == "sigmoid" else None
    p = torch.softmax(logits, -1) if p is None else p
    expected = coeff * (counts.double() * E / (T * K) * p.mean(0)).sum()
    torch.testing.assert_close(moe.aux_loss.double(), expected, rtol=RTOL, atol=0)
    moe.aux_loss.backward()
    expected.backward()
    torch.testing.assert_close(moe.router.weight.grad.double(), w64.grad, rtol=RTOL, atol=RTOL * w64.grad.abs().max())
    stats = moe.load_stats()
    assert torch.equal(stats["tokens_per_expert"], counts) and int(counts.sum()) == T * K
    torch.testing.assert_close(stats["load_fraction"], counts.float() / (T * K))
    torch.testing.assert_close(stats["max_load_ratio"], counts.max().float() * E / (T * K))
    assert torch.equal(stats["aux_loss"], moe.aux_loss.detach())


def test_aux_loss_with_uniform_probabilities_is_the_coefficient():
    moe = MoE(8, 8, 4, 1, aux_loss_coeff=0.5, dtype=torch.float32)
    with torch.no_grad():
        moe.router.weight.zero_()  # every probability 1/E; the tie sends every token to expert 0...
    moe(torch.randn(8, 8))
    # ...so f = (4, 0, 0, 0) and P = 1/4 each: loss = 0.5 * 4 * 1/4 = the coefficient (sum_e f_e = E always).
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.5))
    assert moe.load_stats()["max_load_ratio"].item() == 4.0


# --------------------------------------------------------------------------------------------
# GPU: no host synchronisation in forward or backward, and capture of a whole step in a CUDA graph.
# --------------------------------------------------------------------------------------------
GPU_LAYER_CONFIGS = [
    dict(precision="bf16"),
    dict(precision="fp8"),
    dict(precision="fp8", fp8_recipe=Fp8Recipe("row", fp8_wgrad=False)),
    dict(precision="fp8", lora_rank=16, aux_loss_coeff=1e-2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_LAYER_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cuda_no_host_sync_and_graph_capture_of_forward_backward(config, gen):
    moe = layer(256, 128, 8, 2, gen, device="cuda", dtype=torch.bfloat16, **config)
    x_TD = torch.randn(300, 256, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    params = [p for p in moe.parameters() if p.requires_grad]

    def step():
        loss = moe(x_TD).float().square().mean()
        if moe.aux_loss is not None:
            loss = loss + moe.aux_loss
        return torch.autograd.grad(loss, [x_TD, *params])

    eager = step()  # warm-up: module load, allocator, the FP8 weight cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(eager, again, strict=True):
        assert torch.equal(a, b)

    graph, captured = capture_cuda_graph(step)
    x_TD.detach().copy_(torch.randn(300, 256, generator=gen).to("cuda", torch.bfloat16))  # new input, same address
    graph.replay()
    torch.cuda.synchronize()
    # The replay recomputes on the new input: compare with eager on it (another stream may pick another
    # cuBLAS algorithm for the router and the shared expert, so the BF16-layer rule, not bit equality).
    for name, a, b in zip(["x", *range(len(params))], step(), captured, strict=True):
        assert calc_diff(a, b) < BF16_LAYER_MAX_DIFF, name
