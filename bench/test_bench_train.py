"""Benchmarks of a whole training step (forward, chunked loss, backward, AdamW8bit) of the model.

GPU: a 4-layer full-width Scout slice (D = 5120, 16 experts, seq 8192), measured in one run in BF16, in
FP8 (MoE layers on the FP8 recipe) and as transformers' eager Llama4ForCausalLM on the same slice.
Targets (issue 8): MFU >= 40 % in BF16; FP8 >= 1.25x BF16 tokens/s; >= 5x transformers; FP8 fits 80 GB.
CPU: the scout-debug step time and tokens/s (no target).
Legend: B batch, S sequence.
"""

from __future__ import annotations

import gc
import types

import pytest
import torch

from bench import harness
from engine.model import Llama4Config
from engine.train import PrecisionUnavailable, TrainConfig, Trainer, build_model, mfu

SLICE_LAYERS, SLICE_SEQ = 4, 8192
TARGET_MFU_PCT = 40.0
TARGET_FP8_SPEEDUP = 1.25
TARGET_VS_TRANSFORMERS = 5.0
FP8_MEMORY_BUDGET_GIB = 80.0
# A step of the slice takes ~0.5-5 s: a handful of timed steps is plenty (the quick run: one, after a warm-up).
SLICE_STEPS, SLICE_STEPS_QUICK = 5, 1
CPU_BATCH, CPU_SEQ = 8, 128
# The demo's setting (engine/__main__.py): a 64-wide model's ops are too small to split across threads.
CPU_THREADS = 1
GiB = 2**30


def _time_steps(step, steps: int) -> float:
    """Median microseconds of a training step after one warm-up step (allocations, FP8 weight caches)."""
    return harness.time_op(step, "cuda", warmup=1, iters=steps, flush_l2=False, label="train-step")["median_us"]


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _ours(config, ids_BS, precision: str, steps: int) -> dict:
    _release()
    model = build_model(config, precision=precision, device="cuda")
    trainer = Trainer(model, TrainConfig(lr=1e-5))
    us = _time_steps(lambda: trainer.train_step(ids_BS), steps)
    out = {
        "us": us,
        "flops_per_token": model.flops_per_token(ids_BS.shape[1]),
        "mfu": mfu(model, ids_BS.numel() / (us * 1e-6), ids_BS.shape[1]),
        "peak_gib": torch.cuda.max_memory_allocated() / GiB,
    }
    return out  # the model and its optimizer state are freed with this frame


def _transformers(config, ids_BS, steps: int) -> dict:
    """transformers' eager Llama4ForCausalLM on the same slice, fwd + bwd + the same AdamW8bit. Its eager
    attention keeps [H, S, S] scores and its experts run every token through every expert, so at seq 8192
    it may not fit: then it retries with its own gradient checkpointing (recorded)."""
    import transformers

    from engine.optim import AdamW8bit

    hf_config = transformers.Llama4TextConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    for checkpointing in (False, True):
        _release()
        try:
            # Built in bf16 directly: a float32 copy of the slice alone would take 43 GB.
            default_dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                with torch.device("cuda"):
                    model = transformers.Llama4ForCausalLM(hf_config)
            finally:
                torch.set_default_dtype(default_dtype)
            if checkpointing:
                model.gradient_checkpointing_enable()
            opt = AdamW8bit(model.parameters(), lr=1e-5)

            def step(model=model, opt=opt):
                model(input_ids=ids_BS, labels=ids_BS).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            us = _time_steps(step, steps)
            return {
                "us": us,
                "gradient_checkpointing": checkpointing,
                "peak_gib": torch.cuda.max_memory_allocated() / GiB,
            }
        except torch.OutOfMemoryError:
            pass
        finally:
            model = opt = None
    return {"us": None, "gradient_checkpointing": True, "peak_gib": None}


@pytest.mark.gpu
@pytest.mark.benchmark(group="train_step")
def test_scout_slice_training_step(benchmark, request, ceilings):
    steps = SLICE_STEPS_QUICK if request.config.getoption("--bench-quick") else SLICE_STEPS
    config = Llama4Config.preset("scout", layers=SLICE_LAYERS)
    torch.manual_seed(0)
    ids_BS = torch.randint(0, config.vocab_size, (1, SLICE_SEQ), device="cuda")
    tokens = ids_BS.numel()
    bf16 = _ours(config, ids_BS, "bf16", steps)
    try:
        fp8 = _ours(config, ids_BS, "fp8", steps)
    except PrecisionUnavailable as exc:
        fp8 = {"skipped": str(exc)}
    _release()
    hf = _transformers(config, ids_BS, steps)
    _release()
    shape = dict(layers=SLICE_LAYERS, seq=SLICE_SEQ, d_model=config.hidden_size, experts=config.num_local_experts)
    flops = int(bf16["flops_per_token"] * tokens)

    benchmark.extra_info["note"] = "the timed numbers are in the records below; the wall clock is the call itself"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the step was timed with CUDA events above
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=bf16["us"],
        flops=flops,
        baseline_us=hf["us"],
        baseline="transformers eager Llama4ForCausalLM + AdamW8bit"
        + (" (gradient checkpointing: OOM without)" if hf["gradient_checkpointing"] else ""),
        tokens_per_s=tokens / (bf16["us"] * 1e-6),
        mfu_pct=None if bf16["mfu"] is None else 100 * bf16["mfu"],
        target_mfu_pct=TARGET_MFU_PCT,
        target_speedup=TARGET_VS_TRANSFORMERS,
        peak_memory_gib=bf16["peak_gib"],
        baseline_peak_memory_gib=hf["peak_gib"],
        precision="bf16",
        **shape,
    )
    fp8_entry = types.SimpleNamespace(name=f"{benchmark.name}[fp8]", extra_info={})
    if "skipped" in fp8:
        fp8_entry.extra_info.update(skipped=fp8["skipped"], precision="fp8", **shape)
        harness.RESULTS.append((fp8_entry.name, fp8_entry.extra_info))
        return
    harness.record(
        fp8_entry,
        ceilings=ceilings,
        us=fp8["us"],
        flops=flops,
        baseline_us=bf16["us"],
        baseline="the same step in BF16",
        tokens_per_s=tokens / (fp8["us"] * 1e-6),
        mfu_pct=None if fp8["mfu"] is None else 100 * fp8["mfu"],
        target_speedup=TARGET_FP8_SPEEDUP,
        peak_memory_gib=fp8["peak_gib"],
        target_memory_gib=FP8_MEMORY_BUDGET_GIB,
        fits_memory_budget=fp8["peak_gib"] <= FP8_MEMORY_BUDGET_GIB,
        precision="fp8",
        **shape,
    )


@pytest.mark.benchmark(group="train_step")
def test_scout_debug_training_step_cpu(benchmark, budget, ceilings):
    """The `make run` model on the CPU, as the demo runs it (one thread): step time and tokens/s (no target)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        _scout_debug_step(benchmark, budget, ceilings)
    finally:
        torch.set_num_threads(threads)


def _scout_debug_step(benchmark, budget, ceilings):
    torch.manual_seed(0)
    config = Llama4Config.preset("scout-debug")
    model = build_model(config, device="cpu")
    trainer = Trainer(model, TrainConfig(lr=1e-3))
    ids_BS = torch.randint(0, config.vocab_size, (CPU_BATCH, CPU_SEQ))

    def step():
        trainer.train_step(ids_BS)

    timing = harness.time_op(step, "cpu", warmup=budget.warmup, iters=budget.iters, label="train-step-cpu")
    harness.wall_clock(benchmark, step, "cpu", budget)
    harness.record(
        benchmark,
        ceilings=ceilings,
        us=timing["median_us"],
        flops=int(model.flops_per_token(CPU_SEQ) * ids_BS.numel()),
        tokens_per_s=ids_BS.numel() / (timing["median_us"] * 1e-6),
        batch=CPU_BATCH,
        seq=CPU_SEQ,
        preset="scout-debug",
        dtype="float32",
        threads=CPU_THREADS,
    )
