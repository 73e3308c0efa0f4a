# bdrun developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch lies on this project's machines; GPU users can pass their own spec,
# e.g. `make install TORCH_SPEC="torch==2.13.0"` from their CUDA index.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Test processes (pytest-xdist), one torch thread each; each worker starts on a contiguous half
# of the tests (a module's trained fixtures built once or twice) and steals from the other's
# queue when done. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal
STAMP := $(VENV)/.bdrun-installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow test-slow-ci test-all lint format bench clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv with the CPU torch and bdrun (editable, with dev tools)

run: $(STAMP) ## Set up, then run the embedded default (digits, small CNN, BadNets; offline, seconds)
	$(BIN)/bdrun

test: $(STAMP) ## Set up, then run the fast test suite (a few minutes on 2 CPU cores)
	$(PYTEST) -m "not slow" -q $(PYTEST_ARGS)

test-slow: $(STAMP) ## Real-data fidelity runs, sweeps, DDP, Slurm (marked slow)
	$(PYTEST) -m slow -q $(PYTEST_ARGS)

test-slow-ci: $(STAMP) ## The slow tests that need no downloaded data: smoke grid, sweeps, DDP, CSAW, showcase
	$(PYTEST) -m "slow and not fashion_mnist" -q $(PYTEST_ARGS)

test-all: $(STAMP) ## Every test
	$(PYTEST) -q $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

bench: $(STAMP) ## Speed benchmarks (print their figures)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/default_run.py
	$(BIN)/python benchmarks/process_phases.py

clean: ## Remove the virtual environment, build files and run outputs
	rm -rf $(VENV) build dist src/*.egg-info multirun .pytest_cache .ruff_cache
	find outputs -mindepth 1 -not -name README.md -delete 2>/dev/null || true
