"""Command line: `python -m engine {info,demo,bench}` (console script `llama4-engine`).

`demo` is the main job (`make run`): until the model lands it routes Scout- and Maverick-shaped
batches through the fused router, checks them against the reference and prints timings, then fits
a small MoE block with the 8-bit AdamW.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_info(_args: argparse.Namespace) -> int:
    import engine

    info = {
        "engine": engine.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "build": engine.build_info(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _time_us(fn, device: str, iters: int) -> float:
    """Median wall time of fn in microseconds (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    samples = []
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def cmd_demo(args: argparse.Namespace) -> int:
    from bench.shapes import MAVERICK, SCOUT
    from engine import ops

    device = args.device or _device()
    gen = torch.Generator(device="cpu").manual_seed(0)
    print(f"llama4 engine demo on {device}: fused MoE router (sigmoid top-k, Llama 4 semantics)")
    print(f"{'problem':<28}{'ours us':>10}{'reference us':>14}{'speedup':>9}  exact")
    failures = 0
    for model in (SCOUT, MAVERICK):
        for tokens, top_k in ((1, 1), (128, 1), (128, 8 if model.n_experts >= 8 else 1), (4096, model.top_k)):
            logits_TE = torch.randn(tokens, model.n_experts, generator=gen).to(device=device, dtype=torch.bfloat16)
            bias_E = (0.01 * torch.randn(model.n_experts, generator=gen)).to(device)
            route = ops.moe_route(logits_TE, top_k, expert_bias_E=bias_E)
            ref = ops.reference.moe_route(logits_TE, top_k, expert_bias_E=bias_E)
            exact = all(torch.equal(a, b) for a, b in zip(route[1:], ref[1:], strict=True)) and torch.allclose(
                route.topk_weights_TK, ref.topk_weights_TK, rtol=2e-6, atol=0
            )
            failures += not exact
            ours = _time_us(
                lambda lg=logits_TE, k=top_k, b=bias_E: ops.moe_route(lg, k, expert_bias_E=b), device, args.iters
            )
            base = _time_us(
                lambda lg=logits_TE, k=top_k, b=bias_E: ops.reference.moe_route(lg, k, expert_bias_E=b),
                device,
                max(3, args.iters // 10),
            )
            name = f"{model.name} T={tokens} E={model.n_experts} K={top_k}"
            print(f"{name:<28}{ours:>10.1f}{base:>14.1f}{base / ours:>8.1f}x  {'yes' if exact else 'NO'}")
            # Dispatch and combine of the same batch (Llama 4 scales the expert input by the weight).
            x_TD = torch.randn(tokens, 256, generator=gen).to(device=device, dtype=torch.bfloat16)
            x_sorted = ops.moe_permute(x_TD, route, route.topk_weights_TK)
            y_TD = ops.moe_unpermute(x_sorted, route)
            expected = (x_TD.float() * route.topk_weights_TK.sum(1, keepdim=True)).to(torch.bfloat16)
            if not torch.allclose(y_TD.float(), expected.float(), rtol=2e-2, atol=1e-2):
                failures += 1
                print("  permute -> unpermute mismatch")
    print("all results match the reference" if not failures else f"{failures} mismatches")
    failures += _demo_moe_training(device, gen)
    return 1 if failures else 0


def _demo_moe_training(device: str, gen: torch.Generator, steps: int = 60) -> int:
    """Fits a small Llama 4 MoE block (router, 8 experts, shared expert) to a random teacher with
    AdamW8bit: the router, the grouped GEMMs, SwiGLU, dispatch/combine and the 8-bit optimizer together."""
    from engine.moe import MoE
    from engine.optim import AdamW8bit

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    D, F, E, T = 128, 256, 8, 512
    torch.manual_seed(0)
    student = MoE(D, F, E, 1, dtype=dtype, device=device)
    teacher = MoE(D, F, E, 1, dtype=dtype, device=device).requires_grad_(False)
    x_TD = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
    target_TD = teacher(x_TD)
    opt = AdamW8bit(student.parameters(), lr=3e-3, weight_decay=0.0, min_8bit_size=1024)
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = (student(x_TD).float() - target_TD.float()).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    print(
        f"MoE block (D={D}, F={F}, E={E}) + AdamW8bit, {steps} steps on {device}: loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f} ({steps * T / seconds:,.0f} tokens/s), expert load {student.expert_load().tolist()}"
    )
    return 0 if losses[-1] < losses[0] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import pytest

    return pytest.main(["bench", "-q", *args.pytest_args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama4-engine", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="device, built kernels, versions").set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo", help="the main job: route Scout/Maverick batches and time them")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    demo.add_argument("--iters", type=int, default=50)
    demo.set_defaults(fn=cmd_demo)
    bench = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
