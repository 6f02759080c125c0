# seedream-batch: `make demo` runs a batch against the local sandbox; `make test` runs the tests.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install test lint demo bench chaos clean redis chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (found %s)" % sys.version.split()[0])'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

redis:
	@scripts/ensure-redis.sh

chromium:
	@scripts/ensure-chromium.sh

test: install redis chromium
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: install redis
	$(BIN)/python scripts/demo.py

chaos: install redis
	rm -f bench/results/chaos.jsonl
	SEEDREAM_CHAOS_RESULTS=bench/results/chaos.jsonl $(BIN)/python -m pytest tests/chaos -v
	$(BIN)/python scripts/chaos_table.py

bench: install redis
	@set -e; for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-output bench/results/*.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
