"""Training (engine.train): dynamic loss scaling (overflow skips the step and halves, clean steps grow),
gradient clipping, a scout-debug run lowers the loss, checkpoint -> resume reproduces the loss curve
bit for bit, expert-bias updates follow the sign rule, activation checkpointing changes nothing, every
parameter is trained, the schedule and the data stream. Legend: B batch, S sequence, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.model import Llama4Config
from engine.train import (
    DynamicLossScaler,
    PrecisionUnavailable,
    TokenStream,
    TrainConfig,
    Trainer,
    build_model,
    shift_labels,
    unscale_and_clip_,
)

TEXT = ("the quick brown fox jumps over the lazy dog. " * 40).encode()
B, S = 4, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: debug-size models, one thread


def _stream(seed: int = 0) -> TokenStream:
    return TokenStream(torch.tensor(list(TEXT)), seed=seed)


def _trainer(seed: int = 0, **config) -> Trainer:
    torch.manual_seed(seed)
    model = build_model(Llama4Config.preset("scout-debug"), device="cpu")
    return Trainer(model, TrainConfig(**{"lr": 3e-3, **config}))


def _run(trainer: Trainer, stream: TokenStream, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        ids, labels = stream.batch(trainer.step, B, S)
        losses.append(trainer.train_step(ids, labels).loss)
    return losses


# --------------------------------------------------------------------------------------------
# Loss scaling and clipping
# --------------------------------------------------------------------------------------------
def test_loss_scaler_skips_halves_and_grows():
    scaler = DynamicLossScaler(1024.0, growth_interval=3)
    scaler.update(found_inf=True)
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 512.0  # two clean steps: not yet
    scaler.update(True)  # an overflow resets the clean count
    assert scaler.scale == 256.0
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 512.0 and scaler.clean_steps == 0
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state
    tiny = DynamicLossScaler(2.0, min_scale=1.0)
    tiny.update(True)
    tiny.update(True)
    assert tiny.scale == 1.0
    off = DynamicLossScaler(enabled=False)
    off.update(True)
    assert off.scale == 1.0 and off.skipped_steps == 1


def test_overflowing_step_is_skipped_and_halves_the_scale():
    trainer = _trainer(init_loss_scale=2.0**10)
    stream = _stream()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    poisoned = trainer.model.lm_head.weight
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("inf")))
    ids, labels = stream.batch(0, B, S)
    stats = trainer.train_step(ids, labels)
    handle.remove()
    assert stats.skipped and not math.isfinite(stats.grad_norm)
    assert stats.loss_scale == 2.0**10 and trainer.scaler.scale == 2.0**9
    for k, v in trainer.model.state_dict().items():  # nothing moved: no weight, no expert bias
        assert torch.equal(v, before[k]), k
    assert not trainer.optimizer.state  # the 8-bit state never saw the step
    assert all(p.grad is None for p in trainer.model.parameters())
    stats = trainer.train_step(*stream.batch(1, B, S))
    assert not stats.skipped and stats.loss_scale == 2.0**9
    assert not torch.equal(trainer.model.lm_head.weight, before["lm_head.weight"])


@pytest.mark.parametrize("max_norm", [0.5, 100.0, None])
def test_unscale_and_clip(max_norm, gen):
    scale = 256.0
    grads = [torch.randn(7, 5, generator=gen), torch.randn(11, generator=gen, dtype=torch.float64).float()]
    true_norm = torch.cat([g.flatten() for g in grads]).double().norm().item()
    scaled = [g * scale for g in grads]
    norm, factor = unscale_and_clip_(scaled, scale, max_norm)
    assert norm.item() == pytest.approx(true_norm, rel=1e-6)
    torch._foreach_mul_(scaled, factor.item())
    applied = torch.cat([g.flatten() for g in scaled]).double().norm().item()
    expected = min(true_norm, max_norm) if max_norm else true_norm
    assert applied == pytest.approx(expected, rel=1e-5)
    if max_norm is None or true_norm <= max_norm:  # unclipped: exactly the unscaled gradients
        for g, ref in zip(scaled, grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-6, atol=0)
    bad = [torch.tensor([1.0, float("nan")])]
    assert not math.isfinite(unscale_and_clip_(bad, 1.0, 1.0)[0].item())


def test_clipping_bounds_the_applied_update():
    """With lr -> tiny Adam steps are ~lr * sign: compare the first moments instead. The stored first
    moment after one step is (1 - beta1) * clipped gradient, so its norm is (1 - beta1) * max_norm."""
    trainer = _trainer(grad_clip=1e-3, min_8bit_size=10**9, weight_decay=0.0)  # float32 state: exact moments
    stats = trainer.train_step(*_stream().batch(0, B, S))
    assert stats.grad_norm > 1e-3
    m = torch.cat([s["exp_avg"].flatten() for s in trainer.optimizer.state.values()]).double()
    assert m.norm().item() == pytest.approx((1 - trainer.config.betas[0]) * 1e-3, rel=1e-4)


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------
def test_scout_debug_run_lowers_the_loss():
    trainer = _trainer(warmup_steps=3)
    stream = _stream()
    losses = _run(trainer, stream, 25)
    assert losses[0] == pytest.approx(math.log(trainer.model.config.vocab_size), abs=0.5)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    assert trainer.scaler.skipped_steps == 0


def test_every_trainable_parameter_gets_a_gradient():
    trainer = _trainer()
    ids, labels = _stream().batch(0, B, S)
    trainer.loss(ids, labels).backward()
    missing = [n for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    zero = [n for n, p in trainer.model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not zero, f"all-zero gradient in {zero}"


def test_checkpoint_resume_gives_the_identical_loss_curve(tmp_path):
    stream = _stream(seed=3)
    straight = _run(_trainer(seed=1), stream, 6)
    first = _trainer(seed=1)
    head = _run(first, stream, 3)
    first.save(tmp_path / "ckpt")
    torch.manual_seed(1234)  # the resumed process's RNG is restored from the checkpoint
    resumed = _trainer(seed=99)  # different initial weights: everything must come from the checkpoint
    resumed.load(tmp_path / "ckpt")
    assert resumed.step == 3
    tail = _run(resumed, stream, 3)
    assert head + tail == straight  # bitwise: the same floats
    biases = [m.expert_bias for m in resumed.moe_layers]
    assert any(b.any() for b in biases)  # the expert biases moved and were restored


def test_expert_bias_updates_follow_the_sign_rule():
    coeff = 0.01
    trainer = _trainer(expert_bias_coeff=coeff)
    before = [m.expert_bias.clone() for m in trainer.moe_layers]
    stats = trainer.train_step(*_stream().batch(0, B, S))
    assert stats.expert_load is not None and stats.expert_load.shape == (len(trainer.moe_layers), 4)
    assert (stats.expert_load.sum(1) == B * S).all()  # top-1: every token counted once per layer
    for moe, bias0, load in zip(trainer.moe_layers, before, stats.expert_load, strict=True):
        step = coeff * torch.sign(load.float().mean() - load.float())
        expected = bias0 + step
        expected -= expected.mean()
        torch.testing.assert_close(moe.expert_bias, expected, rtol=0, atol=1e-7)
        over, under = load.float() > load.float().mean(), load.float() < load.float().mean()
        if over.any() and under.any():  # over-loaded experts end below under-loaded ones
            assert moe.expert_bias[over].max() < moe.expert_bias[under].min()
    assert stats.load_imbalance >= 1.0
    off = _trainer(expert_bias_coeff=0.0)
    off.train_step(*_stream().batch(0, B, S))
    assert all(not m.expert_bias.any() for m in off.moe_layers)


def test_activation_checkpointing_changes_nothing():
    stream = _stream()
    plain = _trainer(seed=5)
    ckpt = _trainer(seed=5, activation_checkpointing=True)
    assert ckpt.model.gradient_checkpointing
    assert _run(plain, stream, 2) == _run(ckpt, stream, 2)
    for (name, a), b in zip(plain.model.named_parameters(), ckpt.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_fp8_linear_matches_float64(gen):
    from engine.ops.fp8_training import Fp8Recipe
    from engine.train import Fp8Linear
    from tests.tolerances import calc_diff, fp8_layer_max_diff

    linear = torch.nn.Linear(96, 80, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen) * 96**-0.5)
    fp8 = Fp8Linear.from_linear(linear, Fp8Recipe())
    assert fp8.weight is linear.weight
    x = torch.randn(2, 37, 96, generator=gen, requires_grad=True)
    g = torch.randn(2, 37, 80, generator=gen)
    y = fp8(x)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = linear.weight.detach().double().requires_grad_()
    y64 = x64 @ w64.t()
    y64.backward(g.double())
    limit = fp8_layer_max_diff(torch.float8_e4m3fn)
    for name, ours, ref in (("out", y, y64), ("dx", x.grad, x64.grad), ("dw", linear.weight.grad, w64.grad)):
        assert ours.shape == ref.shape, name
        assert calc_diff(ours.detach().double(), ref) < limit, name
    assert calc_diff(y.detach().double(), y64) > 0  # really quantised, not a float32 matmul


def test_fp8_precision_trains_or_says_why():
    torch.manual_seed(0)
    try:
        model = build_model(Llama4Config.preset("scout-debug"), precision="fp8", device="cpu")
    except PrecisionUnavailable as exc:
        assert "fp8" in str(exc)
        pytest.skip(f"FP8 training unavailable in this build: {exc}")
    assert all(m.precision == "fp8" for m in model.moe_layers())
    from engine.train import Fp8Linear

    assert all(isinstance(layer.self_attn.q_proj, Fp8Linear) for layer in model.layers)
    trainer = Trainer(model, TrainConfig(lr=3e-3))
    losses = _run(trainer, _stream(), 12)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0]


# --------------------------------------------------------------------------------------------
# Schedule and data
# --------------------------------------------------------------------------------------------
def test_learning_rate_schedule():
    config = TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [config.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert config.lr_at(4) == pytest.approx(1.0)
    assert config.lr_at(9) == pytest.approx(0.55)  # half-way down the cosine
    assert config.lr_at(14) == pytest.approx(0.1) and config.lr_at(100) == pytest.approx(0.1)
    assert TrainConfig(lr=0.5).lr_at(1000) == 0.5


def test_token_stream_batches_depend_only_on_seed_and_step():
    stream = _stream(seed=4)
    ids, labels = stream.batch(7, 3, 16)
    assert ids.shape == labels.shape == (3, 16)
    assert torch.equal(ids[:, 1:], labels[:, :-1])  # labels are the next tokens
    stream.batch(0, 3, 16)
    assert torch.equal(stream.batch(7, 3, 16)[0], ids)
    assert not torch.equal(_stream(seed=5).batch(7, 3, 16)[0], ids)
    train, val = stream.split(0.1)
    assert len(train) + len(val) == len(stream)
    with pytest.raises(ValueError, match="seq_len"):
        stream.batch(0, 1, len(stream))
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]
