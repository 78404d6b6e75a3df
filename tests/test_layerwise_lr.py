"""engine.optim.layerwise_param_groups: the width rule (hidden lr * base_width / width, the rest at
base_lr), clamping to lr_range, zero weight decay on norms/embeddings/biases/router, every parameter
in exactly one group, depth scaling, and groups that drive torch.optim.AdamW and AdamW8bit.
Legend: D model width, F MLP hidden width (4 D), E experts, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.optim import AdamW8bit
from engine.optim.layerwise import infer_width, layerwise_param_groups

BASE_WIDTH = 64
WIDTHS = (64, 256)
VOCAB = 96
EXPERTS = 4
LAYERS = 2
BASE_LR = 2e-4
WIDE_RANGE = (1e-7, 1.0)  # no clamping: the rule's raw rates
WEIGHT_DECAY = 0.1
# Reason: the first Adam step moves each element by lr * |g| / (|g| + eps) after the decoupled decay;
# both optimizers compute it in float32 (a few roundings of an lr-sized update, relative 1e-6), and
# AdamW8bit's first step uses the unquantised moments.
FIRST_STEP_RTOL = 1e-5


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.wq = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d)  # with a bias
        self.mlp_norm = nn.RMSNorm(d)
        self.router = nn.Linear(d, EXPERTS, bias=False)
        self.w_up = nn.Linear(d, 4 * d, bias=False)
        self.w_down = nn.Linear(4 * d, d, bias=False)
        self.experts_w_EFD = nn.Parameter(torch.randn(EXPERTS, 4 * d, d) / d**0.5)  # 3-D, fan-in D


class TinyLM(nn.Module):
    def __init__(self, d: int, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


HIDDEN_SUFFIXES = ("wq.weight", "wo.weight", "w_up.weight", "w_down.weight", "experts_w_EFD")
NO_DECAY_SUFFIXES = ("embed.weight", "norm.weight", "norm.bias", "wo.bias", "router.weight")


def kind_of(name: str) -> str:
    if name.endswith(HIDDEN_SUFFIXES):
        return "hidden"
    if name.startswith("lm_head"):
        return "head"
    return "other"


def rates_by_name(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every (trainable) parameter in exactly one group, nothing else in any group."""
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("width", WIDTHS)
def test_width_rule(width):
    torch.manual_seed(0)
    model = TinyLM(width)
    groups = layerwise_param_groups(
        model, BASE_LR, base_width=BASE_WIDTH, lr_range=WIDE_RANGE, weight_decay=WEIGHT_DECAY
    )
    assert_partition(model, groups)
    hidden_lr = BASE_LR * BASE_WIDTH / width
    for name, (lr, wd) in rates_by_name(model, groups).items():
        if kind_of(name) == "hidden":
            assert lr == hidden_lr, name
        else:
            assert lr == BASE_LR, name
        assert wd == (0.0 if name.endswith(NO_DECAY_SUFFIXES) else WEIGHT_DECAY), name


def test_hidden_lr_scales_with_inverse_width_and_the_rest_does_not():
    rates = {}
    for width in WIDTHS:
        torch.manual_seed(0)
        model = TinyLM(width)
        rates[width] = rates_by_name(
            model, layerwise_param_groups(model, BASE_LR, base_width=BASE_WIDTH, lr_range=WIDE_RANGE)
        )
    narrow, wide = rates[WIDTHS[0]], rates[WIDTHS[1]]
    assert narrow.keys() == wide.keys()
    for name in narrow:
        expected = WIDTHS[0] / WIDTHS[1] if kind_of(name) == "hidden" else 1.0
        assert wide[name][0] / narrow[name][0] == pytest.approx(expected, rel=1e-12), name
        assert wide[name][1] == narrow[name][1], name


def test_width_inferred_from_hidden_fan_in_and_overridable():
    model = TinyLM(256)
    hidden = [p for name, p in model.named_parameters() if kind_of(name) == "hidden"]
    # wq, wo, w_up and the experts read D = 256; only w_down reads F = 1024.
    assert infer_width(hidden) == 256
    explicit = layerwise_param_groups(model, BASE_LR, base_width=BASE_WIDTH, width=512, lr_range=WIDE_RANGE)
    assert rates_by_name(model, explicit)["layers.0.wq.weight"][0] == BASE_LR * BASE_WIDTH / 512


def test_lr_clamped_to_range():
    model = TinyLM(256)
    lr_range = (1e-5, 3e-4)
    # base_lr above the range: the width-independent rates clamp to its top, hidden (1e-3 / 4) does not.
    rates = rates_by_name(model, layerwise_param_groups(model, 1e-3, base_width=BASE_WIDTH, lr_range=lr_range))
    for name, (lr, _) in rates.items():
        assert lr == (1e-3 / 4 if kind_of(name) == "hidden" else lr_range[1]), name
    # A width that pushes hidden below the range: clamped to its bottom.
    rates = rates_by_name(
        model, layerwise_param_groups(model, 1e-4, base_width=BASE_WIDTH, width=10**6, lr_range=lr_range)
    )
    for name, (lr, _) in rates.items():
        assert lr == (lr_range[0] if kind_of(name) == "hidden" else 1e-4), name


def test_depth_scale():
    model = TinyLM(128)
    groups = layerwise_param_groups(
        model, BASE_LR, base_width=BASE_WIDTH, lr_range=WIDE_RANGE, depth_scale=lambda i: 1.0 / (i + 1)
    )
    assert_partition(model, groups)
    for name, (lr, _) in rates_by_name(model, groups).items():
        if kind_of(name) == "hidden":
            layer = int(name.split(".")[1])
            assert lr == pytest.approx(BASE_LR * BASE_WIDTH / 128 / (layer + 1), rel=1e-12), name
        else:
            assert lr == BASE_LR, name


def test_groups_are_merged_and_named():
    """Identical (lr, weight_decay) share one group; at width == base_width, hidden and lm_head do."""
    model = TinyLM(BASE_WIDTH)
    groups = layerwise_param_groups(model, BASE_LR, base_width=BASE_WIDTH, lr_range=WIDE_RANGE)
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys))
    assert len(groups) == 2  # decayed matrices, and everything without decay
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names)
    assert any("hidden" in n and "head" in n for n in names), names
    assert any("embedding" in n and "norm" in n for n in names), names


def test_tied_weights_appear_once():
    model = TinyLM(BASE_WIDTH, tied=True)
    groups = layerwise_param_groups(model, BASE_LR, base_width=BASE_WIDTH, lr_range=WIDE_RANGE)
    assert_partition(model, groups)


def test_frozen_parameters_left_out():
    model = TinyLM(BASE_WIDTH)
    model.embed.weight.requires_grad_(False)
    groups = layerwise_param_groups(model, BASE_LR, base_width=BASE_WIDTH, lr_range=WIDE_RANGE)
    assert all(p is not model.embed.weight for g in groups for p in g["params"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr_range=(3e-4, 1e-5)), "lr_range"),
        (dict(lr_range=(0.0, 1e-3)), "lr_range"),
        (dict(width=0), "width"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layerwise_param_groups(TinyLM(BASE_WIDTH), BASE_LR, base_width=BASE_WIDTH, **kwargs)


@pytest.mark.parametrize("optimizer", ["torch.optim.AdamW", "AdamW8bit"])
def test_groups_drive_the_optimizers(optimizer, device, gen):
    """One step from zero state: each parameter moves exactly as its own group's lr and weight decay say,
    p * (1 - lr * wd) - lr * g / (|g| + eps), in both optimizers (so the groups reach the kernels)."""
    torch.manual_seed(0)
    model = TinyLM(256).to(device)
    groups = layerwise_param_groups(model, 1e-3, base_width=BASE_WIDTH, lr_range=(1e-5, 1e-3))
    eps = 1e-8
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = AdamW8bit(groups, eps=eps) if optimizer == "AdamW8bit" else torch.optim.AdamW(groups, eps=eps)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in groups]
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = torch.randn(p.shape, generator=gen).to(device)
        p.grad = grads[name].clone()
    opt.step()
    rates = rates_by_name(model, groups)
    for name, p in model.named_parameters():
        lr, wd = rates[name]
        g = grads[name]
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=FIRST_STEP_RTOL, atol=FIRST_STEP_RTOL * lr)
