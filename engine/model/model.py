"""The Llama 4 text model (Scout, Maverick and their debug twins): embedding, decoder layers, final
norm, untied lm_head; prefill and cached decode; parameter and FLOP counts for MFU.
Legend: B batch, S new positions, D model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.kv_cache import LayerKVCache
from engine.model.config import Llama4Config
from engine.model.layers import DecoderLayer, RMSNorm, rope_cos_sin, rope_inv_freq
from engine.moe import MoE
from engine.ops.attention import AttentionPattern
from engine.profiling import nvtx_range

PRECISIONS = ("bf16", "fp8")


class Llama4Cache:
    """The KV caches of all layers (each follows its layer's attention pattern) and the position of
    the next token. All B sequences advance together."""

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def position(self) -> int:
        """Tokens written so far (the position of the next token)."""
        return self.layers[0].length

    @property
    def max_seq_len(self) -> int:
        return self.layers[0].max_seq_len

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


class Llama4ForCausalLM(nn.Module):
    """forward(input_ids_BS, cache=None) -> logits_BSV. Without a cache: a causal forward of whole
    sequences (training, scoring). With one (`new_cache`): prefill when it is empty, then decode;
    positions continue from `cache.position`.

    `gradient_checkpointing = True` recomputes each layer in the backward (torch.utils.checkpoint,
    non-reentrant) instead of keeping its activations.
    """

    def __init__(
        self, config: Llama4Config, *, dtype: torch.dtype | None = None, device=None, precision: str = "bf16"
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"Llama4ForCausalLM: precision must be one of {PRECISIONS}, got {precision!r}")
        self.config, self.precision = config, precision
        D, V = config.hidden_size, config.vocab_size
        pad = config.pad_token_id if config.pad_token_id is not None and 0 <= config.pad_token_id < V else None
        self.embed_tokens = nn.Embedding(V, D, padding_idx=pad, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype=dtype, device=device, precision=precision)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(D, config.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = nn.Linear(D, V, bias=False, dtype=dtype, device=device)
        self.register_buffer("inv_freq_R", rope_inv_freq(config, device=device), persistent=False)
        self.gradient_checkpointing = False

    def reset_rope(self) -> None:
        """Recomputes the RoPE frequencies (a non-persistent buffer) after `to_empty`."""
        self.inv_freq_R = rope_inv_freq(self.config, device=self.inv_freq_R.device)

    def hidden_states(self, input_ids_BS: torch.Tensor, *, cache: Llama4Cache | None = None) -> torch.Tensor:
        """h_BSD after the final norm (the lm_head's input)."""
        if input_ids_BS.dim() != 2:
            raise ValueError(f"Llama4ForCausalLM: input_ids must be [B, S], got shape {tuple(input_ids_BS.shape)}")
        S = input_ids_BS.shape[1]
        start = cache.position if cache is not None else 0
        if cache is not None and start + S > cache.max_seq_len:
            raise ValueError(
                f"Llama4ForCausalLM: {start + S} tokens exceed the cache's max_seq_len {cache.max_seq_len}"
            )
        positions_S = torch.arange(start, start + S, device=input_ids_BS.device)
        rope = rope_cos_sin(positions_S, self.inv_freq_R)
        h_BSD = self.embed_tokens(input_ids_BS)
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"llama4.layer{i}"):
                layer_cache = cache[i] if cache is not None else None
                if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                    h_BSD = checkpoint(layer, h_BSD, rope, positions_S, None, use_reentrant=False)
                else:
                    h_BSD = layer(h_BSD, rope, positions_S, layer_cache)
        return self.norm(h_BSD)

    def forward(self, input_ids_BS: torch.Tensor, *, cache: Llama4Cache | None = None) -> torch.Tensor:
        h_BSD = self.hidden_states(input_ids_BS, cache=cache)
        with nvtx_range("llama4.lm_head"):
            return self.lm_head(h_BSD)

    def new_cache(
        self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None, device=None, fp8: bool = False
    ) -> Llama4Cache:
        """An empty cache per layer, sized by that layer's pattern (chunked layers keep one chunk)."""
        weight = self.embed_tokens.weight
        c = self.config
        return Llama4Cache(
            [
                LayerKVCache(
                    batch_size,
                    c.num_key_value_heads,
                    c.head_dim,
                    max_seq_len,
                    c.attention_pattern_for(i),
                    dtype=dtype or weight.dtype,
                    device=device or weight.device,
                    fp8=fp8,
                )
                for i in range(c.num_hidden_layers)
            ]
        )

    def moe_layers(self) -> list[MoE]:
        return [layer.feed_forward for layer in self.layers if isinstance(layer.feed_forward, MoE)]

    # ---- sizes and work, for MFU ----
    def num_params(self, active_only: bool = False) -> int:
        """Weights (FP8 experts included), embedding and lm_head counted. active_only: only the
        top-k of each MoE layer's routed experts count."""
        total = sum(p.numel() for p in self.parameters())
        for moe in self.moe_layers():
            expert_numel = moe.gate_up_ENK.numel() + moe.down_EDF.numel()
            if not isinstance(moe.gate_up_ENK, nn.Parameter):  # FP8 buffers
                total += expert_numel
            if active_only:
                total -= expert_numel * (moe.n_experts - moe.top_k) // moe.n_experts
        return total

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Matmul FLOPs per token of a length-`seq_len` sequence: 2 per active weight (embedding lookup
        excluded) plus the attention scores and values over each layer's visible keys; x3 for training
        (forward + the two backward GEMMs)."""
        c = self.config
        weights = self.num_params(active_only=True) - self.embed_tokens.weight.numel()
        flops = 2.0 * weights
        for i in range(c.num_hidden_layers):
            keys = mean_visible_keys(c.attention_pattern_for(i), seq_len)
            flops += 2 * 2 * c.num_attention_heads * c.head_dim * keys  # q k^T and p v
        return flops * (3 if training else 1)


def mean_visible_keys(pattern: AttentionPattern, seq_len: int) -> float:
    """Average over query positions 0..seq_len-1 of the keys `pattern` lets a query see (causal)."""
    i = torch.arange(seq_len, dtype=torch.float64)
    if pattern.is_full:
        return float((i + 1).mean())
    visible = torch.zeros_like(i)
    local = torch.zeros_like(i)  # keys in the window / chunk: positions [i - local + 1, i]
    if pattern.chunk:
        local = torch.maximum(local, torch.remainder(i, pattern.chunk) + 1)
    if pattern.window:
        local = torch.maximum(local, torch.clamp(i + 1, max=pattern.window))
    visible += local
    first_local = i + 1 - local  # global keys and sinks before the local span add to it
    if pattern.global_stride:
        visible += torch.ceil(first_local / pattern.global_stride)
    if pattern.sinks:
        sinks = torch.clamp(first_local, max=pattern.sinks)
        if pattern.global_stride:  # sink positions that are also global keys were counted once already
            sinks -= torch.ceil(sinks / pattern.global_stride)
        visible += sinks
    return float(visible.mean())
