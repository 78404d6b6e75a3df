"""The Llama 4 MoE feed-forward block as four named stages: Router -> Dispatch -> Experts -> Combine
(plus the shared expert), on engine.ops. Legend: T tokens, D model width, E experts, K top-k,
F expert hidden width, N = T*K routed rows, R LoRA rank (M, K, N: a GEMM's rows, depth, outputs).

Llama 4's maths (../shared/llama4-architecture.md): logits = x @ Wr^T; top-k by logits (+ an
optional expert bias that steers selection only); weight = sigmoid(logit); the weight multiplies
the expert's INPUT; experts compute down(silu(gate(x)) * up(x)); output = shared(x) + sum of the
routed outputs. Weights are stored in the kernels' layout: gate_up_ENK [E, 2F, D] (gate rows
first) and down_EDF [E, D, F] (nn.Linear layout per expert; Hugging Face stores the transposes).
"""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.ops import RouteResult, reference
from engine.ops.fp8_training import Fp8Recipe, Fp8WeightCache, fp8_grouped_linear, grouped_wgrad
from engine.profiling import nvtx_range

PRECISIONS = ("bf16", "fp8")
# On CUDA the BF16 grouped GEMM reads 16-byte rows: a LoRA rank is a GEMM width there.
LORA_RANK_ALIGN_CUDA = 8

__all__ = ["Fp8Recipe", "MoE", "SwiGLU", "grouped_linear", "grouped_wgrad", "update_expert_bias"]


def _grouped_gemm(x_MK: torch.Tensor, w_ENK: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """The kernel for BF16 / float32; float64 runs the reference (the gradcheck path, CPU only)."""
    if x_MK.dtype == torch.float64:
        return reference.grouped_gemm(x_MK, w_ENK, group_sizes_E)
    return ops.grouped_gemm(x_MK, w_ENK, group_sizes_E, out_dtype=x_MK.dtype)


class _GroupedLinear(torch.autograd.Function):
    """y_MN = grouped_gemm(x_MK, w_ENK, group_sizes); dgrad through the same grouped GEMM on the
    transposed weights, wgrad through grouped_wgrad (K-grouped: contraction over each expert's rows)."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, group_sizes_E):
        ctx.save_for_backward(x_MK, w_ENK, group_sizes_E)
        return _grouped_gemm(x_MK, w_ENK, group_sizes_E)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_ENK, group_sizes_E = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_EKN = w_ENK.transpose(1, 2).contiguous()  # the layout the GEMM needs, built once per backward
            dx = _grouped_gemm(dy_MN, w_EKN, group_sizes_E)
        if ctx.needs_input_grad[1]:
            dw = grouped_wgrad(dy_MN, x_MK, group_sizes_E).to(w_ENK.dtype)
        return dx, dw, None


def grouped_linear(x_MK: torch.Tensor, w_ENK: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """Differentiable grouped GEMM (BF16; float32 or float64 on CPU): rows of expert e times w[e]^T."""
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
    """Llama 4's MoE block for training and inference.

    precision "bf16": BF16 experts on the kernels (float32 on CPU, the reference mode); "fp8": the
    routed experts and the shared expert run the FP8 recipe of `fp8_recipe` (engine.ops.fp8_training:
    activations and gradients per 1x128 block or per row, weights per 128x128 block or per channel,
    quantised once per weight update), the router stays in high precision.
    lora_rank > 0: low-rank adapters on every expert's gate_up and down projections,
    W_e + (lora_alpha / lora_rank) * B_e @ A_e (A random, B zero: the layer starts as the base), and
    the base expert weights are frozen (requires_grad False; FP8 base weights then need no wgrad).
    aux_loss_coeff > 0: `aux_loss` holds coeff * sum_e f_e * P_e after each forward (f_e: load of
    expert e relative to uniform, P_e: mean normalised router probability), differentiable in the
    router; add it to the training loss. Llama 4 itself balances without it (update_expert_bias).

    forward(x [..., D]) -> [..., D]; `last_route` keeps the step's routing, `expert_load()` its
    tokens per expert and `load_stats()` the step's balance statistics (device tensors, no sync).
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
        fp8_recipe: Fp8Recipe | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        aux_loss_coeff: float = 0.0,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"MoE: precision must be one of {PRECISIONS}, got {precision!r}")
        if lora_rank < 0:
            raise ValueError(f"MoE: lora_rank must be >= 0, got {lora_rank}")
        if aux_loss_coeff < 0:
            raise ValueError(f"MoE: aux_loss_coeff must be >= 0, got {aux_loss_coeff}")
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.score_func = score_func
        self.precision = precision
        self.fp8_recipe = (fp8_recipe or Fp8Recipe()) if precision == "fp8" else None
        self.aux_loss_coeff = aux_loss_coeff
        self.router = nn.Linear(d_model, n_experts, bias=False, dtype=dtype, device=device)
        self.gate_up_ENK = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model, dtype=dtype, device=device))
        self.down_EDF = nn.Parameter(torch.empty(n_experts, d_model, d_ff, dtype=dtype, device=device))
        self.shared_expert = SwiGLU(d_model, d_ff, dtype=dtype, device=device) if shared_expert else None
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32, device=device))
        self.lora_rank = lora_rank
        self.lora_scaling = (lora_alpha if lora_alpha is not None else lora_rank) / max(lora_rank, 1)
        if lora_rank:
            E, R, D, F = n_experts, lora_rank, d_model, d_ff
            factory = dict(dtype=dtype, device=device)
            self.lora_a_gate_up_ERD = nn.Parameter(torch.empty(E, R, D, **factory))
            self.lora_b_gate_up_ENR = nn.Parameter(torch.empty(E, 2 * F, R, **factory))
            self.lora_a_down_ERF = nn.Parameter(torch.empty(E, R, F, **factory))
            self.lora_b_down_EDR = nn.Parameter(torch.empty(E, D, R, **factory))
            self.gate_up_ENK.requires_grad_(False)
            self.down_EDF.requires_grad_(False)
        self.last_route: RouteResult | None = None
        self.aux_loss: torch.Tensor | None = None
        self._fp8_weights = Fp8WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w in (self.gate_up_ENK, self.down_EDF):
                nn.init.normal_(w, std=w.shape[-1] ** -0.5)
            if self.lora_rank:
                for a in (self.lora_a_gate_up_ERD, self.lora_a_down_ERF):
                    nn.init.normal_(a, std=a.shape[-1] ** -0.5)
                nn.init.zeros_(self.lora_b_gate_up_ENR)
                nn.init.zeros_(self.lora_b_down_EDR)

    # The four stages, each its own method so expert parallelism can slot a communication step in.
    def route(self, x_TD: torch.Tensor) -> RouteResult:
        return self._route_logits(self.router(x_TD))

    def _route_logits(self, logits_TE: torch.Tensor) -> RouteResult:
        return ops.moe_route(logits_TE, self.top_k, score_func=self.score_func, expert_bias_E=self.expert_bias)

    def dispatch(self, x_TD: torch.Tensor, route: RouteResult) -> torch.Tensor:
        # Llama 4 scales the expert's INPUT by the routing weight (in x's dtype, as Hugging Face does).
        return ops.moe_permute(x_TD, route, route.topk_weights_TK)

    def experts(self, x_sorted_ND: torch.Tensor, route: RouteResult) -> torch.Tensor:
        sizes_E = route.tokens_per_expert_E
        h_N2F = self._expert_linear("gate_up", x_sorted_ND, sizes_E)
        return self._expert_linear("down", ops.swiglu(h_N2F), sizes_E)

    def combine(self, y_sorted_ND: torch.Tensor, route: RouteResult) -> torch.Tensor:
        return ops.moe_unpermute(y_sorted_ND, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with nvtx_range("llama4.moe"):
            x_TD = x.reshape(-1, self.d_model)
            logits_TE = self.router(x_TD)
            route = self._route_logits(logits_TE)
            self.last_route = route
            self.aux_loss = self._aux_loss(logits_TE, route) if self.aux_loss_coeff > 0 else None
            y_TD = self.combine(self.experts(self.dispatch(x_TD, route), route), route)
            if self.shared_expert is not None:
                y_TD = y_TD + self._shared(x_TD)
            return y_TD.view_as(x)

    # --- expert GEMMs: BF16 or FP8 base, plus the LoRA branch -----------------------------------
    def _expert_linear(self, which: str, x_MK: torch.Tensor, sizes_E: torch.Tensor) -> torch.Tensor:
        w_ENK = self.gate_up_ENK if which == "gate_up" else self.down_EDF
        if self.fp8_recipe is None:
            y_MN = grouped_linear(x_MK, w_ENK, sizes_E)
        else:
            qw = self._fp8_weights.get(which, (w_ENK,), self.fp8_recipe.granularity)
            y_MN = fp8_grouped_linear(x_MK, sizes_E, qw, self.fp8_recipe, w_ENK)
        if self.lora_rank:
            if x_MK.is_cuda and self.lora_rank % LORA_RANK_ALIGN_CUDA:
                raise ValueError(
                    f"MoE: lora_rank must be a multiple of {LORA_RANK_ALIGN_CUDA} on CUDA, got {self.lora_rank}"
                )
            a_ERK = self.lora_a_gate_up_ERD if which == "gate_up" else self.lora_a_down_ERF
            b_ENR = self.lora_b_gate_up_ENR if which == "gate_up" else self.lora_b_down_EDR
            low_MR = grouped_linear(x_MK, a_ERK, sizes_E)
            y_MN = y_MN + self.lora_scaling * grouped_linear(low_MR, b_ENR, sizes_E)
        return y_MN

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        se = self.shared_expert
        if self.fp8_recipe is None:
            return se(x_TD)
        # FP8: the shared expert is a grouped GEMM with one group of all T rows; gate and up are
        # quantised together (one [1, 2F, D] weight) and receive their gradients back as slices.
        sizes_1 = torch.full((1,), x_TD.shape[0], dtype=torch.int32, device=x_TD.device)
        gate_up = (se.gate_proj.weight[None], se.up_proj.weight[None])
        qw = self._fp8_weights.get("shared_gate_up", gate_up, self.fp8_recipe.granularity)
        h_T2F = fp8_grouped_linear(x_TD.contiguous(), sizes_1, qw, self.fp8_recipe, *gate_up)
        down = se.down_proj.weight[None]
        qw_down = self._fp8_weights.get("shared_down", (down,), self.fp8_recipe.granularity)
        return fp8_grouped_linear(ops.swiglu(h_T2F), sizes_1, qw_down, self.fp8_recipe, down)

    def invalidate_fp8_weights(self) -> None:
        """Drop the quantised weights: needed only after writing a parameter without bumping its version
        counter (through `.data`); in-place updates and optimizer steps are detected on their own."""
        self._fp8_weights.clear()

    # --- balancing and statistics ---------------------------------------------------------------
    def _aux_loss(self, logits_TE: torch.Tensor, route: RouteResult) -> torch.Tensor:
        """coeff * E * sum_e (n_e / (T*K)) * mean_t p[t, e]; p = normalised sigmoid (or softmax) of the
        logits in float32. 1 * coeff at perfect balance; the counts carry no gradient (Switch, DeepSeek)."""
        T, E = logits_TE.shape
        if self.score_func == "sigmoid":
            s_TE = torch.sigmoid(logits_TE.float())
            p_TE = s_TE / s_TE.sum(-1, keepdim=True)
        else:
            p_TE = torch.softmax(logits_TE.float(), dim=-1)
        f_E = route.tokens_per_expert_E.float() * (E / max(T * self.top_k, 1))
        return self.aux_loss_coeff * (f_E * p_TE.mean(0)).sum()

    def expert_load(self) -> torch.Tensor | None:
        """Tokens routed to each expert at the last forward (int32 [E]), or None."""
        return None if self.last_route is None else self.last_route.tokens_per_expert_E

    def load_stats(self) -> dict[str, torch.Tensor] | None:
        """The last forward's balance statistics, device tensors (reading them is the caller's sync):
        tokens_per_expert int32 [E]; load_fraction float32 [E] (sums to 1); max_load_ratio float32 []
        (busiest expert / mean load, 1 when balanced); aux_loss (when aux_loss_coeff > 0, detached)."""
        if self.last_route is None:
            return None
        counts_E = self.last_route.tokens_per_expert_E
        load_E = counts_E.float()
        total = load_E.sum().clamp_min(1.0)
        stats = {
            "tokens_per_expert": counts_E,
            "load_fraction": load_E / total,
            "max_load_ratio": load_E.max() * self.n_experts / total,
        }
        if self.aux_loss is not None:
            stats["aux_loss"] = self.aux_loss.detach()
        return stats


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, coeff: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing (sign rule): raise under-loaded experts, lower over-loaded
    ones by `coeff`, then re-centre to zero mean. In place, no host synchronisation."""
    load = tokens_per_expert_E.float()
    bias_E.add_(coeff * torch.sign(load.mean() - load))
    bias_E.sub_(bias_E.mean())
