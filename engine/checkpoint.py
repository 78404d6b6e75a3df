"""Hugging Face checkpoints of the Llama 4 text model: load (safetensors only, shard by shard, every
problem listed before anything is copied), save (config.json + shards + index) and convert to
FP8 experts. Legend: E experts, D model width, F expert hidden width, N output channels, K depth.

Layouts read: Llama4ForConditionalGeneration (text keys under `language_model.`, vision and
projector keys skipped with a logged note) and Llama4ForCausalLM (`model.`, `lm_head.`); routed
experts fused (`experts.gate_up_proj` [E, D, 2F], `experts.down_proj` [E, F, D]: [in, out]) or per
expert (`experts.{e}.gate_proj/up_proj/down_proj.weight`: nn.Linear [out, in]), in BF16/FP16/FP32
or FP8 e4m3 with fbgemm-style per-channel scales (`gate_up_proj_scale` [E, 1, 2F],
`down_proj_scale` [E, D, 1]). Ours: gate_up_ENK [E, 2F, D], down_EDF [E, D, F].
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.model.config import Llama4Config
from engine.model.layers import quantize_experts_fp8
from engine.model.model import PRECISIONS, Llama4ForCausalLM
from engine.moe import MoE

log = logging.getLogger("engine.checkpoint")

__all__ = ["CheckpointError", "convert", "from_pretrained", "save_pretrained"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files of a checkpoint folder that `convert` carries over unchanged (tokenizer, chat template, generation defaults).
CARRIED_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|generation_config\.json|chat_template.*)$")
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
FP8_CKPT_DTYPE = "F8_E4M3"
# Prefixes of the text model in each layout -> our names; keys under IGNORED_PREFIXES are not text weights.
CONDITIONAL_PREFIXES = (("language_model.model.", ""), ("language_model.lm_head.", "lm_head."))
CAUSAL_PREFIXES = (("model.", ""), ("lm_head.", "lm_head."))
IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")

# Our expert tensors -> the fused Hugging Face names (under layers.{i}.feed_forward.experts.).
HF_EXPERT_NAMES = {
    "gate_up_ENK": "gate_up_proj",
    "down_EDF": "down_proj",
    "gate_up_scale_EN": "gate_up_proj_scale",
    "down_scale_EN": "down_proj_scale",
}
# Our expert tensors (module path, name): FP8 scales included.
_OURS_EXPERT = re.compile(r"^(.*)\.(" + "|".join(HF_EXPERT_NAMES) + r")$")
_FUSED = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)(_scale)?$")
_PER_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: every problem listed, nothing loaded."""


@dataclass
class _Action:
    """How one checkpoint tensor lands in the model: `write(tensor)`, covering `pieces`."""

    key: str
    file: str
    pieces: list[tuple]
    write: Callable[[torch.Tensor], None]


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: only safetensors checkpoints are read (pickle files can run code when loaded); found {pickles}"
        )
    raise CheckpointError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file")


def _text_prefixes(keys: list[str]) -> tuple[tuple[str, str], ...]:
    return CONDITIONAL_PREFIXES if any(k.startswith("language_model.") for k in keys) else CAUSAL_PREFIXES


def _local_name(key: str, prefixes) -> str | None:
    for prefix, ours in prefixes:
        if key.startswith(prefix):
            return ours + key[len(prefix) :]
    return None


def _checkpoint_name(local: str, prefixes) -> str:
    """Our name -> the checkpoint's (the inverse of _local_name)."""
    for prefix, ours in sorted(prefixes, key=lambda p: -len(p[1])):
        if local.startswith(ours):
            return prefix + local[len(ours) :]
    return local


class _Plan:
    """Pass 1: maps every checkpoint key (from the shard headers alone) to an action, and collects
    missing, unexpected, shape and dtype problems."""

    def __init__(self, model: Llama4ForCausalLM) -> None:
        self.model = model
        self.state = model.state_dict(keep_vars=True)  # parameters and persistent buffers
        self.fp8 = model.precision == "fp8"
        self.required: dict[tuple, str] = {}  # piece -> our name of the tensor that would provide it
        self.covered: dict[tuple, str] = {}
        self.actions: list[_Action] = []
        self.unexpected: list[str] = []
        self.shape_errors: list[str] = []
        self.dtype_errors: list[str] = []
        self.duplicates: list[str] = []
        self.rejected: set[tuple] = set()
        self.ignored = 0
        for name, tensor in self.state.items():
            if name.endswith(".expert_bias"):
                continue  # ours, optional (zero when absent)
            m = _OURS_EXPERT.match(name)
            if m:
                for e in range(tensor.shape[0]):
                    for part in ("gate", "up") if "gate_up" in m[2] else ("down",):
                        self.required[(name, e, part)] = f"{m[1]}.experts.{HF_EXPERT_NAMES[m[2]]}"
            else:
                self.required[(name,)] = name

    def _expect(self, key: str, shape, dtype: str, want_shape: tuple, pieces: list, fp8_ok: bool = False) -> bool:
        """Checks a key's shape and dtype; a bad key's pieces count as present (reported once, not as missing)."""
        ok = True
        if tuple(shape) != tuple(want_shape):
            self.shape_errors.append(f"{key}: checkpoint {list(shape)}, model expects {list(want_shape)}")
            ok = False
        if dtype not in FLOAT_DTYPES and not (fp8_ok and dtype == FP8_CKPT_DTYPE):
            allowed = "a float dtype (F32, F16, BF16)" + (f" or {FP8_CKPT_DTYPE}" if fp8_ok else "")
            self.dtype_errors.append(f"{key}: checkpoint {dtype}, model expects {allowed}")
            ok = False
        if not ok:
            self.rejected.update(pieces)
        return ok

    def add(self, key: str, file: str, shape: list[int], dtype: str, local: str) -> None:
        m_fused, m_one = _FUSED.match(local), _PER_EXPERT.match(local)
        if m_fused:
            self._add_fused(key, file, shape, dtype, m_fused)
        elif m_one:
            self._add_per_expert(key, file, shape, dtype, m_one)
        elif local in self.state and not _OURS_EXPERT.match(local):
            target = self.state[local]
            pieces = [] if local.endswith(".expert_bias") else [(local,)]
            if self._expect(key, shape, dtype, tuple(target.shape), pieces):
                self._push(key, file, pieces, lambda t, target=target: target.copy_(t))
        else:
            self.unexpected.append(key)

    def _push(self, key: str, file: str, pieces: list[tuple], write) -> None:
        for piece in pieces:
            if piece in self.covered:
                self.duplicates.append(f"{key} (also given by {self.covered[piece]})")
                return
        for piece in pieces:
            self.covered[piece] = key
        self.actions.append(_Action(key, file, pieces, write))

    def _moe(self, layer: int, key: str) -> MoE | None:
        if layer >= len(self.model.layers) or not isinstance(self.model.layers[layer].feed_forward, MoE):
            self.unexpected.append(key)
            return None
        return self.model.layers[layer].feed_forward

    def _add_fused(self, key, file, shape, dtype, m) -> None:
        moe = self._moe(int(m[1]), key)
        if moe is None:
            return
        base, which, is_scale = f"layers.{m[1]}.feed_forward", m[2], bool(m[3])
        E, F, D = moe.n_experts, moe.d_ff, moe.d_model
        parts = ("gate", "up") if which == "gate_up_proj" else ("down",)
        ours = "gate_up" if which == "gate_up_proj" else "down"
        if is_scale:
            if not self.fp8:
                self.dtype_errors.append(f"{key}: an FP8 checkpoint (scales given); load it with precision='fp8'")
                return
            want = (E, 1, 2 * F) if ours == "gate_up" else (E, D, 1)
            target = self.state[f"{base}.{ours}_scale_EN"]
            pieces = [(f"{base}.{ours}_scale_EN", e, p) for e in range(E) for p in parts]
            if self._expect(key, shape, dtype, want, pieces):
                self._push(key, file, pieces, lambda t, target=target: target.copy_(t.reshape(target.shape)))
            return
        want = (E, D, 2 * F) if ours == "gate_up" else (E, F, D)  # Hugging Face: [in, out] per expert
        weight_name = f"{base}.{'gate_up_ENK' if ours == 'gate_up' else 'down_EDF'}"
        pieces = [(weight_name, e, p) for e in range(E) for p in parts]
        if not self._expect(key, shape, dtype, want, pieces, fp8_ok=self.fp8):
            return
        target = self.state[weight_name]
        if dtype == FP8_CKPT_DTYPE:  # already FP8: its scales come from the *_scale key

            def write(t, target=target):
                target.copy_(t.transpose(1, 2))

        elif self.fp8:  # quantise while loading: one scale per expert and output channel
            scale = self.state[f"{base}.{ours}_scale_EN"]
            pieces += [(f"{base}.{ours}_scale_EN", e, p) for e in range(E) for p in parts]

            def write(t, target=target, scale=scale):
                w_fp8, s = quantize_experts_fp8(t.to(scale.device).transpose(1, 2))
                target.copy_(w_fp8)
                scale.copy_(s)

        else:

            def write(t, target=target):
                target.copy_(t.transpose(1, 2))

        self._push(key, file, pieces, write)

    def _add_per_expert(self, key, file, shape, dtype, m) -> None:
        moe = self._moe(int(m[1]), key)
        if moe is None:
            return
        base, e, proj = f"layers.{m[1]}.feed_forward", int(m[2]), m[3]
        E, F, D = moe.n_experts, moe.d_ff, moe.d_model
        if e >= E:
            self.unexpected.append(key)
            return
        want = (D, F) if proj == "down_proj" else (F, D)  # nn.Linear [out, in]
        part = proj.removesuffix("_proj")
        ours = "down" if part == "down" else "gate_up"
        weight_name = f"{base}.{'down_EDF' if part == 'down' else 'gate_up_ENK'}"
        if not self._expect(key, shape, dtype, want, [(weight_name, e, part)]):
            return
        rows = slice(None) if part == "down" else (slice(0, F) if part == "gate" else slice(F, 2 * F))
        target = self.state[weight_name]
        pieces = [(weight_name, e, part)]
        if self.fp8:
            scale = self.state[f"{base}.{ours}_scale_EN"]
            pieces.append((f"{base}.{ours}_scale_EN", e, part))

            def write(t, target=target, scale=scale, e=e, rows=rows):
                w_fp8, s = quantize_experts_fp8(t.to(scale.device)[None])  # per-row scales: the same codes as fused
                target[e, rows].copy_(w_fp8[0])
                scale[e, rows].copy_(s[0])

        else:

            def write(t, target=target, e=e, rows=rows):
                target[e, rows].copy_(t)

        self._push(key, file, pieces, write)

    def missing(self, prefixes) -> list[str]:
        """Checkpoint names of the pieces no key provides (a wholly missing expert tensor once)."""
        out, seen = [], set()
        # Expert tensors of which some piece is provided (or rejected): only their absent pieces are listed.
        partly_given = {p[0] for p in (*self.covered, *self.rejected) if len(p) == 3}
        for piece, local in self.required.items():
            if piece in self.covered or piece in self.rejected:
                continue
            if len(piece) == 1:
                out.append(_checkpoint_name(local, prefixes))
                continue
            name, e, part = piece
            if name not in partly_given:
                if name not in seen:
                    seen.add(name)
                    hint = "" if "scale" in name else " (or per expert experts.{e}.*_proj.weight)"
                    out.append(_checkpoint_name(local, prefixes) + hint)
            else:
                local_piece = f"{name.rsplit('.', 1)[0]}.experts.{e}.{part}_proj.weight"
                out.append(_checkpoint_name(local_piece, prefixes))
        return out

    def check(self, path: Path, prefixes) -> None:
        problems = []
        for title, items in (
            ("missing", self.missing(prefixes)),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.shape_errors),
            ("dtype mismatch", self.dtype_errors),
            ("given twice", self.duplicates),
        ):
            if items:
                shown = "\n    ".join(items[:50]) + (f"\n    ... and {len(items) - 50} more" if len(items) > 50 else "")
                problems.append(f"  {title} ({len(items)}):\n    {shown}")
        if problems:
            raise CheckpointError(
                f"{path}: checkpoint does not fit the model; nothing was loaded.\n" + "\n".join(problems)
            )


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="tensor")
    except ImportError:
        return None


def read_config(path: str | os.PathLike) -> Llama4Config:
    """The text-model configuration of a checkpoint folder (config.json, either layout)."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    return Llama4Config.from_hf(json.loads(config_file.read_text()))


@torch.no_grad()
def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
) -> Llama4ForCausalLM:
    """Loads a Hugging Face Llama 4 checkpoint folder into Llama4ForCausalLM (eval mode).

    Weights in `dtype` on `device`; precision="fp8" keeps the routed experts in FP8 e4m3 with a
    float32 scale per expert and output channel (quantised here when the checkpoint is BF16).
    Reads the shard headers first and raises one CheckpointError listing every missing,
    unexpected, mis-shaped or mis-typed key before copying anything; then streams tensor by tensor
    (one checkpoint tensor in host memory at a time, beside the model).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"from_pretrained: precision must be one of {PRECISIONS}, got {precision!r}")
    path = Path(path)
    config = read_config(path)
    files = _weight_files(path)
    with torch.device("meta"):
        model = Llama4ForCausalLM(config, dtype=dtype, precision=precision)
    model.to_empty(device=device)
    model.reset_rope()
    for moe in model.moe_layers():
        moe.expert_bias.zero_()

    plan = _Plan(model)
    headers: dict[str, list[tuple[str, list[int], str]]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            headers[file.name] = [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]  # noqa: SIM118
    all_keys = [k for entries in headers.values() for k, _, _ in entries]
    prefixes = _text_prefixes(all_keys)
    for file_name, entries in headers.items():
        for key, shape, ckpt_dtype in entries:
            if key.startswith(IGNORED_PREFIXES):
                plan.ignored += 1
                continue
            local = _local_name(key, prefixes)
            if local is None:
                plan.unexpected.append(key)
            else:
                plan.add(key, file_name, shape, ckpt_dtype, local)
    plan.check(path, prefixes)
    if plan.ignored:
        log.info("from_pretrained: %d vision / projector tensors skipped (text model only)", plan.ignored)

    bar = _progress(len(plan.actions), f"loading {path.name}")
    by_file: dict[str, list[_Action]] = {}
    for action in plan.actions:
        by_file.setdefault(action.file, []).append(action)
    for i, (file_name, actions) in enumerate(by_file.items()):
        if bar is None:
            log.info("from_pretrained: shard %d/%d %s (%d tensors)", i + 1, len(by_file), file_name, len(actions))
        with safe_open(path / file_name, framework="pt", device="cpu") as f:
            for action in actions:
                action.write(f.get_tensor(action.key))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return model.eval()


@torch.no_grad()
def _merged_lora(moe: MoE, which: str) -> torch.Tensor:
    """W_e + scaling * B_e @ A_e of a LoRA MoE's expert weight, in the weight's dtype (float32 sum)."""
    w_ENK = moe.gate_up_ENK if which == "gate_up" else moe.down_EDF
    a_ERK = moe.lora_a_gate_up_ERD if which == "gate_up" else moe.lora_a_down_ERF
    b_ENR = moe.lora_b_gate_up_ENR if which == "gate_up" else moe.lora_b_down_EDR
    return (w_ENK.float() + moe.lora_scaling * torch.bmm(b_ENR.float(), a_ERK.float())).to(w_ENK.dtype)


def _hf_tensors(model: Llama4ForCausalLM) -> list[tuple[str, Callable[[], torch.Tensor], int]]:
    """(Hugging Face Llama4ForCausalLM key, a producer of the CPU tensor, its bytes), in model order."""
    out = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        hf = name if name.startswith("lm_head.") else "model." + name
        if ".lora_" in name:
            continue  # merged into the expert weights below (the Hugging Face format has no adapters)
        if re.search(r"\.(gate_up_ENK|down_EDF)$", name):
            moe = model.get_submodule(name.rsplit(".", 1)[0])
            if getattr(moe, "lora_rank", 0):
                tensor = _merged_lora(moe, "gate_up" if name.endswith("gate_up_ENK") else "down")
        if name.endswith(".expert_bias"):
            if not bool(tensor.any()):
                continue  # untrained balancing bias: not part of the Hugging Face format
            out.append((hf, lambda t=tensor: t.detach().cpu(), tensor.nbytes))
            continue
        m = _OURS_EXPERT.match(hf)
        if not m:
            out.append((hf, lambda t=tensor: t.detach().cpu(), tensor.nbytes))
        elif m[2] in ("gate_up_ENK", "down_EDF"):
            fused = "gate_up_proj" if m[2] == "gate_up_ENK" else "down_proj"
            out.append(
                (
                    f"{m[1]}.experts.{fused}",
                    lambda t=tensor: t.detach().transpose(1, 2).contiguous().cpu(),
                    tensor.nbytes,
                )
            )
        elif m[2] == "gate_up_scale_EN":
            out.append(
                (
                    f"{m[1]}.experts.gate_up_proj_scale",
                    lambda t=tensor: t.detach()[:, None, :].contiguous().cpu(),
                    tensor.nbytes,
                )
            )
        else:
            out.append(
                (
                    f"{m[1]}.experts.down_proj_scale",
                    lambda t=tensor: t.detach()[:, :, None].contiguous().cpu(),
                    tensor.nbytes,
                )
            )
    return out


def _fp8_quantization_config(model: Llama4ForCausalLM) -> dict:
    """fbgemm_fp8-style quantization_config: only the routed experts are FP8."""
    keep = ["lm_head"]
    for i, layer in enumerate(model.layers):
        keep.append(f"model.layers.{i}.self_attn")
        ffn = f"model.layers.{i}.feed_forward"
        keep += [f"{ffn}.router", f"{ffn}.shared_expert"] if isinstance(layer.feed_forward, MoE) else [ffn]
    return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": keep}


def save_pretrained(
    model: Llama4ForCausalLM, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Writes `model` as a Hugging Face Llama4ForCausalLM folder: config.json, safetensors shards of
    at most max_shard_bytes (one tensor may exceed it alone) and model.safetensors.index.json. FP8
    experts are written in FP8 with fbgemm-style scales; LoRA adapters of the experts are merged into
    the expert weights; a non-zero expert_bias (aux-loss-free balancing) is kept as an extra key.
    One shard's tensors in host memory at a time."""
    if max_shard_bytes < 1:
        raise ValueError(f"save_pretrained: max_shard_bytes must be >= 1, got {max_shard_bytes}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(model)
    shards: list[list[tuple[str, Callable[[], torch.Tensor], int]]] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {key: produce() for key, produce, _ in shard}
        save_file(data, path / file_name, metadata={"format": "pt"})
        for key, t in data.items():
            weight_map[key] = file_name
            total += t.nbytes
        del data
    (path / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    )
    hf = model.config.to_hf()
    hf["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    if model.precision == "fp8":
        hf["quantization_config"] = _fp8_quantization_config(model)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    precision: str = "fp8",
    *,
    device: torch.device | str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Hugging Face checkpoint -> Llama4ForCausalLM checkpoint at `precision` (default FP8 experts,
    BF16 elsewhere; vision weights dropped), tokenizer / generation files copied over. Holds the
    converted model in memory on `device` (CUDA when available, else CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"convert: precision must be one of {PRECISIONS}, got {precision!r}")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"convert: src and dst must differ, got {src}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(src, dtype=torch.bfloat16, device=device, precision=precision)
    save_pretrained(model, dst, max_shard_bytes=max_shard_bytes)
    for f in Path(src).iterdir():
        if f.is_file() and CARRIED_FILES.match(f.name):
            shutil.copy2(f, Path(dst) / f.name)
