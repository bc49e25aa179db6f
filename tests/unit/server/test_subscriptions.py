"""The subscription engine in-process: the loop, the head bridge, limits and groups.

A real store in a temporary directory; the writer is driven from threads the
way RPC handlers drive it, and subscriptions run in an event loop of the
test's own. No gRPC is involved: the engine must not need it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import pytest

from lethedb_server.engine.model import (
    AppendCommand,
    CheckpointCommand,
    ForgetCommand,
    ProposedEvent,
)
from lethedb_server.engine.store import Store
from lethedb_server.engine.subscriptions import (
    Assignment,
    CaughtUp,
    Checkpoint,
    EventFilter,
    Events,
    Heartbeat,
    SubscriptionEngine,
    SubscriptionLimits,
    SubscriptionMessage,
    SubscriptionSpec,
    partition_of,
)
from lethedb_server.errors import (
    NotGroupMember,
    PermissionDenied,
    PositionBeyondHead,
    SubscriptionReplaced,
    TooManyGroups,
    TooManySubscribers,
)

TIMEOUT = 10.0


def proposed(subject: str = "", event_type: str = "Happened") -> ProposedEvent:
    return ProposedEvent(b"", event_type, subject, "application/json", b"{}", b"")


def append(store: Store, stream: str, count: int = 1, subject: str = "", kind: str = "E") -> int:
    """Append *count* events; return the last position."""
    command = AppendCommand(stream, tuple(proposed(subject, kind) for _ in range(count)))
    return store.writer.append(command, timeout=TIMEOUT).last_position


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


async def next_of(items: AsyncGenerator[SubscriptionMessage, None], kind: type) -> Any:
    """The next message of *kind*, skipping heartbeats."""
    while True:
        message = await anext(items)
        if isinstance(message, Heartbeat):
            continue
        assert isinstance(message, kind), message
        return message


async def positions_until(items: AsyncGenerator[SubscriptionMessage, None], last: int) -> list[int]:
    """Positions of the events delivered until *last* was reported."""
    positions: list[int] = []
    while True:
        message = await anext(items)
        if isinstance(message, Events):
            positions.extend(e.position for e in message.events)
            if positions[-1] >= last:
                return positions
        elif isinstance(message, CaughtUp | Checkpoint) and message.position >= last:
            return positions


# -- pure functions ------------------------------------------------------------------


def test_partition_of_is_stable_across_processes_and_versions():
    # Pinned values: clients may compute the same function, so it must never change.
    assert [partition_of(k, 7) for k in ("subject-1", "subject-2", "", "user-42")] == [3, 4, 0, 4]
    assert partition_of("subject-1", 1) == 0
    assert partition_of("subject-1", 1_000_003) == 420_226
    counts = [0, 0, 0]
    for i in range(3_000):
        counts[partition_of(f"user-{i}", 3)] += 1
    assert min(counts) > 900, counts


def test_filter_conditions_all_apply_and_erasures_pass_only_when_included():
    f = EventFilter(stream_prefixes=("users-", "admins-"), event_types=frozenset({"A"}))
    assert f.matches("users-1", "A", "")
    assert f.matches("admins-1", "A", "s")
    assert not f.matches("orders-1", "A", "")
    assert not f.matches("users-1", "B", "")
    assert not f.matches("$erasures", "$subject.forgotten", "")
    assert EventFilter(stream_prefixes=("users-",), include_erasures=True).matches(
        "$erasures", "$subject.forgotten", ""
    )
    by_subject = EventFilter(subject_id="s1")
    assert by_subject.matches("any", "any", "s1")
    assert not by_subject.matches("any", "any", "s2")
    assert not by_subject.matches("any", "any", "")


def test_an_assignment_owns_by_subject_then_stream_and_every_member_gets_erasures():
    members = ("a", "b", "c")
    shares = [Assignment("g", m, 1, members, i, 0) for i, m in enumerate(members)]
    for subject in (f"s{i}" for i in range(50)):
        owners = [s.member_index for s in shares if s.owns("stream-x", subject)]
        assert owners == [partition_of(subject, 3)]
    owners = [s.member_index for s in shares if s.owns("stream-y", "")]
    assert owners == [partition_of("stream-y", 3)]
    assert all(s.owns("$erasures", "") for s in shares)


# -- the loop --------------------------------------------------------------------------


def test_catch_up_then_live_in_one_loop_without_gap_or_duplicate(store: Store):
    for _ in range(3):
        append(store, "s", 400)  # more than one page behind

    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        subscription = await engine.open(SubscriptionSpec())
        items = subscription.messages()
        caught = await positions_until(items, 1200)
        assert caught == list(range(1, 1201))
        assert (await next_of(items, CaughtUp)).position == 1200

        # Appends from another thread while the subscription waits at the head.
        def writer() -> None:
            for _ in range(200):
                append(store, "s", 3)

        thread = threading.Thread(target=writer)
        thread.start()
        live = await positions_until(items, 1800)
        thread.join()
        assert live == list(range(1201, 1801))
        await items.aclose()
        subscription.close()
        assert engine.subscriber_count == 0

    run(scenario())


def test_from_end_starts_at_the_head_and_a_start_beyond_it_is_refused(store: Store):
    append(store, "s", 5)

    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        subscription = await engine.open(SubscriptionSpec(from_end=True))
        items = subscription.messages()
        assert (await next_of(items, CaughtUp)).position == 5
        await asyncio.to_thread(append, store, "s", 2)
        assert await positions_until(items, 7) == [6, 7]
        await items.aclose()
        subscription.close()
        with pytest.raises(PositionBeyondHead, match="beyond the head"):
            await engine.open(SubscriptionSpec(after=8))
        assert engine.subscriber_count == 0

    run(scenario())


def test_idle_subscription_sends_heartbeats_and_filtered_progress_as_checkpoints(store: Store):
    limits = SubscriptionLimits(heartbeat_interval_s=0.05, checkpoint_interval_s=0.05)

    async def scenario() -> None:
        engine = SubscriptionEngine(store, limits)
        spec = SubscriptionSpec(filter=EventFilter(event_types=frozenset({"Wanted"})))
        subscription = await engine.open(spec)
        items = subscription.messages()
        assert (await anext(items)) == CaughtUp(0)
        assert isinstance(await anext(items), Heartbeat)
        last = await asyncio.to_thread(append, store, "s", 3)
        message = await next_of(items, Checkpoint)
        assert message.position == last
        await items.aclose()
        subscription.close()

    run(scenario())


def test_checkpoints_come_at_least_every_n_skipped_events(store: Store):
    for _ in range(10):
        append(store, "noise", 500)
    wanted = append(store, "wanted", 1)
    limits = SubscriptionLimits(checkpoint_every=1000, page_size=512)

    async def scenario() -> None:
        engine = SubscriptionEngine(store, limits)
        spec = SubscriptionSpec(filter=EventFilter(stream_prefixes=("wanted",)))
        subscription = await engine.open(spec)
        reported = [0]
        async for message in subscription.messages():
            if isinstance(message, Checkpoint):
                reported.append(message.position)
            elif isinstance(message, Events):
                assert [e.position for e in message.events] == [wanted]
                reported.append(wanted)
            elif isinstance(message, CaughtUp):
                break
        subscription.close()
        gaps = [b - a for a, b in itertools.pairwise(reported)]
        assert max(gaps) < 1000 + 512
        assert len(reported) >= 5

    run(scenario())


def test_redacted_events_keep_their_place_and_the_erasure_event_follows(store: Store):
    append(store, "users", 2, subject="gone")
    append(store, "users", 1, subject="kept")
    store.writer.execute(ForgetCommand("gone", "test", "admin"), timeout=TIMEOUT)

    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        subscription = await engine.open(SubscriptionSpec())
        message = await next_of(subscription.messages(), Events)
        subscription.close()
        summary = [(e.position, e.subject_id, e.redacted, e.event_type) for e in message.events]
        assert summary == [
            (1, "gone", True, "E"),
            (2, "gone", True, "E"),
            (3, "kept", False, "E"),
            (4, "", False, "$subject.forgotten"),
        ]

    run(scenario())


def _record_reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Each page read of the store from now on: its start, and whether it ran on this thread."""
    reads: list[tuple[int, bool]] = []
    original = store.reader.read_all
    here = threading.get_ident()

    def recording(start: int, **kwargs: Any) -> Any:
        reads.append((start, threading.get_ident() == here))
        return original(start, **kwargs)

    monkeypatch.setattr(store.reader, "read_all", recording)
    return reads


@pytest.mark.parametrize("inline_read_events", [64, 0], ids=["on-the-loop", "in-a-thread"])
def test_live_subscribers_at_the_same_position_share_one_page_read(
    store: Store, monkeypatch: pytest.MonkeyPatch, inline_read_events: int
):
    reads = _record_reads(store, monkeypatch)

    async def scenario() -> None:
        engine = SubscriptionEngine(
            store, SubscriptionLimits(inline_read_events=inline_read_events)
        )
        subscriptions = [await engine.open(SubscriptionSpec()) for _ in range(50)]
        streams = [s.messages() for s in subscriptions]
        for items in streams:
            assert (await anext(items)) == CaughtUp(0)
        waiting = [asyncio.ensure_future(anext(items)) for items in streams]
        await asyncio.sleep(0.05)  # every subscription now waits at the head
        await asyncio.to_thread(append, store, "s", 4)
        pages = await asyncio.gather(*waiting)
        assert all([e.position for e in p.events] == [1, 2, 3, 4] for p in pages)
        assert len({id(p.events) for p in pages}) == 1, "one page object for all"
        assert reads == [(1, inline_read_events > 0)]
        for items, s in zip(streams, subscriptions, strict=True):
            await items.aclose()
            s.close()

    run(scenario())


def test_a_short_live_tail_is_read_on_the_loop_and_a_longer_one_in_a_worker_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    append(store, "s", 10)  # a catch-up of ten events: more than the limit below
    reads = _record_reads(store, monkeypatch)

    async def scenario() -> None:
        engine = SubscriptionEngine(store, SubscriptionLimits(inline_read_events=4))
        subscription = await engine.open(SubscriptionSpec())
        items = subscription.messages()
        assert await positions_until(items, 10) == list(range(1, 11))
        assert (await next_of(items, CaughtUp)).position == 10
        waiting = asyncio.ensure_future(anext(items))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(append, store, "s", 4)  # a live tail of exactly the limit
        assert [e.position for e in (await waiting).events] == [11, 12, 13, 14]
        await items.aclose()
        subscription.close()

    run(scenario())
    assert reads == [(1, False), (11, True)]


def test_an_inline_page_is_shared_only_until_the_loop_turns(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    """No decrypted page outlives the turn of the subscribers woken with its reader."""
    reads = _record_reads(store, monkeypatch)

    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        subscription = await engine.open(SubscriptionSpec())
        loop_head = subscription._head
        append(store, "s", 2)
        read = functools.partial(subscription._read, 1, None)
        first = await loop_head.shared_read(1, 2, read, inline=True)
        again = await loop_head.shared_read(1, 2, read, inline=True)
        assert again is first
        await asyncio.sleep(0)  # the loop's next turn
        later = await loop_head.shared_read(1, 2, read, inline=True)
        assert later is not first
        assert [e.position for e in later[0]] == [1, 2]
        subscription.close()

    run(scenario())
    assert [start for start, _ in reads] == [1, 1]


def test_the_head_bridge_schedules_one_wake_up_however_many_commits_race(store: Store):
    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        subscription = await engine.open(SubscriptionSpec())
        loop_head = subscription._head
        scheduled: list[object] = []
        real = loop_head.loop.call_soon_threadsafe

        def spy(callback: Callable[..., object], *args: object) -> Any:
            scheduled.append(callback)
            return real(callback, *args)

        loop_head.loop.call_soon_threadsafe = spy  # type: ignore[method-assign]
        try:
            for _ in range(100):  # as the writer thread would, between two loop turns
                engine._on_commit(store.log.head)
            assert len(scheduled) == 1
            await asyncio.sleep(0)
            engine._on_commit(store.log.head)
            assert len(scheduled) == 2
        finally:
            loop_head.loop.call_soon_threadsafe = real  # type: ignore[method-assign]
        subscription.close()

    run(scenario())


def test_the_subscriber_limit_refuses_the_one_too_many_and_frees_on_close(store: Store):
    async def scenario() -> None:
        engine = SubscriptionEngine(store, SubscriptionLimits(max_subscribers=2))
        first = await engine.open(SubscriptionSpec())
        second = await engine.open(SubscriptionSpec())
        with pytest.raises(TooManySubscribers, match="max_subscribers"):
            await engine.open(SubscriptionSpec())
        first.close()
        first.close()  # idempotent: the slot is released once
        third = await engine.open(SubscriptionSpec())
        assert engine.subscriber_count == 2
        second.close()
        third.close()
        assert engine.subscriber_count == 0

    run(scenario())


# -- consumer groups ----------------------------------------------------------------------


def test_members_are_assigned_in_sorted_order_and_rebalance_on_join_and_leave(store: Store):
    append(store, "s", 10)

    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        b = await engine.open(SubscriptionSpec(group="g", member_id="b", after=4))
        b_items = b.messages()
        assert await anext(b_items) == Assignment("g", "b", 1, ("b",), 0, 4)
        a = await engine.open(SubscriptionSpec(group="g", member_id="a"))
        a_items = a.messages()
        assert await anext(a_items) == Assignment("g", "a", 2, ("a", "b"), 0, 4)
        # b is told at its next message, and restarts after the same checkpoint.
        message = await anext(b_items)
        while not isinstance(message, Assignment):
            message = await anext(b_items)
        assert message == Assignment("g", "b", 2, ("a", "b"), 1, 4)
        await a_items.aclose()
        a.close()
        message = await anext(b_items)
        while not isinstance(message, Assignment):
            message = await anext(b_items)
        assert message == Assignment("g", "b", 3, ("b",), 0, 4)
        await b_items.aclose()
        b.close()
        assert engine._groups == {}

    run(scenario())


def test_group_checkpoint_is_the_lowest_member_commit_clamped_to_what_was_sent(store: Store):
    last = append(store, "s", 20)

    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        a = await engine.open(SubscriptionSpec(group="g", member_id="a"))
        b = await engine.open(SubscriptionSpec(group="g", member_id="b"))
        a_items, b_items = a.messages(), b.messages()
        for items in (a_items, b_items):
            message = await anext(items)
            while not (isinstance(message, Assignment) and message.generation == 2):
                message = await anext(items)
        # a has been sent nothing yet: a commit beyond that is clamped.
        assert (await engine.commit_checkpoint("g", 15, "a", 2)).position == 0
        await positions_until(a_items, last)
        await positions_until(b_items, last)
        assert (await engine.commit_checkpoint("g", 15, "a", 2)).position == 0
        result = await engine.commit_checkpoint("g", 12, "b", 2)
        assert (result.position, result.accepted) == (12, True)
        assert store.log.checkpoint("g") == 12
        stale = await engine.commit_checkpoint("g", 20, "b", 1)
        assert (stale.position, stale.accepted) == (12, False)
        with pytest.raises(NotGroupMember, match="not subscribed"):
            await engine.commit_checkpoint("g", 20, "nobody", 2)
        with pytest.raises(NotGroupMember, match="live members"):
            await engine.commit_checkpoint("g", 20)
        await a_items.aclose()
        a.close()
        # b restarts after the stored checkpoint with everything.
        message = await anext(b_items)
        while not isinstance(message, Assignment):
            message = await anext(b_items)
        assert (message.generation, message.restart_after) == (3, 12)
        assert await positions_until(b_items, last) == list(range(13, last + 1))
        await b_items.aclose()
        b.close()
        # With no live member it may be set: forward by anyone who may commit,
        # backwards only by an admin.
        with pytest.raises(PermissionDenied, match="needs the admin role"):
            await engine.commit_checkpoint("g", 3)
        assert await engine.get_checkpoint("g") == 12
        assert (await engine.commit_checkpoint("g", 3, may_rewind=True)).position == 3
        assert await engine.get_checkpoint("g") == 3
        with pytest.raises(PositionBeyondHead):
            await engine.commit_checkpoint("g", last + 1)

    run(scenario())


def test_the_writer_keeps_checkpoints_moving_forward_and_the_groups_bounded(store: Store):
    """Checked in the write transaction, so concurrent commits cannot slip past."""
    append(store, "s", 5)

    def put(group: str, position: int, *, rewind: bool = False) -> int:
        command = CheckpointCommand(group, position, rewind=rewind, max_groups=2)
        return int(store.writer.execute(command, timeout=TIMEOUT))

    assert put("a", 3) == 3
    assert put("b", 1) == 1
    with pytest.raises(TooManyGroups, match="max_consumer_groups"):
        put("c", 1)
    assert store.log.checkpoint("c") is None
    assert store.log.consumer_groups() == 2
    with pytest.raises(PermissionDenied, match="moving it back to 2 needs the admin role"):
        put("a", 2)
    assert store.log.checkpoint("a") == 3
    assert put("a", 4) == 4  # forward, and an existing group is no new one
    assert put("a", 2, rewind=True) == 2


def test_joining_a_new_group_beyond_the_limit_is_refused_at_once(store: Store):
    append(store, "s", 3)
    store.writer.execute(CheckpointCommand("old", 1), timeout=TIMEOUT)

    async def scenario() -> None:
        engine = SubscriptionEngine(store, SubscriptionLimits(max_consumer_groups=1))
        with pytest.raises(TooManyGroups):
            await engine.open(SubscriptionSpec(group="new"))
        assert engine.subscriber_count == 0
        member = await engine.open(SubscriptionSpec(group="old"))
        member.close()

    run(scenario())


def test_a_member_subscribing_again_replaces_its_earlier_subscription(store: Store):
    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        old = await engine.open(SubscriptionSpec(group="g", member_id="m"))
        old_items = old.messages()
        await anext(old_items)
        new = await engine.open(SubscriptionSpec(group="g", member_id="m"))
        with pytest.raises(SubscriptionReplaced):  # at its very next turn
            await anext(old_items)
        old.close()  # the replaced one leaving must not remove its successor
        assert list(engine._groups["g"].members) == ["m"]
        assert engine._groups["g"].members["m"].subscription is new
        new.close()
        assert engine.subscriber_count == 0

    run(scenario())


def test_a_stored_checkpoint_beyond_the_head_is_refused(store: Store):
    append(store, "s", 2)
    store.writer.execute(CheckpointCommand("g", 99), timeout=TIMEOUT)

    async def scenario() -> None:
        engine = SubscriptionEngine(store)
        with pytest.raises(PositionBeyondHead, match="checkpoint of group 'g'"):
            await engine.open(SubscriptionSpec(group="g"))
        assert engine.subscriber_count == 0

    run(scenario())
