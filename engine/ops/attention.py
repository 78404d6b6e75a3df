"""Public sparse-global attention (prefill forward): local window / chunk + strided global keys +
sinks, in O(S x visible keys) work and memory.
Legend: B batch, S query positions, Sk key positions, H query heads, G kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.ops._library import ops
from engine.profiling import nvtx_range


@dataclass(frozen=True)
class AttentionPattern:
    """A visibility rule of sparse_attention / sparse_attention_decode (None / 0 turns a part off),
    e.g. Llama 4's RoPE layers `AttentionPattern(chunk=8192)`, its NoPE layers `AttentionPattern()`."""

    causal: bool = True
    window: int | None = None
    chunk: int | None = None
    global_stride: int | None = None
    sinks: int = 0
    name: str = ""

    @property
    def is_full(self) -> bool:
        """No local or global pattern: plain causal (or full) attention."""
        return not (self.window or self.chunk or self.global_stride or self.sinks)

    @property
    def kwargs(self) -> dict:
        """The mask keyword arguments of the attention ops."""
        return dict(
            causal=self.causal, window=self.window, chunk=self.chunk, global_stride=self.global_stride, sinks=self.sinks
        )


def _mask_args(op: str, window: int | None, chunk: int | None, global_stride: int | None, sinks: int) -> tuple:
    """(window, chunk, global_stride, sinks) as the kernels take them: 0 turns a pattern off."""
    out = []
    for name, value in (("window", window), ("chunk", chunk), ("global_stride", global_stride)):
        if value is not None and value < 1:
            raise ValueError(f"{op}: {name} must be >= 1 or None (off), got {value}")
        out.append(int(value or 0))
    if sinks is None or sinks < 0:
        raise ValueError(f"{op}: sinks must be >= 0, got {sinks}")
    return (*out, int(sinks))


def sparse_attention(
    q_BSHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    global_stride: int | None = None,
    sinks: int = 0,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out_BSHD = softmax(scale * q k^T + mask) v, per query head h over kv head h // (H // G).

    q_BSHD [B, S, H, D], k_BSGD / v_BSGD [B, Sk, G, D]: bfloat16 / float16 (float32 or float64 on CPU), unit
    stride along D; H a multiple of G. Key position j is visible to query position i (positions
    absolute within a sequence; queries aligned to the end of the keys, so i = row + Sk - S) when
    `j <= i` (causal) and, if any pattern is set, at least one of: `i - j < window` (sliding
    window including the query's own key), `j // chunk == i // chunk` (Llama 4's chunked local
    attention), `j % global_stride == 0` (strided global keys), `j < sinks`. With no pattern:
    plain causal (Llama 4's NoPE layers). softmax_scale defaults to D^-0.5. Varlen: B = 1 and
    int32 cu_seqlens_q / cu_seqlens_k [num_seqs + 1] (each packed sequence starts at position 0).
    A row with no visible key outputs 0 with lse = -inf. Returns out (and lse_BHS float32, the
    natural log-sum-exp of the scaled scores, when return_lse). Differentiable in q, k and v, through
    out and lse (`sparse_attention_bwd`; deterministic).
    """
    mask = _mask_args("sparse_attention", window, chunk, global_stride, sinks)
    scale = float(softmax_scale) if softmax_scale is not None else q_BSHD.shape[-1] ** -0.5
    with nvtx_range("llama4.sparse_attention"):
        out, lse = ops.sparse_attention_fwd(q_BSHD, k_BSGD, v_BSGD, cu_seqlens_q, cu_seqlens_k, causal, *mask, scale)
    return (out, lse) if return_lse else out


def sparse_attention_decode(
    q_BHD: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens_B: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    global_stride: int | None = None,
    sinks: int = 0,
    softmax_scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One new token per sequence against a KV cache (split over the keys on CUDA: flash-decoding).

    q_BHD [B, H, D]; k_cache / v_cache [B, Smax, G, D] in q's dtype, or float8_e4m3fn with per-head
    float32 scales k_scale / v_scale [G] (key = fp8 * k_scale[g]): half the bytes of bf16.
    cache_seqlens_B int32 [B]: slots [0, len) are valid. Slot j holds key position j, or
    key_positions[b, j] when given (ring buffers, global-only caches; negative = empty slot); the
    query sits at cache_seqlens - 1 (its own key already written), or query_positions[b]. The mask
    arguments mean what they mean in `sparse_attention`. Returns out_BHD (and lse_BH float32).
    """
    mask = _mask_args("sparse_attention_decode", window, chunk, global_stride, sinks)
    scale = float(softmax_scale) if softmax_scale is not None else q_BHD.shape[-1] ** -0.5
    with nvtx_range("llama4.sparse_attention_decode"):
        out, lse = ops.sparse_attention_decode(
            q_BHD,
            k_cache,
            v_cache,
            cache_seqlens_B,
            key_positions,
            query_positions,
            k_scale,
            v_scale,
            causal,
            *mask,
            scale,
        )
    return (out, lse) if return_lse else out


@torch.library.register_fake("llama4::sparse_attention_decode")
def _sparse_attention_decode_fake(q, k_cache, v_cache, cache_seqlens, *args):
    torch._check(q.dim() == 3, lambda: f"sparse_attention_decode: q must be [B, H, D], got {q.dim()}-D")
    B, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H), dtype=torch.float32)


@torch.library.register_fake("llama4::sparse_attention_fwd")
def _sparse_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, chunk, global_stride, sinks, scale):
    torch._check(q.dim() == 4, lambda: f"sparse_attention: q must be 4-D [B, S, H, D], got {q.dim()}-D")
    B, S, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32)


def sparse_attention_bwd(
    dout_BSHD: torch.Tensor,
    q_BSHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    out_BSHD: torch.Tensor,
    lse_BHS: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    global_stride: int | None = None,
    sinks: int = 0,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `sparse_attention`: (dq_BSHD in q's dtype, dk_BSGD / dv_BSGD in k's dtype).

    dout_BSHD / out_BSHD [B, S, H, D] in q's dtype (out: the forward's output), lse_BHS [B, H, S]
    float32 (the forward's natural-log LSE of the scaled scores, -inf for rows with no key); the
    mask arguments as given to the forward. With p = exp(scale q.k - lse) over the visible pairs,
    delta = rowsum(dout * out) and dS = p (dout.v - delta): dv = sum_i p dout_i, dk = scale sum_i
    dS q_i, dq = scale sum_j dS k_j; dk / dv are summed over the H / G query heads of each kv head.
    Visits only the visible (query, key) tiles, like the forward: O(S x visible keys) work and O(S)
    extra memory (delta). A row with no visible key gets zero gradient, as does a key no query sees.

    deterministic: True (the default on every device) gives bitwise-repeatable dq / dk / dv (no float
    atomics: each output row is accumulated by one owner in a fixed order). False allows a CUDA
    kernel to accumulate dq with float atomics where that is measurably faster; the CPU kernel is
    deterministic either way.
    """
    mask = _mask_args("sparse_attention_bwd", window, chunk, global_stride, sinks)
    scale = float(softmax_scale) if softmax_scale is not None else q_BSHD.shape[-1] ** -0.5
    with nvtx_range("llama4.sparse_attention_bwd"):
        return ops.sparse_attention_bwd(
            dout_BSHD,
            q_BSHD,
            k_BSGD,
            v_BSGD,
            out_BSHD,
            lse_BHS,
            cu_seqlens_q,
            cu_seqlens_k,
            causal,
            *mask,
            scale,
            deterministic,
        )


@torch.library.register_fake("llama4::sparse_attention_bwd")
def _sparse_attention_bwd_fake(dout, q, k, v, out, lse, *args):
    torch._check(q.dim() == 4, lambda: f"sparse_attention_bwd: q must be 4-D [B, S, H, D], got {q.dim()}-D")
    torch._check(k.dim() == 4, lambda: f"sparse_attention_bwd: k must be 4-D [B, Sk, G, D], got {k.dim()}-D")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --------------------------------------------------------------------------------------------
# Autograd of sparse_attention_fwd: (q, k, v) get gradients; cu_seqlens and the mask do not.
# --------------------------------------------------------------------------------------------
def _sparse_attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *mask_and_scale = inputs
    out, lse = output
    ctx.mask_and_scale = tuple(mask_and_scale)  # (causal, window, chunk, global_stride, sinks, softmax_scale)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    # An unused lse (the usual case) then arrives as None rather than as a zero tensor, which would cost the
    # extra passes below.
    ctx.set_materialize_grads(False)


def _sparse_attention_backward(ctx, dout_BSHD, dlse_BHS):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    causal, window, chunk, global_stride, sinks, scale = ctx.mask_and_scale
    mask = (causal, window, chunk, global_stride, sinks)
    if dout_BSHD is None:
        dout_BSHD = torch.zeros_like(out)
    dout_BSHD = dout_BSHD.contiguous()  # autograd may hand an expanded (stride-0) gradient
    with nvtx_range("llama4.sparse_attention_bwd"):
        dq, dk, dv = ops.sparse_attention_bwd(dout_BSHD, q, k, v, out, lse, cu_q, cu_k, *mask, scale, True)
    if dlse_BHS is not None:
        # d lse_i / d s_ij = p_ij adds dlse_i * p_ij to dS_ij (delta_i -= dlse_i), i.e. in the same visible pairs:
        #   dq_i += scale * dlse_i * sum_j p_ij k_j   (attention with k as the values, the forward op),
        #   dk_j += scale * sum_i p_ij (dlse_i q_i)   (the dv of a backward with dout_i = dlse_i q_i).
        # The schema carries no dlse, so this costs one more forward and backward, only when lse is used.
        acc = torch.promote_types(q.dtype, torch.float32)
        dlse_BSH1 = dlse_BHS.transpose(1, 2).unsqueeze(-1).to(acc)
        pk_BSHD, _ = ops.sparse_attention_fwd(q, k, k, cu_q, cu_k, *mask, scale)
        dq = (dq.to(acc) + (scale * dlse_BSH1) * pk_BSHD.to(acc)).to(q.dtype)
        dout_q = (dlse_BSH1 * q.to(acc)).to(q.dtype).contiguous()
        _, _, pq_BSGD = ops.sparse_attention_bwd(dout_q, q, k, k, out, lse, cu_q, cu_k, *mask, scale, True)
        dk = (dk.to(acc) + scale * pq_BSGD.to(acc)).to(k.dtype)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "llama4::sparse_attention_fwd", _sparse_attention_backward, setup_context=_sparse_attention_setup
)
