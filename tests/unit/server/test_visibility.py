"""The visible head: with sync_replicas a reader never sees what a failover may discard.

A leader with ``sync_replicas = K`` shows a commit (reads, subscriptions,
``min_position`` waits) only once K followers hold it, and no later than it
answers the write; a follower shows its log only up to its leader's visible
head; a promoted node shows its whole log (engine/visibility.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from lethedb_server.api.head_watch import HeadWatch, ReadGate
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.engine.subscriptions import (
    CaughtUp,
    Events,
    Heartbeat,
    SubscriptionEngine,
    SubscriptionLimits,
    SubscriptionSpec,
)
from lethedb_server.errors import CatchingUp, NotLeader, StreamNotFound
from tests.unit.server.test_replication_engine import (
    FOLLOWER,
    _committed,
    append,
    apply_all,
    readable,
    run,
)

SYNC_LEADER = StoreOptions(role="leader", sync_replicas=1, sync_timeout_s=60)
SYNC_FOLLOWER = StoreOptions(role="follower", leader="leader:1", sync_replicas=1)
QUICK_HEARTBEATS = SubscriptionLimits(heartbeat_interval_s=0.01)


def unacked_write(
    leader: Store, stream: str = "s", subject: str = "alice"
) -> asyncio.Future[object]:
    """An append on *leader* that commits; no follower has acked it yet."""
    leader.replica_connected("f1", "f1:1")
    return leader.append(append(stream, subject, "1"))


async def next_message(items: AsyncIterator[object]) -> object:
    return await asyncio.wait_for(anext(items), 10)


def test_a_sync_leader_shows_a_commit_to_no_reader_until_a_follower_holds_it(
    stores: Callable[..., Store],
) -> None:
    leader = stores("leader", SYNC_LEADER)

    async def go() -> None:
        answer = unacked_write(leader)
        await _committed(leader, 1)

        assert (leader.log_head, leader.head) == (1, 0)  # committed here, not visible
        assert leader.read_all(1, backwards=False, limit=10) == []
        assert leader.read_all(99, backwards=True, limit=10) == []
        assert leader.read_all_raw(1, 10) == []
        assert leader.read_subject("alice", 0, 10) == []
        with pytest.raises(StreamNotFound):
            leader.read_stream("s", 0, backwards=False, limit=10)
        assert not answer.done()

    run(go())


def test_a_subscriber_on_a_sync_leader_receives_a_write_only_once_it_is_acknowledged(
    stores: Callable[..., Store],
) -> None:
    leader = stores("leader", SYNC_LEADER)

    async def go() -> None:
        engine = SubscriptionEngine(leader, QUICK_HEARTBEATS)
        subscription = await engine.open(SubscriptionSpec())
        items = subscription.messages()
        assert await next_message(items) == CaughtUp(0)

        answer = unacked_write(leader)
        await _committed(leader, 1)
        for _ in range(3):  # the commit woke it: it reads, finds nothing visible, idles
            assert await next_message(items) == Heartbeat(0)

        leader.replica_acked("f1", 1, 1, 0)
        result = await answer
        assert leader.head == result.last_position == 1  # visible by the time it is answered
        message = await next_message(items)
        assert isinstance(message, Events)
        assert [e.position for e in message.events] == [1]
        await items.aclose()
        subscription.close()

    run(go())


def test_an_acknowledged_write_is_readable_on_the_leader_at_once(
    stores: Callable[..., Store],
) -> None:
    leader = stores("leader", SYNC_LEADER)

    async def go() -> None:
        answer = unacked_write(leader, "orders", "bob")
        await _committed(leader, 1)
        leader.replica_acked("f1", 1, 1, 0)
        await answer
        assert [e.stream_id for e in leader.read_stream("orders", 0, backwards=True, limit=5)] == [
            "orders"
        ]
        assert [e.position for e in leader.read_subject("bob", 0, 10)] == [1]

    run(go())


def test_a_stream_read_backwards_starts_at_its_last_visible_version(
    stores: Callable[..., Store],
) -> None:
    leader = stores("leader", SYNC_LEADER)

    async def go() -> None:
        first = unacked_write(leader)
        await _committed(leader, 1)
        leader.replica_acked("f1", 1, 1, 0)
        await first
        leader.append(append("s", "alice", "2"))
        await _committed(leader, 2)

        events = leader.read_stream("s", 5, backwards=True, limit=5)
        assert [(e.stream_version, e.data) for e in events] == [(0, b"1")]
        forwards = leader.read_stream("s", 0, backwards=False, limit=5)
        assert [e.data for e in forwards] == [b"1"]

    run(go())


def test_a_min_position_read_on_a_sync_leader_waits_for_the_ack(
    stores: Callable[..., Store],
) -> None:
    leader = stores("leader", SYNC_LEADER)

    async def go() -> None:
        gate = ReadGate(leader, HeadWatch(leader), follower=False)
        answer = unacked_write(leader)
        await _committed(leader, 1)
        with pytest.raises(CatchingUp, match="holds positions up to 0"):
            await gate.admit(1, 0.2)

        waiting = asyncio.ensure_future(gate.admit(1, 10))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        leader.replica_acked("f1", 1, 1, 0)
        await waiting
        await answer

    run(go())


def test_a_leader_whose_lease_lapsed_shows_nothing_more(stores: Callable[..., Store]) -> None:
    leader = stores("leader", SYNC_LEADER)
    lease = [True]
    leader.set_fence(lambda: lease[0])

    async def go() -> None:
        answer = unacked_write(leader)
        await _committed(leader, 1)
        lease[0] = False
        leader.replica_acked("f1", 1, 1, 0)
        with pytest.raises(NotLeader):
            await answer
        assert leader.head == 0
        assert leader.read_all(1, backwards=False, limit=10) == []

    run(go())


def test_a_follower_shows_its_log_only_up_to_its_leaders_visible_head(
    stores: Callable[..., Store],
) -> None:
    leader = stores("leader", SYNC_LEADER)
    follower = stores("follower", FOLLOWER)

    async def go() -> None:
        answer = unacked_write(leader)
        await _committed(leader, 1)
        follower.adopt_store_id(leader.store_id)
        await apply_all(follower, leader.frames_after(0, set()))

        follower.leader_visible(leader.head)  # what the frame says: nothing yet
        assert (follower.log_head, follower.head) == (1, 0)
        assert readable(follower) == []

        leader.replica_acked("f1", 1, 1, 0)
        await answer
        follower.leader_visible(leader.head)  # the next heartbeat
        assert follower.head == 1
        assert readable(follower) == readable(leader) == [("s", b"1", False)]

        follower.leader_visible(7)  # a leader ahead: never beyond this node's own log
        assert follower.head == 1

    run(go())


def test_a_promoted_follower_shows_its_whole_log(stores: Callable[..., Store]) -> None:
    leader = stores("leader", SYNC_LEADER)
    follower = stores("follower", SYNC_FOLLOWER)

    async def go() -> None:
        unacked_write(leader)
        await _committed(leader, 1)
        follower.adopt_store_id(leader.store_id)
        await apply_all(follower, leader.frames_after(0, set()))
        assert follower.head == 0  # its leader never said it is visible

    run(go())
    follower.promote(follower.term + 1)

    assert follower.head == follower.log_head == 1  # its log is the truth now
    assert readable(follower) == [("s", b"1", False)]

    async def next_write() -> None:  # and from here on, as a leader: once acked
        follower.append(append("s", "alice", "2"))
        await _committed(follower, 2)

    run(next_write())
    assert (follower.log_head, follower.head) == (2, 1)


def test_a_single_node_shows_every_commit_at_once(stores: Callable[..., Store]) -> None:
    single = stores("single")

    async def go() -> None:
        await single.append(append("s", "alice", "1"))

    run(go())
    assert single.head == single.log_head == 1
    assert readable(single) == [("s", b"1", False)]


def test_a_deposed_node_that_truncates_shows_nothing_of_what_replaces_its_tail(
    stores: Callable[..., Store],
) -> None:
    leader = stores("leader", SYNC_LEADER)
    node = stores("node", SYNC_FOLLOWER)

    async def go() -> None:
        unacked_write(leader)
        await _committed(leader, 1)
        node.adopt_store_id(leader.store_id)
        await apply_all(node, leader.frames_after(0, set()))

    run(go())
    node.promote(node.term + 1)
    assert node.head == 1  # all of its log, while it leads
    node.demote("other:1", node.term + 1)
    node.truncate_after(0)  # the new leader never held that commit

    assert node.head == node.log_head == 0
    run(catch_up(node, leader))  # position 1 again, now from its (new) leader
    assert (node.log_head, node.head) == (1, 0)  # not visible until that leader says so


async def catch_up(follower: Store, leader: Store) -> None:
    await apply_all(follower, leader.frames_after(follower.journal_head(), set()))
