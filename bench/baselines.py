"""The fastest plain-torch versions of the MoE routing stages we could write: what a user would do without
our ops. Benchmarks report our speedup against these as well as against engine.ops.reference (the oracle).

Legend: T tokens, E experts, K top-k, D model width, N = T*K routed rows (slots s = t*K + k).
None of these synchronises with the host, so each can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _arange(n: int, device: torch.device) -> torch.Tensor:
    # A plain-torch user would hoist this constant out of the step; building it per call is one more launch.
    return torch.arange(n, device=device)


def torch_topk_route(
    logits_TE: torch.Tensor, top_k: int, expert_bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Sigmoid top-k routing and sort-based dispatch order with torch ops, no host sync.

    logits_TE: [T, E] any float dtype; expert_bias_E: [E] float32 or None (selection only).
    Returns the fields of engine.ops.RouteResult in order (weights float32; ids, counts, offsets, slots
    and positions stay int64: casting them to int32 would only add launches). Ties go wherever
    torch.topk puts them, so ids can differ from the reference on tied logits.
    """
    T, E = logits_TE.shape
    if expert_bias_E is None:
        # Selecting on the raw dtype picks the same experts as on float32 (the cast is monotone).
        top_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
        weights_TK = torch.sigmoid(top_TK.float())
    else:
        ids_TK = torch.topk(logits_TE.float() + expert_bias_E, top_k, dim=-1).indices
        weights_TK = torch.sigmoid(torch.gather(logits_TE, 1, ids_TK).float())

    flat_ids_N = ids_TK.reshape(-1)
    sorted_ids_N, sorted_slots_N = torch.sort(flat_ids_N, stable=True)
    # Offsets from the sorted ids: a binary search per expert, no bincount (which syncs on CUDA).
    expert_offsets = torch.searchsorted(sorted_ids_N, _arange(E + 1, logits_TE.device))
    tokens_per_expert_E = expert_offsets.diff()
    positions_N = torch.empty_like(sorted_slots_N).scatter_(0, sorted_slots_N, _arange(T * top_k, logits_TE.device))
    return weights_TK, ids_TK, tokens_per_expert_E, expert_offsets, sorted_slots_N, positions_N.view(T, top_k)


def torch_permute(
    x_TD: torch.Tensor, sorted_slots_N: torch.Tensor, top_k: int, topk_weights_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch: x_sorted_ND[p] = x_TD[s // K] * w[s], s = sorted_slots_N[p]; [N, D] in x's dtype.

    The weight is rounded to x's dtype before the multiply (one in-place kernel instead of an fp32
    round trip), so this is a little less exact, and a little faster, than our op.
    """
    rows_ND = x_TD.index_select(0, torch.div(sorted_slots_N, top_k, rounding_mode="floor"))
    if topk_weights_TK is not None:
        w_N = topk_weights_TK.reshape(-1).index_select(0, sorted_slots_N).to(x_TD.dtype)
        rows_ND.mul_(w_N.unsqueeze(-1))
    return rows_ND


def torch_unpermute(
    y_ND: torch.Tensor, slot_positions_TK: torch.Tensor, topk_weights_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Combine: y_TD[t] = sum_k w[t, k] * y_ND[slot_positions[t, k]]; [T, D] in y's dtype.

    Gather then a weighted sum over k (torch reduces bf16 in fp32 internally); K = 1 skips the sum.
    """
    T, K = slot_positions_TK.shape
    rows_TKD = y_ND.index_select(0, slot_positions_TK.reshape(-1)).view(T, K, -1)
    if topk_weights_TK is not None:
        rows_TKD = rows_TKD * topk_weights_TK.to(y_ND.dtype).unsqueeze(-1)
    if K == 1:
        return rows_TKD.view(T, -1)
    return rows_TKD.sum(1)
