"""Fixtures of the micro benchmarks: a real store in a temporary directory."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import workload
from lethedb_server.engine.store import Store, StoreOptions


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """A narrower table in microseconds; the command line still wins."""
    if config.getoption("benchmark_time_unit", None) in ("auto", None):
        config.option.benchmark_time_unit = "us"
    if not config.getoption("benchmark_columns", None):
        config.option.benchmark_columns = ["min", "median", "mean", "stddev", "rounds"]


@pytest.fixture(scope="session")
def subjects() -> list[str]:
    return workload.subject_pool()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(7)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh data directory: real LMDB, real fsync, the real writer thread."""
    with Store.open(tmp_path / "data", StoreOptions()) as opened:
        yield opened
