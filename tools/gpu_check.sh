#!/usr/bin/env bash
# `make gpu-check`: the one script for a machine with an H100/H200, run as ONE command in under
# 5 minutes (device tool: `run`, timeout_s ~330, carry [".whl"]). It installs the carried wheels,
# builds engine._C from source with all cores for sm_90a, runs `pytest -m gpu`, runs the benchmark
# suite briefly, writes JSON + logs under $OUT (when set) and prints a short table last.
# Never changes clocks or resets the GPU. Commit what comes back: copy $OUT/bench-results.json to
# bench/results/<gpu>/<date>-<sha>.json (the sha it measured is inside) with the logs' summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu-check}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
t0=$(date +%s)
stamp() { echo "[gpu-check +$(( $(date +%s) - t0 ))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.csv"

if compgen -G ".whl/*.whl" >/dev/null; then
  stamp "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llama4-site .whl/*.whl
  export PYTHONPATH="/tmp/llama4-site${PYTHONPATH:+:$PYTHONPATH}"
fi

stamp "building engine._C (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)"
if ! "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  stamp "BUILD FAILED"
  exit 1
fi
"$PY" -c "import engine, json; print(json.dumps(engine.build_info()))" | tee "$OUT/build_info.json"

stamp "pytest -m gpu (LLAMA4_TEST_SAMPLE=${GPU_TEST_SAMPLE:-1} parametrisation(s) per test: breadth over every kernel)"
# Bounded so the whole script fits its 5-minute budget; SIGINT (not KILL) lets pytest write its summary and
# junit XML for what ran. GPU_TEST_SAMPLE=0 runs every parametrisation (a longer, dedicated session).
sample="${GPU_TEST_SAMPLE:-1}"
[ "$sample" = "0" ] && sample=""
LLAMA4_TEST_SAMPLE="$sample" timeout -s INT -k 15 "${GPU_TEST_SECONDS:-90}" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" tests >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/tests.log"

stamp "benchmarks (quick)"
# Kernels first, the whole-model training step (minutes: it builds 10B-parameter slices) last.
bench_files=(bench/test_bench_router.py bench/test_bench_fp8.py bench/test_bench_grouped_gemm_bwd.py
  bench/test_bench_attention.py bench/test_bench_attention_bwd.py bench/test_bench_decode.py bench/test_bench_adamw.py
  bench/test_bench_moe.py bench/test_bench_norm_rope.py bench/test_bench_train.py)
LLAMA4_BENCH_SAVE=1 OUT="$OUT" timeout -s INT -k 15 "${GPU_BENCH_SECONDS:-75}" "$PY" -m pytest "${bench_files[@]}" -m gpu -q \
  -p no:cacheprovider --bench-quick --benchmark-json="$OUT/pytest-benchmark.json" >"$OUT/bench.log" 2>&1
bench_rc=$?
tail -15 "$OUT/bench.log"

stamp "summary (tests rc=$tests_rc, bench rc=$bench_rc)"
"$PY" -m bench.summarize "$OUT/bench-results.json" || true
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
