"""The build's single source of truth: every kernel source is listed once in csrc/sources.txt,
which both setup.py and CMakeLists.txt read; CUDA kernel files include no torch header."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            current.append(line)
    return sections


def test_every_source_is_listed_exactly_once():
    listed = [p for files in _sections().values() for p in files]
    assert len(listed) == len(set(listed)), "a source is listed twice in csrc/sources.txt"
    on_disk = {
        str(p.relative_to(ROOT))
        for ext in ("*.cu", "*.cpp")
        for p in (ROOT / "csrc").rglob(ext)
        if "build" not in p.parts
    }
    assert on_disk == set(listed), f"unlisted: {on_disk - set(listed)}, missing: {set(listed) - on_disk}"


def test_kernels_section_holds_exactly_the_cuda_files():
    kernels = _sections()["kernels"]
    assert kernels and all(p.startswith("csrc/kernels/") and p.endswith(".cu") for p in kernels)


def test_setup_and_cmake_read_the_same_list():
    assert 'csrc" / "sources.txt' in (ROOT / "setup.py").read_text().replace("'", '"')
    assert "csrc/sources.txt" in (ROOT / "CMakeLists.txt").read_text()


def test_cuda_kernels_include_no_torch_header():
    pattern = re.compile(r'#include\s+[<"](torch|ATen|c10|pybind11)/')
    for path in (ROOT / "csrc" / "kernels").rglob("*"):
        if path.suffix in {".cu", ".cuh", ".h"}:
            assert not pattern.search(path.read_text()), f"{path.name} includes a torch header"


def test_cuda_fallback_covers_every_op_and_copies_in_place_results_back(caplog):
    """The no-CUDA-build fallback runs an op's CPU kernel and writes in-place arguments back; here the
    'device' is the CPU itself, which exercises the mechanics (the GPU case only adds copies)."""
    import torch

    from engine.ops import _library, dynamic_qmap

    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("llama4::")}
    assert registered - set(_library._PYTHON_OP_NAMES) == set(_library._OP_NAMES)

    gen = torch.Generator().manual_seed(0)
    n = 4096
    param = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen)
    state = [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(16), torch.zeros(16)]
    args = [dynamic_qmap(True), dynamic_qmap(False), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, 256, 7]
    expected_param = param.clone()
    expected_state = [t.clone() for t in state]
    torch.ops.llama4.adamw8bit_step(expected_param, grad, *expected_state, *args)
    with caplog.at_level("WARNING", logger="engine.ops"):
        _library._cpu_fallback("adamw8bit_step")(param, grad, *state, *args)
    assert torch.equal(param, expected_param)
    assert all(torch.equal(a, b) for a, b in zip(state, expected_state, strict=True))
    assert "adamw8bit_step" in caplog.text


def test_gpu_check_runs_every_benchmark_file():
    """tools/gpu_check.sh lists the benchmark files in priority order: a new file must be added there."""
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    listed = set(re.findall(r"bench/test_bench_\w+\.py", script))
    present = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("test_bench_*.py")}
    assert listed == present, f"missing from gpu_check.sh: {present - listed}; stale: {listed - present}"
