# The two commands a newcomer runs on a fresh machine (README.md):
#   make demo   set up .venv, then train (cached) and decode the demo model
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
FULL := $(VENV)/.installed

.PHONY: demo test setup clean-cache

setup: $(FULL)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo needs only the library; the tests also need the extras (HF
# parity tests with CPU torch, notebook execution).
$(CORE): pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $(CORE)

$(FULL): pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf,notebook]'
	touch $(FULL) $(CORE)

demo: $(CORE)
	$(PY) -m blockdec.demo

# Tests that load torch run in a process of their own (tests/test_hf.py
# imports torch when collected, so the xdist run does not collect it at all):
# torch adds thousands of memory mappings to a process, and XLA's compiler
# aborted in workers that crossed vm.max_map_count (tests/conftest.py clears
# JAX's caches to stay far below it).
test: $(FULL)
	BLOCKDEC_TESTS_WITHOUT_TORCH=1 $(PY) -m pytest -n 2 -q -m "not torch" \
	  --ignore=tests/test_hf.py
	$(PY) -m pytest -q -m torch

clean-cache:
	rm -rf cache
