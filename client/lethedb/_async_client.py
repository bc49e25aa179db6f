"""The asyncio client: the same API as :class:`lethedb.Client`, on ``grpc.aio``.

Like the blocking client, this module only performs I/O and waits; request
building, retry decisions and resume bookkeeping come from :mod:`lethedb._base`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

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
from lethedb._exceptions import LetheError
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
from lethedb._subscriptions import AsyncSubscription
from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb

__all__ = ["AsyncAdminClient", "AsyncClient"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Outcome = AppendOutcome


def _expire(waiter: asyncio.Future[_Outcome]) -> None:
    """A queued append's own deadline passed: its caller stops waiting, as for a unary call."""
    if not waiter.done():
        waiter.set_result(deadline_exceeded())


class AsyncClient(BaseClient):
    """An asyncio LetheDB client; create and use it inside the one event loop it serves.

    Deadlines, retries, idempotency and the connection arguments (connection
    strings, ``tls``, ``ca``, ``client_cert``, ``client_key``, ``token``) work
    exactly as in :class:`lethedb.Client`, and so does ``coalesce_appends``:
    concurrent :meth:`append` calls (from many tasks) share AppendBatch calls.
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
        self._appends: AppendCoalescer[asyncio.Future[_Outcome]] | None = (
            AppendCoalescer() if coalesce_appends else None
        )
        self._batch_calls: set[asyncio.Task[None]] = set()
        if self._channel_credentials is None:
            self._channel = grpc.aio.insecure_channel(self._target, options=self._channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                self._target, self._channel_credentials, options=self._channel_options
            )
        self._stub = eventstore_pb2_grpc.EventStoreStub(self._channel)
        self._admin = AsyncAdminClient(self)

    @property
    def admin(self) -> AsyncAdminClient:
        """Operator calls (shred epochs, legal holds, backups, stats, verify, key rotation)."""
        return self._admin

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def append(
        self,
        stream_id: str,
        events: Event | Sequence[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> AppendResult:
        """Append events to one stream, atomically; see :meth:`lethedb.Client.append`."""
        request = build_append_request(stream_id, events, expected_version, idempotency_key)
        deadline = self._timeout_for(timeout)
        if self._appends is None:
            return to_append_result(await self._unary(self._stub.Append, request, deadline))
        retrying = self._retry_policy.start()
        while True:
            outcome = await self._coalesced_append(self._appends, request, deadline)
            if isinstance(outcome, pb.AppendResponse):
                return to_append_result(outcome)
            await asyncio.sleep(append_retry_delay(retrying, outcome))

    async def _coalesced_append(
        self,
        coalescer: AppendCoalescer[asyncio.Future[_Outcome]],
        request: pb.AppendRequest,
        deadline: float,
    ) -> pb.AppendResponse | Exception:
        """One attempt: a place in the next call, sent this loop turn if a call is free."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Outcome] = loop.create_future()
        item = QueuedAppend(request, loop.time() + deadline, waiter)
        if coalescer.queue(item):
            loop.call_soon(self._flush_appends)
        timer = loop.call_at(item.deadline, _expire, item.waiter)
        try:
            outcome = await item.waiter  # cancelling the caller cancels it: the batch skips it
        finally:
            timer.cancel()
        if isinstance(outcome, SendAlone):
            return await self._append_call(request, deadline)
        return outcome

    async def _append_call(
        self, request: pb.AppendRequest, deadline: float
    ) -> pb.AppendResponse | Exception:
        try:
            return await self._stub.Append(request, timeout=deadline)
        except Exception as exc:  # the caller maps, retries or raises it
            return exc

    def _flush_appends(self) -> None:
        assert self._appends is not None
        self._send_batches(self._appends.flush())

    def _send_batches(self, batches: list[list[QueuedAppend[asyncio.Future[_Outcome]]]]) -> None:
        for batch in batches:
            # A task of its own, so that no caller's cancellation cancels the call.
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            self._batch_calls.add(task)
            task.add_done_callback(self._batch_calls.discard)

    async def _send_batch(self, batch: list[QueuedAppend[asyncio.Future[_Outcome]]]) -> None:
        coalescer = self._appends
        assert coalescer is not None
        # Each caller keeps its own deadline (see _expire); the call lasts for the longest.
        timeout = max(
            0.001, max(item.deadline for item in batch) - asyncio.get_running_loop().time()
        )
        outcomes: list[_Outcome]
        try:
            if len(batch) == 1:
                outcomes = [await self._append_call(batch[0].request, timeout)]
            else:
                try:
                    response = await self._stub.AppendBatch(
                        coalescer.batch_request(batch), timeout=timeout
                    )
                except Exception as exc:  # the callers map, retry or raise it
                    outcomes = coalescer.failed(batch, exc)
                else:
                    outcomes = coalescer.outcomes(batch, response)
            for item, outcome in zip(batch, outcomes, strict=True):
                if not item.waiter.done():
                    item.waiter.set_result(outcome)
        finally:
            for item in batch:  # only when this task was cancelled (the loop is ending)
                item.waiter.cancel()
            self._send_batches(coalescer.call_done())

    async def append_many(
        self, items: Iterable[Append], *, timeout: float | None = None
    ) -> list[AppendResult | LetheError]:
        """Pipeline many appends on one call; see :meth:`lethedb.Client.append_many`."""
        pipeline = AppendPipeline(items)
        deadline = self._timeout_for(timeout)
        retrying = self._retry_policy.start()
        while pipeline.pending:
            call = self._stub.AppendStream(iter(pipeline.requests()), timeout=deadline)
            try:
                async for response in call:
                    pipeline.acknowledge(response)
                pipeline.stream_ended()
            except grpc.RpcError as exc:
                delay = pipeline.retry_delay(exc, retrying)
                if delay is not None:
                    await asyncio.sleep(delay)
            finally:
                call.cancel()
        return pipeline.results()

    async def commit(
        self,
        appends: Sequence[Append],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> CommitResult:
        """Append to several streams atomically; see :meth:`lethedb.Client.commit`."""
        request = build_commit_request(appends, idempotency_key)
        deadline = self._timeout_for(timeout)
        response = await self._unary(self._stub.Commit, request, deadline)
        return to_commit_result(response, len(request.appends))

    def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        max_count: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate (``async for``) over one stream; see :meth:`lethedb.Client.read_stream`."""
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
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate (``async for``) over the whole log; see :meth:`lethedb.Client.read_all`."""
        cursor = AllReadCursor(build_read_all_request(after, from_position, backwards, max_count))
        return self._read(self._stub.ReadAll, cursor, self._timeout_for(timeout))

    async def forget_subject(
        self, subject_id: str, *, reason: str = "unspecified", timeout: float | None = None
    ) -> SubjectReceipt:
        """Forget a data subject (right to erasure); see :meth:`lethedb.Client.forget_subject`."""
        request = build_forget_subject_request(subject_id, reason)
        deadline = self._timeout_for(timeout)
        return to_subject_receipt(await self._unary(self._stub.ForgetSubject, request, deadline))

    async def get_subject(self, subject_id: str, *, timeout: float | None = None) -> SubjectReceipt:
        """What the store knows of a subject; see :meth:`lethedb.Client.get_subject`."""
        request = build_get_subject_request(subject_id)
        deadline = self._timeout_for(timeout)
        return to_subject_receipt(await self._unary(self._stub.GetSubject, request, deadline))

    def export_subject(
        self, subject_id: str, *, timeout: float | None = None
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate (``async for``) over a subject's events.

        See :meth:`lethedb.Client.export_subject`; retried only until the first event arrives.
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
    ) -> AsyncSubscription:
        """Follow the log (``async for``); see :meth:`lethedb.Client.subscribe`."""
        request = build_subscribe_request(
            after=after,
            from_start=from_start,
            from_end=from_end,
            filter=filter,
            group=group,
            member_id=member_id,
            batch_size=batch_size,
        )
        return AsyncSubscription(self, request, self._retry_policy, reconnect)

    async def get_checkpoint(self, group: str, *, timeout: float | None = None) -> int | None:
        """A consumer group's stored checkpoint, or None when it never stored one."""
        request = build_get_checkpoint_request(group)
        deadline = self._timeout_for(timeout)
        response = await self._unary(self._stub.GetCheckpoint, request, deadline)
        return response.position if response.found else None

    async def set_checkpoint(
        self, group: str, position: int, *, timeout: float | None = None
    ) -> None:
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
        await self._unary(self._stub.CommitCheckpoint, request, deadline)

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        deadline: float,
        *,
        no_retry: str | None = None,
    ) -> _Response:
        """One unary call, resending the same request on retryable failures."""
        retrying = self._retry_policy.start(no_retry=no_retry)
        while True:
            try:
                return await method(request, timeout=deadline)
            except grpc.RpcError as exc:
                await asyncio.sleep(retrying.delay_or_raise(exc))

    async def _read(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Any, pb.ReadResponse],
        cursor: ReadCursor,
        deadline: float,
    ) -> AsyncIterator[RecordedEvent]:
        retrying = self._retry_policy.start()
        while cursor.request is not None:
            call = method(cursor.request, timeout=deadline)
            try:
                async for response in call:
                    for event in cursor.track(response.events):
                        yield event
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(cursor.retry_delay(exc, retrying))
            finally:
                # Also runs when the caller stops early and the generator is
                # closed: free the server's read instead of waiting for the deadline.
                call.cancel()


class AsyncAdminClient:
    """Operator calls of ``lethedb.v1.Admin``; get one from :attr:`AsyncClient.admin`.

    The asyncio twin of :class:`lethedb._client.AdminClient`: same channel,
    timeout and retry policy as its client, same calls, awaited.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._stub = admin_pb2_grpc.AdminStub(client._channel)

    async def shred(self, *, timeout: float | None = None) -> ShredResult:
        """Run a shred epoch now; see :meth:`lethedb._client.AdminClient.shred`."""
        deadline = self._client._timeout_for(timeout)
        response = await self._client._unary(self._stub.Shred, apb.ShredRequest(), deadline)
        return to_shred_result(response)

    async def set_legal_hold(
        self,
        subject_id: str,
        reason: str,
        *,
        until: datetime | int | None = None,
        timeout: float | None = None,
    ) -> SubjectReceipt:
        """Block forgetting a subject; see :meth:`lethedb._client.AdminClient.set_legal_hold`."""
        request = build_set_legal_hold_request(subject_id, reason, until)
        deadline = self._client._timeout_for(timeout)
        response = await self._client._unary(self._stub.SetLegalHold, request, deadline)
        return to_subject_receipt(response)

    async def release_legal_hold(
        self, subject_id: str, *, timeout: float | None = None
    ) -> SubjectReceipt:
        """Release a subject's legal hold."""
        request = build_release_legal_hold_request(subject_id)
        deadline = self._client._timeout_for(timeout)
        response = await self._client._unary(self._stub.ReleaseLegalHold, request, deadline)
        return to_subject_receipt(response)

    async def backup(
        self, destination: str, *, include_keys: bool = False, timeout: float | None = None
    ) -> BackupResult:
        """Write a backup on the server's machine; never retried.

        See :meth:`lethedb._client.AdminClient.backup`.
        """
        request = build_backup_request(destination, include_keys)
        deadline = self._client._timeout_for(timeout)
        response = await self._client._unary(
            self._stub.Backup, request, deadline, no_retry=BACKUP_NOT_RETRIED
        )
        return to_backup_result(response)

    async def stats(self, *, timeout: float | None = None) -> StoreStats:
        """Counts and sizes of the store; see :meth:`lethedb._client.AdminClient.stats`."""
        deadline = self._client._timeout_for(timeout)
        response = await self._client._unary(self._stub.Stats, apb.StatsRequest(), deadline)
        return to_store_stats(response)

    async def verify(
        self,
        *,
        progress: Callable[[VerifyProgress], None] | None = None,
        timeout: float | None = None,
    ) -> VerifyProgress:
        """Walk the log on the server; see :meth:`lethedb._client.AdminClient.verify`.

        ``progress`` is a plain function, called in the event loop: keep it quick.
        """
        walk = VerifyWalk(progress)
        deadline = self._client._timeout_for(timeout)
        retrying = self._client._retry_policy.start()
        while True:
            call = self._stub.Verify(apb.VerifyRequest(), timeout=deadline)
            try:
                async for message in call:
                    if walk.track(message):
                        break
                return walk.finished()
            except grpc.RpcError as exc:
                await asyncio.sleep(walk.retry_delay(exc, retrying))
            finally:
                call.cancel()

    async def rotate_master_key(self, *, timeout: float | None = None) -> RotateResult:
        """Re-wrap live keys under a new master key version.

        See :meth:`lethedb._client.AdminClient.rotate_master_key`.
        """
        deadline = self._client._timeout_for(timeout)
        response = await self._client._unary(
            self._stub.RotateMasterKey, apb.RotateMasterKeyRequest(), deadline
        )
        return to_rotate_result(response)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client._target!r})"
