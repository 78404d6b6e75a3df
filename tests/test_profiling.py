"""NVTX ranges: every public op runs inside a `llama4` range; LLAMA4_NVTX=0 turns them off."""

from __future__ import annotations

import torch

from engine import ops, profiling


def test_ops_open_nvtx_ranges(nvtx_ranges):
    route = ops.moe_route(torch.randn(4, 8), 2)
    rows = ops.moe_permute(torch.randn(4, 16), route)
    ops.moe_unpermute(rows, route)
    assert nvtx_ranges == [
        ("llama4.moe_route", "llama4"),
        ("llama4.moe_permute", "llama4"),
        ("llama4.moe_unpermute", "llama4"),
    ]


def test_env_switch_disables_ranges(monkeypatch):
    monkeypatch.setenv("LLAMA4_NVTX", "0")
    assert not profiling.nvtx_enabled()
    calls = []
    if profiling._nvtx is not None:
        monkeypatch.setattr(profiling._nvtx, "annotate", lambda *a, **k: calls.append(a))
    ops.moe_route(torch.randn(4, 8), 1)
    assert calls == []
