"""Generation: one prefill over the prompt into the pattern-aware KV cache (model.new_cache), then one
decode step per token; greedy or sampled (temperature, top-p), stopping at stop tokens.
Legend: B batch, S prompt length, V vocabulary, N new tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engine.profiling import nvtx_range

__all__ = ["generate", "sample_next", "top_p_filter"]


def top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the nucleus set to -inf: the smallest set of most probable tokens
    whose probabilities sum to >= top_p (the most probable token is always kept)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p_filter: top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = torch.softmax(sorted_BV.float(), dim=-1)
    # A token is dropped when the tokens ranked before it already reach top_p.
    before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    drop_sorted_BV = before_BV >= top_p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sample_next(
    logits_BV: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row (int64 [B]): argmax when temperature == 0 (ties: the lowest id), else a draw
    from softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature < 0:
        raise ValueError(f"sample_next: temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = top_p_filter(logits_BV.float() / temperature, top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _last_logits(model, input_ids_BS: torch.Tensor, cache) -> torch.Tensor:
    """Logits of the last position only: the lm_head runs on one row per sequence, not on the prompt."""
    h_BSD = model.hidden_states(input_ids_BS, cache=cache)
    return model.lm_head(h_BSD[:, -1]).float()


@torch.no_grad()
def generate(
    model,
    input_ids_BS: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    fp8_cache: bool = False,
) -> torch.Tensor:
    """Prompt + up to max_new_tokens tokens, int64 [B, S + N] (N <= max_new_tokens).

    input_ids_BS: int64 [B, S], S >= 1, equal-length prompts. A sequence that emits a stop token keeps it
    and is filled with pad_token_id (default: the smallest stop token, else 0) afterwards; generation ends when every
    sequence has stopped (one host check per step) or after max_new_tokens. The cache holds S +
    max_new_tokens positions in the model's dtype (or FP8 with fp8_cache). generator: the sampling RNG
    (on the model's device).
    """
    if input_ids_BS.dim() != 2 or input_ids_BS.shape[1] < 1:
        raise ValueError(f"generate: input_ids_BS must be [B, S] with S >= 1, got {tuple(input_ids_BS.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return input_ids_BS
    B, S = input_ids_BS.shape
    param = next(model.parameters())
    device = param.device
    stop_ids = sorted({int(t) for t in stop_tokens})
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = stop_ids[0] if stop_ids else 0  # from the host list: no read back from the device
    cache = model.new_cache(B, S + max_new_tokens, dtype=param.dtype, device=device, fp8=fp8_cache)
    ids_BS = input_ids_BS.to(device=device, dtype=torch.long)
    out = [ids_BS]
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    with nvtx_range("llama4.generate.prefill"):
        logits_BV = _last_logits(model, ids_BS, cache)
    for step in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature=temperature, top_p=top_p, generator=generator)
        out.append(torch.where(done_B, torch.full_like(next_B, pad_token_id), next_B)[:, None])
        if stop.numel():
            done_B |= torch.isin(next_B, stop)
            if bool(done_B.all()):
                break
        if step + 1 < max_new_tokens:
            # Stopped sequences keep decoding their own (valid) samples, which nobody reads: the batch
            # advances together, and pad_token_id need not be a token of the vocabulary.
            with nvtx_range("llama4.generate.decode"):
                logits_BV = _last_logits(model, next_B[:, None], cache)
    return torch.cat(out, dim=1)
