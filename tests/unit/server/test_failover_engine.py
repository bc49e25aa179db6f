"""Failover in the engine: promotion, demotion, and a deposed leader's truncation.

Real stores on real LMDB directories in one process. Frames move by hand
(``frames_after`` -> ``apply_replicated``) and acks by ``replica_acked``,
which is what the Replication service and the follower loop do over gRPC;
the election (etcd) is the caller of ``promote`` and ``demote`` here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lethedb_server.engine.model import (
    AppendCommand,
    CheckpointCommand,
    CommitCommand,
    ExclusiveTask,
    ForgetCommand,
    LegalHoldCommand,
)
from lethedb_server.engine.replication import REPLICATED_TABLES
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.engine.verify import verify_data_dir
from lethedb_server.engine.writer import WriterLimits
from lethedb_server.errors import NotEnoughReplicas, NotLeader, ReplicationRefused
from lethedb_server.storage import codec
from tests.unit.server.test_replication_engine import (
    FOLLOWER,
    append,
    apply_all,
    journal,
    readable,
    records,
    replicate,
    rows,
    run,
    write,
)

#: A leader whose writes are acknowledged once one follower holds them.
SYNC = StoreOptions(role="leader", sync_replicas=1, sync_timeout_s=60)
SYNC_FOLLOWER = StoreOptions(role="follower", leader="a:1", sync_replicas=1, sync_timeout_s=60)


def submit(store: Store, command: Any) -> asyncio.Future[Any]:
    calls: dict[type, Callable[[Any], asyncio.Future[Any]]] = {
        AppendCommand: store.append,
        CommitCommand: store.commit,
        ForgetCommand: store.forget,
        LegalHoldCommand: store.set_legal_hold,
        CheckpointCommand: store.store_checkpoint,
    }
    return calls[type(command)](command)


def write_acked(leader: Store, follower: Store, *commands: Any) -> list[Any]:
    """Write through a synchronous leader while *follower* applies and acks its commits."""

    def replicate_and_ack() -> None:
        replicate(leader, follower)
        leader.replica_acked(
            "b", follower.journal_head(), follower.log_head, 0, ack_term(leader, follower)
        )

    async def go() -> list[Any]:
        leader.replica_connected("b", "b:1")
        answers = [submit(leader, c) for c in commands]
        while not all(a.done() for a in answers):
            await asyncio.to_thread(replicate_and_ack)
            await asyncio.sleep(0.005)
        follower.leader_visible(leader.head)  # the next heartbeat: what the acks made visible
        return [a.result() for a in answers]

    return run(go())


def commit_unacknowledged(leader: Store, *commands: Any) -> None:
    """Writes that commit on a synchronous *leader* and that no follower acks.

    Their answers stay held (never acknowledged) until the leader is demoted
    or closed; this returns once all of them are committed.
    """

    async def go() -> None:
        for command in commands:
            submit(leader, command)
        await asyncio.to_thread(leader.writer.execute, ExclusiveTask(lambda: None))

    run(go())


def follow(leader: Store, follower: Store) -> int:
    """What the follower loop and the service do on (re)connecting: truncate where the
    leader says, then follow, the first frame refreshing the tables a truncation cannot
    restore. Returns the rounds of hellos it took; the leader must have a commit to send.
    """
    rounds = 1
    point = leader.divergence_point(follower.journal_head(), follower.journal_term())
    while point < follower.journal_head():
        follower.truncate_after(point)
        point = leader.divergence_point(follower.journal_head(), follower.journal_term())
        rounds += 1
    sent: set[tuple[str, int]] = set()
    first = leader.frames_after(follower.journal_head(), sent, max_frames=1, refresh=True)
    assert first, "the leader has no commit to send the refresh with"
    run(apply_all(follower, first))
    replicate(leader, follower, sent)
    ack(leader, follower)
    return rounds


def ack(leader: Store, follower: Store, name: str = "f") -> None:
    """What the follower's acks and the leader's next heartbeat do: the leader counts the
    follower's durable commit, and the follower hears the visible head that made."""
    leader.replica_connected(name, f"{name}:1")
    leader.replica_acked(
        name, follower.journal_head(), follower.log_head, 0, ack_term(leader, follower)
    )
    follower.leader_visible(leader.head)


def ack_term(leader: Store, follower: Store) -> int:
    """The term an ack carries: the leader's it answers (from its welcome), or the
    follower's own if it has seen a later one. Not the term of the follower's last
    journal entry: before its first frame is applied that is 0, and a leader
    refuses an ack of an earlier term."""
    return max(leader.term, follower.term)


def fail_over(old: Store, new: Store) -> int:
    """*new* leads term 2 and writes its first commit; *old* follows it (see :func:`follow`)."""
    new.promote(2)
    old.demote("b:1", 2)
    commit_unacknowledged(new, append("orders-1", "carol", "c-new"))
    return follow(new, old)


def tail_history(store: Store) -> None:
    """One of each kind of write, on streams and subjects the common history has."""
    commit_unacknowledged(
        store,
        append("orders-1", "alice", "a-lost"),
        append("new-stream", "erin", "e-lost"),
        append("orders-2", "", "retried", key="k-retry"),
        ForgetCommand("bob", "asked to", "admin"),
        CheckpointCommand("projector", 9),
        LegalHoldCommand("alice", "lost hold"),
    )


def common_history() -> tuple[Any, ...]:
    return (
        append("orders-1", "alice", "a1", "a2"),
        append("orders-1", "bob", "b1", key="k-1"),
        append("orders-2", "", "store event"),
        CheckpointCommand("projector", 2),
    )


@pytest.fixture
def cluster(stores: Callable[..., Store]) -> tuple[Store, Store]:
    """A synchronous leader "a" and its follower "b", holding the same acknowledged history."""
    a, b = stores("a", SYNC), stores("b", SYNC_FOLLOWER)
    write_acked(a, b, *common_history())
    return a, b


# -- promotion --------------------------------------------------------------------------


def test_a_promoted_follower_writes_in_its_new_term(stores: Callable[..., Store]) -> None:
    a, b = stores("a"), stores("b", FOLLOWER)
    write(a, *common_history())
    replicate(a, b)
    held = b.journal_head()

    b.promote(2)
    write(b, append("orders-1", "alice", "a3"))

    assert (b.role, b.term, b.leader) == ("leader", 2, "")
    (entry,) = [codec.decode_journal(raw) for commit, raw in journal(b) if commit > held]
    assert entry.term == 2
    with pytest.raises(ReplicationRefused, match="not a follower"):
        b.apply_replicated(a.frames_after(0, set())[0])


def test_a_promoted_follower_never_extends_a_key_it_received(
    stores: Callable[..., Store],
) -> None:
    a, b = stores("a"), stores("b", FOLLOWER)
    write(a, append("s", "alice", "1"))
    replicate(a, b)

    b.promote(2)
    write(b, append("s", "alice", "2"))

    versions = [codec.decode_record(r).dek_version for r in records(b)]
    assert versions == [1, 2]  # a new key: the old leader's use of version 1 is unknown here
    assert [e.data for e in b.read_stream("s", 0, backwards=False, limit=9)] == [b"1", b"2"]


def test_terms_only_grow_and_survive_a_restart(stores: Callable[..., Store]) -> None:
    b = stores("b", FOLLOWER)
    b.demote("a:1", 3)
    for term in (0, 2, 3):
        with pytest.raises(ReplicationRefused, match="terms only grow"):
            b.promote(term)
    with pytest.raises(ReplicationRefused, match="not above"):
        b.demote("a:1", 2)
    b.promote(4)
    with pytest.raises(ReplicationRefused, match="which it leads"):
        b.demote("c:1", 4)  # two leaders of one term: never
    b.close()

    reopened = stores("b", FOLLOWER)

    assert reopened.term == 4
    with pytest.raises(ReplicationRefused):
        reopened.promote(4)
    reopened.promote(5)
    write(reopened, append("s", "alice", "1"))
    assert [codec.decode_journal(raw).term for _, raw in journal(reopened)] == [5]


def test_an_ack_from_another_term_is_refused(cluster: tuple[Store, Store]) -> None:
    a, b = cluster
    a.demote("b:1", 2)
    a.promote(3)
    a.replica_connected("b", "b:1")

    with pytest.raises(ReplicationRefused, match="below this node's term 3"):
        a.replica_acked("b", b.journal_head(), b.log_head, 0, 2)

    with pytest.raises(ReplicationRefused, match="no longer leads"):
        a.replica_acked("b", b.journal_head(), b.log_head, 0, 4)  # "b" follows a newer leader
    assert [f.commit for f in a.followers()] == [0]  # an earlier leadership's acks are gone


def test_a_promotion_is_ordered_with_the_frames_queued_around_it(
    stores: Callable[..., Store],
) -> None:
    a, b = stores("a"), stores("b", FOLLOWER)
    write(a, append("s", "alice", "1"), append("s", "alice", "2"))
    b.adopt_store_id(a.store_id)
    before, after = a.frames_after(0, set())

    async def go() -> list[Any]:
        running, held = threading.Event(), threading.Event()
        b.writer.submit(ExclusiveTask(lambda: (running.set(), held.wait())))
        await asyncio.to_thread(running.wait, 30)  # the writer waits until all is queued
        first = b.apply_replicated(before)
        promotion = asyncio.ensure_future(asyncio.to_thread(b.promote, 2))
        while b.queue_depth() < 2:  # the frame, then the promotion
            await asyncio.sleep(0.005)
        second = b.apply_replicated(after)  # still a follower: queued, refused when applied
        held.set()
        await promotion
        return await asyncio.gather(first, second, return_exceptions=True)

    applied, refused = run(go())

    assert applied == 1
    assert isinstance(refused, ReplicationRefused)
    assert "leads term 2" in str(refused)
    write(b, append("s", "alice", "3"))
    assert [e.data for e in b.read_stream("s", 0, backwards=False, limit=9)] == [b"1", b"3"]


def test_a_follower_promoted_while_behind_holds_rows_that_fit_its_own_log(
    stores: Callable[..., Store],
) -> None:
    a, b = stores("a"), stores("b", FOLLOWER)
    write(
        a,
        append("s", "alice", "1", key="k-1"),
        CheckpointCommand("projector", 1),
        append("s", "alice", "2", key="k-2"),
        CheckpointCommand("projector", 2),
    )
    b.adopt_store_id(a.store_id)
    run(apply_all(b, a.frames_after(0, set(), max_frames=2)))  # read while "a" is ahead

    b.promote(2)
    retried = write(b, append("s", "alice", "2", key="k-2"))[0]

    assert not retried.deduplicated  # "b" never held k-2's commit: written afresh
    assert (retried.first_position, retried.first_version) == (2, 1)
    assert b.checkpoint("projector") is None  # beyond its head: dropped, the group replays
    assert [e.data for e in b.read_stream("s", 0, backwards=False, limit=9)] == [b"1", b"2"]


def test_each_frame_carries_the_stream_head_of_its_own_commit(
    stores: Callable[..., Store],
) -> None:
    a = stores("a")
    write(a, *(append("s", "alice", str(i), key=f"k-{i}") for i in range(10)))

    frames = a.frames_after(0, set())

    def row(frame: Any, table: str) -> bytes | None:
        (value,) = [c.value for c in frame.changes if c.table == table]
        return value

    heads = [codec.decode_stream(row(f, "streams") or b"").last_version for f in frames]
    assert heads == list(range(10))  # not the head "a" has now
    assert all(row(f, "idempotency") is not None for f in frames)


# -- demotion -------------------------------------------------------------------------------


def test_a_demoted_leader_refuses_writes_at_once_naming_the_new_leader(
    cluster: tuple[Store, Store],
) -> None:
    a, _ = cluster

    a.demote("b.example:7000", 2)

    assert (a.role, a.term, a.leader) == ("follower", 2, "b.example:7000")
    for command in common_history():
        with pytest.raises(NotLeader) as refused:
            write(a, command)
        assert refused.value.leader == "b.example:7000"


def test_a_demotion_fails_the_answers_the_sync_gate_holds(stores: Callable[..., Store]) -> None:
    a = stores("a", StoreOptions(role="leader", sync_replicas=1, sync_timeout_s=60))

    async def go() -> BaseException | None:
        answer = a.append(append("s", "alice", "1"))
        while not a.journal_head():  # committed here, held for a follower's ack
            await asyncio.sleep(0.005)
        await asyncio.to_thread(a.demote, "b:1", 2)
        (outcome,) = await asyncio.gather(answer, return_exceptions=True)
        return outcome

    error = run(go())

    assert isinstance(error, NotEnoughReplicas)
    assert "stopped leading" in str(error)
    assert a.acknowledged_commit == 0


def test_a_follower_refuses_the_stream_of_a_leader_of_an_earlier_term(
    stores: Callable[..., Store],
) -> None:
    a, b = stores("a"), stores("b", FOLLOWER)
    write(a, append("s", "alice", "1"))
    b.adopt_store_id(a.store_id)
    b.demote("c:1", 2)  # "c" leads term 2; "a" does not know yet
    (frame,) = a.frames_after(0, set())

    with pytest.raises(ReplicationRefused, match="leader of term 1, below this node's term 2"):
        b.apply_replicated(frame, leader_term=1)

    assert b.journal_head() == 0
    run(apply_all(b, [frame]))  # the same commit, sent by the leader of term 2, is history
    assert b.journal_head() == 1


# -- truncation -----------------------------------------------------------------------------


def test_a_deposed_leader_discards_its_unacknowledged_tail_and_follows_byte_for_byte(
    cluster: tuple[Store, Store],
) -> None:
    a, b = cluster
    acknowledged = a.journal_head()
    tail_history(a)  # committed on "a", never acknowledged: "b" holds none of it
    assert a.acknowledged_commit == acknowledged < a.journal_head()

    assert fail_over(a, b) == 2  # one truncation, then a hello whose last entry "b" holds
    write_acked(b, a, append("orders-2", "", "retried", key="k-retry"))  # the client's retry

    assert a.journal_head() == b.journal_head()
    assert records(a) == records(b)
    assert journal(a) == journal(b)
    assert a.chain_head == b.chain_head
    for table in REPLICATED_TABLES:
        assert rows(a, table) == rows(b, table), table
    assert a.log.last_version("new-stream") is None
    assert a.log.last_version("orders-1") == b.log.last_version("orders-1")


def test_a_truncation_report_names_what_went(cluster: tuple[Store, Store]) -> None:
    a, b = cluster
    commit, position = a.journal_head(), a.log_head
    tail_history(a)
    tail_commits, tail_head = a.journal_head() - commit, a.log_head
    b.promote(2)
    a.demote("b:1", 2)

    report = a.truncate_after(b.divergence_point(a.journal_head(), a.journal_term()))

    assert (report.commit, report.position) == (commit, position)
    assert report.discarded_commits == tail_commits
    assert (report.first_position, report.last_position) == (position + 1, tail_head)
    assert report.forgotten_kept == ("bob",)
    assert set(report.unrestored) == {
        ("checkpoints", b"projector"),
        ("legal_holds", b"alice"),
    }
    assert (a.journal_head(), a.log_head, a.term) == (commit, position, 2)


def test_the_subject_index_a_restart_and_verify_see_the_truncated_log(
    stores: Callable[..., Store], tmp_path: Path
) -> None:
    indexed = WriterLimits(index_chunk=1)  # every batch's events are indexed at once
    a = stores("a", StoreOptions(role="leader", sync_replicas=1, sync_timeout_s=60,
                                 writer=indexed))  # fmt: skip
    b = stores("b", SYNC_FOLLOWER)
    write_acked(a, b, *common_history())
    tail_history(a)
    a.writer.execute(ExclusiveTask(lambda: None))  # after the merge that follows the tail
    assert a.log.meta.subject_indexed == a.log_head  # the tail is in the subject index too
    fail_over(a, b)
    a.close()

    reopened = stores("a", SYNC_FOLLOWER)  # the key store does not take it for a restored log
    reopened.leader_visible(b.head)  # a follower shows nothing its leader has not said

    assert reopened.log_head == b.log_head
    assert [e.position for e in reopened.read_subject("erin", 0, 10)] == []
    assert [e.position for e in reopened.read_subject("alice", 0, 10)] == [
        e.position for e in b.read_subject("alice", 0, 10)
    ]
    reopened.close()
    report = verify_data_dir(tmp_path / "a", tmp_path / "a" / "master.keyring")
    assert report.ok, [str(d) for d in report.damage]


def test_a_subject_forgotten_in_the_discarded_tail_stays_forgotten_until_the_retry(
    cluster: tuple[Store, Store],
) -> None:
    a, b = cluster
    tail_history(a)  # forgets bob: the keys of bob's records are destroyed on "a"
    fail_over(a, b)

    def bobs(store: Store) -> list[tuple[bytes, bool]]:
        return [(e.data, e.redacted) for e in store.read_all(1, backwards=False, limit=99)
                if e.subject_id == "bob"]  # fmt: skip

    assert a.log.subject_status("bob")[0] is None  # the log is the new leader's
    assert a.keys.is_forgotten("bob")  # but the keys stay destroyed here
    assert bobs(a) == [(b"", True)]
    assert bobs(b) == [(b"b1", False)]
    assert records(a) == records(b)  # byte for byte all the same

    write_acked(b, a, ForgetCommand("bob", "asked to", "admin"))  # the client retries

    assert [k for k, _ in rows(a, "tombstones")] == [k for k, _ in rows(b, "tombstones")]
    assert readable(a) == readable(b)


def test_a_deposed_leader_that_leads_again_records_the_erasure_it_kept(
    cluster: tuple[Store, Store],
) -> None:
    a, b = cluster
    tail_history(a)
    fail_over(a, b)

    b.demote("a:1", 3)
    a.promote(3)  # before any retry of the forget: "a" writes it into the log itself

    async def erased() -> None:
        while a.log.subject_status("bob")[0] is None:
            await asyncio.sleep(0.005)

    run(erased())
    assert a.log.subject_status("bob")[0] is not None


def test_acknowledged_commits_are_never_truncated(stores: Callable[..., Store]) -> None:
    single = stores("single")  # no sync replication: every commit acknowledged when durable
    write(single, append("s", "alice", "1"), append("s", "alice", "2"))
    single.demote("b:1", 2)
    before = (records(single), journal(single))

    with pytest.raises(ReplicationRefused, match="operator") as refused:
        single.truncate_after(1)

    assert "discard commits 2..2" in str(refused.value)
    assert (records(single), journal(single)) == before
    single.close()
    reopened = stores("single", FOLLOWER)  # the mark is on disk
    assert reopened.acknowledged_commit == 2
    with pytest.raises(ReplicationRefused, match="acknowledged"):
        reopened.truncate_after(0)


def test_commits_a_sync_gate_released_stay_acknowledged_after_a_restart(
    cluster: tuple[Store, Store], stores: Callable[..., Store]
) -> None:
    a, _ = cluster
    acknowledged = a.journal_head()
    assert a.acknowledged_commit == acknowledged > 0
    a.close()

    reopened = stores("a", SYNC_FOLLOWER)

    assert reopened.acknowledged_commit == acknowledged
    with pytest.raises(ReplicationRefused, match="held by the 1 followers"):
        reopened.truncate_after(acknowledged - 1)


def test_only_a_follower_truncates(cluster: tuple[Store, Store]) -> None:
    a, _ = cluster
    with pytest.raises(ReplicationRefused, match="demote it first"):
        a.truncate_after(0)


def test_truncating_at_or_after_the_head_discards_nothing(cluster: tuple[Store, Store]) -> None:
    _, b = cluster
    before = (records(b), journal(b))

    report = b.truncate_after(b.journal_head())

    assert report.discarded_commits == 0
    assert (records(b), journal(b)) == before


# -- data keys across terms ------------------------------------------------------------------


def sams(store: Store) -> list[bytes]:
    """The data of stream "p7" (subject "sam"), decrypted on *store*."""
    return [e.data for e in store.read_stream("p7", 0, backwards=False, limit=99)]


def sam_versions(store: Store) -> list[int]:
    return [
        codec.decode_record(r).dek_version
        for r in records(store)
        if codec.decode_record_subject(r).subject_id == "sam"
    ]


def assert_verified(store: Store, data_dir: Path) -> None:
    store.close()
    report = verify_data_dir(data_dir, data_dir / "master.keyring")
    assert report.ok, [str(d) for d in report.damage]


def test_a_leaders_key_replaces_the_one_a_deposed_node_made_for_its_discarded_tail(
    cluster: tuple[Store, Store], tmp_path: Path
) -> None:
    a, b = cluster
    commit_unacknowledged(a, append("p7", "sam", "lost"))  # sam's key version 1, made by "a"
    b.promote(2)
    a.demote("b:1", 2)
    commit_unacknowledged(b, append("p7", "sam", "kept"))  # another version 1, made by "b"

    follow(b, a)  # "a" discards "lost" and receives b's version 1

    assert sams(a) == [b"kept"]  # sealed under b's version 1, which "a" now holds
    b.demote("a:1", 3)
    a.promote(3)
    commit_unacknowledged(a, append("p7", "sam", "again"))
    follow(a, b)

    assert sams(a) == sams(b) == [b"kept", b"again"]
    assert sam_versions(a) == [1, 2]  # never a version "a" already held a key for
    assert readable(a) == readable(b)
    assert_verified(a, tmp_path / "a")
    assert_verified(b, tmp_path / "b")


def test_a_node_promoted_again_never_reuses_a_version_of_its_own_discarded_tail(
    stores: Callable[..., Store], tmp_path: Path
) -> None:
    rolling = StoreOptions(role="leader", sync_replicas=1, sync_timeout_s=60, dek_max_uses=2)
    a, b = stores("a", rolling), stores("b", SYNC_FOLLOWER)
    write_acked(a, b, append("p7", "sam", "1", "2"))  # version 1, its uses all spent on "a"
    b.promote(2)
    a.demote("b:1", 2)
    commit_unacknowledged(b, append("p7", "sam", "lost"))  # b's version 2, never replicated
    b.demote("a:1", 3)
    a.promote(3)
    commit_unacknowledged(a, append("p7", "sam", "3"))  # a's own, different, version 2

    follow(a, b)  # "b" discards "lost" and receives a's version 2

    assert sams(b) == [b"1", b"2", b"3"]
    a.demote("b:1", 4)
    b.promote(4)
    commit_unacknowledged(b, append("p7", "sam", "4"))  # a new version, not b's old version 2
    follow(b, a)

    assert sams(a) == sams(b) == [b"1", b"2", b"3", b"4"]
    assert sam_versions(b) == [1, 1, 2, 3]
    assert readable(a) == readable(b)
    assert_verified(a, tmp_path / "a")
    assert_verified(b, tmp_path / "b")


# -- where logs part ----------------------------------------------------------------------


def test_the_divergence_point_is_where_two_logs_share_their_last_entry(
    cluster: tuple[Store, Store],
) -> None:
    a, b = cluster
    common = b.journal_head()
    tail_history(a)
    b.promote(2)
    write_acked_none(b)

    assert b.divergence_point(common, 1) == common  # a follower behind: nothing to cut
    assert b.divergence_point(common - 1, 1) == common - 1
    assert b.divergence_point(0, 0) == 0
    assert b.divergence_point(a.journal_head(), a.journal_term()) == common  # diverged
    assert b.divergence_point(b.journal_head() + 5, 2) == b.journal_head()  # ahead, same term


def test_logs_that_part_several_terms_back_converge_hello_by_hello(
    stores: Callable[..., Store],
) -> None:
    n, f = stores("n", SYNC), stores("f", SYNC_FOLLOWER)
    write_acked(n, f, *common_history())  # term 1 on both
    commit_unacknowledged(n, append("orders-1", "alice", "n-only"))  # term 1: "f" lacks it
    n.demote("f:1", 2)
    f.promote(2)
    commit_unacknowledged(f, append("orders-1", "bob", "f-2"))  # term 2, same number
    f.promote(3)
    commit_unacknowledged(f, append("orders-1", "bob", "f-3"))  # term 3
    f.demote("n:1", 4)
    n.promote(4)
    commit_unacknowledged(n, append("orders-1", "carol", "n-4"))  # term 4

    rounds = follow(n, f)

    assert rounds == 3  # cut the term 3 commit, then the term 2 one, then the logs agree
    assert (records(f), journal(f)) == (records(n), journal(n))
    terms = [codec.decode_journal(raw).term for _, raw in journal(f)]
    assert terms[-1] == 4
    assert set(terms[:-1]) == {1}


def write_acked_none(store: Store) -> None:
    """A few commits of the store's own term (unacknowledged: no follower)."""
    commit_unacknowledged(
        store, append("orders-1", "carol", "c1"), CheckpointCommand("projector", 3)
    )
