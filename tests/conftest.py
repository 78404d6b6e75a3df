"""Shared test machinery: the `gpu` marker (skipped with a reason on machines without CUDA), the
`device` fixture (cpu, and cuda marked gpu) and a seeded torch.Generator per test.
"""

from __future__ import annotations

import zlib

import pytest
import torch

GPU_SKIP_REASON = "needs a CUDA GPU (none present)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
