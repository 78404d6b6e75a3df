"""Fixtures and session plumbing of the benchmark suite: device, timing budget (--bench-quick), ceilings,
the skip of `gpu`-marked items without CUDA (the marker is registered in pyproject.toml), and at session end
the results JSON, only with LLAMA4_BENCH_SAVE=1 so `make test` never writes results:
bench/results/<device>/<UTC date>-<git sha>.json, and $OUT/bench-results.json when OUT is set.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import pytest
import torch

from bench import harness

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SAVE_ENV = "LLAMA4_BENCH_SAVE"
QUICK_ENV = "LLAMA4_BENCH_QUICK"
OUT_NAME = "bench-results.json"


def pytest_addoption(parser):
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=os.environ.get(QUICK_ENV) == "1",
        help=f"time each benchmark briefly (make gpu-check); also set by {QUICK_ENV}=1",
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        # Only this directory's items: tests/ has its own conftest with its own rule.
        if "gpu" in item.keywords and BENCH_DIR in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """The device benchmarks run on unless they parametrize `device` themselves."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def budget(request, device, benchmark) -> harness.Budget:
    """Warm-up / iteration counts for this device; `--benchmark-disable` makes it a smoke run."""
    return harness.Budget.for_run(
        quick=request.config.getoption("--bench-quick"), device=device, smoke=benchmark.disabled
    )


@pytest.fixture
def ceilings(device, request) -> dict:
    """{"matmul_tflops_bf16", "copy_gbps", ...} of `device`, measured once per session and device."""
    budget = harness.Budget.for_run(quick=request.config.getoption("--bench-quick"), device=device)
    return harness.measure_ceilings(device, budget)


# --------------------------------------------------------------------------------------------
# Results JSON
# --------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _device_dir() -> str:
    if torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name(0))
    return f"cpu-{_slug(platform.machine()) or 'unknown'}"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_info() -> dict | str:
    try:
        import engine

        return engine.build_info()
    except Exception as exc:  # a missing build must not lose the timings already taken
        return f"unavailable: {exc}"


def _results_doc(session) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_model(),
        "device_dir": _device_dir(),
        "utc": now.isoformat(timespec="seconds"),
        "git_sha": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "quick": session.config.getoption("--bench-quick"),
        "build_info": _build_info(),
        "ceilings": harness.CEILINGS,
        "benchmarks": [{"name": name, **info} for name, info in harness.RESULTS],
    }


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(SAVE_ENV) != "1" or not harness.RESULTS:
        return
    doc = _results_doc(session)
    text = json.dumps(doc, indent=1, default=str) + "\n"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = RESULTS_DIR / doc["device_dir"] / f"{date}-{doc['git_sha'] or 'nogit'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    written = [path]
    if os.environ.get("OUT"):
        out_path = Path(os.environ["OUT"]) / OUT_NAME
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)
        written.append(out_path)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for p in written:
            reporter.write_line(f"benchmark results: {p}")
