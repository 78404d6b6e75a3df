"""The command line (`python -m engine ...`) in subprocesses, tiny: train -> save -> resume reproduces the
uninterrupted loss curve, generate from the saved model, convert it, the demo end to end, info.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.plot import read_png_size

REPO = Path(__file__).resolve().parent.parent
TINY = ["--batch-size", "2", "--seq-len", "16", "--quiet", "--print-losses", "--device", "cpu", "--warmup", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: debug-size models, one thread


def _engine(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), LLAMA4_NVTX="0")
    proc = subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"engine {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _in_process(capsys, *args: str) -> str:
    """The same entry point without a new interpreter (a torch import costs seconds on 2 cores)."""
    from engine.__main__ import main

    capsys.readouterr()
    assert main(list(args)) == 0, args
    return capsys.readouterr().out


def _losses(stdout: str) -> list[float]:
    return json.loads([line for line in stdout.splitlines() if line.startswith("[")][-1])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("one two three four five six seven eight nine ten. " * 30)
    return path


def test_train_resume_reproduces_the_uninterrupted_run(tmp_path, data_file, capsys):
    straight = _losses(_in_process(capsys, "train", "--steps", "4", "--data", str(data_file), *TINY))
    _in_process(capsys, "train", "--steps", "2", "--data", str(data_file), "--save-dir", str(tmp_path / "run"), *TINY)
    assert (tmp_path / "run" / "trainer_state.pt").is_file() and (tmp_path / "run" / "config.json").is_file()
    # The resume runs in a fresh interpreter: everything must come from the saved run.
    resumed = _losses(_engine("train", "--resume", str(tmp_path / "run"), "--steps", "4", *TINY[4:]).stdout)
    assert len(straight) == 4 and resumed == straight[2:]


def test_generate_and_convert_a_saved_model(tmp_path, data_file, capsys):
    model = tmp_path / "model"
    _in_process(capsys, "train", "--steps", "1", "--data", str(data_file), "--save-dir", str(model), *TINY)
    out = _engine("generate", "--model", str(model), "--prompt", "one two", "--max-new-tokens", "6", "--device", "cpu")
    assert out.stdout.startswith("one two")
    assert "tokens/s" in out.stderr
    _in_process(capsys, "convert", str(model), str(tmp_path / "fp8"), "--precision", "fp8", "--device", "cpu")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fbgemm_fp8"


def test_demo_end_to_end(tmp_path):
    out = _engine(
        "demo", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--out", str(tmp_path),
        "--device", "cpu",
    )  # fmt: skip
    assert "tokens/s" in out.stdout and "sample" in out.stdout
    assert read_png_size((tmp_path / "loss.png").read_bytes()) == (640, 400)
    assert (tmp_path / "model" / "config.json").is_file()


def test_info_and_bad_usage(capsys):
    info = json.loads(_in_process(capsys, "info"))
    assert {"engine", "torch", "build"} <= info.keys()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    bad = subprocess.run([sys.executable, "-m", "engine", "train", "--precision", "fp16"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "precision" in bad.stderr


def test_demo_gpu_step_code_path_on_a_debug_model(capsys):
    """The GPU part of the demo (one timed step, MFU) runs the same code on the CPU with a debug model."""
    import argparse

    from engine.__main__ import _demo_gpu_step
    from engine.model import Llama4Config

    assert _demo_gpu_step(
        argparse.Namespace(seed=0), device="cpu", config=Llama4Config.preset("scout-debug"), seq_len=32
    )
    out = capsys.readouterr().out
    assert "one training step" in out and "tokens/s" in out and "MFU -" in out
