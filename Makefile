# The README's two commands: `make demo` (main job) and `make test` (the test suite).
# Both create .venv and install the project on first use. On CPU machines torch is pinned to the
# local CPU wheel (constraints-cpu.txt): an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[triton,dev,eval,serve]"
	touch $(STAMP)

demo: install
	$(PY) pipelines/demo.py --out-dir runs/demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) pipelines/bench/bench_meta_step.py
	$(PY) pipelines/bench/bench_attention.py

clean:
	rm -rf runs .pytest_cache
