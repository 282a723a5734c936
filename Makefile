# Two interpreters: the host (.venv, the Python its lock was made for, now 3.11: pytest, TF,
# tf2onnx, onnx, ORT) and the CNTK worker (.venv-cntk, CPython 3.6: cntk 2.7). `make demo` and
# `make test` set both up when needed; a second run only re-checks (seconds). `make test-fast`
# leaves out the tests marked slow.
#
# Both are installed from lock files of exact versions with sha256 hashes, so a fresh clone gets
# what was tested whatever upstream releases: locks/host.txt for the host (the project itself then
# goes in editable, --no-deps) and pytest_tf2cntk/cntk/lock-cntk.txt (lock-cntk-gpu.txt for
# --gpu), which ships in the package, for `tf2cntk setup`. pyproject.toml keeps ranges.
#   make lock    recreates all three from the ranges: fresh temporary venvs, resolve, install
#                with --require-hashes, freeze, compare (and evaluate CNTK), then replace the files
#                atomically; review the diff and commit it. Takes about 2 minutes.
#                HOST_PYTHON=python3.X re-resolves the host lock for another Python; PYTHON36=...
#                names the base CPython 3.6 (default: as `tf2cntk setup` finds it).
SHELL := /bin/bash
HOST_LOCK := locks/host.txt
# The Python the host lock was resolved for ("lock-python: 3.11" in its header).
LOCK_PY := $(shell sed -n 's/^.*lock-python: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' $(HOST_LOCK) 2>/dev/null)
ifeq ($(origin HOST_PYTHON),undefined)
HOST_PYTHON := $(shell command -v python$(or $(LOCK_PY),3.11) || command -v python3)
endif
PYTHON36 ?=
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
HOST_STAMP := $(VENV)/.tf2cntk-installed
# The suite runs on both cores (pytest-xdist, a test file per worker): most of its time is
# end-to-end runs in subprocesses. PYTEST_ARGS= (empty) runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile
DEMO_MODELS ?= fixtures/cnn_bn.keras fixtures/two_io.keras

.PHONY: setup host cntk test test-fast lock demo bench clean fixtures dist

setup: host cntk

host: $(HOST_STAMP)

# Reinstalls when pyproject.toml or the lock changed. The lock holds pip and setuptools too; the
# project builds against the locked setuptools (--no-build-isolation), and pip check fails when
# the lock no longer satisfies pyproject.toml's ranges (then: make lock).
$(HOST_STAMP): pyproject.toml $(HOST_LOCK)
	@$(HOST_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "make: the host needs Python >= 3.10 (found $(HOST_PYTHON)); set HOST_PYTHON=..." >&2; exit 1; }
	@test -x $(PY) || $(HOST_PYTHON) -m venv $(VENV)
	@have=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); [ "$$have" = "$(LOCK_PY)" ] || \
	  { echo "make: $(HOST_LOCK) is for Python $(LOCK_PY) but $(VENV) has Python $$have: install" \
	    "python$(LOCK_PY) and run 'make clean setup', or re-resolve for yours with" \
	    "'make lock HOST_PYTHON=python$$have'" >&2; exit 1; }
	$(PIP) install -q --require-hashes -r $(HOST_LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@$(PIP) check >/dev/null || { $(PIP) check >&2; \
	  echo "make: $(HOST_LOCK) does not satisfy pyproject.toml: run 'make lock'" >&2; exit 1; }
	@touch $@

# tf2cntk setup is idempotent: it installs libopenmpi3 (apt, as root) and the CNTK venv only when
# missing, then proves CNTK works by evaluating a small function.
cntk: host
	@$(VENV)/bin/tf2cntk setup --env-dir .venv-cntk

# pytest's "no tests collected" (exit 5) is a failure.
run_pytest = $(PY) -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make $@: pytest collected no tests; that is a failure" >&2; exit 1; fi; \
	exit $$rc

test: setup
	@$(call run_pytest,)

test-fast: setup
	@$(call run_pytest,-m "not slow")

# Needs no .venv (a broken lock can always be recreated); see the top of this file.
lock:
	$(HOST_PYTHON) locks/refresh.py $(if $(PYTHON36),--python36 $(PYTHON36))

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

# The sdist and a wheel built from it (so the wheel holds only what the sdist ships), with the
# locked setuptools of the host venv: no build isolation, no download. DIST=dir to put them
# elsewhere. Install with `pip install $(DIST)/pytest_tf2cntk-*.whl`, then `tf2cntk setup`.
DIST ?= dist
dist: host
	@rm -rf $(DIST)/pytest_tf2cntk-* pytest_tf2cntk.egg-info
	@mkdir -p $(DIST)
	$(PY) -c 'import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])' $(DIST) >/dev/null
	$(PIP) wheel -q --no-deps --no-build-isolation -w $(DIST) $(DIST)/pytest_tf2cntk-*.tar.gz
	@rm -rf pytest_tf2cntk.egg-info
	@ls -1 $(DIST)/pytest_tf2cntk-*

fixtures: host
	$(PY) fixtures/build.py

clean:
	rm -rf $(VENV) .venv-cntk .tf2cntk .pytest_cache .hypothesis dist build pytest_tf2cntk.egg-info
