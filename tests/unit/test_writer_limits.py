"""The writer's in-flight limit and its observer hook, in process."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from lethedb_server.codec import AppendResult
from lethedb_server.errors import LetheError, Overloaded, WrongExpectedVersion
from lethedb_server.model import (
    AppendCommand,
    Command,
    ExpectedState,
    ForgetCommand,
    ProposedEvent,
    ShredCommand,
)
from lethedb_server.store import StoreOptions
from lethedb_server.writer import WriterLimits


def append(stream: str, data: bytes = b"x") -> AppendCommand:
    return AppendCommand(stream, (ProposedEvent(b"", "T", "", "", data, b""),))


@pytest.fixture
def blocked(open_store):
    """A store whose writer is held inside a maintenance command until released."""
    store = open_store(StoreOptions(writer=WriterLimits(max_inflight_appends=3)))
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(10)

    store.writer.maintenance[ShredCommand] = hold
    store.writer.submit(ShredCommand())
    assert entered.wait(10)
    yield store, release
    release.set()


def test_appends_beyond_the_limit_are_refused_at_once_and_write_nothing(blocked):
    store, release = blocked
    accepted = [store.writer.submit(append(f"s-{i}")) for i in range(3)]
    refused = store.writer.submit(append("s-over"))
    assert refused.done()
    with pytest.raises(Overloaded, match=r"3 appends in flight.*max_inflight_appends"):
        refused.result()
    # Operators get through an overload: forgets are never refused.
    forget = store.writer.submit(ForgetCommand("subject-1", "test", "admin"))
    assert not forget.done()
    release.set()
    for future in accepted:
        assert isinstance(future.result(10), AppendResult)
    forget.result(10)
    # Answered appends free their slots.
    assert store.writer.append(append("s-later"), timeout=10).first_version == 0
    assert store.log.last_version("s-over") is None


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[list[tuple[Command, object, float]], float]] = []
        self.refusals: list[tuple[Command, LetheError]] = []

    def batch_committed(
        self, outcomes: Sequence[tuple[Command, object, float]], commit_seconds: float
    ) -> None:
        self.batches.append((list(outcomes), commit_seconds))

    def refused(self, command: Command, error: LetheError) -> None:
        self.refusals.append((command, error))


def test_the_observer_sees_each_command_its_outcome_and_the_commit_time(blocked):
    store, release = blocked
    recorder = Recorder()
    store.writer.observer = recorder
    ok = store.writer.submit(append("obs"))
    conflict = store.writer.submit(
        AppendCommand("obs", append("obs").events, ExpectedState.NO_STREAM)
    )
    store.writer.submit(append("a"))
    store.writer.submit(append("b"))  # over the limit of 3
    release.set()
    ok.result(10)
    with pytest.raises(WrongExpectedVersion):
        conflict.result(10)
    outcomes = [o for batch, _ in recorder.batches for o in batch]
    assert [type(o[1]) for o in outcomes] == [AppendResult, WrongExpectedVersion, AppendResult]
    assert all(latency > 0 for _, _, latency in outcomes)
    assert all(seconds > 0 for _, seconds in recorder.batches)
    assert [type(e) for _, e in recorder.refusals] == [Overloaded]


def test_no_limit_when_zero(open_store):
    store = open_store(StoreOptions(writer=WriterLimits(max_inflight_appends=0)))
    futures = [store.writer.submit(append(f"u-{i}")) for i in range(50)]
    assert all(isinstance(f.result(10), AppendResult) for f in futures)
