"""Loads the compiled registry (`engine._C`, which defines every `torch.ops.llama4` schema and
its CPU/CUDA kernels) and adds what Python does best: fake (meta) kernels for torch.compile,
autograd formulas, and a logged CPU-kernel fallback for CUDA tensors when the build has no CUDA kernels.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("engine.ops")

try:
    from engine import _C
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        f"engine._C is not built: run `pip install -e .` (or `make test`) to compile the llama4 kernels ({exc})"
    ) from exc

ops = torch.ops.llama4


def build_info() -> dict:
    """Which kernels were compiled, for which arch, against which torch / CUDA / CUTLASS."""
    return dict(_C.build_info())


# --------------------------------------------------------------------------------------------
# Fallback: when this build has no CUDA kernels (torch without CUDA, or no nvcc at build time),
# an op called on CUDA tensors runs its C++ CPU kernel on host copies (outputs and in-place
# arguments are copied back), and says so once. Slow and synchronising, but never wrong.
# --------------------------------------------------------------------------------------------
_warned: set[str] = set()


def _log_fallback_once(op: str) -> None:
    if op not in _warned:
        _warned.add(op)
        log.warning("llama4::%s has no CUDA kernel in this build (built without CUDA); running its CPU kernel", op)


def _cpu_fallback(name: str):
    op = getattr(ops, name).default
    written = [
        i for i, arg in enumerate(op._schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write
    ]

    def impl(*args):
        _log_fallback_once(name)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        host = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        out = op(*host)
        for i in written:  # in-place arguments: copy the CPU result back into the caller's tensor
            args[i].copy_(host[i])
        return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, out)

    return impl


def _register_cuda_fallbacks() -> None:
    for name in _OP_NAMES:
        torch.library.impl(f"llama4::{name}", "CUDA")(_cpu_fallback(name))


_OP_NAMES = (
    "moe_route",
    "moe_permute",
    "moe_unpermute",
    "adamw8bit_step",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_fp8",
    "dequantize_fp8",
    "swiglu_quant",
    "swiglu",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "quantize_fp8_grouped",
    "sparse_attention_fwd",
    "sparse_attention_bwd",
    "sparse_attention_decode",
)
# llama4 ops defined in Python (torch.library.custom_op, engine/ops/norm.py) with Triton CUDA kernels that do not
# depend on this build: they need no fallback.
_PYTHON_OP_NAMES = ("rms_norm", "rms_norm_bwd", "rope_qk_norm", "rope_qk_norm_bwd")


if not build_info()["cuda"] and torch.cuda.is_available():  # pragma: no cover
    _register_cuda_fallbacks()


# --------------------------------------------------------------------------------------------
# Fake kernels: shapes only (the C++ kernels validate values and raise the detailed errors).
# --------------------------------------------------------------------------------------------


@torch.library.register_fake("llama4::moe_route")
def _moe_route_fake(logits, top_k, score_func="sigmoid", expert_bias=None, renormalize=False):
    torch._check(logits.dim() == 2, lambda: f"moe_route: router_logits must be 2-D [T, E], got {logits.dim()}-D")
    T, E = logits.shape
    torch._check(1 <= top_k <= E, lambda: f"moe_route: top_k must be in [1, E={E}], got {top_k}")
    weights = logits.new_empty((T, top_k), dtype=torch.float32)
    ids = logits.new_empty((T, top_k), dtype=torch.int32)
    counts = logits.new_empty((E,), dtype=torch.int32)
    offsets = logits.new_empty((E + 1,), dtype=torch.int32)
    sorted_slots = logits.new_empty((T * top_k,), dtype=torch.int32)
    positions = logits.new_empty((T, top_k), dtype=torch.int32)
    return weights, ids, counts, offsets, sorted_slots, positions


@torch.library.register_fake("llama4::moe_permute")
def _moe_permute_fake(x, sorted_slots, slot_positions, topk_weights=None):
    torch._check(x.dim() == 2, lambda: f"moe_permute: x must be 2-D [T, D], got {x.dim()}-D")
    return x.new_empty((sorted_slots.shape[0], x.shape[1]))


@torch.library.register_fake("llama4::moe_unpermute")
def _moe_unpermute_fake(y, sorted_slots, slot_positions, topk_weights=None):
    torch._check(y.dim() == 2, lambda: f"moe_unpermute: y must be 2-D [T*K, D], got {y.dim()}-D")
    return y.new_empty((slot_positions.shape[0], y.shape[1]))


# --------------------------------------------------------------------------------------------
# Autograd. Only the routing weights are differentiable (ids, counts and orders are integers).
# --------------------------------------------------------------------------------------------
def _route_setup(ctx, inputs, output):
    logits, _top_k, score_func, _expert_bias, renormalize = inputs
    ctx.score_func = score_func
    ctx.renormalize = renormalize
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(logits, output[0], output[1])


def _route_backward(ctx, g_weights, *unused):
    logits, weights_TK, ids_TK = ctx.saved_tensors
    return (
        route_weights_backward(g_weights, logits, weights_TK, ids_TK, ctx.score_func, ctx.renormalize).to(
            ctx.logits_dtype
        ),
        None,
        None,
        None,
        None,
    )


def route_weights_backward(g_TK, logits_TE, weights_TK, ids_TK, score_func: str, renormalize: bool):
    """d loss / d logits [T, E] float32 from d loss / d topk_weights [T, K] (maths in float32)."""
    g_TK = g_TK.float()
    ids_TK = ids_TK.long()
    if renormalize:
        # w = u / sum(u): du = (g - sum(g * w)) / sum(u); recover u from the unnormalised score.
        if score_func == "sigmoid":
            u_TK = torch.sigmoid(torch.gather(logits_TE.float(), 1, ids_TK))
        else:
            u_TK = torch.gather(torch.softmax(logits_TE.float(), dim=-1), 1, ids_TK)
        denom_T1 = u_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        g_TK = (g_TK - (g_TK * weights_TK).sum(-1, keepdim=True)) / denom_T1
        weights_TK = u_TK
    if score_func == "sigmoid":
        g_sel_TK = g_TK * weights_TK * (1.0 - weights_TK)
        return torch.zeros_like(logits_TE, dtype=torch.float32).scatter_(1, ids_TK, g_sel_TK)
    p_TE = torch.softmax(logits_TE.float(), dim=-1)
    g_TE = torch.zeros_like(p_TE).scatter_(1, ids_TK, g_TK)
    return p_TE * (g_TE - (g_TE * p_TE).sum(-1, keepdim=True))


torch.library.register_autograd("llama4::moe_route", _route_backward, setup_context=_route_setup)


def _rows_setup(ctx, inputs, output):
    x, sorted_slots, slot_positions, topk_weights = inputs
    ctx.has_weights = topk_weights is not None
    ctx.save_for_backward(x, sorted_slots, slot_positions, topk_weights)


def _slot_weight_grad(rows_a_ND, rows_b_TD, slot_positions_TK):
    """d w[t, k] = <a[slot_positions[t, k]], b[t]> in float32, [T, K]."""
    T, K = slot_positions_TK.shape
    a_TKD = rows_a_ND.float()[slot_positions_TK.reshape(-1).long()].view(T, K, -1)
    return (a_TKD * rows_b_TD.float().unsqueeze(1)).sum(-1)


def _permute_backward(ctx, g_ND):
    g_ND = g_ND.contiguous()  # autograd may hand an expanded (stride-0) gradient
    x_TD, sorted_slots, slot_positions, w_TK = ctx.saved_tensors
    dx = ops.moe_unpermute(g_ND, sorted_slots, slot_positions, w_TK) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.has_weights and ctx.needs_input_grad[3]:
        dw = _slot_weight_grad(g_ND, x_TD, slot_positions)
    return dx, None, None, dw


def _unpermute_backward(ctx, g_TD):
    g_TD = g_TD.contiguous()  # autograd may hand an expanded (stride-0) gradient
    y_ND, sorted_slots, slot_positions, w_TK = ctx.saved_tensors
    dy = ops.moe_permute(g_TD, sorted_slots, slot_positions, w_TK) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.has_weights and ctx.needs_input_grad[3]:
        dw = _slot_weight_grad(y_ND, g_TD, slot_positions)
    return dy, None, None, dw


torch.library.register_autograd("llama4::moe_permute", _permute_backward, setup_context=_rows_setup)
torch.library.register_autograd("llama4::moe_unpermute", _unpermute_backward, setup_context=_rows_setup)
