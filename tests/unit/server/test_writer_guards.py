"""The writer's guards: one process, and time that cannot reorder anything."""

from __future__ import annotations

import os

import pytest

from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.errors import ForkedProcess

HOUR = 3600 * 10**9


def _command(key: str = "", stream: str = "s") -> AppendCommand:
    event = ProposedEvent(b"", "T", "subject-1", "text/plain", b"x", b"")
    return AppendCommand(stream, (event,), idempotency_key=key)


def test_a_forked_child_cannot_write_through_its_parents_store(store):
    store.writer.append(_command())
    pid = os.fork()
    if pid == 0:  # the child: must be refused at once, not hang
        try:
            store.writer.submit(_command())
        except ForkedProcess:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.writer.append(_command()).first_position == 2


class _Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_a_clock_set_backwards_reorders_nothing_and_keeps_idempotency(store):
    clock = _Clock(1_000 * HOUR)
    store.writer.clock = clock
    first = store.writer.append(_command("key-1"))

    clock.now -= 5 * HOUR  # an NTP step or an operator's mistake
    second = store.writer.append(_command("key-2"))
    retried = store.writer.append(_command("key-1"))

    assert second.first_position == first.first_position + 1
    assert second.recorded_at >= first.recorded_at
    assert retried.deduplicated
    assert retried.first_position == first.first_position
    events = store.reader.read_all(1, backwards=False, limit=10)
    assert [e.position for e in events] == [1, 2]
    assert events[1].recorded_at >= events[0].recorded_at


def test_the_sweeper_never_expires_a_key_early_after_the_clock_went_back(store):
    clock = _Clock(1_000 * HOUR)
    store.writer.clock = clock
    store.writer.append(_command("key-1"))
    clock.now -= 30 * HOUR  # further back than the 24 h window

    assert store.writer._sweep_idempotency() == 0
    assert store.writer.append(_command("key-1")).deduplicated


@pytest.mark.parametrize("jump", [-HOUR, HOUR])
def test_positions_and_versions_do_not_depend_on_the_clock(store, jump):
    clock = _Clock(500 * HOUR)
    store.writer.clock = clock
    results = []
    for _ in range(5):
        results.append(store.writer.append(_command()))
        clock.now += jump
    assert [r.first_position for r in results] == [1, 2, 3, 4, 5]
    assert [r.first_version for r in results] == [0, 1, 2, 3, 4]
