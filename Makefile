# `make run` and `make test` each do their own set-up: a .venv is created when missing and the
# package (re)installed when pyproject.toml changes. Override PYTHON or TORCH as needed, e.g.
# `make run TORCH=torch` for the newest build with CUDA.
PYTHON ?= python3
# Test processes (pytest-xdist); most tests run the CLI in a subprocess on one core.
TEST_WORKERS ?= 2
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.metarun-installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/metarun $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
