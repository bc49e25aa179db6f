"""The catch-up/live boundary under concurrent appends: no gap, no duplicate, in order.

Catch-up and live are one loop in the server, so a subscription that starts
while the log grows must deliver exactly the positions after its start: the
tests start subscribers at random moments while eight writers append.
"""

from __future__ import annotations

import asyncio
import random

import grpc

from lethedb.v1 import eventstore_pb2 as pb
from tests.integration.subscribing import (
    Received,
    Stub,
    follow,
    head,
    proposed,
    uid,
    wait_until,
)

WRITERS = 8
APPENDS_PER_WRITER = 2_500  # 20,000 appends in all
SUBSCRIBERS = 20


async def writer(stub: Stub, stream: str, acked: list[int]) -> None:
    """Pipeline APPENDS_PER_WRITER single-event appends on one AppendStream call."""

    async def requests():
        for _ in range(APPENDS_PER_WRITER):
            yield pb.AppendRequest(stream_id=stream, events=[proposed("Tick", data=b"x" * 64)])

    count = 0
    async for response in stub.AppendStream(requests()):
        assert response.WhichOneof("result") == "ok", response
        acked[0] = max(acked[0], response.ok.last_position)
        count += 1
    assert count == APPENDS_PER_WRITER


async def subscriber(
    stub: Stub, when: int, acked: list[int], from_end: bool, done: asyncio.Event
) -> tuple[int, Received]:
    """Start once *when* appends are acked; return (start, what arrived up to the end)."""
    while acked[0] < when and not done.is_set():
        await asyncio.sleep(0.002)
    known = acked[0]  # every position up to it has committed
    if from_end:
        request = pb.SubscribeRequest(from_end=True)
    else:
        request = pb.SubscribeRequest(after_position=known)
    received = Received()
    call = stub.Subscribe(request)
    following = asyncio.create_task(follow(call, received))
    await done.wait()
    await wait_until(lambda: received.last_position >= acked[0], timeout=60, what="the head")
    call.cancel()
    await following
    if from_end:
        # The server chose the start: caught_up names it, or the first event
        # follows it. Either way it is no earlier than what we knew was acked.
        start = (
            received.caught_up[0]
            if received.progress[0][0] == "caught_up"
            else received.positions[0] - 1
        )
        assert start >= known
    else:
        start = known
    return start, received


def test_subscribers_started_during_concurrent_appends_see_exactly_the_positions_after_start(
    server,
):
    rng = random.Random(20_000)

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            acked = [await head(stub)]
            done = asyncio.Event()
            tag = uid()
            writers = [
                asyncio.create_task(writer(stub, f"w{i}-{tag}", acked)) for i in range(WRITERS)
            ]
            # Random moments over the whole run (measured in appends, not
            # seconds, so a slow machine spreads them the same way); the first
            # starts before anything is acked. Every third starts from_end.
            base, total = acked[0], WRITERS * APPENDS_PER_WRITER
            starts = [base] + [base + rng.randrange(total) for _ in range(SUBSCRIBERS - 1)]
            subscribers = [
                asyncio.create_task(subscriber(stub, when, acked, i % 3 == 2, done))
                for i, when in enumerate(starts)
            ]
            await asyncio.gather(*writers)
            done.set()
            final = acked[0]
            results = await asyncio.wait_for(asyncio.gather(*subscribers), 60)
            assert final - results[0][0] >= WRITERS * APPENDS_PER_WRITER
            for start, received in results:
                assert received.positions == list(range(start + 1, final + 1)), (
                    f"subscriber from {start}: {len(received.positions)} events, "
                    f"first {received.positions[:3]}, last {received.positions[-3:]}"
                )
                assert received.checkpoints == []
            # At least some subscribers really started mid-stream.
            assert len({start for start, _ in results}) > SUBSCRIBERS // 2

    asyncio.run(main())
