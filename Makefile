# LetheDB developer commands. `make run` and `make test` set everything up
# themselves on a machine with python3 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ./lethedb-data
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run cluster test check lint typecheck pytest proto sync-client bench-micro bench bench-peers bench-eventsourcing bench-replication bench-failover clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

## Start a server on 127.0.0.1:50051 with its data in $(DATA).
run: $(STAMP)
	$(BIN)/lethedb serve --data $(DATA)

## etcd and three nodes on loopback (ports 23790, 50061-50063; files in ./lethedb-cluster),
## to watch a failover: it prints the commands (docs/CLUSTERING.md).
cluster: $(STAMP)
	$(BIN)/python -m lethedb_server.ops.devcluster

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

# The blocking SDK modules are generated from their asyncio sources.
sync-client: $(STAMP)
	$(BIN)/python client/generate_sync.py

bench-micro: $(STAMP)
	$(BIN)/python -m pytest benchmarks/micro --benchmark-only -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m benchmarks.e2e
bench-subscribe: $(STAMP) ; $(BIN)/python -m benchmarks.subscribe $(if $(QUICK),--quick,)

## A leader and two followers on this machine: append rates against the single node,
## replication lag, catch-up and fan-out (benchmarks/replication.py; QUICK=1: a few minutes).
bench-replication: $(STAMP)
	$(BIN)/python -m benchmarks.replication $(if $(QUICK),--quick,)

## Failover time (leader SIGKILL to the first append acknowledged by the new leader)
## and the append rate through the failovers, on etcd + 3 nodes (benchmarks/failover.py;
## needs etcd: apt-get install etcd-server; QUICK=1: 5 rounds).
bench-failover: $(STAMP)
	$(BIN)/python -m benchmarks.failover $(if $(QUICK),--quick,)

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[server,dev,bench]'
	touch $(BENCH_STAMP)

## One eventsourcing application on LetheDB, PostgreSQL+AESCipher and SQLite
## (benchmarks/eventsourcing.py; QUICK=1 for a few hundred operations per case).
bench-eventsourcing: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.eventsourcing $(if $(QUICK),--quick,)

## LetheDB against Redis Streams, PostgreSQL and NATS JetStream (~25 min; as root it
## apt-get installs the missing servers). QUICK=1 for the few-minute version.
bench-peers: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.peers $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build *.egg-info
