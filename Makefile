# Two interpreters: the host (.venv, Python >= 3.10: pytest, TF, tf2onnx, onnx, ORT) and the CNTK
# worker (.venv-cntk, CPython 3.6: cntk 2.7). `make demo` and `make test` set both up when needed;
# a second run only re-checks (seconds).
SHELL := /bin/bash
HOST_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
HOST_STAMP := $(VENV)/.tf2cntk-installed
PYTEST_ARGS ?=
DEMO_MODELS ?= fixtures/cnn_bn.keras fixtures/two_io.keras

.PHONY: setup host cntk test demo bench clean fixtures

setup: host cntk

host: $(HOST_STAMP)

$(HOST_STAMP): pyproject.toml
	@$(HOST_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "make: the host needs Python >= 3.10 (found $(HOST_PYTHON)); set HOST_PYTHON=..." >&2; exit 1; }
	@test -x $(PY) || $(HOST_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,report]'
	@touch $@

# tf2cntk setup is idempotent: it installs libopenmpi3 (apt, as root) and the CNTK venv only when
# missing, then proves CNTK works by evaluating a small function.
cntk: host
	@$(VENV)/bin/tf2cntk setup --env-dir .venv-cntk

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure" >&2; exit 1; fi; \
	exit $$rc

# The plugin on bundled fixtures: conversion, Hypothesis parity on cpu (gpu skips with its reason
# where there is none), the summary table and a JSON report.
demo: setup
	@$(PY) -m pytest -p no:cacheprovider fixtures $(foreach m,$(DEMO_MODELS),--tf2cntk-model=$(m)) \
	  --tf2cntk-report=.tf2cntk/demo-report.json -v

# One at a time: they measure ratios side by side and 2 cores leave no room for neighbours.
bench: setup
	$(PY) benchmarks/worker_roundtrip.py --json benchmarks/results/worker_roundtrip.json
	$(PY) benchmarks/conversion.py
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/history.py
	$(PY) benchmarks/layerwise.py --quick
	$(PY) benchmarks/fidelity.py --quick

fixtures: host
	$(PY) fixtures/build.py

clean:
	rm -rf $(VENV) .venv-cntk .tf2cntk .pytest_cache .hypothesis
