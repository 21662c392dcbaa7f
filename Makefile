# The two commands: `make demo` and `make test`. Both set everything up first (idempotently).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test test-fast lint bench clean

setup:
	@bash scripts/setup.sh
	@if [ -f scripts/setup_argilla.sh ]; then bash scripts/setup_argilla.sh; fi

demo: setup
	@bash scripts/demo.sh

# lint-imports checks the import contracts in .importlinter (layers core <- stages <- CLI, no cycles),
# through scripts/lint_imports.py, which lays the package out as installed (the mapped stage folders).
test: setup
	$(VENV)/bin/ruff check .
	$(PY) scripts/lint_imports.py
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The unit tests only (no real models, servers or training runs: those are marked `slow`), for a
# quick check while developing; `make test` runs everything, as CI does.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) scripts/lint_imports.py

clean:
	rm -rf runs .pytest_cache test-artifacts
