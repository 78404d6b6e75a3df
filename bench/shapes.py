"""The one source of problem shapes for tests and benchmarks: what is benchmarked is what is tested.

Legend: T tokens, E experts, K top-k, D model width, F expert hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.ops.attention import AttentionPattern


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


# --------------------------------------------------------------------------------------------
# FP8 quantisation and the grouped expert GEMM. Legend: M rows (routed rows for the GEMM), K columns
# (GEMM depth), N GEMM outputs, E experts.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantShape:
    """One quantisation problem: x [M, K] (swiglu_quant reads h [M, 2K])."""

    rows: int  # M
    cols: int  # K

    @property
    def id(self) -> str:
        return f"M{self.rows}-K{self.cols}"


# Correctness sweep: one element, K below / above / not a multiple of 128, M = 1, odd M, a model width.
FP8_QUANT_TEST = [
    QuantShape(1, 1),
    QuantShape(1, 128),
    QuantShape(3, 127),
    QuantShape(17, 300),
    QuantShape(64, 1024),
    QuantShape(130, 129),
    QuantShape(4, 5120),
]
# Memory-bound targets (>= 80 % of the copy ceiling): a prefill's worth of expert activations.
FP8_QUANT_BENCH = [QuantShape(16384, 8192)]
FP8_QUANT_BENCH_CPU = [QuantShape(512, 1024)]


@dataclass(frozen=True)
class GroupedGemmShape:
    """One grouped GEMM: x [M, K] (rows sorted by expert) times w [E, N, K] -> out [M, N]."""

    name: str  # which projection, for the benchmark's id
    experts: int  # E
    rows: int  # M
    n: int  # N
    k: int  # K

    @property
    def id(self) -> str:
        return f"{self.name}-E{self.experts}-M{self.rows}-N{self.n}-K{self.k}"

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.n * self.k


def _expert_gemms(model: ModelShape, rows: int) -> list[GroupedGemmShape]:
    """The two grouped GEMMs of a model's experts: gate_up (N = 2F, K = D) and down (N = D, K = F)."""
    E, D, F = model.n_experts, model.d_model, model.d_ff
    return [
        GroupedGemmShape(f"{model.name}-gate_up", E, rows, 2 * F, D),
        GroupedGemmShape(f"{model.name}-down", E, rows, D, F),
    ]


# Prefill / training targets: FP8 >= 1300 TFLOP/s and >= 1.5x torch._scaled_grouped_mm, BF16 >= 1.1x
# torch._grouped_mm. Scout at 16384 routed rows, Maverick at 16384 and 65536.
GROUPED_GEMM_PREFILL = [
    *_expert_gemms(SCOUT, 16384),
    *_expert_gemms(MAVERICK, 16384),
    *_expert_gemms(MAVERICK, 65536),
]
# Decode (top-1, M <= 256 routed rows): memory-bound on the weights of the experts that got rows.
GROUPED_GEMM_DECODE = [s for model in (SCOUT, MAVERICK) for rows in (32, 256) for s in _expert_gemms(model, rows)]
# CPU benchmarks: small and fast (the reference is the baseline there).
GROUPED_GEMM_BENCH_CPU = [GroupedGemmShape("small", 4, 512, 256, 256)]

# Correctness: the issue's group sizes (two empty experts, odd sizes, M = 3268 not a multiple of 16), with
# N and K multiples of 16 (the CUDA FP8 alignment) but not of 128 (partial scale blocks, partial tiles).
GROUPED_GEMM_ISSUE_GROUP_SIZES = (162, 0, 2577, 446, 0, 83)
GROUPED_GEMM_TEST_N, GROUPED_GEMM_TEST_K = 96, 160


# --------------------------------------------------------------------------------------------
# Sparse-global attention (prefill forward). Legend: B batch, S query positions, Sk key positions,
# H query heads, G kv heads, D head dim.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionShape:
    """One attention problem: q [B, S, H, D], k / v [B, Sk, G, D] (queries aligned to the end of the keys)."""

    batch: int  # B
    seqlen_q: int  # S
    seqlen_k: int  # Sk
    heads: int  # H
    kv_heads: int  # G
    head_dim: int  # D

    @property
    def id(self) -> str:
        return f"B{self.batch}-S{self.seqlen_q}-Sk{self.seqlen_k}-H{self.heads}-G{self.kv_heads}-D{self.head_dim}"


# Correctness sweep: one token, GQA 1 / 5 / 8 and Scout's 40/8, head dims 64 / 128, odd sizes, S < Sk (queries
# continuing a cached prefix), S > Sk (the first rows see no key), one query over many keys.
ATTENTION_TEST = [
    AttentionShape(1, 1, 1, 1, 1, 64),
    AttentionShape(2, 157, 157, 4, 2, 64),
    AttentionShape(1, 77, 77, 5, 1, 64),  # GQA 5
    AttentionShape(1, 130, 130, 8, 1, 128),  # GQA 8
    AttentionShape(2, 64, 64, 4, 4, 128),  # GQA 1
    AttentionShape(1, 100, 100, 40, 8, 128),  # Scout / Maverick heads
    AttentionShape(1, 5, 40, 2, 1, 64),  # S < Sk
    AttentionShape(1, 40, 5, 2, 1, 64),  # S > Sk
    AttentionShape(3, 1, 300, 4, 2, 64),  # one query at the end of 300 keys
    AttentionShape(1, 300, 300, 2, 1, 128),
    AttentionShape(1, 129, 129, 2, 2, 64),
]
# CUDA only (the CPU suite stays fast): sizes around the kernel's tiles.
ATTENTION_TEST_CUDA = [
    AttentionShape(1, 1023, 1023, 4, 2, 128),
    AttentionShape(1, 1024, 1024, 4, 2, 64),
    AttentionShape(2, 113, 113, 4, 1, 128),
    AttentionShape(1, 384, 1000, 4, 2, 128),
]

# Benchmarks (CUDA): plain causal at 16K with Scout's heads (target >= 550 TFLOP/s), and the local patterns
# at 32K / 128K / 512K (target >= 500 TFLOP/s on the work done and >= 1.5x FlexAttention; linear in S).
ATTENTION_BENCH_CAUSAL = AttentionShape(1, 16384, 16384, 40, 8, 128)
ATTENTION_BENCH_LOCAL_SEQLENS = (32768, 131072, 524288)
ATTENTION_BENCH_LOCAL_HEADS = (40, 8, 128)  # H, G, D: Scout
ATTENTION_BENCH_LOCAL_PATTERNS = [
    AttentionPattern(name="window4096", window=4096),
    AttentionPattern(name="chunk8192", chunk=8192),
]
# Backward benchmarks (CUDA): plain causal at 16K (ATTENTION_BENCH_CAUSAL; target >= 400 TFLOP/s), window 4096 /
# chunk 8192 (ATTENTION_BENCH_LOCAL_PATTERNS) at 128K (target >= 350 TFLOP/s on the work done and >= 1.5x
# FlexAttention's backward), and forward + backward of one Scout-width attention layer at 256K on one 80 GB GPU:
# its chunked RoPE layers and its plain causal NoPE layers.
ATTENTION_BWD_BENCH_LOCAL_SEQLEN = 131072
ATTENTION_BWD_BENCH_LAYER = AttentionShape(1, 262144, 262144, 40, 8, 128)
ATTENTION_BWD_BENCH_LAYER_PATTERNS = [AttentionPattern(name="chunk8192", chunk=8192), AttentionPattern(name="causal")]
# CPU benchmarks: small and fast (a dense masked torch attention is the baseline there).
ATTENTION_BENCH_CPU = AttentionShape(1, 4096, 4096, 2, 1, 64)
ATTENTION_BENCH_CPU_PATTERNS = [AttentionPattern(name="causal"), AttentionPattern(name="window256", window=256)]
