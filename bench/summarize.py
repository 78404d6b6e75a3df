"""Print a results JSON (written by bench/conftest.py) as a short fixed-width table: time, achieved rate,
percent of the ceiling measured in the same run, speedups, and PASS/FAIL where a target exists.

Usage: python -m bench.summarize FILE.json [--strict]   (--strict: exit 1 when a target is missed)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME_WIDTH = 34
COLUMNS = ("us", "graph_us", "rate", "%ceil", "x base", "x topk", "target", "result")
WIDTHS = (10, 10, 13, 7, 8, 8, 20, 7)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rate(info: dict) -> str:
    # Three significant digits: CPU rates of tiny problems are far below 0.1 GB/s.
    if "tflops" in info:
        return f"{info['tflops']:.3g} TF/s"
    if "gbps" in info:
        return f"{info['gbps']:.3g} GB/s"
    return "-"


def targets(info: dict) -> list[tuple[str, bool]]:
    """(description, met) for each target a benchmark declares."""
    out = []
    if "target_us" in info:
        key = info.get("target_us_on", "us")
        measured = info.get(key, info["us"])
        label = "us" if key == "us" else key.removesuffix("_us")
        out.append((f"{label}<={info['target_us']:g}", measured <= info["target_us"]))
    if "target_speedup" in info and "speedup" in info:
        out.append((f"x{info['target_speedup']:g}", info["speedup"] >= info["target_speedup"]))
    # Floors on achieved rates: (target key, measured key, label).
    for target_key, measured_key, label in (
        ("target_tflops", "tflops", "TF/s"),
        ("target_gbps", "gbps", "GB/s"),
        ("target_pct_of_ceiling", "pct_of_ceiling", "%ceil"),
    ):
        if target_key in info and measured_key in info:
            out.append((f"{label}>={info[target_key]:g}", info[measured_key] >= info[target_key]))
    return out


def format_table(doc: dict) -> tuple[str, int]:
    """The table as text, and how many benchmarks missed a target."""
    ceil = doc.get("ceilings", {})
    lines = [
        f"device {doc.get('device')}  torch {doc.get('torch')}  cuda {doc.get('cuda')}  "
        f"git {doc.get('git_sha')}{'+dirty' if doc.get('git_dirty') else ''}  {doc.get('utc')}"
        + ("  (quick)" if doc.get("quick") else ""),
    ]
    for dev, c in ceil.items():
        lines.append(
            f"ceiling {dev}: matmul {c['matmul_tflops_bf16']:.2f} TF/s ({c.get('matmul_dtype', '?')}), "
            f"copy {c['copy_gbps']:.1f} GB/s (read + write)"
        )
    header = f"{'benchmark':<{NAME_WIDTH}}" + "".join(f"{c:>{w}}" for c, w in zip(COLUMNS, WIDTHS, strict=True))
    lines += [header, "-" * len(header)]
    missed = 0
    for info in doc.get("benchmarks", []):
        met = targets(info)
        result = "-" if not met else ("PASS" if all(ok for _, ok in met) else "FAIL")
        missed += result == "FAIL"
        name = info["name"].removeprefix("test_")
        if len(name) > NAME_WIDTH - 1:
            name = name[: NAME_WIDTH - 2] + "~"
        cells = (
            _num(info.get("us"), ".2f"),
            _num(info.get("graph_us"), ".2f"),
            _rate(info),
            _num(info.get("pct_of_ceiling"), ".3g"),
            _num(info.get("speedup"), ".3g"),
            _num(info.get("speedup_vs_topk"), ".3g"),
            " ".join(desc for desc, _ in met) or "-",
            result,
        )
        lines.append(f"{name:<{NAME_WIDTH}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS, strict=True)))
    lines.append(
        "us: median CUDA-event time per call, L2 flushed (CPU: perf_counter, no flush); graph_us: per call in a "
        "CUDA-graph replay;\nx base: speedup vs the benchmark's baseline (router: engine.ops.reference, permute/unpermute: "
        "plain torch); x topk: speedup vs the plain-torch router; %ceil: of the copy (GB/s) or matmul (TF/s) ceiling"
    )
    return "\n".join(lines), missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="results JSON written with LLAMA4_BENCH_SAVE=1")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any benchmark misses a target")
    args = parser.parse_args(argv)
    missed = 0
    for path in args.files:
        table, n = format_table(json.loads(path.read_text()))
        print(f"== {path}\n{table}")
        missed += n
    if missed:
        print(f"{missed} benchmark(s) missed a target")
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
