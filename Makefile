# The commands behind README.md. Everything installs into .venv and caches
# binaries under ~/.cache/kurrier, so a clean clone needs nothing else.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STUBS := services/kurrier/v1

.PHONY: install test lint typecheck unit proto proto-check up bench clean

$(BIN)/kurrier: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/kurrier

proto: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=services \
		--grpc_python_out=services --mypy_out=services --mypy_grpc_out=services proto/kurrier/v1/*.proto

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy services operator tests

# The full suite: lint, types, stub freshness, then every test.
test: install lint typecheck
	$(BIN)/pytest

up: install
	scripts/demo.sh

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
