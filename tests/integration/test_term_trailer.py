"""Every acknowledged write names, in its ``lethedb-term`` trailer, the term that acknowledged it.

A fault test's history records each acknowledgement with its term to check
that no term had two leaders acknowledging writes; this is where it reads it.
A lone server's log is in term 1.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from tests.integration.serverproc import ServerProcess


def _event() -> pb.ProposedEvent:
    return pb.ProposedEvent(event_id=uuid.uuid4().bytes, event_type="Noted", data=b"{}")


def _term(call: grpc.Call) -> str | None:
    return dict(call.trailing_metadata() or ()).get("lethedb-term")


def test_append_and_append_batch_name_the_term(server: ServerProcess, stream_id: str) -> None:
    with server.channel() as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        _, call = stub.Append.with_call(
            pb.AppendRequest(stream_id=stream_id, events=[_event()]), timeout=10
        )
        assert _term(call) == "1"
        batch = pb.AppendBatchRequest(
            appends=[pb.AppendRequest(stream_id=stream_id, events=[_event()]) for _ in range(3)]
        )
        _, call = stub.AppendBatch.with_call(batch, timeout=10)
        assert _term(call) == "1"


def test_a_refused_write_names_no_term(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Append.with_call(pb.AppendRequest(stream_id="", events=[_event()]), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert _term(refused.value) is None  # type: ignore[arg-type]
