"""Counting events on the wire, before protobuf parses a request."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.api.wire import count_events

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


@pytest.mark.parametrize("raw", [b"\x12", b"\x12\xff", b"\x0f", b"\xff" * 12, b"\x14"])
def test_malformed_bytes_are_reported_not_raised(raw):
    with pytest.raises(DecodeError):
        pb.AppendRequest.FromString(raw)
    counted = count_events(raw, nested=False, stop_after=10, max_fields=100)
    assert counted.malformed is True


def _field(key: bytes, payload: bytes) -> bytes:
    return key + bytes([len(payload)]) + payload


def test_events_behind_an_unknown_group_or_a_long_spelt_key_are_still_counted():
    event = pb.ProposedEvent(event_type="a").SerializeToString()
    group = b"\x9b\x06" + b"\x08\x01" + b"\x9c\x06"  # field 99 as a group holding a varint
    long_key = b"\x92\x00"  # field 2, length-delimited, in two bytes: parsers accept it
    raw = group + _field(long_key, event) * 30 + _field(b"\x12", event) * 30
    assert len(pb.AppendRequest.FromString(raw).events) == 60
    counted = count_events(raw, nested=False, stop_after=1000, max_fields=10_000)
    assert (counted.events, counted.stopped, counted.malformed) == (60, False, False)


def test_a_group_with_too_many_fields_stops_the_walk():
    raw = b"\x9b\x06" + b"\x08\x01" * 10_000 + b"\x9c\x06"
    counted = count_events(raw, nested=False, stop_after=10, max_fields=1_000)
    assert counted.stopped is True
