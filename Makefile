# Two commands do all the set-up on a fresh machine (Python 3.10+, pip; gcc/nvcc optional):
#   make run    installs tissuesim (+ the CuPy build matching an NVIDIA driver, if any) into .venv
#               and runs the default simulation; pass Hydra overrides with ARGS="tissue=lung ..."
#   make test   installs tissuesim with its test tools into .venv, then lint + the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
GPU_EXTRA := $(shell sh tools/cuda_extra.sh)
# Without a GPU the tests still compile every kernel with NVRTC, which the cuda13 wheels provide.
TEST_EXTRA := test,$(if $(GPU_EXTRA),$(GPU_EXTRA),cuda13)
RUN_EXTRA := $(if $(GPU_EXTRA),[$(GPU_EXTRA)],)

.PHONY: run test test-all lint gpu-check bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".$(RUN_EXTRA)"
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[$(TEST_EXTRA)]"
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/tissuesim $(ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# On a machine with an NVIDIA GPU: GPU tests + GPU benchmarks, JSON into $(OUT) (default bench/results/gpu).
OUT ?= bench/results/gpu
gpu-check:
	sh tools/gpu_check.sh "$(OUT)"

clean:
	rm -rf $(VENV) build dist *.egg-info
