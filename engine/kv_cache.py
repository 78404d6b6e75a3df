"""A KV cache whose memory follows the layer's attention pattern: chunked / windowed layers keep a
ring buffer of the last chunk / window only, strided-global layers keep only the global keys (and
sinks), full layers keep everything. Decode reads it through `engine.ops.sparse_attention_decode`,
which takes each slot's absolute position, so any slot layout gives the same attention.
Legend: B batch, T new tokens, G kv heads, D head dim, H query heads.
"""

from __future__ import annotations

import torch

from engine.ops import sparse_attention_decode
from engine.ops.attention import AttentionPattern

__all__ = ["AttentionPattern", "LayerKVCache"]

FP8_E4M3_MAX = 448.0
# An FP8 cache fixes each head's scale at the first write (the prefill): amax * headroom / 448, so
# later tokens up to twice the prefill's largest magnitude are represented; larger ones saturate.
FP8_SCALE_HEADROOM = 2.0
FP8_AMAX_FLOOR = 1e-6


class LayerKVCache:
    """KV cache of one attention layer, all B sequences advancing together.

    Slots (dim 1 of `k` / `v`), by region: [sinks: positions < sinks] [global: multiples of
    global_stride] [ring: the last max(window, chunk) positions not stored above]; a full layer has
    one region of max_seq_len slots. `key_positions` [B, slots] holds each slot's position (-1:
    empty), so a key is stored exactly once and decode never counts it twice.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        pattern: AttentionPattern,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        fp8: bool = False,
    ) -> None:
        if not pattern.causal:
            raise ValueError("LayerKVCache: decoding needs a causal pattern (a new token cannot see future keys)")
        self.pattern = pattern
        self.max_seq_len = max_seq_len
        self.length = 0
        if pattern.is_full:
            self.n_sinks, self.n_global, self.ring = 0, 0, max_seq_len
        else:
            self.n_sinks = min(pattern.sinks or 0, max_seq_len)
            self.n_global = -(-max_seq_len // pattern.global_stride) if pattern.global_stride else 0
            self.ring = min(max(pattern.window or 0, pattern.chunk or 0), max_seq_len)
        slots = self.n_sinks + self.n_global + self.ring
        cache_dtype = torch.float8_e4m3fn if fp8 else dtype
        self.dtype = dtype
        self.k = torch.zeros(batch, slots, kv_heads, head_dim, dtype=cache_dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.key_positions = torch.full((batch, slots), -1, dtype=torch.int32, device=device)
        self.cache_seqlens = torch.full((batch,), slots, dtype=torch.int32, device=device)
        self.k_scale = self.v_scale = None
        self.fp8 = fp8

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.key_positions))

    def _slots_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each position (int64), or -1 when the pattern never needs that key again."""
        if self.pattern.is_full:
            return positions.clone()
        slot = torch.full_like(positions, -1)
        stride = self.pattern.global_stride
        is_sink = positions < self.n_sinks
        is_global = (positions % stride == 0) & ~is_sink if stride else torch.zeros_like(is_sink)
        in_ring = ~is_sink & ~is_global
        slot = torch.where(is_sink, positions, slot)
        if stride:
            slot = torch.where(is_global, self.n_sinks + positions // stride, slot)
        if self.ring:
            slot = torch.where(in_ring, self.n_sinks + self.n_global + positions % self.ring, slot)
        return slot

    def _quantize(self, x_BTGD: torch.Tensor, which: str) -> torch.Tensor:
        if not self.fp8:
            return x_BTGD.to(self.k.dtype)
        scale = getattr(self, f"{which}_scale")
        if scale is None:
            amax_G = x_BTGD.float().abs().amax(dim=(0, 1, 3)).clamp_min(FP8_AMAX_FLOOR)
            scale = amax_G * FP8_SCALE_HEADROOM / FP8_E4M3_MAX
            setattr(self, f"{which}_scale", scale.contiguous())
        q = (x_BTGD.float() / scale[None, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        return q.to(torch.float8_e4m3fn)

    def write(self, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor) -> None:
        """Append T tokens (positions length .. length + T - 1) to every sequence."""
        T = k_BTGD.shape[1]
        if self.length + T > self.max_seq_len:
            raise ValueError(f"LayerKVCache: {self.length + T} tokens exceed max_seq_len = {self.max_seq_len}")
        positions = torch.arange(self.length, self.length + T, device=self.k.device)
        slots = self._slots_of(positions)
        keep = slots >= 0
        if self.ring and not self.pattern.is_full:
            # A ring-bound key is needed only while within `ring` positions of the newest query, and
            # positions in such a span are distinct modulo `ring`: keeping just those never scatters
            # two tokens to one slot.
            ring_bound = keep & (slots >= self.n_sinks + self.n_global)
            keep &= ~ring_bound | (positions >= self.length + T - self.ring)
        idx = slots[keep]
        k_q, v_q = self._quantize(k_BTGD, "k"), self._quantize(v_BTGD, "v")
        self.k[:, idx] = k_q[:, keep]
        self.v[:, idx] = v_q[:, keep]
        self.key_positions[:, idx] = positions[keep].to(torch.int32)
        self.length += T

    def attend(self, q_BHD: torch.Tensor, *, softmax_scale: float | None = None) -> torch.Tensor:
        """Attention of the newest token (position length - 1) of each sequence over the cache."""
        query_positions = torch.full((q_BHD.shape[0],), self.length - 1, dtype=torch.int32, device=q_BHD.device)
        return sparse_attention_decode(
            q_BHD.contiguous(),
            self.k,
            self.v,
            self.cache_seqlens,
            key_positions=self.key_positions,
            query_positions=query_positions,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            softmax_scale=softmax_scale,
            **self.pattern.kwargs,
        )
