"""engine.ops.chunked_cross_entropy against torch.nn.functional.cross_entropy on the full logits, in
float64 and in the input dtype: loss, gradients of hidden and weight, ignore_index, chunk boundaries,
reductions, and input validation. Legend: T tokens, D width, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.ops import chunked_cross_entropy
from engine.ops.loss import IGNORE_INDEX, default_chunk_size
from tests.tolerances import assert_loss_close


def _inputs(gen, T, D, V, dtype, device, ignore_frac=0.2):
    h_TD = (torch.randn(T, D, generator=gen) * 2.0).to(device=device, dtype=dtype)
    w_VD = (torch.randn(V, D, generator=gen) * D**-0.5).to(device=device, dtype=dtype)
    labels_T = torch.randint(0, V, (T,), generator=gen)
    labels_T[torch.rand(T, generator=gen) < ignore_frac] = IGNORE_INDEX
    return h_TD, w_VD, labels_T.to(device)


def _torch_loss(h_TD, w_VD, labels_T, reduction="mean"):
    return F.cross_entropy(h_TD @ w_VD.t(), labels_T, ignore_index=IGNORE_INDEX, reduction=reduction)


def _value_and_grads(fn, h_TD, w_VD, labels_T, g=None):
    h = h_TD.detach().clone().requires_grad_()
    w = w_VD.detach().clone().requires_grad_()
    loss = fn(h, w, labels_T)
    loss.backward(g if g is not None else None)
    return loss.detach(), h.grad, w.grad


# (T, D, V, chunk): one chunk, many chunks with a ragged last one, chunk 1, T = 1, a vocab not a multiple of 8.
CASES = [(16, 32, 50, None), (67, 24, 101, 16), (9, 8, 13, 1), (1, 16, 40, 4), (130, 64, 257, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D, V, chunk", CASES)
def test_matches_torch_cross_entropy(T, D, V, chunk, dtype, device, gen):
    h_TD, w_VD, labels_T = _inputs(gen, T, D, V, dtype, device)
    ours = _value_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=chunk), h_TD, w_VD, labels_T)
    plain = _value_and_grads(_torch_loss, h_TD, w_VD, labels_T)
    ref64 = _value_and_grads(_torch_loss, h_TD.double(), w_VD.double(), labels_T)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    for actual, same_dtype, expected in zip(ours, plain, ref64, strict=True):
        assert_loss_close(actual, same_dtype, expected)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_upstream_gradient(reduction, gen):
    h_TD, w_VD, labels_T = _inputs(gen, 45, 16, 70, torch.float32, "cpu")
    g = torch.randn(45, generator=gen) if reduction == "none" else torch.tensor(1.7)
    ours = _value_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=8, reduction=reduction), h_TD, w_VD, labels_T, g
    )
    fn = lambda h, w, y: _torch_loss(h, w, y, reduction)  # noqa: E731
    plain = _value_and_grads(fn, h_TD, w_VD, labels_T, g)
    ref64 = _value_and_grads(fn, h_TD.double(), w_VD.double(), labels_T, g.double())
    for actual, same_dtype, expected in zip(ours, plain, ref64, strict=True):
        assert_loss_close(actual, same_dtype, expected)
    if reduction == "none":
        assert torch.all(ours[0][labels_T == IGNORE_INDEX] == 0)


def test_every_label_ignored_gives_zero_loss_and_gradient(gen):
    h_TD, w_VD, _ = _inputs(gen, 12, 8, 20, torch.float32, "cpu")
    labels_T = torch.full((12,), IGNORE_INDEX)
    loss, dh, dw = _value_and_grads(chunked_cross_entropy, h_TD, w_VD, labels_T)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_leading_dims_are_flattened(gen):
    h_TD, w_VD, labels_T = _inputs(gen, 2 * 19, 16, 33, torch.float32, "cpu")
    h_BSD, labels_BS = h_TD.view(2, 19, 16), labels_T.view(2, 19)
    ref64 = _torch_loss(h_TD.double(), w_VD.double(), labels_T, "none")
    plain = _torch_loss(h_TD, w_VD, labels_T, "none")
    for chunk in (1, 5, 19, 37, 38):
        ours = chunked_cross_entropy(h_BSD, w_VD, labels_BS, reduction="none", chunk_size=chunk)
        assert_loss_close(ours, plain, ref64)


def test_default_chunk_bounds_logit_memory():
    assert default_chunk_size(8192, 202048) % 128 == 0
    assert default_chunk_size(8192, 202048) * 202048 * 4 <= 512 << 20
    assert default_chunk_size(7, 202048) == 7
    assert default_chunk_size(10, 10**9) == 1


def test_bad_inputs_name_the_argument():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight_VD"):
        chunked_cross_entropy(h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match="labels_T"):
        chunked_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels_T"):
        chunked_cross_entropy(h, w, torch.zeros(4))
    with pytest.raises(TypeError, match="share a dtype"):
        chunked_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match=r"labels_T must be in \[0, V=10\)"):
        chunked_cross_entropy(h, w, torch.tensor([0, 10, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, y, chunk_size=0)


def test_logits_exist_one_chunk_at_a_time(gen, monkeypatch):
    import engine.ops.loss as loss_mod

    shapes = []
    real = loss_mod._mm_f32
    monkeypatch.setattr(loss_mod, "_mm_f32", lambda a, b: shapes.append((a.shape[0], b.shape[1])) or real(a, b))
    h_TD, w_VD, labels_T = _inputs(gen, 50, 16, 97, torch.float32, "cpu")
    _value_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=8), h_TD, w_VD, labels_T)
    logits = [s for s in shapes if s[1] == 97]  # forward and backward recomputation: [<= 8, V]
    assert len(logits) == 2 * 7 and max(rows for rows, _ in logits) == 8
    # Every other GEMM is a chunk's hidden gradient [<= 8, D] or a weight-gradient increment [V, D].
    assert all(s in ((97, 16),) or (s[0] <= 8 and s[1] == 16) for s in shapes if s[1] != 97)
