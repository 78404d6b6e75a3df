#!/usr/bin/env bash
# `make cuda-check`: compile every CUDA source for sm_90a without a GPU (through the standalone
# CMake library, i.e. the same csrc/sources.txt list engine._C builds), check that the objects
# hold sm_90a machine code, and AOT-compile every registered Triton kernel for sm_90.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: CMake runs it from the build folder
CUTLASS_INCLUDE="$("$PY" -c 'import importlib.util as u, os; s = u.find_spec("cutlass_library"); print(os.path.join(list(s.submodule_search_locations)[0], "source", "include"))')"
[ -f "$CUTLASS_INCLUDE/cute/tensor.hpp" ] || { echo "cuda-check: CUTLASS headers not found (pip install nvidia-cutlass)" >&2; exit 1; }
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
BUILD=build/cuda-check
JOBS="${MAX_JOBS:-2}"

echo "== nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
[ -x "$(dirname "$PY")/ninja" ] && generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(cd "$(dirname "$PY")" && pwd)/ninja")
cmake -S . -B "$BUILD" "${generator[@]}" -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DPython3_EXECUTABLE="$PY" -DCUTLASS_INCLUDE_DIR="$CUTLASS_INCLUDE" \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j "$JOBS" 2>&1 | tee "$BUILD/build.log" | grep -E "error|warning|Building|Linking" || true
if grep -qE "error" "$BUILD/build.log"; then
  echo "cuda-check: compile errors" >&2
  exit 1
fi

# cuobjdump: the toolkit's, else the copy Triton's wheel carries (this machine's toolkit has none).
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || CUOBJDUMP="$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
status=0
mapfile -t objects < <(find "$BUILD" -name '*.cu.o' | sort)
[ "${#objects[@]}" -gt 0 ] || { echo "cuda-check: no CUDA objects built" >&2; exit 1; }
for obj in "${objects[@]}"; do
  if [ ! -x "$CUOBJDUMP" ]; then
    echo "ok   compiled ${obj#"$BUILD"/} (no cuobjdump to list its ELF)"
  elif "$CUOBJDUMP" --list-elf "$obj" | grep -q "sm_90a"; then
    echo "ok   sm_90a  ${obj#"$BUILD"/CMakeFiles/llama4_kernels.dir/}"
  else
    echo "FAIL no sm_90a code in $obj" >&2
    status=1
  fi
done

echo "== Triton kernels (AOT for sm_90)"
"$PY" tools/triton_aot_check.py || status=1
exit $status
