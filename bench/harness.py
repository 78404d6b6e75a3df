"""Timing and roofline arithmetic shared by every benchmark: device ceilings measured in the same run,
CUDA-event and CUDA-graph timers with L2 flushing (perf_counter on CPU), and `record`, which writes the
numbers we trust into pytest-benchmark's extra_info (and into the session's results list).

On CUDA the number we trust is extra_info["us"] (median of CUDA-event timings, L2 flushed before each
call); pytest-benchmark's own table shows host wall clock of call + synchronize, a latency, not a kernel time.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine.profiling import nvtx_range

MiB = 1 << 20
GiB = 1 << 30

# An L2 flush writes a buffer at least twice the L2 (H100/H200: 50 MB) so no input survives in cache.
CUDA_FLUSH_MIN_BYTES = 256 * MiB
# CPU last-level caches are tens of MB; 64 MiB evicts them. Off by default on CPU (see time_op).
CPU_FLUSH_BYTES = 64 * MiB

# Ceiling problems: large enough to reach steady-state throughput, small enough to time in ~1 s.
CUDA_MATMUL_N = 8192  # bf16 [N, N] @ [N, N]: 1.1 TFLOP
CUDA_COPY_BYTES = 1 * GiB  # device-to-device copy, counted as read + written
CPU_MATMUL_N = 1024  # float32; 2 GFLOP keeps the 2-core CI machine under a second
CPU_COPY_BYTES = 256 * MiB

# Set LLAMA4_BENCH_PROFILE=<substring> to bracket the timed loops whose label contains it with
# cudaProfilerStart/Stop, so `nsys --capture-range=cudaProfilerApi` or `ncu --profile-from-start off`
# record only those loops, not warm-up, graph capture or the ceilings (see bench/profile.md).
PROFILE_ENV = "LLAMA4_BENCH_PROFILE"


@dataclass(frozen=True)
class Budget:
    """How long to time each thing. `quick` is `make gpu-check` (whole suite well under 2 GPU minutes)."""

    warmup: int = 10
    iters: int = 100
    graph_calls: int = 16  # op calls captured back to back in one graph; the graph time is divided by this
    graph_replays: int = 30
    wall_rounds: int = 10  # pytest-benchmark's wall-clock rounds (informational on CUDA)
    ceiling_iters: int = 20

    @classmethod
    def for_run(cls, *, quick: bool, device: str, smoke: bool = False) -> Budget:
        if smoke:  # --benchmark-disable: prove every benchmark runs, time nothing seriously
            return cls(warmup=1, iters=2, graph_calls=2, graph_replays=2, wall_rounds=1, ceiling_iters=1)
        if device == "cpu":  # CPU kernels are 10-1000x slower; fewer rounds keep the CPU run under a minute
            return cls(warmup=1, iters=5 if quick else 10, wall_rounds=2 if quick else 3, ceiling_iters=3)
        if quick:
            return cls(warmup=3, iters=20, graph_calls=8, graph_replays=10, wall_rounds=3, ceiling_iters=5)
        return cls()


# Everything `record` wrote this session, in order: (benchmark name, extra_info), for bench/conftest.py.
RESULTS: list[tuple[str, dict]] = []
# The ceilings measured this session, by device ("cuda" / "cpu").
CEILINGS: dict[str, dict] = {}

_flush_buffers: dict[str, torch.Tensor] = {}


def _flush_buffer(device: str) -> torch.Tensor:
    if device not in _flush_buffers:
        if device == "cuda":
            l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
            nbytes = max(CUDA_FLUSH_MIN_BYTES, 2 * l2_bytes)
        else:
            nbytes = CPU_FLUSH_BYTES
        _flush_buffers[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return _flush_buffers[device]


def flush_l2(device: str) -> None:
    """Evict caches by writing a buffer larger than them (asynchronous on CUDA)."""
    _flush_buffer(device).zero_()


@contextlib.contextmanager
def _timed_region(label: str, device: str) -> Iterator[None]:
    """NVTX range `bench.<label>` (domain llama4) and, when asked, a cudaProfiler capture range."""
    wanted = os.environ.get(PROFILE_ENV, "")
    profile = device == "cuda" and wanted != "" and (wanted == "1" or wanted in label)
    # A GC pause inside a loop of 2 us ops would be a 100x outlier. No gc.collect() first: a full
    # collection costs ~90 ms with torch loaded, more than most loops.
    gc.disable()
    try:
        with nvtx_range(f"bench.{label}"):
            if profile:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            try:
                yield
            finally:
                if profile:
                    torch.cuda.synchronize()
                    torch.cuda.profiler.stop()
    finally:
        gc.enable()


def _summary(times_us: list[float]) -> dict:
    ordered = sorted(times_us)
    last = len(ordered) - 1

    def pct(p: float) -> float:  # nearest-rank percentile: robust and exact for tiny samples
        return ordered[round(p * last)]

    return {"median_us": statistics.median(ordered), "p10_us": pct(0.1), "p90_us": pct(0.9), "n": len(ordered)}


def time_op(
    fn: Callable[[], object],
    device: str,
    *,
    warmup: int,
    iters: int,
    flush_l2: bool | None = None,
    label: str = "op",
) -> dict:
    """Median / p10 / p90 microseconds of one call of `fn`.

    CUDA: a start and an end event around each call, L2 flushed before each (outside the events), one
    synchronize at the end. No per-iteration synchronize: the flush keeps the GPU busy ~100 us per
    iteration, so the host runs ahead and the events see kernel time, not launch latency.
    CPU: time.perf_counter around each call. flush_l2 defaults to False there: after writing 64 MiB the
    cache is full of dirty lines whose write-back made a 10 KB copy 15x slower on the CI machine, an
    artifact, not a cold-cache cost. flush_l2=True still flushes on CPU when asked.
    """
    if flush_l2 is None:
        flush_l2 = device == "cuda"
    if flush_l2:
        _flush_buffer(device)  # allocate before timing
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        with _timed_region(label, device):
            for start, end in zip(starts, ends, strict=True):
                if flush_l2:
                    _flush_buffer(device).zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
        return _summary([start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends, strict=True)])

    times_us = []
    with _timed_region(label, device):
        for _ in range(iters):
            if flush_l2:
                _flush_buffer(device).zero_()
            t0 = time.perf_counter()
            fn()
            times_us.append((time.perf_counter() - t0) * 1e6)
    return _summary(times_us)


def time_graph(
    fn: Callable[[], object],
    *,
    warmup: int,
    replays: int,
    calls_per_graph: int,
    flush_l2: bool = True,
    label: str = "graph",
) -> dict:
    """Per-call microseconds of `fn` replayed from a CUDA graph (CUDA only).

    `calls_per_graph` calls are captured back to back and each replay's event time is divided by that
    count: the cost of the op inside a captured step, without the once-per-graph launch cost. The L2 is
    flushed before each replay, so the first call is cold and later ones see what earlier ones cached,
    as in a real step. Capture fails loudly if `fn` synchronises with the host.
    """
    if flush_l2:
        _flush_buffer("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs recommends
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()  # first replay uploads the graph; keep it out of the timings
    torch.cuda.synchronize()

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    with _timed_region(label, "cuda"):
        for start, end in zip(starts, ends, strict=True):
            if flush_l2:
                _flush_buffer("cuda").zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
    times_us = [start.elapsed_time(end) * 1e3 / calls_per_graph for start, end in zip(starts, ends, strict=True)]
    del graph
    return _summary(times_us)


def measure_ceilings(device: str, budget: Budget) -> dict:
    """The device's attainable peaks, measured now (cached for the session).

    CUDA: a large bf16 matmul (TFLOP/s) and a large device-to-device copy (GB/s, bytes read + written).
    CPU: a float32 matmul and a large memcpy (copy_ into a preallocated tensor; clone would also time
    the page faults of a fresh allocation), under the same keys.
    """
    if device in CEILINGS:
        return CEILINGS[device]
    if device == "cuda":
        n, dtype, copy_bytes = CUDA_MATMUL_N, torch.bfloat16, CUDA_COPY_BYTES
    else:
        n, dtype, copy_bytes = CPU_MATMUL_N, torch.float32, CPU_COPY_BYTES
    timing = {"warmup": 2 if device == "cuda" else 1, "iters": budget.ceiling_iters, "flush_l2": False}
    mm_us = _time_matmul(n, dtype, device, timing)
    copy_us = _time_copy(copy_bytes, device, timing)
    if device == "cuda":
        torch.cuda.empty_cache()  # give the ceiling buffers back before the benchmarks allocate

    CEILINGS[device] = {
        "matmul_tflops_bf16": 2 * n**3 / (mm_us * 1e-6) / 1e12,
        "copy_gbps": 2 * copy_bytes / (copy_us * 1e-6) / 1e9,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
        "copy_bytes": copy_bytes,
    }
    return CEILINGS[device]


def _time_matmul(n: int, dtype: torch.dtype, device: str, timing: dict) -> float:
    a_NN = torch.randn(n, n, device=device, dtype=dtype)
    b_NN = torch.randn(n, n, device=device, dtype=dtype)
    c_NN = torch.empty(n, n, device=device, dtype=dtype)
    return time_op(lambda: torch.mm(a_NN, b_NN, out=c_NN), device, label="ceiling.matmul", **timing)["median_us"]


def _time_copy(nbytes: int, device: str, timing: dict) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_op(lambda: dst.copy_(src), device, label="ceiling.copy", **timing)["median_us"]


def wall_clock(benchmark, fn: Callable[[], object], device: str, budget: Budget) -> None:
    """pytest-benchmark's own timing: host wall clock of one call (+ synchronize on CUDA, so it is the
    latency a caller sees). The numbers we trust are the event timings in extra_info."""
    if device == "cuda":

        def target() -> None:
            fn()
            torch.cuda.synchronize()

    else:
        target = fn
    benchmark.pedantic(target, rounds=budget.wall_rounds, iterations=1, warmup_rounds=1)


def record(
    benchmark,
    *,
    ceilings: dict,
    us: float,
    bytes_moved: int | None = None,
    flops: int | None = None,
    baseline_us: float | None = None,
    **fields,
) -> dict:
    """Fill benchmark.extra_info with the achieved rate against the device ceiling and the speedup.

    us: our median microseconds. bytes_moved (memory-bound) gives "gbps" against "copy_gbps"; flops
    (compute-bound) gives "tflops" against "matmul_tflops_bf16". speedup = baseline_us / us.
    `fields` (shape, dtype, targets, other timings) are stored as given.
    """
    info = benchmark.extra_info
    info["us"] = us
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        info["gbps"] = bytes_moved / (us * 1e-6) / 1e9
        info["pct_of_ceiling"] = 100.0 * info["gbps"] / ceilings["copy_gbps"]
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = flops / (us * 1e-6) / 1e12
        info["pct_of_ceiling"] = 100.0 * info["tflops"] / ceilings["matmul_tflops_bf16"]
    if baseline_us is not None:
        info["baseline_us"] = baseline_us
        info["speedup"] = baseline_us / us
    info.update(fields)
    RESULTS.append((benchmark.name, info))
    return info
