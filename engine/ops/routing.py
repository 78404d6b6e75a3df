"""Public MoE routing ops: route (score + top-k + histogram + dispatch order), permute (dispatch)
and unpermute (combine). Thin wrappers over `torch.ops.llama4.*`; every one runs in an NVTX range.

Legend: T tokens, E experts, K top-k, D model width, N = T*K routed rows (slots s = t*K + k).
"""

from __future__ import annotations

import torch

from engine.ops._library import ops
from engine.ops.reference import RouteResult
from engine.profiling import nvtx_range


def moe_route(
    router_logits_TE: torch.Tensor,
    top_k: int,
    *,
    score_func: str = "sigmoid",
    expert_bias_E: torch.Tensor | None = None,
    renormalize: bool = False,
) -> RouteResult:
    """Fused MoE router: one launch for decode-sized batches, no host synchronisation.

    router_logits_TE: [T, E] float32/float16/bfloat16, unit stride along E (any row stride).
    expert_bias_E: [E] float32 or None; added to the selection key only (aux-loss-free balancing).
    Selection: top_k largest `float32(logit) + bias`, ties to the lower expert index, NaN last.
    Weights (float32, differentiable w.r.t. the logits):
      "sigmoid" (Llama 4): w = sigmoid(logit), not renormalised unless `renormalize`;
      "softmax": w = softmax(logits over all E)[id], then optionally w /= sum_k w.
    Returns RouteResult(topk_weights_TK, topk_ids_TK, tokens_per_expert_E, expert_offsets [E+1],
    sorted_slots [T*K] (slots in expert order, stable by token), slot_positions_TK).
    """
    with nvtx_range("llama4.moe_route"):
        return RouteResult(*ops.moe_route(router_logits_TE, top_k, score_func, expert_bias_E, renormalize))


def moe_permute(x_TD: torch.Tensor, route: RouteResult, topk_weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch: x_sorted_ND[p] = x_TD[s // K] * (topk_weights[s] if given), s = sorted_slots[p].

    x_TD: [T, D] float32/float16/bfloat16 (unit stride along D). topk_weights_TK: [T, K] float32
    (Llama 4 scales the expert *input* by the routing weight: pass it here). Returns [T*K, D] in
    x's dtype, rows grouped by expert as `route.expert_offsets` says. Differentiable in x and w.
    """
    with nvtx_range("llama4.moe_permute"):
        return ops.moe_permute(x_TD, route.sorted_slots, route.slot_positions_TK, topk_weights_TK)


def moe_unpermute(y_ND: torch.Tensor, route: RouteResult, topk_weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Combine: y_TD[t] = sum_k (topk_weights[t, k] *) y_ND[slot_positions[t, k]].

    y_ND: [T*K, D] rows in expert order. Accumulates in float32 in k order, so the result is
    bitwise deterministic (no atomics). Returns [T, D] in y's dtype. Differentiable in y and w.
    """
    with nvtx_range("llama4.moe_unpermute"):
        return ops.moe_unpermute(y_ND, route.sorted_slots, route.slot_positions_TK, topk_weights_TK)
