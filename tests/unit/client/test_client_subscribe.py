"""The SDK's subscriptions without a server: requests, resume positions, reconnects, errors.

Scripted stand-ins for the generated stub answer Subscribe with messages and
break the call on cue; under test is the SDK's bookkeeping (where it resumes,
what the caller is handed, what is retried), not the stand-ins.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

import lethedb
from lethedb import CaughtUp, Checkpoint, RecordedEvent, SubscriptionFilter
from lethedb._exceptions import error_from_rpc_error
from lethedb._retry import RetryPolicy
from lethedb._subscription_state import SubscriptionCursor, build_subscribe_request
from lethedb.v1 import eventstore_pb2 as pb
from tests.unit.client.grpc_fakes import FakeRpcError, unavailable

FAST = {"initial_backoff": 0.001, "max_backoff": 0.002}


def events(*positions: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(
        events=pb.EventBatch(
            events=[
                pb.RecordedEvent(position=p, stream_id="s", event_id=bytes(16), event_type="E")
                for p in positions
            ]
        )
    )


def caught_up(position: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(caught_up=pb.CaughtUp(position=position))


def checkpoint(position: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(checkpoint=pb.Checkpoint(position=position))


def heartbeat(head: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(heartbeat=pb.Heartbeat(head=head))


def assignment(generation: int, restart_after: int, member: str = "m-1") -> pb.SubscribeResponse:
    return pb.SubscribeResponse(
        assignment=pb.GroupAssignment(
            group="g",
            member_id=member,
            generation=generation,
            members=[member],
            restart_after=restart_after,
        )
    )


class Call:
    """One Subscribe call: its scripted messages, then an error (or a hang, like a live call)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.cancelled = False

    def __iter__(self) -> Iterator[Any]:
        for outcome in self.script:
            if isinstance(outcome, Exception):
                raise outcome
            yield outcome
        raise FakeRpcError(grpc.StatusCode.CANCELLED, "the test ran out of script")

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        for outcome in self:
            await asyncio.sleep(0)
            yield outcome

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Stub:
    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = list(scripts)
        self.requests: list[pb.SubscribeRequest] = []
        self.calls: list[Call] = []
        self.commits: list[pb.CommitCheckpointRequest] = []

    def Subscribe(self, request: pb.SubscribeRequest) -> Call:  # noqa: N802
        self.requests.append(request)
        call = Call(self.scripts.pop(0))
        self.calls.append(call)
        return call

    def CommitCheckpoint(self, request: pb.CommitCheckpointRequest, timeout: float) -> Any:  # noqa: N802
        self.commits.append(request)
        return pb.CommitCheckpointResponse(position=request.position, accepted=True)


def client_with(stub: Stub) -> lethedb.Client:
    db = lethedb.Client("localhost:1", **FAST)
    db._transport.events = stub  # type: ignore[assignment]
    return db


def take(subscription: lethedb.Subscription, count: int) -> list[Any]:
    return [next(subscription) for _ in range(count)]


# -- requests --------------------------------------------------------------------------


def request(**overrides: Any) -> pb.SubscribeRequest:
    arguments: dict[str, Any] = {
        "after": None,
        "from_start": False,
        "from_end": False,
        "filter": None,
        "group": None,
        "member_id": None,
        "batch_size": None,
    }
    arguments.update(overrides)
    return build_subscribe_request(**arguments)


def test_without_a_start_the_subscription_starts_at_the_beginning():
    assert request().WhichOneof("start") == "from_start"
    assert request(after=0).WhichOneof("start") == "after_position"
    assert request(from_end=True).WhichOneof("start") == "from_end"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"after": 3, "from_end": True}, "after and from_end are given"),
        ({"from_start": True, "from_end": True}, "give at most one start"),
        ({"after": -1}, "after is -1"),
        ({"member_id": "m"}, "member_id is given without a group"),
        ({"group": ""}, "group is empty"),
        ({"filter": {"event_types": ["A"]}}, "expected lethedb.SubscriptionFilter"),
        ({"filter": SubscriptionFilter(event_types="A")}, "expected a tuple of str"),
        ({"filter": SubscriptionFilter(stream_prefixes=("",))}, r"stream_prefixes\[0\] is empty"),
        ({"batch_size": 0}, "batch_size is 0"),
        ({"from_end": 1}, "from_end is an int"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(overrides, message):
    with pytest.raises(lethedb.ValidationError, match=message):
        request(**overrides)


def test_the_filter_goes_on_the_wire_as_given():
    sent = request(
        filter=SubscriptionFilter(
            stream_prefixes=("user-",),
            event_types=("A", "B"),
            subject_id="s",
            include_erasures=True,
        ),
        group="g",
        member_id="m",
        batch_size=7,
    )
    assert list(sent.filter.stream_prefixes) == ["user-"]
    assert list(sent.filter.event_types) == ["A", "B"]
    assert sent.filter.subject_id == "s"
    assert sent.filter.include_erasures
    assert (sent.group, sent.member_id, sent.max_events_per_message) == ("g", "m", 7)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name", "expected"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "TooManySubscribers", lethedb.TooManySubscribers),
        (grpc.StatusCode.OUT_OF_RANGE, "PositionBeyondHead", lethedb.PositionBeyondHead),
        (grpc.StatusCode.FAILED_PRECONDITION, "NotGroupMember", lethedb.NotGroupMember),
        (grpc.StatusCode.ABORTED, "SubscriptionReplaced", lethedb.SubscriptionReplaced),
        (grpc.StatusCode.OUT_OF_RANGE, None, lethedb.PositionBeyondHead),
    ],
)
def test_the_subscription_errors_of_the_server_are_typed(code, name, expected):
    assert type(error_from_rpc_error(FakeRpcError(code, "x", name=name))) is expected


# -- resuming --------------------------------------------------------------------------


def cursor(**overrides: Any) -> SubscriptionCursor:
    policy = RetryPolicy(max_retries=1, **FAST)
    return SubscriptionCursor(request(**overrides), policy, reconnect=True)


def test_a_reconnect_resumes_after_the_last_position_received_in_any_form():
    c = cursor(from_end=True)
    assert c.request().WhichOneof("start") == "from_end"  # nothing seen yet: as asked
    c.take(caught_up(40))  # from_end: the first caught-up says where it started
    assert c.request().after_position == 40
    c.take(events(41, 42))
    assert c.request().after_position == 42
    c.take(checkpoint(90))  # a filter skipped up to 90
    assert c.request().after_position == 90
    c.take(heartbeat(95))  # says nothing of what was delivered
    assert c.request().after_position == 90
    assert c.head == 95


def test_a_group_member_reconnects_with_its_id_and_the_groups_restart_point():
    c = cursor(group="g", after=5)
    c.take(assignment(generation=3, restart_after=20, member="assigned-by-server"))
    c.take(events(21, 22))
    again = c.request()
    assert (again.group, again.member_id) == ("g", "assigned-by-server")
    # The server restarts the member after the group's checkpoint; the request's
    # start only counts for a group without one, and then it must be the watermark.
    assert again.after_position == 20


def test_positions_going_backwards_within_a_session_are_a_server_error():
    c = cursor()
    c.take(events(5, 6))
    with pytest.raises(lethedb.ServerError, match="after position 6"):
        c.take(events(6))
    with pytest.raises(lethedb.ServerError, match="backwards"):
        c.take(checkpoint(3))


def test_only_connection_loss_is_reconnected():
    c = cursor()
    assert c.retry_delay(unavailable()) > 0
    with pytest.raises(lethedb.SubscriptionReplaced):
        c.retry_delay(FakeRpcError(grpc.StatusCode.ABORTED, "x", name="SubscriptionReplaced"))
    with pytest.raises(lethedb.PermissionDenied):
        c.retry_delay(FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "no"))


def test_reconnects_never_give_up_and_back_off_to_the_cap():
    c = cursor()
    delays = [c.retry_delay(unavailable()) for _ in range(50)]
    assert all(0 < d <= FAST["max_backoff"] for d in delays)
    assert c.reconnects == 50


def test_without_reconnect_a_lost_connection_is_raised():
    policy = RetryPolicy(max_retries=5, **FAST)
    c = SubscriptionCursor(request(), policy, reconnect=False)
    with pytest.raises(lethedb.Unavailable) as caught:
        c.retry_delay(unavailable())
    assert "reconnect=False" in " ".join(caught.value.__notes__)


# -- the iterator ----------------------------------------------------------------------


def test_the_iterator_hands_out_every_event_once_across_broken_calls():
    stub = Stub(
        [events(1, 2, 3), unavailable()],
        [events(4), checkpoint(10), unavailable()],
        [caught_up(10), events(11)],
    )
    subscription = client_with(stub).subscribe()
    items = take(subscription, 7)
    assert [type(i).__name__ for i in items] == [
        "RecordedEvent", "RecordedEvent", "RecordedEvent", "RecordedEvent",
        "Checkpoint", "CaughtUp", "RecordedEvent",
    ]  # fmt: skip
    assert [i.position for i in items] == [1, 2, 3, 4, 10, 10, 11]
    assert [r.WhichOneof("start") for r in stub.requests] == [
        "from_start",
        "after_position",
        "after_position",
    ]
    assert [r.after_position for r in stub.requests[1:]] == [3, 10]
    assert subscription.position == 11
    assert subscription.reconnects == 2
    assert all(call.cancelled for call in stub.calls[:2])
    subscription.close()
    assert stub.calls[-1].cancelled
    with pytest.raises(StopIteration):
        next(subscription)


def test_a_broken_call_mid_batch_hands_out_the_rest_of_the_batch_first():
    stub = Stub([events(1, 2, 3), unavailable()], [events(4)])
    subscription = client_with(stub).subscribe(after=0)
    assert next(subscription).position == 1  # type: ignore[union-attr]
    assert subscription.position == 1
    assert [e.position for e in take(subscription, 3)] == [2, 3, 4]
    assert stub.requests[1].after_position == 3


def test_batches_group_events_and_include_assignments():
    stub = Stub([assignment(1, 0), events(1, 2), checkpoint(5), caught_up(5)])
    subscription = client_with(stub).subscribe(group="g")
    items = subscription.batches()
    first = next(items)
    assert isinstance(first, lethedb.GroupAssignment)
    assert first.generation == 1
    batch = next(items)
    assert isinstance(batch, list)
    assert [e.position for e in batch] == [1, 2]
    assert next(items) == Checkpoint(5)
    assert next(items) == CaughtUp(5)
    assert subscription.commit() is True
    sent = stub.commits[-1]
    assert (sent.group, sent.member_id, sent.generation, sent.position) == ("g", "m-1", 1, 5)
    subscription.close()


def test_a_non_retryable_error_ends_the_iteration_with_its_type():
    stub = Stub(
        [events(1), FakeRpcError(grpc.StatusCode.ABORTED, "x", name="SubscriptionReplaced")]
    )
    subscription = client_with(stub).subscribe(group="g", member_id="m")
    assert isinstance(next(subscription), RecordedEvent)
    with pytest.raises(lethedb.SubscriptionReplaced):
        next(subscription)


def test_commit_needs_a_group_and_something_delivered():
    subscription = client_with(Stub([assignment(1, 0)])).subscribe()
    with pytest.raises(lethedb.ValidationError, match="consumer groups"):
        subscription.commit(3)
    grouped = client_with(Stub([assignment(1, 0)])).subscribe(group="g")
    with pytest.raises(lethedb.ValidationError, match="nothing was delivered"):
        grouped.commit()


def test_the_async_iterator_resumes_the_same_way():
    stub = Stub([events(1, 2), unavailable()], [caught_up(2), events(3)])

    async def scenario() -> list[Any]:
        db = lethedb.AsyncClient("localhost:1", **FAST)
        db._transport.events = stub  # type: ignore[assignment]
        got = []
        async with db.subscribe(after=0) as subscription:
            async for item in subscription:
                got.append(item)
                if len(got) == 4:
                    break
        await db.close()
        return got

    got = asyncio.run(scenario())
    assert [i.position for i in got] == [1, 2, 2, 3]
    assert stub.requests[1].after_position == 2
