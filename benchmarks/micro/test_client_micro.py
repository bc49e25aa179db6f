"""Micro benchmarks of the SDK's hot paths, below gRPC.

Building an append request (checking and encoding the events, drawing event
ids and the idempotency key), converting a read batch, and one coalescing
cycle (queue many appends, take them as one batch, build its request). For
comparing a change against its parent on the same machine.
"""

from __future__ import annotations

import uuid

from lethedb import Event
from lethedb._coalescing import AppendCoalescer, QueuedAppend
from lethedb._requests import build_append_request, to_recorded_event
from lethedb.v1 import eventstore_pb2 as pb

SUBJECT = "3f0b6c1e-9d3a-4c55-8a31-0d6e2f7b9a10"
EVENTS = [
    Event("OrderPlaced", {"order": i, "total": 42.5, "items": ["a", "b"]}, subject_id=SUBJECT)
    for i in range(100)
]


class _Waiter:
    def done(self) -> bool:
        return False


def test_build_100_event_append_request(benchmark):
    request = benchmark(build_append_request, "order-42", EVENTS, 7, None)
    assert len(request.events) == 100


def test_build_1_event_append_request(benchmark):
    request = benchmark(build_append_request, "order-42", EVENTS[:1], 7, None)
    assert len(request.events) == 1


def test_convert_read_batch_of_512_events(benchmark):
    message = pb.RecordedEvent(
        position=1,
        stream_id="order-42",
        stream_version=1,
        event_id=uuid.UUID(int=1).bytes,
        event_type="OrderPlaced",
        data=b'{"total": 42}',
    )
    batch = [message] * 512
    events = benchmark(lambda: [to_recorded_event(event) for event in batch])
    assert len(events) == 512


def test_coalesce_100_queued_appends_into_one_batch(benchmark):
    requests = [build_append_request(f"s-{i}", EVENTS[:1], 0, None) for i in range(100)]

    def cycle() -> pb.AppendBatchRequest:
        coalescer: AppendCoalescer[_Waiter] = AppendCoalescer(calls_in_flight=1)
        assert coalescer.send_or_queue(lambda: QueuedAppend(requests[0], 0.0, _Waiter())) is None
        for request in requests:
            coalescer.send_or_queue(lambda r=request: QueuedAppend(r, 0.0, _Waiter()))
        (batch,) = coalescer.call_done()
        return coalescer.batch_request(batch)

    assert len(benchmark(cycle).appends) == 100
