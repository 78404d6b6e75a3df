"""The MoE block (engine.moe.MoE): Llama 4's maths against a float64 pure-torch reference and
against transformers' Llama4TextMoe, gradients of every weight, determinism, edge routings, and the
auxiliary-loss-free bias update. Legend: T tokens, D width, E experts, F hidden, K top-k.
"""

from __future__ import annotations

import pytest
import torch

from engine.moe import MoE, update_expert_bias

RTOL = 1e-5  # float32 kernels against float64 (the bound for the transformers comparison)


def reference_moe(x_TD, moe: MoE) -> torch.Tensor:
    """Dense float64 Llama 4 MoE: every expert sees the input scaled by its score (0 if unselected)."""
    x = x_TD.double()
    logits = x @ moe.router.weight.double().t()
    keys = logits + moe.expert_bias.double()
    ids = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, : moe.top_k]
    scores = torch.zeros_like(logits).scatter(1, ids, torch.sigmoid(torch.gather(logits, 1, ids)))
    F = moe.d_ff
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        h = (x * scores[:, e : e + 1]) @ moe.gate_up_ENK[e].double().t()
        a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        out = out + a @ moe.down_EDF[e].double().t()
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


def test_fp8_precision_not_available_yet():
    with pytest.raises(NotImplementedError, match="fp8"):
        MoE(8, 8, 2, precision="fp8")
