"""Counting events on the wire, before protobuf parses a request."""

from __future__ import annotations

import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.wire import count_events

EVENT = pb.ProposedEvent(event_type="T", data=b"{}")


def _batch(appends: int, events: int) -> bytes:
    append = pb.AppendRequest(stream_id="s", events=[EVENT] * events, idempotency_key="k")
    return pb.AppendBatchRequest(appends=[append] * appends).SerializeToString()


@pytest.mark.parametrize("events", [0, 1, 7, 500])
def test_the_events_of_an_append_are_counted_exactly(events):
    raw = pb.AppendRequest(stream_id="s", events=[EVENT] * events).SerializeToString()
    counted = count_events(raw, nested=False, stop_after=1000, max_fields=10_000)
    assert (counted.events, counted.stopped) == (events, False)


def test_the_events_of_every_append_of_a_batch_and_of_a_commit_are_counted():
    counted = count_events(_batch(12, 30), nested=True, stop_after=1000, max_fields=10_000)
    assert (counted.events, counted.stopped) == (360, False)
    part = pb.StreamAppend(stream_id="s", events=[EVENT] * 4)
    commit = pb.CommitRequest(appends=[part] * 3, idempotency_key="k").SerializeToString()
    assert count_events(commit, nested=True, stop_after=1000, max_fields=10_000).events == 12


def test_the_walk_stops_just_past_the_limit():
    counted = count_events(_batch(3, 6500), nested=True, stop_after=10_000, max_fields=10**6)
    assert (counted.events, counted.stopped) == (10_001, True)


def test_the_walk_stops_after_too_many_fields_of_any_kind():
    # 100,000 repetitions of the stream id: legal protobuf, no events at all.
    raw = b"\x0a\x01s" * 100_000
    counted = count_events(raw, nested=False, stop_after=10_000, max_fields=5_000)
    assert (counted.events, counted.stopped) == (0, True)


@pytest.mark.parametrize("raw", [b"\x12", b"\x12\xff", b"\x0f", b"\xff" * 12, b"\x13\x14"])
def test_malformed_bytes_end_the_walk_without_an_error(raw):
    counted = count_events(raw, nested=True, stop_after=10, max_fields=100)
    assert counted.stopped is False
