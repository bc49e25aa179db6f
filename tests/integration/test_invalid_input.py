"""Bad input gets INVALID_ARGUMENT naming the field, and changes nothing.

These tests talk to the server with the raw generated stub, so that no
client-side check can hide a missing server-side one.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc

MiB = 1 << 20


@pytest.fixture(scope="module")
def stub(server) -> Iterator[eventstore_pb2_grpc.EventStoreStub]:
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 64 * MiB)]
    ) as channel:
        yield eventstore_pb2_grpc.EventStoreStub(channel)


def _event(**fields) -> pb.ProposedEvent:
    base = {"event_type": "Valid", "data": b"{}"}
    return pb.ProposedEvent(**{**base, **fields})


def _request(**fields) -> pb.AppendRequest:
    base = {"stream_id": "valid-stream", "events": [_event()]}
    return pb.AppendRequest(**{**base, **fields})


BAD_REQUESTS = {
    "empty stream id": (_request(stream_id=""), "stream_id is empty"),
    "stream id too long": (
        _request(stream_id="s" * 257),
        "stream_id is 257 bytes; the limit is 256",
    ),
    "reserved stream id": (_request(stream_id="$erasures"), "reserved"),
    "control character": (_request(stream_id="a\nb"), "control character U+000A"),
    "bidirectional override in a stream id": (
        _request(stream_id="invoice-\u202efdp.exe"),
        "stream_id contains U+202E (RIGHT-TO-LEFT OVERRIDE), an invisible format character",
    ),
    "zero-width space in an event type": (
        _request(events=[_event(event_type="Order\u200bPlaced")]),
        "events[0].event_type contains U+200B (ZERO WIDTH SPACE)",
    ),
    "private-use character in a subject id": (
        _request(events=[_event(subject_id="user-\ue000")]),
        "events[0].subject_id contains U+E000, a private-use character",
    ),
    "no events": (_request(events=[]), "events is empty"),
    "empty event type": (_request(events=[_event(event_type="")]), "events[0].event_type is empty"),
    "reserved event type": (
        _request(events=[_event(), _event(event_type="$subject.forgotten")]),
        "events[1].event_type",
    ),
    "subject with control char": (
        _request(events=[_event(subject_id="a\x00b")]),
        "events[0].subject_id contains the control character U+0000",
    ),
    "reserved subject": (_request(events=[_event(subject_id="$store")]), "events[0].subject_id"),
    "event id not a uuid": (
        _request(events=[_event(event_id=b"123")]),
        "events[0].event_id is 3 bytes",
    ),
    "data over the limit": (
        _request(events=[_event(data=b"x" * (2 * MiB + 100 * 1024))]),
        "events[0].data is 2.1 MiB; the limit is 1 MiB per event",
    ),
    "too many events": (
        _request(events=[_event()] * 10_001),
        "the request has more than 10000 events in 127.0 KiB; the limit is 10000 events per call",
    ),
    "undefined expected state": (_request(expected_state=7), "expected_state is 7"),
    "idempotency key with control char": (
        _request(idempotency_key="k\x01"),
        "idempotency_key contains the control character",
    ),
}


@pytest.mark.parametrize(("request_", "message"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_append_is_invalid_argument_and_changes_nothing(stub, request_, message):
    head = _head(stub)

    with pytest.raises(grpc.RpcError) as info:
        stub.Append(request_, timeout=10)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert _head(stub) == head


def test_invalid_utf8_is_invalid_argument_not_internal(server, stub):
    head = _head(stub)
    with grpc.insecure_channel(server.address) as channel:
        raw_append = channel.unary_unary("/lethedb.v1.EventStore/Append")
        # Field 1 (stream_id), length 2, bytes that are not UTF-8.
        with pytest.raises(grpc.RpcError) as info:
            raw_append(b"\x0a\x02\xff\xfe", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()
    assert _head(stub) == head


def test_a_bad_read_request_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ReadStream(pb.ReadStreamRequest(stream_id=""), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_append_in_a_pipeline_fails_alone(stub):
    requests = [
        _request(stream_id="pipeline-ok"),
        _request(stream_id=""),
        _request(stream_id="pipeline-ok"),
    ]
    answers = list(stub.AppendStream(iter(requests), timeout=10))
    assert [a.WhichOneof("result") for a in answers] == ["ok", "error", "ok"]
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "stream_id is empty" in answers[1].error.message


def _head(stub: eventstore_pb2_grpc.EventStoreStub) -> int:
    for response in stub.ReadAll(pb.ReadAllRequest(backwards=True, max_count=1), timeout=10):
        for event in response.events:
            return event.position
    return 0
