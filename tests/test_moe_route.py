"""engine.ops.moe_route (torch.ops.llama4.moe_route) against engine.ops.reference.moe_route: exact
ids / counts / offsets / dispatch order, weights within fp32 rounding, edge cases, bad input,
autograd, opcheck, torch.compile and determinism. Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from memory_caps import host_allocation_cap
from tolerances import ROUTER_WEIGHTS_TOL, assert_grad_close

from bench.shapes import ROUTE_TEST, RouteShape
from engine import ops
from engine.ops import reference

SCORE_FUNCS = reference.SCORE_FUNCS
LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_FIELDS = ("topk_ids_TK", "tokens_per_expert_E", "expert_offsets", "sorted_slots", "slot_positions_TK")
ERRORS = (RuntimeError, ValueError, TypeError)


def shape_id(shape: RouteShape) -> str:
    return shape.id


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_logits(gen: torch.Generator, T: int, E: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """randn drawn in float32, then cast (so half dtypes see rounded normal values)."""
    return torch.randn(T, E, generator=gen).to(dtype).to(device)


def random_bias(gen: torch.Generator, E: int, device: torch.device) -> torch.Tensor:
    return torch.randn(E, generator=gen).to(device)


def route_both(logits_TE, top_k, *, score_func="sigmoid", expert_bias_E=None, renormalize=False):
    """(kernel result, reference result computed on CPU copies)."""
    out = ops.moe_route(logits_TE, top_k, score_func=score_func, expert_bias_E=expert_bias_E, renormalize=renormalize)
    ref = reference.moe_route(
        logits_TE.cpu(),
        top_k,
        score_func=score_func,
        expert_bias_E=None if expert_bias_E is None else expert_bias_E.cpu(),
        renormalize=renormalize,
    )
    return out, ref


def assert_route_matches(out: reference.RouteResult, ref: reference.RouteResult, device: torch.device) -> None:
    """Every output, in full: integer outputs bitwise, weights within the router tolerance."""
    assert isinstance(out, reference.RouteResult)
    for name in INT_FIELDS:
        got, want = getattr(out, name), getattr(ref, name)
        assert got.device.type == device.type, name
        assert got.dtype == torch.int32, (name, got.dtype)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    got_w = out.topk_weights_TK
    assert got_w.device.type == device.type
    assert got_w.dtype == torch.float32
    assert got_w.shape == ref.topk_weights_TK.shape
    torch.testing.assert_close(got_w.cpu(), ref.topk_weights_TK, equal_nan=True, **ROUTER_WEIGHTS_TOL)


def assert_results_equal(a: reference.RouteResult, b: reference.RouteResult) -> None:
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.cpu(), y.cpu()), f"{name} differs"


# --------------------------------------------------------------------------------------------
# The sweep over the shared shapes.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("shape", ROUTE_TEST, ids=shape_id)
def test_matches_reference(shape, score_func, dtype, renormalize, with_bias, device, gen):
    T, E, K = shape.tokens, shape.experts, shape.top_k
    logits_TE = random_logits(gen, T, E, dtype, device)
    bias_E = random_bias(gen, E, device) if with_bias else None
    logits_before = logits_TE.clone()
    out, ref = route_both(logits_TE, K, score_func=score_func, expert_bias_E=bias_E, renormalize=renormalize)
    assert_route_matches(out, ref, device)
    assert torch.equal(logits_TE, logits_before), "moe_route modified its input"


# --------------------------------------------------------------------------------------------
# Edge cases.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_no_tokens(score_func, device):
    E, K = 16, 2
    out, ref = route_both(torch.empty(0, E, device=device), K, score_func=score_func, renormalize=True)
    assert out.topk_weights_TK.shape == (0, K) and out.topk_ids_TK.shape == (0, K)
    assert out.sorted_slots.shape == (0,) and out.slot_positions_TK.shape == (0, K)
    assert torch.equal(out.tokens_per_expert_E.cpu(), torch.zeros(E, dtype=torch.int32))
    assert torch.equal(out.expert_offsets.cpu(), torch.zeros(E + 1, dtype=torch.int32))
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_single_expert(score_func, device, gen):
    T = 50
    out, ref = route_both(random_logits(gen, T, 1, torch.float32, device), 1, score_func=score_func)
    assert torch.equal(out.topk_ids_TK.cpu(), torch.zeros(T, 1, dtype=torch.int32))
    assert torch.equal(out.tokens_per_expert_E.cpu(), torch.tensor([T], dtype=torch.int32))
    assert torch.equal(out.expert_offsets.cpu(), torch.tensor([0, T], dtype=torch.int32))
    assert torch.equal(out.sorted_slots.cpu(), torch.arange(T, dtype=torch.int32))
    if score_func == "softmax":  # a softmax over one expert is exactly 1
        assert torch.equal(out.topk_weights_TK.cpu(), torch.ones(T, 1))
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_top_k_equals_num_experts(score_func, renormalize, device, gen):
    T, E = 33, 8
    out, ref = route_both(
        random_logits(gen, T, E, torch.float32, device), E, score_func=score_func, renormalize=renormalize
    )
    # Every token picks every expert once.
    assert torch.equal(out.topk_ids_TK.sort(-1).values.cpu(), torch.arange(E, dtype=torch.int32).expand(T, E))
    assert torch.equal(out.tokens_per_expert_E.cpu(), torch.full((E,), T, dtype=torch.int32))
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_all_equal_logits_pick_lowest_indices(score_func, dtype, device):
    T, E, K = 4, 8, 3
    out, ref = route_both(torch.full((T, E), 0.5, dtype=dtype, device=device), K, score_func=score_func)
    assert torch.equal(out.topk_ids_TK.cpu(), torch.arange(K, dtype=torch.int32).expand(T, K))
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_many_ties_from_integer_logits(score_func, dtype, with_bias, device, gen):
    """Logits from a handful of integers: most keys tie, and ties must go to the lower index."""
    T, E, K = 200, 37, 5
    logits_TE = torch.randint(-2, 3, (T, E), generator=gen).to(dtype).to(device)
    # An integer-valued bias keeps the keys tied (exact float32 sums).
    bias_E = torch.randint(0, 2, (E,), generator=gen).float().to(device) if with_bias else None
    out, ref = route_both(logits_TE, K, score_func=score_func, expert_bias_E=bias_E, renormalize=True)
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_saturated_bf16_logits(score_func, device, gen):
    """|logit| > 17 saturates sigmoid in bf16 but not the selection: ids follow the logits, weights
    come from float32 maths on the logit (sigmoid(20) as float64 rounded to float32)."""
    values = torch.tensor([-100.0, -88.0, -30.0, -20.0, 18.0, 20.0, 24.0, 32.0, 100.0])
    logits_TE = values[torch.randint(len(values), (64, 32), generator=gen)].bfloat16().to(device)
    out, ref = route_both(logits_TE, 4, score_func=score_func)
    assert_route_matches(out, ref, device)

    # Hand-checked: 24 > 20 = 20 > 18 > -100; the tie between experts 0 and 3 goes to 0.
    row_TE = torch.tensor([[20.0, 18.0, 24.0, 20.0, -100.0]], dtype=torch.bfloat16, device=device)
    out, ref = route_both(row_TE, 3, score_func=score_func)
    assert out.topk_ids_TK.cpu().tolist() == [[2, 0, 3]]
    if score_func == "sigmoid":
        expected_TK = torch.sigmoid(torch.tensor([[24.0, 20.0, 20.0]], dtype=torch.float64)).float()
        torch.testing.assert_close(out.topk_weights_TK.cpu(), expected_TK, **ROUTER_WEIGHTS_TOL)
    assert_route_matches(out, ref, device)


def test_expert_without_tokens(device, gen):
    T, E, K = 40, 8, 2
    logits_TE = random_logits(gen, T, E, torch.float32, device)
    logits_TE[:, 3] = -1e4
    out, ref = route_both(logits_TE, K)
    counts_E, offsets = out.tokens_per_expert_E.cpu(), out.expert_offsets.cpu()
    assert counts_E[3] == 0
    assert offsets[3] == offsets[4]
    assert offsets[-1] == T * K
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_id)
def test_nan_logits_sigmoid(dtype, renormalize, device, gen):
    """NaN keys rank below every number (-inf included); a chosen NaN expert has a NaN weight."""
    T, E, K = 6, 8, 3
    logits_TE = torch.randn(T, E, generator=gen)
    logits_TE[0, 2] = float("nan")  # one NaN: never chosen
    logits_TE[1, logits_TE[1].argmax()] = float("nan")  # NaN where the best expert was
    logits_TE[2, 2:] = float("nan")  # 6 NaN, 2 numbers: one NaN expert (index 2) is chosen
    logits_TE[3, :] = float("nan")  # all NaN: experts 0, 1, 2
    logits_TE[4, 1:] = float("nan")  # NaN below -inf
    logits_TE[4, 0] = float("-inf")
    logits_TE = logits_TE.to(dtype).to(device)
    out, ref = route_both(logits_TE, K, renormalize=renormalize)
    ids = out.topk_ids_TK.cpu().tolist()
    assert 2 not in ids[0]
    assert sorted(ids[2][:2]) == [0, 1] and ids[2][2] == 2
    assert ids[3] == [0, 1, 2] and ids[4] == [0, 1, 2]
    chosen_TK = torch.gather(logits_TE.cpu().float(), 1, out.topk_ids_TK.cpu().long())
    if not renormalize:
        assert torch.equal(out.topk_weights_TK.cpu().isnan(), chosen_TK.isnan())
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_id)
def test_nan_logits_softmax(dtype, renormalize, device, gen):
    """Softmax is over the whole row: one NaN anywhere makes all of that row's weights NaN."""
    T, E, K = 5, 8, 2
    logits_TE = torch.randn(T, E, generator=gen)
    logits_TE[0, 5] = float("nan")
    logits_TE[2, :] = float("nan")
    logits_TE = logits_TE.to(dtype).to(device)
    out, ref = route_both(logits_TE, K, score_func="softmax", renormalize=renormalize)
    weights_TK = out.topk_weights_TK.cpu()
    assert weights_TK[0].isnan().all() and weights_TK[2].isnan().all()
    assert not weights_TK[[1, 3, 4]].isnan().any()
    assert 5 not in out.topk_ids_TK[0].tolist()
    assert_route_matches(out, ref, device)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_signed_zero_tie(score_func, dtype, device):
    """-0.0 == +0.0: the lower index wins whichever sign it has (no ordering by bit pattern)."""
    logits_TE = torch.tensor([[-1.0, -0.0, 0.0, -1.0], [-1.0, 0.0, -0.0, -1.0]], dtype=dtype, device=device)
    for K in (1, 2):
        out, ref = route_both(logits_TE, K, score_func=score_func)
        assert out.topk_ids_TK.cpu().tolist() == [[1, 2][:K]] * 2
        assert_route_matches(out, ref, device)


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_infinite_logits(score_func, renormalize, device, gen):
    T, E, K = 6, 8, 3
    logits_TE = torch.randn(T, E, generator=gen)
    logits_TE[0, :6] = float("-inf")  # fewer than K numbers: -inf experts fill in, lowest index first
    logits_TE[1, :] = float("-inf")
    logits_TE[2, 4] = float("inf")
    logits_TE[3, 1::2] = float("-inf")
    logits_TE = logits_TE.to(device)
    out, ref = route_both(logits_TE, K, score_func=score_func, renormalize=renormalize)
    ids = out.topk_ids_TK.cpu().tolist()
    assert sorted(ids[0]) == [0, 6, 7] and ids[0][2] == 0
    assert ids[1] == [0, 1, 2]
    assert ids[2][0] == 4
    if score_func == "sigmoid":  # sigmoid(-inf) = 0, and a zero sum renormalises to 0, not NaN
        assert torch.equal(out.topk_weights_TK[1].cpu(), torch.zeros(K))
    assert_route_matches(out, ref, device)


# --------------------------------------------------------------------------------------------
# Sizes that would overflow the int32 outputs.
# --------------------------------------------------------------------------------------------


def test_too_many_slots_rejected_before_work(device):
    """T*K > INT32_MAX cannot be indexed by the int32 outputs: a clear error, no allocation."""
    T = 2**30 + 1
    logits_TE = torch.zeros(1, 2, device=device).expand(T, 2)  # stride-0 rows: no memory
    cap = host_allocation_cap(1 << 30) if device.type == "cpu" else contextlib.nullcontext()
    with cap, pytest.raises(ERRORS, match=r"top_k|int32"):
        ops.moe_route(logits_TE, 2)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# --------------------------------------------------------------------------------------------
def _bad_route_call(case: str, device: torch.device, gen: torch.Generator):
    T, E = 8, 16
    logits_TE = random_logits(gen, T, E, torch.float32, device)
    bias_E = random_bias(gen, E, device)
    kwargs = dict(router_logits_TE=logits_TE, top_k=2)
    if case == "logits_1d":
        kwargs["router_logits_TE"] = logits_TE[0]
    elif case == "logits_3d":
        kwargs["router_logits_TE"] = logits_TE.view(2, 4, E)
    elif case == "logits_int32":
        kwargs["router_logits_TE"] = torch.randint(-3, 3, (T, E), generator=gen, dtype=torch.int32).to(device)
    elif case == "logits_float64":
        kwargs["router_logits_TE"] = logits_TE.double()
    elif case == "top_k_0":
        kwargs["top_k"] = 0
    elif case == "top_k_negative":
        kwargs["top_k"] = -1
    elif case == "top_k_above_E":
        kwargs["top_k"] = E + 1
    elif case == "bias_shape":
        kwargs["expert_bias_E"] = random_bias(gen, E + 1, device)
    elif case == "bias_2d":
        kwargs["expert_bias_E"] = bias_E.view(1, E)
    elif case == "bias_float16":
        kwargs["expert_bias_E"] = bias_E.half()
    elif case == "score_func":
        kwargs["score_func"] = "relu"
    else:
        raise AssertionError(case)
    return kwargs


BAD_ROUTE_CASES = {
    "logits_1d": "router_logits",
    "logits_3d": "router_logits",
    "logits_int32": "router_logits",
    "logits_float64": "router_logits",
    "top_k_0": "top_k",
    "top_k_negative": "top_k",
    "top_k_above_E": "top_k",
    "bias_shape": "expert_bias",
    "bias_2d": "expert_bias",
    "bias_float16": "expert_bias",
    "score_func": "score_func",
}


@pytest.mark.parametrize("case", list(BAD_ROUTE_CASES))
def test_bad_input_names_the_argument(case, device, gen):
    kwargs = _bad_route_call(case, device, gen)
    with pytest.raises(ERRORS, match=BAD_ROUTE_CASES[case]):
        ops.moe_route(**kwargs)


def test_non_unit_expert_stride_rejected(device, gen):
    logits_TE = random_logits(gen, 8, 64, torch.float32, device)[:, ::2]
    with pytest.raises(ERRORS, match="router_logits") as excinfo:
        ops.moe_route(logits_TE, 2)
    assert "stride" in str(excinfo.value)


@pytest.mark.gpu
@pytest.mark.parametrize("bias_device", ["cpu", "cuda"])
def test_bias_on_another_device_rejected(bias_device, gen):
    logits_device = "cuda" if bias_device == "cpu" else "cpu"
    logits_TE = random_logits(gen, 8, 16, torch.float32, torch.device(logits_device))
    bias_E = random_bias(gen, 16, torch.device(bias_device))
    with pytest.raises(ERRORS, match="expert_bias"):
        ops.moe_route(logits_TE, 2, expert_bias_E=bias_E)


# --------------------------------------------------------------------------------------------
# Layouts.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [ROUTE_TEST[2], ROUTE_TEST[5], ROUTE_TEST[8]], ids=shape_id)
def test_row_strided_logits(shape, dtype, device, gen):
    """A column slice of a wider tensor (row stride E + 7) routes like its contiguous copy."""
    T, E, K = shape.tokens, shape.experts, shape.top_k
    wide_TW = random_logits(gen, T, E + 7, dtype, device)
    logits_TE = wide_TW[:, 3 : 3 + E]
    assert not logits_TE.is_contiguous()
    bias_E = random_bias(gen, E, device)
    kwargs = dict(score_func="softmax", expert_bias_E=bias_E, renormalize=True)
    strided = ops.moe_route(logits_TE, K, **kwargs)
    assert_results_equal(strided, ops.moe_route(logits_TE.contiguous(), K, **kwargs))
    _, ref = route_both(logits_TE, K, **kwargs)
    assert_route_matches(strided, ref, device)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_broadcast_rows(score_func, device, gen):
    """Row stride 0 (one row expanded to T tokens) is allowed."""
    T, E, K = 65, 37, 3
    logits_TE = random_logits(gen, 1, E, torch.float32, device).expand(T, E)
    out, ref = route_both(logits_TE, K, score_func=score_func)
    assert (out.topk_ids_TK == out.topk_ids_TK[:1]).all()
    assert_route_matches(out, ref, device)


# --------------------------------------------------------------------------------------------
# Autograd: d(sum(w * g)) / d logits against autograd through float64 maths.
# --------------------------------------------------------------------------------------------
def weights_f64(logits_TE: torch.Tensor, ids_TK: torch.Tensor, score_func: str, renormalize: bool) -> torch.Tensor:
    """The routing weights of the given experts, differentiable, in float64."""
    logits_TE = logits_TE.double()
    if score_func == "sigmoid":
        weights_TK = torch.sigmoid(torch.gather(logits_TE, 1, ids_TK))
    else:
        weights_TK = torch.gather(torch.softmax(logits_TE, dim=-1), 1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return weights_TK


# Every shape in float32; half-precision logits (whose gradient is rounded to their dtype) on two.
GRAD_CASES = [(shape, torch.float32) for shape in ROUTE_TEST] + [
    (shape, dtype) for shape in (ROUTE_TEST[3], ROUTE_TEST[5]) for dtype in (torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize(("shape", "dtype"), GRAD_CASES, ids=[f"{s.id}-{dtype_id(d)}" for s, d in GRAD_CASES])
def test_weight_gradient(shape, dtype, score_func, renormalize, with_bias, device, gen):
    T, E, K = shape.tokens, shape.experts, shape.top_k
    logits_TE = random_logits(gen, T, E, dtype, device).requires_grad_()
    bias_E = random_bias(gen, E, device) if with_bias else None
    g_TK = torch.randn(T, K, generator=gen)
    out = ops.moe_route(logits_TE, K, score_func=score_func, expert_bias_E=bias_E, renormalize=renormalize)
    (out.topk_weights_TK * g_TK.to(device)).sum().backward()

    logits64_TE = logits_TE.detach().cpu().double().requires_grad_()
    (weights_f64(logits64_TE, out.topk_ids_TK.cpu().long(), score_func, renormalize) * g_TK.double()).sum().backward()
    assert logits_TE.grad.dtype == dtype
    assert_grad_close(logits_TE.grad, logits64_TE.grad, upstream_max=g_TK.abs().max().item())


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_weight_gradient_of_sum(score_func, device, gen):
    """weights.sum().backward() hands the op a stride-0 (expanded) gradient."""
    T, E, K = 19, 16, 3
    logits_TE = random_logits(gen, T, E, torch.float32, device).requires_grad_()
    out = ops.moe_route(logits_TE, K, score_func=score_func, renormalize=True)
    out.topk_weights_TK.sum().backward()
    logits64_TE = logits_TE.detach().cpu().double().requires_grad_()
    weights_f64(logits64_TE, out.topk_ids_TK.cpu().long(), score_func, True).sum().backward()
    assert_grad_close(logits_TE.grad, logits64_TE.grad, upstream_max=1.0)


# --------------------------------------------------------------------------------------------
# A real torch op: opcheck, torch.compile.
# --------------------------------------------------------------------------------------------
OPCHECK_CASES = [
    # (T, E, K, score_func, with_bias, renormalize, dtype, requires_grad)
    (7, 16, 1, "sigmoid", False, False, torch.float32, True),
    (33, 37, 3, "softmax", True, True, torch.float32, True),
    (5, 6, 6, "sigmoid", True, True, torch.bfloat16, False),
    (64, 128, 8, "softmax", False, False, torch.float16, False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-{dtype_id(c[6])}")
def test_opcheck(case, device, gen):
    T, E, K, score_func, with_bias, renormalize, dtype, requires_grad = case
    logits_TE = random_logits(gen, T, E, dtype, device).requires_grad_(requires_grad)
    bias_E = random_bias(gen, E, device) if with_bias else None
    torch.library.opcheck(torch.ops.llama4.moe_route.default, (logits_TE, K, score_func, bias_E, renormalize))


def _route_outputs(logits_TE, bias_E, top_k, score_func):
    route = ops.moe_route(logits_TE, top_k, score_func=score_func, expert_bias_E=bias_E, renormalize=True)
    # Use the result, as a model would: scale the weights, shift the offsets.
    return (
        route.topk_weights_TK * 2.0,
        route.topk_ids_TK,
        route.expert_offsets[1:] - route.expert_offsets[:-1],
        *route[2:],
    )


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_compile_fullgraph(score_func, device, gen):
    def fn(logits_TE, bias_E):
        return _route_outputs(logits_TE, bias_E, 3, score_func)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    E = 37
    bias_E = random_bias(gen, E, device)
    for T in (5, 17, 130):
        logits_TE = random_logits(gen, T, E, torch.float32, device)
        for got, want in zip(compiled(logits_TE, bias_E), fn(logits_TE, bias_E), strict=True):
            assert torch.equal(got, want)


def test_compile_fullgraph_inductor(device, gen):
    """The default backend once, on a small case (inductor compiles C++/Triton: slow)."""

    def fn(logits_TE):
        return _route_outputs(logits_TE, None, 2, "sigmoid")

    compiled = torch.compile(fn, fullgraph=True)
    logits_TE = random_logits(gen, 9, 16, torch.float32, device)
    for got, want in zip(compiled(logits_TE), fn(logits_TE), strict=True):
        assert torch.equal(got, want)


def test_compile_backward(device, gen):
    def fn(logits_TE, g_TK):
        route = ops.moe_route(logits_TE, 2, score_func="softmax", renormalize=True)
        return (route.topk_weights_TK * g_TK).sum()

    T, E = 23, 16
    logits_TE = random_logits(gen, T, E, torch.float32, device)
    g_TK = torch.randn(T, 2, generator=gen).to(device)
    grads = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaf_TE = logits_TE.clone().requires_grad_()
        f(leaf_TE, g_TK).backward()
        grads.append(leaf_TE.grad)
    assert torch.equal(grads[0], grads[1])


# --------------------------------------------------------------------------------------------
# Determinism.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("shape", [ROUTE_TEST[3], ROUTE_TEST[7], ROUTE_TEST[8]], ids=shape_id)
def test_deterministic(shape, score_func, device, gen):
    T, E, K = shape.tokens, shape.experts, shape.top_k
    logits_TE = random_logits(gen, T, E, torch.bfloat16, device)
    bias_E = random_bias(gen, E, device)
    kwargs = dict(score_func=score_func, expert_bias_E=bias_E, renormalize=True)
    assert_results_equal(ops.moe_route(logits_TE, K, **kwargs), ops.moe_route(logits_TE, K, **kwargs))
