"""Replication in the engine: the frames a leader sends, how a follower applies them,
the leader's registry of its followers and the synchronous-replication gate.

The unit of replication is one commit of the writer and its journal entry
(``journal`` table, see storage/log.py): a :class:`CommitFrame` carries the
records that commit wrote, byte for byte, the current value of every side
table row it touched (state-based, so a later frame that touches the row
again simply sends it again) and the raw data keys a follower lacks to read
them. A follower's writer applies a frame as one more command kind
(:class:`~lethedb_server.engine.model.ReplicatedCommitCommand`, applied by
:class:`ReplicatedCommitApplier`).

Plain dataclasses, no grpc: the api layer converts them to and from the wire.

The leader keeps a :class:`Followers` registry fed by the Replication
service (connected, acked, disconnected); the writer's :class:`SyncGate`
holds back the answer of a write until ``sync_replicas`` followers have acked
a commit at or after it, or fails it with NotEnoughReplicas after
``sync_timeout_s``.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import lmdb
import msgspec

from lethedb_server.engine.appliers import ApplyContext, BatchState
from lethedb_server.engine.model import STORE_SUBJECT, ReplicatedCommitCommand
from lethedb_server.engine.visibility import VisibleHead
from lethedb_server.errors import LetheError, NotEnoughReplicas, ReplicationRefused
from lethedb_server.storage import codec
from lethedb_server.storage.codec import JournalEntry, LogMeta, Tombstone
from lethedb_server.storage.keys import DataKey, KeyStore
from lethedb_server.storage.log import REFRESHED_TABLES, REPLICATED_TABLES, LogStore

__all__ = [
    "REPLICATED_TABLES",
    "CommitFrame",
    "DataKey",
    "FollowerState",
    "Followers",
    "ReplicatedCommitApplier",
    "RowChange",
    "SyncGate",
    "build_frames",
]


@dataclass(frozen=True, slots=True)
class RowChange:
    """A side table row as it stands on the leader when the frame is sent.

    ``value`` None: the row no longer exists on the leader (deleted).
    """

    table: str
    key: bytes
    value: bytes | None


@dataclass(frozen=True, slots=True)
class CommitFrame:
    """One leader commit, everything a follower needs to apply it identically."""

    term: int
    commit: int
    first_position: int
    last_position: int
    #: Stored values from ``events``, byte for byte (body || chain hash).
    records: tuple[bytes, ...]
    changes: tuple[RowChange, ...]
    keys: tuple[DataKey, ...]
    #: The leader's journal value, byte for byte.
    journal_entry: bytes
    committed_at: int

    def size(self) -> int:
        """Bytes it carries (the budget of :func:`build_frames` and the writer)."""
        return (
            len(self.journal_entry)
            + sum(len(r) for r in self.records)
            + sum(len(c.key) + len(c.value or b"") for c in self.changes)
            + 48 * len(self.keys)
        )


@dataclass(frozen=True, slots=True)
class FollowerState:
    """What the leader knows of one follower (for lag metrics, receipts, ClusterStatus)."""

    node_id: str
    advertise: str
    connected: bool
    connected_since: int  # ns; 0 when not connected
    commit: int  # the last commit it acked as durable
    position: int  # the log head of that commit
    acked_at: int  # ns; 0 before its first ack
    shredded_through: int
    lag_positions: int  # leader head - position
    lag_seconds: float  # now - committed_at of the oldest commit it lacks; 0 if none


# -- leader: building frames --------------------------------------------------------


def build_frames(
    log_store: LogStore,
    keys: KeyStore,
    after: int,
    sent_keys: set[tuple[str, int]],
    max_frames: int,
    max_bytes: int,
    refresh: bool = False,
) -> list[CommitFrame]:
    """The frames of the commits after *after* (see ``Store.frames_after``).

    Journal entries, their records and the rows they touched are read in one
    read transaction, so every frame shows one state of the leader. The data
    keys are unwrapped afterwards; a subject forgotten meanwhile simply has
    none any more, which is what the follower must end up with anyway.
    """
    drafts: list[tuple[int, bytes, JournalEntry, list[bytes], list[RowChange]]] = []
    size = 0
    with log_store.lmdb.read() as txn:
        snapshot = log_store.head_in(txn)
        for commit, raw in log_store.journal_after(txn, after):
            entry = codec.decode_journal(raw)
            records = log_store.records_between(txn, entry.first_position, entry.last_position)
            changes = _changes(log_store, txn, entry, snapshot)
            if refresh and not drafts:
                changes = _with_refresh(log_store, txn, changes)
            drafts.append((commit, raw, entry, records, changes))
            size += sum(len(r) for r in records) + sum(len(c.value or b"") for c in changes)
            if len(drafts) >= max_frames or size >= max_bytes:
                break
    return [
        CommitFrame(
            term=entry.term,
            commit=commit,
            first_position=entry.first_position,
            last_position=entry.last_position,
            records=tuple(records),
            changes=tuple(changes),
            keys=tuple(_keys_to_send(keys, records, sent_keys)),
            journal_entry=raw,
            committed_at=entry.committed_at,
        )
        for commit, raw, entry, records, changes in drafts
    ]


def _changes(
    log_store: LogStore, txn: lmdb.Transaction, entry: JournalEntry, snapshot: int
) -> list[RowChange]:
    """Every touched row's value as of the entry's commit where it can be told, else as
    it stands in *txn* (whose log ends at *snapshot*).

    ``everything``: every row of every table; only a genesis entry written
    before genesis entries were bounded has it (they now list their rows).
    """
    if entry.everything:
        touched = [(t, k) for t in REPLICATED_TABLES for k, _ in log_store.rows(txn, t)]
    else:
        touched = list(dict.fromkeys(entry.touched))
    if entry.last_position >= snapshot:  # nothing later: every row is as of this commit
        return [RowChange(t, k, log_store.row(txn, t, k)) for t, k in touched]
    head = entry.last_position
    return [RowChange(t, k, _as_of(log_store, txn, t, k, head)) for t, k in touched]


def _as_of(
    log_store: LogStore, txn: lmdb.Transaction, table: str, key: bytes, head: int
) -> bytes | None:
    """A row's value once the log ended at *head*, when a later commit has changed it.

    Rows go state-based (as they stand when sent), so a frame read while the
    leader is ahead would carry a stream head, an idempotency result or a
    tombstone of records its follower does not hold yet: harmless while it
    keeps following, wrong if it is promoted then (a stream's next version
    would skip, a retry would be answered with positions it lacks). These
    three are told from the log: a stream's last version at or before *head*
    (none: no row yet), an idempotency entry or a tombstone naming a later
    position (none: written later). Legal holds and checkpoints are sent as
    they stand (``Store.promote`` drops a checkpoint beyond its head).
    """
    value = log_store.row(txn, table, key)
    if value is None:
        return value
    if table == "streams":
        return log_store.stream_row_at(txn, key.decode(), value, head)
    if table == "idempotency":
        entry = codec.decode_idempotency(value)
        results = (entry.result, *entry.commit)
        return None if any(r.last_position > head for r in results) else value
    if table == "tombstones":
        return None if codec.decode_tombstone(value).position > head else value
    return value


def _with_refresh(
    log_store: LogStore, txn: lmdb.Transaction, changes: list[RowChange]
) -> list[RowChange]:
    """*changes* and every row of the refreshed tables, each row once (all as of *txn*)."""
    rows = {(c.table, c.key): c for c in changes}
    for table in REFRESHED_TABLES:
        for key, value in log_store.rows(txn, table):
            rows[(table, key)] = RowChange(table, key, value)
    return list(rows.values())


def _keys_to_send(
    keys: KeyStore, records: list[bytes], sent_keys: set[tuple[str, int]]
) -> list[DataKey]:
    """The data keys of *records* not yet sent on this stream (and held: not forgotten)."""
    wanted: dict[tuple[str, int], None] = {}
    for record in records:
        ref = codec.decode_record_key_ref(record)
        pair = (ref.subject_id or STORE_SUBJECT, ref.dek_version)
        if pair not in sent_keys:
            wanted[pair] = None
    found = keys.raw_keys(wanted)
    sent_keys.update((k.subject_id, k.version) for k in found)
    return found


# -- follower: applying a frame -----------------------------------------------------


class ReplicatedCommitApplier:
    """Applies a leader's commit in the follower writer's nested transaction.

    Every check comes before any write, and a failed check is
    ReplicationRefused: the writer aborts the nested transaction, so nothing
    of the frame is kept. The frame's keys are installed in the key store
    first (their own durable transaction: a key with no record yet is
    harmless, a record whose key is missing is not).
    """

    def __init__(self, ctx: ApplyContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.keys = ctx.keys

    def apply(
        self, txn: lmdb.Transaction, command: ReplicatedCommitCommand, batch: BatchState
    ) -> int:
        frame = command.frame
        if frame.commit <= batch.journal_head:
            return frame.commit  # already held: a reconnect resends it
        entry = _check_frame(frame, batch)
        self.keys.install(frame.keys)
        meta = self._put_records(txn, frame, batch)
        forgotten = self._put_changes(txn, frame.changes, batch)
        self.log.put_journal(txn, frame.commit, frame.journal_entry)
        batch.meta = meta
        batch.forgotten.update(forgotten)  # last: a refused frame leaves none behind
        batch.journal_head, batch.journal_term = frame.commit, entry.term
        return frame.commit

    def _put_records(self, txn: lmdb.Transaction, frame: CommitFrame, batch: BatchState) -> LogMeta:
        """Each record as the leader stored it, its stream index entry, its index key."""
        meta = batch.meta
        position = frame.first_position
        for record in frame.records:
            head = codec.decode_record_subject(record)
            key = codec.u64(position)
            self.log.put_event(
                txn, key, record, codec.stream_version_key(head.stream_id, head.stream_version)
            )
            batch.index_keys.append(codec.subject_prefix(head.subject_id) + key)
            position += 1
        if not frame.records:
            return meta
        return msgspec.structs.replace(
            meta,
            last_position=frame.last_position,
            chain_head=frame.records[-1][-codec.HASH_SIZE :],
        )

    def _put_changes(
        self, txn: lmdb.Transaction, changes: Iterable[RowChange], batch: BatchState
    ) -> dict[str, Tombstone]:
        """The leader's rows; return the subjects newly forgotten (their tombstones).

        A new tombstone is re-stamped with this node's next shred epoch: each
        node shreds on its own schedule. A row that does not decode is refused.
        """
        forgotten: dict[str, Tombstone] = {}
        for change in changes:
            try:
                if change.table == "tombstones" and change.value is not None:
                    subject_id = change.key.decode()
                    tombstone = self._put_tombstone(txn, subject_id, change.value, batch)
                    if tombstone is not None:
                        forgotten[subject_id] = tombstone
                else:
                    self.log.put_row(txn, change.table, change.key, change.value)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                raise ReplicationRefused(
                    f"a {change.table} row of the leader's commit does not decode ({exc})"
                ) from exc
        return forgotten

    def _put_tombstone(
        self, txn: lmdb.Transaction, subject_id: str, value: bytes, batch: BatchState
    ) -> Tombstone | None:
        leaders = codec.decode_tombstone(value)
        if self.log.subject_records(txn, subject_id)[0] is not None:
            return None  # forgotten here already: its epoch stamp is this node's own
        tombstone = msgspec.structs.replace(leaders, shred_epoch=batch.meta.shred_epoch + 1)
        self.log.put_tombstone(txn, subject_id, tombstone)
        return tombstone


def _check_frame(frame: CommitFrame, batch: BatchState) -> JournalEntry:
    """Refuse a frame that does not follow this log exactly; return its journal entry."""
    meta = batch.meta
    if frame.commit != batch.journal_head + 1:
        _refuse(f"commit {frame.commit} does not follow this node's commit {batch.journal_head}")
    if frame.term < batch.journal_term:
        _refuse(f"commit {frame.commit} has term {frame.term}, below this node's term "
                f"{batch.journal_term}")  # fmt: skip
    try:
        entry = codec.decode_journal(frame.journal_entry)
    except (msgspec.DecodeError, ValueError) as exc:
        raise ReplicationRefused(
            f"commit {frame.commit}: undecodable journal entry ({exc})"
        ) from exc
    if (entry.term, entry.first_position, entry.last_position) != (
        frame.term, frame.first_position, frame.last_position
    ):  # fmt: skip
        _refuse(f"commit {frame.commit}: its journal entry does not match the frame")
    if frame.first_position != meta.last_position + 1:
        _refuse(f"commit {frame.commit} starts at position {frame.first_position}, but this "
                f"node's log ends at {meta.last_position}")  # fmt: skip
    if len(frame.records) != frame.last_position - frame.first_position + 1:
        _refuse(f"commit {frame.commit} carries {len(frame.records)} records for positions "
                f"{frame.first_position}..{frame.last_position}")  # fmt: skip
    _check_chain(frame, meta.chain_head)
    for change in frame.changes:
        if change.table not in REPLICATED_TABLES:
            _refuse(f"commit {frame.commit} changes table {change.table!r}, not a replicated one")
    return entry


def _check_chain(frame: CommitFrame, chain_head: bytes) -> None:
    previous = chain_head
    for offset, record in enumerate(frame.records):
        if len(record) <= codec.HASH_SIZE:
            _refuse(f"the record at position {frame.first_position + offset} is truncated")
        body, digest = codec.split_record(record)
        if codec.chain_hash(previous, body) != digest:
            where = "does not link to this node's chain head" if offset == 0 else "is damaged"
            _refuse(f"the record at position {frame.first_position + offset} {where}")
        previous = digest


def _refuse(message: str) -> None:
    raise ReplicationRefused(message)


# -- leader: followers and the sync gate ----------------------------------------------


@dataclass(slots=True)
class _Follower:
    node_id: str
    advertise: str = ""
    connected: bool = False
    connected_since: int = 0
    commit: int = 0
    position: int = 0
    acked_at: int = 0
    shredded_through: int = 0


class Followers:
    """The leader's view of its followers, fed by the Replication service (any thread)."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, _Follower] = {}
        self._clock = clock
        #: Called after every ack (the sync gate re-checks what it holds).
        self.on_ack: Callable[[], None] = lambda: None

    def connected(self, node_id: str, advertise: str) -> None:
        with self._lock:
            node = self._nodes.setdefault(node_id, _Follower(node_id))
            node.advertise, node.connected, node.connected_since = advertise, True, self._clock()

    def acked(self, node_id: str, commit: int, position: int, shredded_through: int) -> None:
        """*node_id* holds *commit* durably. Acks never move a follower back."""
        with self._lock:
            node = self._nodes.setdefault(node_id, _Follower(node_id))
            if commit >= node.commit:
                node.commit, node.position = commit, position
            node.shredded_through = max(node.shredded_through, shredded_through)
            node.acked_at = self._clock()
        self.on_ack()

    def reset(self) -> None:
        """Forget every follower and its acks (this node's leadership ended or began).

        An ack names a commit number of the log it was sent for; after a
        change of term (and maybe a truncation) the same number may be
        another commit, so no earlier ack may count towards a sync write.
        """
        with self._lock:
            self._nodes.clear()

    def disconnected(self, node_id: str) -> None:
        with self._lock:
            node = self._nodes.get(node_id)
            if node is not None:
                node.connected, node.connected_since = False, 0

    def holding(self, commit: int) -> int:
        """How many connected followers have acked *commit* or a later one."""
        with self._lock:
            return sum(1 for n in self._nodes.values() if n.connected and n.commit >= commit)

    def held_by(self, required: int) -> int:
        """The highest commit at least *required* connected followers have acked (0: none)."""
        with self._lock:
            commits = sorted((n.commit for n in self._nodes.values() if n.connected), reverse=True)
        return commits[required - 1] if 0 < required <= len(commits) else 0

    def snapshot(self, head: int, committed_at: Callable[[int], int | None]) -> list[FollowerState]:
        """Every follower seen, with its lag behind *head*.

        *committed_at(commit)*: when the leader committed *commit* (None: no such
        commit), read outside the lock.
        """
        with self._lock:
            nodes = [_copy(n) for n in self._nodes.values()]
        now = self._clock()
        states = []
        for n in nodes:
            oldest_missing = committed_at(n.commit + 1)
            lag_s = 0.0 if oldest_missing is None else max(0, now - oldest_missing) / 1e9
            states.append(
                FollowerState(
                    n.node_id,
                    n.advertise,
                    n.connected,
                    n.connected_since,
                    n.commit,
                    n.position,
                    n.acked_at,
                    n.shredded_through,
                    max(0, head - n.position),
                    lag_s,
                )
            )
        return states


def _copy(node: _Follower) -> _Follower:
    return _Follower(
        node.node_id, node.advertise, node.connected, node.connected_since, node.commit,
        node.position, node.acked_at, node.shredded_through,
    )  # fmt: skip


#: Settles held outcomes: [(whatever the writer holds, outcome)].
Settle = Callable[[list[tuple[Any, Any]]], None]


@dataclass(order=True)
class _Held:
    deadline: float
    seq: int
    commit: int = field(compare=False)
    items: list[tuple[Any, Any]] = field(compare=False)
    settle: Settle = field(compare=False)
    done: bool = field(default=False, compare=False)


class SyncGate:
    """Holds successful write outcomes until *required* followers acked their commit.

    The writer hands over each batch's successful outcomes with the journal
    head at settle time (:meth:`hold`); every ack re-checks the held commits
    in order (:meth:`release`); one small timer thread fails those still held
    at their deadline with NotEnoughReplicas. With *required* 0 nothing is
    held.

    It also advances the leader's visible head (*visible*, see
    engine/visibility.py) to the highest commit *required* followers hold,
    always before it releases the answers of that commit: a client that was
    answered can read its write at once on this leader.
    """

    def __init__(
        self,
        followers: Followers,
        required: int,
        timeout_s: float,
        visible: VisibleHead | None = None,
    ) -> None:
        self.followers = followers
        self.visible = visible
        self.required = required
        self.timeout_s = timeout_s
        self._lock = threading.Condition()
        self._by_commit: list[_Held] = []  # in commit order (commits only grow)
        self._by_deadline: list[_Held] = []  # a heap
        self._seq = itertools.count()
        self._timer: threading.Thread | None = None
        self._stopped = False
        followers.on_ack = self.release

    def committed(self, commit: int, last_position: int) -> None:
        """Writer thread: this leader wrote *commit* (ending at *last_position*); it becomes
        visible once enough followers hold it (maybe already: an ack may come first)."""
        if self.visible is not None:
            self.visible.committed(commit, last_position)
            self._advance_visible()

    def _advance_visible(self) -> None:
        if self.visible is not None:
            self.visible.held(self.followers.held_by(self.required))

    def hold(self, commit: int, items: list[tuple[Any, Any]], settle: Settle) -> bool:
        """Take *items* until *commit* is held by enough followers; False: settle them now."""
        if self.required <= 0 or not items:
            return False
        if self.followers.holding(commit) >= self.required:
            self._advance_visible()  # visible before it is answered
            return False
        held = _Held(time.monotonic() + self.timeout_s, next(self._seq), commit, items, settle)
        with self._lock:
            self._by_commit.append(held)
            heapq.heappush(self._by_deadline, held)
            self._start_timer()
            self._lock.notify()
        self.release()  # an ack may have come between the check and the append
        return True

    def release(self) -> None:
        """Settle every held outcome whose commit enough followers now hold (the visible
        head moves first)."""
        self._advance_visible()
        ready: list[_Held] = []
        with self._lock:
            while self._by_commit:
                first = self._by_commit[0]
                if not first.done and self.followers.holding(first.commit) < self.required:
                    break
                self._by_commit.pop(0)
                if not first.done:
                    first.done = True
                    ready.append(first)
        for held in ready:
            held.settle(held.items)

    def stop(self, reason: str = "") -> None:
        """Fail everything still held and end the timer (the store is closing, or
        this node was deposed: *reason* is then the error's message)."""
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._expire(float("inf"), reason)

    def _start_timer(self) -> None:
        if self._timer is None:
            self._timer = threading.Thread(target=self._run, name="lethedb-sync-gate", daemon=True)
            self._timer.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                wait = (
                    self._by_deadline[0].deadline - time.monotonic() if self._by_deadline else None
                )
                if wait is None or wait > 0:
                    self._lock.wait(wait)
                    continue
            self._expire(time.monotonic())

    def _expire(self, now: float, reason: str = "") -> None:
        expired: list[_Held] = []
        with self._lock:
            while self._by_deadline and self._by_deadline[0].deadline <= now:
                held = heapq.heappop(self._by_deadline)
                if not held.done:
                    held.done = True
                    expired.append(held)
        for held in expired:
            have = self.followers.holding(held.commit)
            error = NotEnoughReplicas(
                reason
                or f"committed here but durable on only {have} of the {self.required} followers "
                "sync_replicas asks for; not acknowledged: retry with the same idempotency key"
            )
            held.settle([(item, error) for item, _ in held.items])


def is_success(outcome: object) -> bool:
    """An outcome the gate holds back (a failure is answered at once)."""
    return not isinstance(outcome, LetheError)
