"""Appending and reading through the SDK against a real server process."""

from __future__ import annotations

import threading
import uuid

import pytest

import lethedb
from lethedb import ANY, NO_STREAM, STREAM_EXISTS, Event
from tests.integration.serverproc import ServerProcess


def _events(n: int, subject: str = "") -> list[Event]:
    return [Event("Counted", {"n": i}, subject_id=subject) for i in range(n)]


def test_append_then_read_stream_returns_the_events_decrypted(client, stream_id):
    result = client.append(
        stream_id, [Event("UserRegistered", {"email": "a@b.c"}, subject_id="7f3a")]
    )

    [event] = list(client.read_stream(stream_id))
    assert event.json() == {"email": "a@b.c"}
    assert event.content_type == "application/json"
    assert event.subject_id == "7f3a"
    assert event.position == result.first_position
    assert event.stream_version == 0
    assert not event.redacted


def test_raw_bytes_travel_unchanged(client, stream_id):
    payload = bytes(range(256))
    client.append(stream_id, [Event("Blob", payload, metadata=b"\x00meta")])

    [event] = list(client.read_stream(stream_id))
    assert event.data == payload
    assert event.metadata == b"\x00meta"
    assert event.content_type == "application/octet-stream"


def test_a_multi_event_append_is_contiguous_in_the_log_and_the_stream(client, stream_id):
    result = client.append(stream_id, _events(5))

    assert result.last_position - result.first_position == 4
    assert (result.first_version, result.last_version) == (0, 4)
    events = list(client.read_all(from_position=result.first_position, max_count=5))
    assert [e.stream_id for e in events] == [stream_id] * 5
    assert [e.stream_version for e in events] == [0, 1, 2, 3, 4]


class TestExpectedVersion:
    def test_no_stream_accepts_a_new_stream_and_refuses_an_existing_one(self, client, stream_id):
        client.append(stream_id, _events(1), expected_version=NO_STREAM)
        with pytest.raises(lethedb.WrongExpectedVersion) as info:
            client.append(stream_id, _events(1), expected_version=NO_STREAM)
        assert info.value.actual_version == 0

    def test_stream_exists_refuses_a_missing_stream(self, client, stream_id):
        with pytest.raises(lethedb.WrongExpectedVersion) as info:
            client.append(stream_id, _events(1), expected_version=STREAM_EXISTS)
        assert info.value.actual_version is None
        client.append(stream_id, _events(1))
        client.append(stream_id, _events(1), expected_version=STREAM_EXISTS)

    def test_exact_version_must_match_the_last_version(self, client, stream_id):
        client.append(stream_id, _events(3))
        with pytest.raises(lethedb.WrongExpectedVersion) as info:
            client.append(stream_id, _events(1), expected_version=1)
        assert info.value.actual_version == 2
        assert "version 2" in str(info.value)
        result = client.append(stream_id, _events(1), expected_version=2)
        assert result.first_version == 3

    def test_any_appends_whatever_the_state(self, client, stream_id):
        client.append(stream_id, _events(1), expected_version=ANY)
        client.append(stream_id, _events(1), expected_version=ANY)
        assert len(list(client.read_stream(stream_id))) == 2

    def test_a_refused_append_writes_nothing(self, client, stream_id):
        client.append(stream_id, _events(2))
        head = _head(client)
        with pytest.raises(lethedb.WrongExpectedVersion):
            client.append(stream_id, _events(3), expected_version=0)
        assert _head(client) == head
        assert len(list(client.read_stream(stream_id))) == 2


class TestIdempotency:
    def test_retry_with_same_key_returns_the_same_positions_and_writes_nothing(
        self, client, stream_id
    ):
        events = _events(2, subject="s-1")
        first = client.append(stream_id, events, idempotency_key="order-42")
        head = _head(client)

        again = client.append(stream_id, events, idempotency_key="order-42")

        assert again.deduplicated
        assert not first.deduplicated
        assert (again.first_position, again.last_position) == (
            first.first_position,
            first.last_position,
        )
        assert _head(client) == head

    def test_same_key_with_a_different_request_is_refused(self, client, stream_id):
        client.append(stream_id, _events(1), idempotency_key=f"k-{stream_id}")
        with pytest.raises(lethedb.IdempotencyConflict):
            client.append(stream_id, _events(2), idempotency_key=f"k-{stream_id}")


def test_fifty_concurrent_appenders_with_exact_versions_leave_no_gap_or_duplicate(
    server, stream_id
):
    """Optimistic concurrency: every writer retries until its append lands once."""
    written: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        with lethedb.Client(server.address) as db:
            while True:
                current = _last_version(db, stream_id)
                expected = NO_STREAM if current is None else current
                try:
                    r = db.append(
                        stream_id, [Event("Tick", {"writer": n})], expected_version=expected
                    )
                except lethedb.WrongExpectedVersion:
                    continue
                with lock:
                    written.append(r.first_version)
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    events = list(lethedb.Client(server.address).read_stream(stream_id))
    assert sorted(written) == list(range(50))
    assert [e.stream_version for e in events] == list(range(50))
    assert sorted(e.json()["writer"] for e in events) == list(range(50))


class TestReads:
    def test_read_stream_backwards_from_a_version_with_a_limit(self, client, stream_id):
        client.append(stream_id, _events(10))
        versions = [
            e.stream_version
            for e in client.read_stream(stream_id, from_version=6, backwards=True, max_count=3)
        ]
        assert versions == [6, 5, 4]

    def test_read_stream_backwards_from_the_end(self, client, stream_id):
        client.append(stream_id, _events(4))
        assert [e.stream_version for e in client.read_stream(stream_id, backwards=True)] == [
            3,
            2,
            1,
            0,
        ]

    def test_read_all_after_a_position_is_exclusive(self, client, stream_id):
        r = client.append(stream_id, _events(3))
        positions = [e.position for e in client.read_all(after=r.first_position, max_count=2)]
        assert positions == [r.first_position + 1, r.first_position + 2]

    def test_read_all_backwards_from_a_position(self, client, stream_id):
        r = client.append(stream_id, _events(3))
        positions = [
            e.position
            for e in client.read_all(from_position=r.last_position, backwards=True, max_count=3)
        ]
        assert positions == [r.last_position, r.last_position - 1, r.last_position - 2]

    def test_reading_a_missing_stream_is_not_found(self, client):
        with pytest.raises(lethedb.StreamNotFound):
            list(client.read_stream(f"missing-{uuid.uuid4().hex}"))

    def test_a_read_longer_than_one_page_is_complete_and_ordered(self, client, stream_id):
        for _ in range(3):
            client.append(stream_id, _events(500))
        assert [e.stream_version for e in client.read_stream(stream_id)] == list(range(1500))


def test_pipelined_appends_are_acknowledged_in_order_each_on_its_own(client, stream_id):
    items = [
        lethedb.Append(stream_id, _events(1), expected_version=NO_STREAM if i == 0 else i - 1)
        for i in range(20)
    ]
    items.append(lethedb.Append(stream_id, _events(1), expected_version=0))  # stale on purpose

    results = client.append_many(items)

    assert [r.first_version for r in results[:20]] == list(range(20))
    assert isinstance(results[20], lethedb.WrongExpectedVersion)
    assert results[20].actual_version == 19


def test_everything_survives_a_restart(fresh_server: ServerProcess, stream_id):
    with lethedb.Client(fresh_server.address) as db:
        db.append(stream_id, _events(3, subject="s-9"), idempotency_key="restart-1")
        before = [(e.position, e.data) for e in db.read_all()]

    fresh_server.restart()

    with lethedb.Client(fresh_server.address) as db:
        assert [(e.position, e.data) for e in db.read_all()] == before
        again = db.append(stream_id, _events(3, subject="s-9"), idempotency_key="restart-1")
        assert again.deduplicated
        nxt = db.append(stream_id, _events(1), expected_version=2)
        assert nxt.first_position == before[-1][0] + 1


def test_async_client_appends_and_reads(server, stream_id):
    import asyncio

    async def scenario() -> list[int]:
        async with lethedb.AsyncClient(server.address) as db:
            await db.append(stream_id, _events(3), expected_version=NO_STREAM)
            with pytest.raises(lethedb.WrongExpectedVersion):
                await db.append(stream_id, _events(1), expected_version=NO_STREAM)
            return [e.json()["n"] async for e in db.read_stream(stream_id)]

    assert asyncio.run(scenario()) == [0, 1, 2]


def _head(db: lethedb.Client) -> int:
    last = list(db.read_all(backwards=True, max_count=1))
    return last[0].position if last else 0


def _last_version(db: lethedb.Client, stream_id: str) -> int | None:
    try:
        last = list(db.read_stream(stream_id, backwards=True, max_count=1))
    except lethedb.StreamNotFound:
        return None
    return last[0].stream_version
