"""The lease fence: a leader releases an answer only while its lease holds.

``Store.set_fence(check)`` (an elected leader passes ``Election.is_leader_now``)
is asked as each answer is released, after the sync gate. When it says no,
a successful write is answered NotLeader with the leader unknown: it is
committed on this node but never acknowledged, and a retry with the same
idempotency key, once the fence allows again, is deduplicated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import NotLeader

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)  # a bound against a hang, not a timing

    return asyncio.run(bounded())


def order(key: str) -> AppendCommand:
    event = ProposedEvent(b"", "OrderPlaced", "", "application/json", b"{}", b"")
    return AppendCommand("orders", (event,), idempotency_key=key)


class Lease:
    """A fence the test opens and closes."""

    def __init__(self) -> None:
        self.holds = True

    def __call__(self) -> bool:
        return self.holds


@pytest.fixture
def lease() -> Lease:
    return Lease()


@pytest.fixture
def leader(tmp_path: Path, lease: Lease) -> Iterator[Store]:
    store = Store.open(tmp_path / "leader", StoreOptions(role="leader"))
    store.set_fence(lease)
    yield store
    store.close()


def test_a_write_released_after_the_lease_lapsed_is_not_acknowledged(
    leader: Store, lease: Lease
) -> None:
    lease.holds = False

    async def go() -> None:
        with pytest.raises(NotLeader) as refused:
            await leader.append(order("k1"))
        assert refused.value.leader == ""  # unknown: the client tries its other hosts
        assert leader.head == 1  # committed here, never acknowledged
        lease.holds = True
        retry = await leader.append(order("k1"))
        assert (retry.last_position, retry.deduplicated) == (1, True)

    run(go())


def test_an_answer_held_for_a_follower_is_refused_if_the_lease_lapsed_meanwhile(
    tmp_path: Path, lease: Lease
) -> None:
    options = StoreOptions(role="leader", sync_replicas=1, sync_timeout_s=60)
    with Store.open(tmp_path / "sync", options) as leader:
        leader.set_fence(lease)
        leader.replica_connected("f1", "f1:1")

        async def go() -> None:
            answer = leader.append(order("k1"))
            while leader.journal_head() < 1:
                await asyncio.sleep(0.01)
            lease.holds = False
            leader.replica_acked("f1", 1, 1, 0)
            with pytest.raises(NotLeader):
                await answer

        run(go())


def test_without_a_fence_every_answer_is_released(tmp_path: Path) -> None:
    with Store.open(tmp_path / "single") as store:
        store.set_fence(None)

        async def go() -> None:
            result = await store.append(order("k"))
            assert (result.last_position, result.deduplicated) == (1, False)

        run(go())
