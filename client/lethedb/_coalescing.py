"""Coalescing of one client's concurrent appends into AppendBatch calls (no I/O).

The clients' append senders (:mod:`lethedb._append_senders`) send the calls
and settle the waiters; this module decides what goes into which call.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, Generic, Protocol, TypeAlias, TypeVar

import grpc

from lethedb._exceptions import LetheError, ServerError, error_from_status
from lethedb._requests import error_from_append_error
from lethedb._retry import Retrying
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_contract import DEFAULT_MAX_REQUEST_EVENTS, MAX_APPENDS_PER_BATCH

# Most appends coalesced into one AppendBatch call: the server's limit,
# MAX_APPENDS_PER_BATCH (lethedb_contract).
#: Most request bytes coalesced into one AppendBatch call, well under the
#: server's message limit (32 MiB by default). A larger append travels alone.
MAX_BATCH_BYTES: Final = 4 << 20
#: Most events coalesced into one AppendBatch call: the server's default
#: per-call limit (``max_request_events``). A larger append travels alone.
MAX_BATCH_EVENTS: Final = DEFAULT_MAX_REQUEST_EVENTS
#: Append calls one client keeps in flight before further appends wait for the
#: next batch. One: appends made while a call waits for its commit leave
#: together when it returns. With two, they went out at once as a second,
#: smaller call that the writer committed as a batch of its own, and every
#: commit costs the server about the same CPU whatever its size; at half the
#: maximum load that was a third more server CPU and a 40% higher p99
#: acknowledgement time, for the same maximum (benchmarks/README.md, "One append
#: call in flight per client").
APPEND_CALLS_IN_FLIGHT: Final = 1


class SendAlone:
    """The server does not know AppendBatch (it predates it): send a plain Append."""

    def __repr__(self) -> str:
        return "SEND_ALONE"


SEND_ALONE: Final = SendAlone()

#: What one attempt of a coalesced append comes back with: the server's answer,
#: the append's own error (a LetheError), the failure of the whole call (a
#: grpc.RpcError, for the retry policy to map and judge exactly as a unary
#: Append's; any other exception is raised as the unary call would raise it),
#: or SEND_ALONE.
AppendOutcome: TypeAlias = "pb.AppendResponse | Exception | SendAlone"


class _Waiter(Protocol):
    def done(self) -> bool: ...


_W = TypeVar("_W", bound=_Waiter)


class QueuedAppend(Generic[_W]):
    """One caller's append waiting for the next batch; ``waiter`` receives its outcome."""

    __slots__ = ("deadline", "events", "request", "size", "waiter")

    def __init__(self, request: pb.AppendRequest, deadline: float, waiter: _W) -> None:
        self.request = request
        self.size = request.ByteSize()
        self.events = len(request.events)
        #: When the caller stops waiting, on the waiting client's clock.
        self.deadline = deadline
        self.waiter = waiter


class AppendCoalescer(Generic[_W]):
    """Smart batching of one client's concurrent appends: fewer calls, no added delay.

    While fewer than ``calls_in_flight`` append calls are in flight, an append
    is sent at once as a plain unary Append, so a lone caller waits for
    nothing. Otherwise it is queued, and each call that completes sends
    everything queued (up to MAX_APPENDS_PER_BATCH appends, MAX_BATCH_BYTES and
    MAX_BATCH_EVENTS)
    as one AppendBatch call. Under load, the calls per second stay bounded by
    the round trip while the appends per call grow with the concurrency.

    Every append stays its caller's own: its own result or error, its own
    deadline (a caller that stops waiting is dropped from the queue, or its
    answer ignored), its own retries. A failed batch call hands the failure to
    each caller, whose retry policy judges it as for a unary Append; a retry
    resends the same request, idempotency key included, so an append the
    failed call did commit is answered from the server's idempotency store.

    No I/O here: the clients send the calls and settle the waiters. Thread-safe,
    as the blocking client uses it from its callers' threads and from gRPC's
    callback threads.
    """

    def __init__(self, calls_in_flight: int = APPEND_CALLS_IN_FLIGHT) -> None:
        self._lock = threading.Lock()
        self._queue: deque[QueuedAppend[_W]] = deque()
        self._in_flight = 0
        self._calls_in_flight = calls_in_flight
        self._flush_due = False
        #: False once the server answered UNIMPLEMENTED: appends go one per call.
        self.batching = True

    def send_or_queue(self, queued: Callable[[], QueuedAppend[_W]]) -> QueuedAppend[_W] | None:
        """None: send the append now, then report :meth:`call_done`. Else its queue entry.

        For threads, which have no common turn to wait for (the blocking client).
        """
        with self._lock:
            if self._in_flight < self._calls_in_flight and not self._queue:
                self._in_flight += 1
                return None
            item = queued()
            self._queue.append(item)
            return item

    def queue(self, item: QueuedAppend[_W]) -> bool:
        """Queue an append; True: the caller must call :meth:`flush` later in this loop turn.

        For an event loop (the asyncio client): a flush run with ``call_soon``
        sends, after the tasks that are ready now have run, everything they
        queued meanwhile. That adds no wait, and the appends of tasks woken
        together (by the answer of the previous call) leave together instead
        of the first one alone and the rest in the next call.
        """
        with self._lock:
            self._queue.append(item)
            if self._flush_due or self._in_flight >= self._calls_in_flight:
                return False
            self._flush_due = True
            return True

    def flush(self) -> list[list[QueuedAppend[_W]]]:
        """The batches to send now (each a call in flight); see :meth:`queue`."""
        with self._lock:
            self._flush_due = False
            return self._take_batches()

    def call_done(self) -> list[list[QueuedAppend[_W]]]:
        """An append call completed: the batches to send now (each a call in flight)."""
        with self._lock:
            self._in_flight -= 1
            return self._take_batches()

    def _take_batches(self) -> list[list[QueuedAppend[_W]]]:
        batches: list[list[QueuedAppend[_W]]] = []
        while self._queue and self._in_flight < self._calls_in_flight:
            batch = self._take()
            if batch:
                self._in_flight += 1
                batches.append(batch)
        return batches

    def _take(self) -> list[QueuedAppend[_W]]:
        batch: list[QueuedAppend[_W]] = []
        size = events = 0
        most = MAX_APPENDS_PER_BATCH if self.batching else 1
        queue = self._queue
        while queue and len(batch) < most:
            item = queue[0]
            if item.waiter.done():  # its caller gave up (deadline, cancellation)
                queue.popleft()
                continue
            if batch and (
                size + item.size > MAX_BATCH_BYTES or events + item.events > MAX_BATCH_EVENTS
            ):
                break
            queue.popleft()
            batch.append(item)
            size += item.size
            events += item.events
        return batch

    @staticmethod
    def batch_request(batch: Sequence[QueuedAppend[_W]]) -> pb.AppendBatchRequest:
        return pb.AppendBatchRequest(appends=[item.request for item in batch])

    @staticmethod
    def outcomes(
        batch: Sequence[QueuedAppend[_W]], response: pb.AppendBatchResponse
    ) -> list[AppendOutcome]:
        """Each append's outcome from the batch's answer: one result per append, in order."""
        if len(response.results) != len(batch):
            return [
                ServerError(
                    f"the server answered an AppendBatch of {len(batch)} append(s) with "
                    f"{len(response.results)} result(s); this append may or may not have been "
                    "written (retrying with the same idempotency key is safe)"
                )
                for _ in batch
            ]
        return [
            result.ok
            if result.WhichOneof("result") == "ok"
            else error_from_append_error(result.error)
            for result in response.results
        ]

    def failed(self, batch: Sequence[QueuedAppend[_W]], exc: Exception) -> list[AppendOutcome]:
        """The whole AppendBatch call failed: every append gets the failure (or SEND_ALONE)."""
        code = getattr(exc, "code", None)
        if (
            isinstance(exc, grpc.RpcError)
            and callable(code)
            and code() == grpc.StatusCode.UNIMPLEMENTED
        ):
            self.batching = False
            return [SEND_ALONE for _ in batch]
        return [exc for _ in batch]


def append_retry_delay(retrying: Retrying, outcome: Exception) -> float:
    """The wait before retrying a failed append attempt; raises when it is not retried."""
    if isinstance(outcome, grpc.RpcError):
        return retrying.delay_or_raise(outcome)
    delay = retrying.next_delay(outcome) if isinstance(outcome, LetheError) else None
    if delay is None:
        raise outcome
    return delay


def deadline_exceeded() -> LetheError:
    """A queued append's deadline passed on the client: what gRPC would have raised."""
    return error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
