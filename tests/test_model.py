"""The Llama 4 model (engine.model): preset values, per-layer structure (NoPE, MoE interleave,
QK-norm, attention pattern), truncation, config.json round trip, shapes, cached decoding,
activation checkpointing, parameter and FLOP counts. Parity with transformers: test_model_parity.py.
Legend: B batch, S positions, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import MODEL_SELF_RTOL, assert_relative_close

from engine import ops
from engine.model import Llama4Config, Llama4ForCausalLM
from engine.model.layers import rope_cos_sin, rope_inv_freq
from engine.model.model import mean_visible_keys
from engine.moe import MoE, SwiGLU
from engine.ops import reference
from engine.ops.attention import AttentionPattern


def test_scout_preset_has_published_values():
    c = Llama4Config.preset("scout")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        5120,
        48,
        40,
        8,
        128,
    )
    assert (c.vocab_size, c.intermediate_size, c.intermediate_size_mlp) == (202048, 8192, 16384)
    assert (c.num_local_experts, c.num_experts_per_tok, c.interleave_moe_layer_step) == (16, 1, 1)
    assert c.use_qk_norm and c.attn_temperature_tuning
    assert (c.attention_chunk_size, c.floor_scale, c.attn_scale, c.rms_norm_eps, c.rope_theta) == (
        8192,
        8192,
        0.1,
        1e-5,
        500000.0,
    )
    assert c.rope_scaling == {
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    }
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (200000, [200001, 200007, 200008], 200018)
    assert not c.tie_word_embeddings
    assert c.moe_layers == list(range(48))
    assert [i for i in range(48) if not c.uses_rope(i)] == list(range(3, 48, 4))


def test_maverick_preset_has_published_values():
    c = Llama4Config.preset("maverick")
    assert (c.hidden_size, c.num_hidden_layers, c.num_local_experts, c.interleave_moe_layer_step) == (5120, 48, 128, 2)
    assert not c.use_qk_norm and c.rope_scaling is None
    assert c.moe_layers == list(range(1, 48, 2))
    assert [i for i in range(48) if not c.uses_rope(i)] == list(range(3, 48, 4))


@pytest.mark.parametrize(
    "name, total, active",
    [("scout", 107.77e9, 17.17e9), ("maverick", 400.71e9, 17.18e9)],
)
def test_parameter_counts_match_published_totals(name, total, active):
    model = Llama4ForCausalLM(Llama4Config.preset(name), device="meta")
    assert abs(model.num_params() - total) < 0.005e9
    assert abs(model.num_params(active_only=True) - active) < 0.005e9


@pytest.mark.parametrize("name", ["scout-debug", "maverick-debug"])
def test_debug_presets_keep_the_structure(name):
    full = Llama4Config.preset(name.removesuffix("-debug"))
    c = Llama4Config.preset(name)
    assert c.hidden_size <= 64 and c.num_hidden_layers == 4
    assert c.use_qk_norm == full.use_qk_norm
    assert c.interleave_moe_layer_step == full.interleave_moe_layer_step
    assert [c.uses_rope(i) for i in range(4)] == [True, True, True, False]
    assert c.moe_layers == ([0, 1, 2, 3] if name == "scout-debug" else [1, 3])
    model = Llama4ForCausalLM(c, dtype=torch.float32)
    kinds = [type(layer.feed_forward) for layer in model.layers]
    assert kinds == [MoE if c.is_moe_layer(i) else SwiGLU for i in range(4)]
    assert len(model.moe_layers()) == len(c.moe_layers)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        assert attn.use_rope == (i != 3)
        assert attn.use_qk_norm == (c.use_qk_norm and i != 3)
        assert attn.temperature_tuning == (i == 3)


def test_attention_pattern_per_layer():
    c = Llama4Config.preset("scout")
    assert c.attention_pattern_for(0) == AttentionPattern(chunk=8192, name="chunked")
    assert c.attention_pattern_for(3) == AttentionPattern(name="full")
    assert c.attention_pattern_for(3).is_full
    hybrid = Llama4Config.preset("scout", attention_pattern="hybrid", window=4096, global_stride=64)
    for i in (0, 3):
        assert hybrid.attention_pattern_for(i) == AttentionPattern(window=4096, global_stride=64, name="hybrid")
    assert not hybrid.uses_rope(3)  # the pattern changes the mask, not RoPE / NoPE
    no_chunk = Llama4Config.preset("scout-debug", attention_chunk_size=None)
    assert no_chunk.attention_pattern_for(0).is_full


def test_truncation_keeps_widths_and_layer_structure():
    c = Llama4Config.preset("maverick", layers=5)
    assert c.num_hidden_layers == 5 and c.hidden_size == 5120 and c.num_local_experts == 128
    assert c.moe_layers == [1, 3] and c.no_rope_layers == [1, 1, 1, 0, 1]
    model = Llama4ForCausalLM(c, device="meta")
    assert len(model.layers) == 5
    assert model.layers[1].feed_forward.gate_up_ENK.shape == (128, 2 * 8192, 5120)
    assert model.layers[0].feed_forward.gate_proj.weight.shape == (16384, 5120)
    with pytest.raises(ValueError, match="layers must be in"):
        Llama4Config.preset("scout", layers=49)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        Llama4Config.preset("llama5")
    with pytest.raises(ValueError, match="attention_pattern"):
        Llama4Config.preset("scout-debug", attention_pattern="dense")
    with pytest.raises(ValueError, match="multiple of"):
        Llama4Config.preset("scout-debug", num_key_value_heads=3)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        Llama4Config.preset("scout-debug", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="precision"):
        Llama4ForCausalLM(Llama4Config.preset("scout-debug"), precision="int4")


@pytest.mark.parametrize("name", ["scout", "maverick", "scout-debug"])
def test_hf_config_round_trip(name):
    c = Llama4Config.preset(name)
    assert Llama4Config.from_hf(c.to_hf()) == c
    hybrid = Llama4Config.preset(name, attention_pattern="hybrid", window=32, global_stride=8)
    assert Llama4Config.from_hf(hybrid.to_hf()) == hybrid


def test_from_hf_reads_the_published_conditional_generation_layout():
    """Meta's config.json (transformers 4.51): text_config with rope_scaling and a top-level rope_theta."""
    text = {
        "hidden_size": 5120,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "vocab_size": 202048,
        "num_local_experts": 16,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "attention_chunk_size": 8192,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 16.0,
            "high_freq_factor": 1.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "attn_temperature_tuning": 4,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 10485760,
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "pad_token_id": 200018,
        "model_type": "llama4_text",
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)],
    }
    c = Llama4Config.from_hf({"architectures": ["Llama4ForConditionalGeneration"], "text_config": text})
    assert c == Llama4Config.preset("scout", max_position_embeddings=10485760)


def test_llama3_rope_scaling_matches_the_formula():
    """Scout's llama3 scaling (low == high == 1): wavelengths above 8192 are divided by 16, others kept;
    the debug preset exercises the blended band between low and high."""
    c = Llama4Config.preset("scout")
    base = 1.0 / (c.rope_theta ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    wavelen = 2 * math.pi / base
    expected = torch.where(wavelen > 8192, base / 16, base)
    torch.testing.assert_close(rope_inv_freq(c).double(), expected, rtol=1e-6, atol=0)
    d = Llama4Config.preset("scout-debug")
    s = d.rope_scaling
    base = 1.0 / (d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float64) / d.head_dim))
    wavelen = 2 * math.pi / base
    low_wl, high_wl = (
        s["original_max_position_embeddings"] / s["low_freq_factor"],
        s["original_max_position_embeddings"] / s["high_freq_factor"],
    )
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    blended = (1 - smooth) * base / s["factor"] + smooth * base
    expected = torch.where(wavelen < high_wl, base, torch.where(wavelen > low_wl, base / s["factor"], blended))
    assert ((wavelen >= high_wl) & (wavelen <= low_wl)).any(), "the debug preset must exercise the blend"
    torch.testing.assert_close(rope_inv_freq(d).double(), expected, rtol=1e-6, atol=0)


def test_rope_rotates_interleaved_pairs_as_a_complex_multiply(gen):
    x = torch.randn(2, 5, 3, 8, generator=gen)
    positions = torch.arange(7, 12)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, 8, 2).float() / 8))
    out, _ = ops.rope_qk_norm(x, x[:, :, :1], *rope_cos_sin(positions, inv_freq), qk_norm=False, eps=1e-5)
    z = torch.view_as_complex(x.double().reshape(2, 5, 3, 4, 2))
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]).flatten(3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def _model(name: str, gen: torch.Generator, **overrides) -> Llama4ForCausalLM:
    model = Llama4ForCausalLM(Llama4Config.preset(name, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.mark.parametrize("name", ["scout-debug", "maverick-debug"])
def test_forward_shapes_and_hidden_states(name, gen):
    model = _model(name, gen)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=gen)
    logits = model(ids)
    assert logits.shape == (2, 19, model.config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    h = model.hidden_states(ids)
    assert h.shape == (2, 19, model.config.hidden_size)
    assert torch.equal(model.lm_head(h), logits)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        model(ids[0])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("scout-debug", {}),
        ("maverick-debug", {}),
        ("scout-debug", {"attention_pattern": "hybrid"}),
    ],
)
def test_cached_decoding_equals_the_full_forward(name, overrides, gen):
    """Prefill 20 tokens, decode one at a time (and 3 at once) across the chunk boundary at 32."""
    model = _model(name, gen, **overrides)
    S = 36
    ids = torch.randint(0, model.config.vocab_size, (2, S), generator=gen)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 40)
        steps = [model(ids[:, :20], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(20, 29)]
        steps.append(model(ids[:, 29:32], cache=cache))
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(32, S)]
    assert cache.position == S
    decoded = torch.cat(steps, dim=1)
    assert_relative_close(decoded, full, MODEL_SELF_RTOL, "decoded logits")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids[:, :5], cache=cache)


def test_cache_follows_each_layers_pattern():
    model = _model("scout-debug", torch.Generator().manual_seed(0))
    c = model.config
    cache = model.new_cache(3, 100)
    assert len(cache) == c.num_hidden_layers
    for i in range(c.num_hidden_layers):
        assert cache[i].pattern == c.attention_pattern_for(i)
        assert cache[i].slots == (100 if i == 3 else c.attention_chunk_size)
        assert cache[i].k.shape == (3, cache[i].slots, c.num_key_value_heads, c.head_dim)
    fp8 = model.new_cache(1, 100, fp8=True)
    assert fp8[0].k.dtype == torch.float8_e4m3fn and fp8.nbytes() < cache.nbytes()


def test_gradient_checkpointing_gives_the_same_gradients(gen):
    model = _model("maverick-debug", gen).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)

    def grads():
        model.zero_grad()
        model(ids).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        assert_relative_close(b, a, MODEL_SELF_RTOL, "gradient")


@pytest.mark.parametrize(
    "pattern",
    [
        AttentionPattern(),
        AttentionPattern(chunk=16),
        AttentionPattern(window=8, global_stride=4),
        AttentionPattern(window=5, global_stride=3, sinks=4),
        AttentionPattern(chunk=7, sinks=2),
    ],
)
def test_mean_visible_keys_counts_the_mask(pattern):
    S = 53
    visible = reference.attention_visible(S, S, **pattern.kwargs)
    assert mean_visible_keys(pattern, S) == pytest.approx(visible.sum().item() / S, rel=1e-12)


def test_flops_per_token():
    c = Llama4Config.preset("scout")
    model = Llama4ForCausalLM(c, device="meta")
    S = 16384
    weights = model.num_params(active_only=True) - c.vocab_size * c.hidden_size
    keys_chunked = (8192 + 1) / 2  # every chunk of 8192 is a causal block
    keys_full = (S + 1) / 2
    n_nope = 12
    attention = 4 * c.num_attention_heads * c.head_dim * ((48 - n_nope) * keys_chunked + n_nope * keys_full)
    assert model.flops_per_token(S, training=False) == pytest.approx(2 * weights + attention, rel=1e-12)
    assert model.flops_per_token(S) == pytest.approx(3 * (2 * weights + attention), rel=1e-12)


def test_each_layer_runs_in_its_nvtx_range(nvtx_ranges, gen):
    model = _model("maverick-debug", gen)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 5), generator=gen))
    seen = [name for name, _ in nvtx_ranges]
    layers = [name for name in seen if name.startswith("llama4.layer")]
    assert layers == [f"llama4.layer{i}" for i in range(model.config.num_hidden_layers)]
    assert seen.index("llama4.layer1") < seen.index("llama4.moe") < seen.index("llama4.layer2")
    assert seen[-1] == "llama4.lm_head"
