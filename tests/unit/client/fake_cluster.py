"""In-process LetheDB nodes on real ports that answer the way a cluster's nodes do.

Each :class:`FakeNode` is a real ``grpc.aio`` server on a loopback port. A
leader takes writes into the log the nodes share (a replicated log, without
the replication); a follower refuses them with NotLeader, its trailers made by
the server's own ``lethedb_server.api.status`` (so the SDK meets the real
contract), and a node that is not caught up answers reads CatchingUp. Stopping
a node closes its port: the client meets a real UNAVAILABLE. The servers run
in an event loop thread of their own, so blocking and asyncio clients alike
can call them. What the SDK routes where is recorded per node.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio

from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server import errors
from lethedb_server.api.status import append_error_fields, status_code, trailing_metadata
from tests.ports import free_port

_T = TypeVar("_T")


@dataclass
class SharedLog:
    """The log every node holds (position i at index i - 1) and the leader's idempotency keys."""

    events: list[pb.RecordedEvent] = field(default_factory=list)
    keys: dict[str, pb.AppendResponse] = field(default_factory=dict)
    grown: asyncio.Condition | None = None

    def append(self, request: pb.AppendRequest) -> pb.AppendResponse:
        known = self.keys.get(request.idempotency_key)
        if known is not None:
            replay = pb.AppendResponse()
            replay.CopyFrom(known)
            replay.deduplicated = True
            return replay
        first = len(self.events) + 1
        for event in request.events:
            self.events.append(
                pb.RecordedEvent(
                    position=len(self.events) + 1,
                    stream_id=request.stream_id,
                    stream_version=len(self.events),
                    event_id=uuid.uuid4().bytes,
                    event_type=event.event_type,
                    data=event.data,
                )
            )
        response = pb.AppendResponse(first_position=first, last_position=len(self.events))
        self.keys[request.idempotency_key] = response
        return response

    async def write(self, request: pb.AppendRequest) -> pb.AppendResponse:
        """Append and wake the subscriptions."""
        assert self.grown is not None
        async with self.grown:
            response = self.append(request)
            self.grown.notify_all()
            return response

    def after(self, position: int, head: int) -> list[pb.RecordedEvent]:
        return self.events[position:head]


class FakeNode(eventstore_pb2_grpc.EventStoreServicer, admin_pb2_grpc.AdminServicer):
    """One node: its role, what it was asked, and its server (started by :class:`FakeCluster`)."""

    def __init__(self, cluster: FakeCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.address = f"127.0.0.1:{free_port()}"
        #: "leader" or "follower".
        self.role = "follower"
        #: The leader a follower names in NotLeader ("" : it does not know).
        self.names_leader: str | None = None
        #: A follower that is not caught up answers every read CatchingUp.
        self.catching_up = False
        #: The calls this node received: (method name, request).
        self.calls: list[tuple[str, Any]] = []
        #: The authorization header of each call.
        self.tokens: list[str | None] = []
        self.server: grpc.aio.Server | None = None

    def __repr__(self) -> str:
        return f"FakeNode({self.name}, {self.role}, {self.address})"

    # -- what the tests look at ------------------------------------------------

    def received(self, method: str) -> list[Any]:
        return [request for name, request in self.calls if name == method]

    # -- behaviour ---------------------------------------------------------------

    def _note(self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls.append((method, request))
        token = dict(context.invocation_metadata() or ()).get("authorization")
        self.tokens.append(token if isinstance(token, str) else None)

    def _not_leader(self) -> errors.NotLeader | None:
        if self.role == "leader":
            return None
        if self.names_leader is not None:
            return errors.NotLeader(self.names_leader)
        leader = self.cluster.leader()
        return errors.NotLeader(leader.address if leader is not None else "")

    async def _refuse_write(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        refusal = self._not_leader()
        if refusal is not None:
            await _abort(context, refusal)

    async def _refuse_read(self, context: grpc.aio.ServicerContext[Any, Any], minimum: int) -> None:
        if self.catching_up or minimum > len(self.cluster.log.events):
            await _abort(context, errors.CatchingUp("this follower has not caught up yet"))

    async def Append(self, request: pb.AppendRequest, context: Any) -> pb.AppendResponse:  # noqa: N802
        self._note("Append", request, context)
        await self._refuse_write(context)
        return await self.cluster.log.write(request)

    async def AppendBatch(  # noqa: N802
        self, request: pb.AppendBatchRequest, context: Any
    ) -> pb.AppendBatchResponse:
        self._note("AppendBatch", request, context)
        return pb.AppendBatchResponse(
            results=[await self._append_result(append) for append in request.appends]
        )

    async def AppendStream(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.AppendRequest], context: Any
    ) -> AsyncIterator[pb.AppendResult]:
        async for request in request_iterator:
            self._note("AppendStream", request, context)
            yield await self._append_result(request)

    async def _append_result(self, request: pb.AppendRequest) -> pb.AppendResult:
        """A pipelined append's outcome: a follower's refusal travels as an AppendError."""
        refusal = self._not_leader()
        if refusal is None:
            return pb.AppendResult(ok=await self.cluster.log.write(request))
        code, message, actual, name = append_error_fields(refusal)
        return pb.AppendResult(
            error=pb.AppendError(code=code, message=message, actual_version=actual, error=name)
        )

    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:  # noqa: N802
        self._note("Commit", request, context)
        await self._refuse_write(context)
        results = []
        for part in request.appends:
            append = pb.AppendRequest(
                stream_id=part.stream_id,
                events=part.events,
                idempotency_key=f"{request.idempotency_key}/{part.stream_id}",
            )
            results.append(await self.cluster.log.write(append))
        return pb.CommitResponse(results=results)

    async def ForgetSubject(self, request: pb.ForgetSubjectRequest, context: Any) -> Any:  # noqa: N802
        self._note("ForgetSubject", request, context)
        await self._refuse_write(context)
        return _receipt(request.subject_id, pb.SUBJECT_FORGOTTEN_PENDING_SHRED)

    async def GetSubject(self, request: pb.GetSubjectRequest, context: Any) -> Any:  # noqa: N802
        self._note("GetSubject", request, context)
        await self._refuse_read(context, request.min_position)
        return _receipt(request.subject_id, pb.SUBJECT_ACTIVE)

    async def CommitCheckpoint(  # noqa: N802
        self, request: pb.CommitCheckpointRequest, context: Any
    ) -> pb.CommitCheckpointResponse:
        self._note("CommitCheckpoint", request, context)
        if not request.member_id:  # a member's commit is forwarded to the leader
            await self._refuse_write(context)
        return pb.CommitCheckpointResponse(position=request.position, accepted=True)

    async def GetCheckpoint(  # noqa: N802
        self, request: pb.GetCheckpointRequest, context: Any
    ) -> pb.GetCheckpointResponse:
        self._note("GetCheckpoint", request, context)
        await self._refuse_read(context, request.min_position)
        return pb.GetCheckpointResponse(found=True, position=7)

    async def ReadAll(  # noqa: N802
        self, request: pb.ReadAllRequest, context: Any
    ) -> AsyncIterator[pb.ReadResponse]:
        self._note("ReadAll", request, context)
        await self._refuse_read(context, request.min_position)
        log = self.cluster.log
        yield pb.ReadResponse(events=log.after(request.after_position, len(log.events)))

    async def ReadStream(  # noqa: N802
        self, request: pb.ReadStreamRequest, context: Any
    ) -> AsyncIterator[pb.ReadResponse]:
        self._note("ReadStream", request, context)
        await self._refuse_read(context, request.min_position)
        events = [e for e in self.cluster.log.events if e.stream_id == request.stream_id]
        yield pb.ReadResponse(events=events[request.from_version :])

    async def ExportSubject(  # noqa: N802
        self, request: pb.ExportSubjectRequest, context: Any
    ) -> AsyncIterator[pb.ReadResponse]:
        self._note("ExportSubject", request, context)
        await self._refuse_read(context, request.min_position)
        yield pb.ReadResponse(events=self.cluster.log.events)

    async def Subscribe(  # noqa: N802
        self, request: pb.SubscribeRequest, context: Any
    ) -> AsyncIterator[pb.SubscribeResponse]:
        """Every event after the start, one per message, then each new one as it is appended."""
        self._note("Subscribe", request, context)
        await self._refuse_read(context, request.min_position)
        log = self.cluster.log
        sent = request.after_position
        grown = log.grown
        assert grown is not None
        if request.group:
            assignment = pb.GroupAssignment(
                group=request.group,
                member_id=request.member_id or f"member-of-{self.name}",
                generation=1,
                members=[request.member_id or f"member-of-{self.name}"],
                restart_after=request.after_position,
            )
            yield pb.SubscribeResponse(assignment=assignment)
        while True:
            async with grown:
                while sent >= len(log.events):
                    await grown.wait()
            event = log.events[sent]
            sent += 1
            yield pb.SubscribeResponse(events=pb.EventBatch(events=[event]))

    async def SetLegalHold(self, request: apb.SetLegalHoldRequest, context: Any) -> Any:  # noqa: N802
        self._note("SetLegalHold", request, context)
        await self._refuse_write(context)
        return _receipt(request.subject_id, pb.SUBJECT_ACTIVE)

    async def ReleaseLegalHold(self, request: apb.ReleaseLegalHoldRequest, context: Any) -> Any:  # noqa: N802
        self._note("ReleaseLegalHold", request, context)
        await self._refuse_write(context)
        return _receipt(request.subject_id, pb.SUBJECT_ACTIVE)

    async def ClusterStatus(  # noqa: N802
        self, request: apb.ClusterStatusRequest, context: Any
    ) -> apb.ClusterStatusResponse:
        self._note("ClusterStatus", request, context)
        followers = [
            apb.FollowerStatus(
                node_id=node.name,
                advertise=node.address,
                connected=True,
                connected_since=1_700_000_000_000_000_000,
                commit=3,
                position=len(self.cluster.log.events),
                lag_positions=1,
                lag_seconds=0.25,
                shredded_through=2,
            )
            for node in self.cluster.nodes
            if node is not self and self.role == "leader"
        ]
        leader = self.cluster.leader()
        return apb.ClusterStatusResponse(
            node_id=self.name,
            role=self.role,
            term=4,
            leader=leader.address if leader is not None else "",
            commit=3,
            position=len(self.cluster.log.events),
            followers=followers,
            connected=self.role == "follower",
            caught_up=not self.catching_up,
            sync_replicas=1,
        )


def _receipt(subject_id: str, state: int) -> pb.SubjectReceipt:
    return pb.SubjectReceipt(subject_id=subject_id, state=state)  # type: ignore[arg-type]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.LetheError) -> None:
    """End the call as the real server does (lethedb_server.api.status.abort)."""
    await context.abort(status_code(error), str(error), trailing_metadata(error))


class FakeCluster:
    """Nodes sharing one log, served from an event loop thread of their own."""

    def __init__(self, count: int) -> None:
        self.log = SharedLog()
        self.nodes = [FakeNode(self, f"node-{index}") for index in range(count)]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.run(self._make_condition())
        for node in self.nodes:
            self.start(node)

    async def _make_condition(self) -> None:
        self.log.grown = asyncio.Condition()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine in the servers' loop and wait for its result."""
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=10)

    def call_soon(self, function: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(function)

    def leader(self) -> FakeNode | None:
        return next((node for node in self.nodes if node.role == "leader"), None)

    def make_leader(self, node: FakeNode | None) -> None:
        for each in self.nodes:
            each.role = "leader" if each is node else "follower"

    def append_events(self, count: int) -> None:
        """Write ``count`` events straight into the log (as if another client had)."""

        async def append() -> None:
            for _ in range(count):
                event = pb.ProposedEvent(event_type="Seeded", data=b"{}")
                request = pb.AppendRequest(
                    stream_id="seed", events=[event], idempotency_key=uuid.uuid4().hex
                )
                await self.log.write(request)

        self.run(append())

    def start(self, node: FakeNode) -> None:
        async def start() -> None:
            server = grpc.aio.server()
            eventstore_pb2_grpc.add_EventStoreServicer_to_server(node, server)
            admin_pb2_grpc.add_AdminServicer_to_server(node, server)
            server.add_insecure_port(node.address)
            await server.start()
            node.server = server

        self.run(start())

    def stop(self, node: FakeNode) -> None:
        """Close the node's port and end its calls: clients meet UNAVAILABLE."""

        async def stop() -> None:
            if node.server is not None:
                await node.server.stop(None)
                node.server = None

        self.run(stop())

    def close(self) -> None:
        for node in self.nodes:
            self.stop(node)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def hosts(self, *nodes: FakeNode) -> str:
        """A connection string naming these nodes (all of them by default)."""
        chosen = nodes or tuple(self.nodes)
        return "lethedb://" + ",".join(node.address for node in chosen)
