"""AppendBatch and the SDK's coalescing of concurrent appends, against a real server.

The raw-RPC tests specify the server: each append of a batch is checked,
committed and answered on its own, in request order; a batch that is empty or
too long is refused whole and writes nothing. The SDK tests specify
coalescing: concurrent ``append()`` calls share calls, and each caller still
gets exactly its own result or its own exception.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import lethedb
from lethedb import NO_STREAM, Event
from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from lethedb_server.api.validation import MAX_APPENDS_PER_BATCH
from tests.integration.serverproc import ServerProcess


class CountingStub:
    """The client's generated stub, counting the append calls that go through it."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.calls: Counter[str] = Counter()
        self.batched_appends = 0
        self.Append = _Counted(self, "Append")
        self.AppendBatch = _Counted(self, "AppendBatch")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def count(self, name: str, request: Any) -> None:
        self.calls[name] += 1
        if name == "AppendBatch":
            self.batched_appends += len(request.appends)


class _Counted:
    """One method of the stub, called directly (both clients) or as a future (blocking)."""

    def __init__(self, stub: CountingStub, name: str) -> None:
        self._stub, self._name = stub, name
        self._method = getattr(stub._stub, name)

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        self._stub.count(self._name, request)
        return self._method(request, **kwargs)

    def future(self, request: Any, **kwargs: Any) -> Any:
        self._stub.count(self._name, request)
        return self._method.future(request, **kwargs)


@pytest.fixture
def raw(server: ServerProcess) -> Iterator[eventstore_pb2_grpc.EventStoreStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield eventstore_pb2_grpc.EventStoreStub(channel)


def _append(stream_id: str, n: int = 1, **fields: Any) -> pb.AppendRequest:
    events = [pb.ProposedEvent(event_type="Counted", data=str(i).encode()) for i in range(n)]
    return pb.AppendRequest(stream_id=stream_id, events=events, **fields)


def _head(client: lethedb.Client) -> int:
    return next((e.position for e in client.read_all(backwards=True, max_count=1)), 0)


def _stream(prefix: str = "batch") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- the RPC --------------------------------------------------------------------------


def test_each_append_of_a_batch_gets_its_own_result_in_request_order(raw, client):
    a, b = _stream(), _stream()
    response = raw.AppendBatch(
        pb.AppendBatchRequest(appends=[_append(a, 2), _append(b), _append(a)]), timeout=10
    )

    assert [r.WhichOneof("result") for r in response.results] == ["ok", "ok", "ok"]
    first, second, third = (r.ok for r in response.results)
    assert (first.first_version, first.last_version) == (0, 1)
    assert (second.first_version, third.first_version) == (0, 2)
    assert first.last_position < second.first_position < third.first_position
    assert [e.data for e in client.read_stream(a)] == [b"0", b"1", b"0"]


def test_a_failing_append_fails_alone_and_the_others_commit(raw, client):
    taken, free, fresh = _stream(), _stream(), _stream()
    client.append(taken, Event("Counted", b"x"))
    response = raw.AppendBatch(
        pb.AppendBatchRequest(
            appends=[
                _append(free),
                _append(taken, expected_state=pb.EXPECTED_NO_STREAM),
                _append(fresh, 1, expected_state=pb.EXPECTED_NO_STREAM),
                pb.AppendRequest(stream_id=free, events=[pb.ProposedEvent(event_type="")]),
            ]
        ),
        timeout=10,
    )

    ok, wrong_version, ok_too, invalid = response.results
    assert ok.HasField("ok")
    assert ok_too.HasField("ok")
    assert wrong_version.error.code == grpc.StatusCode.ABORTED.value[0]
    assert wrong_version.error.error == "WrongExpectedVersion"
    assert wrong_version.error.actual_version == 0
    assert invalid.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "event_type" in invalid.error.message
    assert len(list(client.read_stream(free))) == 1
    assert len(list(client.read_stream(taken))) == 1


def test_the_same_idempotency_key_twice_in_one_batch_writes_once(raw, client):
    stream = _stream()
    once = _append(stream, idempotency_key="same-key")
    response = raw.AppendBatch(pb.AppendBatchRequest(appends=[once, once]), timeout=10)

    first, second = (r.ok for r in response.results)
    assert not first.deduplicated
    assert second.deduplicated
    assert first.first_position == second.first_position
    assert len(list(client.read_stream(stream))) == 1


@pytest.mark.parametrize("count", [0, MAX_APPENDS_PER_BATCH + 1])
def test_an_empty_or_too_long_batch_is_invalid_argument_and_writes_nothing(raw, client, count):
    before = _head(client)
    appends = [_append(_stream())] * count
    with pytest.raises(grpc.RpcError) as refused:
        raw.AppendBatch(pb.AppendBatchRequest(appends=appends), timeout=10)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "appends" in refused.value.details()
    if count:
        assert f"limit is {MAX_APPENDS_PER_BATCH}" in refused.value.details()
    assert _head(client) == before


def test_a_full_batch_of_the_maximum_is_accepted(raw):
    stream = _stream()
    appends = [_append(stream) for _ in range(MAX_APPENDS_PER_BATCH)]
    response = raw.AppendBatch(pb.AppendBatchRequest(appends=appends), timeout=30)

    versions = [r.ok.first_version for r in response.results]
    assert versions == list(range(MAX_APPENDS_PER_BATCH))


# --- the SDK's coalescing ---------------------------------------------------------------


def _run(server: ServerProcess, work: Any, **settings: Any) -> tuple[Any, CountingStub]:
    async def main() -> tuple[Any, CountingStub]:
        async with lethedb.AsyncClient(server.address, **settings) as db:
            counting = CountingStub(db._transport.events)
            db._transport.events = counting
            return await work(db), counting

    return asyncio.run(main())


def test_concurrent_appends_share_calls_and_each_gets_its_own_position(server, client):
    streams = [_stream("many") for _ in range(8)]

    async def work(db: lethedb.AsyncClient) -> list[lethedb.AppendResult]:
        async def caller(i: int) -> list[lethedb.AppendResult]:
            return [
                await db.append(streams[i % 8], Event("Counted", {"caller": i, "n": n}))
                for n in range(5)
            ]

        per_caller = await asyncio.gather(*(caller(i) for i in range(64)))
        return [r for results in per_caller for r in results]

    results, stub = _run(server, work)

    assert stub.calls["Append"] + stub.calls["AppendBatch"] < len(results) / 4
    assert stub.batched_appends + stub.calls["Append"] == len(results) == 320
    positions = [r.first_position for r in results]
    assert len(set(positions)) == 320
    for caller in range(64):  # each caller's result is the position of its own event
        mine = positions[caller * 5 : caller * 5 + 5]
        got = [next(client.read_all(from_position=p, max_count=1)).json() for p in mine]
        assert got == [{"caller": caller, "n": n} for n in range(5)]
    for stream in streams:
        assert [e.stream_version for e in client.read_stream(stream)] == list(range(40))


def test_a_wrong_expected_version_fails_only_its_caller(server, client):
    taken = _stream()
    client.append(taken, Event("Counted", b"x"))
    others = [_stream() for _ in range(10)]

    async def work(db: lethedb.AsyncClient) -> list[Any]:
        calls = [db.append(s, Event("Counted", b"y"), expected_version=NO_STREAM) for s in others]
        calls.insert(5, db.append(taken, Event("Counted", b"z"), expected_version=NO_STREAM))
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes, stub = _run(server, work)

    refused = outcomes.pop(5)
    assert isinstance(refused, lethedb.WrongExpectedVersion)
    assert refused.actual_version == 0
    assert all(isinstance(o, lethedb.AppendResult) for o in outcomes), outcomes
    assert stub.calls["AppendBatch"] >= 1
    assert [len(list(client.read_stream(s))) for s in others] == [1] * 10
    assert len(list(client.read_stream(taken))) == 1


def test_an_invalid_event_fails_only_its_caller_with_the_servers_message(server, client):
    streams = [_stream() for _ in range(6)]
    too_big = b"x" * ((1 << 20) + 1)  # over the server's per-event limit, not checked by the SDK

    async def work(db: lethedb.AsyncClient) -> list[Any]:
        calls = [db.append(s, Event("Counted", b"ok")) for s in streams]
        calls.append(db.append(streams[0], Event("Counted", too_big)))
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes, stub = _run(server, work)

    invalid = outcomes.pop()
    assert isinstance(invalid, lethedb.ValidationError)
    assert "events[0].data" in str(invalid)
    assert "the limit is 1 MiB" in str(invalid)
    assert all(isinstance(o, lethedb.AppendResult) for o in outcomes), outcomes
    assert stub.calls["AppendBatch"] >= 1
    assert [len(list(client.read_stream(s))) for s in streams] == [1] * 6


def test_the_same_idempotency_key_from_concurrent_callers_writes_once(server, client):
    stream = _stream()

    async def work(db: lethedb.AsyncClient) -> list[lethedb.AppendResult]:
        return await asyncio.gather(
            *(db.append(stream, Event("Counted", b"once"), idempotency_key="k-1") for _ in range(6))
        )

    results, stub = _run(server, work)

    assert stub.calls["AppendBatch"] >= 1
    assert len({r.first_position for r in results}) == 1
    assert sum(not r.deduplicated for r in results) == 1
    assert len(list(client.read_stream(stream))) == 1


def test_coalescing_off_sends_one_call_per_append(server):
    stream = _stream()

    async def work(db: lethedb.AsyncClient) -> list[lethedb.AppendResult]:
        return await asyncio.gather(*(db.append(stream, Event("Counted", b"")) for _ in range(20)))

    results, stub = _run(server, work, coalesce_appends=False)

    assert len(results) == 20
    assert stub.calls == Counter({"Append": 20})


def test_a_cancelled_caller_does_not_disturb_the_others(server, client):
    stream = _stream()

    async def work(db: lethedb.AsyncClient) -> list[Any]:
        tasks = [asyncio.ensure_future(db.append(stream, Event("Counted", b""))) for _ in range(30)]
        await asyncio.sleep(0)
        tasks[7].cancel()
        tasks[20].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes, _ = _run(server, work)

    assert isinstance(outcomes[7], asyncio.CancelledError)
    assert isinstance(outcomes[20], asyncio.CancelledError)
    done = [o for o in outcomes if isinstance(o, lethedb.AppendResult)]
    assert len(done) == 28
    written = len(list(client.read_stream(stream)))
    assert 28 <= written <= 30  # a cancelled append may already have been sent


def test_the_blocking_client_coalesces_appends_from_many_threads(server, client):
    stream = _stream()
    results: list[lethedb.AppendResult] = []
    with lethedb.Client(server.address) as db:
        stub = CountingStub(db._transport.events)
        db._transport.events = stub

        def caller() -> None:
            for _ in range(20):
                results.append(db.append(stream, Event("Counted", b"")))

        threads = [threading.Thread(target=caller) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert len(results) == 320
    assert stub.calls["AppendBatch"] >= 1
    assert stub.calls["Append"] + stub.calls["AppendBatch"] < 320
    assert sorted(r.first_version for r in results) == list(range(320))
    assert len(list(client.read_stream(stream))) == 320
