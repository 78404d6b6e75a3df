"""The one source of problem shapes for tests and benchmarks: what is benchmarked is what is tested.

Legend: T tokens, E experts, K top-k, D model width, F expert hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    d_model: int  # D
    n_experts: int  # E
    top_k: int  # K
    d_ff: int  # F (expert and shared-expert hidden width)
    n_heads: int
    n_kv_heads: int
    head_dim: int


SCOUT = ModelShape("scout", d_model=5120, n_experts=16, top_k=1, d_ff=8192, n_heads=40, n_kv_heads=8, head_dim=128)
MAVERICK = ModelShape(
    "maverick", d_model=5120, n_experts=128, top_k=1, d_ff=8192, n_heads=40, n_kv_heads=8, head_dim=128
)
DEBUG = ModelShape("debug", d_model=64, n_experts=4, top_k=1, d_ff=32, n_heads=4, n_kv_heads=2, head_dim=16)
MODELS = {m.name: m for m in (SCOUT, MAVERICK, DEBUG)}


@dataclass(frozen=True)
class RouteShape:
    """One routing problem: T tokens over E experts, top-k K, D the width of the rows permuted."""

    tokens: int  # T
    experts: int  # E
    top_k: int  # K
    width: int = 5120  # D

    @property
    def id(self) -> str:
        return f"T{self.tokens}-E{self.experts}-K{self.top_k}"


# The serving targets: decode batches (T <= 128, E = 128, K in {1, 2, 8}) in <= 2 us, and a
# prefill batch (T = 16384, E = 128, K = 1) in <= 15 us, plus the two Llama 4 models' own routers.
ROUTE_DECODE = [RouteShape(t, 128, k) for t in (1, 32, 128) for k in (1, 2, 8)]
ROUTE_PREFILL = [RouteShape(16384, 128, 1), RouteShape(16384, 16, 1), RouteShape(4096, 128, 8)]
ROUTE_BENCH = ROUTE_DECODE + ROUTE_PREFILL

# Small shapes for CPU benchmarks (the 2-core CI machine).
ROUTE_BENCH_CPU = [RouteShape(1, 128, 1), RouteShape(128, 128, 8), RouteShape(4096, 16, 1), RouteShape(4096, 128, 2)]

# Correctness sweep: the model routers, odd sizes, K = E, E = 1, both kernel paths on CUDA
# (single-launch decode path and the multi-launch path for large T*K).
ROUTE_TEST = [
    RouteShape(1, 1, 1, 8),
    RouteShape(7, 16, 1, 24),  # Scout router
    RouteShape(33, 128, 1, 40),  # Maverick router
    RouteShape(64, 128, 8, 16),
    RouteShape(5, 6, 6, 8),  # K = E
    RouteShape(129, 37, 3, 17),  # E not a multiple of 32, D odd
    RouteShape(300, 64, 2, 64),
    RouteShape(3000, 128, 4, 8),  # T*K > the single-launch limit on CUDA
    RouteShape(517, 1024, 8, 8),  # the largest E the CUDA router supports
]
