"""Layer-wise learning rates and weight decay for any torch optimizer: parameter groups that keep
hyper-parameters tuned on a narrow model valid for a wider one (muP-style width scaling, in the
spirit of Llama 4's MetaP), with an optional per-layer (depth) factor.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

import torch
from torch import nn

# Parameter kinds, in the order their groups are listed.
KINDS = ("embedding", "hidden", "head", "router", "norm", "bias")
# Kinds that keep base_lr whatever the width.
WIDTH_INDEPENDENT_KINDS = ("embedding", "head", "router", "norm", "bias")
# Kinds that never get weight decay (decaying a gain towards 0, or an embedding row of a rare token
# on every step, is a bias, not a regulariser).
NO_DECAY_KINDS = ("embedding", "norm", "bias")
NORM_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
DEFAULT_WEIGHT_DECAY = 0.1  # Llama's AdamW weight decay


def _kind(name: str, param: torch.Tensor, module: nn.Module, embed_names, head_names, router_names) -> str:
    lowered = name.lower()
    if isinstance(module, nn.Embedding) or any(key in lowered for key in embed_names):
        return "embedding"
    if any(key in lowered for key in router_names):
        return "router"
    if isinstance(module, NORM_MODULES) or "norm" in lowered:
        return "norm"
    if param.dim() < 2:
        return "bias"
    if any(key in lowered for key in head_names):
        return "head"
    return "hidden"


def _layer_index(name: str) -> int | None:
    """The first all-digit component of a dotted parameter name ("layers.3.attn.wq.weight" -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def infer_width(hidden: Iterable[torch.Tensor]) -> int:
    """The most common fan-in (last dim) of the hidden matrices, ties to the larger: d_model in a
    transformer, where q, k, v, the MLP's gate/up and every expert read the residual stream."""
    counts = collections.Counter(p.shape[-1] for p in hidden)
    if not counts:
        raise ValueError("layerwise_param_groups: the model has no hidden matrices to infer `width` from")
    return max(counts, key=lambda fan_in: (counts[fan_in], fan_in))


def layerwise_param_groups(
    model: nn.Module,
    base_lr: float,
    *,
    base_width: int,
    width: int | None = None,
    lr_range: tuple[float, float] = (1e-5, 3e-4),
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    no_decay_names: tuple[str, ...] = ("norm", "bias", "embed", "router"),
    depth_scale: Callable[[int], float] | None = None,
    embed_names: tuple[str, ...] = ("embed", "wte", "tok_embeddings"),
    head_names: tuple[str, ...] = ("lm_head",),
    router_names: tuple[str, ...] = ("router",),
) -> list[dict]:
    """Parameter groups [{"params", "lr", "weight_decay", "name"}] for torch.optim.AdamW, AdamW8bit, ...

    The rule (base_lr is tuned on a model of width `base_width`; this model has width `width`):
      - hidden matrices (>= 2-D weights that are not embeddings, lm_head, norms or the router):
        lr = base_lr * base_width / width. Adam's update has a fixed size per element, so a matrix
        with fan-in `width` moves its outputs ~width times one element's step: dividing the rate by
        the width multiplier keeps the change of each activation, hence the tuned base_lr, fixed (muP).
      - embeddings, lm_head, the router, norms and biases: lr = base_lr (their updates do not add
        up over a growing fan-in; lm_head's 1/width belongs in an output multiplier, muP's readout).
      - depth_scale (optional): hidden matrices of layer i (the first all-digit component of the
        parameter's name) are further multiplied by depth_scale(i), e.g. lambda i: 1 / (i + 1).
      - every lr is clamped to lr_range = (min, max).
      - weight_decay for hidden matrices, lm_head and the router, unless the parameter's name contains
        one of no_decay_names; embeddings, norms and biases (all < 2-D params) always get 0.
    width defaults to the most common fan-in of the hidden matrices (infer_width: d_model).
    Parameters with identical (lr, weight_decay) share one group, listed in KINDS order; "name" says
    which kinds (and layers) it holds and its rates. Frozen parameters (requires_grad=False) are left out.
    """
    low, high = lr_range
    if not 0.0 < low <= high:
        raise ValueError(f"layerwise_param_groups: lr_range must be 0 < min <= max, got {lr_range}")
    if base_lr <= 0 or base_width <= 0:
        raise ValueError(f"layerwise_param_groups: base_lr and base_width must be > 0, got {base_lr}, {base_width}")
    if weight_decay < 0:
        raise ValueError(f"layerwise_param_groups: weight_decay must be >= 0, got {weight_decay}")

    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    entries = []  # (kind, name, param)
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if p.requires_grad:
            kind = _kind(name, p, owners[id(p)], embed_names, head_names, router_names)
            entries.append((kind, name, p))

    if width is None:
        width = infer_width(p for kind, _, p in entries if kind == "hidden")
    if width <= 0:
        raise ValueError(f"layerwise_param_groups: width must be > 0, got {width}")

    groups: dict[tuple[float, float], dict] = {}
    labels: dict[tuple[float, float], list[str]] = {}
    for kind, name, p in sorted(entries, key=lambda e: KINDS.index(e[0])):  # stable: model order within a kind
        lr = base_lr
        label = kind
        if kind not in WIDTH_INDEPENDENT_KINDS:
            lr = base_lr * base_width / width
            layer = _layer_index(name)
            if depth_scale is not None and layer is not None:
                lr *= depth_scale(layer)
                label = f"{kind}[layer {layer}]"
        lr = min(max(lr, low), high)
        decays = kind not in NO_DECAY_KINDS and not any(key in name.lower() for key in no_decay_names)
        wd = weight_decay if decays else 0.0
        key = (lr, wd)
        group = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd})
        group["params"].append(p)
        group_labels = labels.setdefault(key, [])
        if label not in group_labels:
            group_labels.append(label)
    for key, group in groups.items():
        group["name"] = f"{'+'.join(labels[key])} lr={group['lr']:.4g} wd={group['weight_decay']:g}"
    return list(groups.values())


__all__ = ["infer_width", "layerwise_param_groups"]
