"""Training: one step = forward (final hidden states), chunked cross-entropy, backward of the scaled loss,
overflow check + unscale + gradient clipping in one pass, AdamW8bit, auxiliary-loss-free expert-bias
updates; plus deterministic batches of a token stream, checkpoint / resume and MFU arithmetic.
Legend: B batch, S sequence, T = B*S tokens, L MoE layers, E experts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.moe import MoE, SwiGLU, update_expert_bias
from engine.ops.fp8_training import Fp8Recipe, Fp8WeightCache, fp8_grouped_linear
from engine.ops.loss import IGNORE_INDEX, chunked_cross_entropy
from engine.optim import AdamW8bit
from engine.profiling import nvtx_range

__all__ = [
    "DynamicLossScaler",
    "Fp8Linear",
    "PrecisionUnavailable",
    "StepStats",
    "TokenStream",
    "TrainConfig",
    "Trainer",
    "build_model",
    "mfu",
    "peak_tflops",
]

log = logging.getLogger("engine.train")

TRAINER_STATE_FILE = "trainer_state.pt"
# Dense tensor-core peaks (TFLOP/s, no sparsity) by device-name substring, checked in order: MFU is
# achieved model FLOP/s over these. FP8 peaks are twice the BF16 ones on Hopper.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H20", 148.0))


class PrecisionUnavailable(RuntimeError):
    """The requested training precision is not built into this engine yet."""


def build_model(config, *, precision: str = "bf16", dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """Llama4ForCausalLM for training: bf16 on a GPU, float32 on the CPU (the reference mode of the kernels).

    precision="fp8": the MoE layers (routed experts and shared expert) run engine.moe.MoE's FP8 training
    recipe (dynamic per-row / 128-block activation scales, per-channel / 128x128-block weight scales,
    float32 accumulation) on high-precision master weights, and so do the attention projections and the
    dense MLPs (Fp8Linear); the router, the norms and the lm_head (the loss) stay in high precision.
    Raises PrecisionUnavailable, with the reason, when this build's MoE has no such path.
    (Llama4ForCausalLM(precision="fp8") itself is the inference layout: frozen FP8 expert buffers.)
    """
    from engine.model import Llama4ForCausalLM

    if precision not in ("bf16", "fp8"):
        raise ValueError(f"build_model: precision must be 'bf16' or 'fp8', got {precision!r}")
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = Llama4ForCausalLM(config, dtype=dtype, device=device)
    if precision == "bf16":
        return model
    for layer in model.layers:
        ff = layer.feed_forward
        if not isinstance(ff, MoE):
            continue
        try:
            fp8 = MoE(
                ff.d_model,
                ff.d_ff,
                ff.n_experts,
                ff.top_k,
                shared_expert=ff.shared_expert is not None,
                score_func=ff.score_func,
                precision="fp8",
                dtype=dtype,
                device=device,
            )
        except (NotImplementedError, ValueError, TypeError) as exc:
            raise PrecisionUnavailable(f"precision='fp8' training is not available in this build: {exc}") from exc
        fp8.load_state_dict(ff.state_dict())
        layer.feed_forward = fp8
    recipe = model.moe_layers()[0].fp8_recipe if model.moe_layers() else Fp8Recipe()
    for layer in model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, Fp8Linear.from_linear(getattr(attn, name), recipe))
        if isinstance(layer.feed_forward, SwiGLU):  # Maverick's dense layers
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.feed_forward, name, Fp8Linear.from_linear(getattr(layer.feed_forward, name), recipe))
    return model


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) whose three GEMMs run the FP8 recipe of engine.ops.fp8_training: the input and
    the output gradient quantised dynamically per row / 1x128 block, the weight per channel / 128x128 block
    (once per weight update, cached), float32 accumulation; the weight stays the high-precision master.
    One group of all T rows through the FP8 grouped GEMM."""

    recipe: Fp8Recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe) -> Fp8Linear:
        if linear.bias is not None:
            raise ValueError("Fp8Linear: linear layers with a bias are not supported (Llama 4 has none)")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.weight = linear.weight  # the same Parameter: optimizer state and checkpoints are unchanged
        out.register_parameter("bias", None)
        out.recipe = recipe
        out._fp8_weights = Fp8WeightCache()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TK = x.reshape(-1, self.in_features).contiguous()
        sizes_1 = torch.full((1,), x_TK.shape[0], dtype=torch.int32, device=x.device)
        w_1NK = self.weight[None]
        qw = self._fp8_weights.get("weight", (w_1NK,), self.recipe.granularity)
        y_TN = fp8_grouped_linear(x_TK, sizes_1, qw, self.recipe, w_1NK)
        return y_TN.view(*x.shape[:-1], self.out_features)


# --------------------------------------------------------------------------------------------
# Dynamic loss scaling
# --------------------------------------------------------------------------------------------
class DynamicLossScaler:
    """Multiply the loss by `scale` before backward; a step whose gradients overflow (any non-finite
    value) is skipped and the scale multiplied by `backoff` (halved); after `growth_interval` clean steps
    in a row it is multiplied by `growth` (doubled), up to `max_scale`. enabled=False keeps the scale at
    1 but still skips non-finite steps (8-bit optimizer state must never see a NaN: it poisons a block)."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        growth: float = 2.0,
        backoff: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        enabled: bool = True,
    ) -> None:
        if not (growth > 1.0 and 0.0 < backoff < 1.0):
            raise ValueError(f"DynamicLossScaler: need growth > 1 and 0 < backoff < 1, got {growth}, {backoff}")
        if growth_interval < 1:
            raise ValueError(f"DynamicLossScaler: growth_interval must be >= 1, got {growth_interval}")
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval
        self.min_scale, self.max_scale = min_scale, max_scale
        self.clean_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        """After each step: found_inf skips (halve the scale), else count towards growth."""
        if found_inf:
            self.skipped_steps += 1
            self.clean_steps = 0
            if self.enabled:
                self.scale = max(self.min_scale, self.scale * self.backoff)
            return
        self.clean_steps += 1
        if self.enabled and self.clean_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * self.growth)
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps, self.skipped_steps = state["scale"], state["clean_steps"], state["skipped_steps"]


@torch.no_grad()
def unscale_and_clip_(
    grads: list[torch.Tensor], scale: float, max_norm: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global L2 norm of the *scaled* gradients (float32, on the device) and the factor that unscales and
    clips them: min(1, max_norm / (norm / scale)) / scale. The norm is non-finite iff some gradient is
    (or the sum of squares overflows: also a step to skip). No host synchronisation."""
    if not grads:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, torch.ones((), dtype=torch.float32)
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    unscaled = total / scale
    factor = torch.ones_like(total) / scale
    if max_norm is not None and max_norm > 0:
        factor = factor * torch.clamp(max_norm / (unscaled + 1e-6), max=1.0)
    return unscaled, factor


# --------------------------------------------------------------------------------------------
# Data: deterministic batches from one token stream
# --------------------------------------------------------------------------------------------
class TokenStream:
    """A 1-D int64 token stream; batch(step) cuts B random windows of S + 1 tokens, the offsets drawn from
    a generator seeded by (seed, step): the batch of a step never depends on what ran before (resume)."""

    def __init__(self, tokens: torch.Tensor, *, seed: int = 0) -> None:
        if tokens.dim() != 1 or tokens.numel() < 2:
            raise ValueError(f"TokenStream: tokens must be 1-D with >= 2 tokens, got shape {tuple(tokens.shape)}")
        self.tokens = tokens.to(torch.int64)
        self.seed = seed

    def __len__(self) -> int:
        return self.tokens.numel()

    def batch(self, step: int, batch_size: int, seq_len: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids_BS, labels_BS): labels are the inputs shifted by one."""
        if seq_len + 1 > len(self):
            raise ValueError(f"TokenStream: seq_len {seq_len} needs > {seq_len} tokens, the stream has {len(self)}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts_B = torch.randint(0, len(self) - seq_len, (batch_size,), generator=gen)
        window_BS = self.tokens[starts_B[:, None] + torch.arange(seq_len + 1)]
        return window_BS[:, :-1].to(device), window_BS[:, 1:].to(device)

    def split(self, holdout: float = 0.05) -> tuple[TokenStream, TokenStream]:
        """(train, validation): the last `holdout` fraction of the stream is held out."""
        cut = int(len(self) * (1 - holdout))
        return TokenStream(self.tokens[:cut], seed=self.seed), TokenStream(self.tokens[cut:], seed=self.seed + 1)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at total_steps (None total: constant)
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    loss_scale: bool = True  # dynamic loss scaling (else scale 1; non-finite steps are still skipped)
    init_loss_scale: float = 2.0**16
    loss_scale_growth_interval: int = 1000
    expert_bias_coeff: float = 1e-3  # auxiliary-loss-free balancing step; 0 turns the updates off
    activation_checkpointing: bool = False
    loss_chunk_size: int | None = None
    min_8bit_size: int = 4096

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine (or constant)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.total_steps or self.total_steps <= self.warmup_steps:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class StepStats:
    step: int  # steps taken so far, this one included (skipped ones too)
    loss: float  # unscaled mean loss
    grad_norm: float  # global gradient norm before clipping (inf / nan on overflow)
    skipped: bool
    loss_scale: float  # the scale this step used
    lr: float
    tokens: int
    seconds: float
    expert_load: torch.Tensor | None = field(default=None, repr=False)  # int64 [L, E] tokens per expert (CPU)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def load_imbalance(self) -> float:
        """Mean over MoE layers of max(load) / mean(load): 1 is perfectly balanced."""
        if self.expert_load is None or self.expert_load.numel() == 0:
            return float("nan")
        load = self.expert_load.double()
        return (load.amax(1) / load.mean(1).clamp_min(1e-12)).mean().item()


def shift_labels(input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Next-token labels of a batch: labels[:, t] = ids[:, t + 1], the last position ignored."""
    labels_BS = torch.full_like(input_ids_BS, IGNORE_INDEX)
    labels_BS[:, :-1] = input_ids_BS[:, 1:]
    return labels_BS


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and expert tensors); none on norms, biases and other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Drives training of a Llama4ForCausalLM from Python (`train_step`) or the CLI.

    The optimizer is AdamW8bit over all trainable parameters (weight decay on matrices only). Each step
    reads back from the device once (the loss, the gradient norm and the clip factor come back
    together): the skip decision of dynamic loss scaling needs it. On CUDA it also waits for the
    optimizer at the end, so that StepStats.seconds covers the whole step.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None) -> None:
        self.model = model
        self.config = config = config or TrainConfig()
        self.optimizer = AdamW8bit(
            _decay_groups(model, config.weight_decay),
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            min_8bit_size=config.min_8bit_size,
        )
        self.scaler = DynamicLossScaler(
            config.init_loss_scale, growth_interval=config.loss_scale_growth_interval, enabled=config.loss_scale
        )
        self.step = 0  # steps taken (skipped ones included): the data position
        self.moe_layers = list(model.moe_layers()) if hasattr(model, "moe_layers") else []
        self._n_trainable = sum(len(g["params"]) for g in self.optimizer.param_groups)
        self._warned_no_grad = False
        # Recompute each decoder layer in backward (keeps only the layer inputs): activation memory of
        # a step drops from O(layers x S x (D + F)) to O(layers x S x D) for one more forward.
        model.gradient_checkpointing = config.activation_checkpointing

    # ---- the loss ----
    def loss(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (float32 scalar) over labels != -100, lm_head in chunks."""
        with nvtx_range("llama4.train.forward"):
            h_BSD = self.model.hidden_states(input_ids_BS)
        with nvtx_range("llama4.train.loss"):
            return chunked_cross_entropy(
                h_BSD, self.model.lm_head.weight, labels_BS, chunk_size=self.config.loss_chunk_size
            )

    def train_step(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None) -> StepStats:
        """One optimizer step on a batch (labels default to the inputs shifted by one)."""
        start = time.perf_counter()
        if labels_BS is None:
            labels_BS = shift_labels(input_ids_BS)
        self.model.train()
        scale = self.scaler.scale
        lr = self.config.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(input_ids_BS, labels_BS)
        with nvtx_range("llama4.train.backward"):
            (loss * scale).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if len(params) != self._n_trainable and not self._warned_no_grad:
            self._warned_no_grad = True
            missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
            log.warning(
                "%d trainable parameters got no gradient (e.g. %s): they are not trained", len(missing), missing[:3]
            )
        grads = [p.grad for p in params]
        grad_norm, factor = unscale_and_clip_(grads, scale, self.config.grad_clip)
        loads = [m.expert_load() for m in self.moe_layers]
        loads = [x for x in loads if x is not None]
        load_LE = torch.stack(loads).long() if loads else None
        # The one host synchronisation of the step.
        loss_value, norm_value, factor_value = torch.stack(
            [loss.detach().float(), grad_norm.to(loss.device), factor.to(loss.device)]
        ).tolist()
        skipped = not math.isfinite(norm_value)
        if not skipped:
            with nvtx_range("llama4.train.optimizer"):
                torch._foreach_mul_(grads, factor_value)
                self.optimizer.step()
                if self.config.expert_bias_coeff > 0:
                    for moe in self.moe_layers:
                        if moe.expert_load() is not None:
                            update_expert_bias(moe.expert_bias, moe.expert_load(), self.config.expert_bias_coeff)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(skipped)
        self.step += 1
        if input_ids_BS.is_cuda:
            torch.cuda.synchronize()
        return StepStats(
            step=self.step,
            loss=loss_value,
            grad_norm=norm_value,
            skipped=skipped,
            loss_scale=scale,
            lr=lr,
            tokens=input_ids_BS.numel(),
            seconds=time.perf_counter() - start,
            expert_load=None if load_LE is None else load_LE.cpu(),
        )

    @torch.no_grad()
    def evaluate(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None) -> float:
        if labels_BS is None:
            labels_BS = shift_labels(input_ids_BS)
        self.model.eval()
        return self.loss(input_ids_BS, labels_BS).item()

    # ---- checkpoint / resume ----
    def state_dict(self) -> dict:
        """Everything a resume needs: model parameters and buffers (expert biases included), optimizer
        state (8-bit codes, absmax, rounding seeds), loss scaler, step, the CPU / CUDA RNG states."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "train_config": asdict(self.config),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save(self, directory: str | Path, *, pretrained: bool = False) -> Path:
        """Writes `trainer_state.pt` into `directory` (and, with pretrained=True, the model in Hugging Face
        layout through engine.checkpoint.save_pretrained, for `generate` and `from_pretrained`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TRAINER_STATE_FILE
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint behind
        if pretrained:
            from engine.checkpoint import save_pretrained

            save_pretrained(self.model, directory)
        return path

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / TRAINER_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"Trainer.load: no {TRAINER_STATE_FILE} in {directory}")
        device = next(self.model.parameters()).device
        # weights_only: tensors, numbers and strings only, so loading a checkpoint never runs pickled code.
        self.load_state_dict(torch.load(path, map_location=device, weights_only=True))


# --------------------------------------------------------------------------------------------
# MFU
# --------------------------------------------------------------------------------------------
def peak_tflops(device_name: str | None = None, *, fp8: bool = False) -> float | None:
    """Dense BF16 (or FP8) tensor-core peak of a known GPU in TFLOP/s, else None."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * (2 if fp8 else 1)
    return None


def mfu(model, tokens_per_s: float, seq_len: int, *, device_name: str | None = None) -> float | None:
    """Model FLOPs utilisation of a training step: model.flops_per_token(seq_len) x tokens/s over the
    device's dense BF16 peak (FP8 runs are measured against the BF16 peak too, so the two compare)."""
    peak = peak_tflops(device_name)
    if peak is None:
        return None
    return model.flops_per_token(seq_len, training=True) * tokens_per_s / (peak * 1e12)


def repo_text_files(root: str | Path, suffixes: Iterable[str] = (".py", ".md", ".cu", ".cuh", ".cpp", ".h")) -> list:
    """The text files of a source tree (sorted; virtualenvs, builds and results skipped)."""
    root = Path(root)
    skip = {".venv", "build", ".git", "__pycache__", "results", ".whl", "dist", ".pytest_cache", ".ruff_cache"}
    files = []
    for path in sorted(root.rglob("*")):
        if path.suffix in suffixes and path.is_file() and not skip.intersection(path.relative_to(root).parts):
            files.append(path)
    return files
