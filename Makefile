# LetheDB developer commands. `make run` and `make test` set everything up
# themselves on a machine with python3 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ./lethedb-data
STAMP := $(VENV)/.installed

.PHONY: run test check lint typecheck pytest proto bench-micro bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Start a server on 127.0.0.1:50051 with its data in $(DATA).
run: $(STAMP)
	$(BIN)/lethedb serve --data $(DATA)

## Lint, type-check and run the whole test suite.
test: $(STAMP) check pytest

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check client server tests benchmarks examples
	$(BIN)/ruff format --check client server tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy examples

pytest: $(STAMP)
	$(BIN)/python -m pytest

## Regenerate the committed protobuf and gRPC modules from proto/.
proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench-micro: $(STAMP)
	$(BIN)/python -m pytest benchmarks/micro --benchmark-only -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m benchmarks.e2e

clean:
	rm -rf $(VENV) build *.egg-info
