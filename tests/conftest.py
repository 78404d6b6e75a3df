"""Shared test machinery: the `gpu` marker (skipped with a reason on machines without CUDA), the
`device` fixture (cpu, and cuda marked gpu), a seeded torch.Generator per test, `one_thread` for the
debug-size model modules and `nvtx_ranges`, a recorder of the NVTX ranges the code opens.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import pytest
import torch

GPU_SKIP_REASON = "needs a CUDA GPU (none present)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


# LLAMA4_TEST_SAMPLE=k keeps at most k parametrisations of each test function (first, last, then evenly
# spaced): breadth over every kernel when time is short (tools/gpu_check.sh's first pass on a lent GPU).
SAMPLE_ENV = "LLAMA4_TEST_SAMPLE"


def _sample_parametrisations(items: list[pytest.Item], k: int) -> tuple[list[pytest.Item], list[pytest.Item]]:
    groups: dict[tuple[str, str], list[pytest.Item]] = {}
    for item in items:
        groups.setdefault((item.path.as_posix(), getattr(item, "originalname", item.name)), []).append(item)
    keep: set[int] = set()
    for members in groups.values():
        n = len(members)
        picks = {0, n - 1} | {round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}
        keep |= {id(members[i]) for i in sorted(picks)[:k]}
    return [it for it in items if id(it) in keep], [it for it in items if id(it) not in keep]


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselection: sample what would run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sample = os.environ.get(SAMPLE_ENV)
    if sample:
        items[:], deselected = _sample_parametrisations(items, max(1, int(sample)))
        config.hook.pytest_deselected(items=deselected)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every op test runs on the CPU kernels and, where a GPU is present, the CUDA kernels."""
    return torch.device(request.param)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test id: fresh inputs per test, the same on every rerun.

    Tests draw on the CPU and move the result to the device (one generator for every device).
    """
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Debug-size models: ops too small to split across threads, and with two threads any other load on a
    2-core machine makes OpenMP's spin-waiting 10x slower. Restored after the module.

    Use it module-wide: `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nvtx_ranges(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(name, domain) of every NVTX range opened during the test, in order (LLAMA4_NVTX=1, nvtx's annotate
    replaced by a recorder). Skips the test when the nvtx package is not installed."""
    from engine import profiling

    if profiling._nvtx is None:
        pytest.skip("the nvtx package is not installed")
    seen: list[tuple[str, str]] = []

    class Recorder:
        def __init__(self, name, domain):
            seen.append((name, domain))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(profiling._nvtx, "annotate", Recorder)
    monkeypatch.setenv("LLAMA4_NVTX", "1")
    return seen
