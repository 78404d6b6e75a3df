"""Cross-entropy over a large vocabulary without the [T, V] logits: the lm_head matmul, log-softmax and
the loss are computed chunk by chunk of tokens, and backward recomputes each chunk's logits.
Legend: T tokens, D model width, V vocabulary, C tokens in one chunk.

At Llama 4's V = 202048 and T = 8192, full float32 logits would be 6.6 GB (and as much again for their
gradient); a chunk of C = 512 tokens holds 0.4 GB, and the per-token log-sum-exp (T floats) is all that
forward keeps for backward.
"""

from __future__ import annotations

import logging

import torch

from engine.profiling import nvtx_range

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy"]

log = logging.getLogger("engine.ops.loss")

IGNORE_INDEX = -100
# Bytes of float32 logits one chunk may hold: 512 MiB is 664 tokens at V = 202048, a [664, 5120] x
# [5120, 202048] GEMM (1.4 TFLOP) large enough to run at the matmul peak.
CHUNK_LOGITS_BYTES = 512 << 20
# Chunks are a multiple of this many tokens (whole GEMM tiles) unless T itself is smaller.
CHUNK_ALIGN = 128

_warned_mm_dtype = False


def _mm_f32(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 output and float32 accumulation, from float32 or bf16 / fp16 inputs.

    On CUDA a bf16 GEMM writes float32 directly (`out_dtype`), so the logits are never rounded to bf16;
    on CPU the inputs are upcast (CPU runs are small).
    """
    global _warned_mm_dtype
    if a_MK.dtype == torch.float32:
        return a_MK @ b_KN.float()
    if a_MK.is_cuda:
        try:
            return torch.mm(a_MK, b_KN, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=): bf16 output, upcast after
            if not _warned_mm_dtype:
                _warned_mm_dtype = True
                log.warning("torch.mm(out_dtype=float32) unavailable: chunked_cross_entropy rounds logits to bf16")
            return (a_MK @ b_KN).float()
    return a_MK.float() @ b_KN.float()


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk so one chunk's float32 logits stay within CHUNK_LOGITS_BYTES."""
    rows = max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))
    if rows >= CHUNK_ALIGN:
        rows -= rows % CHUNK_ALIGN
    return max(1, min(num_tokens, rows))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, labels_T, chunk_size, reduction):
        T = hidden_TD.shape[0]
        valid_T = labels_T != IGNORE_INDEX
        # Ignored rows gather label 0 (any valid index) and are zeroed below.
        safe_labels_T = torch.where(valid_T, labels_T, 0)
        lse_T = torch.empty(T, dtype=torch.float32, device=hidden_TD.device)
        loss_T = torch.empty(T, dtype=torch.float32, device=hidden_TD.device)
        weight_DV = weight_VD.t()
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            logits_CV = _mm_f32(hidden_TD[start:end], weight_DV)
            lse_T[start:end] = torch.logsumexp(logits_CV, dim=-1)
            target_C = logits_CV.gather(1, safe_labels_T[start:end, None]).squeeze(1)
            loss_T[start:end] = lse_T[start:end] - target_C
            del logits_CV
        loss_T = torch.where(valid_T, loss_T, 0.0)
        # mean over the tokens that count; 0 (not NaN) when every label is ignored, as the gradient is 0 then.
        count = valid_T.sum().clamp_min(1).float()
        ctx.save_for_backward(hidden_TD, weight_VD, safe_labels_T, valid_T, lse_T, count)
        ctx.chunk_size, ctx.reduction = chunk_size, reduction
        if reduction == "none":
            return loss_T
        return loss_T.sum() / count if reduction == "mean" else loss_T.sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden_TD, weight_VD, labels_T, valid_T, lse_T, count = ctx.saved_tensors
        T, chunk_size = hidden_TD.shape[0], ctx.chunk_size
        # d loss_t / d logits_t = softmax(logits_t) - onehot(label_t), times the incoming gradient of row t.
        if ctx.reduction == "none":
            row_scale_T = grad_out.float() * valid_T
        else:
            scale = grad_out.float() / count if ctx.reduction == "mean" else grad_out.float()
            row_scale_T = valid_T * scale
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh_TD = torch.empty_like(hidden_TD) if need_h else None
        # Weight gradient accumulated in float32 over the chunks, rounded once at the end.
        dw_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        weight_DV = weight_VD.t()
        rows_C = None
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            h_CD = hidden_TD[start:end]
            dlogits_CV = _mm_f32(h_CD, weight_DV)
            dlogits_CV.sub_(lse_T[start:end, None]).exp_()
            if rows_C is None or rows_C.shape[0] != end - start:
                rows_C = torch.arange(end - start, device=hidden_TD.device)
            dlogits_CV[rows_C, labels_T[start:end]] -= 1.0
            dlogits_CV.mul_(row_scale_T[start:end, None])
            # The two GEMMs read the chunk's logit gradient in the inputs' dtype (one cast, shared).
            dlogits_CV = dlogits_CV.to(weight_VD.dtype)
            if need_h:
                dh_TD[start:end] = _mm_f32(dlogits_CV, weight_VD).to(hidden_TD.dtype)
            if need_w:
                dw_VD += _mm_f32(dlogits_CV.t(), h_CD)
            del dlogits_CV
        return dh_TD, None if dw_VD is None else dw_VD.to(weight_VD.dtype), None, None, None


def chunked_cross_entropy(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_T: torch.Tensor,
    *,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """cross_entropy(hidden_TD @ weight_VD^T, labels_T, ignore_index=-100) without materialising the
    [T, V] logits: loss_t = logsumexp_v(h_t . w_v) - h_t . w_{label_t}, in float32 math.

    hidden_TD [T, D] (any leading dims are flattened) and weight_VD [V, D] (the lm_head weight): float32,
    or bf16 / fp16 (logits accumulated and kept in float32). labels_T int64 [T] in [0, V) or -100.
    chunk_size: tokens per chunk (default: float32 logits of one chunk <= 512 MiB). reduction "mean"
    (over non-ignored tokens; 0 when there are none), "sum" or "none" (float32 [T], 0 at ignored tokens).
    Backward recomputes each chunk's logits from hidden and weight; gradients in the inputs' dtypes.
    """
    if hidden_TD.dim() < 2:
        raise ValueError(f"chunked_cross_entropy: hidden_TD must be [..., D], got shape {tuple(hidden_TD.shape)}")
    D = hidden_TD.shape[-1]
    hidden_TD = hidden_TD.reshape(-1, D)
    labels_T = labels_T.reshape(-1)
    if weight_VD.dim() != 2 or weight_VD.shape[1] != D:
        raise ValueError(
            f"chunked_cross_entropy: weight_VD must be [V, D={D}] (the lm_head weight), got {tuple(weight_VD.shape)}"
        )
    if labels_T.shape[0] != hidden_TD.shape[0]:
        raise ValueError(
            f"chunked_cross_entropy: labels_T must have one label per token ({hidden_TD.shape[0]}), "
            f"got {labels_T.shape[0]}"
        )
    if labels_T.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"chunked_cross_entropy: labels_T must be int64 (or int32), got {labels_T.dtype}")
    if hidden_TD.dtype != weight_VD.dtype:
        raise TypeError(
            f"chunked_cross_entropy: hidden_TD ({hidden_TD.dtype}) and weight_VD ({weight_VD.dtype}) must share a dtype"
        )
    if not hidden_TD.is_floating_point():
        raise TypeError(f"chunked_cross_entropy: hidden_TD must be floating point, got {hidden_TD.dtype}")
    if hidden_TD.device != weight_VD.device or labels_T.device != hidden_TD.device:
        raise ValueError(
            "chunked_cross_entropy: hidden_TD, weight_VD and labels_T must be on one device, got "
            f"{hidden_TD.device}, {weight_VD.device}, {labels_T.device}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"chunked_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    T, V = hidden_TD.shape[0], weight_VD.shape[0]
    if not labels_T.is_cuda and T:  # on CUDA this check would synchronise; the gather asserts there
        bad = (labels_T != IGNORE_INDEX) & ((labels_T < 0) | (labels_T >= V))
        if bad.any():
            raise ValueError(
                f"chunked_cross_entropy: labels_T must be in [0, V={V}) or {IGNORE_INDEX}, "
                f"got {labels_T[bad][0].item()} at index {int(bad.nonzero()[0, 0])}"
            )
    if chunk_size is None:
        chunk_size = default_chunk_size(T, V)
    elif chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    chunk_size = max(1, min(chunk_size, T))
    with nvtx_range("llama4.chunked_cross_entropy"):
        return _ChunkedCrossEntropy.apply(hidden_TD, weight_VD, labels_T.long(), chunk_size, reduction)
