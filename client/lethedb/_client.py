# Generated from lethedb/_async_client.py by client/generate_sync.py: do not edit.
# Edit the asyncio source and run `make sync-client`.
"""The client: each public call with its deadline, retries and result (I/O only).

``_async_client.py`` (asyncio, on ``grpc.aio``) is the source; ``_client.py``
(blocking) is generated from it by ``client/generate_sync.py`` (``make
sync-client``), which drops ``await`` and ``async`` and gives the asyncio
calls and the ``Async`` names their blocking forms: edit the source, never
the generated file. What to send, whether to retry and where to resume come from
the sans-I/O modules (:mod:`lethedb._requests`, :mod:`lethedb._retry`,
:mod:`lethedb._cursors`, :mod:`lethedb._pipeline`, :mod:`lethedb._coalescing`);
the calls go through the client's transport.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from lethedb._admin import AdminClient
from lethedb._append_senders import AppendSender
from lethedb._closing import ClosingContext
from lethedb._cluster import Prefer, check_prefer
from lethedb._coalescing import append_retry_delay
from lethedb._connection import PemSource
from lethedb._cursors import AllReadCursor, ExportCursor, StreamReadCursor
from lethedb._exceptions import LetheError
from lethedb._models import (
    ANY,
    Append,
    AppendResult,
    CommitResult,
    Event,
    ExpectedVersion,
    RecordedEvent,
    SubjectReceipt,
    SubscriptionFilter,
)
from lethedb._pipeline import AppendPipeline
from lethedb._requests import (
    build_append_request,
    build_checkpoint_request,
    build_commit_request,
    build_export_subject_request,
    build_forget_subject_request,
    build_get_checkpoint_request,
    build_get_subject_request,
    build_read_all_request,
    build_read_stream_request,
    set_min_position,
    to_append_result,
    to_commit_result,
    to_subject_receipt,
)
from lethedb._retry import (
    DEFAULT_INITIAL_BACKOFF,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_MAX_RETRIES,
    RetryPolicy,
)
from lethedb._settings import ClientSettings
from lethedb._subscription_state import build_subscribe_request
from lethedb._subscriptions import Subscription
from lethedb._transport import Transport
from lethedb.v1 import eventstore_pb2 as pb

__all__ = ["Client"]


class Client(ClosingContext):
    """A blocking LetheDB client; safe to share between threads.

    Every call has a deadline (``timeout`` seconds per attempt) and is retried
    on UNAVAILABLE and DEADLINE_EXCEEDED with exponential backoff, resending
    the identical request, so a retried append is deduplicated by the server
    rather than written twice. ``retry`` (a :class:`~lethedb.RetryPolicy`)
    says how often and how long to wait; ``max_retries``, ``initial_backoff``
    and ``max_backoff`` are a shorthand for it (give one or the other).

    ``target`` is ``host:port`` or a connection string
    (``lethedb://host:port?tls=true&ca=/path/ca.pem``); ``tls``, ``ca``,
    ``client_cert``, ``client_key`` (paths or PEM bytes) and ``token`` (a
    bearer token, sent only over TLS or to loopback) can also be given as
    arguments. See :mod:`lethedb._connection`.

    **Clusters.** Give every node: ``lethedb://h1:50051,h2:50051,h3:50051``.
    Writes go to the leader: a follower's NotLeader redirects them there (the
    same request, idempotency key included, so nothing is written twice), and
    a node that is down is passed over for the next. Within a cluster a call
    keeps looking for a node that answers until ``timeout`` seconds after it
    started, so a failover that completes within it costs latency, not an
    error. ``prefer`` (``"leader"``, the default, ``"follower"`` or ``"any"``,
    also ``?prefer=`` in the connection string, and per read) says where
    reads go; a read's ``min_position`` makes a follower answer only once it
    holds that position (read your own writes). See :mod:`lethedb._cluster`.

    ``coalesce_appends`` (on by default): :meth:`append` calls made at the same
    time (from several threads) share calls. While an append call is in
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
        retry: RetryPolicy | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        initial_backoff: float = DEFAULT_INITIAL_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        tls: bool | None = None,
        ca: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        token: str | None = None,
        coalesce_appends: bool = True,
        prefer: Prefer | None = None,
    ) -> None:
        settings = ClientSettings(
            target,
            timeout=timeout,
            retry=retry,
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
            prefer=prefer,
        )
        self._transport = Transport(settings)
        self._appends = AppendSender(self._transport) if coalesce_appends else None
        self._admin = AdminClient(self._transport)

    @property
    def admin(self) -> AdminClient:
        """Operator calls (shred epochs, legal holds, backups, stats, verify, key rotation)."""
        return self._admin

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._transport.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._transport.settings.target!r})"

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
        transport = self._transport
        deadline = transport.deadline(timeout)
        if self._appends is None:
            response = transport.unary(
                lambda node: node.events.Append, request, deadline, write=True
            )
            return to_append_result(response)
        retrying = transport.retrying(deadline)
        while True:
            outcome = self._appends.attempt(request, deadline)
            if isinstance(outcome, pb.AppendResponse):
                return to_append_result(outcome)
            time.sleep(append_retry_delay(retrying, outcome))

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
        transport = self._transport
        deadline = transport.deadline(timeout)
        retrying = transport.retrying(deadline)
        while pipeline.pending:
            node = transport.writer()
            call = node.events.AppendStream(iter(pipeline.requests()), timeout=deadline)
            delay: float | None = None
            try:
                for response in call:
                    redirect = pipeline.acknowledge(response)
                    if redirect is not None:  # a follower: the rest goes to the leader
                        transport.observe(node.address, redirect)
                        delay = pipeline.redirect_delay(redirect, retrying)
                        break
                else:
                    pipeline.stream_ended()
                    transport.router.wrote(node.address)
            except grpc.RpcError as exc:
                transport.observe(node.address, exc)
                delay = pipeline.retry_delay(exc, retrying)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]
            if delay is not None:
                time.sleep(delay)
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
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = transport.unary(lambda node: node.events.Commit, request, deadline, write=True)
        return to_commit_result(response, len(request.appends))

    def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        max_count: int | None = None,
        min_position: int | None = None,
        prefer: Prefer | None = None,
        timeout: float | None = None,
    ) -> Iterator[RecordedEvent]:
        """Iterate over one stream's events, from ``from_version`` (inclusive).

        Without ``from_version``: from the first event, or from the last one
        when reading backwards. Arguments are checked now; the call starts on
        the first ``next()``. Raises StreamNotFound when the stream does not
        exist. ``min_position`` and ``prefer``: see the class docstring.
        """
        request = build_read_stream_request(stream_id, from_version, backwards, max_count)
        set_min_position(request, min_position)
        transport = self._transport
        return transport.read(
            lambda node: node.events.ReadStream,
            StreamReadCursor(request),
            transport.deadline(timeout),
            _prefer(prefer),
        )

    def read_all(
        self,
        *,
        after: int | None = None,
        from_position: int | None = None,
        backwards: bool = False,
        max_count: int | None = None,
        min_position: int | None = None,
        prefer: Prefer | None = None,
        timeout: float | None = None,
    ) -> Iterator[RecordedEvent]:
        """Iterate over the whole log in position order.

        Start strictly ``after`` a position (a saved checkpoint) or
        ``from_position`` inclusive; with neither, from the start (or from the
        end when reading backwards). ``min_position`` and ``prefer``: see the
        class docstring.
        """
        request = build_read_all_request(after, from_position, backwards, max_count)
        set_min_position(request, min_position)
        transport = self._transport
        return transport.read(
            lambda node: node.events.ReadAll,
            AllReadCursor(request),
            transport.deadline(timeout),
            _prefer(prefer),
        )

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
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = transport.unary(
            lambda node: node.events.ForgetSubject, request, deadline, write=True
        )
        return to_subject_receipt(response)

    def get_subject(
        self,
        subject_id: str,
        *,
        min_position: int | None = None,
        prefer: Prefer | None = None,
        timeout: float | None = None,
    ) -> SubjectReceipt:
        """What the store knows of a subject: erasure state, event count, legal hold.

        Asked of the leader, ``receipt.nodes`` says how far the erasure has
        reached on each node of the cluster.
        """
        request = build_get_subject_request(subject_id)
        set_min_position(request, min_position)
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = transport.unary(
            lambda node: node.events.GetSubject, request, deadline, prefer=_prefer(prefer)
        )
        return to_subject_receipt(response)

    def export_subject(
        self,
        subject_id: str,
        *,
        min_position: int | None = None,
        prefer: Prefer | None = None,
        timeout: float | None = None,
    ) -> Iterator[RecordedEvent]:
        """Iterate over every event of a subject across all streams, decrypted, in log order.

        For the rights of access and portability; admin only. Arguments are
        checked now; the call starts on the first ``next()``. A dropped
        connection is retried only until the first event arrives: the export
        cannot resume mid-way, so a later drop is raised (start over by
        calling again). ``timeout`` bounds each attempt, that is the whole
        export, so give a large export a large one.
        """
        request = build_export_subject_request(subject_id)
        set_min_position(request, min_position)
        transport = self._transport
        return transport.read(
            lambda node: node.events.ExportSubject,
            ExportCursor(request),
            transport.deadline(timeout),
            _prefer(prefer),
        )

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
        min_position: int | None = None,
        prefer: Prefer | None = None,
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

        **Clusters.** ``prefer`` says which node serves the subscription (see
        the class docstring); when that node is lost, the subscription resumes
        on another one after the last position received (every node holds the
        same log, position for position), again with no gap and no duplicate.
        ``min_position`` makes a follower start only once it holds that position.
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
        set_min_position(request, min_position)
        return Subscription(self._transport, request, reconnect, _prefer(prefer))

    def get_checkpoint(
        self,
        group: str,
        *,
        min_position: int | None = None,
        prefer: Prefer | None = None,
        timeout: float | None = None,
    ) -> int | None:
        """A consumer group's stored checkpoint, or None when it never stored one."""
        request = build_get_checkpoint_request(group)
        set_min_position(request, min_position)
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = transport.unary(
            lambda node: node.events.GetCheckpoint, request, deadline, prefer=_prefer(prefer)
        )
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
        transport = self._transport
        deadline = transport.deadline(timeout)
        transport.unary(lambda node: node.events.CommitCheckpoint, request, deadline, write=True)


def _prefer(prefer: Prefer | None) -> Prefer | None:
    """A read's own preference, checked; None: the client's."""
    return None if prefer is None else check_prefer(prefer)
