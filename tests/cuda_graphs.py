"""CUDA-graph capture shared by the GPU tests that prove an op (or a whole step) never synchronises the host:
capture it once, change the static inputs in place, replay, compare with eager on the new inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture_cuda_graph(step: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, step's outputs captured in it): step runs once on a side stream first (torch's rule: warm up
    on the capture stream), then is captured there. graph.replay() recomputes the outputs in place from
    whatever the static inputs hold."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        with torch.cuda.graph(graph, stream=stream):
            captured = step()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, captured
