"""The writer's in-flight limits (appends, events, bytes) and its observer hook, in process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import grpc
import grpc.aio
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.engine.model import (
    AppendCommand,
    Command,
    ExpectedState,
    ForgetCommand,
    ProposedEvent,
    ShredCommand,
)
from lethedb_server.engine.store import StoreOptions
from lethedb_server.engine.writer import WriterLimits
from lethedb_server.errors import LetheError, Overloaded, WrongExpectedVersion
from lethedb_server.ops.config import Config
from lethedb_server.ops.server import build_server
from lethedb_server.storage.codec import AppendResult


def append(stream: str, data: bytes = b"x") -> AppendCommand:
    return AppendCommand(stream, (ProposedEvent(b"", "T", "", "", data, b""),))


@pytest.fixture
def blocked(open_store):
    """A store whose writer is held inside a maintenance command until released."""
    limits = WriterLimits(max_inflight_appends=3)
    store = open_store(StoreOptions(writer=limits), observer=Recorder())
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
    recorder = store.writer.observer
    assert isinstance(recorder, Recorder)
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


def many(stream: str, events: int, data: bytes = b"") -> AppendCommand:
    return AppendCommand(stream, (ProposedEvent(b"", "T", "", "", data, b""),) * events)


@pytest.fixture
def held(open_store):
    """Like ``blocked``, with budgets of 1,000 events and 1 MiB in flight."""
    limits = WriterLimits(max_inflight_events=1000, max_inflight_bytes=1 << 20)
    store = open_store(StoreOptions(writer=limits))
    entered, release = threading.Event(), threading.Event()
    store.writer.maintenance[ShredCommand] = lambda: (entered.set(), release.wait(10))
    store.writer.submit(ShredCommand())
    assert entered.wait(10)
    yield store, release
    release.set()


def test_events_beyond_the_in_flight_budget_are_refused_at_once(held):
    store, release = held
    first = store.writer.submit(many("e-1", 600))
    refused = store.writer.submit(many("e-2", 600))
    limit = r"600 events in flight \(the limit is 1000, max_inflight_events\)"
    with pytest.raises(Overloaded, match=limit):
        refused.result(0)
    with pytest.raises(Overloaded, match="max_inflight_events"):
        store.writer.check_room(401, 0)
    store.writer.check_room(400, 0)  # fits; nothing reserved
    fits = store.writer.submit(many("e-3", 400))
    release.set()
    assert first.result(10).last_version == 599
    assert fits.result(10).last_version == 399
    assert store.log.last_version("e-2") is None
    # Answered appends give their events back.
    assert store.writer.append(many("e-4", 1000), timeout=10).last_version == 999


def test_bytes_beyond_the_in_flight_budget_are_refused_and_count_every_field(held):
    store, release = held
    # No data at all: the names and the per-event overhead are what count.
    names = AppendCommand(
        "b-1", (ProposedEvent(b"", "T" * 256, "s" * 128, "c" * 128, b"", b""),) * 900
    )
    assert names.size() > 1 << 19
    first = store.writer.submit(names)
    refused = store.writer.submit(many("b-2", 10, b"x" * (1 << 19)))
    limit = r"\(the limit is 1 MiB, max_inflight_bytes\) and this call would add 5.0 MiB more"
    with pytest.raises(Overloaded, match=limit):
        refused.result(0)
    release.set()
    first.result(10)


def test_a_lone_command_over_a_budget_is_admitted(held):
    """With nothing in flight only the per-request limits bound a command."""
    store, release = held
    release.set()
    assert store.writer.append(many("lone", 1500), timeout=10).last_version == 1499


def test_callers_that_gave_up_return_their_budget(held):
    store, release = held
    abandoned = store.writer.submit(many("gone", 1000))
    assert abandoned.cancel()
    # Until the writer reaches the abandoned append, its events still hold the budget.
    with pytest.raises(Overloaded):
        store.writer.submit(many("early", 1)).result(0)
    release.set()
    # A forget is never refused, and is queued after it: once answered, the writer passed it.
    store.writer.execute(ForgetCommand("subject-1", "test", "admin"), timeout=10)
    assert store.writer.append(many("full", 1000), timeout=10).last_version == 999
    with store.writer._inflight_lock:
        assert (store.writer._inflight, store.writer._inflight_events) == (0, 0)


def test_an_append_batch_that_does_not_fit_in_flight_is_refused_whole(held):
    """Through a real gRPC server in this process: RESOURCE_EXHAUSTED before any conversion."""
    store, release = held
    occupying = store.writer.submit(many("occupying", 600))  # 600 of the 1,000 events
    event = pb.ProposedEvent(event_type="T")
    batch = pb.AppendBatchRequest(
        appends=[pb.AppendRequest(stream_id=f"batch-{i}", events=[event] * 100) for i in range(5)]
    )

    async def main() -> tuple[grpc.StatusCode, str]:
        server, _, _ = build_server(Config(), store)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(
                    "/lethedb.v1.EventStore/AppendBatch",
                    request_serializer=pb.AppendBatchRequest.SerializeToString,
                    response_deserializer=pb.AppendBatchResponse.FromString,
                )
                try:
                    await call(batch, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, ""
        finally:
            await server.stop(0)

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "600 events in flight (the limit is 1000, max_inflight_events)" in details
    assert "this call would add 500 more" in details
    release.set()
    occupying.result(10)
    for i in range(5):  # none of the batch was queued
        assert store.log.last_version(f"batch-{i}") is None
