"""The FP8 training recipe of the grouped expert GEMMs: a differentiable FP8 grouped linear (forward,
dgrad and wgrad), weight quantisation (per channel or per 128x128 block, transposed copies for dgrad)
and the sync-free grouped weight gradient. Composed from engine.ops; no new kernel lives here.
Legend: M rows sorted by expert, K depth (input width), N outputs, E experts, G = ceil(K/128).

Recipe (DeepSeek-V3 / DeepGEMM style): activations and output gradients are quantised per row or
per 1x128 block, weights per channel or per 128x128 block, all e4m3 on the kernel (e5m2 gradients
run an emulated path, see Fp8Recipe); every GEMM accumulates in float32.
  forward  y = x @ W_e^T          x per row / 1x128,  W_e per channel / 128x128
  dgrad    dx = dy @ W_e          dy per row / 1x128, W_e^T per channel / 128x128 (a copy made once
                                  per weight update; with 128x128 blocks the transpose of the codes and
                                  of the scale grid IS the quantised transpose, no requantisation)
  wgrad    dW_e = dy_e^T @ x_e    contraction over the expert's rows, so dy and x are quantised per
                                  (expert, channel) over those rows (fp8_wgrad), or stay BF16.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.ops import reference
from engine.ops.fp8 import FP8_BLOCK, dequantize_fp8, quantize_fp8
from engine.ops.grouped_gemm import grouped_gemm, grouped_gemm_wgrad, quantize_fp8_grouped

log = logging.getLogger("engine.ops.fp8_training")

FP8_E4M3 = torch.float8_e4m3fn
FP8_E5M2 = torch.float8_e5m2
FP8_AMAX_FLOOR = reference.FP8_AMAX_FLOOR  # an all-zero group dequantises to 0, never NaN
RECIPE_GRANULARITIES = ("row", "block128")

_warned: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@dataclass(frozen=True)
class Fp8Recipe:
    """How the FP8 MoE layer quantises.

    granularity: "block128" (activations and gradients per 1x128 block, weights per 128x128 block)
      or "row" (activations and gradients per row, weights per output channel). The grouped GEMM
      pairs the two this way, so one knob sets both.
    grad_dtype: float8_e4m3fn (default, on the FP8 kernels) or float8_e5m2 (more range, less
      precision). The grouped GEMM kernel takes e4m3 only, so e5m2 gradients are quantised to e5m2,
      dequantised and multiplied by the BF16 (float32 on CPU) kernels: the numerics of e5m2
      gradients, not their speed (logged once).
    fp8_wgrad: weight gradients from FP8 operands quantised per (expert, channel) with float32
      accumulation; False keeps the weight gradient in BF16 (float32 on CPU).
    """

    granularity: str = "block128"
    grad_dtype: torch.dtype = FP8_E4M3
    fp8_wgrad: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in RECIPE_GRANULARITIES:
            raise ValueError(f"Fp8Recipe: granularity must be one of {RECIPE_GRANULARITIES}, got {self.granularity!r}")
        if self.grad_dtype not in (FP8_E4M3, FP8_E5M2):
            raise ValueError(f"Fp8Recipe: grad_dtype must be float8_e4m3fn or float8_e5m2, got {self.grad_dtype}")


# --------------------------------------------------------------------------------------------
# Weights: quantised once per update, with the transposed copy dgrad needs.
# --------------------------------------------------------------------------------------------
def quantize_weight_fp8(w_ENK: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] -> (w_fp8 e4m3 [E, N, K], scale float32).

    "row": one scale per expert and output channel, [E, N] (what grouped_gemm pairs with per-row x).
    "block128": one scale per 128x128 block, [E, ceil(N/128), ceil(K/128)] (partial edge blocks).
    scale = max(amax, 1e-12) / 448 and codes = saturate(w / scale), as quantize_fp8.
    """
    if granularity not in RECIPE_GRANULARITIES:
        raise ValueError(f"quantize_weight_fp8: granularity must be one of {RECIPE_GRANULARITIES}, got {granularity!r}")
    if w_ENK.dim() != 3:
        raise ValueError(f"quantize_weight_fp8: w must be 3-D [E, N, K], got shape {tuple(w_ENK.shape)}")
    E, N, K = w_ENK.shape
    if granularity == "row":
        w_fp8, scale = quantize_fp8(w_ENK.reshape(E * N, K).contiguous(), granularity="row", fp8_dtype=FP8_E4M3)
        return w_fp8.view(E, N, K), scale.view(E, N)
    # 128x128 blocks: pad to whole blocks (zeros never raise an amax), reduce and divide in float32
    # through a [Nb, 128, Kb, 128] view (no per-element scale tensor). One expert at a time bounds the
    # float32 temporaries to one expert's weight (Scout's gate_up is 1.3 G elements in all).
    Nb, Kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    fp8_max = torch.finfo(FP8_E4M3).max
    w_fp8 = torch.empty(E, N, K, dtype=FP8_E4M3, device=w_ENK.device)
    scale = torch.empty(E, Nb, Kb, dtype=torch.float32, device=w_ENK.device)
    for e in range(E):
        w_blocks = torch.nn.functional.pad(w_ENK[e].float(), (0, Kb * FP8_BLOCK - K, 0, Nb * FP8_BLOCK - N))
        w_blocks = w_blocks.view(Nb, FP8_BLOCK, Kb, FP8_BLOCK)
        scale[e] = w_blocks.abs().amax(dim=(1, 3)).clamp_min(FP8_AMAX_FLOOR) / fp8_max
        codes = (w_blocks / scale[e][:, None, :, None]).clamp(-fp8_max, fp8_max).to(FP8_E4M3)
        w_fp8[e] = codes.view(Nb * FP8_BLOCK, Kb * FP8_BLOCK)[:N, :K]
    return w_fp8, scale


@dataclass
class Fp8Weight:
    """A weight [E, N, K] quantised for the forward (w, scale) and for dgrad (wt = W^T [E, K, N], wt_scale)."""

    w_fp8: torch.Tensor
    scale: torch.Tensor
    wt_fp8: torch.Tensor
    wt_scale: torch.Tensor


@torch.no_grad()
def make_fp8_weight(w_ENK: torch.Tensor, granularity: str) -> Fp8Weight:
    """Quantise w for the forward and build the transposed copy for dgrad (once per weight update).

    128x128 blocks: the transposed codes with the transposed scale grid are exactly the quantised
    transpose (a block's amax does not care about orientation). Per channel: the scales of W^T run
    along K, so W^T is quantised afresh from the high-precision weight.
    """
    w_fp8, scale = quantize_weight_fp8(w_ENK, granularity)
    if granularity == "block128":
        wt_fp8, wt_scale = w_fp8.transpose(1, 2).contiguous(), scale.transpose(1, 2).contiguous()
    else:
        wt_fp8, wt_scale = quantize_weight_fp8(w_ENK.transpose(1, 2).contiguous(), granularity)
    return Fp8Weight(w_fp8, scale, wt_fp8, wt_scale)


class Fp8WeightCache:
    """Fp8Weight per name, rebuilt only when a source parameter changed: its storage (data_ptr) or
    its version counter (bumped by every in-place update, an optimizer step included). The check is
    on the host, so a cache hit costs no device work and no synchronisation.

    While a CUDA graph is being captured the weights are always quantised afresh (and not cached):
    a captured step that also contains the optimizer must requantise the updated weights at every
    replay, which a host-side cache hit at capture time would silently skip.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Fp8Weight]] = {}

    def get(self, name: str, parts: tuple[torch.Tensor, ...], granularity: str) -> Fp8Weight:
        capturing = parts[0].is_cuda and torch.cuda.is_current_stream_capturing()
        key = (granularity, *((p.data_ptr(), p._version, tuple(p.shape), p.dtype) for p in parts))
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key and not capturing:
            return hit[1]
        with torch.no_grad():
            w_ENK = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            entry = make_fp8_weight(w_ENK.detach(), granularity)
        if not capturing:
            self._entries[name] = (key, entry)
        return entry

    def clear(self) -> None:
        self._entries.clear()


# --------------------------------------------------------------------------------------------
# Per-(expert, channel) quantisation for wgrad, and the grouped weight gradient.
# --------------------------------------------------------------------------------------------
WGRAD_CUDA_ALIGN = 8  # BF16 elements per 16-byte TMA row


def grouped_wgrad(dy_MN: torch.Tensor, x_MK: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """dW_ENK[e] = dy[rows of e]^T @ x[rows of e], float32 (float64 for float64 inputs): the
    grouped_gemm_wgrad kernel (K-grouped GEMM, group sizes stay on the device, deterministic, an
    expert with no rows gets exactly zero). float64 runs reference.grouped_gemm_wgrad (the gradcheck path)."""
    if dy_MN.dtype == torch.float64:
        return reference.grouped_gemm_wgrad(dy_MN, x_MK, group_sizes_E)
    if dy_MN.is_cuda and (dy_MN.shape[1] % WGRAD_CUDA_ALIGN or x_MK.shape[1] % WGRAD_CUDA_ALIGN):
        # The kernel's TMA rows need 16 bytes (8 BF16 elements); other widths take the per-expert loop of the
        # reference (float64 maths, so the BF16 operands are not rounded through a BF16 matmul output).
        _log_once(
            "wgrad_align", f"grouped_wgrad: N, K not multiples of {WGRAD_CUDA_ALIGN}: per-expert loop (host sync)"
        )
        return reference.grouped_gemm_wgrad(dy_MN, x_MK, group_sizes_E).float()
    return grouped_gemm_wgrad(dy_MN.contiguous(), x_MK.contiguous(), group_sizes_E, out_dtype=torch.float32)


def quantize_per_expert_channel(
    x_MK: torch.Tensor, group_sizes_E: torch.Tensor, fp8_dtype: torch.dtype = FP8_E4M3
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K], scale float32 [E, K]): one scale per expert and column over the
    expert's rows, the grouping of a contraction over rows (wgrad): quantize_fp8_grouped."""
    return quantize_fp8_grouped(x_MK, group_sizes_E, fp8_dtype=fp8_dtype)


def grouped_wgrad_fp8(
    dy_fp8_MN: torch.Tensor,
    dy_scale_EN: torch.Tensor,
    x_fp8_MK: torch.Tensor,
    x_scale_EK: torch.Tensor,
    group_sizes_E: torch.Tensor,
) -> torch.Tensor:
    """dW_ENK[e] = diag(dy_scale[e]) (dy_fp8[rows of e]^T @ x_fp8[rows of e]) diag(x_scale[e]), float32.

    e4m3 operands run the FP8 wgrad kernel. e5m2 gradients (the kernel takes e4m3 only): the codes
    are cast to BF16 (float32 on CPU; exact, an fp8 value has at most 4 significant bits), multiplied
    by the BF16 wgrad kernel with float32 accumulation, and the scales applied after: the same maths.
    """
    if dy_fp8_MN.dtype == FP8_E4M3 and x_fp8_MK.dtype == FP8_E4M3:
        return grouped_gemm_wgrad(
            dy_fp8_MN, x_fp8_MK, group_sizes_E, dy_scale=dy_scale_EN, x_scale=x_scale_EK, out_dtype=torch.float32
        )
    _log_once("wgrad_e5m2", "grouped_wgrad_fp8: e5m2 operands run the BF16 wgrad kernel on their codes (same maths)")
    codes = torch.bfloat16 if dy_fp8_MN.is_cuda else torch.float32
    acc_ENK = grouped_wgrad(dy_fp8_MN.to(codes), x_fp8_MK.to(codes), group_sizes_E)
    return acc_ENK * dy_scale_EN[:, :, None] * x_scale_EK[:, None, :]


# --------------------------------------------------------------------------------------------
# The differentiable FP8 grouped linear.
# --------------------------------------------------------------------------------------------
def _dgrad_emulated(dy_MN, qw: Fp8Weight, group_sizes_E, recipe: Fp8Recipe, out_dtype) -> torch.Tensor:
    """dgrad with gradients in e5m2: quantise dy to e5m2, dequantise both operands and run the
    high-precision grouped GEMM (the kernel takes e4m3 only)."""
    _log_once("e5m2", "Fp8Recipe(grad_dtype=float8_e5m2): dgrad runs emulated (dequantised operands, BF16 GEMM)")
    gran = recipe.granularity  # activations and gradients: "row" or "block128" (1x128)
    compute = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
    dy_fp8, dy_scale = quantize_fp8(dy_MN, granularity=gran, fp8_dtype=recipe.grad_dtype)
    dy_deq = dequantize_fp8(dy_fp8, dy_scale, granularity=gran, out_dtype=compute)
    _, K, N = qw.wt_fp8.shape
    if gran == "row":
        wt = qw.wt_fp8.float() * qw.wt_scale[:, :, None]
    else:
        per_element = qw.wt_scale.repeat_interleave(FP8_BLOCK, 1).repeat_interleave(FP8_BLOCK, 2)[:, :K, :N]
        wt = qw.wt_fp8.float() * per_element
    return grouped_gemm(dy_deq, wt.to(compute).contiguous(), group_sizes_E, out_dtype=out_dtype)


class _Fp8GroupedLinear(torch.autograd.Function):
    """y_MN = x_MK @ W_e^T per group with FP8 operands (see the module docstring for the recipe).

    w_parts: the high-precision weights whose concatenation along N is W [E, N, K]: the source of the
    quantised Fp8Weight (built outside, once per update) and the receivers of the weight gradients.
    """

    @staticmethod
    def forward(ctx, x_MK, group_sizes_E, qw: Fp8Weight, recipe: Fp8Recipe, *w_parts):
        out_dtype = torch.float32 if x_MK.dtype == torch.float32 else torch.bfloat16
        gran = recipe.granularity  # activations and gradients: "row" or "block128" (1x128)
        x_fp8, x_scale = quantize_fp8(x_MK, granularity=gran, fp8_dtype=FP8_E4M3)
        y_MN = grouped_gemm(x_fp8, qw.w_fp8, group_sizes_E, x_scale=x_scale, w_scale=qw.scale, out_dtype=out_dtype)
        ctx.recipe = recipe
        ctx.qw = qw  # quantised once per update and shared by every call: not a per-call saved tensor
        ctx.part_rows = [p.shape[1] for p in w_parts]
        ctx.part_dtypes = [p.dtype for p in w_parts]
        ctx.save_for_backward(x_MK, group_sizes_E)
        return y_MN.to(x_MK.dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, group_sizes_E = ctx.saved_tensors
        recipe: Fp8Recipe = ctx.recipe
        qw: Fp8Weight = ctx.qw
        dy_MN = dy_MN.contiguous()
        gran = recipe.granularity  # activations and gradients: "row" or "block128" (1x128)
        out_dtype = torch.float32 if x_MK.dtype == torch.float32 else torch.bfloat16
        dx = None
        if ctx.needs_input_grad[0]:
            if recipe.grad_dtype == FP8_E4M3:
                dy_fp8, dy_scale = quantize_fp8(dy_MN, granularity=gran, fp8_dtype=FP8_E4M3)
                dx = grouped_gemm(
                    dy_fp8, qw.wt_fp8, group_sizes_E, x_scale=dy_scale, w_scale=qw.wt_scale, out_dtype=out_dtype
                )
            else:
                dx = _dgrad_emulated(dy_MN, qw, group_sizes_E, recipe, out_dtype)
            dx = dx.to(x_MK.dtype)
        dws = [None] * len(ctx.part_rows)
        if any(ctx.needs_input_grad[4:]):
            if recipe.fp8_wgrad:
                dy_q, dy_s = quantize_per_expert_channel(dy_MN, group_sizes_E, recipe.grad_dtype)
                x_q, x_s = quantize_per_expert_channel(x_MK, group_sizes_E, FP8_E4M3)
                dw_ENK = grouped_wgrad_fp8(dy_q, dy_s, x_q, x_s, group_sizes_E)
            else:
                dw_ENK = grouped_wgrad(dy_MN, x_MK, group_sizes_E)
            chunks = torch.split(dw_ENK, ctx.part_rows, dim=1)
            dws = [
                c.to(dt) if need else None
                for c, dt, need in zip(chunks, ctx.part_dtypes, ctx.needs_input_grad[4:], strict=True)
            ]
        return (dx, None, None, None, *dws)


def fp8_grouped_linear(
    x_MK: torch.Tensor,
    group_sizes_E: torch.Tensor,
    qw: Fp8Weight,
    recipe: Fp8Recipe,
    *w_parts: torch.Tensor,
) -> torch.Tensor:
    """Differentiable FP8 grouped linear: rows of expert e times W[e]^T, W = cat(w_parts, dim=1) [E, N, K]
    quantised as `qw` (make_fp8_weight / Fp8WeightCache). x [M, K] bfloat16 (float32 on CPU); returns
    [M, N] in x's dtype. Gradients: x (dgrad, FP8) and each of w_parts that requires grad (wgrad)."""
    return _Fp8GroupedLinear.apply(x_MK, group_sizes_E, qw, recipe, *w_parts)
