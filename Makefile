# Two commands on a fresh machine:
#   make run    run the main job (backtest of the example agent on the bundled real data)
#   make test   lint, type-check and run the whole test suite
# Both create the virtual environment and install what they need when missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest side-venvs bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: its CPU wheel; unpinned a resolver pulls CUDA wheels
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) runner.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

# bqemulator (BigQuery emulator) and checkov run from their own venvs: in the project's venv
# they would downgrade packages the project pins.
side-venvs:
	PYTHON=$(PYTHON) bash tests/bqemu/setup.sh
	PYTHON=$(PYTHON) bash tests/checkov/setup.sh

pytest: $(STAMP) side-venvs
	$(PY) -m pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_fmel.py

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .ruff_cache fmel.duckdb .fmel_spill
