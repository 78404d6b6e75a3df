"""Benchmarks of the MoE routing stages: moe_route (router), moe_permute (dispatch), moe_unpermute (combine),
against engine.ops.reference and the fastest plain-torch versions (bench/baselines.py).

Legend: T tokens, E experts, K top-k, D model width, N = T*K routed rows.
CUDA cases use bench.shapes.ROUTE_BENCH and carry the router's targets; CPU cases use ROUTE_BENCH_CPU.
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from bench.baselines import torch_permute, torch_topk_route, torch_unpermute
from bench.shapes import ROUTE_BENCH, ROUTE_BENCH_CPU, RouteShape
from engine import ops
from engine.ops import reference

SEED = 0
DTYPE = torch.bfloat16  # router logits and activations as Llama 4 produces them
INDEX_BYTES = 4  # int32 ids, slots, positions, counts, offsets
WEIGHT_BYTES = 4  # float32 routing weights

# The router's targets (CUDA, judged on the graph-replay time, the way a decode step runs it):
DECODE_MAX_TOKENS = 128
DECODE_TARGET_US = 2.0
PREFILL_TARGET_US = {RouteShape(16384, 128, 1): 15.0}
TARGET_SPEEDUP_VS_REFERENCE = 10.0

CASES = [pytest.param("cpu", s, id=f"cpu-{s.id}") for s in ROUTE_BENCH_CPU] + [
    pytest.param("cuda", s, id=f"cuda-{s.id}", marks=pytest.mark.gpu) for s in ROUTE_BENCH
]


def _randn(*shape: int, device: str) -> torch.Tensor:
    # Drawn on the device: the largest inputs (hundreds of MB) would take seconds on the host.
    gen = torch.Generator(device=device).manual_seed(SEED)
    return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE)


def _shape_fields(device: str, shape: RouteShape) -> dict:
    return {
        "device": device,
        "dtype": str(DTYPE).removeprefix("torch."),
        "tokens": shape.tokens,
        "experts": shape.experts,
        "top_k": shape.top_k,
        "width": shape.width,
    }


def _route_targets(shape: RouteShape) -> dict:
    target_us = PREFILL_TARGET_US.get(shape)
    if shape.tokens <= DECODE_MAX_TOKENS:
        target_us = DECODE_TARGET_US
    targets = {"target_speedup": TARGET_SPEEDUP_VS_REFERENCE}
    if target_us is not None:
        targets |= {"target_us": target_us, "target_us_on": "graph_us"}
    return targets


@pytest.mark.benchmark(group="moe_route")
@pytest.mark.parametrize("device, shape", CASES)
def test_moe_route(benchmark, device, shape, budget, ceilings):
    T, E, K = shape.tokens, shape.experts, shape.top_k
    logits_TE = _randn(T, E, device=device)

    ours = ops.moe_route(logits_TE, K)
    expected = reference.moe_route(logits_TE, K)
    # Time only a correct op: exact ids and dispatch order, as the tests demand.
    assert torch.equal(ours.topk_ids_TK, expected.topk_ids_TK)
    assert torch.equal(ours.sorted_slots, expected.sorted_slots)

    def run_ours():
        return ops.moe_route(logits_TE, K)

    def run_reference():
        return reference.moe_route(logits_TE, K)

    def run_topk():
        return torch_topk_route(logits_TE, K)

    b = budget
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"route.ours.{shape.id}")
    t_ref = harness.time_op(run_reference, device, warmup=b.warmup, iters=b.iters, label=f"route.ref.{shape.id}")
    t_topk = harness.time_op(run_topk, device, warmup=b.warmup, iters=b.iters, label=f"route.topk.{shape.id}")
    extra = {}
    if device == "cuda":
        graph_kw = {"warmup": b.warmup, "replays": b.graph_replays, "calls_per_graph": b.graph_calls}
        g_ours = harness.time_graph(run_ours, label=f"route.ours.graph.{shape.id}", **graph_kw)
        g_topk = harness.time_graph(run_topk, label=f"route.topk.graph.{shape.id}", **graph_kw)
        extra = {
            "graph_us": g_ours["median_us"],
            "torch_topk_graph_us": g_topk["median_us"],
            "graph_speedup_vs_topk": g_topk["median_us"] / g_ours["median_us"],
            "graph_calls": b.graph_calls,
            **_route_targets(shape),
        }

    # Logits read once; every output written once.
    bytes_moved = (
        T * E * logits_TE.element_size() + T * K * (WEIGHT_BYTES + 3 * INDEX_BYTES) + (2 * E + 1) * INDEX_BYTES
    )
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        bytes_moved=bytes_moved,
        baseline_us=t_ref["median_us"],
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        baseline="engine.ops.reference.moe_route",
        torch_topk_us=t_topk["median_us"],
        speedup_vs_topk=t_topk["median_us"] / t_ours["median_us"],
        **extra,
        **_shape_fields(device, shape),
    )
    harness.wall_clock(benchmark, run_ours, device, budget)


@pytest.mark.benchmark(group="moe_permute")
@pytest.mark.parametrize("device, shape", CASES)
def test_moe_permute(benchmark, device, shape, budget, ceilings):
    T, K, D = shape.tokens, shape.top_k, shape.width
    x_TD = _randn(T, D, device=device)
    route = ops.moe_route(_randn(T, shape.experts, device=device), K)
    w_TK = route.topk_weights_TK

    def run_ours():
        return ops.moe_permute(x_TD, route, w_TK)

    def run_torch():
        return torch_permute(x_TD, route.sorted_slots, K, w_TK)

    b = budget
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"permute.ours.{shape.id}")
    t_base = harness.time_op(run_torch, device, warmup=b.warmup, iters=b.iters, label=f"permute.torch.{shape.id}")

    # Each of the N output rows reads its source row (rows of a token chosen K times are read K times)
    # and is written once; plus one slot index and one weight per row.
    row_bytes = D * x_TD.element_size()
    bytes_moved = T * K * (2 * row_bytes + INDEX_BYTES + WEIGHT_BYTES)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        bytes_moved=bytes_moved,
        baseline_us=t_base["median_us"],
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        baseline="torch index_select * w",
        **_shape_fields(device, shape),
    )
    harness.wall_clock(benchmark, run_ours, device, budget)


@pytest.mark.benchmark(group="moe_unpermute")
@pytest.mark.parametrize("device, shape", CASES)
def test_moe_unpermute(benchmark, device, shape, budget, ceilings):
    T, K, D = shape.tokens, shape.top_k, shape.width
    y_ND = _randn(T * K, D, device=device)
    route = ops.moe_route(_randn(T, shape.experts, device=device), K)
    w_TK = route.topk_weights_TK

    def run_ours():
        return ops.moe_unpermute(y_ND, route, w_TK)

    def run_torch():
        return torch_unpermute(y_ND, route.slot_positions_TK, w_TK)

    b = budget
    t_ours = harness.time_op(run_ours, device, warmup=b.warmup, iters=b.iters, label=f"unpermute.ours.{shape.id}")
    t_base = harness.time_op(run_torch, device, warmup=b.warmup, iters=b.iters, label=f"unpermute.torch.{shape.id}")

    # N expert-output rows read, T combined rows written, one position and one weight per slot.
    row_bytes = D * y_ND.element_size()
    bytes_moved = T * K * (row_bytes + INDEX_BYTES + WEIGHT_BYTES) + T * row_bytes
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=t_ours["median_us"],
        bytes_moved=bytes_moved,
        baseline_us=t_base["median_us"],
        p10_us=t_ours["p10_us"],
        p90_us=t_ours["p90_us"],
        baseline="torch index_select, * w, sum over k",
        **_shape_fields(device, shape),
    )
    harness.wall_clock(benchmark, run_ours, device, budget)
