"""NVTX ranges of domain `llama4` around every public op and model layer.

A no-op when the `nvtx` package is missing or `LLAMA4_NVTX=0`; cheap otherwise (an NVTX push
without an attached profiler costs well under a microsecond). Ranges are skipped while
torch.compile traces, so they never break a graph.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

DOMAIN = "llama4"
_F = TypeVar("_F", bound=Callable)

try:  # pragma: no cover - depends on the environment
    import nvtx as _nvtx
except ImportError:  # pragma: no cover
    _nvtx = None


def nvtx_enabled() -> bool:
    return _nvtx is not None and os.environ.get("LLAMA4_NVTX", "1") != "0"


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """`with nvtx_range("moe_route"):` marks a region in domain `llama4` for Nsight."""
    if torch.compiler.is_compiling() or not nvtx_enabled():
        yield
        return
    with _nvtx.annotate(name, domain=DOMAIN):
        yield


def annotate(name: str) -> Callable[[_F], _F]:
    """Decorator form of `nvtx_range`."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
