"""Coalescing of concurrent appends: fewer calls, and each caller still on its own.

The asyncio client runs against an in-memory stand-in for the generated stub
that answers Append and AppendBatch like a server (a position per append, an
in-band error where scripted) and fails whole calls on cue. What is under test
is the SDK's batching, result routing, deadlines and retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

import lethedb
from lethedb import Event
from lethedb._coalescing import (
    MAX_APPENDS_PER_BATCH,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    SEND_ALONE,
    AppendCoalescer,
    QueuedAppend,
)
from lethedb.v1 import eventstore_pb2 as pb
from tests.unit.client.grpc_fakes import FakeRpcError, unavailable

FAST = {"initial_backoff": 0.001, "max_backoff": 0.002}


class Waiter:
    def __init__(self) -> None:
        self.given_up = False

    def done(self) -> bool:
        return self.given_up


def _queued(size: int = 0) -> QueuedAppend[Waiter]:
    request = pb.AppendRequest(stream_id="s", events=[pb.ProposedEvent(data=b"x" * size)])
    return QueuedAppend(request, 0.0, Waiter())


class TestCoalescer:
    def test_a_lone_append_is_sent_at_once_and_later_ones_wait_for_a_free_call(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=1)
        assert coalescer.send_or_queue(_queued) is None
        second, third = coalescer.send_or_queue(_queued), coalescer.send_or_queue(_queued)

        assert coalescer.call_done() == [[second, third]]

    def test_queued_appends_are_flushed_as_one_batch_while_a_call_is_free(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=2)
        items = [_queued() for _ in range(3)]
        flush_due = [coalescer.queue(item) for item in items]

        assert flush_due == [True, False, False]  # one flush per loop turn
        assert coalescer.flush() == [items]

    def test_nothing_is_flushed_while_every_call_is_in_flight(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=1)
        first, second = _queued(), _queued()
        coalescer.queue(first)
        assert coalescer.flush() == [[first]]
        assert coalescer.queue(second) is False
        assert coalescer.call_done() == [[second]]

    def test_appends_whose_callers_gave_up_are_dropped_from_the_queue(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=1)
        items = [_queued() for _ in range(3)]
        for item in items:
            coalescer.queue(item)
        items[1].waiter.given_up = True

        assert coalescer.flush() == [[items[0], items[2]]]

    def test_a_batch_holds_at_most_the_servers_limit_of_appends(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=2)
        for _ in range(MAX_APPENDS_PER_BATCH + 5):
            coalescer.queue(_queued())

        assert [len(batch) for batch in coalescer.flush()] == [MAX_APPENDS_PER_BATCH, 5]

    def test_a_batch_stays_under_the_byte_budget_but_a_big_append_still_goes(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=3)
        big = _queued(MAX_BATCH_BYTES)
        small = [_queued(MAX_BATCH_BYTES // 3) for _ in range(4)]
        for item in [*small, big]:
            coalescer.queue(item)

        assert coalescer.flush() == [small[:2], small[2:], [big]]

    def test_a_batch_stays_under_the_servers_event_limit_per_call(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=3)
        per_append = MAX_BATCH_EVENTS // 4 + 1
        request = pb.AppendRequest(stream_id="s", events=[pb.ProposedEvent()] * per_append)
        items = [QueuedAppend(request, 0.0, Waiter()) for _ in range(6)]
        for item in items:
            coalescer.queue(item)

        assert coalescer.flush() == [items[:3], items[3:]]

    def test_a_server_without_append_batch_turns_batching_off(self):
        coalescer: AppendCoalescer[Waiter] = AppendCoalescer(calls_in_flight=1)
        batch = [_queued(), _queued()]
        outcomes = coalescer.failed(batch, FakeRpcError(grpc.StatusCode.UNIMPLEMENTED))

        assert outcomes == [SEND_ALONE, SEND_ALONE]
        assert coalescer.batching is False
        coalescer.queue(_queued())
        coalescer.queue(_queued())
        assert [len(b) for b in coalescer.flush()] == [1]

    def test_a_batch_answered_with_the_wrong_number_of_results_fails_every_append(self):
        batch = [_queued(), _queued()]
        response = pb.AppendBatchResponse(results=[pb.AppendResult(ok=pb.AppendResponse())])
        outcomes = AppendCoalescer.outcomes(batch, response)

        assert all(isinstance(o, lethedb.ServerError) for o in outcomes)
        assert outcomes[0] is not outcomes[1]
        assert "may or may not have been written" in str(outcomes[0])


# --- the asyncio client ------------------------------------------------------------------


def _error(name: str, code: grpc.StatusCode, message: str, actual: int = -1) -> pb.AppendError:
    return pb.AppendError(code=code.value[0], message=message, error=name, actual_version=actual)


WRONG_VERSION = _error(
    "WrongExpectedVersion", grpc.StatusCode.ABORTED, "stream s is at version 4", 4
)
OVERLOADED = _error("Overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many appends")


class FakeServer:
    """Answers Append and AppendBatch like the server; records every call.

    ``errors`` maps a stream id to the in-band errors its next appends get
    (then it succeeds); ``failures`` are raised, in turn, by the next calls;
    while ``gate`` is clear, calls wait.
    """

    def __init__(self, *, batch_supported: bool = True) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []
        self.errors: dict[str, list[pb.AppendError]] = {}
        self.failures: list[Exception] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.position = 0
        self.batch_supported = batch_supported

    def _answer(self, request: pb.AppendRequest) -> pb.AppendResult:
        pending = self.errors.get(request.stream_id)
        if pending:
            return pb.AppendResult(error=pending.pop(0))
        self.position += 1
        return pb.AppendResult(
            ok=pb.AppendResponse(first_position=self.position, last_position=self.position)
        )

    async def Append(self, request: pb.AppendRequest, timeout: float | None = None) -> Any:  # noqa: N802
        self.sent.append(("Append", [request.SerializeToString()]))
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        result = self._answer(request)
        if result.HasField("error"):
            error = result.error
            raise FakeRpcError(
                grpc.StatusCode(_code(error.code)),
                error.message,
                (("lethedb-actual-version", str(error.actual_version)),),
                name=error.error,
            )
        return result.ok

    async def AppendBatch(  # noqa: N802
        self, request: pb.AppendBatchRequest, timeout: float | None = None
    ) -> pb.AppendBatchResponse:
        self.sent.append(("AppendBatch", [a.SerializeToString() for a in request.appends]))
        await self.gate.wait()
        if not self.batch_supported:
            raise FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if self.failures:
            raise self.failures.pop(0)
        return pb.AppendBatchResponse(results=[self._answer(a) for a in request.appends])

    def methods(self) -> list[str]:
        return [method for method, _ in self.sent]


def _code(number: int) -> Any:
    return next(code.value for code in grpc.StatusCode if code.value[0] == number)


def _run(
    server: FakeServer, work: Callable[[lethedb.AsyncClient], Awaitable[Any]], **settings: Any
) -> Any:
    async def main() -> Any:
        async with lethedb.AsyncClient("127.0.0.1:9", **{**FAST, **settings}) as db:
            db._transport.events = server
            return await work(db)

    return asyncio.run(main())


def _appends(db: lethedb.AsyncClient, *streams: str, **kwargs: Any) -> Awaitable[list[Any]]:
    calls = [db.append(s, Event("E", b"x"), **kwargs) for s in streams]
    return asyncio.gather(*calls, return_exceptions=True)


async def _occupy_the_call(db: lethedb.AsyncClient) -> list[asyncio.Future[Any]]:
    """A lone append: one call in flight, the client's limit."""
    busy = [asyncio.ensure_future(db.append("a", Event("E")))]
    await asyncio.sleep(0.01)
    return busy


class TestAsyncCoalescing:
    def test_a_lone_append_is_a_plain_append_call(self):
        server = FakeServer()
        result = _run(server, lambda db: db.append("s", Event("E")))

        assert result.first_position == 1
        assert server.methods() == ["Append"]

    def test_appends_made_together_leave_together_and_each_gets_its_own_result(self):
        server = FakeServer()
        results = _run(server, lambda db: _appends(db, "a", "b", "c", "d"))

        assert server.methods() == ["AppendBatch"]
        assert [r.first_position for r in results] == [1, 2, 3, 4]

    def test_appends_made_while_a_call_is_in_flight_wait_and_then_share_one_call(self):
        server = FakeServer()
        server.gate.clear()

        async def work(db: lethedb.AsyncClient) -> list[Any]:
            first = asyncio.ensure_future(db.append("a", Event("E")))
            await asyncio.sleep(0.01)
            second = asyncio.ensure_future(db.append("b", Event("E")))
            await asyncio.sleep(0.01)
            rest = asyncio.ensure_future(_appends(db, "c", "d", "e"))
            await asyncio.sleep(0.01)
            assert server.methods() == ["Append"]  # one call in flight: the rest wait
            server.gate.set()
            return [await first, await second, *await rest]

        results = _run(server, work)

        assert server.methods() == ["Append", "AppendBatch"]
        assert len(server.sent[1][1]) == 4
        assert sorted(r.first_position for r in results) == [1, 2, 3, 4, 5]

    def test_an_append_error_fails_only_its_caller_with_the_unary_exception(self):
        server = FakeServer()
        server.errors["bad"] = [WRONG_VERSION]
        outcomes = _run(server, lambda db: _appends(db, "a", "bad", "c"))

        assert server.methods() == ["AppendBatch"]
        ok_a, refused, ok_c = outcomes
        assert isinstance(refused, lethedb.WrongExpectedVersion)
        assert refused.actual_version == 4
        assert str(refused) == "stream s is at version 4"
        assert (ok_a.first_position, ok_c.first_position) == (1, 2)

    def test_a_retryable_append_error_is_retried_for_its_caller_alone(self):
        server = FakeServer()
        server.errors["busy"] = [OVERLOADED]
        outcomes = _run(server, lambda db: _appends(db, "a", "busy", "c"))

        assert all(isinstance(o, lethedb.AppendResult) for o in outcomes)
        retried = server.sent[1][1]
        assert retried == [server.sent[0][1][1]]  # the same bytes, idempotency key included

    def test_a_failed_batch_call_is_retried_for_every_caller_with_the_same_bytes(self):
        server = FakeServer()
        server.failures = [unavailable()]
        outcomes = _run(server, lambda db: _appends(db, "a", "b", "c"))

        assert all(isinstance(o, lethedb.AppendResult) for o in outcomes)
        first_attempt = server.sent[0][1]
        resent = [request for _, requests in server.sent[1:] for request in requests]
        assert sorted(resent) == sorted(first_attempt)

    def test_retries_exhausted_raise_unavailable_in_every_caller(self):
        server = FakeServer()
        server.failures = [unavailable() for _ in range(10)]
        outcomes = _run(server, lambda db: _appends(db, "a", "b"), max_retries=1)

        assert all(isinstance(o, lethedb.Unavailable) for o in outcomes)
        assert outcomes[0] is not outcomes[1]

    def test_a_refused_batch_call_is_not_retried(self):
        server = FakeServer()
        server.failures = [FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "needs writer")]
        outcomes = _run(server, lambda db: _appends(db, "a", "b"))

        assert all(isinstance(o, lethedb.PermissionDenied) for o in outcomes)
        assert server.methods() == ["AppendBatch"]

    def test_a_queued_caller_gets_deadline_exceeded_at_its_own_deadline(self):
        server = FakeServer()
        server.gate.clear()

        async def work(db: lethedb.AsyncClient) -> list[Any]:
            busy = await _occupy_the_call(db)
            hasty = asyncio.ensure_future(db.append("c", Event("E"), timeout=0.05))
            patient = asyncio.ensure_future(db.append("d", Event("E")))
            results = await asyncio.gather(hasty, return_exceptions=True)
            server.gate.set()
            return [*results, await patient, *await asyncio.gather(*busy)]

        hasty, patient, *busy = _run(server, work, max_retries=0)

        assert isinstance(hasty, lethedb.DeadlineExceeded)
        assert isinstance(patient, lethedb.AppendResult)
        assert all(isinstance(r, lethedb.AppendResult) for r in busy)

    def test_a_cancelled_caller_leaves_the_batch_to_the_others(self):
        server = FakeServer()
        server.gate.clear()

        async def work(db: lethedb.AsyncClient) -> list[Any]:
            busy = await _occupy_the_call(db)
            queued = [asyncio.ensure_future(db.append(s, Event("E"))) for s in ("c", "d", "e")]
            await asyncio.sleep(0.01)
            queued[1].cancel()
            server.gate.set()
            return await asyncio.gather(*busy, *queued, return_exceptions=True)

        outcomes = _run(server, work)

        assert isinstance(outcomes[2], asyncio.CancelledError)
        assert [isinstance(o, lethedb.AppendResult) for o in outcomes] == [1, 1, 0, 1]
        assert len(server.sent[1][1]) == 2  # the cancelled append was never sent

    def test_a_server_without_append_batch_gets_plain_appends(self):
        server = FakeServer(batch_supported=False)
        results = _run(server, lambda db: _appends(db, "a", "b", "c"))

        assert all(isinstance(r, lethedb.AppendResult) for r in results)
        assert server.methods() == ["AppendBatch", "Append", "Append", "Append"]

    def test_coalescing_off_sends_every_append_alone(self):
        server = FakeServer()
        _run(server, lambda db: _appends(db, "a", "b", "c"), coalesce_appends=False)

        assert server.methods() == ["Append", "Append", "Append"]

    def test_coalesce_appends_must_be_a_bool(self):
        with pytest.raises(lethedb.ValidationError, match="coalesce_appends"):
            lethedb.Client("127.0.0.1:9", coalesce_appends="yes")  # type: ignore[arg-type]
