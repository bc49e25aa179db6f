"""The SDK's subscriptions against a real server: resume across crashes, filters, groups.

A server killed with SIGKILL mid-subscription and restarted on the same port
must cost the caller nothing: the iterator reconnects and resumes after the
last position it received, so the sequence the consumer saw equals the log.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lethedb
from lethedb import CaughtUp, Checkpoint, Event, RecordedEvent, SubscriptionFilter
from lethedb_server.engine.subscriptions import partition_of
from tests.integration.serverproc import ServerProcess

#: A restarted server is found again quickly (gRPC's default first backoff is 1 s).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def client(server: ServerProcess) -> lethedb.Client:
    return lethedb.Client(
        server.address, channel_options=FAST_RECONNECT, initial_backoff=0.05, max_backoff=0.5
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def append_users(db: lethedb.Client, tag: str, count: int, *, start: int = 0) -> None:
    """*count* events over 20 subjects, pipelined."""
    db_items = [
        lethedb.Append(
            f"user-{tag}-{i % 20}",
            Event("Changed", {"i": i}, subject_id=f"subj-{tag}-{i % 20}"),
        )
        for i in range(start, start + count)
    ]
    for result in db.append_many(db_items):
        assert isinstance(result, lethedb.AppendResult), result


def head(db: lethedb.Client) -> int:
    return next((e.position for e in db.read_all(backwards=True, max_count=1)), 0)


def log_of(db: lethedb.Client, after: int = 0) -> list[tuple[int, str]]:
    return [(e.position, e.event_id.hex) for e in db.read_all(after=after)]


@pytest.fixture
def group_name() -> Iterator[str]:
    return f"g-{time.monotonic_ns()}"


def test_server_killed_and_restarted_mid_subscription_the_consumer_sees_exactly_the_log(
    fresh_server: ServerProcess,
):
    writer = client(fresh_server)
    append_users(writer, "a", 2000)
    received: list[RecordedEvent] = []
    others: list[Checkpoint | CaughtUp] = []
    subscription = client(fresh_server).subscribe(from_start=True, batch_size=50)

    def consume() -> None:
        for item in subscription:
            if isinstance(item, RecordedEvent):
                received.append(item)
                if len(received) % 50 == 0:
                    time.sleep(0.002)  # a consumer that takes its time: still catching up
            else:
                others.append(item)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        wait_for(lambda: len(received) >= 300, what="300 events before the crash")
        address = fresh_server.address
        fresh_server.kill()  # SIGKILL while the subscription is catching up
        fresh_server.start(listen=address)
        writer = client(fresh_server)
        append_users(writer, "b", 500)
        wait_for(lambda: len(received) >= 2500, what="every event after the restart")
        time.sleep(0.2)  # anything extra (a duplicate) would arrive now
    finally:
        subscription.close()
        thread.join(10)
    assert not thread.is_alive()
    assert subscription.reconnects >= 1
    assert [(e.position, e.event_id.hex) for e in received] == log_of(writer)
    assert all(isinstance(o, CaughtUp) for o in others)


def test_async_subscription_resumes_after_a_crash_and_follows_live(fresh_server: ServerProcess):
    append_users(client(fresh_server), "a", 300)

    async def scenario() -> list[RecordedEvent]:
        received: list[RecordedEvent] = []
        async with lethedb.AsyncClient(
            fresh_server.address,
            channel_options=FAST_RECONNECT,
            initial_backoff=0.05,
            max_backoff=0.5,
        ) as db:
            subscription = db.subscribe(after=100, batch_size=20)

            async def consume() -> None:
                async for item in subscription:
                    if isinstance(item, RecordedEvent):
                        received.append(item)

            task = asyncio.create_task(consume())
            while len(received) < 200:
                await asyncio.sleep(0.01)
            address = fresh_server.address
            await asyncio.to_thread(fresh_server.kill)
            await asyncio.to_thread(fresh_server.start, address)
            await db.append("live-1", Event("Live", {"n": 1}))
            deadline = time.monotonic() + 30
            while len(received) < 201 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await subscription.close()
            await asyncio.wait_for(task, 10)
            assert subscription.reconnects >= 1
        return received

    received = asyncio.run(scenario())
    writer = client(fresh_server)
    assert [(e.position, e.event_id.hex) for e in received] == log_of(writer, after=100)


def test_a_filtered_subscription_yields_checkpoints_and_resumes_after_them(
    server: ServerProcess, stream_id: str
):
    db = client(server)
    after = head(db)
    events = [Event("Noise", {"i": i}) for i in range(1500)]
    db.append(stream_id + "-noise", events)
    wanted = db.append(stream_id, Event("Wanted", {"x": 1}))
    selector = SubscriptionFilter(stream_prefixes=(stream_id,), event_types=("Wanted",))
    seen: list[RecordedEvent] = []
    saved = after
    with db.subscribe(after=after, filter=selector) as subscription:
        for item in subscription:
            match item:
                case RecordedEvent():
                    seen.append(item)
                case Checkpoint(position) | CaughtUp(position):
                    saved = position
            if isinstance(item, CaughtUp):
                break
        assert subscription.position == saved
    assert [e.position for e in seen] == [wanted.first_position]
    assert saved >= wanted.first_position
    # Resuming after the saved progress sees only what comes after it.
    later = db.append(stream_id, Event("Wanted", {"x": 2}))
    with db.subscribe(after=saved, filter=selector) as subscription:
        first = next(subscription)
    assert isinstance(first, RecordedEvent)
    assert first.position == later.first_position


def test_subscription_errors_are_typed(server: ServerProcess, group_name: str):
    db = client(server)
    with db.subscribe(after=10**12) as subscription, pytest.raises(lethedb.PositionBeyondHead):
        next(subscription)
    with db.subscribe(from_end=True) as plain, pytest.raises(lethedb.ValidationError):
        plain.commit(1)
    with db.subscribe(group=group_name, member_id="m", from_end=True) as member:
        assert isinstance(next(member), CaughtUp)
        assert member.assignment is not None
        assert member.assignment.members == ("m",)
        with pytest.raises(lethedb.NotGroupMember):
            db.set_checkpoint(group_name, 0)  # only without live members
        with db.subscribe(group=group_name, member_id="m", from_end=True) as newer:
            assert isinstance(next(newer), CaughtUp)
            with pytest.raises(lethedb.SubscriptionReplaced):
                next(member)
    db.set_checkpoint(group_name, 0)
    assert db.get_checkpoint(group_name) == 0
    assert db.get_checkpoint(group_name + "-never") is None


# -- consumer groups -------------------------------------------------------------------

VICTIM = textwrap.dedent(
    """
    import json, sys
    import lethedb
    address, group, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    db = lethedb.Client(address)
    with db.subscribe(group=group, member_id="m2", after=after) as sub:
        for item in sub.batches():
            if isinstance(item, lethedb.GroupAssignment):
                print(json.dumps({"members": len(item.members)}), flush=True)
            elif isinstance(item, list):
                print(json.dumps({"events": [[e.position, e.subject_id, e.stream_version]
                                             for e in item]}), flush=True)
                sub.commit(item[-1].position)
    """
)


class ThreadMember:
    """A member in this process: a sync subscription followed by a thread, committing per batch."""

    def __init__(self, server: ServerProcess, group: str, member_id: str, after: int) -> None:
        self.subscription = client(server).subscribe(group=group, member_id=member_id, after=after)
        #: Per assignment generation, the events received under it.
        self.by_generation: dict[int, list[RecordedEvent]] = defaultdict(list)
        self.thread = threading.Thread(target=self._follow)
        self.thread.start()

    def _follow(self) -> None:
        for item in self.subscription.batches():
            if isinstance(item, list):
                assert self.subscription.assignment is not None
                self.by_generation[self.subscription.assignment.generation].extend(item)
                try:
                    self.subscription.commit(item[-1].position)
                except lethedb.NotGroupMember:
                    if not self.subscription.closed:
                        raise
                    return  # stopped by the test while committing

    def members(self) -> int:
        assignment = self.subscription.assignment
        return len(assignment.members) if assignment else 0

    def positions(self) -> set[int]:
        return {e.position for events in self.by_generation.values() for e in events}

    def stop(self) -> None:
        self.subscription.close()
        self.thread.join(10)


class ProcessMember:
    """A member in a child process (to be SIGKILLed), reporting what it received on stdout."""

    def __init__(self, server: ServerProcess, group: str, after: int) -> None:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", VICTIM, server.address, group, str(after)],
            stdout=subprocess.PIPE,
            cwd=root,
            text=True,
        )
        self.members = 0
        self.events: list[tuple[int, str, int]] = []
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if "members" in message:
                self.members = message["members"]
            else:
                self.events.extend(tuple(e) for e in message["events"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join(10)


def test_three_sdk_members_share_every_event_once_in_subject_order_and_lose_none_to_a_kill(
    fresh_server: ServerProcess,
):
    db = client(fresh_server)
    db.append("warm-up", Event("WarmUp"))
    group, start = "g-sdk", 1
    members = [ThreadMember(fresh_server, group, f"m{i}", start) for i in range(2)]
    victim = ProcessMember(fresh_server, group, start)
    try:
        wait_for(
            lambda: all(m.members() == 3 for m in members) and victim.members == 3,
            what="three members",
        )
        append_users(db, "one", 600)
        end = log_of(db)[-1][0]
        expected = set(range(start + 1, end + 1))

        def phase_one() -> list[int]:
            got = [p for m in members for p in m.positions()] + [e[0] for e in victim.events]
            return sorted(got)

        wait_for(lambda: set(phase_one()) >= expected, what="phase one delivered")
        # Stable membership: every event to exactly one member, and to the member its
        # subject partitions to.
        assert phase_one() == sorted(expected)
        owners = ["m0", "m1", "m2"]
        for index, member in enumerate(members):
            for events in member.by_generation.values():
                for e in events:
                    assert owners[partition_of(e.subject_id, 3)] == owners[index]
        for position, subject, _ in victim.events:
            assert partition_of(subject, 3) == 2, position

        victim.kill()  # SIGKILL: its uncommitted share moves to the survivors
        wait_for(lambda: all(m.members() == 2 for m in members), what="rebalance to two")
        append_users(db, "two", 600)
        end = log_of(db)[-1][0]
        everything = set(range(start + 1, end + 1))
        survivors = lambda: set().union(*(m.positions() for m in members))  # noqa: E731
        wait_for(
            lambda: survivors() | {e[0] for e in victim.events} >= everything,
            what="every event after the kill",
        )
    finally:
        for member in members:
            member.stop()
        if victim.proc.poll() is None:
            victim.kill()
    # Per-subject order within every assignment of every member.
    for member in members:
        for events in member.by_generation.values():
            versions: dict[str, list[int]] = defaultdict(list)
            for e in events:
                versions[e.stream_id].append(e.stream_version)
            for stream, seen in versions.items():
                assert seen == sorted(seen), f"{stream} out of order: {seen}"
    final = client(fresh_server).get_checkpoint(group)
    assert final is not None
    assert final >= start
