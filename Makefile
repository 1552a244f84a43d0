# The commands behind README.md. Everything installs into .venv and caches
# binaries under ~/.cache/kurrier, so a clean clone needs nothing else.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint typecheck testbin proto nats-permissions up bench clean

$(BIN)/kurrier: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/kurrier

proto: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=services \
		--grpc_python_out=services --mypy_out=services --mypy_grpc_out=services proto/kurrier/v1/*.proto

# The chart's copy of each component's NATS permissions (kurrier.core.nats_access).
nats-permissions: install
	$(BIN)/python -m kurrier.core.nats_access > charts/kurrier/files/nats-permissions.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy services operator tests bench

# kube-apiserver, etcd and helm for the operator and chart tests, built from
# the Go module proxy once and cached in ~/.cache/kurrier/bin.
testbin:
	scripts/testbin.sh >/dev/null

# The full suite: lint, types, then every test (stub freshness included).
test: install lint typecheck testbin
	$(BIN)/pytest

up: install
	scripts/demo.sh

bench: install
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
