"""The I/O of coalesced appends: one sender per client, threads or asyncio.

:class:`~lethedb._coalescing.AppendCoalescer` decides which appends share a
call; a sender sends the calls and hands each caller its outcome. The two
senders differ in substance, not only in ``await``: threads have no common
turn, so the blocking sender sends a lone append at once and starts batches
from gRPC's callback threads, while the asyncio sender flushes once per loop
turn from a task of its own. One :meth:`attempt` is one try of one append;
the client's ``append`` retries around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

import grpc

from lethedb._coalescing import (
    AppendCoalescer,
    AppendOutcome,
    QueuedAppend,
    SendAlone,
    deadline_exceeded,
)
from lethedb._exceptions import NotLeader, error_from_status
from lethedb.v1 import eventstore_pb2 as pb

if TYPE_CHECKING:
    from lethedb._async_transport import AsyncTransport
    from lethedb._transport import Transport

__all__ = ["AppendSender", "AsyncAppendSender"]

_Queued = QueuedAppend["Future[AppendOutcome]"]
_AsyncQueued = QueuedAppend["asyncio.Future[AppendOutcome]"]


class AppendSender:
    """The blocking client's coalesced appends: safe to call from many threads."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._coalescer: AppendCoalescer[Future[AppendOutcome]] = AppendCoalescer()

    def attempt(self, request: pb.AppendRequest, deadline: float) -> pb.AppendResponse | Exception:
        """One attempt: a unary Append now, or a place in the next AppendBatch."""
        coalescer = self._coalescer
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
        node = self._transport.writer()
        try:
            response = node.events.Append(request, timeout=deadline)
        except Exception as exc:  # the caller maps, retries or raises it
            self._transport.observe(node.address, exc)
            return exc
        self._transport.router.wrote(node.address)
        return response

    def _send_batches(self, batches: list[list[_Queued]]) -> None:
        """Start each batch's call; its answer is handed out from gRPC's callback thread."""
        if not batches:
            return
        node = self._transport.writer()
        stub = node.events
        for batch in batches:
            # Each caller keeps its own deadline; the call lasts for the longest.
            timeout = max(0.001, max(item.deadline for item in batch) - time.monotonic())
            call: grpc.Future[Any]
            try:
                if len(batch) == 1:
                    call = stub.Append.future(batch[0].request, timeout=timeout)
                else:
                    request = self._coalescer.batch_request(batch)
                    call = stub.AppendBatch.future(request, timeout=timeout)
            except Exception as exc:  # not even started (a closed client): hand it out
                self._settle(batch, [exc for _ in batch])
                self._send_batches(self._coalescer.call_done())
                continue
            call.add_done_callback(functools.partial(self._batch_done, batch, node.address))

    def _batch_done(self, batch: list[_Queued], address: str, call: grpc.Future[Any]) -> None:
        coalescer = self._coalescer
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
            _observe_once(self._transport, address, outcomes)
            self._settle(batch, outcomes)
        finally:
            self._send_batches(coalescer.call_done())

    @staticmethod
    def _settle(batch: list[_Queued], outcomes: list[AppendOutcome]) -> None:
        for item, outcome in zip(batch, outcomes, strict=True):
            with contextlib.suppress(InvalidStateError):  # its caller gave up waiting
                item.waiter.set_result(outcome)


def _observe_once(
    transport: Transport | AsyncTransport, address: str, outcomes: list[AppendOutcome]
) -> None:
    """Teach the router what a batch call met: its first failure, once for the whole batch.

    A failed call hands every append the same failure, and a follower answers
    every append of a batch NotLeader; one report is enough (the router moves
    on from a node once per report). A batch with a written append came from
    the leader.
    """
    for outcome in outcomes:
        if isinstance(outcome, grpc.RpcError | NotLeader):
            transport.observe(address, outcome)
            return
    if any(isinstance(outcome, pb.AppendResponse) for outcome in outcomes):
        transport.router.wrote(address)


def _expire(waiter: asyncio.Future[AppendOutcome]) -> None:
    """A queued append's own deadline passed: its caller stops waiting, as for a unary call."""
    if not waiter.done():
        waiter.set_result(deadline_exceeded())


class AsyncAppendSender:
    """The asyncio client's coalesced appends: used from the one event loop it serves."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._transport = transport
        self._coalescer: AppendCoalescer[asyncio.Future[AppendOutcome]] = AppendCoalescer()
        self._batch_calls: set[asyncio.Task[None]] = set()

    async def attempt(
        self, request: pb.AppendRequest, deadline: float
    ) -> pb.AppendResponse | Exception:
        """One attempt: a place in the next call, sent this loop turn if a call is free."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[AppendOutcome] = loop.create_future()
        item = QueuedAppend(request, loop.time() + deadline, waiter)
        if self._coalescer.queue(item):
            loop.call_soon(self._flush)
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
        node = self._transport.writer()
        try:
            response = await node.events.Append(request, timeout=deadline)
        except Exception as exc:  # the caller maps, retries or raises it
            self._transport.observe(node.address, exc)
            return exc
        self._transport.router.wrote(node.address)
        return response

    def _flush(self) -> None:
        self._send_batches(self._coalescer.flush())

    def _send_batches(self, batches: list[list[_AsyncQueued]]) -> None:
        for batch in batches:
            # A task of its own, so that no caller's cancellation cancels the call.
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            self._batch_calls.add(task)
            task.add_done_callback(self._batch_calls.discard)

    async def _send_batch(self, batch: list[_AsyncQueued]) -> None:
        coalescer = self._coalescer
        # Each caller keeps its own deadline (see _expire); the call lasts for the longest.
        timeout = max(
            0.001, max(item.deadline for item in batch) - asyncio.get_running_loop().time()
        )
        outcomes: list[AppendOutcome]
        try:
            if len(batch) == 1:
                outcomes = [await self._append_call(batch[0].request, timeout)]
            else:
                node = self._transport.writer()
                try:
                    response = await node.events.AppendBatch(
                        coalescer.batch_request(batch), timeout=timeout
                    )
                except Exception as exc:  # the callers map, retry or raise it
                    outcomes = coalescer.failed(batch, exc)
                else:
                    outcomes = coalescer.outcomes(batch, response)
                _observe_once(self._transport, node.address, outcomes)
            for item, outcome in zip(batch, outcomes, strict=True):
                if not item.waiter.done():
                    item.waiter.set_result(outcome)
        finally:
            for item in batch:  # only when this task was cancelled (the loop is ending)
                item.waiter.cancel()
            self._send_batches(coalescer.call_done())
