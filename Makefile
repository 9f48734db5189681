# The two commands a newcomer runs on a fresh machine (README.md):
#   make demo   set up .venv, then train (cached) and decode the demo model
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf,notebook]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m blockdec.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

clean-cache:
	rm -rf cache
