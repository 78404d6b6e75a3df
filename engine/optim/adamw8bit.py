"""AdamW with 8-bit blockwise-quantised state in one fused kernel per parameter tensor.

Each moment is stored as one uint8 code per element plus one float32 absmax per block of
`block_size` elements: (2 + 8 / block_size) bytes of state per parameter (2.03 at 256) instead of
8. The codes index a non-linear "dynamic" map (engine.ops.dynamic_qmap): signed for the first
moment, unsigned for the second, so small values keep relative precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine.ops import dynamic_qmap
from engine.ops._library import ops
from engine.profiling import nvtx_range

STATE_DTYPES = ("dynamic8", "fp32")
SUPPORTED_BLOCK_SIZES = (128, 256, 512)
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16)
_SEED_BITS = 62


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW with 8-bit state (decoupled weight decay, bias correction, same defaults
    except weight_decay=0.01 as torch's AdamW).

    params: float32 or bfloat16 tensors. bfloat16 parameters are updated in float32 and written
    back with *stochastic rounding* (a counter-based hash of seed, step and element index, so it
    is reproducible and resumable): an update smaller than half a bf16 ulp then still moves the
    parameter in expectation, without the 4 bytes per parameter an fp32 master copy would cost
    (which would double the memory the 8-bit state saves).

    Tensors with fewer than `min_8bit_size` elements keep float32 state (norms, biases, the
    router: tiny, and the most sensitive). `state_dtype="fp32"` keeps every state in float32
    (same fused kernel; useful as a control).

    Non-finite gradients propagate as in torch.optim.AdamW: the element's parameter becomes NaN;
    with 8-bit state the block's absmax becomes non-finite, so all `block_size` elements of that
    block are poisoned from the next step on. Skip such steps upstream (dynamic loss scaling).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        state_dtype: str = "dynamic8",
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"AdamW8bit: invalid learning rate lr={lr} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW8bit: invalid betas={betas} (each must be in [0, 1))")
        if not eps >= 0.0:
            raise ValueError(f"AdamW8bit: invalid eps={eps} (must be >= 0)")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW8bit: invalid weight_decay={weight_decay} (must be >= 0)")
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"AdamW8bit: block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"AdamW8bit: state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
        if min_8bit_size < 0:
            raise ValueError(f"AdamW8bit: min_8bit_size must be >= 0, got {min_8bit_size}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self.state_dtype = state_dtype
        for group in self.param_groups:
            for p in group["params"]:
                _check_param(p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            _check_param(p)

    def uses_8bit_state(self, p: torch.Tensor) -> bool:
        return self.state_dtype == "dynamic8" and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        n = p.numel()
        state: dict[str, Any] = {"step": 0}
        # A CPU draw: reproducible under torch.manual_seed, no device sync.
        state["seed"] = int(torch.randint(0, 2**_SEED_BITS, (1,)).item())
        if self.uses_8bit_state(p):
            blocks = -(-n // self.block_size)
            zero_code_s = int(torch.argmin(dynamic_qmap(True).abs()))
            state["exp_avg"] = torch.full((n,), zero_code_s, dtype=torch.uint8, device=p.device)
            state["exp_avg_sq"] = torch.zeros((n,), dtype=torch.uint8, device=p.device)  # code 0 is 0.0
            state["absmax_exp_avg"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["absmax_exp_avg_sq"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with nvtx_range("llama4.adamw8bit_step"):
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if grad.is_sparse:
                        raise RuntimeError("AdamW8bit does not support sparse gradients")
                    if not p.is_contiguous():
                        raise ValueError("AdamW8bit: parameters must be contiguous (got a strided view)")
                    state = self.state[p]
                    if not state:
                        state.update(self._init_state(p))
                    state["step"] += 1
                    empty = state["exp_avg"].new_empty(0, dtype=torch.float32)
                    quantized = state["exp_avg"].dtype == torch.uint8
                    ops.adamw8bit_step(
                        p,
                        grad if grad.is_contiguous() else grad.contiguous(),
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        state["absmax_exp_avg"] if quantized else empty,
                        state["absmax_exp_avg_sq"] if quantized else empty,
                        dynamic_qmap(True, p.device),
                        dynamic_qmap(False, p.device),
                        state["step"],
                        float(group["lr"]),
                        float(beta1),
                        float(beta2),
                        float(group["eps"]),
                        float(group["weight_decay"]),
                        self.block_size,
                        state["seed"],
                    )
        return loss

    def state_bytes(self) -> int:
        """Bytes held by all optimizer state tensors."""
        return sum(
            v.numel() * v.element_size() for state in self.state.values() for v in state.values() if torch.is_tensor(v)
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim casts floating state to each parameter's dtype (absmax and float32 moments to
        # bf16 for bf16 params): restore every state tensor exactly as saved, on the param's device.
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"], strict=True):
            for p, index in zip(group["params"], saved_group["params"], strict=True):
                if index in saved_state:
                    self.state[p] = {
                        k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                        for k, v in saved_state[index].items()
                    }


def _check_param(p: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"AdamW8bit: params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError("AdamW8bit: complex parameters are not supported (view them as real first)")
    if not p.is_floating_point():
        raise TypeError(f"AdamW8bit: parameters must be floating point, got {p.dtype}")
    if p.dtype not in SUPPORTED_PARAM_DTYPES:
        raise TypeError(
            f"AdamW8bit: parameters must be float32 or bfloat16, got {p.dtype} "
            "(float16 parameters would need an fp32 master copy)"
        )
