"""Checks of the benchmark machinery itself: timers, roofline arithmetic, the summary table, and that the
plain-torch baselines compute what the reference computes (a baseline that is wrong makes speedups lies).

Legend: T tokens, E experts, K top-k, D model width, N = T*K routed rows.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from bench import harness, summarize
from bench.baselines import torch_permute, torch_topk_route, torch_unpermute
from bench.shapes import RouteShape

SLEEP_S = 0.002


def test_summary_percentiles():
    s = harness._summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_us"], s["p10_us"], s["p90_us"], s["n"]) == (3.0, 1.0, 5.0, 5)


def test_time_op_cpu_measures_the_call():
    t = harness.time_op(lambda: time.sleep(SLEEP_S), "cpu", warmup=0, iters=3, flush_l2=False)
    assert SLEEP_S * 1e6 <= t["median_us"] < 50 * SLEEP_S * 1e6


def test_record_rates(monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", [])
    bench = SimpleNamespace(name="test_x", extra_info={})
    ceilings = {"copy_gbps": 2000.0, "matmul_tflops_bf16": 800.0}
    info = harness.record(bench, ceilings=ceilings, us=10.0, bytes_moved=10_000_000, baseline_us=40.0, tokens=1)
    assert info["gbps"] == pytest.approx(1000.0)
    assert info["pct_of_ceiling"] == pytest.approx(50.0)
    assert info["speedup"] == pytest.approx(4.0)
    assert info["tokens"] == 1
    assert [("test_x", info)] == harness.RESULTS
    info = harness.record(SimpleNamespace(name="y", extra_info={}), ceilings=ceilings, us=1e6, flops=400 * 10**12)
    assert info["tflops"] == pytest.approx(400.0)
    assert info["pct_of_ceiling"] == pytest.approx(50.0)


def test_summarize_targets(tmp_path, capsys):
    doc = {
        "device": "test",
        "ceilings": {"cpu": {"matmul_tflops_bf16": 0.1, "copy_gbps": 10.0, "matmul_dtype": "float32"}},
        "benchmarks": [
            {"name": "test_a[cuda]", "us": 3.0, "graph_us": 1.5, "target_us": 2.0, "target_us_on": "graph_us"},
            {"name": "test_b[cuda]", "us": 1.0, "speedup": 5.0, "target_speedup": 10.0, "gbps": 1.0},
            {"name": "test_c[cpu]", "us": 1.0},
        ],
    }
    table, missed = summarize.format_table(doc)
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith(("a[", "b[", "c["))}
    assert rows["a[cuda]"].endswith("PASS") and rows["b[cuda]"].endswith("FAIL") and rows["c[cpu]"].endswith("-")
    assert missed == 1
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert summarize.main([str(path)]) == 0
    assert summarize.main([str(path), "--strict"]) == 1
    assert "missed a target" in capsys.readouterr().out


@pytest.mark.parametrize("shape", [RouteShape(37, 16, 1, 24), RouteShape(64, 128, 8, 16), RouteShape(5, 6, 6, 8)])
def test_baselines_match_reference(shape):
    from engine.ops import reference

    T, E, K, D = shape.tokens, shape.experts, shape.top_k, shape.width
    gen = torch.Generator().manual_seed(0)
    # float32 draws: no ties, so torch.topk's tie order cannot differ from the reference's.
    logits_TE = torch.randn(T, E, generator=gen)
    expected = reference.moe_route(logits_TE, K)
    got = torch_topk_route(logits_TE, K)
    for name, want, have in zip(expected._fields, expected, got, strict=True):
        torch.testing.assert_close(have.to(want.dtype), want, msg=lambda m, name=name: f"{name}: {m}")

    x_TD = torch.randn(T, D, generator=gen)
    y_ND = torch.randn(T * K, D, generator=gen)
    w_TK = expected.topk_weights_TK
    torch.testing.assert_close(torch_permute(x_TD, got[4], K, w_TK), reference.moe_permute(x_TD, expected, w_TK))
    torch.testing.assert_close(torch_unpermute(y_ND, got[5], w_TK), reference.moe_unpermute(y_ND, expected, w_TK))


@pytest.mark.gpu
def test_graph_timer_on_cuda():
    logits_TE = torch.randn(128, 128, device="cuda", dtype=torch.bfloat16)
    t = harness.time_graph(lambda: torch_topk_route(logits_TE, 2), warmup=2, replays=3, calls_per_graph=2)
    assert t["n"] == 3 and t["median_us"] > 0
