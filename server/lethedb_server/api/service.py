"""``lethedb.v1.EventStore``: thin adapters from protobuf calls to the store.

No storage logic lives here. A handler converts and validates the request,
calls one operation of the :class:`~lethedb_server.engine.store.Store` façade, and
converts the answer; domain errors
become statuses in :mod:`lethedb_server.api.rpc` and :mod:`lethedb_server.api.status`.

On a follower (docs/CLUSTERING.md) every write fails with NotLeader, which
names the leader (the store raises it; the status carries the address in the
``lethedb-leader`` trailer); the streaming write, AppendStream, ends whole
with it rather than answer each append with an error. Reads pass the
:class:`~lethedb_server.api.head_watch.ReadGate` first: CatchingUp before the
follower's first catch-up, and the ``min_position`` wait.

Every acknowledged write (Append, AppendBatch, Commit, ForgetSubject) carries
the ``lethedb-term`` trailer: the term of the answering node's log when it
answered, so a client (or a fault test's history) can tell which leadership
acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import Message

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_contract import MAX_APPENDS_PER_BATCH
from lethedb_server.api import messages, status, wire
from lethedb_server.api.auth import caller_may, caller_role, require_role
from lethedb_server.api.head_watch import HeadWatch, ReadGate
from lethedb_server.api.rpc import (
    Context,
    Precheck,
    Undecodable,
    decoded,
    register,
    server_streaming,
    unary,
)
from lethedb_server.api.validation import (
    MAX_GROUP_BYTES,
    Validator,
    check_append_batch,
    check_group,
    check_name,
)
from lethedb_server.engine.cluster import ClusterNode
from lethedb_server.engine.model import EVENT_OVERHEAD, ForgetCommand, StoredEvent
from lethedb_server.engine.reader import DEFAULT_PAGE
from lethedb_server.engine.store import Store
from lethedb_server.engine.subscriptions import Events, SubscriptionEngine, SubscriptionMessage
from lethedb_server.errors import DataLoss, LetheError, NotLeader, ValidationError

log = logging.getLogger(__name__)

SERVICE_NAME = "lethedb.v1.EventStore"
_END = 2**64 - 1
#: Appends one AppendStream call may have queued at the writer at once.
STREAM_IN_FLIGHT = 256
#: The trailer of an acknowledged write naming the term that acknowledged it.
TERM_TRAILER = "lethedb-term"


class EventStoreService:
    """``lethedb.v1.EventStore``."""

    def __init__(
        self,
        store: Store,
        validator: Validator,
        subscriptions: SubscriptionEngine | None = None,
        reads: ReadGate | None = None,
        *,
        cluster: ClusterNode | None = None,
    ) -> None:
        self.store = store
        self.validator = validator
        self.subscriptions = subscriptions or SubscriptionEngine(store)
        self.reads = reads or ReadGate(store, HeadWatch(store), follower=False)
        self.cluster = cluster if cluster is not None else ClusterNode()
        self._last_page: tuple[list[StoredEvent], int, list[pb.SubscribeResponse]] | None = None

    async def _admit_read(self, min_position: int, context: Context) -> None:
        await self.reads.admit(min_position, context.time_remaining())

    def _check_leader(self) -> None:
        """NotLeader at once on a follower, before a write is converted or validated."""
        if self.store.role == "follower":
            raise NotLeader(self.store.leader)

    async def _append(self, request: pb.AppendRequest | Undecodable) -> pb.AppendResponse:
        request = decoded(request)
        self._check_leader()
        self._check_room(len(request.events), request)
        command = messages.append_command(request)
        self.validator.check_append(command)
        result = await self.store.append(command)
        return messages.append_response(result)

    def _check_room(self, events: int, request: Message, appends: int = 1) -> None:
        """Overloaded now, before any conversion, if the writer has no room for the call.

        The size is an estimate (encoded size plus the per-event overhead);
        each append is still admitted on its own when it is submitted.
        """
        size = request.ByteSize() + events * EVENT_OVERHEAD
        self.store.check_room(events, size, appends)

    def _stamp_term(self, context: Context) -> None:
        """Name, in the ``lethedb-term`` trailer, the term under which this write was answered."""
        context.set_trailing_metadata(((TERM_TRAILER, str(self.store.term)),))

    @unary
    async def Append(self, request: pb.AppendRequest, context: Context) -> pb.AppendResponse:  # noqa: N802
        response = await self._append(request)
        self._stamp_term(context)
        return response

    @unary
    async def AppendBatch(  # noqa: N802
        self, request: pb.AppendBatchRequest, context: Context
    ) -> pb.AppendBatchResponse:
        """Independent appends in one call: each validated, committed and answered alone.

        Every valid append is queued at the writer before any is awaited, so
        they share its next group commit; an invalid one takes its slot as an
        error and is never queued. The answer waits for every append.
        """
        self._check_leader()  # one NotLeader for the call, not one error per append
        check_append_batch(len(request.appends))
        # Refused whole, before any append is converted, when the writer has
        # no room for all of it.
        events = sum([len(append.events) for append in request.appends])
        self._check_room(events, request, len(request.appends))
        outcomes: list[asyncio.Future[Any] | LetheError] = []
        submit = self.store.append
        for append in request.appends:
            try:
                command = messages.append_command(append)
                self.validator.check_append(command)
            except LetheError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(submit(command))
        results: list[pb.AppendResult] = []
        try:
            for outcome in outcomes:
                if not isinstance(outcome, LetheError):
                    try:
                        answer = messages.append_response(await outcome)
                        results.append(pb.AppendResult(ok=answer))
                        continue
                    except LetheError as exc:
                        outcome = exc
                results.append(_append_error(outcome))
        finally:
            # A cancelled call: the writer still commits what it holds, but
            # nobody is left to read the outcomes (the writer skips done waiters).
            for outcome in outcomes:
                if not isinstance(outcome, LetheError):
                    outcome.cancel()
        self._stamp_term(context)
        return pb.AppendBatchResponse(results=results)

    @unary
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:  # noqa: N802
        self._check_leader()
        self._check_room(sum([len(part.events) for part in request.appends]), request)
        command = messages.commit_command(request)
        self.validator.check_commit(command)
        result = await self.store.commit(command)
        self._stamp_term(context)
        return messages.commit_response(result)

    async def AppendStream(  # noqa: N802
        self, requests: AsyncIterator[pb.AppendRequest | Undecodable], context: Context
    ) -> AsyncIterator[pb.AppendResult]:
        """Pipelined appends: a reader task submits, this generator answers in order.

        On a follower the call ends with NotLeader before it reads a request.
        """
        if self.store.role == "follower":
            await status.abort(context, NotLeader(self.store.leader))
        answers: asyncio.Queue[asyncio.Task[pb.AppendResponse] | None] = asyncio.Queue(
            STREAM_IN_FLIGHT
        )

        async def submit_all() -> None:
            try:
                async for request in requests:
                    await answers.put(asyncio.ensure_future(self._append(request)))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(submit_all())
        try:
            while (task := await answers.get()) is not None:
                try:
                    yield pb.AppendResult(ok=await task)
                except LetheError as exc:
                    yield _append_error(exc)
            await reader
        finally:
            reader.cancel()

    @server_streaming
    async def ReadStream(  # noqa: N802
        self, request: pb.ReadStreamRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        self.validator.check_stream_id(request.stream_id)
        await self._admit_read(request.min_position, context)
        backwards = request.backwards
        if request.HasField("from_version"):
            start = request.from_version
        else:
            start = _END if backwards else 0
        store = self.store

        def page(start: int, limit: int) -> list[StoredEvent]:
            return store.read_stream(request.stream_id, start, backwards=backwards, limit=limit)

        async for message in _paged(page, start, backwards, request.max_count, _next_version):
            yield message

    @unary
    async def ForgetSubject(  # noqa: N802
        self, request: pb.ForgetSubjectRequest, context: Context
    ) -> pb.SubjectReceipt:
        self._check_leader()
        self.validator.check_subject_id(request.subject_id, "subject_id", required=True)
        reason = request.reason or "unspecified"
        check_name(reason, "reason", 128)
        # The caller's role from the access interceptor ("admin" when auth is off).
        command = ForgetCommand(request.subject_id, reason, by_role=caller_role())
        await self.store.forget(command)
        self._stamp_term(context)
        return await self._receipt(request.subject_id)

    @unary
    async def GetSubject(  # noqa: N802
        self, request: pb.GetSubjectRequest, context: Context
    ) -> pb.SubjectReceipt:
        self.validator.check_subject_id(request.subject_id, "subject_id", required=True)
        await self._admit_read(request.min_position, context)
        return await self._receipt(request.subject_id)

    async def _receipt(self, subject_id: str) -> pb.SubjectReceipt:
        """The receipt; on a leader with the subject's erasure state on every node."""
        return await asyncio.to_thread(self._receipt_now, subject_id)

    def _receipt_now(self, subject_id: str) -> pb.SubjectReceipt:
        receipt = self.store.receipt(subject_id)
        return messages.subject_receipt(receipt, self.cluster.subject_nodes(self.store, receipt))

    @server_streaming
    async def ExportSubject(  # noqa: N802
        self, request: pb.ExportSubjectRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        self.validator.check_subject_id(request.subject_id, "subject_id", required=True)
        await self._admit_read(request.min_position, context)
        store = self.store

        def page(after: int, limit: int) -> list[StoredEvent]:
            return store.read_subject(request.subject_id, after - 1, limit)

        async for message in _paged(page, 1, False, 0, _next_position):
            yield message

    @server_streaming
    async def ReadAll(  # noqa: N802
        self, request: pb.ReadAllRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        await self._admit_read(request.min_position, context)
        backwards = request.backwards
        which = request.WhichOneof("start")
        if which == "from_position":
            start = request.from_position
        elif which == "after_position":
            start = request.after_position + (-1 if backwards else 1)
        else:
            start = _END if backwards else 1
        store = self.store

        def page(start: int, limit: int) -> list[StoredEvent]:
            return store.read_all(start, backwards=backwards, limit=limit)

        async for message in _paged(page, start, backwards, request.max_count, _next_position):
            yield message

    @server_streaming
    async def Subscribe(  # noqa: N802
        self, request: pb.SubscribeRequest, context: Context
    ) -> AsyncIterator[pb.SubscribeResponse]:
        """Relay the engine's loop; each yield waits for the transport (flow control)."""
        spec = messages.subscription_spec(request)
        self.validator.check_subscription(spec)
        if spec.group:
            # A member takes a share of the group's events and moves its
            # checkpoint: more than reading.
            require_role("consumer", "joining a consumer group")
        await self._admit_read(request.min_position, context)
        max_events = request.max_events_per_message or DEFAULT_PAGE
        subscription = await self.subscriptions.open(spec)
        try:
            async with contextlib.aclosing(subscription.messages()) as items:
                async for item in items:
                    for message in self._responses(item, max_events):
                        yield message
        finally:
            subscription.close()

    def _responses(
        self, item: SubscriptionMessage, max_events: int
    ) -> Iterable[pb.SubscribeResponse]:
        """Protobuf for one engine message; a page shared by live subscribers is built once.

        Live subscribers woken by the same commit get the same page object
        from the engine, so the last page's messages are kept and reused (they
        are only serialized, never changed, by gRPC).
        """
        if not isinstance(item, Events):
            return messages.subscribe_responses(item, max_events)
        last = self._last_page
        if last is not None and last[0] is item.events and last[1] == max_events:
            return last[2]
        responses = list(messages.subscribe_responses(item, max_events))
        self._last_page = (item.events, max_events, responses)
        return responses

    @unary
    async def CommitCheckpoint(  # noqa: N802
        self, request: pb.CommitCheckpointRequest, context: Context
    ) -> pb.CommitCheckpointResponse:
        check_group(request.group)
        check_name(request.member_id, "member_id", MAX_GROUP_BYTES, required=False)
        # A follower forwards the checkpoint to its leader (the subscription
        # engine's checkpoint sink); it must have caught up to judge the position.
        self.reads.check()
        result = await self.subscriptions.commit_checkpoint(
            request.group,
            request.position,
            request.member_id,
            request.generation,
            may_rewind=caller_may("admin"),
        )
        return messages.commit_checkpoint_response(result)

    @unary
    async def GetCheckpoint(  # noqa: N802
        self, request: pb.GetCheckpointRequest, context: Context
    ) -> pb.GetCheckpointResponse:
        check_group(request.group)
        await self._admit_read(request.min_position, context)
        position = await self.subscriptions.get_checkpoint(request.group)
        return pb.GetCheckpointResponse(found=position is not None, position=position or 0)


def request_precheck(validator: Validator, *, nested: bool) -> Precheck:
    """The per-call limits checked on a request's bytes, before protobuf parses it.

    A message too small to hold more events than the limit (each event takes
    at least two bytes) is not walked at all, so ordinary appends pay nothing.
    """
    limits = validator.limits
    stop_after = limits.max_request_events
    # Far more fields than any request within the limits has (per append: its
    # events and five fields of its own); only repeated or unknown fields
    # reach it, and walking those further would cost time for nothing.
    max_fields = 2 * stop_after + 8 * MAX_APPENDS_PER_BATCH + 64

    def check(raw: bytes) -> None:
        most_events = len(raw) // 2
        if most_events <= stop_after and (
            len(raw) + most_events * EVENT_OVERHEAD <= limits.max_request_bytes
        ):
            return
        counted = wire.count_events(
            raw, nested=nested, stop_after=stop_after, max_fields=max_fields
        )
        if counted.malformed:
            # Refused as the parser would refuse it; walking on could only
            # undercount what a more lenient parser then builds.
            raise ValidationError(
                f"the request is not a valid protobuf encoding (fault after {counted.fields} "
                "fields)"
            )
        if counted.stopped and counted.events <= stop_after:
            raise ValidationError(
                f"the request has more than {max_fields} protobuf fields in {len(raw)} bytes "
                "(repeated or unknown fields); a request within the limits has far fewer"
            )
        validator.check_request(counted.events, len(raw), exact=not counted.stopped)

    return check


def _append_error(error: LetheError) -> pb.AppendResult:
    code, message, actual, name = status.append_error_fields(error)
    return pb.AppendResult(
        error=pb.AppendError(code=code, message=message, actual_version=actual, error=name)
    )


def _next_version(event: StoredEvent, backwards: bool) -> int:
    return event.stream_version - 1 if backwards else event.stream_version + 1


def _next_position(event: StoredEvent, backwards: bool) -> int:
    return event.position - 1 if backwards else event.position + 1


async def _paged(
    read_page: Callable[[int, int], list[StoredEvent]],
    start: int,
    backwards: bool,
    max_count: int,
    next_start: Callable[[StoredEvent, bool], int],
) -> AsyncIterator[pb.ReadResponse]:
    """Read page after page off the event loop until the end or *max_count*."""
    remaining = max_count or _END
    # after_position = 2**64 - 1 starts past the last u64 key: there is nothing there.
    while remaining > 0 and 0 <= start <= _END:
        limit = min(DEFAULT_PAGE, remaining)
        try:
            events = await asyncio.to_thread(read_page, start, limit)
        except DataLoss:
            # Deliver every event before the damaged one, then its error.
            events, error = await asyncio.to_thread(
                _before_damage, read_page, start, backwards, limit, next_start
            )
            if error is not None:
                for message in messages.read_responses(events):
                    yield message
                raise error from None
        for message in messages.read_responses(events):
            yield message
        if len(events) < limit:
            return
        remaining -= len(events)
        start = next_start(events[-1], backwards)


def _before_damage(
    read_page: Callable[[int, int], list[StoredEvent]],
    start: int,
    backwards: bool,
    limit: int,
    next_start: Callable[[StoredEvent, bool], int],
) -> tuple[list[StoredEvent], DataLoss | None]:
    """After a page failed: its events before the damaged one, read one at a time.

    Only on the error path. Returns them and the damaged event's error (None
    if the page reads whole now).
    """
    events: list[StoredEvent] = []
    for _ in range(limit):
        try:
            page = read_page(start, 1)
        except DataLoss as exc:
            return events, exc
        if not page:
            break
        events += page
        start = next_start(page[-1], backwards)
    return events, None


def add_event_store(server: grpc.aio.Server, service: EventStoreService) -> None:
    single = request_precheck(service.validator, nested=False)
    nested = request_precheck(service.validator, nested=True)
    register(
        server,
        SERVICE_NAME,
        {
            "Append": ("unary", service.Append, pb.AppendRequest, pb.AppendResponse),
            "Commit": ("unary", service.Commit, pb.CommitRequest, pb.CommitResponse),
            "AppendStream": (
                "stream_stream",
                service.AppendStream,
                pb.AppendRequest,
                pb.AppendResult,
            ),
            "AppendBatch": (
                "unary",
                service.AppendBatch,
                pb.AppendBatchRequest,
                pb.AppendBatchResponse,
            ),
            "ReadStream": (
                "server_streaming",
                service.ReadStream,
                pb.ReadStreamRequest,
                pb.ReadResponse,
            ),
            "ReadAll": ("server_streaming", service.ReadAll, pb.ReadAllRequest, pb.ReadResponse),
            "Subscribe": (
                "server_streaming",
                service.Subscribe,
                pb.SubscribeRequest,
                pb.SubscribeResponse,
            ),
            "CommitCheckpoint": (
                "unary",
                service.CommitCheckpoint,
                pb.CommitCheckpointRequest,
                pb.CommitCheckpointResponse,
            ),
            "GetCheckpoint": (
                "unary",
                service.GetCheckpoint,
                pb.GetCheckpointRequest,
                pb.GetCheckpointResponse,
            ),
            "ForgetSubject": (
                "unary",
                service.ForgetSubject,
                pb.ForgetSubjectRequest,
                pb.SubjectReceipt,
            ),
            "GetSubject": ("unary", service.GetSubject, pb.GetSubjectRequest, pb.SubjectReceipt),
            "ExportSubject": (
                "server_streaming",
                service.ExportSubject,
                pb.ExportSubjectRequest,
                pb.ReadResponse,
            ),
        },
        prechecks={
            "Append": single,
            "AppendStream": single,
            "AppendBatch": nested,
            "Commit": nested,
        },
    )
