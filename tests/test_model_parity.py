"""Parity with transformers: a tiny random Llama4ForCausalLM (built offline, saved with its
save_pretrained, loaded with engine.from_pretrained) gives the same float32 logits for sequences
shorter and longer than an attention chunk, the same logits when decoding token by token across
chunk boundaries, and the same gradients of the loss for every parameter.
Legend: B batch, S positions, V vocabulary, E experts, D width, F expert hidden width.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import MODEL_BF16_ERROR_FACTOR, MODEL_PARITY_RTOL, assert_relative_close, eps

import engine

transformers = pytest.importorskip("transformers")

CHUNK = 8  # attention_chunk_size: sequences of 5 stay in one chunk, 21 cross two boundaries
FLOOR_SCALE = 4  # temperature tuning changes the NoPE layer's queries from position 3 on
VOCAB = 128


def hf_config(scout_like: bool, head_dim: int = 16):
    rope = (
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        if scout_like
        else {"rope_type": "default", "rope_theta": 10000.0}
    )
    return transformers.Llama4TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        head_dim=head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1 if scout_like else 2,
        use_qk_norm=scout_like,
        attention_chunk_size=CHUNK,
        floor_scale=FLOOR_SCALE,
        attn_temperature_tuning=True,
        max_position_embeddings=256,
        pad_token_id=0,
        rope_parameters=rope,
        attn_implementation="eager",
    )


@pytest.fixture(params=["scout-like", "maverick-like"])
def models(request, tmp_path, gen):
    """(transformers model, ours), the same random float32 weights."""
    hf = transformers.Llama4ForCausalLM(hf_config(request.param == "scout-like")).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    hf.save_pretrained(tmp_path)
    ours = engine.from_pretrained(tmp_path, dtype=torch.float32)
    return hf, ours


def assert_logits_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert_relative_close(ours, expected, MODEL_PARITY_RTOL, "logits")


@pytest.mark.parametrize("seq_len", [5, 21])
def test_logits_match_transformers(models, seq_len, gen):
    hf, ours = models
    ids = torch.randint(1, VOCAB, (2, seq_len), generator=gen)
    with torch.no_grad():
        expected = hf(ids).logits
        logits = ours(ids)
    assert_logits_close(logits, expected)


def test_incremental_decoding_across_chunk_boundaries_matches_transformers(models, gen):
    hf, ours = models
    S = 2 * CHUNK + 2  # decoding crosses the boundaries at 8 and 16
    ids = torch.randint(1, VOCAB, (2, S), generator=gen)
    with torch.no_grad():
        expected = hf(ids).logits
        cache = ours.new_cache(2, S)
        steps = [ours(ids[:, :6], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(6, S)]
    assert_logits_close(torch.cat(steps, dim=1), expected)


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' (experts fused in [E, D, 2F] / [E, F, D])."""
    name = name.replace(".gate_up_ENK", ".experts.gate_up_proj").replace(".down_EDF", ".experts.down_proj")
    return name if name.startswith("lm_head.") else "model." + name


def test_gradients_match_transformers(models, gen):
    hf, ours = models
    ids = torch.randint(1, VOCAB, (2, 2 * CHUNK + 3), generator=gen)
    labels = torch.randint(0, VOCAB, ids.shape, generator=gen)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    loss(hf(ids).logits).backward()
    loss(ours(ids)).backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        expected = hf_params[hf_name(name)].grad
        if name.endswith((".gate_up_ENK", ".down_EDF")):
            expected = expected.transpose(1, 2)
        assert p.grad is not None, name
        assert_relative_close(p.grad, expected, MODEL_PARITY_RTOL, name)


@pytest.mark.gpu
@pytest.mark.parametrize("scout_like", [True, False])
def test_bf16_cuda_model_within_twice_transformers_bf16_error(scout_like, tmp_path, gen):
    """Our kernels in bfloat16 on the GPU (prefill and decode) against the float32 reference, beside
    transformers' own bfloat16 model on the same GPU (head_dim 64: the CUDA attention kernels' smallest)."""
    hf = transformers.Llama4ForCausalLM(hf_config(scout_like, head_dim=64)).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    hf.save_pretrained(tmp_path)
    S = 3 * CHUNK + 5
    ids = torch.randint(1, VOCAB, (2, S), generator=gen)
    with torch.no_grad():
        ref = hf(ids).logits.double()
        hf_error = (hf.to("cuda", torch.bfloat16)(ids.cuda()).logits.double().cpu() - ref).abs().max().item()
        ours = engine.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
        logits = ours(ids.cuda())
        cache = ours.new_cache(2, S)
        steps = [ours(ids[:, :7].cuda(), cache=cache)] + [
            ours(ids[:, t : t + 1].cuda(), cache=cache) for t in range(7, S)
        ]
    allowed = MODEL_BF16_ERROR_FACTOR * hf_error + eps(torch.bfloat16) * ref.abs().max().item()
    for what, out in (("prefill", logits), ("decode", torch.cat(steps, dim=1))):
        error = (out.double().cpu() - ref).abs().max().item()
        assert error <= allowed, (
            f"{what}: error {error:.3e} > allowed {allowed:.3e} (transformers bf16: {hf_error:.3e})"
        )
