# The two commands a new user needs: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck up bench clean test-tools

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crisiswatch demo

up: $(STAMP)
	$(BIN)/crisiswatch up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Debian packages some tests use (chromium, promtool): installed where possible, else those tests skip with the reason (-rs).
test-tools:
	@.ci/test-tools

test: $(STAMP) lint test-tools
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m bench.geofence

clean:
	rm -rf $(VENV) .crisiswatch .crisiswatch-demo .mypy_cache .ruff_cache .pytest_cache
