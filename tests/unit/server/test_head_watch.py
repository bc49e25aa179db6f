"""The read gate: CatchingUp before a follower's first catch-up, and the min_position wait.

A real store; the waits are woken by its writer's commit notifications,
driven from a thread the way RPC handlers drive the writer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lethedb_server.api.head_watch import HeadWatch, ReadGate
from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.store import Store
from lethedb_server.errors import CatchingUp

TIMEOUT = 10.0


def append(store: Store, count: int = 1) -> int:
    event = ProposedEvent(b"", "Happened", "", "application/json", b"{}", b"")
    command = AppendCommand("watched", (event,) * count)
    return store.writer.append(command, timeout=TIMEOUT).last_position


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


def test_a_node_that_writes_its_own_log_refuses_a_min_position_beyond_it_at_once(
    store: Store,
):
    """Only its own writes could bring the position, so the read is not made to wait.

    (A follower waits for its leader's commits: tests/integration/
    test_replication_service.py; a sync leader waits for the acks of what its
    log already holds: test_visibility.py.)
    """
    gate = ReadGate(store, HeadWatch(store), follower=False)
    head = append(store)
    with pytest.raises(CatchingUp) as refused:
        run(gate.admit(head + 5, time_remaining=TIMEOUT))
    assert f"ends at position {head}" in str(refused.value)
    assert f"min_position {head + 5}" in str(refused.value)


def test_a_read_within_the_head_passes_at_once(store: Store):
    gate = ReadGate(store, HeadWatch(store), follower=False)
    head = append(store, 3)
    run(gate.admit(head, time_remaining=0.0))
    run(gate.admit(0, time_remaining=None))


def test_a_follower_serves_no_read_before_its_first_catch_up(store: Store):
    gate = ReadGate(store, HeadWatch(store), follower=True)
    with pytest.raises(CatchingUp, match="has not caught up"):
        run(gate.admit(0, time_remaining=TIMEOUT))
    gate.mark_caught_up()
    run(gate.admit(0, time_remaining=TIMEOUT))


def test_a_read_with_min_position_also_waits_for_the_first_catch_up(store: Store):
    gate = ReadGate(store, HeadWatch(store), follower=True)
    head = append(store)

    async def scenario() -> None:
        waiting = asyncio.create_task(gate.admit(head, time_remaining=TIMEOUT))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        gate.mark_caught_up()
        await waiting

    run(scenario())
