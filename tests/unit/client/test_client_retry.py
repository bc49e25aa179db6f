"""Retries: which failures are retried, how long the SDK waits, what it resends.

The clients run against in-memory stand-ins for the generated gRPC stub that
answer like a server and fail on cue with gRPC errors. What is under test is
the clients' retry and resume logic, not the stand-ins.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import lethedb
from lethedb import NO_STREAM, Append, Event
from lethedb._retry import RetryPolicy
from lethedb.v1 import eventstore_pb2 as pb
from tests.unit.client.grpc_fakes import AsyncCall, FakeRpcError, SyncCall, unavailable

FAST = {"initial_backoff": 0.001, "max_backoff": 0.002}


def deadline() -> FakeRpcError:
    return FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


def _ok(position: int) -> pb.AppendResponse:
    return pb.AppendResponse(first_position=position, last_position=position)


class FakeLog:
    """Serves reads over a list of events like the server does, breaking the call on cue.

    ``drops`` lists, per call, after how many events that call fails with
    UNAVAILABLE (None: the call completes).
    """

    def __init__(self, count: int, drops: list[int | None], batch: int = 3) -> None:
        self.events = [
            pb.RecordedEvent(
                position=i + 1,
                stream_id="s",
                stream_version=i,
                event_id=bytes(16),
                event_type="E",
                data=str(i).encode(),
            )
            for i in range(count)
        ]
        self.drops = drops
        self.batch = batch
        self.requests: list[Any] = []

    def select(self, request: Any) -> list[pb.RecordedEvent]:
        self.requests.append(request)
        events = self.events[::-1] if request.backwards else list(self.events)
        if isinstance(request, pb.ReadStreamRequest):
            if request.HasField("from_version"):
                start = request.from_version
                events = [
                    e
                    for e in events
                    if (
                        e.stream_version <= start
                        if request.backwards
                        else e.stream_version >= start
                    )
                ]
        else:
            which = request.WhichOneof("start")
            if which is not None:
                bound = getattr(request, which)
                inclusive = which == "from_position"
                events = [
                    e for e in events if _beyond(e.position, bound, request.backwards, inclusive)
                ]
        return events[: request.max_count] if request.max_count else events

    def batches(self, request: Any) -> Iterator[pb.ReadResponse | FakeRpcError]:
        events = self.select(request)
        drop = self.drops.pop(0) if self.drops else None
        if drop is not None:
            events = events[:drop]
        for i in range(0, len(events), self.batch):
            yield pb.ReadResponse(events=events[i : i + self.batch])
        if drop is not None:
            yield unavailable()


def _beyond(position: int, bound: int, backwards: bool, inclusive: bool) -> bool:
    if inclusive and position == bound:
        return True
    return position < bound if backwards else position > bound


class FakeStub:
    """Stands in for the generated stub; records every request it is sent."""

    def __init__(
        self,
        *,
        append: list[Any] | None = None,
        log: FakeLog | None = None,
        pipeline: list[list[Any]] | None = None,
        call_type: type[SyncCall] = SyncCall,
    ) -> None:
        self.append_outcomes = append or []
        self.append_sent: list[bytes] = []
        self.timeouts: list[float | None] = []
        self.log = log
        self.pipeline_outcomes = pipeline or []
        self.pipeline_sent: list[list[str]] = []
        self.calls: list[SyncCall] = []
        self.call_type = call_type

    def Append(self, request: pb.AppendRequest, timeout: float | None = None) -> Any:  # noqa: N802
        self.append_sent.append(request.SerializeToString())
        self.timeouts.append(timeout)
        outcome = self.append_outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def ReadStream(self, request: Any, timeout: float | None = None) -> SyncCall:  # noqa: N802
        assert self.log is not None
        call = self.call_type(self.log.batches(request))
        self.calls.append(call)
        return call

    ReadAll = ReadStream

    def AppendStream(self, requests: Iterator[Any], timeout: float | None = None) -> SyncCall:  # noqa: N802
        self.pipeline_sent.append([r.idempotency_key for r in requests])
        call = self.call_type(iter(self.pipeline_outcomes.pop(0)))
        self.calls.append(call)
        return call


class AsyncFakeStub(FakeStub):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(call_type=AsyncCall, **kwargs)

    def Append(self, request: pb.AppendRequest, timeout: float | None = None) -> Any:  # noqa: N802
        result = super().Append

        async def answer() -> Any:
            return result(request, timeout)

        return answer()


def _client(stub: FakeStub, **settings: Any) -> lethedb.Client:
    client = lethedb.Client("127.0.0.1:9", **{**FAST, **settings})
    client._transport.events = stub
    return client


def _run_async(stub: AsyncFakeStub, work: Any, **settings: Any) -> Any:
    async def main() -> Any:
        async with lethedb.AsyncClient("127.0.0.1:9", **{**FAST, **settings}) as db:
            db._transport.events = stub
            return await work(db)

    return asyncio.run(main())


class TestRetryPolicy:
    def test_delays_grow_exponentially_up_to_the_cap(self):
        policy = RetryPolicy(
            max_retries=6, initial_backoff=0.1, max_backoff=1.0, random=lambda: 1.0
        )
        assert list(policy.delays()) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])

    def test_jitter_keeps_each_delay_between_half_and_all_of_its_step(self):
        low = RetryPolicy(max_retries=3, initial_backoff=0.1, max_backoff=1.0, random=lambda: 0.0)
        assert list(low.delays()) == pytest.approx([0.05, 0.1, 0.2])
        jittered = RetryPolicy(max_retries=50, initial_backoff=0.1, max_backoff=0.1)
        assert all(0.05 <= d <= 0.1 for d in jittered.delays())
        assert len(set(jittered.delays())) > 1

    def test_there_are_as_many_delays_as_retries(self):
        assert len(list(RetryPolicy(max_retries=0, initial_backoff=1, max_backoff=1).delays())) == 0
        assert len(list(RetryPolicy(max_retries=4, initial_backoff=1, max_backoff=1).delays())) == 4

    @pytest.mark.parametrize(
        ("error", "retryable"),
        [
            (lethedb.Unavailable("x"), True),
            (lethedb.DeadlineExceeded("x"), True),
            (lethedb.WrongExpectedVersion("x"), False),
            (lethedb.ValidationError("x"), False),
            (lethedb.StorageFull("x"), False),
            (lethedb.Unauthenticated("x"), False),
            (lethedb.ServerError("x"), False),
        ],
    )
    def test_only_unavailable_and_deadline_exceeded_are_retried(self, error, retryable):
        assert RetryPolicy.is_retryable(error) is retryable

    def test_giving_up_notes_the_number_of_attempts(self):
        retrying = RetryPolicy(max_retries=2, initial_backoff=0.1, max_backoff=1).start()
        error = lethedb.Unavailable("down")
        assert retrying.next_delay(error) is not None
        assert retrying.next_delay(error) is not None
        assert retrying.next_delay(error) is None
        assert error.__notes__ == ["lethedb: gave up after 3 attempts"]

    def test_reset_restores_the_whole_budget(self):
        retrying = RetryPolicy(max_retries=1, initial_backoff=0.1, max_backoff=1).start()
        assert retrying.next_delay(lethedb.Unavailable("x")) is not None
        retrying.reset()
        assert retrying.next_delay(lethedb.Unavailable("x")) is not None


class TestAppendRetries:
    def test_retry_reuses_the_same_request_bytes(self):
        stub = FakeStub(append=[unavailable(), deadline(), _ok(1)])
        with _client(stub) as db:
            result = db.append("s", [Event("A", {"n": 1}), Event("B", b"x")])
        assert result.first_position == 1
        assert len(stub.append_sent) == 3
        assert len(set(stub.append_sent)) == 1

    def test_each_attempt_gets_the_full_timeout(self):
        stub = FakeStub(append=[unavailable(), _ok(1)])
        with _client(stub, timeout=3.0) as db:
            db.append("s", Event("A"))
        assert stub.timeouts == [3.0, 3.0]

    def test_a_per_call_timeout_overrides_the_client_default(self):
        stub = FakeStub(append=[_ok(1)])
        with _client(stub, timeout=3.0) as db:
            db.append("s", Event("A"), timeout=0.5)
        assert stub.timeouts == [0.5]

    def test_a_refused_append_is_not_retried(self):
        refused = FakeRpcError(
            grpc.StatusCode.ABORTED,
            "found version 3",
            (("lethedb-error", "WrongExpectedVersion"), ("lethedb-actual-version", "3")),
        )
        stub = FakeStub(append=[refused, _ok(1)])
        with _client(stub) as db, pytest.raises(lethedb.WrongExpectedVersion) as info:
            db.append("s", Event("A"), expected_version=NO_STREAM)
        assert info.value.actual_version == 3
        assert info.value.__cause__ is refused
        assert len(stub.append_sent) == 1

    def test_unavailable_is_raised_once_retries_are_exhausted(self):
        stub = FakeStub(append=[unavailable() for _ in range(3)])
        with _client(stub, max_retries=2) as db, pytest.raises(lethedb.Unavailable) as info:
            db.append("s", Event("A"))
        assert len(stub.append_sent) == 3
        assert "gave up after 3 attempts" in info.value.__notes__[0]

    def test_zero_max_retries_makes_a_single_attempt(self):
        stub = FakeStub(append=[deadline()])
        with _client(stub, max_retries=0) as db, pytest.raises(lethedb.DeadlineExceeded):
            db.append("s", Event("A"))
        assert len(stub.append_sent) == 1

    def test_a_policy_passed_as_retry_governs_the_calls(self):
        stub = FakeStub(append=[unavailable() for _ in range(3)])
        policy = lethedb.RetryPolicy(max_retries=2, initial_backoff=0.001, max_backoff=0.002)
        with lethedb.Client("127.0.0.1:9", retry=policy) as db:
            db._transport.events = stub
            with pytest.raises(lethedb.Unavailable) as info:
                db.append("s", Event("A"))
        assert len(stub.append_sent) == 3
        assert "gave up after 3 attempts" in info.value.__notes__[0]

    def test_the_async_client_takes_a_policy_as_retry_too(self):
        stub = AsyncFakeStub(append=[deadline()])

        async def main() -> None:
            async with lethedb.AsyncClient(
                "127.0.0.1:9", retry=lethedb.RetryPolicy(max_retries=0)
            ) as db:
                db._transport.events = stub
                await db.append("s", Event("A"))

        with pytest.raises(lethedb.DeadlineExceeded):
            asyncio.run(main())
        assert len(stub.append_sent) == 1

    def test_a_policy_and_the_retry_keywords_together_are_refused(self):
        with pytest.raises(lethedb.ValidationError, match="retry and max_retries"):
            lethedb.Client("127.0.0.1:9", retry=lethedb.RetryPolicy(), max_retries=2)

    def test_a_retry_that_is_not_a_policy_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match="retry is an int"):
            lethedb.Client("127.0.0.1:9", retry=3)  # type: ignore[arg-type]

    def test_the_default_policy_is_the_keywords_defaults(self):
        policy = lethedb.RetryPolicy()
        assert (policy.max_retries, policy.initial_backoff, policy.max_backoff) == (5, 0.05, 2.0)
        assert repr(policy) == "RetryPolicy(max_retries=5, initial_backoff=0.05, max_backoff=2.0)"

    def test_async_retry_reuses_the_same_request_bytes(self):
        stub = AsyncFakeStub(append=[unavailable(), unavailable(), _ok(7)])
        result = _run_async(stub, lambda db: db.append("s", Event("A", {"n": 1})))
        assert result.first_position == 7
        assert len(stub.append_sent) == 3
        assert len(set(stub.append_sent)) == 1

    def test_async_refused_append_raises_the_mapped_error(self):
        refused = FakeRpcError(
            grpc.StatusCode.FAILED_PRECONDITION, "gone", (("lethedb-error", "SubjectForgotten"),)
        )
        stub = AsyncFakeStub(append=[refused])
        with pytest.raises(lethedb.SubjectForgotten):
            _run_async(stub, lambda db: db.append("s", Event("A", subject_id="x")))


def _read_stream(db: lethedb.Client, **kwargs: Any) -> list[int]:
    return [e.stream_version for e in db.read_stream("s", **kwargs)]


class TestReadResume:
    def test_a_dropped_read_resumes_after_the_last_event_with_no_gap_or_duplicate(self):
        log = FakeLog(10, drops=[4, 2, None])
        with _client(FakeStub(log=log)) as db:
            assert _read_stream(db) == list(range(10))
        assert [r.from_version for r in log.requests[1:]] == [4, 6]

    def test_a_drop_before_any_event_resends_the_identical_request(self):
        log = FakeLog(5, drops=[0, None])
        with _client(FakeStub(log=log)) as db:
            assert _read_stream(db, from_version=1) == [1, 2, 3, 4]
        assert log.requests[0] is log.requests[1]

    def test_a_backwards_read_resumes_below_the_last_event(self):
        log = FakeLog(10, drops=[3, None])
        with _client(FakeStub(log=log)) as db:
            assert _read_stream(db, backwards=True) == list(range(9, -1, -1))
        assert log.requests[1].from_version == 6
        assert log.requests[1].backwards

    def test_a_resumed_read_asks_only_for_the_remaining_count(self):
        log = FakeLog(10, drops=[4, None])
        with _client(FakeStub(log=log)) as db:
            assert _read_stream(db, from_version=2, max_count=6) == [2, 3, 4, 5, 6, 7]
        assert log.requests[1].max_count == 2

    def test_a_read_that_had_everything_it_asked_for_is_not_resent(self):
        log = FakeLog(10, drops=[3])
        with _client(FakeStub(log=log)) as db:
            assert _read_stream(db, max_count=3) == [0, 1, 2]
        assert len(log.requests) == 1

    def test_read_all_resumes_after_the_last_position(self):
        log = FakeLog(10, drops=[5, None])
        with _client(FakeStub(log=log)) as db:
            positions = [e.position for e in db.read_all(after=2)]
        assert positions == list(range(3, 11))
        assert log.requests[1].WhichOneof("start") == "after_position"
        assert log.requests[1].after_position == 7

    def test_read_all_backwards_resumes_before_the_last_position(self):
        log = FakeLog(10, drops=[2, None])
        with _client(FakeStub(log=log)) as db:
            positions = [e.position for e in db.read_all(from_position=8, backwards=True)]
        assert positions == list(range(8, 0, -1))

    def test_progress_between_drops_restores_the_retry_budget(self):
        log = FakeLog(10, drops=[1, 1, 1, 1, None])
        with _client(FakeStub(log=log), max_retries=1) as db:
            assert _read_stream(db) == list(range(10))

    def test_drops_without_progress_exhaust_the_retries(self):
        log = FakeLog(10, drops=[2, 0, 0, 0])
        with _client(FakeStub(log=log), max_retries=2) as db:
            seen: list[int] = []
            with pytest.raises(lethedb.Unavailable):
                seen.extend(e.stream_version for e in db.read_stream("s"))
        assert seen == [0, 1]

    def test_a_refused_read_is_raised_not_retried(self):
        log = FakeLog(1, drops=[])
        stub = FakeStub(log=log)
        missing = FakeRpcError(
            grpc.StatusCode.NOT_FOUND, "no such stream", (("lethedb-error", "StreamNotFound"),)
        )
        stub.ReadStream = lambda request, timeout=None: SyncCall(iter([missing]))
        with _client(stub) as db, pytest.raises(lethedb.StreamNotFound):
            list(db.read_stream("nope"))

    def test_stopping_early_cancels_the_call(self):
        log = FakeLog(10, drops=[None])
        stub = FakeStub(log=log)
        with _client(stub) as db:
            events = db.read_stream("s")
            next(events)
            events.close()
        assert stub.calls[0].cancelled

    def test_async_read_resumes_with_no_gap_or_duplicate(self):
        log = FakeLog(10, drops=[4, 0, 7, None])

        async def read(db: lethedb.AsyncClient) -> list[int]:
            return [e.stream_version async for e in db.read_stream("s")]

        assert _run_async(AsyncFakeStub(log=log), read) == list(range(10))

    def test_async_read_all_resumes_after_the_last_position(self):
        log = FakeLog(10, drops=[5, None])

        async def read(db: lethedb.AsyncClient) -> list[int]:
            return [e.position async for e in db.read_all(max_count=8)]

        assert _run_async(AsyncFakeStub(log=log), read) == list(range(1, 9))
        assert log.requests[1].max_count == 3


def _answer(index: int) -> pb.AppendResult:
    return pb.AppendResult(ok=_ok(index))


ITEMS = tuple(Append("s", Event("E"), idempotency_key=f"k{i}") for i in range(5))


class TestAppendManyReconnect:
    def test_only_unacknowledged_items_are_resent_with_their_keys(self):
        stub = FakeStub(
            pipeline=[
                [_answer(1), _answer(2), unavailable()],
                [_answer(3), _answer(4), _answer(5)],
            ]
        )
        with _client(stub) as db:
            results = db.append_many(ITEMS)
        assert stub.pipeline_sent == [["k0", "k1", "k2", "k3", "k4"], ["k2", "k3", "k4"]]
        assert [r.first_position for r in results] == [1, 2, 3, 4, 5]

    def test_generated_keys_are_the_same_on_the_resend(self):
        stub = FakeStub(pipeline=[[_answer(1), unavailable()], [_answer(2), _answer(3)]])
        with _client(stub) as db:
            db.append_many([Append("s", Event("E")) for _ in range(3)])
        first, second = stub.pipeline_sent
        assert second == first[1:]

    def test_per_item_failures_are_returned_in_their_slot_not_raised(self):
        refused = pb.AppendResult(
            error=pb.AppendError(
                code=grpc.StatusCode.ABORTED.value[0], message="found 19", actual_version=19
            )
        )
        stub = FakeStub(pipeline=[[_answer(1), refused, _answer(3)]])
        with _client(stub) as db:
            results = db.append_many(ITEMS[:3])
        assert isinstance(results[1], lethedb.WrongExpectedVersion)
        assert results[1].actual_version == 19
        assert isinstance(results[2], lethedb.AppendResult)

    def test_after_exhausted_retries_unanswered_items_hold_the_connection_error(self):
        stub = FakeStub(pipeline=[[_answer(1), unavailable()], [unavailable()], [unavailable()]])
        with _client(stub, max_retries=2) as db:
            results = db.append_many(ITEMS[:3])
        assert isinstance(results[0], lethedb.AppendResult)
        assert all(isinstance(r, lethedb.Unavailable) for r in results[1:])
        assert results[1] is not results[2]

    def test_a_call_level_refusal_fills_the_unanswered_slots_without_retrying(self):
        denied = FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "writer role needed")
        stub = FakeStub(pipeline=[[denied]])
        with _client(stub) as db:
            results = db.append_many(ITEMS[:2])
        assert all(isinstance(r, lethedb.PermissionDenied) for r in results)
        assert len(stub.pipeline_sent) == 1

    def test_a_stream_that_ends_early_marks_the_unanswered_items(self):
        stub = FakeStub(pipeline=[[_answer(1)]])
        with _client(stub) as db:
            results = db.append_many(ITEMS[:3])
        assert isinstance(results[0], lethedb.AppendResult)
        assert all(isinstance(r, lethedb.ServerError) for r in results[1:])

    def test_nothing_to_append_makes_no_call(self):
        stub = FakeStub()
        with _client(stub) as db:
            assert db.append_many([]) == []
        assert stub.pipeline_sent == []

    def test_async_resends_only_unacknowledged_items(self):
        stub = AsyncFakeStub(
            pipeline=[[_answer(1), unavailable()], [deadline()], [_answer(2), _answer(3)]]
        )
        results = _run_async(stub, lambda db: db.append_many(ITEMS[:3]))
        assert stub.pipeline_sent == [["k0", "k1", "k2"], ["k1", "k2"], ["k1", "k2"]]
        assert [r.first_position for r in results] == [1, 2, 3]


def test_backoff_never_sleeps_longer_than_max_backoff():
    policy = RetryPolicy(max_retries=20, initial_backoff=0.05, max_backoff=2.0)
    assert max(itertools.islice(policy.delays(), 20)) <= 2.0


def test_an_overloaded_server_is_retried_like_an_unavailable_one():
    """Nothing was written when the server refused for load, so a retry is safe."""
    from lethedb._exceptions import Overloaded, StorageFull
    from lethedb._retry import RetryPolicy

    assert RetryPolicy.is_retryable(Overloaded("busy"))
    assert not RetryPolicy.is_retryable(StorageFull("disk full"))
