"""The blocking client: one gRPC channel, calls with deadlines and retries.

This module only performs I/O and waits; what to send, whether to retry, how
long to wait and where to resume all come from :mod:`lethedb._base`, shared
with the asyncio client.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from lethedb._base import (
    BACKUP_NOT_RETRIED,
    AllReadCursor,
    AppendCoalescer,
    AppendOutcome,
    AppendPipeline,
    BaseClient,
    ExportCursor,
    QueuedAppend,
    ReadCursor,
    SendAlone,
    StreamReadCursor,
    VerifyWalk,
    append_retry_delay,
    build_append_request,
    build_backup_request,
    build_checkpoint_request,
    build_commit_request,
    build_export_subject_request,
    build_forget_subject_request,
    build_get_checkpoint_request,
    build_get_subject_request,
    build_read_all_request,
    build_read_stream_request,
    build_release_legal_hold_request,
    build_set_legal_hold_request,
    build_subscribe_request,
    deadline_exceeded,
    to_append_result,
    to_backup_result,
    to_commit_result,
    to_rotate_result,
    to_shred_result,
    to_store_stats,
    to_subject_receipt,
)
from lethedb._connection import PemSource
from lethedb._exceptions import LetheError, error_from_status
from lethedb._models import (
    ANY,
    Append,
    AppendResult,
    BackupResult,
    CommitResult,
    Event,
    ExpectedVersion,
    RecordedEvent,
    RotateResult,
    ShredResult,
    StoreStats,
    SubjectReceipt,
    SubscriptionFilter,
    VerifyProgress,
)
from lethedb._subscriptions import Subscription
from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb

__all__ = ["AdminClient", "Client"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class Client(BaseClient):
    """A blocking LetheDB client; safe to share between threads.

    Every call has a deadline (``timeout`` seconds per attempt) and is retried
    on UNAVAILABLE and DEADLINE_EXCEEDED with exponential backoff, resending
    the identical request, so a retried append is deduplicated by the server
    rather than written twice.

    ``target`` is ``host:port`` or a connection string
    (``lethedb://host:port?tls=true&ca=/path/ca.pem``); ``tls``, ``ca``,
    ``client_cert``, ``client_key`` (paths or PEM bytes) and ``token`` (a
    bearer token, sent only over TLS or to loopback) can also be given as
    arguments. See :mod:`lethedb._connection`.

    ``coalesce_appends`` (on by default): :meth:`append` calls made at the same
    time (from several threads) share calls. While two append calls are in
    flight, further appends queue, and each call that completes sends the
    queue as one AppendBatch call; a lone append is sent at once, so nothing
    waits for a batch to fill. Each append keeps its own result, error,
    deadline and retries. Turn it off to send every append as its own call.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 10.0,
        max_retries: int = 5,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        tls: bool | None = None,
        ca: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        token: str | None = None,
        coalesce_appends: bool = True,
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            max_retries=max_retries,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            channel_options=channel_options,
            channel_credentials=channel_credentials,
            tls=tls,
            ca=ca,
            client_cert=client_cert,
            client_key=client_key,
            token=token,
            coalesce_appends=coalesce_appends,
        )
        self._appends: AppendCoalescer[Future[AppendOutcome]] | None = (
            AppendCoalescer() if coalesce_appends else None
        )
        if self._channel_credentials is None:
            self._channel = grpc.insecure_channel(self._target, options=self._channel_options)
        else:
            self._channel = grpc.secure_channel(
                self._target, self._channel_credentials, options=self._channel_options
            )
        self._stub = eventstore_pb2_grpc.EventStoreStub(self._channel)
        self._admin = AdminClient(self)

    @property
    def admin(self) -> AdminClient:
        """Operator calls (shred epochs, legal holds, backups, stats, verify, key rotation)."""
        return self._admin

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def append(
        self,
        stream_id: str,
        events: Event | Sequence[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> AppendResult:
        """Append events to one stream, atomically; returns once they are durable.

        Without an ``idempotency_key`` one is generated, so that the SDK's own
        retries are never written twice. Pass your own key (and the same events)
        to make your own retries safe too, for example after DeadlineExceeded
        or a process restart: the server answers them with the first result.

        Concurrent appends may share one AppendBatch call (see the class
        docstring); each still commits, fails and is retried on its own.
        """
        request = build_append_request(stream_id, events, expected_version, idempotency_key)
        deadline = self._timeout_for(timeout)
        if self._appends is None:
            return to_append_result(self._unary(self._stub.Append, request, deadline))
        retrying = self._retry_policy.start()
        while True:
            outcome = self._coalesced_append(self._appends, request, deadline)
            if isinstance(outcome, pb.AppendResponse):
                return to_append_result(outcome)
            time.sleep(append_retry_delay(retrying, outcome))

    def _coalesced_append(
        self,
        coalescer: AppendCoalescer[Future[AppendOutcome]],
        request: pb.AppendRequest,
        deadline: float,
    ) -> pb.AppendResponse | Exception:
        """One attempt: a unary Append now, or a place in the next AppendBatch."""
        item = coalescer.send_or_queue(
            lambda: QueuedAppend(request, time.monotonic() + deadline, Future())
        )
        if item is None:
            try:
                return self._append_call(request, deadline)
            finally:
                self._send_batches(coalescer.call_done())
        outcome: AppendOutcome
        try:
            outcome = item.waiter.result(timeout=item.deadline - time.monotonic())
        except TimeoutError:
            # A cancelled waiter is skipped by the batch, or its answer ignored.
            outcome = deadline_exceeded() if item.waiter.cancel() else item.waiter.result()
        if isinstance(outcome, SendAlone):
            return self._append_call(request, deadline)
        return outcome

    def _append_call(
        self, request: pb.AppendRequest, deadline: float
    ) -> pb.AppendResponse | Exception:
        try:
            return self._stub.Append(request, timeout=deadline)
        except Exception as exc:  # the caller maps, retries or raises it
            return exc

    def _send_batches(self, batches: list[list[QueuedAppend[Future[AppendOutcome]]]]) -> None:
        """Start each batch's call; its answer is handed out from gRPC's callback thread."""
        for batch in batches:
            # Each caller keeps its own deadline; the call lasts for the longest.
            timeout = max(0.001, max(item.deadline for item in batch) - time.monotonic())
            call: grpc.Future[Any]
            try:
                if len(batch) == 1:
                    call = self._stub.Append.future(batch[0].request, timeout=timeout)
                else:
                    assert self._appends is not None
                    request = self._appends.batch_request(batch)
                    call = self._stub.AppendBatch.future(request, timeout=timeout)
            except Exception as exc:  # not even started (a closed client): hand it out
                self._settle(batch, [exc for _ in batch])
                assert self._appends is not None
                self._send_batches(self._appends.call_done())
                continue
            call.add_done_callback(functools.partial(self._batch_done, batch))

    def _batch_done(
        self, batch: list[QueuedAppend[Future[AppendOutcome]]], call: grpc.Future[Any]
    ) -> None:
        coalescer = self._appends
        assert coalescer is not None
        outcomes: list[AppendOutcome]
        try:
            try:
                response = call.result()
            except grpc.RpcError as exc:
                outcomes = [exc] if len(batch) == 1 else coalescer.failed(batch, exc)
            except grpc.FutureCancelledError:  # the client was closed
                closed = "the client was closed"
                outcomes = [error_from_status(grpc.StatusCode.CANCELLED, closed) for _ in batch]
            except Exception as exc:
                outcomes = [exc for _ in batch]
            else:
                outcomes = [response] if len(batch) == 1 else coalescer.outcomes(batch, response)
            self._settle(batch, outcomes)
        finally:
            self._send_batches(coalescer.call_done())

    def _settle(
        self, batch: list[QueuedAppend[Future[AppendOutcome]]], outcomes: list[AppendOutcome]
    ) -> None:
        for item, outcome in zip(batch, outcomes, strict=True):
            with contextlib.suppress(InvalidStateError):  # its caller gave up waiting
                item.waiter.set_result(outcome)

    def append_many(
        self, items: Iterable[Append], *, timeout: float | None = None
    ) -> list[AppendResult | LetheError]:
        """Pipeline many appends on one call; one result or error per item, in order.

        Each item is committed and acknowledged separately, so a failed item
        does not stop the others: its slot holds the exception instead of a
        result, and nothing is raised for it. After a broken connection only
        the unanswered items are resent (with their idempotency keys); once
        retries are exhausted, they hold the connection error.
        """
        pipeline = AppendPipeline(items)
        deadline = self._timeout_for(timeout)
        retrying = self._retry_policy.start()
        while pipeline.pending:
            call = self._stub.AppendStream(iter(pipeline.requests()), timeout=deadline)
            try:
                for response in call:
                    pipeline.acknowledge(response)
                pipeline.stream_ended()
            except grpc.RpcError as exc:
                delay = pipeline.retry_delay(exc, retrying)
                if delay is not None:
                    time.sleep(delay)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]
        return pipeline.results()

    def commit(
        self,
        appends: Sequence[Append],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> CommitResult:
        """Append to several streams in one transaction: all or nothing.

        Each :class:`Append` names a stream, its events and its own expected
        version; its ``idempotency_key`` must be left ``None``, as one key
        covers the whole commit. If any part fails (a wrong expected version,
        a forgotten subject, invalid input), nothing of the commit is written
        and that error is raised. The parts' events take contiguous positions,
        in the order given. Without an ``idempotency_key`` one is generated,
        so the SDK's own retries are never written twice; pass your own to make
        your own retries safe: the server answers them with the first result,
        marked ``deduplicated``. Example: claim a unique username and create
        the user together::

            db.commit([
                Append(f"username-{name}", Event("UsernameClaimed", {"user": user_id}),
                       expected_version=NO_STREAM),
                Append(f"user-{user_id}", Event("UserRegistered", {...}, subject_id=user_id),
                       expected_version=NO_STREAM),
            ])
        """
        request = build_commit_request(appends, idempotency_key)
        deadline = self._timeout_for(timeout)
        response = self._unary(self._stub.Commit, request, deadline)
        return to_commit_result(response, len(request.appends))

    def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        max_count: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[RecordedEvent]:
        """Iterate over one stream's events, from ``from_version`` (inclusive).

        Without ``from_version``: from the first event, or from the last one
        when reading backwards. Arguments are checked now; the call starts on
        the first ``next()``. Raises StreamNotFound when the stream does not
        exist.
        """
        cursor = StreamReadCursor(
            build_read_stream_request(stream_id, from_version, backwards, max_count)
        )
        return self._read(self._stub.ReadStream, cursor, self._timeout_for(timeout))

    def read_all(
        self,
        *,
        after: int | None = None,
        from_position: int | None = None,
        backwards: bool = False,
        max_count: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[RecordedEvent]:
        """Iterate over the whole log in position order.

        Start strictly ``after`` a position (a saved checkpoint) or
        ``from_position`` inclusive; with neither, from the start (or from the
        end when reading backwards).
        """
        cursor = AllReadCursor(build_read_all_request(after, from_position, backwards, max_count))
        return self._read(self._stub.ReadAll, cursor, self._timeout_for(timeout))

    def forget_subject(
        self, subject_id: str, *, reason: str = "unspecified", timeout: float | None = None
    ) -> SubjectReceipt:
        """Forget a data subject (right to erasure); returns its erasure receipt.

        Once this returns, the subject's events read as redacted and the id
        can never be written to again; the receipt says FORGOTTEN_PENDING_SHRED
        until the next shred epoch has destroyed every stale copy of its keys.
        ``reason`` is a short code (for example ``"gdpr-art17-request"``) stored
        in clear, so it must not hold personal data. Forgetting a forgotten
        subject changes nothing and returns its receipt, which is also why a
        retry is safe. Raises LegalHoldActive while a legal hold is in force,
        PermissionDenied without the admin role.
        """
        request = build_forget_subject_request(subject_id, reason)
        deadline = self._timeout_for(timeout)
        return to_subject_receipt(self._unary(self._stub.ForgetSubject, request, deadline))

    def get_subject(self, subject_id: str, *, timeout: float | None = None) -> SubjectReceipt:
        """What the store knows of a subject: erasure state, event count, legal hold."""
        request = build_get_subject_request(subject_id)
        deadline = self._timeout_for(timeout)
        return to_subject_receipt(self._unary(self._stub.GetSubject, request, deadline))

    def export_subject(
        self, subject_id: str, *, timeout: float | None = None
    ) -> Iterator[RecordedEvent]:
        """Iterate over every event of a subject across all streams, decrypted, in log order.

        For the rights of access and portability; admin only. Arguments are
        checked now; the call starts on the first ``next()``. A dropped
        connection is retried only until the first event arrives: the export
        cannot resume mid-way, so a later drop is raised (start over by
        calling again). ``timeout`` bounds each attempt, that is the whole
        export, so give a large export a large one.
        """
        cursor = ExportCursor(build_export_subject_request(subject_id))
        return self._read(self._stub.ExportSubject, cursor, self._timeout_for(timeout))

    def subscribe(
        self,
        *,
        after: int | None = None,
        from_start: bool = False,
        from_end: bool = False,
        filter: SubscriptionFilter | None = None,
        group: str | None = None,
        member_id: str | None = None,
        reconnect: bool = True,
        batch_size: int | None = None,
    ) -> Subscription:
        """Follow the log: catch up, then receive new events as they are committed.

        Start strictly ``after`` a position (a saved checkpoint), ``from_start``
        (the default) or ``from_end`` (only events committed from now on). An
        unfiltered subscription delivers every position exactly once, in order,
        including redacted events of forgotten subjects and the
        ``$subject.forgotten`` events that tell a projection to delete what it
        derived. ``filter`` selects events on the server (see
        :class:`SubscriptionFilter`); skipped stretches arrive as
        :class:`Checkpoint` items. ``batch_size`` caps the events per message.

        With ``reconnect`` (the default) a lost connection (UNAVAILABLE) is
        re-established with backoff, for as long as it takes, and delivery
        resumes after the last position received: a server restart causes
        no gap and no duplicate. Other errors end the iteration with their
        exception. Arguments are checked now; the call starts on the first
        ``next()``. See :class:`lethedb.Subscription`.

        **Consumer groups.** With ``group`` the subscription joins that group:
        its members share the events, every event of one subject to the same
        member, in order; erasure events go to every member. ``member_id``
        names this member (default: the server assigns one, kept across
        reconnects). The server keeps the group's checkpoint: call
        ``subscription.commit()`` after handling events, and a member (or a
        restarted group) starts after the lowest position all live members
        committed; the start given here counts only for a group that has no
        checkpoint yet. Delivery is **at least once across a rebalance**: when a
        member joins or leaves (or reconnects), every member restarts after the
        group's checkpoint with its new share, so events after it may be
        delivered again, to the same member or another; within one assignment
        positions strictly increase. Handlers must therefore be idempotent, or
        store the positions they applied with their effects (the projection
        runtime in :mod:`lethedb.projections` does). The current assignment is
        ``subscription.assignment``.
        """
        request = build_subscribe_request(
            after=after,
            from_start=from_start,
            from_end=from_end,
            filter=filter,
            group=group,
            member_id=member_id,
            batch_size=batch_size,
        )
        return Subscription(self, request, self._retry_policy, reconnect)

    def get_checkpoint(self, group: str, *, timeout: float | None = None) -> int | None:
        """A consumer group's stored checkpoint, or None when it never stored one."""
        request = build_get_checkpoint_request(group)
        deadline = self._timeout_for(timeout)
        response = self._unary(self._stub.GetCheckpoint, request, deadline)
        return response.position if response.found else None

    def set_checkpoint(self, group: str, position: int, *, timeout: float | None = None) -> None:
        """Set a consumer group's stored checkpoint (backwards, to replay, only as admin).

        Only while the group has no live member on the server (NotGroupMember
        otherwise): members move the checkpoint with ``subscription.commit()``.
        Needs the consumer role; moving the checkpoint back needs admin
        (PermissionDenied otherwise). PositionBeyondHead when ``position`` is
        beyond the head of the log; StorageFull (RESOURCE_EXHAUSTED) when the
        group would be new and the server keeps its maximum of groups.
        """
        request = build_checkpoint_request(group, position)
        deadline = self._timeout_for(timeout)
        self._unary(self._stub.CommitCheckpoint, request, deadline)

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        deadline: float,
        *,
        no_retry: str | None = None,
    ) -> _Response:
        """One unary call, resending the same request on retryable failures."""
        retrying = self._retry_policy.start(no_retry=no_retry)
        while True:
            try:
                return method(request, timeout=deadline)
            except grpc.RpcError as exc:
                time.sleep(retrying.delay_or_raise(exc))

    def _read(
        self,
        method: grpc.UnaryStreamMultiCallable[Any, pb.ReadResponse],
        cursor: ReadCursor,
        deadline: float,
    ) -> Iterator[RecordedEvent]:
        retrying = self._retry_policy.start()
        while cursor.request is not None:
            call = method(cursor.request, timeout=deadline)
            try:
                for response in call:
                    yield from cursor.track(response.events)
                return
            except grpc.RpcError as exc:
                time.sleep(cursor.retry_delay(exc, retrying))
            finally:
                # Also runs when the caller stops iterating early: free the
                # server's read transaction instead of waiting for the deadline.
                call.cancel()  # type: ignore[no-untyped-call]


class AdminClient:
    """Operator calls of ``lethedb.v1.Admin``; get one from :attr:`Client.admin`.

    It shares the client's channel, timeout and retry policy, and is closed
    with it. Every call needs the admin role (PermissionDenied otherwise).
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._stub = admin_pb2_grpc.AdminStub(client._channel)

    def shred(self, *, timeout: float | None = None) -> ShredResult:
        """Run a shred epoch now and wait for it to complete.

        A new master key version wraps the live keys in a compacted key store;
        the old store is overwritten and older master versions destroyed, so
        every subject forgotten before the epoch becomes SHREDDED. Retrying is
        safe (a repeat just runs another epoch); as an epoch rewrites every
        live key, a large store may need more than the default ``timeout``.
        """
        deadline = self._client._timeout_for(timeout)
        response = self._client._unary(self._stub.Shred, apb.ShredRequest(), deadline)
        return to_shred_result(response)

    def set_legal_hold(
        self,
        subject_id: str,
        reason: str,
        *,
        until: datetime | int | None = None,
        timeout: float | None = None,
    ) -> SubjectReceipt:
        """Block forgetting a subject until ``until`` or until released.

        ``until`` is an aware datetime, an int of nanoseconds since the Unix
        epoch, or ``None`` for a hold without end. Setting a hold again
        replaces it. ``reason`` is stored in clear: no personal data.
        """
        request = build_set_legal_hold_request(subject_id, reason, until)
        deadline = self._client._timeout_for(timeout)
        response = self._client._unary(self._stub.SetLegalHold, request, deadline)
        return to_subject_receipt(response)

    def release_legal_hold(
        self, subject_id: str, *, timeout: float | None = None
    ) -> SubjectReceipt:
        """Release a subject's legal hold (a subject without one is left as it is)."""
        request = build_release_legal_hold_request(subject_id)
        deadline = self._client._timeout_for(timeout)
        response = self._client._unary(self._stub.ReleaseLegalHold, request, deadline)
        return to_subject_receipt(response)

    def backup(
        self, destination: str, *, include_keys: bool = False, timeout: float | None = None
    ) -> BackupResult:
        """Write a consistent backup into ``destination``, a directory on the server's machine.

        The directory must be missing or empty. This call is never retried:
        a second attempt could find the first one's partial output. With
        ``include_keys`` the backup also holds the key store, with wrapped
        keys of subjects that a later forget erases; such a backup must never
        be kept together with the master keyring (see docs/ERASURE.md).
        """
        request = build_backup_request(destination, include_keys)
        deadline = self._client._timeout_for(timeout)
        response = self._client._unary(
            self._stub.Backup, request, deadline, no_retry=BACKUP_NOT_RETRIED
        )
        return to_backup_result(response)

    def stats(self, *, timeout: float | None = None) -> StoreStats:
        """Counts and sizes of the store: positions, streams, subjects, erasures, files."""
        deadline = self._client._timeout_for(timeout)
        response = self._client._unary(self._stub.Stats, apb.StatsRequest(), deadline)
        return to_store_stats(response)

    def verify(
        self,
        *,
        progress: Callable[[VerifyProgress], None] | None = None,
        timeout: float | None = None,
    ) -> VerifyProgress:
        """Walk the whole log on the server, checking its hash chain and every record's tag.

        ``progress`` is called with each message of the walk, about twice a
        second, the final one included; the final one (``done``) is returned.
        A bad record does not raise: check ``result.ok``, and
        ``result.first_bad_position`` and ``result.problem`` say which record
        and what is wrong. The call is retried only until the first message
        arrives, since a walk cannot resume. ``timeout`` bounds the whole
        walk, so give a large store a large one.
        """
        walk = VerifyWalk(progress)
        deadline = self._client._timeout_for(timeout)
        retrying = self._client._retry_policy.start()
        while True:
            call = self._stub.Verify(apb.VerifyRequest(), timeout=deadline)
            try:
                for message in call:
                    if walk.track(message):
                        break
                return walk.finished()
            except grpc.RpcError as exc:
                time.sleep(walk.retry_delay(exc, retrying))
            finally:
                call.cancel()  # type: ignore[no-untyped-call]

    def rotate_master_key(self, *, timeout: float | None = None) -> RotateResult:
        """Re-wrap every live data key under a new master key version.

        Older versions are kept (every key stays readable if the rotation is
        interrupted); the next shred epoch destroys them. Retrying is safe: a
        repeat rotates once more.
        """
        deadline = self._client._timeout_for(timeout)
        response = self._client._unary(
            self._stub.RotateMasterKey, apb.RotateMasterKeyRequest(), deadline
        )
        return to_rotate_result(response)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client._target!r})"
