"""The log environment (``<data>/log/``): events, indexes and log metadata.

The log never holds a key and never holds plaintext personal data: event
payloads arrive here already sealed. Reads use short LMDB read transactions
(MVCC, so they never block the writer); writes happen only in the writer
thread, in the transaction it passes in.

Named databases (see docs/ARCHITECTURE.md for the value formats):

* ``events``: u64 BE position -> RecordBody || chain hash
* ``streams``: stream id -> StreamInfo
* ``stream_index``: length-prefixed stream id + u64 BE version -> u64 BE position
* ``subject_index``: length-prefixed subject id + u64 BE position -> empty
  (complete through ``LogMeta.subject_indexed``; see below)
* ``tombstones``: subject id -> Tombstone
* ``legal_holds``: subject id -> LegalHold
* ``epochs``: u64 BE shred epoch -> EpochRecord
* ``idempotency``: idempotency key -> IdempotencyEntry
* ``idempotency_expiry``: u64 BE created-at ns + key -> empty (for the sweeper)
* ``checkpoints``: consumer group -> u64 BE position
* ``meta``: ``log`` -> LogMeta; ``node`` -> NodeState (this node's term and
  acknowledged commit, local)
* ``journal``: u64 BE commit number (1, 2, ... no gaps) -> JournalEntry: one
  per writer commit that changed replicated state (the unit of replication)

The subject index is completed in chunks, not with each event. An append
touches the end of the ``events`` tree, but its events' subject index keys
land on as many different leaf pages as it has subjects, and every dirty page
is copied, written and fsynced: inserting per event cost as much as the rest
of the append together. So an append writes no index entry; the writer later
merges the unindexed tail (``LogMeta.subject_indexed``, head] in one sorted
pass per chunk (:meth:`LogStore.merge_subject_index`), in one transaction that
also advances ``subject_indexed``, so a crash leaves either the whole chunk or
none of it. Whoever reads the index must combine it with a scan of the tail,
in the same read transaction, reading the meta inside it
(:meth:`LogStore.subject_positions`; ``audit._dek_versions`` does the same).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import lmdb
import msgspec

from lethedb_server.errors import DataLoss
from lethedb_server.storage import codec
from lethedb_server.storage.codec import (
    EpochRecord,
    IdempotencyEntry,
    JournalEntry,
    LegalHold,
    LogMeta,
    NodeState,
    StreamInfo,
    Tombstone,
)
from lethedb_server.storage.lmdbenv import LmdbEnv

LOG_DBS = (
    "events",
    "streams",
    "stream_index",
    "subject_index",
    "tombstones",
    "legal_holds",
    "epochs",
    "idempotency",
    "idempotency_expiry",
    "checkpoints",
    "meta",
    "journal",
)
#: The side tables a journal entry may name as touched (replicated as rows).
REPLICATED_TABLES: Final = ("streams", "idempotency", "tombstones", "legal_holds", "checkpoints")
#: The small side tables a leader sends whole on request (``frames_after(refresh=True)``):
#: a truncation cannot restore their rows (the journal keeps no old values).
REFRESHED_TABLES: Final = ("legal_holds", "checkpoints")
#: The records of the ``meta`` table: the log meta (``LogMeta``), the key-store
#: generation the log last saw (see custody.py) and the format of the
#: idempotency fingerprints (see idempotency.py). Nothing else belongs there.
META_LOG: Final = b"log"
META_KEY_STORE_MARK: Final = b"keys"
META_IDEMPOTENCY_FORMAT: Final = b"idempotency_format"
#: This node's term and acknowledged commit (``NodeState``; local, never replicated).
META_NODE: Final = b"node"
META_RECORDS: Final = frozenset({META_LOG, META_KEY_STORE_MARK, META_IDEMPOTENCY_FORMAT, META_NODE})
_META_KEY = META_LOG
#: The bounds of each genesis journal entry (see :meth:`LogStore.write_genesis`):
#: the bytes of its records (or of its rows' keys and values), and their count.
GENESIS_MAX_BYTES: Final = 2 << 20
GENESIS_MAX_ITEMS: Final = 4096

#: A page of raw events: (position, stored value).
RawPage = list[tuple[int, bytes]]

#: What a reader should do about a damaged record, appended to every DataLoss message.
REMEDY = (
    "run `lethedb verify` to find every damaged record, and restore from a backup "
    "(docs/OPERATIONS.md)"
)
#: Records scanned at most to find the true position of a damaged stream index entry.
_LOCATE_SCAN = 4096
#: How far before a position a read that missed it starts walking towards it.
_SEEK_BACK = 512


class KnownIndexKeys:
    """The ``subject_index`` keys of a run of recent positions, kept in memory.

    The writer records each event's key as it commits it, so a merge need not
    read every record back to learn its subject: that read was most of a
    merge's cost, and a merge stalls appends. The run covers positions
    ``first`` to ``first + len - 1``. A gap (a restart, or the run reaching
    *cap* keys while merges fail) starts a new run; positions before it are
    read back from the log as before.
    """

    def __init__(self, first: int, cap: int) -> None:
        self.first = first
        self._keys: list[bytes] = []
        self._cap = cap

    def record(self, first: int, keys: list[bytes]) -> None:
        """Remember *keys*, those of the committed positions from *first* on."""
        if first != self.first + len(self._keys) or len(self._keys) + len(keys) > self._cap:
            self.first, self._keys = first, []
        self._keys.extend(keys)

    def between(self, start: int, end: int) -> list[bytes] | None:
        """A copy of the keys of positions *start*..*end*, or None unless all are known."""
        if start < self.first or end >= self.first + len(self._keys):
            return None
        return self._keys[start - self.first : end - self.first + 1]

    def merged_through(self, position: int) -> None:
        """Drop the keys up to *position*, which the index now holds."""
        if position >= self.first:
            del self._keys[: position - self.first + 1]
            self.first = position + 1


class LogStore:
    """The event log environment."""

    def __init__(
        self, path: Path, *, map_size: int = 64 << 20, max_map_size: int = 1 << 42
    ) -> None:
        self.lmdb = LmdbEnv(path, LOG_DBS, map_size=map_size, max_map_size=max_map_size)
        db = self.lmdb.dbs
        self.events = db["events"]
        self.streams = db["streams"]
        self.stream_index = db["stream_index"]
        self.subject_index = db["subject_index"]
        self.tombstones = db["tombstones"]
        self.legal_holds = db["legal_holds"]
        self.epochs = db["epochs"]
        self.idempotency = db["idempotency"]
        self.idempotency_expiry = db["idempotency_expiry"]
        self.checkpoints = db["checkpoints"]
        self.meta_db = db["meta"]
        self.journal = db["journal"]
        self.meta = self._load_or_init_meta()
        #: The last journal entry's commit number and term (0, 0: none), as committed.
        self.journal_head, self.journal_term = self._load_journal_head()
        #: This node's recorded term and acknowledged commit, as committed.
        self.node = self._load_node()

    def close(self) -> None:
        self.lmdb.close()

    def _load_or_init_meta(self) -> LogMeta:
        with self.lmdb.read() as txn:
            raw = txn.get(_META_KEY, db=self.meta_db)
        if raw is not None:
            return codec.decode_meta(raw)
        meta = LogMeta(
            format=codec.RECORD_FORMAT,
            store_id=os.urandom(16),
            last_position=0,
            chain_head=codec.GENESIS_HASH,
            shred_epoch=0,
            subject_indexed=0,
        )
        with self.lmdb.begin_write() as txn:
            txn.put(_META_KEY, codec.encode(meta), db=self.meta_db)
        return meta

    @property
    def store_id(self) -> bytes:
        return self.meta.store_id

    def _load_journal_head(self) -> tuple[int, int]:
        with self.lmdb.read() as txn:
            cursor = txn.cursor(db=self.journal)
            if not cursor.last():
                return 0, 0
            commit = codec.from_u64(cursor.key())
            return commit, codec.decode_journal(cursor.value()).term

    def _load_node(self) -> NodeState:
        with self.lmdb.read() as txn:
            raw = txn.get(META_NODE, db=self.meta_db)
        return NodeState() if raw is None else codec.decode_node(raw)

    def put_node(self, txn: lmdb.Transaction, node: NodeState) -> None:
        """Record this node's term and acknowledged commit (set ``self.node`` after commit)."""
        txn.put(META_NODE, codec.encode(node), db=self.meta_db)

    # -- the journal (replication) ----------------------------------------------

    def put_journal(self, txn: lmdb.Transaction, commit: int, entry: bytes) -> None:
        """Put the encoded journal entry of commit number *commit* (always the next one)."""
        txn.put(codec.u64(commit), entry, db=self.journal, append=True)

    def journal_after(self, txn: lmdb.Transaction, commit: int) -> Iterator[tuple[int, bytes]]:
        """Every (commit number, encoded entry) after *commit*, in order."""
        cursor = txn.cursor(db=self.journal)
        if not cursor.set_range(codec.u64(commit + 1)):
            return
        for key, value in _pairs(cursor.iternext()):
            yield codec.from_u64(key), value

    def records_between(self, txn: lmdb.Transaction, first: int, last: int) -> list[bytes]:
        """The stored values of positions *first*..*last*; a missing one is DataLoss."""
        records: list[bytes] = []
        if last < first:
            return records
        cursor = txn.cursor(db=self.events)
        expected = first
        if cursor.set_key(codec.u64(first)):
            for key, value in _pairs(cursor.iternext()):
                if expected > last:
                    break
                if codec.from_u64(key) != expected:
                    break
                records.append(value)
                expected += 1
        if expected <= last:
            raise DataLoss(f"the record at position {expected} is missing; {REMEDY}")
        return records

    def row(self, txn: lmdb.Transaction, table: str, key: bytes) -> bytes | None:
        """A replicated side table row's current value (None: no such row)."""
        value = txn.get(key, db=self._replicated(table))
        return None if value is None else bytes(value)

    def rows(self, txn: lmdb.Transaction, table: str) -> Iterator[tuple[bytes, bytes]]:
        """Every row of a replicated side table, in key order (a genesis frame)."""
        return _pairs(txn.cursor(db=self._replicated(table)).iternext())

    def put_row(self, txn: lmdb.Transaction, table: str, key: bytes, value: bytes | None) -> None:
        """Set a replicated row as the leader holds it (None: delete it).

        Idempotency rows keep their expiry index in step; a tombstone is put by
        the caller with :meth:`put_tombstone` (a follower re-stamps its epoch).
        """
        if table == "idempotency":
            if value is None:
                self.delete_idempotency(txn, key)
            else:
                self.put_idempotency(txn, key, codec.decode_idempotency(value))
            return
        db = self._replicated(table)
        if value is None:
            txn.delete(key, db=db)
        else:
            txn.put(key, value, db=db)

    def drop_checkpoints_after(self, head: int) -> list[str]:
        """Delete every consumer group checkpoint beyond *head*; return those groups (fsync).

        A follower promoted while behind may hold a checkpoint its old leader
        stored past this log's head (rows are sent as they stand): kept, it
        would make the group skip the new leader's events at those positions.
        """

        def drop(txn: lmdb.Transaction) -> list[str]:
            groups = [k for k, v in self.rows(txn, "checkpoints") if codec.from_u64(v) > head]
            for group in groups:
                txn.delete(group, db=self.checkpoints)
            return [g.decode() for g in groups]

        return self.lmdb.write(drop)

    def stream_row_at(
        self, txn: lmdb.Transaction, stream_id: str, value: bytes, head: int
    ) -> bytes | None:
        """The ``streams`` row *value* as it was when the log ended at *head*.

        None: the stream did not exist yet. A stream's versions lie at growing
        positions, so its last version at or before *head* is found by a
        binary search of the stream index (a follower catching up on a long,
        busy stream must not walk back over every later version per frame).
        """
        info = codec.decode_stream(value)
        if info.first_position > head:
            return None
        low, high = 0, info.last_version
        while low < high:
            middle = (low + high + 1) // 2
            raw = txn.get(codec.stream_version_key(stream_id, middle), db=self.stream_index)
            if raw is not None and codec.from_u64(raw) <= head:
                low = middle
            else:
                high = middle - 1
        if low == info.last_version:
            return value
        return codec.encode(StreamInfo(low, info.first_position, info.created_at))

    def _replicated(self, table: str) -> Any:
        if table not in REPLICATED_TABLES:
            raise ValueError(f"{table!r} is not a replicated table")
        return self.lmdb.dbs[table]

    def committed_at(self, commit: int) -> int | None:
        """When the leader committed *commit* (its journal entry's time); None: no such one."""
        with self.lmdb.read() as txn:
            raw = txn.get(codec.u64(commit), db=self.journal)
        return None if raw is None else codec.decode_journal(raw).committed_at

    def holds_nothing(self) -> bool:
        """No record and no journal entry: a new data directory (a follower may adopt an id)."""
        return self.meta.last_position == 0 and self.journal_head == 0

    def adopt_store_id(self, store_id: bytes) -> None:
        """Give an empty log another store id (a follower of that store); commits at once."""
        meta = msgspec.structs.replace(self.meta, store_id=store_id)
        self.lmdb.write(lambda txn: self.put_meta(txn, meta))
        self.meta = meta

    def write_genesis(
        self,
        term: int,
        committed_at: int,
        max_bytes: int = GENESIS_MAX_BYTES,
        max_items: int = GENESIS_MAX_ITEMS,
    ) -> int:
        """Journal a store that predates the journal; return how many entries it wrote.

        Written once, at start-up before the writer runs, when the journal is
        empty but the log is not, all in one transaction (a crash leaves the
        whole genesis or none of it). It is several entries, each bounded to
        *max_bytes* and *max_items*, because each entry is sent as one frame
        and one message: first runs of positions (a record larger than the
        bound is an entry alone), then the rows of the replicated side tables
        listed in ``touched`` (entries with no records), so a follower's
        records are in place before the stream heads, idempotency results and
        tombstones that name them.
        """
        if self.journal_head or not self.meta.last_position:
            return 0

        def put(txn: lmdb.Transaction) -> int:
            entries = [
                codec.JournalEntry(term, first, last, committed_at)
                for first, last in self._genesis_runs(txn, max_bytes, max_items)
            ]
            after = self.meta.last_position + 1
            entries += [
                codec.JournalEntry(term, after, after - 1, committed_at, touched)
                for touched in self._genesis_rows(txn, max_bytes, max_items)
            ]
            for commit, entry in enumerate(entries, start=1):
                self.put_journal(txn, commit, codec.encode_journal(entry))
            return len(entries)

        written = self.lmdb.write(put)
        self.journal_head, self.journal_term = written, term
        return written

    def _genesis_runs(
        self, txn: lmdb.Transaction, max_bytes: int, max_items: int
    ) -> Iterator[tuple[int, int]]:
        """Runs (first, last) of positions 1..head, each within the bounds."""
        first, size, position = 1, 0, 0
        cursor = txn.cursor(db=self.events)
        for position, length in ((codec.from_u64(k), len(v)) for k, v in _pairs(cursor.iternext())):
            if position > first and (size + length > max_bytes or position - first >= max_items):
                yield first, position - 1
                first, size = position, 0
            size += length
        if position != self.meta.last_position:
            raise DataLoss(f"the log ends at position {position}, not at its head "
                           f"{self.meta.last_position}; {REMEDY}")  # fmt: skip
        yield first, position

    def _genesis_rows(
        self, txn: lmdb.Transaction, max_bytes: int, max_items: int
    ) -> Iterator[tuple[tuple[str, bytes], ...]]:
        """Every replicated side table row as (table, key), in chunks within the bounds.

        The bound counts each row's key and value: the frame carries both.
        """
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for table in REPLICATED_TABLES:
            for key, value in self.rows(txn, table):
                length = len(key) + len(value)
                if chunk and (size + length > max_bytes or len(chunk) >= max_items):
                    yield tuple(chunk)
                    chunk, size = [], 0
                chunk.append((table, key))
                size += length
        if chunk:
            yield tuple(chunk)

    def journal_entry(self, txn: lmdb.Transaction, commit: int) -> JournalEntry | None:
        """The journal entry of *commit* (None: no such commit)."""
        raw = txn.get(codec.u64(commit), db=self.journal)
        return None if raw is None else codec.decode_journal(raw)

    def head_after_commit(self, commit: int) -> int:
        """The log head once *commit* was applied (its entry's last position; 0 for 0)."""
        with self.lmdb.read() as txn:
            entry = self.journal_entry(txn, commit) if commit else None
        return 0 if entry is None else entry.last_position

    def truncate_after(self, commit: int) -> Truncation:
        """Discard every journal entry after *commit* and what it wrote, in one transaction.

        The records of their positions with their ``stream_index`` and
        ``subject_index`` entries; the ``streams`` rows go back to the last
        version kept (or go, for a stream the discarded commits began); the
        idempotency entries and tombstones those commits wrote go; the log meta
        (last position, chain head, ``subject_indexed``) and the journal head
        are restored. Rows of ``legal_holds`` and ``checkpoints`` they wrote
        cannot be restored (the journal holds no old values): they are deleted
        and named in the result, for the leader's refresh to send again.
        Commits with fsync; the caller orders it against the writer (it runs
        in the writer thread).
        """
        truncation = self.lmdb.write(lambda txn: self._truncate(txn, commit))
        if truncation.commits:
            self.meta = truncation.meta
            self.journal_head, self.journal_term = commit, truncation.term
        return truncation

    def _truncate(self, txn: lmdb.Transaction, commit: int) -> Truncation:
        entries = [codec.decode_journal(raw) for _, raw in self.journal_after(txn, commit)]
        meta = codec.decode_meta(cast(bytes, txn.get(_META_KEY, db=self.meta_db)))
        kept = self.journal_entry(txn, commit) if commit else None
        term = 0 if kept is None else kept.term
        if not entries:
            return Truncation(0, meta.last_position + 1, meta.last_position, meta, term, (), ())
        head = entries[0].first_position - 1
        if entries[-1].last_position != meta.last_position:
            raise DataLoss(f"the journal ends at position {entries[-1].last_position} but the "
                           f"log at {meta.last_position}; {REMEDY}")  # fmt: skip
        touched = _touched(txn, self, entries)
        self._drop_records(txn, head, meta)
        forgotten = self._drop_rows(txn, touched, head)
        chain = codec.GENESIS_HASH if head == 0 else cast(bytes, self.record_at(txn, head))
        restored = msgspec.structs.replace(
            meta,
            last_position=head,
            chain_head=chain[-codec.HASH_SIZE :],
            subject_indexed=min(meta.subject_indexed, head),
        )
        self.put_meta(txn, restored)
        for number in range(commit + 1, commit + len(entries) + 1):
            txn.delete(codec.u64(number), db=self.journal)
        unrestored = tuple((t, k) for t, k in touched if t in ("legal_holds", "checkpoints"))
        return Truncation(
            len(entries), head + 1, meta.last_position, restored, term, forgotten, unrestored
        )

    def _drop_records(self, txn: lmdb.Transaction, head: int, meta: LogMeta) -> None:
        """Delete the records after *head* and their index entries; roll back stream heads."""
        first_dropped: dict[str, int] = {}
        for position, value in enumerate(
            self.records_between(txn, head + 1, meta.last_position), start=head + 1
        ):
            record = codec.decode_record_subject(value)
            txn.delete(
                codec.stream_version_key(record.stream_id, record.stream_version),
                db=self.stream_index,
            )
            if position <= meta.subject_indexed:
                txn.delete(
                    codec.subject_position_key(record.subject_id, position), db=self.subject_index
                )
            first_dropped.setdefault(record.stream_id, record.stream_version)
            txn.delete(codec.u64(position), db=self.events)
        for stream_id, version in first_dropped.items():
            info = self.stream_info(txn, stream_id)
            if info is None or version == 0:
                txn.delete(stream_id.encode(), db=self.streams)
            else:
                self.put_stream_info(
                    txn, stream_id, codec.StreamInfo(version - 1, info.first_position,
                                                     info.created_at),
                )  # fmt: skip

    def _drop_rows(
        self, txn: lmdb.Transaction, touched: list[tuple[str, bytes]], head: int
    ) -> tuple[str, ...]:
        """Delete the side table rows the discarded commits wrote (stream heads apart).

        Idempotency entries and legal holds and checkpoints go whole (the journal
        keeps no old value: the leader's refresh brings back the latter two);
        tombstones go when their erasure record is beyond *head*. Return the
        subjects whose tombstones went.
        """
        forgotten: list[str] = []
        for table, key in touched:
            if table == "idempotency":
                self.delete_idempotency(txn, key)
            elif table in REFRESHED_TABLES:
                txn.delete(key, db=self._replicated(table))
            elif table == "tombstones":
                raw = txn.get(key, db=self.tombstones)
                if raw is not None and codec.decode_tombstone(raw).position > head:
                    txn.delete(key, db=self.tombstones)
                    forgotten.append(key.decode())
        return tuple(forgotten)

    @property
    def head(self) -> int:
        """The last committed global position (0 for an empty log)."""
        return self.meta.last_position

    # -- writer-side helpers (called with the writer's transaction) ------------

    def put_meta(self, txn: lmdb.Transaction, meta: LogMeta) -> None:
        txn.put(_META_KEY, codec.encode(meta), db=self.meta_db)

    def stream_info(self, txn: lmdb.Transaction, stream_id: str) -> StreamInfo | None:
        raw = txn.get(stream_id.encode(), db=self.streams)
        return None if raw is None else codec.decode_stream(raw)

    def put_checkpoint(self, txn: lmdb.Transaction, group: str, position: int) -> None:
        txn.put(group.encode(), codec.u64(position), db=self.checkpoints)

    def stored_checkpoint(self, txn: lmdb.Transaction, group: str) -> int | None:
        raw = txn.get(group.encode(), db=self.checkpoints)
        return None if raw is None else codec.from_u64(raw)

    def checkpoint_count(self, txn: lmdb.Transaction) -> int:
        """How many consumer groups have a stored checkpoint."""
        return int(txn.stat(self.checkpoints)["entries"])

    def put_stream_info(self, txn: lmdb.Transaction, stream_id: str, info: StreamInfo) -> None:
        txn.put(stream_id.encode(), codec.encode(info), db=self.streams)

    def put_tombstone(self, txn: lmdb.Transaction, subject_id: str, tombstone: Tombstone) -> None:
        txn.put(subject_id.encode(), codec.encode(tombstone), db=self.tombstones)

    def put_legal_hold(self, txn: lmdb.Transaction, subject_id: str, hold: LegalHold) -> None:
        txn.put(subject_id.encode(), codec.encode(hold), db=self.legal_holds)

    def delete_legal_hold(self, txn: lmdb.Transaction, subject_id: str) -> None:
        txn.delete(subject_id.encode(), db=self.legal_holds)

    def put_epoch(self, txn: lmdb.Transaction, epoch: int, record: EpochRecord) -> None:
        txn.put(codec.u64(epoch), codec.encode(record), db=self.epochs)

    def put_key_store_mark(self, txn: lmdb.Transaction, mark: codec.KeyStoreMark) -> None:
        """Record which key store generation this log goes with."""
        txn.put(META_KEY_STORE_MARK, codec.encode(mark), db=self.meta_db)

    def record_at(self, txn: lmdb.Transaction, position: int) -> bytes | None:
        """The sealed record at *position*, undecoded; None when it is missing."""
        value = txn.get(codec.position_key(position), db=self.events)
        return None if value is None else bytes(value)

    # -- the idempotency table and its expiry index ----------------------------
    #
    # ``idempotency`` maps a key to its encoded entry; ``idempotency_expiry``
    # holds ``u64(created_at) || key`` for each, so the oldest are found first
    # without a full scan. The methods below keep the two in step.

    def idempotency_entry(self, txn: lmdb.Transaction, key: bytes) -> IdempotencyEntry | None:
        """The entry stored under *key*, expired or not (the caller judges)."""
        raw = txn.get(key, db=self.idempotency)
        return None if raw is None else codec.decode_idempotency(raw)

    def put_idempotency(self, txn: lmdb.Transaction, key: bytes, entry: IdempotencyEntry) -> None:
        """Store *entry* under *key*, replacing (and un-indexing) an expired one."""
        old = txn.get(key, db=self.idempotency)
        if old is not None:  # an expired entry being replaced
            txn.delete(
                codec.u64(codec.decode_idempotency(old).created_at) + key,
                db=self.idempotency_expiry,
            )
        txn.put(key, codec.encode(entry), db=self.idempotency)
        txn.put(codec.u64(entry.created_at) + key, b"", db=self.idempotency_expiry)

    def replace_idempotency(self, txn: lmdb.Transaction, key: bytes, value: bytes) -> None:
        """Overwrite an entry's value in place (same ``created_at``: its expiry key stands)."""
        txn.put(key, value, db=self.idempotency)

    def delete_idempotency(self, txn: lmdb.Transaction, key: bytes) -> None:
        """Delete an entry and its expiry index key (an undecodable one has none to find)."""
        old = txn.get(key, db=self.idempotency)
        if old is None:
            return
        try:
            created = codec.decode_idempotency(old).created_at
        except msgspec.DecodeError:
            pass  # no expiry key can be found for it; the sweeper skips a missing entry
        else:
            txn.delete(codec.u64(created) + key, db=self.idempotency_expiry)
        txn.delete(key, db=self.idempotency)

    def expire_idempotency(self, txn: lmdb.Transaction, cutoff: int, limit: int) -> int:
        """Delete up to *limit* entries created before *cutoff*, oldest first; return how many."""
        before = codec.u64(cutoff)
        removed = 0
        cursor = txn.cursor(db=self.idempotency_expiry)
        cursor.first()
        while removed < limit:
            key = bytes(cursor.key())
            if not key or key[:8] >= before:
                break
            txn.delete(key[8:], db=self.idempotency)
            cursor.delete()
            removed += 1
        return removed

    def idempotency_entries_after(
        self, txn: lmdb.Transaction, after: bytes
    ) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, encoded entry) with a key after *after* (b"": from the first), in order."""
        cursor = txn.cursor(db=self.idempotency)
        positioned = cursor.set_range(after) if after else cursor.first()
        if positioned and after and bytes(cursor.key()) == after:
            positioned = cursor.next()
        while positioned:
            key, value = bytes(cursor.key()), bytes(cursor.value())
            positioned = cursor.next()
            yield key, value

    def idempotency_count(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self.idempotency)["entries"])

    def idempotency_format(self, txn: lmdb.Transaction) -> int | None:
        """The digest format every entry has (None: written before keyed digests)."""
        raw = txn.get(META_IDEMPOTENCY_FORMAT, db=self.meta_db)
        return None if raw is None else codec.from_u64(raw)

    def put_idempotency_format(self, txn: lmdb.Transaction, digest_format: int) -> None:
        txn.put(META_IDEMPOTENCY_FORMAT, codec.u64(digest_format), db=self.meta_db)

    def put_event(
        self, txn: lmdb.Transaction, position_key: bytes, value: bytes, stream_version_key: bytes
    ) -> None:
        """Put a sealed event and its ``stream_index`` entry.

        The caller builds the keys (it reuses the position key in the subject
        index key, and the stream prefix for a whole append). No
        ``subject_index`` entry: :meth:`merge_subject_index` adds it later, in
        bulk.
        """
        # append=True: positions only grow, so LMDB can skip the tree search.
        txn.put(position_key, value, db=self.events, append=True)
        txn.put(stream_version_key, position_key, db=self.stream_index)

    def merge_subject_index(
        self,
        txn: lmdb.Transaction,
        meta: LogMeta,
        limit: int,
        known: KnownIndexKeys | None = None,
    ) -> LogMeta:
        """Index up to *limit* events after ``meta.subject_indexed``; return the new meta.

        The keys come from *known* when it covers the chunk (the writer keeps
        the keys of the events it wrote), else from reading each record's
        subject back. They are sorted before they are put, so each subject's
        leaf page is dirtied once per chunk rather than once per event. The
        new meta is put in *txn*: the entries and the advanced
        ``subject_indexed`` commit together or not at all.
        """
        start = meta.subject_indexed + 1
        end = min(meta.last_position, meta.subject_indexed + limit)
        if end < start:
            return meta
        keys = known.between(start, end) if known is not None else None
        if keys is None:
            keys = self._read_index_keys(txn, start, end)
        keys.sort()
        txn.cursor(db=self.subject_index).putmulti([(k, b"") for k in keys])
        merged = msgspec.structs.replace(meta, subject_indexed=end)
        self.put_meta(txn, merged)
        return merged

    def _read_index_keys(self, txn: lmdb.Transaction, start: int, end: int) -> list[bytes]:
        """The ``subject_index`` keys of events *start*..*end*, read back from their records."""
        keys: list[bytes] = []
        prefixes: dict[str, bytes] = {}  # a chunk names each subject many times
        position = start
        cursor = txn.cursor(db=self.events)
        if cursor.set_key(codec.position_key(start)):
            for key, value in _pairs(cursor.iternext()):
                position_key = codec.position_key(position)
                if key != position_key:
                    break
                subject = _subject_of(position, value)
                prefix = prefixes.get(subject)
                if prefix is None:
                    prefix = prefixes[subject] = codec.subject_prefix(subject)
                keys.append(prefix + position_key)
                if position == end:
                    break
                position += 1
        if len(keys) != end - start + 1:
            raise DataLoss(f"events {start}..{end} are not all in the log; run `lethedb verify`")
        return keys

    # -- reads ------------------------------------------------------------------

    def read_all_page(
        self, start: int, *, backwards: bool, limit: int, upto: int | None = None
    ) -> RawPage:
        """Up to *limit* events from position *start* (inclusive) in one direction,
        none beyond position *upto* (None: the head; see engine/visibility.py).

        The positions must be contiguous up to the head the log meta records
        in the same transaction. LMDB has no checksums, so a damaged key
        would otherwise shift, skip or invent a position silently: a key that
        is not the next position is :class:`DataLoss` naming the position
        that cannot be read.
        """
        page: RawPage = []
        if start < 1 and backwards:
            return page
        with self.lmdb.read() as txn:
            head = self.head_in(txn)
            if upto is not None and upto < head:
                head = upto
            expected = min(start, head) if backwards else max(start, 1)
            if not 1 <= expected <= head:
                return page
            cursor = txn.cursor(db=self.events)
            if not cursor.set_key(codec.position_key(expected)):
                _seek(cursor, expected, head, backwards)
            if backwards:
                items, step, end = _pairs(cursor.iterprev()), -1, 0
            else:
                items, step, end = _pairs(cursor.iternext()), 1, head + 1
            for key, value in items:
                if _position_or_none(key) != expected:
                    raise _misplaced(expected, key)
                page.append((expected, value))
                expected += step
                if len(page) >= limit or expected == end:
                    break
            else:
                raise _misplaced(expected, None)
        return page

    def head_in(self, txn: lmdb.Transaction) -> int:
        """The head as *txn* sees it (the meta is committed with every append)."""
        raw = txn.get(_META_KEY, db=self.meta_db)
        try:
            return codec.decode_meta(cast(bytes, raw)).last_position
        except Exception as exc:  # msgspec raises several types for damaged bytes
            raise DataLoss(f"the log meta record is damaged ({exc}); {REMEDY}") from exc

    def read_stream_page(
        self, stream_id: str, start: int, *, backwards: bool, limit: int, upto: int | None = None
    ) -> RawPage | None:
        """Up to *limit* events of a stream from version *start*; None if no stream.

        Nothing beyond position *upto* (None: the head): a stream whose first
        event lies beyond it does not exist yet for this reader.

        The stream's versions must be contiguous, and each index entry must
        name the record of that stream and version: a damaged entry is
        :class:`DataLoss` naming the version and, when it can be found, the
        event's true position.
        """
        page: RawPage = []
        prefix = codec.stream_prefix(stream_id)
        with self.lmdb.read() as txn:
            raw_info = txn.get(stream_id.encode(), db=self.streams)
            if raw_info is None:
                return None
            try:
                info = codec.decode_stream(raw_info)
            except Exception as exc:  # msgspec raises several types for damaged bytes
                raise DataLoss(
                    f"the record of stream {stream_id!r} is damaged ({exc}); {REMEDY}"
                ) from exc
            last = info.last_version
            if upto is not None and info.first_position > upto:
                return None
            if start < 0:
                return page
            expected = min(start, last) if backwards else start
            if expected > last:
                return page
            index = txn.cursor(db=self.stream_index)
            found = index.set_range(codec.stream_version_key(stream_id, expected))
            if backwards:
                key = bytes(index.key())
                if not found or not key.startswith(prefix) or codec.from_u64(key[-8:]) > expected:
                    found = index.prev() if found else index.last()
                items = _pairs(index.iterprev()) if found else iter(())
            else:
                items = _pairs(index.iternext()) if found else iter(())
            step = -1 if backwards else 1
            head = codec.record_head(stream_id)
            for key, position_raw in items:
                if key != prefix + codec.u64(expected):
                    break
                if upto is not None and codec.from_u64(position_raw) > upto:
                    if not backwards:
                        return page  # the rest is not visible yet
                    expected -= 1  # the newest versions are not visible yet
                    if expected < 0:
                        return page
                    continue
                page.append(self._stream_event(txn, stream_id, expected, position_raw, head))
                expected += step
                if len(page) >= limit or not 0 <= expected <= last:
                    return page
            raise self._version_lost(txn, stream_id, expected)
        return page

    def _stream_event(
        self,
        txn: lmdb.Transaction,
        stream_id: str,
        version: int,
        position_raw: bytes,
        head: bytes = b"",
    ) -> tuple[int, bytes]:
        """The record a stream index entry names, checked to be that stream's version.

        *head* is :func:`codec.record_head` of the stream: a record that starts
        with it and the version's encoding is that stream's version without
        being decoded (the common case, on the hot path of stream reads).
        """
        raw = txn.get(position_raw, db=self.events) if len(position_raw) == 8 else None
        if raw is not None:
            value = cast(bytes, raw)  # every transaction here is opened with buffers=False
            position = codec.from_u64(position_raw)
            if (
                head
                and value.startswith(head)
                and value.startswith(codec.encode(version), len(head))
            ):
                return position, value
            try:
                found = codec.decode_record_subject(value)
            except Exception as exc:  # msgspec raises several types for damaged bytes
                raise DataLoss(
                    f"the record at position {position} (stream {stream_id!r}, version "
                    f"{version}) cannot be decoded ({exc}); {REMEDY}"
                ) from exc
            if (found.stream_id, found.stream_version) == (stream_id, version):
                return position, value
        raise self._version_lost(txn, stream_id, version)

    def _version_lost(self, txn: lmdb.Transaction, stream_id: str, version: int) -> DataLoss:
        """The error for a stream version whose index entry is damaged or missing."""
        position = self._locate(txn, stream_id, version)
        where = f"position {position}" if position else "its position is unknown"
        return DataLoss(
            f"stream {stream_id!r} version {version} ({where}) cannot be read: its stream "
            f"index entry is damaged; {REMEDY}"
        )

    def _locate(self, txn: lmdb.Transaction, stream_id: str, version: int) -> int | None:
        """Find a stream version's record by scanning from the previous version's position.

        Only on the error path, and bounded: a stream's events are usually
        close together, and an unbounded scan could read the whole log.
        """
        if version == 0:
            info = codec.decode_stream(cast(bytes, txn.get(stream_id.encode(), db=self.streams)))
            after = info.first_position - 1
        else:
            raw = txn.get(codec.stream_version_key(stream_id, version - 1), db=self.stream_index)
            if raw is None or len(raw) != 8:
                return None
            after = codec.from_u64(raw)
        cursor = txn.cursor(db=self.events)
        if not cursor.set_range(codec.position_key(after + 1)):
            return None
        for _, (key, value) in zip(range(_LOCATE_SCAN), _pairs(cursor.iternext()), strict=False):
            try:
                head = codec.decode_record_subject(value)
            except Exception:  # msgspec raises several types for damaged bytes
                continue
            if (head.stream_id, head.stream_version) == (stream_id, version):
                return _position_or_none(key)
        return None

    def last_version(self, stream_id: str) -> int | None:
        with self.lmdb.read() as txn:
            info = self.stream_info(txn, stream_id)
        return None if info is None else info.last_version

    def counts(self) -> tuple[int, int]:
        """(streams, forgotten subjects) in the life of the log, in one read."""
        with self.lmdb.read() as txn:
            return int(txn.stat(self.streams)["entries"]), int(txn.stat(self.tombstones)["entries"])

    def checkpoint(self, group: str) -> int | None:
        """A consumer group's stored checkpoint, or None if it never stored one."""
        with self.lmdb.read() as txn:
            return self.stored_checkpoint(txn, group)

    def consumer_groups(self) -> int:
        """How many consumer groups have a stored checkpoint."""
        with self.lmdb.read() as txn:
            return self.checkpoint_count(txn)

    def is_forgotten(self, subject_id: str) -> bool:
        with self.lmdb.read() as txn:
            return txn.get(subject_id.encode(), db=self.tombstones) is not None

    # -- subjects and erasure ---------------------------------------------------

    def subject_positions(
        self, subject_id: str, after: int, limit: int, upto: int | None = None
    ) -> list[int]:
        """Positions of the subject's events after *after*, in log order, none beyond
        *upto* (None: the head).

        The index answers through ``subject_indexed``; the unindexed tail after
        it is scanned. The meta is read in the same transaction as both, so a
        merge committing meanwhile can neither hide an event nor show it twice.
        """
        with self.lmdb.read() as txn:
            indexed = self.subject_indexed(txn)
            if upto is not None and upto < indexed:
                indexed = upto
            positions = indexed_subject_positions(
                txn, self.subject_index, subject_id, after, indexed, limit
            )
            if len(positions) < limit:
                positions += tail_subject_positions(
                    txn, self.events, subject_id, max(after, indexed), limit - len(positions), upto
                )
        return positions

    def subject_indexed(self, txn: lmdb.Transaction) -> int:
        """The position through which ``subject_index`` is complete, as *txn* sees it."""
        return codec.decode_meta(cast(bytes, txn.get(_META_KEY, db=self.meta_db))).subject_indexed

    def read_positions(self, positions: list[int]) -> RawPage:
        """The records at *positions*; one that is not there is DataLoss (a damaged index)."""
        page: RawPage = []
        with self.lmdb.read() as txn:
            for p in positions:
                value = txn.get(codec.position_key(p), db=self.events)
                if value is None:
                    raise DataLoss(
                        f"position {p}, which the subject index names, holds no event: the "
                        f"index entry or the record is damaged; {REMEDY}"
                    )
                page.append((p, cast(bytes, value)))
        return page

    def count_subject_events(self, subject_id: str) -> int:
        count, after, page = 0, 0, 10_000
        while True:
            batch = self.subject_positions(subject_id, after, page)
            count += len(batch)
            if len(batch) < page:  # the last page: asking again would rescan the tail
                return count
            after = batch[-1]

    def subject_records(
        self, txn: lmdb.Transaction, subject_id: str
    ) -> tuple[Tombstone | None, LegalHold | None]:
        tomb = txn.get(subject_id.encode(), db=self.tombstones)
        hold = txn.get(subject_id.encode(), db=self.legal_holds)
        try:
            return (
                None if tomb is None else codec.decode_tombstone(tomb),
                None if hold is None else codec.decode_legal_hold(hold),
            )
        except Exception as exc:  # msgspec raises several types for damaged bytes
            raise DataLoss(
                f"the tombstone or legal hold record of subject {subject_id!r} is damaged "
                f"({exc}); {REMEDY}"
            ) from exc

    def subject_status(self, subject_id: str) -> tuple[Tombstone | None, LegalHold | None]:
        with self.lmdb.read() as txn:
            return self.subject_records(txn, subject_id)

    def all_tombstones(self) -> list[tuple[str, Tombstone]]:
        with self.lmdb.read() as txn:
            return [
                (bytes(k).decode(), codec.decode_tombstone(v))
                for k, v in txn.cursor(db=self.tombstones)
            ]

    def epoch(self, epoch: int) -> EpochRecord | None:
        with self.lmdb.read() as txn:
            raw = txn.get(codec.u64(epoch), db=self.epochs)
        return None if raw is None else codec.decode_epoch(raw)

    def pending_forgets(self) -> int:
        """Tombstones whose shred epoch has not run yet."""
        epoch = self.meta.shred_epoch
        return sum(1 for _, t in self.all_tombstones() if t.shred_epoch > epoch)


@dataclass(frozen=True, slots=True)
class Truncation:
    """What :meth:`LogStore.truncate_after` discarded."""

    #: Journal entries (commits) discarded; 0: nothing was.
    commits: int
    #: The positions whose records were discarded (last < first: none).
    first_position: int
    last_position: int
    #: The log meta after it.
    meta: LogMeta
    #: The term of the last journal entry kept (0: none).
    term: int
    #: Subjects whose tombstones (written by a discarded commit) were removed.
    tombstones_removed: tuple[str, ...]
    #: ``legal_holds`` and ``checkpoints`` rows the discarded commits wrote,
    #: deleted here until the leader's refresh sends them again.
    unrestored: tuple[tuple[str, bytes], ...]


def _touched(
    txn: lmdb.Transaction, log_store: LogStore, entries: list[JournalEntry]
) -> list[tuple[str, bytes]]:
    """The rows the *entries* name (every row, for an old unbounded genesis), each once."""
    rows: dict[tuple[str, bytes], None] = {}
    for entry in entries:
        if entry.everything:
            for table in REPLICATED_TABLES:
                rows.update(((table, k), None) for k, _ in log_store.rows(txn, table))
        rows.update(dict.fromkeys(entry.touched))
    return list(rows)


def indexed_subject_positions(
    txn: lmdb.Transaction, index: Any, subject_id: str, after: int, indexed: int, limit: int
) -> list[int]:
    """Positions in (*after*, *indexed*] that ``subject_index`` lists for the subject.

    Entries past *indexed* cannot exist (a merge commits them together with
    the meta), but reading stops there anyway: the tail scan covers the rest.
    """
    positions: list[int] = []
    if after >= indexed:
        return positions
    prefix = codec.subject_prefix(subject_id)
    last = codec.subject_position_key(subject_id, indexed)
    cursor = txn.cursor(db=index)
    if not cursor.set_range(codec.subject_position_key(subject_id, after + 1)):
        return positions
    for key in cursor.iternext(values=False):
        raw = bytes(key)
        if not raw.startswith(prefix) or raw > last:
            break
        positions.append(codec.from_u64(raw[-8:]))
        if len(positions) >= limit:
            break
    return positions


def tail_subject_positions(
    txn: lmdb.Transaction,
    events: Any,
    subject_id: str,
    after: int,
    limit: int,
    upto: int | None = None,
) -> list[int]:
    """Positions after *after* (up to *upto*; None: the end) whose record names the
    subject, by scanning ``events``.

    Used only for the unindexed tail, which the writer keeps short. A record
    is decoded only when the subject id's msgpack bytes occur in it at all.
    """
    positions: list[int] = []
    needle = codec.encode(subject_id)
    cursor = txn.cursor(db=events)
    if not cursor.set_range(codec.position_key(after + 1)):
        return positions
    last = codec.position_key(upto) if upto is not None else None
    for key, value in _pairs(cursor.iternext()):
        if last is not None and key > last:
            break
        if needle in value and _subject_of(codec.position_from_key(key), value) == subject_id:
            positions.append(codec.position_from_key(key))
            if len(positions) >= limit:
                break
    return positions


def _subject_of(position: int, value: bytes) -> str:
    """The record's subject id; a record that cannot be decoded is DataLoss, never skipped."""
    try:
        return codec.record_subject(value)
    except msgspec.DecodeError as exc:
        raise DataLoss(f"the record at position {position} cannot be decoded: {exc}") from exc


def _position_or_none(key: bytes | memoryview) -> int | None:
    """The position an events key names, or None if it is not one (a damaged key)."""
    return codec.position_from_key(key) if len(key) == 8 else None


def _seek(cursor: lmdb.Cursor, target: int, head: int, backwards: bool) -> None:
    """Put *cursor* on position *target*, which a direct lookup did not find.

    A damaged key breaks the order LMDB's binary search relies on, so the
    lookup may miss a record that is there, or land beside the damage. Only
    on this error path: walk towards the target in the read's direction from
    a little before it, where the order is intact, and report the first
    position out of sequence on the way.
    """
    step = -1 if backwards else 1
    begin = min(head, target + _SEEK_BACK) if backwards else max(1, target - _SEEK_BACK)
    found = cursor.set_range(codec.position_key(begin))
    position = _position_or_none(cursor.key()) if found else None
    if position is None or position > head or (position - target) * step > 0:
        # Start from the end the read comes from instead: always where LMDB says.
        if not (cursor.last() if backwards else cursor.first()):
            raise _misplaced(head if backwards else 1, None)
        position = _position_or_none(cursor.key())
        edge = head if backwards else 1
        if position != edge:
            raise _misplaced(edge, bytes(cursor.key()))
    move = cursor.prev if backwards else cursor.next
    while position != target:
        if not move():
            raise _misplaced(position + step, None)
        following = _position_or_none(cursor.key())
        if following != position + step:
            raise _misplaced(position + step, bytes(cursor.key()))
        position = following


def _misplaced(position: int, key: bytes | None) -> DataLoss:
    """Position *position* is not where it must be: its key (or LMDB's page) is damaged."""
    if key is None:
        found = "the log ends before it"
    else:
        shown = _position_or_none(key)
        found = f"key {shown if shown is not None else '0x' + key.hex()} is stored where it belongs"
    return DataLoss(
        f"the event at position {position} cannot be read: {found} (a damaged key or page); "
        f"{REMEDY}"
    )


def _pairs(
    items: Iterator[tuple[bytes | memoryview, bytes | memoryview]],
) -> Iterator[tuple[bytes, bytes]]:
    """Cursor items as bytes: every transaction here is opened with buffers=False."""
    return cast(Iterator[tuple[bytes, bytes]], items)
