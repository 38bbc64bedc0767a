# Two commands for a fresh machine:  `make demo` (train on the built-in demo data)  and  `make test`.
# Each creates .venv and installs the pinned dependencies first (only when they changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: demo test bench setup clean gpu-check gpu-check-dry cuda-build-check

$(VENV)/.deps: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# --no-build-isolation: an isolated build would pull a CUDA torch to build the extension.
$(VENV)/.installed: $(VENV)/.deps setup.py $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m caer_fast.train --demo $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

bench: setup
	$(PY) -m pytest bench --benchmark-only $(ARGS)

# The GPU acceptance run, on a GPU machine with its own python3 + CUDA torch (no .venv, no network):
# builds the extension there, runs the gpu-marked tests and the GPU benchmarks, writes JSON + markdown to OUT.
OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) tools/gpu_check.py $(OUT) $(ARGS)

# Its plumbing on this CPU (what CI runs, via tests/test_gpu_check.py).
gpu-check-dry: setup
	$(PY) tools/gpu_check.py $(OUT) --dry-run $(ARGS)

# The CUDA extension built against a CUDA torch from PyPI in its own venv, no GPU needed (see docs/gpu.md).
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= 2.13.0
cuda-build-check:
	$(PYTHON) tools/cuda_build_check.py --venv $(CUDA_VENV) --torch $(CUDA_TORCH) --json $(CUDA_VENV)/check.json

clean:
	rm -rf $(VENV) build *.egg-info caer_fast/_C*.so
