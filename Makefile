# relaykv: `make demo` and `make test` each set up what is missing, build, then run.
SHELL := /bin/bash
.DEFAULT_GOAL := demo

VENV   := .venv
PY     := $(VENV)/bin/python
BUILD  ?= build
JOBS   ?= $(shell nproc)
# CUDA kernels compile whenever nvcc exists (no GPU is needed to build them).
NVCC   := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
WITH_CUDA ?= $(if $(NVCC),ON,OFF)
CMAKE_ARGS ?=

CONFIGURE_FLAGS := -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE=$(abspath $(PY)) \
  -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
  -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache \
  $(if $(NVCC),-DCMAKE_CUDA_COMPILER=$(NVCC)) \
  -DRELAYKV_WITH_CUDA=$(WITH_CUDA) -DRELAYKV_WITH_NCCL=$(WITH_CUDA) \
  $(CMAKE_ARGS)

.PHONY: setup build test test-cpp test-python demo bench format clean

setup:
	@bash deploy/bootstrap.sh

# Any CMakeLists.txt that is added or changed re-runs the configure (the tree adds
# module folders when they exist, which ninja alone cannot notice).
CMAKE_LISTS := $(shell find . -name CMakeLists.txt -not -path './build*' -not -path './.venv/*')
$(BUILD)/build.ninja: $(CMAKE_LISTS) | setup
	cmake -S . -B $(BUILD) $(CONFIGURE_FLAGS)

build: setup $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

test: build
	@$(MAKE) --no-print-directory test-cpp test-python

test-cpp:
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# pytest exits 5 when it collected nothing; that is a broken test tree, not a pass.
test-python:
	@set +e; $(PY) -m pytest tests/python; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing"; exit 1; fi; \
	exit $$rc

demo: build
	$(PY) -m relaykv demo

# Benchmarks write JSON lines into results/ (one file per benchmark).
BENCHES := span_index kv_ops store transport server
bench: build
	@mkdir -p results
	@set -e; for b in $(BENCHES); do echo "== $$b"; $(BUILD)/tests/bench/$$b/$${b}_bench | tee results/$$b.jsonl; done
	$(PY) -m relaykv bench relay --tasks 2 --agents 5 --max-new-tokens 96 --threads 1 --out results/relay.jsonl
	$(PY) tests/bench/vllm/vllm_e2e_bench.py --out results/vllm_e2e.jsonl

format:
	clang-format -i $$(git ls-files '*.h' '*.cc' '*.cu')

clean:
	rm -rf $(BUILD)
