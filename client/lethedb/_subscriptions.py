"""Subscriptions: the blocking and the asyncio follower of the log (I/O only).

What to send, what a message means, where to resume and how long to wait all
come from :mod:`lethedb._subscription_state` (:class:`SubscriptionCursor`,
:class:`SubscriptionState`); this module opens the calls, through the client's
transport, waits and reconnects. The two classes are written out each, not
generated: a thread and a task wait, wake and get cancelled differently.

A subscription ends only when the caller closes it or on an error that a
reconnect cannot cure (the server refused it, or another subscription took
over its group member id). Losing the connection is not such an error: it
reconnects with backoff and resumes after the last position it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING, Self

import grpc
import grpc.aio

from lethedb._closing import AsyncClosingContext, ClosingContext
from lethedb._cluster import Prefer
from lethedb._models import CaughtUp, Checkpoint, RecordedEvent
from lethedb._subscription_state import (
    SubscriptionCursor,
    SubscriptionItem,
    SubscriptionState,
)
from lethedb.v1 import eventstore_pb2 as pb

if TYPE_CHECKING:
    from lethedb._async_transport import AsyncTransport
    from lethedb._transport import Transport

__all__ = ["AsyncSubscription", "Subscription"]


class Subscription(SubscriptionState, ClosingContext):
    """A live follower of the log; iterate it, and close it (or use ``with``).

    Iterating yields, in log order, each :class:`~lethedb.RecordedEvent` the
    subscription selects, and :class:`~lethedb.Checkpoint` and
    :class:`~lethedb.CaughtUp` messages, which say how far the log has been
    read even when a filter skipped every event (save their ``position`` as
    your progress)::

        with db.subscribe(after=saved, filter=SubscriptionFilter(event_types=("UserRegistered",),
                                                                  include_erasures=True)) as sub:
            for item in sub:
                match item:
                    case RecordedEvent(event_type="$subject.forgotten"):
                        forget(item.json()["subject_id"])
                    case RecordedEvent():
                        apply(item)
                    case Checkpoint(position) | CaughtUp(position):
                        pass  # nothing to apply; progress still moves
                save(sub.position)

    Heartbeats and group assignments are handled inside (the current one is
    :attr:`assignment`). A lost connection is re-established with backoff and
    delivery resumes after the last position received: the caller sees no
    gap and no duplicate. :meth:`batches` yields the same items with events
    grouped as the server sent them, plus the group assignments.

    One thread iterates a subscription; :meth:`close` may be called from any
    thread and ends the iteration.
    """

    def __init__(
        self,
        transport: Transport,
        request: pb.SubscribeRequest,
        reconnect: bool,
        prefer: Prefer | None = None,
    ) -> None:
        super().__init__(SubscriptionCursor(request, transport.retry, reconnect=reconnect))
        self._transport = transport
        self._prefer = prefer
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._call: grpc.CallIterator[pb.SubscribeResponse] | None = None
        self._source = self._receive()

    def _receive(self) -> Generator[SubscriptionItem, None, None]:
        cursor = self._cursor
        while True:
            with self._lock:
                if self._closed:
                    return
                node = self._transport.reader(self._prefer)
                self._address = node.address
                call = node.events.Subscribe(cursor.request())
                self._call = call
            try:
                for response in call:
                    item = cursor.take(response)
                    if item is not None:
                        yield item
                delay = cursor.retry_delay(None)
            except grpc.RpcError as exc:
                if self._closed:
                    return
                self._transport.observe(node.address, exc)
                delay = cursor.retry_delay(exc)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]
            if self._wakeup.wait(delay):
                return  # closed while waiting to reconnect

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> RecordedEvent | Checkpoint | CaughtUp:
        while not self._closed:
            event = self._pop_pending()
            if event is not None:
                return event
            item = self._flatten(next(self._source))
            if item is not None:
                return item
        raise StopIteration

    def batches(self) -> Generator[SubscriptionItem, None, None]:
        """The same stream as iterating, message by message.

        Events come as lists (a batch as the server sent it, up to
        ``batch_size`` events), then :class:`~lethedb.Checkpoint`,
        :class:`~lethedb.CaughtUp` and :class:`~lethedb.GroupAssignment`
        items. Events already taken out of a batch by ``next()`` are not
        repeated. Useful to apply a batch in one transaction.
        """
        pending = self._take_pending()
        if pending:
            yield pending
        while not self._closed:
            item = next(self._source, None)
            if item is None:
                return
            yield self._delivered(item)

    def commit(self, position: int | None = None, *, timeout: float | None = None) -> bool:
        """Tell the server this group member has handled everything up to ``position``.

        Default: the last position delivered (:attr:`position`). Sends the
        member id and the generation of the latest assignment. Returns whether
        the server accepted it: False after a rebalance (a newer generation),
        when the events concerned are being delivered again anyway. The
        group's stored checkpoint is the lowest position its live members
        committed. Raises ValidationError for a subscription without a group.
        """
        request = self._commit_request(position)
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = transport.unary(
            lambda node: node.events.CommitCheckpoint, request, deadline, at=self._serving
        )
        return response.accepted

    def close(self) -> None:
        """End the subscription (and leave the group); safe from any thread, idempotent."""
        with self._lock:
            self._closed = True
            call = self._call
        self._wakeup.set()
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]
        with contextlib.suppress(ValueError):  # being iterated by another thread right now
            self._source.close()


class AsyncSubscription(SubscriptionState, AsyncClosingContext):
    """The asyncio twin of :class:`Subscription`: ``async for``, ``await commit()``,
    ``await close()`` and ``async with``; same items, same reconnects."""

    def __init__(
        self,
        transport: AsyncTransport,
        request: pb.SubscribeRequest,
        reconnect: bool,
        prefer: Prefer | None = None,
    ) -> None:
        super().__init__(SubscriptionCursor(request, transport.retry, reconnect=reconnect))
        self._transport = transport
        self._prefer = prefer
        self._wakeup: asyncio.Event | None = None
        self._call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse] | None = (
            None
        )
        self._source = self._receive()

    async def _receive(self) -> AsyncGenerator[SubscriptionItem, None]:
        cursor = self._cursor
        self._wakeup = wakeup = asyncio.Event()
        while not self._closed:
            node = self._transport.reader(self._prefer)
            self._address = node.address
            call = node.events.Subscribe(cursor.request())
            self._call = call
            try:
                async for response in call:
                    item = cursor.take(response)
                    if item is not None:
                        yield item
                delay = cursor.retry_delay(None)
            except grpc.RpcError as exc:
                if self._closed:
                    return
                self._transport.observe(node.address, exc)
                delay = cursor.retry_delay(exc)
            except asyncio.CancelledError:
                # grpc.aio raises this for a call cancelled by close(); a
                # cancellation of the consuming task itself goes on up.
                task = asyncio.current_task()
                if self._closed and (task is None or not task.cancelling()):
                    return
                raise
            finally:
                call.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), delay)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RecordedEvent | Checkpoint | CaughtUp:
        while not self._closed:
            event = self._pop_pending()
            if event is not None:
                return event
            try:
                received = await anext(self._source)
            except StopAsyncIteration:
                break
            item = self._flatten(received)
            if item is not None:
                return item
        raise StopAsyncIteration

    async def batches(self) -> AsyncGenerator[SubscriptionItem, None]:
        """Message by message; see :meth:`Subscription.batches`."""
        pending = self._take_pending()
        if pending:
            yield pending
        while not self._closed:
            item = await anext(self._source, None)
            if item is None:
                return
            yield self._delivered(item)

    async def commit(self, position: int | None = None, *, timeout: float | None = None) -> bool:
        """Commit this group member's progress; see :meth:`Subscription.commit`."""
        request = self._commit_request(position)
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = await transport.unary(
            lambda node: node.events.CommitCheckpoint, request, deadline, at=self._serving
        )
        return response.accepted

    async def close(self) -> None:
        """End the subscription (and leave the group); idempotent."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._call is not None:
            self._call.cancel()
        with contextlib.suppress(RuntimeError):  # being iterated by another task right now
            await self._source.aclose()
