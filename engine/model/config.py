"""Llama 4 text-model configuration: the Hugging Face `Llama4TextConfig` fields the model uses, the
published Scout / Maverick values, tiny debug twins of the same structure, and the attention
pattern of each layer. Values: ../shared/llama4-architecture.md (transformers 5.x, Meta's code).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.ops.attention import AttentionPattern

ATTENTION_PATTERNS = ("llama4", "hybrid")
NOPE_LAYER_INTERVAL = 4  # Llama 4: every 4th layer (3, 7, 11, ...) has no RoPE and full causal attention

# The published Llama 4 rope scaling of Scout (llama3 type); Maverick has none.
SCOUT_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}

# Fields of Hugging Face's Llama4TextConfig that exist only there (or only here) and never change the maths.
_HF_ONLY_DEFAULTS = {
    "model_type": "llama4_text",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "no_rope_layer_interval": NOPE_LAYER_INTERVAL,
}
_OURS_ONLY = ("attention_pattern", "window", "global_stride")


@dataclass
class Llama4Config:
    """Llama 4 text model. Defaults are Scout's published values (`Llama4Config.preset("scout")`).

    no_rope_layers uses Hugging Face's convention: entry i is 1 when layer i applies RoPE, 0 on a
    NoPE layer (default: NoPE every 4th layer). moe_layers defaults to
    range(interleave_moe_layer_step - 1, num_hidden_layers, interleave_moe_layer_step).
    attention_pattern "llama4": chunked attention (attention_chunk_size) on RoPE layers, full causal
    on NoPE layers; "hybrid": every layer attends to a sliding `window` plus every `global_stride`-th
    key (sub-quadratic at any length; RoPE / NoPE and temperature tuning unchanged).
    """

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # experts and shared expert F
    intermediate_size_mlp: int = 16384  # dense MLP F (Maverick's even layers)
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1
    moe_layers: list[int] | None = None
    no_rope_layers: list[int] | None = None
    use_qk_norm: bool = True
    attention_chunk_size: int | None = 8192
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(SCOUT_ROPE_SCALING))
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 200000
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [200001, 200007, 200008])
    pad_token_id: int | None = 200018
    # Ours (not in Hugging Face's config): the attention pattern of the layers.
    attention_pattern: str = "llama4"
    window: int = 4096
    global_stride: int = 256

    def __post_init__(self) -> None:
        L = self.num_hidden_layers
        if self.attention_pattern not in ATTENTION_PATTERNS:
            raise ValueError(
                f"Llama4Config: attention_pattern must be one of {ATTENTION_PATTERNS}, got {self.attention_pattern!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Llama4Config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.tie_word_embeddings:
            raise ValueError("Llama4Config: tie_word_embeddings=True is not supported (Llama 4's lm_head is untied)")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"Llama4Config: num_experts_per_tok must be in [1, num_local_experts={self.num_local_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Llama4Config: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if not self.no_rope_layers:  # None or [] (some published config.json files): the default
            self.no_rope_layers = [int((i + 1) % NOPE_LAYER_INTERVAL != 0) for i in range(L)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, L, step)) if step > 0 else []
        if len(self.no_rope_layers) != L:
            raise ValueError(f"Llama4Config: no_rope_layers has {len(self.no_rope_layers)} entries for {L} layers")
        if any(not 0 <= i < L for i in self.moe_layers):
            raise ValueError(f"Llama4Config: moe_layers {self.moe_layers} must lie in [0, {L})")
        if self.attention_pattern == "hybrid" and (self.window < 1 or self.global_stride < 1):
            raise ValueError(
                f"Llama4Config: hybrid attention needs window >= 1 and global_stride >= 1, "
                f"got window={self.window}, global_stride={self.global_stride}"
            )

    # ---- per-layer structure ----
    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    def uses_rope(self, i: int) -> bool:
        """False on NoPE layers (no rotary embedding, temperature tuning, full causal attention)."""
        return bool(self.no_rope_layers[i])

    def attention_pattern_for(self, i: int) -> AttentionPattern:
        if self.attention_pattern == "hybrid":
            return AttentionPattern(window=self.window, global_stride=self.global_stride, name="hybrid")
        if self.uses_rope(i) and self.attention_chunk_size:
            return AttentionPattern(chunk=self.attention_chunk_size, name="chunked")
        return AttentionPattern(name="full")

    # ---- presets ----
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Llama4Config:
        """A named configuration with overrides; `layers=N` keeps the first N layers at full width."""
        if name not in PRESETS:
            raise ValueError(f"Llama4Config.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
        values = copy.deepcopy(PRESETS[name])
        layers = overrides.pop("layers", None)
        values.update(overrides)
        config = cls(**values)
        return config.truncated(layers) if layers is not None else config

    def truncated(self, layers: int) -> Llama4Config:
        """The first `layers` layers of this model (same widths, per-layer structure kept)."""
        if not 1 <= layers <= self.num_hidden_layers:
            raise ValueError(f"Llama4Config: layers must be in [1, {self.num_hidden_layers}], got {layers}")
        return dataclasses.replace(
            self,
            num_hidden_layers=layers,
            no_rope_layers=list(self.no_rope_layers[:layers]),
            moe_layers=[i for i in self.moe_layers if i < layers],
        )

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, hf: dict) -> Llama4Config:
        """From a Llama4TextConfig dict (or a Llama4Config dict: its `text_config` is used)."""
        hf = dict(hf.get("text_config") or hf)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in names and k not in ("rope_scaling",)}
        # transformers 5.x keeps rope_theta inside rope_parameters; 4.x config.json has rope_scaling + rope_theta.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "rope_theta" in rope:
            values["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in (None, "default"):
            values["rope_scaling"] = None
        elif rope_type == "llama3":
            rope.pop("type", None)
            rope["rope_type"] = "llama3"
            rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
            values["rope_scaling"] = rope
        else:
            raise ValueError(f"Llama4Config.from_hf: rope type {rope_type!r} is not supported (default or llama3)")
        if hf.get("head_dim") is None:
            values["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        for key in ("attention_chunk_size", "floor_scale"):
            if key in hf:
                values[key] = hf[key]
        values["attn_temperature_tuning"] = bool(hf.get("attn_temperature_tuning", True))
        values.update(hf.get("engine_attention") or {})
        return cls(**values)

    def to_hf(self) -> dict:
        """A Llama4TextConfig dict (config.json of a Llama4ForCausalLM) that transformers 5.x reads back."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in _OURS_ONLY and k != "rope_scaling"}
        out["architectures"] = ["Llama4ForCausalLM"]
        out["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        del out["rope_theta"]
        out["layer_types"] = [
            "chunked_attention" if self.uses_rope(i) and self.attention_chunk_size else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        for key, value in _HF_ONLY_DEFAULTS.items():
            out.setdefault(key, value)
        out["engine_attention"] = {k: getattr(self, k) for k in _OURS_ONLY}  # ours; transformers ignores it
        return out


_SCOUT = dict(
    vocab_size=202048,
    hidden_size=5120,
    intermediate_size=8192,
    intermediate_size_mlp=16384,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    attention_chunk_size=8192,
    rope_theta=500000.0,
    rope_scaling=SCOUT_ROPE_SCALING,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    rms_norm_eps=1e-5,
    max_position_embeddings=262144,  # the base models; Scout-Instruct ships 10485760, Maverick-Instruct 1048576
    bos_token_id=200000,
    eos_token_id=[200001, 200007, 200008],
    pad_token_id=200018,
)
_MAVERICK = dict(_SCOUT, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None)
# Debug twins: bench/shapes.py's DEBUG widths but head_dim 64 (the smallest the CUDA attention kernels
# take), 4 layers (layer 3 NoPE), chunks and temperature tuning that a 40-token sequence crosses,
# llama3 scaling whose blended band holds some of the head's frequencies.
_DEBUG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    attention_chunk_size=16,
    floor_scale=8,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=[2],
    pad_token_id=0,
    window=8,
    global_stride=4,
)
_SCOUT_DEBUG = dict(
    _SCOUT,
    **_DEBUG,
    num_local_experts=4,
    rope_scaling=dict(SCOUT_ROPE_SCALING, factor=4.0, high_freq_factor=4.0, original_max_position_embeddings=64),
)
_MAVERICK_DEBUG = dict(_MAVERICK, **_DEBUG, num_local_experts=8)

PRESETS: dict[str, dict] = {
    "scout": _SCOUT,
    "maverick": _MAVERICK,
    "scout-debug": _SCOUT_DEBUG,
    "maverick-debug": _MAVERICK_DEBUG,
}
