"""Builds `engine._C`: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Sources come from csrc/sources.txt (shared with CMakeLists.txt). Default CUDA arch 9.0a;
TORCH_CUDA_ARCH_LIST overrides (e.g. "9.0a" or "9.0a;10.0a"). MAX_JOBS sets parallel compiles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def read_sources() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            current.append(line)
    return sections


def cutlass_include() -> tuple[str | None, str]:
    """CUTLASS headers from the nvidia-cutlass pip package (never vendored, never fetched)."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None, "not found"
    inc = Path(next(iter(spec.submodule_search_locations))) / "source" / "include"
    if not (inc / "cutlass" / "version.h").exists():
        return None, "not found"
    text = (inc / "cutlass" / "version.h").read_text()
    ver = []
    for key in ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"):
        for line in text.splitlines():
            if line.startswith(f"#define {key} "):
                ver.append(line.split()[2])
    return str(inc), ".".join(ver) or "unknown"


def find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    home = os.environ.get("CUDA_HOME") or CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def ext_modules():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    src = read_sources()
    nvcc = find_nvcc()
    with_cuda = torch.version.cuda is not None and nvcc is not None and os.environ.get("LLAMA4_NO_CUDA") != "1"
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", str(Path(nvcc).parent.parent))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    cutlass_inc, cutlass_ver = cutlass_include()

    cxx = ["-O3", "-std=c++20"]  # torch >= 2.12 headers need C++20
    defines = [
        ("LLAMA4_TORCH_VERSION", f'"{torch.__version__}"'),
        ("LLAMA4_CUDA_ARCH", f'"{arch}"'),
        ("LLAMA4_CUTLASS_VERSION", f'"{cutlass_ver}"'),
        ("LLAMA4_GIT_SHA", f'"{git_sha()}"'),
    ]
    include_dirs = [str(ROOT / "csrc")]
    sources = src["cpu"] + src["bindings"]
    if not with_cuda:
        print(f"[engine] building CPU kernels only (torch CUDA: {torch.version.cuda}, nvcc: {nvcc})")
        return [CppExtension("engine._C", sources, include_dirs=include_dirs, define_macros=defines,
                             extra_compile_args={"cxx": cxx})]

    print(f"[engine] building CPU + CUDA kernels for arch {arch} with {nvcc}")
    if cutlass_inc:
        include_dirs.append(cutlass_inc)
    defines.append(("LLAMA4_WITH_CUDA", "1"))
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-lineinfo",  # source lines in Nsight Compute, no runtime cost
        "-Xptxas=-warn-spills",
    ]
    return [
        CUDAExtension(
            "engine._C",
            sources + src["cuda_bindings"] + src["kernels"],
            include_dirs=include_dirs,
            define_macros=defines,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags},
        )
    ]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=ext_modules(), cmdclass=cmdclass())
