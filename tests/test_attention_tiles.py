"""The attention kernels' tile enumeration (csrc/kernels/sparse_attention_tiles.cuh) checked on the host:
compiles tests/cpp/attention_tiles_check.cpp with the system C++ compiler and runs its brute force over
~85k mask / shape configurations (forward walk == inverse of the backward walk, masks == mask_visible)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
def test_attention_tile_walks_match_mask(tmp_path):
    exe = tmp_path / "attention_tiles_check"
    subprocess.run(
        [
            CXX,
            "-std=c++20",
            "-O2",
            f"-I{ROOT / 'csrc' / 'kernels'}",
            str(ROOT / "tests/cpp/attention_tiles_check.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "fails 0" in result.stdout
