"""Helpers for the subscription tests: raw generated stubs, no SDK.

The SDK's subscribe API is built on top of these RPCs later; the tests talk to
the server with ``lethedb.v1.eventstore_pb2_grpc.EventStoreStub`` directly so
that they pin the wire behaviour itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc as rpc

Stub = rpc.EventStoreStub


def uid() -> str:
    return uuid.uuid4().hex[:12]


def proposed(event_type: str = "Happened", subject: str = "", data: bytes = b"{}"):
    return pb.ProposedEvent(event_type=event_type, subject_id=subject, data=data)


async def append(stub: Stub, stream: str, events: Iterable[pb.ProposedEvent]):
    return await stub.Append(pb.AppendRequest(stream_id=stream, events=list(events)), timeout=30)


async def head(stub: Stub) -> int:
    """The last committed position (0 for an empty log)."""
    async for response in stub.ReadAll(pb.ReadAllRequest(backwards=True, max_count=1)):
        if response.events:
            return int(response.events[-1].position)
    return 0


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS, RssAnon, RssFile)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


@dataclass
class Received:
    """Everything one subscription delivered, in arrival order."""

    events: list[pb.RecordedEvent] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    caught_up: list[int] = field(default_factory=list)
    heartbeats: list[int] = field(default_factory=list)
    assignments: list[pb.GroupAssignment] = field(default_factory=list)
    #: (kind, position) in arrival order: kind is "event", "checkpoint", "caught_up".
    progress: list[tuple[str, int]] = field(default_factory=list)
    #: Events after the latest assignment (all of them for a plain subscription).
    current: list[pb.RecordedEvent] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def positions(self) -> list[int]:
        return [e.position for e in self.events]

    @property
    def last_position(self) -> int:
        """The last position reported in any form (event, checkpoint, caught-up)."""
        return self.progress[-1][1] if self.progress else 0

    def take(self, message: pb.SubscribeResponse) -> None:
        kind = message.WhichOneof("message")
        if kind == "events":
            batch = list(message.events.events)
            self.batch_sizes.append(len(batch))
            self.events.extend(batch)
            self.current.extend(batch)
            self.progress.append(("event", batch[-1].position))
        elif kind == "checkpoint":
            self.checkpoints.append(message.checkpoint.position)
            self.progress.append(("checkpoint", message.checkpoint.position))
        elif kind == "caught_up":
            self.caught_up.append(message.caught_up.position)
            self.progress.append(("caught_up", message.caught_up.position))
        elif kind == "heartbeat":
            self.heartbeats.append(message.heartbeat.head)
        elif kind == "assignment":
            self.assignments.append(message.assignment)
            self.current = []
            self.progress.append(("assignment", message.assignment.restart_after))


async def follow(
    call: AsyncIterator[pb.SubscribeResponse], received: Received, stop: asyncio.Event | None = None
) -> None:
    """Record every message of *call* into *received* until the call ends or *stop* is set."""
    try:
        async for message in call:
            received.take(message)
            if stop is not None and stop.is_set():
                return
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise
    except asyncio.CancelledError:
        pass


async def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
