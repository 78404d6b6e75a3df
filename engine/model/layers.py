"""The layers of the Llama 4 text model, computed as Llama 4 computes them (transformers 5.x
modeling_llama4.py): RMSNorm, RoPE on interleaved pairs with llama3 scaling, QK-norm after RoPE,
temperature tuning on NoPE layers, GQA attention through engine.ops, MoE or dense SwiGLU.
Legend: B batch, S new positions, D model width, H query heads, G kv heads, Dh head dim,
R = Dh / 2 rotary pairs, E experts, F expert hidden width, N = T*K routed rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine import ops
from engine.kv_cache import LayerKVCache
from engine.model.config import Llama4Config
from engine.moe import MoE, SwiGLU
from engine.ops import RouteResult
from engine.ops.fp8_training import FP8_E4M3


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then times the weight."""

    def __init__(self, dim: int, eps: float, *, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # one fused Triton kernel on CUDA, torch maths on CPU


def rope_inv_freq(config: Llama4Config, device=None) -> torch.Tensor:
    """float32 [R]: theta^(-2j/Dh), with llama3 scaling when configured (long wavelengths divided by
    `factor`, a smooth blend between low_freq_factor and high_freq_factor)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling:
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        if high != low:  # Scout has low == high: no blended band (the blend would divide by zero)
            smooth = (old_context / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
            scaled = torch.where(medium, blended, scaled)
        inv_freq = scaled
    return inv_freq.to(device) if device is not None else inv_freq


def rope_cos_sin(positions_S: torch.Tensor, inv_freq_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin float32 [S, R] of angle position * inv_freq."""
    angles_SR = positions_S.float()[:, None] * inv_freq_R.float()[None, :]
    return torch.cos(angles_SR), torch.sin(angles_SR)


class Attention(nn.Module):
    """GQA self-attention of layer `layer_idx`: RoPE + QK-norm on RoPE layers, temperature tuning on
    NoPE layers, the layer's AttentionPattern through engine.ops.sparse_attention (prefill) or the
    layer's LayerKVCache (decode)."""

    def __init__(self, config: Llama4Config, layer_idx: int, *, dtype=None, device=None) -> None:
        super().__init__()
        D, H, G, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, Dh
        self.use_rope = config.uses_rope(layer_idx)
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale, self.eps = config.floor_scale, config.attn_scale, config.rms_norm_eps
        self.pattern = config.attention_pattern_for(layer_idx)
        self.q_proj = nn.Linear(D, H * Dh, bias=False, dtype=dtype, device=device)
        self.k_proj = nn.Linear(D, G * Dh, bias=False, dtype=dtype, device=device)
        self.v_proj = nn.Linear(D, G * Dh, bias=False, dtype=dtype, device=device)
        self.o_proj = nn.Linear(H * Dh, D, bias=False, dtype=dtype, device=device)

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions_S: torch.Tensor,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHD = self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k_BSGD = self.k_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSGD = self.v_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            # RoPE then QK-norm of q and k in one pass (one fused Triton launch on CUDA).
            q_BSHD, k_BSGD = ops.rope_qk_norm(q_BSHD, k_BSGD, *rope, qk_norm=self.use_qk_norm, eps=self.eps)
        if self.temperature_tuning:
            # Longer contexts flatten the softmax of a NoPE layer; a query at position p is sharpened by
            # 1 + attn_scale * log(1 + floor((p + 1) / floor_scale)) (keys unscaled).
            scale_S = torch.log1p(torch.floor((positions_S.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q_BSHD = (q_BSHD * scale_S[None, :, None, None]).to(q_BSHD.dtype)
        softmax_scale = self.head_dim**-0.5
        if cache is None or cache.length == 0:
            out_BSHD = ops.sparse_attention(q_BSHD, k_BSGD, v_BSGD, softmax_scale=softmax_scale, **self.pattern.kwargs)
            if cache is not None:
                cache.write(k_BSGD, v_BSGD)
        else:
            # Decode: each new token attends over the cache holding it (several tokens: one at a time).
            outs = []
            for t in range(S):
                cache.write(k_BSGD[:, t : t + 1], v_BSGD[:, t : t + 1])
                outs.append(cache.attend(q_BSHD[:, t], softmax_scale=softmax_scale))
            out_BSHD = torch.stack(outs, dim=1)
        return self.o_proj(out_BSHD.reshape(B, S, self.n_heads * self.head_dim))


class _FP8GroupedLinear(torch.autograd.Function):
    """y_MN = x_MK @ W_e^T per expert group with W stored in FP8 (codes w_fp8_ENK, scale_EN per expert
    and output channel): x is quantised per row to e4m3 and the FP8 grouped GEMM accumulates in
    float32 (the inference recipe). Backward gives x its gradient through the dequantised weight
    (BF16, float32 on CPU); the frozen FP8 weight gets none."""

    @staticmethod
    def forward(ctx, x_MK, w_fp8_ENK, scale_EN, group_sizes_E):
        out_dtype = torch.float32 if x_MK.dtype == torch.float32 else torch.bfloat16
        x_fp8, x_scale_M = ops.quantize_fp8(x_MK.contiguous(), granularity="row")
        y_MN = ops.grouped_gemm(
            x_fp8, w_fp8_ENK, group_sizes_E, x_scale=x_scale_M, w_scale=scale_EN, out_dtype=out_dtype
        )
        ctx.save_for_backward(w_fp8_ENK, scale_EN, group_sizes_E)
        ctx.x_dtype = x_MK.dtype
        return y_MN.to(x_MK.dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        w_fp8_ENK, scale_EN, group_sizes_E = ctx.saved_tensors
        w_EKN = dequantize_experts_fp8(w_fp8_ENK, scale_EN, dy_MN.dtype).transpose(1, 2).contiguous()
        dx = ops.grouped_gemm(dy_MN.contiguous(), w_EKN, group_sizes_E, out_dtype=dy_MN.dtype)
        return dx.to(ctx.x_dtype), None, None, None


class FP8ExpertsMoE(MoE):
    """engine.moe.MoE with its routed experts STORED in FP8 e4m3 with a float32 scale per expert and
    output channel (w[e, n, :] = w_fp8[e, n, :] * scale_EN[e, n], grouped_gemm's FP8 weight layout):
    half the memory of BF16 experts (Scout's experts fit one H200). Each expert GEMM quantises its
    input per row and runs the FP8 grouped GEMM. The FP8 weights are frozen buffers (loaded by
    engine.from_pretrained(..., precision="fp8")); activations, router and shared expert still get
    gradients. engine.moe.MoE(precision="fp8") is the training recipe instead (BF16 master weights).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int = 1, *, dtype=None, device=None) -> None:
        super().__init__(d_model, d_ff, n_experts, top_k, dtype=dtype, device=device)
        del self.gate_up_ENK, self.down_EDF
        self.precision = "fp8"
        E, F, D = n_experts, d_ff, d_model
        self.register_buffer("gate_up_ENK", torch.zeros(E, 2 * F, D, dtype=FP8_E4M3, device=device))
        self.register_buffer("gate_up_scale_EN", torch.ones(E, 2 * F, dtype=torch.float32, device=device))
        self.register_buffer("down_EDF", torch.zeros(E, D, F, dtype=FP8_E4M3, device=device))
        self.register_buffer("down_scale_EN", torch.ones(E, D, dtype=torch.float32, device=device))

    def reset_parameters(self) -> None:
        pass  # the FP8 experts are loaded (engine.from_pretrained(..., precision="fp8")), never initialised

    def experts(self, x_sorted_ND: torch.Tensor, route: RouteResult) -> torch.Tensor:
        sizes_E = route.tokens_per_expert_E
        h_N2F = _FP8GroupedLinear.apply(x_sorted_ND, self.gate_up_ENK, self.gate_up_scale_EN, sizes_E)
        return _FP8GroupedLinear.apply(ops.swiglu(h_N2F), self.down_EDF, self.down_scale_EN, sizes_E)


def dequantize_experts_fp8(w_fp8_ENK: torch.Tensor, scale_EN: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 [E, N, K] with scale [E, N] -> dtype [E, N, K] (w_fp8 * scale in float32)."""
    E, N, K = w_fp8_ENK.shape
    w_MK = ops.dequantize_fp8(w_fp8_ENK.reshape(E * N, K), scale_EN.reshape(E * N), granularity="row", out_dtype=dtype)
    return w_MK.view(E, N, K)


def quantize_experts_fp8(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (FP8 e4m3 [E, N, K], float32 scale [E, N]): one scale per expert and output channel."""
    E, N, K = w_ENK.shape
    w_fp8, scale = ops.quantize_fp8(w_ENK.reshape(E * N, K).contiguous(), granularity="row")
    return w_fp8.view(E, N, K), scale.view(E, N)


class DecoderLayer(nn.Module):
    """h = h + Attention(RMSNorm(h)); h = h + FFN(RMSNorm(h)), FFN = MoE or dense SwiGLU."""

    def __init__(
        self, config: Llama4Config, layer_idx: int, *, dtype=None, device=None, precision: str = "bf16"
    ) -> None:
        super().__init__()
        D = config.hidden_size
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(D, config.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(config, layer_idx, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(D, config.rms_norm_eps, dtype=dtype, device=device)
        if self.is_moe:
            moe_args = (D, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok)
            if precision == "fp8":
                self.feed_forward = FP8ExpertsMoE(*moe_args, dtype=dtype, device=device)
            else:
                self.feed_forward = MoE(*moe_args, precision=precision, dtype=dtype, device=device)
        else:
            self.feed_forward = SwiGLU(D, config.intermediate_size_mlp, dtype=dtype, device=device)

    def forward(
        self,
        h_BSD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions_S: torch.Tensor,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        h_BSD = h_BSD + self.self_attn(self.input_layernorm(h_BSD), rope, positions_S, cache)
        return h_BSD + self.feed_forward(self.post_attention_layernorm(h_BSD))
