"""engine.ops.moe_permute (dispatch) and moe_unpermute (combine) against engine.ops.reference, with
and without routing weights: values, gradients, widths and layouts, bad input, opcheck,
torch.compile, determinism; and engine.build_info(). Legend: T tokens, E experts, K top-k,
D row width, N = T*K routed rows.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_grad_close, assert_unpermute_close, permute_tol

import engine
from bench.shapes import ROUTE_TEST, RouteShape
from engine import ops
from engine.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ERRORS = (RuntimeError, ValueError, TypeError)


def shape_id(shape: RouteShape) -> str:
    return f"{shape.id}-D{shape.width}"


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_route(gen: torch.Generator, T: int, E: int, K: int, device: torch.device) -> reference.RouteResult:
    """A valid route from the reference router (so these tests do not depend on the route kernel)."""
    return reference.moe_route(torch.randn(T, E, generator=gen).to(device), K)


def randn(gen: torch.Generator, *size: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*size, generator=gen).to(dtype).to(device)


def cpu_route(route: reference.RouteResult) -> reference.RouteResult:
    return reference.RouteResult(*(t.cpu() for t in route))


def check_permute(x_TD, route, w_TK) -> torch.Tensor:
    """Runs moe_permute and compares the full output with the reference (computed on CPU)."""
    out_ND = ops.moe_permute(x_TD, route, w_TK)
    ref_ND = reference.moe_permute(x_TD.cpu(), cpu_route(route), None if w_TK is None else w_TK.cpu())
    assert out_ND.dtype == x_TD.dtype and out_ND.device == x_TD.device
    assert out_ND.shape == ref_ND.shape
    if w_TK is None:  # a pure copy of rows
        assert torch.equal(out_ND.cpu(), ref_ND)
    else:
        torch.testing.assert_close(out_ND.cpu(), ref_ND, **permute_tol(x_TD.dtype))
    return out_ND


def check_unpermute(y_ND, route, w_TK) -> torch.Tensor:
    """Runs moe_unpermute and compares the full output with the reference (computed on CPU)."""
    K = route.slot_positions_TK.shape[1]
    out_TD = ops.moe_unpermute(y_ND, route, w_TK)
    route_cpu = cpu_route(route)
    w_cpu = None if w_TK is None else w_TK.cpu()
    ref_TD = reference.moe_unpermute(y_ND.cpu(), route_cpu, w_cpu)
    assert out_TD.dtype == y_ND.dtype and out_TD.device == y_ND.device
    if w_TK is None and K == 1:  # one term per token: a pure copy
        assert torch.equal(out_TD.cpu(), ref_TD)
    abs_sum_TD = reference.moe_unpermute(y_ND.cpu().double().abs(), route_cpu, None if w_TK is None else w_cpu.abs())
    assert_unpermute_close(out_TD, ref_TD, abs_sum_TD, K)
    return out_TD


# --------------------------------------------------------------------------------------------
# The sweep over the shared shapes.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ROUTE_TEST, ids=shape_id)
def test_permute_matches_reference(shape, dtype, weighted, device, gen):
    T, E, K, D = shape.tokens, shape.experts, shape.top_k, shape.width
    route = make_route(gen, T, E, K, device)
    x_TD = randn(gen, T, D, dtype=dtype, device=device)
    w_TK = randn(gen, T, K, device=device) if weighted else None
    x_before = x_TD.clone()
    out_ND = check_permute(x_TD, route, w_TK)
    assert out_ND.shape == (T * K, D)
    assert torch.equal(x_TD, x_before), "moe_permute modified its input"


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ROUTE_TEST, ids=shape_id)
def test_unpermute_matches_reference(shape, dtype, weighted, device, gen):
    T, E, K, D = shape.tokens, shape.experts, shape.top_k, shape.width
    route = make_route(gen, T, E, K, device)
    y_ND = randn(gen, T * K, D, dtype=dtype, device=device)
    w_TK = randn(gen, T, K, device=device) if weighted else None
    y_before = y_ND.clone()
    out_TD = check_unpermute(y_ND, route, w_TK)
    assert out_TD.shape == (T, D)
    assert torch.equal(y_ND, y_before), "moe_unpermute modified its input"


@pytest.mark.parametrize("shape", ROUTE_TEST, ids=shape_id)
def test_roundtrip_unweighted_is_k_times_x(shape, device, gen):
    """Combining the K dispatched copies of each row gives K * x (float32, up to the K-term sum)."""
    T, E, K, D = shape.tokens, shape.experts, shape.top_k, shape.width
    route = make_route(gen, T, E, K, device)
    x_TD = randn(gen, T, D, device=device)
    out_TD = ops.moe_unpermute(ops.moe_permute(x_TD, route), route)
    expected_TD = x_TD.double().cpu() * K
    assert_unpermute_close(out_TD, expected_TD.float(), expected_TD.abs(), K)
    if K == 1:
        assert torch.equal(out_TD, x_TD)


# --------------------------------------------------------------------------------------------
# Widths (vector and scalar paths) and layouts.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 3, 4, 7, 8, 9, 13, 16, 32, 33, 264])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_widths(D, dtype, device, gen):
    """D a multiple of 8 (16-byte vector path for half types) and not (scalar path)."""
    T, E, K = 37, 16, 2
    route = make_route(gen, T, E, K, device)
    w_TK = randn(gen, T, K, device=device)
    for weights in (None, w_TK):
        check_permute(randn(gen, T, D, dtype=dtype, device=device), route, weights)
        check_unpermute(randn(gen, T * K, D, dtype=dtype, device=device), route, weights)


# (extra columns, first column): row stride D + extra, rows starting `first` elements in.
LAYOUTS = [(8, 0), (3, 0), (5, 1), (16, 8)]


@pytest.mark.parametrize(("extra", "first"), LAYOUTS, ids=[f"stride+{e}-offset{f}" for e, f in LAYOUTS])
@pytest.mark.parametrize("D", [8, 32, 13])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_row_strided_inputs(dtype, D, extra, first, device, gen):
    """A column slice of a wider tensor (any row stride, any alignment) works like its copy."""
    T, E, K = 29, 8, 3
    route = make_route(gen, T, E, K, device)
    w_TK = randn(gen, T, K, device=device)
    x_TD = randn(gen, T, D + extra, dtype=dtype, device=device)[:, first : first + D]
    y_ND = randn(gen, T * K, D + extra, dtype=dtype, device=device)[:, first : first + D]
    assert not x_TD.is_contiguous() and not y_ND.is_contiguous()
    for weights in (None, w_TK):
        out_ND = check_permute(x_TD, route, weights)
        assert torch.equal(out_ND, ops.moe_permute(x_TD.contiguous(), route, weights))
        out_TD = check_unpermute(y_ND, route, weights)
        assert torch.equal(out_TD, ops.moe_unpermute(y_ND.contiguous(), route, weights))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_no_tokens(weighted, device, gen):
    E, K, D = 16, 2, 24
    route = reference.moe_route(torch.empty(0, E, device=device), K)
    w_TK = torch.empty(0, K, device=device) if weighted else None
    out_ND = ops.moe_permute(torch.empty(0, D, device=device), route, w_TK)
    assert out_ND.shape == (0, D) and out_ND.device.type == device.type
    out_TD = ops.moe_unpermute(torch.empty(0, D, device=device), route, w_TK)
    assert out_TD.shape == (0, D) and out_TD.device.type == device.type


# --------------------------------------------------------------------------------------------
# Gradients against autograd through the reference in float64.
# --------------------------------------------------------------------------------------------
GRAD_CASES = [(shape, torch.float32) for shape in ROUTE_TEST] + [
    (shape, dtype) for shape in (ROUTE_TEST[3], ROUTE_TEST[5]) for dtype in (torch.float16, torch.bfloat16)
]
GRAD_IDS = [f"{shape_id(s)}-{dtype_id(d)}" for s, d in GRAD_CASES]


def reference_grads(op, inp, route, w_TK, g_out):
    """Gradients of sum(op(inp, route, w) * g_out) w.r.t. inp and w, computed in float64."""
    inp64 = inp.detach().cpu().double().requires_grad_()
    w64 = None if w_TK is None else w_TK.detach().cpu().double().requires_grad_()
    (op(inp64, cpu_route(route), w64) * g_out.cpu().double()).sum().backward()
    return inp64.grad, None if w64 is None else w64.grad


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize(("shape", "dtype"), GRAD_CASES, ids=GRAD_IDS)
def test_permute_gradients(shape, dtype, weighted, device, gen):
    T, E, K, D = shape.tokens, shape.experts, shape.top_k, shape.width
    route = make_route(gen, T, E, K, device)
    x_TD = randn(gen, T, D, dtype=dtype, device=device).requires_grad_()
    w_TK = randn(gen, T, K, device=device).requires_grad_() if weighted else None
    g_ND = randn(gen, T * K, D, dtype=dtype, device=device)
    ops.moe_permute(x_TD, route, w_TK).backward(g_ND)
    dx64_TD, dw64_TK = reference_grads(reference.moe_permute, x_TD, route, w_TK, g_ND)

    # dx is a combine of g: the unpermute bound applies, in x's dtype.
    assert x_TD.grad.dtype == dtype
    abs_sum_TD = reference.moe_unpermute(
        g_ND.cpu().double().abs(), cpu_route(route), None if w_TK is None else w_TK.detach().cpu().abs()
    )
    assert_unpermute_close(x_TD.grad, dx64_TD.to(dtype), abs_sum_TD, K)
    if weighted:
        assert w_TK.grad.dtype == torch.float32
        assert_grad_close(w_TK.grad, dw64_TK)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize(("shape", "dtype"), GRAD_CASES, ids=GRAD_IDS)
def test_unpermute_gradients(shape, dtype, weighted, device, gen):
    T, E, K, D = shape.tokens, shape.experts, shape.top_k, shape.width
    route = make_route(gen, T, E, K, device)
    y_ND = randn(gen, T * K, D, dtype=dtype, device=device).requires_grad_()
    w_TK = randn(gen, T, K, device=device).requires_grad_() if weighted else None
    g_TD = randn(gen, T, D, dtype=dtype, device=device)
    ops.moe_unpermute(y_ND, route, w_TK).backward(g_TD)
    dy64_ND, dw64_TK = reference_grads(reference.moe_unpermute, y_ND, route, w_TK, g_TD)

    # dy is a dispatch of g: exact without weights, one rounding of the fp32 product with them.
    assert y_ND.grad.dtype == dtype
    if weighted:
        torch.testing.assert_close(y_ND.grad.cpu(), dy64_ND.to(dtype), **permute_tol(dtype))
        assert w_TK.grad.dtype == torch.float32
        assert_grad_close(w_TK.grad, dw64_TK)
    else:
        assert torch.equal(y_ND.grad.cpu(), dy64_ND.to(dtype))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("op_name", ["moe_permute", "moe_unpermute"])
def test_gradient_of_sum(op_name, weighted, device, gen):
    """out.sum().backward() hands the backward a stride-0 (expanded) gradient: it must still work."""
    T, E, K, D = 21, 8, 2, 16
    route = make_route(gen, T, E, K, device)
    rows = T if op_name == "moe_permute" else T * K
    inp = randn(gen, rows, D, device=device).requires_grad_()
    w_TK = randn(gen, T, K, device=device).requires_grad_() if weighted else None
    getattr(ops, op_name)(inp, route, w_TK).sum().backward()
    ones = torch.ones(T * K if op_name == "moe_permute" else T, D)
    d_inp64, dw64_TK = reference_grads(getattr(reference, op_name), inp, route, w_TK, ones)
    assert_grad_close(inp.grad, d_inp64)
    if weighted:
        assert_grad_close(w_TK.grad, dw64_TK)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# --------------------------------------------------------------------------------------------
T_BAD, E_BAD, K_BAD, D_BAD = 8, 16, 2, 32


def _bad_call(case: str, device: torch.device, gen: torch.Generator):
    """(op, args) for one bad input; everything else is valid."""
    T, E, K, D = T_BAD, E_BAD, K_BAD, D_BAD
    route = make_route(gen, T, E, K, device)
    x_TD = randn(gen, T, D, device=device)
    y_ND = randn(gen, T * K, D, device=device)
    w_TK = randn(gen, T, K, device=device)
    permute, unpermute = ops.moe_permute, ops.moe_unpermute
    cases = {
        "x_1d": (permute, (x_TD[0], route, None)),
        "x_3d": (permute, (x_TD.view(T, 2, D // 2), route, None)),
        "x_int32": (permute, (x_TD.int(), route, None)),
        "x_float64": (permute, (x_TD.double(), route, None)),
        "x_rows": (permute, (randn(gen, T + 1, D, device=device), route, None)),
        "x_column_stride": (permute, (randn(gen, T, 2 * D, device=device)[:, ::2], route, None)),
        "y_1d": (unpermute, (y_ND[0], route, None)),
        "y_int32": (unpermute, (y_ND.int(), route, None)),
        "y_float64": (unpermute, (y_ND.double(), route, None)),
        "y_rows": (unpermute, (randn(gen, T * K + 1, D, device=device), route, None)),
        "y_column_stride": (unpermute, (randn(gen, T * K, 2 * D, device=device)[:, ::2], route, None)),
        "permute_weights_shape": (permute, (x_TD, route, randn(gen, T, K + 1, device=device))),
        "permute_weights_1d": (permute, (x_TD, route, w_TK.reshape(-1))),
        "permute_weights_float16": (permute, (x_TD, route, w_TK.half())),
        "unpermute_weights_shape": (unpermute, (y_ND, route, randn(gen, T + 1, K, device=device))),
        "unpermute_weights_float16": (unpermute, (y_ND, route, w_TK.half())),
        "permute_sorted_slots_int64": (permute, (x_TD, route._replace(sorted_slots=route.sorted_slots.long()), None)),
        "permute_slot_positions_int64": (
            permute,
            (x_TD, route._replace(slot_positions_TK=route.slot_positions_TK.long()), None),
        ),
        "unpermute_sorted_slots_int64": (
            unpermute,
            (y_ND, route._replace(sorted_slots=route.sorted_slots.long()), None),
        ),
        "unpermute_slot_positions_int64": (
            unpermute,
            (y_ND, route._replace(slot_positions_TK=route.slot_positions_TK.long()), None),
        ),
    }
    return cases[case]


# The message must name the argument (x and y as whole words).
BAD_CASES = {
    "x_1d": r"\bx\b",
    "x_3d": r"\bx\b",
    "x_int32": r"\bx\b",
    "x_float64": r"\bx\b",
    "x_rows": r"\bx\b",
    "x_column_stride": r"\bx\b",
    "y_1d": r"\by\b",
    "y_int32": r"\by\b",
    "y_float64": r"\by\b",
    "y_rows": r"\by\b",
    "y_column_stride": r"\by\b",
    "permute_weights_shape": "topk_weights",
    "permute_weights_1d": "topk_weights",
    "permute_weights_float16": "topk_weights",
    "unpermute_weights_shape": "topk_weights",
    "unpermute_weights_float16": "topk_weights",
    "permute_sorted_slots_int64": "sorted_slots",
    "permute_slot_positions_int64": "slot_positions",
    "unpermute_sorted_slots_int64": "sorted_slots",
    "unpermute_slot_positions_int64": "slot_positions",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_the_argument(case, device, gen):
    op, args = _bad_call(case, device, gen)
    with pytest.raises(ERRORS, match=BAD_CASES[case]):
        op(*args)


@pytest.mark.gpu
def test_weights_on_another_device_rejected(gen):
    route = make_route(gen, T_BAD, E_BAD, K_BAD, torch.device("cuda"))
    x_TD = randn(gen, T_BAD, D_BAD, device="cuda")
    w_TK = randn(gen, T_BAD, K_BAD)  # on the CPU
    with pytest.raises(ERRORS, match="topk_weights"):
        ops.moe_permute(x_TD, route, w_TK)


# --------------------------------------------------------------------------------------------
# A real torch op: opcheck, torch.compile; determinism.
# --------------------------------------------------------------------------------------------
OPCHECK_SHAPES = [RouteShape(7, 16, 1, 24), RouteShape(29, 37, 3, 17), RouteShape(5, 6, 6, 8)]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=shape_id)
def test_opcheck(shape, dtype, weighted, device, gen):
    T, E, K, D = shape.tokens, shape.experts, shape.top_k, shape.width
    route = make_route(gen, T, E, K, device)
    w_TK = randn(gen, T, K, device=device).requires_grad_() if weighted else None
    x_TD = randn(gen, T, D, dtype=dtype, device=device).requires_grad_()
    y_ND = randn(gen, T * K, D, dtype=dtype, device=device).requires_grad_()
    slots = (route.sorted_slots, route.slot_positions_TK)
    torch.library.opcheck(torch.ops.llama4.moe_permute.default, (x_TD, *slots, w_TK))
    torch.library.opcheck(torch.ops.llama4.moe_unpermute.default, (y_ND, *slots, w_TK))


def _moe_block(x_TD, logits_TE, top_k):
    """Route -> dispatch (weights on the input, as Llama 4) -> a stand-in expert -> combine."""
    route = ops.moe_route(logits_TE, top_k, score_func="sigmoid")
    x_sorted_ND = ops.moe_permute(x_TD, route, route.topk_weights_TK)
    y_sorted_ND = torch.tanh(x_sorted_ND) * 2.0
    return ops.moe_unpermute(y_sorted_ND, route), route.tokens_per_expert_E


def test_compile_fullgraph(device, gen):
    def fn(x_TD, logits_TE):
        return _moe_block(x_TD, logits_TE, 2)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    E, D = 16, 24
    for T in (5, 17, 130):
        x_TD = randn(gen, T, D, device=device)
        logits_TE = randn(gen, T, E, device=device)
        grads = []
        for f in (fn, compiled):
            x_leaf, logits_leaf = x_TD.clone().requires_grad_(), logits_TE.clone().requires_grad_()
            out_TD, counts_E = f(x_leaf, logits_leaf)
            out_TD.square().sum().backward()
            grads.append((out_TD.detach(), counts_E, x_leaf.grad, logits_leaf.grad))
        for got, want in zip(*grads, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_deterministic(dtype, device, gen):
    shape = ROUTE_TEST[7]  # T*K = 12000 rows, the multi-launch path on CUDA
    T, E, K, D = shape.tokens, shape.experts, shape.top_k, 64
    route = make_route(gen, T, E, K, device)
    w_TK = randn(gen, T, K, device=device).requires_grad_()
    x_TD = randn(gen, T, D, dtype=dtype, device=device).requires_grad_()
    g_TD = randn(gen, T, D, dtype=dtype, device=device)
    results = []
    for _ in range(2):
        x_TD.grad = w_TK.grad = None
        out_TD = ops.moe_unpermute(ops.moe_permute(x_TD, route, w_TK), route, w_TK)
        out_TD.backward(g_TD)
        results.append((out_TD.detach(), x_TD.grad, w_TK.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# What was built.
# --------------------------------------------------------------------------------------------
def test_build_info():
    info = engine.build_info()
    assert isinstance(info, dict)
    for key in ("cuda", "cuda_arch", "torch_version", "cuda_version", "cutlass_version", "kernels"):
        assert key in info, key
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["kernels"], list) and all(isinstance(k, str) for k in info["kernels"])
    assert "moe_route_cpu" in info["kernels"]
    if info["cuda"]:
        assert "route_topk_sm90" in info["kernels"]
        assert isinstance(info["cuda_version"], str) and info["cuda_arch"], info
    # Built against the torch that loaded it (local version suffixes such as +cu130 aside).
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_unpermute_bound_catches_a_dropped_term(gen):
    """Guards the tolerance itself: losing one token's k-th term must fail the combine check."""
    T, E, K, D = 16, 8, 4, 32
    route = make_route(gen, T, E, K, torch.device("cpu"))
    y_ND = randn(gen, T * K, D)
    ref_TD = reference.moe_unpermute(y_ND, route)
    wrong_TD = ref_TD.clone()
    wrong_TD[3] -= y_ND[route.slot_positions_TK[3, 2]]
    abs_sum_TD = reference.moe_unpermute(y_ND.double().abs(), route)
    assert_unpermute_close(ref_TD, ref_TD, abs_sum_TD, K)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_unpermute_close(wrong_TD, ref_TD, abs_sum_TD, K)
