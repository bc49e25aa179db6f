"""A LetheDB data directory opened as a whole: lock, keyring, log, keys, writer.

This is the one object the server (and in-process tools, tests and
benchmarks) hold, and the engine's façade: the api layer (service, admin,
subscriptions, metrics, server wiring) calls only its domain operations
(append, commit, read, subscribe, forget, shred, legal hold, export, verify,
stats, rotate, backup) and never the log, key store, writer or reader behind
it. Opening takes the directory's lock file first, so a second process is
refused with a clear message before it touches any LMDB file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from asyncio import Future
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from lethedb_server.crypto.keyring import FileKeyring, KeyProvider
from lethedb_server.engine import custody, failover
from lethedb_server.engine.erasure import Shredder, shredded_through, subject_receipt
from lethedb_server.engine.failover import TruncationReport
from lethedb_server.engine.idempotency import upgrade_unkeyed_entries
from lethedb_server.engine.model import (
    STORE_SUBJECT,
    AppendCommand,
    CheckpointCommand,
    CommitCommand,
    CommitResult,
    ExclusiveTask,
    ForgetCommand,
    LegalHoldCommand,
    ReplicatedCommitCommand,
    RotateCommand,
    RotateResult,
    ShredCommand,
    ShredResult,
    StoredEvent,
    SubjectReceipt,
)
from lethedb_server.engine.reader import EventReader
from lethedb_server.engine.replication import (
    CommitFrame,
    Followers,
    FollowerState,
    SyncGate,
    build_frames,
)
from lethedb_server.engine.verify import Verifier
from lethedb_server.engine.visibility import VisibleHead
from lethedb_server.engine.writer import Writer, WriterLimits, WriterObserver
from lethedb_server.errors import DataDirLocked, NotLeader, ReplicationRefused, ValidationError
from lethedb_server.files import make_private_dir, open_private, wide_modes
from lethedb_server.storage.codec import AppendResult, NodeState
from lethedb_server.storage.keys import DEFAULT_CACHE_SIZE, DEFAULT_MAX_USES, KeyStore
from lethedb_server.storage.log import LogStore, RawPage

log = logging.getLogger(__name__)

LOCK_FILE = "lethedb.lock"
ROLES = ("single", "leader", "follower")


@dataclass(frozen=True)
class StoreOptions:
    keyring_path: Path | None = None  # default: <data>/master.keyring
    dek_cache_size: int = DEFAULT_CACHE_SIZE
    dek_max_uses: int = DEFAULT_MAX_USES
    log_map_size: int = 64 << 20
    max_map_size: int = 1 << 42
    #: Serve a log that is behind its key store (restored from an older backup).
    accept_restored_log: bool = False
    writer: WriterLimits = field(default_factory=WriterLimits)
    #: "single" (no followers), "leader" (followers may connect) or "follower"
    #: (applies a leader's commits, refuses writes with NotLeader).
    role: str = "single"
    #: The leader's client address (host:port) a follower names in NotLeader.
    leader: str = ""
    #: Followers that must hold a commit before a write is acknowledged (0: none).
    sync_replicas: int = 0
    #: How long a write waits for them before it fails with NotEnoughReplicas.
    sync_timeout_s: float = 10.0


class Store:
    """An open data directory. Use :meth:`open`; close with :meth:`close`."""

    def __init__(
        self,
        data_dir: Path,
        lock: IO[bytes],
        provider: KeyProvider,
        log_store: LogStore,
        keys: KeyStore,
        writer: Writer,
        options: StoreOptions | None = None,
    ) -> None:
        opts = options or StoreOptions()
        self.data_dir = data_dir
        self._lock = lock
        self.provider = provider
        self.log = log_store
        self.keys = keys
        self.writer = writer
        self.reader = EventReader(log_store, keys)
        self._closed = False
        self._options = opts
        self._role = opts.role
        writer.leading = opts.role != "follower"
        writer.leader = opts.leader
        self._followers = Followers()
        #: How far readers see (engine/visibility.py): a follower starts seeing nothing
        #: until its leader says what is visible; a leader its whole log.
        self._visible = VisibleHead(writer.notify_head)
        if not writer.leading:
            self._visible.follow()
        elif opts.sync_replicas > 0:
            self._visible.lead_from(log_store.head)
        if writer.leading:
            self._open_gate()

    @classmethod
    def open(
        cls,
        data_dir: Path,
        options: StoreOptions | None = None,
        provider: KeyProvider | None = None,
        observer: WriterObserver | None = None,
    ) -> Store:
        """Open (or create) the store in *data_dir*, recover it, start its writer.

        *observer* is told of every batch the writer commits and every
        command it refuses (the metrics); None: nobody is.
        """
        opts = options or StoreOptions()
        if opts.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {opts.role!r}")
        make_private_dir(data_dir)
        lock = lock_data_dir(data_dir)
        try:
            # Nothing is written (not even the pid) until the keyring, the key
            # store and the log are known to belong together.
            plan = custody.preflight(
                data_dir,
                opts.keyring_path or data_dir / "master.keyring",
                provider,
                opts.accept_restored_log,
            )
            _write_pid(lock)
            provider = custody.provide(plan)
            if isinstance(provider, FileKeyring) and _is_within(provider.path, data_dir):
                log.warning("%s", keyring_inside_data_warning(provider.path, data_dir))
            log_store = LogStore(
                data_dir / "log", map_size=opts.log_map_size, max_map_size=opts.max_map_size
            )
            keys = KeyStore(
                data_dir / "keys",
                provider,
                cache_size=opts.dek_cache_size,
                max_uses=opts.dek_max_uses,
                max_map_size=opts.max_map_size,
            )
        except BaseException:
            lock.close()
            raise
        try:
            custody.settle(plan, log_store, keys)
            shredder = Shredder(data_dir, log_store, keys, provider)
            shredder.recover()
            if shredder.reapply_tombstones():
                shredder.run()
            # After the tombstones: an entry of a forgotten subject is dropped.
            upgrade_unkeyed_entries(log_store, keys)
            genesis = 0 if opts.role == "follower" else log_store.write_genesis(1, time.time_ns())
            if genesis:
                log.info("journalled the existing log (positions 1..%d and its side tables) in "
                         "%d entries for replication", log_store.head, genesis)  # fmt: skip
        except BaseException:
            log_store.close()
            keys.close()
            lock.close()
            raise
        for line in wide_modes([data_dir]):
            log.warning("%s", line)
        writer = Writer(
            log_store,
            keys,
            opts.writer,
            maintenance={
                ShredCommand: shredder.run,
                RotateCommand: lambda: RotateResult(*keys.rotate()),
            },
            observer=observer,
        )
        writer.start()
        store = cls(data_dir, lock, provider, log_store, keys, writer, opts)
        try:
            if opts.role != "follower":  # a follower's erasures come in its leader's log
                custody.record_missing_erasures(log_store, keys, writer)
        except BaseException:
            store.close()
            raise
        return store

    # -- writes: queued at the writer, in one order with every other write ---------------
    #
    # Each returns the writer's future at once (not a coroutine): a caller that
    # queues several before awaiting any (AppendBatch) has them share a commit.

    def append(self, command: AppendCommand) -> Future[AppendResult]:
        """Queue an append; the future resolves after the commit that holds it."""
        self._refuse_on_follower()
        return self.writer.submit_async(command)

    def commit(self, command: CommitCommand) -> Future[CommitResult]:
        """Queue a multi-stream commit (all its appends or none)."""
        self._refuse_on_follower()
        return self.writer.submit_async(command)

    def _refuse_on_follower(self) -> None:
        """A follower never writes on its own: its writes are its leader's."""
        if self._role == "follower":
            raise NotLeader(self.writer.leader)

    def check_room(self, events: int, size: int, appends: int = 1) -> None:
        """Raise Overloaded now if the writer has no room for *appends* of this size."""
        self.writer.check_room(events, size, appends)

    def forget(self, command: ForgetCommand) -> Future[SubjectReceipt]:
        """Queue forgetting a subject (its keys go at the next shred epoch)."""
        self._refuse_on_follower()
        return self.writer.submit_async(command)

    def set_legal_hold(self, command: LegalHoldCommand) -> Future[SubjectReceipt]:
        """Queue setting or releasing a legal hold, ordered against forgets."""
        self._refuse_on_follower()
        return self.writer.submit_async(command)

    def store_checkpoint(self, command: CheckpointCommand) -> Future[int]:
        """Queue storing a consumer group's checkpoint; resolves to the position stored."""
        self._refuse_on_follower()
        return self.writer.submit_async(command)

    def shred(self) -> Future[ShredResult]:
        """Queue a shred epoch: keys of forgotten subjects are destroyed for good."""
        return self.writer.submit_async(ShredCommand())

    def rotate(self) -> Future[RotateResult]:
        """Queue a master key rotation (every data key re-wrapped under the new version)."""
        return self.writer.submit_async(RotateCommand())

    # -- replication (see engine/replication.py) ---------------------------------------------

    @property
    def role(self) -> str:
        """ "single", "leader" or "follower"."""
        return self._role

    @property
    def leader(self) -> str:
        """The leader's client address a follower names in NotLeader ("" if unknown)."""
        return self.writer.leader

    @leader.setter
    def leader(self, address: str) -> None:
        self.writer.leader = address

    @property
    def store_id(self) -> bytes:
        """The store id every node of a cluster shares (the leader's, adopted by followers)."""
        return self.log.store_id

    @property
    def chain_head(self) -> bytes:
        """The chain hash of the last record (the genesis hash for an empty log)."""
        return self.log.meta.chain_head

    def adopt_store_id(self, store_id: bytes) -> None:
        """Make this follower a copy of store *store_id* (the leader's welcome names it).

        An empty follower (no record, no journal entry) takes the id, in its log
        meta and its key store's binding; one that already holds the same id is
        unchanged; any other is ReplicationRefused ("this data directory holds
        another store"). Call it before the first :meth:`apply_replicated`.
        """
        if store_id == self.log.store_id:
            return
        if not self.log.holds_nothing():
            raise ReplicationRefused(
                f"this data directory holds another store ({self.log.store_id.hex()}, not "
                f"{store_id.hex()}): a follower needs an empty data directory or a copy of "
                "its leader's"
            )
        self.log.adopt_store_id(store_id)
        self.keys.rebind(store_id)
        custody.record_key_generation(self.log, self.keys)

    @property
    def term(self) -> int:
        """The highest term this node has seen: the one it recorded at its last promotion
        or demotion, or its last journal entry's, whichever is higher (0: none yet)."""
        return max(self.log.node.term, self.log.journal_term)

    def journal_head(self) -> int:
        """The commit number of the last journal entry (0 when the journal is empty)."""
        return self.log.journal_head

    def journal_term(self) -> int:
        """The term of the last journal entry (0 when the journal is empty): what a
        follower's hello names with its commit, for :meth:`divergence_point`."""
        return self.log.journal_term

    @property
    def acknowledged_commit(self) -> int:
        """The highest commit whose answers this node released to clients as
        acknowledged (without sync replication: every commit it wrote as a
        leader). :meth:`truncate_after` never discards it."""
        return self.writer.acknowledged

    # -- failover: the election (server/lethedb_server/coord) drives these -----------------

    def promote(self, term: int) -> None:
        """Lead *term*: accept client writes, each journal entry carrying *term* (blocking).

        *term* must be above :attr:`term` (ReplicationRefused otherwise: terms
        only grow). Runs in the writer between batches, so a leader's commit
        queued before it is applied first and one queued after is refused.
        Data keys received from the old leader are never extended: the first
        write of such a subject starts a new key version (KeyStore.install).
        A follower's promotion starts the sync gate and the followers registry
        afresh (a leader's own stay: its streams and acks are of this log). A
        checkpoint beyond this node's head (stored by the old leader later)
        is dropped: the group replays rather than skip events. Subjects this
        node holds forgotten without a tombstone in its log (a forget that was
        discarded by :meth:`truncate_after`) are forgotten again, in the log,
        now that it leads (see docs/ARCHITECTURE.md, "Failover").
        """
        self._check_new_term(term, "lead")

        def lead() -> None:
            self._check_new_term(term, "lead")
            dropped = self.log.drop_checkpoints_after(self.log.head)
            if dropped:
                log.warning("dropped the checkpoints of %d consumer groups beyond this log's "
                            "head (stored by the old leader after it): they replay from the "
                            "start until they store one again", len(dropped))  # fmt: skip
            self._record_term(term)
            self.writer.term = term
            # A store that predates the journal and started as a follower has
            # not journalled its history: a leader must, or its followers
            # could never receive it.
            genesis = self.log.write_genesis(term, time.time_ns())
            if genesis:
                log.info("journalled the %d records written before replication existed in "
                         "%d entries for replication", self.log.head, genesis)  # fmt: skip
            if not self.writer.leading:  # a leader's own followers and held answers stay
                self._followers.reset()
                self._open_gate()
            self.writer.leader = ""
            self.writer.leading = True
            self._role = "leader"
            # Its log is the truth now (the followers truncate to it): all of it is visible.
            if self._options.sync_replicas > 0:
                self._visible.lead_from(self.log.head)
            else:
                self._visible.show_all()
            self.writer.notify_head(self.log.head)

        self.writer.execute(ExclusiveTask(lead))
        log.warning("leading term %d from commit %d (position %d)", term,
                    self.log.journal_head, self.log.head)  # fmt: skip
        failover.forget_again(self.log, self.keys, self.writer)

    def demote(self, leader: str, term: int) -> None:
        """Follow *leader* (its client address) in *term*: refuse writes from now on (blocking).

        New writes, and those queued but not yet applied, fail with
        NotLeader(leader) at once; answers the sync gate holds fail with
        NotEnoughReplicas (never acknowledged: the client retries them with
        their idempotency keys, at the new leader). The term is recorded.
        A *term* below :attr:`term`, or this node's own term while it leads
        it, is ReplicationRefused.
        """
        if term < self.term or (term == self.term and self._role != "follower"):
            raise ReplicationRefused(
                f"term {term} is not above this node's term {self.term}"
                + ("" if self._role == "follower" else ", which it leads")
            )
        self.writer.leader = leader
        self.writer.leading = False
        self._role = "follower"
        reason = (
            f"this node stopped leading (term {term} is led by {leader or 'another node'}) "
            "before enough followers held the commit; not acknowledged: retry with the same "
            "idempotency key"
        )

        def follow() -> None:
            self._record_term(term)
            self._visible.follow()  # what it showed stays; more only as its leader says
            gate, self.writer.gate = self.writer.gate, None
            if gate is not None:
                gate.stop(reason)
            self._followers.reset()

        self.writer.execute(ExclusiveTask(follow))
        log.warning("following %s in term %d from commit %d (position %d)", leader or "?",
                    term, self.log.journal_head, self.log.head)  # fmt: skip

    def truncate_after(self, commit: int) -> TruncationReport:
        """Discard the journal entries after *commit* and what they wrote (blocking).

        For a deposed node before it follows: *commit* is where its log and the
        new leader's part (:meth:`divergence_point`). Records, their stream
        and subject index entries, the stream heads, the idempotency entries
        and tombstones those commits wrote go; the log meta and journal head
        are restored; one log transaction with fsync, logged with what went.
        Only a follower truncates (:meth:`demote` first). A commit at or
        below :attr:`acknowledged_commit` is never discarded:
        ReplicationRefused, nothing changes. A subject a discarded commit
        forgot stays forgotten here (see docs/ARCHITECTURE.md, "Failover").
        """
        if commit < 0:
            raise ValidationError(f"commit must be 0 or more, not {commit}")
        return cast(
            TruncationReport, self.writer.execute(ExclusiveTask(lambda: self._truncate(commit)))
        )

    def _truncate(self, commit: int) -> TruncationReport:
        """:meth:`truncate_after`, in the writer thread."""
        if self._role != "follower":
            raise ReplicationRefused(
                f"this node is a {self._role}: only a follower discards commits (demote it first)"
            )
        report = failover.truncate(
            self.log, self.keys, self.writer, commit, self._options.sync_replicas
        )
        self._visible.truncated(self.log.head)
        return report

    def divergence_point(self, follower_commit: int, follower_term: int) -> int:
        """Where a follower must truncate: the highest commit its log may share with this one.

        The leader answers a follower's hello with it: *follower_commit* and
        *follower_term* are the follower's last journal entry's commit and
        term (:meth:`journal_term`). Like Raft's log matching, two logs that
        hold an entry of the same commit and term are identical up to it (a
        term has one leader, which writes each commit number once). The
        answer is *follower_commit* itself when this log holds that entry
        (nothing to truncate), else the highest commit of this log at or
        below it whose term is at most *follower_term*: the follower's logs
        cannot share more, and never share less; it is exact when that entry
        has *follower_term*. Otherwise the follower truncates to it and says
        hello again: each round goes down, and none below the shared point.
        """
        return failover.divergence_point(self.log, follower_commit, follower_term)

    def _check_new_term(self, term: int, what: str) -> None:
        if term <= self.term:
            raise ReplicationRefused(
                f"cannot {what} term {term}: this node has seen term {self.term} (terms only grow)"
            )

    def _record_term(self, term: int) -> None:
        """Record *term* (and the acknowledged commit) in the log, with fsync (the writer
        thread, or a closing store's once the writer stopped)."""
        node = NodeState(max(term, self.log.node.term), self.writer.acknowledged)
        self.log.lmdb.write(lambda txn: self.log.put_node(txn, node))
        self.log.node = node

    def _open_gate(self) -> None:
        """A sync gate for this node's leadership, when sync_replicas asks for one."""
        opts = self._options
        if opts.sync_replicas > 0:
            self.writer.gate = SyncGate(
                self._followers, opts.sync_replicas, opts.sync_timeout_s, self._visible
            )

    def on_journal(self, listener: Callable[[int], None]) -> None:
        """Call *listener(commit)* from the writer thread after each commit that wrote a
        journal entry (the Replication service wakes its streams with it)."""
        self.writer.add_journal_listener(listener)

    def frames_after(
        self,
        commit: int,
        sent_keys: set[tuple[str, int]],
        max_frames: int = 256,
        max_bytes: int = 8 << 20,
        refresh: bool = False,
    ) -> list[CommitFrame]:
        """The commits after *commit*, in order, read in one read transaction (blocking).

        Each frame carries its records byte for byte, the current value of every
        row its journal entry touched, and the raw data keys of its records
        that are not in *sent_keys* (which it adds them to: one set per stream).
        A forgotten subject's key no longer exists and is never sent. At least
        one frame when there is one, then up to *max_frames* / *max_bytes*.

        *refresh*: the first frame also carries every row of ``legal_holds`` and
        ``checkpoints`` (small tables) as they stand, which a follower that
        truncated its tail lacks (:meth:`truncate_after` cannot restore them).
        The service asks for it on the first frames of each Follow stream
        (until one frame was sent: there may be none yet).
        """
        return build_frames(self.log, self.keys, commit, sent_keys, max_frames, max_bytes, refresh)

    def apply_replicated(self, frame: CommitFrame, leader_term: int | None = None) -> Future[int]:
        """Queue a leader's commit (a follower only); resolves to its commit number once
        durable. A frame that does not fit this log fails with ReplicationRefused and
        writes nothing; one already held succeeds as a no-op.

        *leader_term*: the term of the leader that sent it (its welcome's). A
        frame's own term may be an old one (the new leader sends its history
        too), so only the sender's term tells a deposed leader's stream from
        the current one: below this node's :attr:`term`, ReplicationRefused.
        """
        if self._role != "follower":
            raise ReplicationRefused(f"this node is a {self._role}, not a follower: it "
                                     "applies no other node's commits")  # fmt: skip
        if leader_term is not None and leader_term < self.term:
            raise ReplicationRefused(f"a commit from a leader of term {leader_term}, below "
                                     f"this node's term {self.term}")  # fmt: skip
        return self.writer.submit_async(ReplicatedCommitCommand(frame))

    def set_fence(self, may_acknowledge: Callable[[], bool] | None) -> None:
        """Answer writes only while *may_acknowledge()* (an elected leader's lease on its own
        clock; None: always). Checked as each answer is released, after the sync gate: a
        success released while it says no is answered NotLeader with the leader unknown
        (committed here, never acknowledged; the client retries on another node)."""
        self.writer.fence = may_acknowledge
        self._visible.fence = may_acknowledge  # nor does a lapsed leader show more

    def leader_visible(self, position: int) -> None:
        """A follower: its leader's visible head (its frames and heartbeats carry it); this
        node shows its log up to there, never beyond its own head."""
        if self._role == "follower":
            self._visible.leader_says(position)

    def replica_connected(self, node_id: str, advertise: str) -> None:
        """A follower's stream opened (the Replication service)."""
        self._followers.connected(node_id, advertise)

    def replica_acked(
        self,
        node_id: str,
        commit: int,
        position: int,
        shredded_through: int,
        term: int | None = None,
    ) -> None:
        """A follower holds *commit* (log head *position*) durably; may release sync writes.

        *term*: the follower's term. An ack from below this node's term (a
        stream of an earlier leadership) or above it (the follower has seen a
        newer leader: this node is deposed and must not count it towards an
        acknowledgement) is ReplicationRefused and not counted.
        """
        if term is not None and term < self.term:
            raise ReplicationRefused(
                f"an ack of term {term} from {node_id}, below this node's term {self.term}"
            )
        if term is not None and term > self.term:
            raise ReplicationRefused(
                f"{node_id} has seen term {term}, newer than this node's term {self.term}: "
                "this node no longer leads"
            )
        self._followers.acked(node_id, commit, position, shredded_through)

    def replica_disconnected(self, node_id: str) -> None:
        """A follower's stream closed (it stays listed, not connected)."""
        self._followers.disconnected(node_id)

    def followers(self) -> list[FollowerState]:
        """Every follower seen since start, with its lag."""
        return self._followers.snapshot(self.log.head, self.log.committed_at)

    def shredded_through(self) -> int:
        """The log head at the start of this node's last completed shred epoch: every
        tombstone at or before it is shredded here."""
        return shredded_through(self.log)

    # -- reads (blocking: call them off the event loop) ------------------------------------

    #
    # Readers see the log up to the visible head (engine/visibility.py): with
    # sync_replicas, nothing a failover could still discard. Every read stops
    # there; without a cap (a single node) it costs one attribute look-up.

    @property
    def head(self) -> int:
        """The last visible global position (0 for an empty log): the last committed one,
        or with sync_replicas the last one enough followers hold (see :attr:`log_head`)."""
        return self._visible.of(self.log.head)

    @property
    def log_head(self) -> int:
        """The last position of this node's log, visible or not (replication, elections)."""
        return self.log.head

    def read_stream(
        self, stream_id: str, start: int, *, backwards: bool, limit: int
    ) -> list[StoredEvent]:
        return self.reader.read_stream(
            stream_id, start, backwards=backwards, limit=limit, upto=self._visible.cap
        )

    def read_all(self, start: int, *, backwards: bool, limit: int) -> list[StoredEvent]:
        return self.reader.read_all(start, backwards=backwards, limit=limit, upto=self._visible.cap)

    def read_subject(self, subject_id: str, after: int, limit: int) -> list[StoredEvent]:
        """A subject's events after position *after*, in log order (for export)."""
        return self.reader.read_subject(subject_id, after, limit, self._visible.cap)

    def read_all_raw(self, start: int, limit: int) -> RawPage:
        """Stored records from *start* on, still sealed, for a filtering subscriber."""
        return self.log.read_all_page(start, backwards=False, limit=limit, upto=self._visible.cap)

    def open_event(self, position: int, value: bytes) -> StoredEvent:
        """Decode and decrypt one stored record read by :meth:`read_all_raw`."""
        return self.reader.open(position, value)

    def checkpoint(self, group: str) -> int | None:
        """A consumer group's stored checkpoint, or None if it never stored one."""
        return self.log.checkpoint(group)

    def consumer_groups(self) -> int:
        """How many consumer groups have a stored checkpoint."""
        return self.log.consumer_groups()

    def pending_forgets(self) -> int:
        """Forgotten subjects whose shred epoch has not run yet."""
        return self.log.pending_forgets()

    def on_commit(self, listener: Callable[[int], None]) -> None:
        """Call *listener(head)* from the writer thread after every commit (subscriptions)."""
        self.writer.add_head_listener(listener)

    def verifier(self) -> Verifier:
        """A walk over the whole log that checks every record, one step at a time."""
        return Verifier(self.log, self.reader)

    # -- operator state ---------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        """The log's LMDB directory."""
        return self.log.lmdb.path

    @property
    def keys_path(self) -> Path:
        """The key store's LMDB directory."""
        return self.keys.lmdb.path

    def queue_depth(self) -> int:
        """Commands waiting for the writer."""
        return self.writer.queue_depth

    def dek_cache_counts(self) -> tuple[int, int]:
        """Data keys found unwrapped in memory, and those that had to be unwrapped."""
        return self.keys.cache_hits, self.keys.cache_misses

    @property
    def shred_epoch(self) -> int:
        """Shred epochs completed in the life of this store."""
        return self.log.meta.shred_epoch

    def environment_usage(self) -> list[EnvironmentUsage]:
        """Map size and pages in use of each LMDB environment (a closed one is left out).

        Each is read through its read gate: the map may be growing, or the key
        store being swapped by a shred epoch, right now.
        """
        usage: list[EnvironmentUsage] = []
        for name, env in (("log", self.log.lmdb), ("keys", self.keys.lmdb)):
            try:
                map_bytes, used_bytes = env.usage()
                forgets = self.log.counts()[1] if name == "log" else None
            except Exception as exc:  # a closed environment during shutdown
                log.debug("cannot read the %s environment: %s", name, exc)
                continue
            usage.append(EnvironmentUsage(name, map_bytes, used_bytes, forgets))
        return usage

    def backup(self, destination: Path, include_keys: bool) -> tuple[int, int, int]:
        """Copy the log (and, if asked, the key store) compacted into *destination*.

        Returns (log bytes, key-store bytes, last position in the copy). The
        master keyring is never part of a backup, nor put where a copy of the
        keyring's directory would take the backup along (see
        :func:`_refuse_beside_keyring`).
        """
        _refuse_beside_keyring(destination, self.provider)
        make_private_dir(destination)
        if any(destination.iterdir()):
            raise ValueError(f"{destination} is not empty")
        head = self.log.head
        log_bytes = self.log.lmdb.copy_to(destination / "log")
        key_bytes = self.keys.lmdb.copy_to(destination / "keys") if include_keys else 0
        if include_keys:
            custody.align_backup(destination)
        return log_bytes, key_bytes, head

    def stats(self) -> StoreStats:
        """Counts and sizes for operators; cheap (database entry counts, file sizes)."""
        streams, forgotten = self.log.counts()
        return StoreStats(
            last_position=self.head,  # what readers see (the visible head)
            streams=streams,
            # The store key of subject-less events is not a data subject.
            subjects=self.keys.subject_count(excluding=STORE_SUBJECT),
            forgotten_subjects=forgotten,
            pending_shred=self.log.pending_forgets(),
            shred_epoch=self.log.meta.shred_epoch,
            master_version=self.provider.current_version(),
            log_file_bytes=_file_size(self.log.lmdb.path / "data.mdb"),
            log_map_bytes=self.log.lmdb.map_size(),
            key_file_bytes=_file_size(self.keys.lmdb.path / "data.mdb"),
            store_id=self.log.store_id,
            **_restore_record(self.keys),
        )

    def receipt(self, subject_id: str) -> SubjectReceipt:
        return subject_receipt(self.log, self.keys, subject_id)

    def close(self) -> None:
        """Finish queued writes, then close LMDB and release the lock."""
        self.writer.stop()
        if self.writer.gate is not None:  # answers still held fail: not acknowledged
            self.writer.gate.stop()
        self._record_clean_close()
        self.log.close()
        self.keys.close()
        self._lock.close()

    def _record_clean_close(self) -> None:
        """Both high-water marks at a clean stop: the key store saw the head, the log the keys."""
        if self._closed:
            return
        self._closed = True
        if self.writer.acknowledged > self.log.node.acknowledged_commit:  # sync answers since
            self._record_term(self.log.node.term)
        self.keys.mark_position()
        custody.record_key_generation(self.log, self.keys)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class EnvironmentUsage:
    """One LMDB environment's size, for metrics."""

    name: str  # "log" or "keys"
    map_bytes: int
    used_bytes: int
    #: Subjects forgotten in the life of the store (the log's tombstones); log only.
    forgets: int | None = None


@dataclass(frozen=True)
class StoreStats:
    last_position: int
    streams: int
    subjects: int
    forgotten_subjects: int
    pending_shred: int
    shred_epoch: int
    master_version: int
    log_file_bytes: int
    log_map_bytes: int
    key_file_bytes: int
    store_id: bytes
    restored_from: int = 0
    restored_to: int = 0
    restored_at: int = 0


def _restore_record(keys: KeyStore) -> dict[str, int]:
    """The last restored log an operator accepted, as recorded by the key store."""
    meta = keys.meta
    if meta is None or not meta.restored_at:
        return {}
    return {
        "restored_from": meta.restored_from,
        "restored_to": meta.restored_to,
        "restored_at": meta.restored_at,
    }


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def keyring_inside_data_warning(keyring_path: Path, data_dir: Path) -> str:
    """What a keyring inside the data directory means for every copy of that directory."""
    return (
        f"master keyring {keyring_path} is inside the data directory {data_dir}: any copy of "
        f"{data_dir} (a backup, a snapshot, cp -a) decrypts every subject not yet shredded "
        "when it was made, for ever, whatever is forgotten later; keep the keyring outside "
        "the data directory (move it while the server is stopped and start with "
        "--keyring PATH)"
    )


def _is_within(path: Path, directory: Path) -> bool:
    resolved, top = path.resolve(), directory.resolve()
    return resolved == top or top in resolved.parents


def _refuse_beside_keyring(destination: Path, provider: KeyProvider) -> None:
    """Refuse a backup destination inside the master keyring's directory.

    The keyring is never copied, but a backup stored in the keyring's
    directory (with the default layout: in the data directory) travels with
    it in any copy of that directory, and the two together are exactly what
    erasure must never leave behind.
    """
    if not isinstance(provider, FileKeyring):
        return
    keyring_dir = provider.path.parent
    if _is_within(destination, keyring_dir):
        raise ValidationError(
            f"backup destination {destination} is inside {keyring_dir}, the directory of the "
            f"master keyring {provider.path}: a copy of {keyring_dir} would carry the backup "
            "and the keyring together, which decrypts every subject not yet shredded when the "
            "copy is made, for ever; choose a destination outside it"
        )


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold the data directory's exclusive lock (``LOCK_FILE``) until the handle is closed.

    The server, ``verify --data`` and ``restore`` all take it, so none of them
    reads or replaces files another LetheDB process is writing.
    """
    path = data_dir / LOCK_FILE
    handle = open(open_private(path, os.O_RDWR), "r+b")  # noqa: SIM115 (held for the life of the store)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().decode(errors="replace").strip() or "unknown"
        handle.close()
        raise DataDirLocked(
            f"the data directory {path.parent} is in use by another LetheDB process "
            f"(pid {holder}); stop it first or choose another --data directory"
        ) from None
    return handle


def _write_pid(handle: IO[bytes]) -> None:
    """Name this process in the lock file (for the message another process gets)."""
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()).encode())
    handle.flush()
