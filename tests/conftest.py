"""Fixtures shared by every test suite: an open store in a temporary directory.

Server-process fixtures (a real server on a free port) belong in
``tests/integration/conftest.py``, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.engine.writer import WriterObserver

StoreFactory = Callable[..., Store]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Where the test's store keeps its files (created by ``Store.open``)."""
    return tmp_path / "data"


@pytest.fixture
def open_store(data_dir: Path) -> Iterator[StoreFactory]:
    """Open stores on *data_dir* (or another directory); close any left open at teardown.

    ``open_store(options=None, path=None, observer=None)`` returns an open
    :class:`Store` (*observer*: its writer's observer). A test
    may close a store itself (to reopen it or to inspect its files): ``close`` is
    idempotent, so the teardown closing it again is harmless.
    """
    opened: list[Store] = []

    def factory(
        options: StoreOptions | None = None,
        path: Path | None = None,
        observer: WriterObserver | None = None,
    ) -> Store:
        store = Store.open(path or data_dir, options, observer=observer)
        opened.append(store)
        return store

    yield factory
    for store in reversed(opened):
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> Store:
    """An open store with default options in the test's temporary directory."""
    return open_store()


@pytest.fixture
def stores(open_store: StoreFactory, tmp_path: Path) -> StoreFactory:
    """Open several stores by name (``stores(name, options=None)``), each in its own
    directory under *tmp_path*: a leader and its followers, say. Closed at teardown."""

    def by_name(name: str, options: StoreOptions | None = None) -> Store:
        return open_store(options, path=tmp_path / name)

    return by_name
