"""On a GPU: the router, dispatch and combine never synchronise the host, so a whole routing step
is capturable in a CUDA graph and its replay recomputes on new logits."""

from __future__ import annotations

import pytest
import torch
from cuda_graphs import capture_cuda_graph

from engine import ops
from engine.ops import reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tokens, experts, top_k", [(1, 128, 1), (128, 128, 8), (16384, 128, 1), (3000, 16, 2)])
def test_no_host_sync_and_graph_replay(tokens, experts, top_k):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    logits_TE = torch.randn(tokens, experts, device="cuda", generator=gen).bfloat16()
    x_TD = torch.randn(tokens, 256, device="cuda", generator=gen).bfloat16()

    def step():
        route = ops.moe_route(logits_TE, top_k)
        rows = ops.moe_permute(x_TD, route, route.topk_weights_TK)
        return route, ops.moe_unpermute(rows, route)

    step()  # warm-up outside the checks (allocator, module load)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph, (route, y_TD) = capture_cuda_graph(step)

    logits_TE.copy_(torch.randn(tokens, experts, device="cuda", generator=gen).bfloat16())  # new inputs
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.moe_route(logits_TE, top_k)
    for ours, ref in zip(route[1:], expected[1:], strict=True):
        assert torch.equal(ours, ref)
    torch.testing.assert_close(route.topk_weights_TK, expected.topk_weights_TK, rtol=2e-6, atol=1e-30)
    combined = reference.moe_unpermute(reference.moe_permute(x_TD, expected, expected.topk_weights_TK), expected)
    torch.testing.assert_close(y_TD.float(), combined.float(), rtol=1e-2, atol=1e-2)


def test_decode_route_is_one_launch():
    logits_TE = torch.randn(128, 128, device="cuda").bfloat16()
    ops.moe_route(logits_TE, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.moe_route(logits_TE, 8)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    route_kernels = [k for k in kernels if "route" in k]
    assert len(route_kernels) == 1, kernels
