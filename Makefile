# Two commands for a fresh machine:  `make demo` (train on the built-in demo data)  and  `make test`.
# Each creates .venv and installs the pinned dependencies first (only when they changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: demo test bench setup clean

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

clean:
	rm -rf $(VENV) build *.egg-info caer_fast/_C*.so
