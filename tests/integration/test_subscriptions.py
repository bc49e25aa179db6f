"""EventStore.Subscribe against a real server: catch-up, live, filters, erasure, limits.

The server is shared by the module, so every test starts its subscriptions
after the head it finds (or filters on its own streams) and never depends on
what other tests appended.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from tests.integration.serverproc import ServerProcess
from tests.integration.subscribing import (
    Received,
    Stub,
    append,
    follow,
    head,
    proposed,
    uid,
    wait_until,
)

HEARTBEAT_S = 0.3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("subscriptions") / "data",
        "--subscription-heartbeat-s",
        str(HEARTBEAT_S),
    ).start()
    yield proc
    proc.stop()


def run(server: ServerProcess, scenario) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.wait_for(scenario(Stub(channel)), 60)

    asyncio.run(main())


def test_from_start_delivers_every_position_in_order_then_caught_up(server):
    async def scenario(stub: Stub) -> None:
        await append(stub, f"s-{uid()}", [proposed() for _ in range(700)])
        top = await head(stub)
        received = Received()
        call = stub.Subscribe(pb.SubscribeRequest(from_start=True))
        async for message in call:
            received.take(message)
            if received.caught_up:
                break
        call.cancel()
        assert received.positions == list(range(1, top + 1))
        assert received.caught_up == [top]
        assert received.checkpoints == []  # nothing is filtered, so nothing to report

    run(server, scenario)


def test_live_events_follow_catch_up_with_no_gap_and_no_duplicate(server):
    async def scenario(stub: Stub) -> None:
        stream = f"s-{uid()}"
        await append(stub, stream, [proposed() for _ in range(5)])
        start = await head(stub) - 3  # three events to catch up on
        received = Received()
        task = asyncio.create_task(
            follow(stub.Subscribe(pb.SubscribeRequest(after_position=start)), received)
        )
        await wait_until(lambda: received.caught_up, what="caught_up")
        results = [await append(stub, stream, [proposed()] * (i + 1)) for i in range(4)]
        last = results[-1].last_position
        await wait_until(lambda: received.last_position >= last, what="live events")
        task.cancel()
        assert received.positions == list(range(start + 1, last + 1))
        assert received.caught_up == [start + 3]

    run(server, scenario)


def test_from_end_starts_after_the_head_at_subscription_time(server):
    async def scenario(stub: Stub) -> None:
        stream = f"s-{uid()}"
        await append(stub, stream, [proposed()] * 3)
        before = await head(stub)
        received = Received()
        task = asyncio.create_task(
            follow(stub.Subscribe(pb.SubscribeRequest(from_end=True)), received)
        )
        await wait_until(lambda: received.caught_up, what="caught_up")
        assert received.events == []
        assert received.caught_up == [before]
        result = await append(stub, stream, [proposed()] * 2)
        await wait_until(lambda: received.last_position >= result.last_position)
        task.cancel()
        assert received.positions == [before + 1, before + 2]

    run(server, scenario)


def test_a_start_beyond_the_head_is_refused_as_out_of_range(server):
    async def scenario(stub: Stub) -> None:
        top = await head(stub)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Subscribe(pb.SubscribeRequest(after_position=top + 1000)):
                pass
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "beyond the head" in info.value.details()

    run(server, scenario)


def test_events_travel_in_batches_of_at_most_max_events_per_message(server):
    async def scenario(stub: Stub) -> None:
        start = await head(stub)
        result = await append(stub, f"s-{uid()}", [proposed() for _ in range(95)])
        received = Received()
        call = stub.Subscribe(pb.SubscribeRequest(after_position=start, max_events_per_message=10))
        async for message in call:
            received.take(message)
            if received.caught_up:
                break
        call.cancel()
        assert received.positions == list(range(start + 1, result.last_position + 1))
        assert max(received.batch_sizes) == 10
        assert len(received.batch_sizes) == 10

    run(server, scenario)


def test_an_idle_subscription_gets_heartbeats_carrying_the_head(server):
    async def scenario(stub: Stub) -> None:
        received = Received()
        task = asyncio.create_task(
            follow(stub.Subscribe(pb.SubscribeRequest(from_end=True)), received)
        )
        await wait_until(lambda: len(received.heartbeats) >= 2, timeout=10, what="heartbeats")
        task.cancel()
        assert received.heartbeats[-1] == received.caught_up[0]

    run(server, scenario)


class TestFilters:
    def test_only_matching_events_arrive_with_checkpoints_and_resuming_loses_nothing(self, server):
        async def scenario(stub: Stub) -> None:
            tag = uid()
            wanted, noise = f"orders-{tag}-", f"noise-{tag}"
            start = await head(stub)
            matching = []

            async def phase(noise_before: int, noise_after: int) -> None:
                for _ in range(noise_before // 500):
                    await append(stub, noise, [proposed() for _ in range(500)])
                r = await append(stub, f"{wanted}{len(matching)}", [proposed("OrderPlaced")])
                matching.append(r.first_position)
                if noise_after:
                    await append(stub, noise, [proposed() for _ in range(noise_after)])

            await phase(2000, 0)
            await phase(2500, 10)
            selector = pb.SubscriptionFilter(stream_prefixes=[wanted])
            first = Received()
            call = stub.Subscribe(pb.SubscribeRequest(after_position=start, filter=selector))
            async for message in call:
                first.take(message)
                if first.caught_up:
                    break
            call.cancel()
            assert first.positions == matching
            assert all(e.stream_id.startswith(wanted) for e in first.events)
            assert first.checkpoints, "skipped events must be reported"
            # Progress is reported at least every 1,000 skipped events (checked
            # per page of 512), so a resume never rescans much.
            reported = [start] + [p for _, p in first.progress]
            assert max(b - a for a, b in itertools.pairwise(reported)) <= 1000 + 512
            assert first.caught_up == [await head(stub)]

            # Resume from the last position the subscriber was told about.
            resume_after = first.last_position
            await phase(1500, 10)
            second = Received()
            call = stub.Subscribe(pb.SubscribeRequest(after_position=resume_after, filter=selector))
            async for message in call:
                second.take(message)
                if second.caught_up:
                    break
            call.cancel()
            assert second.positions == matching[2:]
            assert first.positions + second.positions == matching

        run(server, scenario)

    def test_a_live_filtered_subscriber_gets_a_checkpoint_within_a_second_of_skipping(self, server):
        async def scenario(stub: Stub) -> None:
            tag = uid()
            received = Received()
            selector = pb.SubscriptionFilter(event_types=[f"Nothing{tag}"])
            task = asyncio.create_task(
                follow(
                    stub.Subscribe(pb.SubscribeRequest(from_end=True, filter=selector)), received
                )
            )
            await wait_until(lambda: received.caught_up)
            result = await append(stub, f"s-{tag}", [proposed() for _ in range(5)])
            await wait_until(
                lambda: received.checkpoints and received.checkpoints[-1] >= result.last_position,
                timeout=3,
                what="a time-based checkpoint",
            )
            task.cancel()
            assert received.events == []

        run(server, scenario)

    def test_conditions_combine_and_types_subjects_and_prefixes_all_apply(self, server):
        async def scenario(stub: Stub) -> None:
            tag = uid()
            start = await head(stub)
            subject = f"subj-{tag}"
            await append(stub, f"a-{tag}", [proposed("T1", subject), proposed("T2", subject)])
            await append(stub, f"a-{tag}", [proposed("T1", "other"), proposed("T1")])
            await append(stub, f"b-{tag}", [proposed("T1", subject)])
            selector = pb.SubscriptionFilter(
                stream_prefixes=[f"a-{tag}", f"c-{tag}"], event_types=["T1"], subject_id=subject
            )
            received = Received()
            call = stub.Subscribe(pb.SubscribeRequest(after_position=start, filter=selector))
            async for message in call:
                received.take(message)
                if received.caught_up:
                    break
            call.cancel()
            assert [(e.stream_id, e.event_type, e.subject_id) for e in received.events] == [
                (f"a-{tag}", "T1", subject)
            ]

        run(server, scenario)


class TestErasure:
    def test_forgotten_subjects_events_arrive_redacted_in_place_with_the_erasure_event(
        self, server
    ):
        async def scenario(stub: Stub) -> None:
            tag = uid()
            subject, other = f"user-{tag}", f"keep-{tag}"
            start = await head(stub)
            live = Received()
            live_task = asyncio.create_task(
                follow(stub.Subscribe(pb.SubscribeRequest(after_position=start)), live)
            )
            stream = f"users-{tag}"
            await append(stub, stream, [proposed("Registered", subject, b'{"email":"a@b.c"}')])
            await append(stub, stream, [proposed("Registered", other, b'{"email":"x@y.z"}')])
            await append(stub, stream, [proposed("Renamed", subject, b'{"name":"Ann"}')])
            receipt = await stub.ForgetSubject(
                pb.ForgetSubjectRequest(subject_id=subject, reason="test"), timeout=30
            )
            erasure_position = receipt.tombstone_position
            await wait_until(lambda: live.last_position >= erasure_position)
            live_task.cancel()

            replay = Received()
            call = stub.Subscribe(pb.SubscribeRequest(after_position=start))
            async for message in call:
                replay.take(message)
                if replay.caught_up:
                    break
            call.cancel()

            assert replay.positions == list(range(start + 1, erasure_position + 1))
            by_subject = [(e.subject_id, e.redacted, e.data) for e in replay.events[:3]]
            assert by_subject == [
                (subject, True, b""),
                (other, False, b'{"email":"x@y.z"}'),
                (subject, True, b""),
            ]
            erasure = replay.events[-1]
            assert (erasure.stream_id, erasure.event_type) == ("$erasures", "$subject.forgotten")
            assert json.loads(erasure.data)["subject_id"] == subject
            # The live subscriber saw the same positions, and the erasure event.
            assert live.positions == replay.positions
            assert live.events[-1].event_type == "$subject.forgotten"

        run(server, scenario)

    def test_a_filter_includes_erasure_events_only_when_asked(self, server):
        async def scenario(stub: Stub) -> None:
            tag = uid()
            subject = f"user-{tag}"
            start = await head(stub)
            await append(stub, f"users-{tag}", [proposed("Registered", subject)])
            await stub.ForgetSubject(pb.ForgetSubjectRequest(subject_id=subject), timeout=30)

            async def delivered(include: bool) -> list[tuple[str, str]]:
                selector = pb.SubscriptionFilter(
                    stream_prefixes=[f"users-{tag}"], include_erasures=include
                )
                received = Received()
                call = stub.Subscribe(pb.SubscribeRequest(after_position=start, filter=selector))
                async for message in call:
                    received.take(message)
                    if received.caught_up:
                        break
                call.cancel()
                return [(e.stream_id, e.event_type) for e in received.events]

            assert await delivered(False) == [(f"users-{tag}", "Registered")]
            assert await delivered(True) == [
                (f"users-{tag}", "Registered"),
                ("$erasures", "$subject.forgotten"),
            ]

        run(server, scenario)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SubscribeRequest(from_end=False), "from_end"),
        (pb.SubscribeRequest(from_start=False), "from_start"),
        (pb.SubscribeRequest(member_id="m1"), "member_id"),
        (pb.SubscribeRequest(group="$system"), "group"),
        (
            pb.SubscribeRequest(filter=pb.SubscriptionFilter(stream_prefixes=[""])),
            "stream_prefixes",
        ),
        (pb.SubscribeRequest(filter=pb.SubscriptionFilter(event_types=["a\nb"])), "event_types"),
        (pb.SubscribeRequest(filter=pb.SubscriptionFilter(subject_id="x" * 200)), "subject_id"),
    ],
)
def test_invalid_subscriptions_are_refused_naming_the_field(server, request_, field):
    async def scenario(stub: Stub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Subscribe(request_):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details()

    run(server, scenario)


def test_more_than_max_subscribers_is_resource_exhausted(tmp_path: Path):
    proc = ServerProcess(tmp_path / "data", "--max-subscribers", "2").start()
    try:

        async def scenario(stub: Stub) -> None:
            calls = [stub.Subscribe(pb.SubscribeRequest(from_end=True)) for _ in range(2)]
            for call in calls:
                assert (await call.read()).HasField("caught_up")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Subscribe(pb.SubscribeRequest(from_end=True)):
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_subscribers" in info.value.details()
            calls[0].cancel()
            # The slot is free again once the cancelled call has been cleaned up.
            codes = []
            for _ in range(100):
                call = stub.Subscribe(pb.SubscribeRequest(from_end=True))
                try:
                    first = await call.read()
                    break
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the cancelled subscription's slot was never released")
            assert first.HasField("caught_up")
            assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
            call.cancel()
            calls[1].cancel()

        run(proc, scenario)
    finally:
        proc.stop()


def test_a_graceful_stop_ends_live_subscriptions_at_once_as_unavailable(tmp_path: Path):
    """A subscription never finishes by itself; the stop must not wait out its grace."""
    proc = ServerProcess(tmp_path / "data", "--shutdown-grace-s", "20").start()
    try:

        async def scenario(stub: Stub) -> None:
            call = stub.Subscribe(pb.SubscribeRequest(from_start=True))
            assert (await call.read()).HasField("caught_up")
            started = time.monotonic()
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await asyncio.to_thread(proc.proc.wait, 15) == 0
            assert time.monotonic() - started < 10

        run(proc, scenario)
    finally:
        if proc.proc is not None:
            proc.kill()
