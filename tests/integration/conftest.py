"""Integration fixtures: a real server process on a free port, real files, real fsync."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import lethedb
from tests.integration.serverproc import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server per test module; tests use their own stream ids."""
    proc = ServerProcess(tmp_path_factory.mktemp("server") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, for tests that restart or inspect the files."""
    proc = ServerProcess(tmp_path / "data").start()
    yield proc
    if proc.proc is not None:
        proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[lethedb.Client]:
    with lethedb.Client(server.address, timeout=10.0) as db:
        yield db


@pytest.fixture
def stream_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"
