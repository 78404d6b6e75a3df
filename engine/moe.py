"""The Llama 4 MoE feed-forward block as four named stages: Router -> Dispatch -> Experts -> Combine
(plus the shared expert), on engine.ops. Legend: T tokens, D model width, E experts, K top-k,
F expert hidden width, N = T*K routed rows.

Llama 4's maths (../shared/llama4-architecture.md): logits = x @ Wr^T; top-k by logits (+ an
optional expert bias that steers selection only); weight = sigmoid(logit); the weight multiplies
the expert's INPUT; experts compute down(silu(gate(x)) * up(x)); output = shared(x) + sum of the
routed outputs. Weights are stored in the kernels' layout: gate_up_ENK [E, 2F, D] (gate rows
first) and down_EDF [E, D, F] (nn.Linear layout per expert; Hugging Face stores the transposes).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine import ops
from engine.ops import RouteResult
from engine.profiling import nvtx_range

log = logging.getLogger("engine.moe")
_warned_wgrad_sync = False


def grouped_wgrad(dy_MN: torch.Tensor, x_MK: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """dW_ENK[e] = dy[rows of e]^T @ x[rows of e] in float32, one matmul per expert in order
    (deterministic, no atomics); an expert with no rows gets exactly zero.

    The group sizes are read on the host here: on CUDA that is a synchronisation (logged once)
    until the K-grouped wgrad kernel lands.
    """
    global _warned_wgrad_sync
    if dy_MN.is_cuda and not _warned_wgrad_sync:
        _warned_wgrad_sync = True
        log.warning("grouped_wgrad reads group sizes on the host (one sync per backward) until its CUDA kernel lands")
    E = group_sizes_E.shape[0]
    dw_ENK = torch.zeros(E, dy_MN.shape[1], x_MK.shape[1], dtype=torch.float32, device=dy_MN.device)
    start = 0
    for e, rows in enumerate(group_sizes_E.tolist()):
        if rows:
            dw_ENK[e] = dy_MN[start : start + rows].float().t() @ x_MK[start : start + rows].float()
        start += rows
    return dw_ENK


class _GroupedLinear(torch.autograd.Function):
    """y_MN = grouped_gemm(x_MK, w_ENK, group_sizes); dgrad through the same grouped GEMM on the
    transposed weights, wgrad per expert (grouped_wgrad)."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, group_sizes_E):
        ctx.save_for_backward(x_MK, w_ENK, group_sizes_E)
        return ops.grouped_gemm(x_MK, w_ENK, group_sizes_E, out_dtype=x_MK.dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_ENK, group_sizes_E = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_EKN = w_ENK.transpose(1, 2).contiguous()  # the layout the GEMM needs, built once per backward
            dx = ops.grouped_gemm(dy_MN, w_EKN, group_sizes_E, out_dtype=x_MK.dtype)
        if ctx.needs_input_grad[1]:
            dw = grouped_wgrad(dy_MN, x_MK, group_sizes_E).to(w_ENK.dtype)
        return dx, dw, None


def grouped_linear(x_MK: torch.Tensor, w_ENK: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """Differentiable grouped GEMM (BF16, or float32 on CPU): rows of expert e times w[e]^T."""
    return _GroupedLinear.apply(x_MK, w_ENK, group_sizes_E)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert and Maverick's dense MLP."""

    def __init__(self, d_model: int, d_ff: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Llama 4's MoE block (BF16 experts on the kernels, or float32 on CPU as the reference mode).

    forward(x [..., D]) -> [..., D]; `last_route` keeps the step's routing and `expert_load()`
    its tokens per expert, for logging and bias updates.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int = 1,
        *,
        shared_expert: bool = True,
        score_func: str = "sigmoid",
        precision: str = "bf16",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if precision != "bf16":
            raise NotImplementedError(f"MoE: precision={precision!r} is not available yet (only 'bf16')")
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.score_func = score_func
        self.router = nn.Linear(d_model, n_experts, bias=False, dtype=dtype, device=device)
        self.gate_up_ENK = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model, dtype=dtype, device=device))
        self.down_EDF = nn.Parameter(torch.empty(n_experts, d_model, d_ff, dtype=dtype, device=device))
        self.shared_expert = SwiGLU(d_model, d_ff, dtype=dtype, device=device) if shared_expert else None
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32, device=device))
        self.last_route: RouteResult | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.gate_up_ENK, self.down_EDF):
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)

    # The four stages, each its own method so expert parallelism can slot a communication step in.
    def route(self, x_TD: torch.Tensor) -> RouteResult:
        logits_TE = self.router(x_TD)
        return ops.moe_route(logits_TE, self.top_k, score_func=self.score_func, expert_bias_E=self.expert_bias)

    def dispatch(self, x_TD: torch.Tensor, route: RouteResult) -> torch.Tensor:
        # Llama 4 scales the expert's INPUT by the routing weight (in x's dtype, as Hugging Face does).
        return ops.moe_permute(x_TD, route, route.topk_weights_TK)

    def experts(self, x_sorted_ND: torch.Tensor, route: RouteResult) -> torch.Tensor:
        sizes_E = route.tokens_per_expert_E
        h_N2F = grouped_linear(x_sorted_ND, self.gate_up_ENK, sizes_E)
        return grouped_linear(ops.swiglu(h_N2F), self.down_EDF, sizes_E)

    def combine(self, y_sorted_ND: torch.Tensor, route: RouteResult) -> torch.Tensor:
        return ops.moe_unpermute(y_sorted_ND, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with nvtx_range("llama4.moe"):
            x_TD = x.reshape(-1, self.d_model)
            route = self.route(x_TD)
            self.last_route = route
            y_TD = self.combine(self.experts(self.dispatch(x_TD, route), route), route)
            if self.shared_expert is not None:
                y_TD = y_TD + self.shared_expert(x_TD)
            return y_TD.view_as(x)

    def expert_load(self) -> torch.Tensor | None:
        """Tokens routed to each expert at the last forward (int32 [E]), or None."""
        return None if self.last_route is None else self.last_route.tokens_per_expert_E


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, coeff: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing (sign rule): raise under-loaded experts, lower over-loaded
    ones by `coeff`, then re-centre to zero mean. In place, no host synchronisation."""
    load = tokens_per_expert_E.float()
    bias_E.add_(coeff * torch.sign(load.mean() - load))
    bias_E.sub_(bias_E.mean())
