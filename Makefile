# The project's commands. A new user needs two: `make run` (set up + the main job) and
# `make test` (set up with dev extras + the test suite). See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
# The CUDA build of torch (installs from local disk here), so the CUDA extension compiles in CI.
TORCH_SPEC ?= torch==2.14.1
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0.0
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.txt')
CXX_FORMAT_FILES := $(shell find csrc tests/cpp -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: run test lint format cuda-check bench gpu-check build clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" ninja pybind11 numpy nvtx
	$(PIP) install -q --no-deps "$(CUTLASS_SPEC)"
	touch $@

$(VENV)/.dev: $(VENV)/.deps pyproject.toml
	$(PIP) install -q "pytest>=8" "pytest-benchmark>=4" hypothesis expecttest "ruff==0.17.6" "clang-format==23.1.5" "transformers==5.24.0"
	touch $@

# First build: editable install (registers the package and the llama4-engine script).
# Later builds: incremental ninja rebuild of what changed.
$(VENV)/.built: $(VENV)/.deps setup.py csrc/sources.txt $(CSRC)
	if [ ! -f $(VENV)/.editable ]; then \
	  $(PIP) install -q --no-build-isolation --no-deps -e . && touch $(VENV)/.editable; \
	else \
	  $(PY) setup.py -q build_ext --inplace; \
	fi
	touch $@

build: $(VENV)/.built

run: $(VENV)/.built
	$(PY) -m engine demo

test: $(VENV)/.built $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_FORMAT_FILES)

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_FORMAT_FILES)

# Compiles every CUDA source for sm_90a (no GPU needed) through the standalone CMake library,
# and AOT-compiles every Triton kernel for sm_90.
cuda-check: $(VENV)/.deps
	PY=$(PY) bash tools/cuda_check.sh

bench: $(VENV)/.built $(VENV)/.dev
	LLAMA4_BENCH_SAVE=1 $(PY) -m pytest bench -q -p no:cacheprovider

# The one script for a machine with an H100/H200 (run there, see tools/gpu_check.sh).
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf build engine/_C*.so $(VENV)/.built
