"""Replication in the engine: a leader Store's commits applied by a follower Store.

Two real stores on real LMDB directories in one process: frames go from
``leader.frames_after`` to ``follower.apply_replicated`` by hand, which is
exactly what the Replication service and the follower loop do over gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import pytest

from lethedb_server.engine.model import (
    AppendCommand,
    CheckpointCommand,
    CommitCommand,
    ExpectedState,
    ForgetCommand,
    LegalHoldCommand,
    ProposedEvent,
    SubjectState,
)
from lethedb_server.engine.replication import REPLICATED_TABLES, CommitFrame, RowChange
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.engine.verify import verify_data_dir
from lethedb_server.errors import (
    IdempotencyConflict,
    NotEnoughReplicas,
    NotLeader,
    ReplicationRefused,
    WrongExpectedVersion,
)
from lethedb_server.storage import codec
from lethedb_server.storage.log import GENESIS_MAX_BYTES, GENESIS_MAX_ITEMS, LogStore

T = TypeVar("T")
LEADER_ADDRESS = "leader.example:7000"
FOLLOWER = StoreOptions(role="follower", leader=LEADER_ADDRESS)


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)  # a bound against a hang, not a timing

    return asyncio.run(bounded())


def call(queue: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Queue a write (the store answers with a future of the running loop) and wait."""

    async def go() -> T:
        return await queue(*args)

    return run(go())


def event(subject: str, text: str) -> ProposedEvent:
    return ProposedEvent(b"", "Changed", subject, "application/json", text.encode(), b"")


def append(stream: str, subject: str, *texts: str, key: str = "") -> AppendCommand:
    return AppendCommand(stream, tuple(event(subject, t) for t in texts), idempotency_key=key)


def write(store: Store, *commands: Any) -> list[Any]:
    """Run each write through the store's façade, in order; return the answers."""
    calls: dict[type, Callable[[Any], Awaitable[Any]]] = {
        AppendCommand: store.append,
        CommitCommand: store.commit,
        ForgetCommand: store.forget,
        LegalHoldCommand: store.set_legal_hold,
        CheckpointCommand: store.store_checkpoint,
    }

    async def go() -> list[Any]:
        return [await calls[type(c)](c) for c in commands]

    return run(go())


def replicate(leader: Store, follower: Store, sent_keys: set[tuple[str, int]] | None = None) -> int:
    """Move every commit the follower lacks, a page of frames at a time; return how many."""
    sent = set() if sent_keys is None else sent_keys
    follower.adopt_store_id(leader.store_id)
    moved = 0
    while frames := leader.frames_after(follower.journal_head(), sent, max_frames=3):
        run(apply_all(follower, frames))
        moved += len(frames)
    follower.leader_visible(leader.head)  # as the frames and heartbeats on the wire say
    return moved


async def apply_all(follower: Store, frames: list[CommitFrame]) -> list[int]:
    """Queue every frame before awaiting any (they may share one writer commit)."""
    return list(await asyncio.gather(*[follower.apply_replicated(f) for f in frames]))


def records(store: Store) -> list[bytes]:
    with store.log.lmdb.read() as txn:
        return store.log.records_between(txn, 1, store.log_head)


def rows(store: Store, table: str) -> list[tuple[bytes, bytes]]:
    with store.log.lmdb.read() as txn:
        return list(store.log.rows(txn, table))


def journal(store: Store) -> list[tuple[int, bytes]]:
    with store.log.lmdb.read() as txn:
        return list(store.log.journal_after(txn, 0))


def readable(store: Store) -> list[tuple[str, bytes, bool]]:
    return [
        (e.stream_id, e.data, e.redacted) for e in store.read_all(1, backwards=False, limit=1000)
    ]


@pytest.fixture
def leader(stores: Callable[..., Store]) -> Store:
    return stores("leader")


@pytest.fixture
def follower(stores: Callable[..., Store]) -> Store:
    return stores("follower", FOLLOWER)


def busy_history(leader: Store) -> None:
    """One of every kind of replicated write."""
    write(
        leader,
        append("orders-1", "alice", "a1", "a2"),
        append("orders-2", "", "store event"),
        append("orders-1", "bob", "b1", key="k-1"),
        CommitCommand((append("x", "carol", "c1"), append("y", "alice", "a3")), "k-2"),
        LegalHoldCommand("carol", "litigation"),
        LegalHoldCommand("dave", "short-lived"),
        LegalHoldCommand("dave", release=True),
        CheckpointCommand("projector", 3),
        ForgetCommand("bob", "asked to", "admin"),
        CheckpointCommand("projector", 5),
        append("orders-1", "alice", "a4"),
    )


# -- what a follower holds ----------------------------------------------------------------


def test_a_follower_holds_the_leaders_records_rows_and_journal_byte_for_byte(
    leader: Store, follower: Store
) -> None:
    busy_history(leader)

    replicate(leader, follower)

    assert follower.store_id == leader.store_id
    assert records(follower) == records(leader)
    assert follower.chain_head == leader.chain_head
    assert (follower.log_head, follower.journal_head()) == (leader.log_head, leader.journal_head())
    assert journal(follower) == journal(leader)
    for table in ("streams", "idempotency", "legal_holds", "checkpoints"):
        assert rows(follower, table) == rows(leader, table), table
    assert [k for k, _ in rows(follower, "tombstones")] == [b"bob"]
    assert readable(follower) == readable(leader)
    assert follower.read_stream("orders-1", 0, backwards=False, limit=10) == leader.read_stream(
        "orders-1", 0, backwards=False, limit=10
    )
    assert follower.checkpoint("projector") == 5
    assert follower.receipt("carol").on_hold


def test_each_commit_that_changes_replicated_state_writes_one_journal_entry(
    leader: Store,
) -> None:
    write(leader, append("s", "alice", "1", key="k"))
    write(leader, append("s", "alice", "1", key="k"))  # deduplicated: nothing written
    write(leader, ForgetCommand("nobody", "r", "admin"), ForgetCommand("nobody", "r", "admin"))
    write(leader, CheckpointCommand("g", 1))

    entries = [codec.decode_journal(raw) for _, raw in journal(leader)]

    assert [commit for commit, _ in journal(leader)] == [1, 2, 3]
    first, forget, checkpoint = entries
    assert (first.term, first.first_position, first.last_position) == (1, 1, 1)
    assert set(first.touched) == {("streams", b"s"), ("idempotency", b"k")}
    assert (forget.first_position, forget.last_position) == (2, 2)  # the erasure event
    assert ("tombstones", b"nobody") in forget.touched
    assert (checkpoint.first_position, checkpoint.last_position) == (3, 2)  # no record
    assert checkpoint.touched == (("checkpoints", b"g"),)
    assert leader.term == 1


def test_a_refused_command_leaves_nothing_in_the_journal(leader: Store) -> None:
    write(leader, append("s", "alice", "1"))
    with pytest.raises(WrongExpectedVersion):
        write(leader, AppendCommand("s", (event("alice", "2"),), ExpectedState.EXACT, 7))

    assert leader.journal_head() == 1


def test_frames_page_and_a_follower_continues_after_a_restart(
    leader: Store, stores: Callable[..., Store]
) -> None:
    follower = stores("follower", FOLLOWER)
    for i in range(7):
        write(leader, append(f"s-{i % 2}", f"subject-{i}", str(i)))
    assert len(leader.frames_after(0, set(), max_frames=3)) == 3
    assert len(leader.frames_after(0, set(), max_bytes=1)) == 1  # at least one frame

    replicate(leader, follower)
    follower.close()
    write(leader, append("s-0", "subject-0", "after the restart"))
    follower = stores("follower", FOLLOWER)

    assert follower.journal_head() == 7
    frames = leader.frames_after(follower.journal_head(), set())
    assert [f.commit for f in frames] == [8]
    run(apply_all(follower, frames))
    follower.leader_visible(leader.head)  # a follower shows nothing its leader has not said
    assert records(follower) == records(leader)
    assert readable(follower) == readable(leader)


def test_a_frame_already_held_is_a_no_op_success(leader: Store, follower: Store) -> None:
    write(leader, append("s", "alice", "1"), append("s", "alice", "2"))
    replicate(leader, follower)

    again = run(apply_all(follower, leader.frames_after(0, set())))

    assert again == [1, 2]
    assert records(follower) == records(leader)


# -- keys ------------------------------------------------------------------------------


def test_a_frame_carries_each_data_key_once_per_stream(leader: Store) -> None:
    write(leader, append("s", "alice", "1"), append("s", "alice", "2"), append("t", "", "x"))
    sent: set[tuple[str, int]] = set()

    frames = leader.frames_after(0, sent)

    carried = [(k.subject_id, k.version) for f in frames for k in f.keys]
    assert carried == [("alice", 1), ("$store", 1)]
    assert sent == set(carried)
    assert all(not f.keys for f in leader.frames_after(0, sent))  # already sent


def test_a_forgotten_subjects_key_is_never_in_a_frame(leader: Store, follower: Store) -> None:
    write(leader, append("s", "alice", "secret"), append("s", "bob", "kept"))
    write(leader, ForgetCommand("alice", "asked to", "admin"))

    frames = leader.frames_after(0, set())
    replicate(leader, follower)

    assert "alice" not in {k.subject_id for f in frames for k in f.keys}
    assert readable(follower) == readable(leader)
    assert readable(follower)[0] == ("s", b"", True)  # redacted, as on the leader
    assert follower.receipt("alice").state is not SubjectState.ACTIVE


def test_a_tombstone_deletes_the_subjects_keys_on_the_follower_with_its_own_shred_epoch(
    leader: Store, follower: Store
) -> None:
    write(leader, append("s", "alice", "secret"))
    replicate(leader, follower)
    call(follower.shred)  # the follower shreds on its own schedule: its epoch is 1
    assert follower.keys.versions_of("alice") == [1]

    write(leader, ForgetCommand("alice", "asked to", "admin"))
    replicate(leader, follower)

    assert follower.keys.versions_of("alice") == []
    assert follower.log.subject_status("alice")[0].shred_epoch == 2  # type: ignore[union-attr]
    assert leader.log.subject_status("alice")[0].shred_epoch == 1  # type: ignore[union-attr]
    assert follower.receipt("alice").state is SubjectState.FORGOTTEN_PENDING_SHRED
    assert readable(follower) == readable(leader)
    call(follower.shred)
    assert follower.receipt("alice").state is SubjectState.SHREDDED
    assert follower.shredded_through() == follower.log_head


def test_an_installed_key_is_never_extended_should_the_follower_lead(
    leader: Store, stores: Callable[..., Store]
) -> None:
    follower = stores("follower", FOLLOWER)
    write(leader, append("s", "alice", "1"))
    replicate(leader, follower)
    follower.close()

    promoted = stores("follower")  # the same directory, now writing on its own
    write(promoted, append("s", "alice", "2"))

    versions = [e.dek_version for e in map(codec.decode_record, records(promoted))]
    assert versions == [1, 2]  # a new key: the leader's use of version 1 is unknown here
    assert [e.data for e in promoted.read_stream("s", 0, backwards=False, limit=9)] == [
        b"1",
        b"2",
    ]


# -- idempotency entries ------------------------------------------------------------------


def test_a_retry_against_a_promoted_follower_is_deduplicated_and_a_reused_key_refused(
    leader: Store, stores: Callable[..., Store]
) -> None:
    follower = stores("follower", FOLLOWER)
    first = write(leader, append("orders", "alice", "one", key="k-1"))[0]
    committed = write(leader, CommitCommand((append("a", "bob", "x"), append("b", "", "y")), "k-2"))
    replicate(leader, follower)
    follower.close()
    promoted = stores("follower")

    retry = write(promoted, append("orders", "alice", "one", key="k-1"))[0]
    commit_retry = write(
        promoted, CommitCommand((append("a", "bob", "x"), append("b", "", "y")), "k-2")
    )[0]

    assert retry.deduplicated
    assert (retry.first_position, retry.last_position) == (
        first.first_position,
        first.last_position,
    )
    assert commit_retry.deduplicated
    assert [r.first_position for r in commit_retry.results] == [
        r.first_position for r in committed[0].results
    ]
    with pytest.raises(IdempotencyConflict):
        write(promoted, append("orders", "alice", "other content", key="k-1"))
    assert promoted.log_head == leader.log_head


# -- what a follower refuses ------------------------------------------------------------


def _relinked(frame: CommitFrame, **changes: Any) -> CommitFrame:
    """*frame* with fields changed and a journal entry that still matches them."""
    entry = codec.decode_journal(frame.journal_entry)
    entry = codec.JournalEntry(
        changes.get("term", entry.term),
        changes.get("first_position", entry.first_position),
        changes.get("last_position", entry.last_position),
        entry.committed_at,
        entry.touched,
        entry.everything,
    )
    return dataclasses.replace(frame, journal_entry=codec.encode(entry), **changes)


def _tampered(frame: CommitFrame) -> CommitFrame:
    record = bytearray(frame.records[0])
    record[5] ^= 1
    return dataclasses.replace(frame, records=(bytes(record), *frame.records[1:]))


REFUSALS: dict[str, Callable[[list[CommitFrame]], CommitFrame]] = {
    "a gap": lambda frames: frames[2],
    "a record that does not link": lambda frames: _tampered(frames[1]),
    "a lower term": lambda frames: _relinked(frames[1], term=0),
    "a journal entry that does not match": lambda frames: dataclasses.replace(
        frames[1], last_position=frames[1].last_position + 1
    ),
    "positions after a gap": lambda frames: _relinked(
        frames[1],
        first_position=frames[1].first_position + 1,
        last_position=frames[1].last_position + 1,
    ),
    "a row of a local table": lambda frames: dataclasses.replace(
        frames[1], changes=(*frames[1].changes, _row("epochs"))
    ),
}


def _row(table: str) -> RowChange:
    return RowChange(table, b"k", b"v")


@pytest.mark.parametrize("case", REFUSALS)
def test_a_follower_refuses_a_frame_that_does_not_follow_its_log_and_writes_nothing(
    leader: Store, follower: Store, case: str
) -> None:
    write(leader, append("s", "alice", "1"), append("s", "bob", "2"), append("s", "carol", "3"))
    frames = leader.frames_after(0, set())
    follower.adopt_store_id(leader.store_id)
    run(apply_all(follower, frames[:1]))
    before = (records(follower), journal(follower), rows(follower, "streams"), follower.chain_head)

    with pytest.raises(ReplicationRefused):
        call(follower.apply_replicated, REFUSALS[case](frames))

    after = (records(follower), journal(follower), rows(follower, "streams"), follower.chain_head)
    assert after == before
    assert follower.keys.versions_of("bob") == []
    run(apply_all(follower, frames[1:]))  # the right frames still apply
    assert records(follower) == records(leader)


def test_a_follower_holding_another_store_refuses_to_adopt_its_id(
    leader: Store, stores: Callable[..., Store]
) -> None:
    other = stores("other")
    write(other, append("s", "zed", "1"))
    other.close()
    write(leader, append("s", "alice", "1"))
    follower = stores("other", FOLLOWER)

    with pytest.raises(ReplicationRefused, match="holds another store"):
        follower.adopt_store_id(leader.store_id)

    assert follower.store_id != leader.store_id


def test_a_follower_refuses_writes_naming_its_leader(follower: Store) -> None:
    writes = [
        append("s", "alice", "1"),
        CommitCommand((append("s", "alice", "1"),)),
        ForgetCommand("alice", "r", "admin"),
        LegalHoldCommand("alice", "r"),
        CheckpointCommand("g", 0),
    ]
    for command in writes:
        with pytest.raises(NotLeader) as refused:
            write(follower, command)
        assert refused.value.leader == LEADER_ADDRESS
    follower.leader = "elsewhere:1"  # the follower loop learns of a new leader
    with pytest.raises(NotLeader) as refused:
        write(follower, writes[0])
    assert refused.value.leader == "elsewhere:1"
    assert follower.role == "follower"


def test_a_store_that_is_not_a_follower_refuses_frames(leader: Store) -> None:
    write(leader, append("s", "alice", "1"))
    with pytest.raises(ReplicationRefused, match="not a follower"):
        leader.apply_replicated(leader.frames_after(0, set())[0])


# -- the follower's data directory --------------------------------------------------------


def test_a_follower_directory_reopens_cleanly_with_its_tombstones(
    leader: Store, stores: Callable[..., Store]
) -> None:
    follower = stores("follower", FOLLOWER)
    busy_history(leader)
    replicate(leader, follower)
    follower.close()

    reopened = stores("follower", FOLLOWER)
    reopened.leader_visible(leader.head)  # a follower shows nothing its leader has not said

    assert reopened.store_id == leader.store_id
    assert reopened.journal_head() == leader.journal_head()
    assert readable(reopened) == readable(leader)
    assert reopened.keys.versions_of("bob") == []
    reopened.close()
    assert readable(stores("follower")) == readable(leader)  # and as a store of its own


def test_a_store_that_predates_the_journal_is_journalled_at_start_up(
    stores: Callable[..., Store],
) -> None:
    old = stores("old")
    busy_history(old)
    _close_as_before_the_journal(old)

    leader = stores("old")
    follower = stores("follower", FOLLOWER)

    records_entry, rows_entry = leader.frames_after(0, set())  # small: one of each
    assert (records_entry.first_position, records_entry.last_position) == (1, leader.log_head)
    assert records_entry.changes == ()
    assert rows_entry.records == ()
    assert {c.table for c in rows_entry.changes} == set(REPLICATED_TABLES)
    replicate(leader, follower)
    write(leader, append("orders-1", "alice", "after the upgrade"))
    replicate(leader, follower)
    assert records(follower) == records(leader)
    assert journal(follower) == journal(leader)
    assert follower.journal_head() == 3
    for table in ("streams", "idempotency", "legal_holds", "checkpoints"):
        assert rows(follower, table) == rows(leader, table), table
    assert readable(follower) == readable(leader)


def test_a_store_that_predates_the_journal_journals_it_when_promoted_from_follower(
    stores: Callable[..., Store],
) -> None:
    """An upgraded node that joins a cluster as a follower and is then elected."""
    old = stores("old")
    busy_history(old)
    _close_as_before_the_journal(old)

    member = stores("old", FOLLOWER)
    assert member.journal_head() == 0  # a follower writes no journal of its own
    member.promote(member.term + 1)
    follower = stores("follower", FOLLOWER)
    replicate(member, follower)
    assert records(follower) == records(member)
    assert readable(follower) == readable(member)


def test_the_genesis_of_a_large_store_is_bounded_entries(stores: Callable[..., Store]) -> None:
    old = stores("old")
    big = "x" * 300_000  # 20 records of 300 kB: 6 MB, over the 2 MiB bound of an entry
    write(old, *(append(f"s-{i}", f"subject-{i}", big, key=f"k-{i}") for i in range(20)))
    _close_as_before_the_journal(old)

    leader = stores("old")
    follower = stores("follower", FOLLOWER)

    frames = leader.frames_after(0, set(), max_frames=1000, max_bytes=1 << 40)
    assert len(frames) == leader.journal_head() > 3
    positions = [p for f in frames for p in range(f.first_position, f.last_position + 1)]
    assert positions == list(range(1, leader.log_head + 1))  # each once, in order
    for frame in frames:
        assert sum(len(r) for r in frame.records) <= GENESIS_MAX_BYTES or len(frame.records) == 1
        assert sum(len(c.key) + len(c.value or b"") for c in frame.changes) <= GENESIS_MAX_BYTES
        assert len(frame.records) + len(frame.changes) <= GENESIS_MAX_ITEMS
    touched = {(c.table, c.key) for f in frames for c in f.changes}
    for table in REPLICATED_TABLES:
        assert {(table, k) for k, _ in rows(leader, table)} <= touched, table
    replicate(leader, follower)
    assert records(follower) == records(leader)
    assert rows(follower, "idempotency") == rows(leader, "idempotency")
    assert readable(follower) == readable(leader)


def test_genesis_entries_list_the_side_table_rows_in_bounded_chunks(
    stores: Callable[..., Store], tmp_path: Path
) -> None:
    old = stores("old")
    busy_history(old)
    _close_as_before_the_journal(old)
    log_store = LogStore(tmp_path / "old" / "log")
    try:
        written = log_store.write_genesis(1, 0, max_bytes=1 << 20, max_items=2)
        with log_store.lmdb.read() as txn:
            entries = [codec.decode_journal(v) for _, v in log_store.journal_after(txn, 0)]
            every_row = [(t, k) for t in REPLICATED_TABLES for k, _ in log_store.rows(txn, t)]
    finally:
        log_store.close()

    assert written == len(entries) == log_store.journal_head
    assert all(len(e.touched) + e.last_position - e.first_position + 1 <= 2 for e in entries)
    assert [p for e in entries for p in range(e.first_position, e.last_position + 1)] == list(
        range(1, log_store.head + 1)
    )
    assert [row for e in entries for row in e.touched] == every_row


def _close_as_before_the_journal(store: Store) -> None:
    """Close *store* and make its log look as it did before the journal existed."""
    store.close()
    env = lmdb.open(str(store.data_dir / "log"), max_dbs=20)
    try:
        with env.begin(write=True) as txn:
            txn.drop(env.open_db(b"journal", txn=txn), delete=True)
    finally:
        env.close()


# -- the leader's bookkeeping and synchronous replication ------------------------------------


def test_the_leader_tracks_each_followers_position_and_lag(leader: Store) -> None:
    write(leader, append("s", "alice", "1"), append("s", "alice", "2", "3"))
    leader.replica_connected("f1", "f1.example:7000")
    leader.replica_acked("f1", 1, 1, 0)
    leader.replica_connected("f2", "f2.example:7000")
    leader.replica_acked("f2", 2, 3, 0)
    leader.replica_disconnected("f2")

    states = {s.node_id: s for s in leader.followers()}

    f1, f2 = states["f1"], states["f2"]
    assert (f1.connected, f1.advertise, f1.commit, f1.position) == (True, "f1.example:7000", 1, 1)
    assert f1.lag_positions == 2
    assert f1.lag_seconds >= 0
    assert (f2.connected, f2.lag_positions, f2.lag_seconds) == (False, 0, 0.0)


def _sync_leader(stores: Callable[..., Store], timeout: float) -> Store:
    return stores("leader", StoreOptions(role="leader", sync_replicas=1, sync_timeout_s=timeout))


async def _committed(store: Store, commit: int) -> None:
    while store.journal_head() < commit:
        await asyncio.sleep(0.01)


def test_a_synchronous_write_is_answered_once_a_follower_acked_its_commit(
    stores: Callable[..., Store],
) -> None:
    leader = _sync_leader(stores, timeout=60)
    leader.replica_connected("f1", "f1:1")

    async def go() -> None:
        answer = leader.append(append("s", "alice", "1"))
        await _committed(leader, 1)
        await asyncio.sleep(0.05)
        assert not answer.done()  # committed, but no follower holds it yet
        leader.replica_acked("f1", 1, 1, 0)
        result = await answer
        assert result.last_position == 1

    run(go())


def test_a_synchronous_write_without_an_ack_fails_and_its_retry_waits_too(
    stores: Callable[..., Store],
) -> None:
    leader = _sync_leader(stores, timeout=0.2)
    leader.replica_connected("f1", "f1:1")

    async def go() -> None:
        with pytest.raises(NotEnoughReplicas, match="0 of the 1"):
            await leader.append(append("s", "alice", "1", key="k"))
        assert leader.log_head == 1  # committed here, just not acknowledged ...
        assert leader.head == 0  # ... so no reader sees it
        retry = leader.append(append("s", "alice", "1", key="k"))
        await asyncio.sleep(0.05)
        assert not retry.done()
        leader.replica_acked("f1", 1, 1, 0)
        result = await retry
        assert result.deduplicated
        assert leader.head == 1  # held by the follower now: visible

    run(go())


def test_refused_writes_are_answered_at_once_by_a_synchronous_leader(
    stores: Callable[..., Store],
) -> None:
    leader = _sync_leader(stores, timeout=60)

    async def go() -> None:
        with pytest.raises(WrongExpectedVersion):
            await leader.append(AppendCommand("s", (event("a", "1"),), ExpectedState.EXACT, 4))

    run(go())


def test_journal_listeners_hear_each_commit(leader: Store) -> None:
    heard: list[int] = []
    leader.on_journal(heard.append)

    write(leader, append("s", "alice", "1"), CheckpointCommand("g", 1))
    write(leader, append("s", "alice", "1", key="k"), append("s", "alice", "1", key="k"))

    assert heard == [1, 2, 3]


def test_a_follower_directory_passes_the_offline_verify(
    leader: Store, stores: Callable[..., Store], tmp_path: Path
) -> None:
    follower = stores("follower", FOLLOWER)
    busy_history(leader)
    replicate(leader, follower)
    follower.close()

    report = verify_data_dir(tmp_path / "follower", tmp_path / "follower" / "master.keyring")

    assert report.ok, [str(d) for d in report.damage]
    assert report.tags_checked
