"""Helpers shared by the fault tests: raw gRPC calls and offline checks of a data directory.

The fault tests talk to a real server process with the generated protobuf
messages and, where the exact bytes matter (a retry must resend the request
as it was), with raw bytes, so no SDK behaviour can hide a server defect.
Offline checks open the data directory in this process only while no server
runs on it (the directory lock would refuse them otherwise).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.engine.store import Store
from lethedb_server.engine.verify import Verifier

EVENT_STORE = "/lethedb.v1.EventStore/"
CALL_TIMEOUT = 10.0


def raw_unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A unary call that sends the given bytes as they are and returns raw bytes."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def raw_server_streaming(channel: grpc.Channel, method: str) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(method, request_serializer=None, response_deserializer=None)


def read_all(channel: grpc.Channel, after: int = 0) -> list[pb.RecordedEvent]:
    """Every event after position *after*, in log order, over ReadAll."""
    call = raw_server_streaming(channel, EVENT_STORE + "ReadAll")
    request = pb.ReadAllRequest(after_position=after) if after else pb.ReadAllRequest()
    events: list[pb.RecordedEvent] = []
    for raw in call(request.SerializeToString(), timeout=60):
        events.extend(pb.ReadResponse.FromString(raw).events)
    return events


def head(channel: grpc.Channel) -> tuple[int, bytes]:
    """(last position, event id of the last event): how the log looks from outside."""
    call = raw_server_streaming(channel, EVENT_STORE + "ReadAll")
    request = pb.ReadAllRequest(backwards=True, max_count=1)
    for raw in call(request.SerializeToString(), timeout=CALL_TIMEOUT):
        for event in pb.ReadResponse.FromString(raw).events:
            return event.position, event.event_id
    return 0, b""


def verify_offline(data_dir: Path) -> Verifier:
    """Walk the hash chain and every authentication tag of a stopped server's log.

    This is what ``lethedb verify --data`` does, in this process (a fresh
    interpreter per check would cost more than the walk itself).
    """
    with Store.open(data_dir) as store:
        verifier = Verifier(store.log, store.reader)
        while verifier.step():
            pass
        verifier.finish()
    return verifier


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")
