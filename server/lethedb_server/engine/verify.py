"""Walking the log to prove it is intact: hash chain and authentication tags.

Every record's chain hash is recomputed from the genesis hash and compared
with the stored one, and every payload is decrypted so its AES-GCM tag is
checked. Events of forgotten subjects cannot be decrypted any more; they are
still covered by the chain (which hashes ciphertext) and are counted apart.
The walk reads one page per read transaction, so it never pins old pages and
can run beside a live writer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lethedb_server.crypto.keyring import FileKeyring
from lethedb_server.engine.reader import DEFAULT_PAGE, EventReader
from lethedb_server.errors import DataLoss
from lethedb_server.storage import codec, pagecheck
from lethedb_server.storage.keys import KEY_DBS, KeyStore
from lethedb_server.storage.log import LOG_DBS, META_LOG, META_RECORDS, LogStore

_U64 = struct.Struct(">Q")

#: A record whose stored chain hash is not the hash of its predecessor's and its own bytes.
CHAIN_MISMATCH = (
    "the record does not match its hash-chain link (the record or its hash was altered)"
)


@dataclass
class Verifier:
    """An incremental walk: call :meth:`step` until it returns False."""

    log: LogStore
    reader: EventReader
    checked: int = 0
    redacted: int = 0
    last_position: int = 0
    first_bad_position: int = 0
    problem: str = ""
    _chain: bytes = codec.GENESIS_HASH
    _head: int = 0

    def __post_init__(self) -> None:
        self._head = self.log.head

    @property
    def head(self) -> int:
        """The last position the walk will check (the head when it started)."""
        return self._head

    @property
    def ok(self) -> bool:
        return not self.problem

    def step(self, limit: int = DEFAULT_PAGE) -> bool:
        """Check the next page; return whether there is more to check."""
        if self.problem or self.last_position >= self._head:
            return False
        try:
            page = self.log.read_all_page(self.last_position + 1, backwards=False, limit=limit)
        except DataLoss:
            page = self._before_damage(limit)
            if not page:
                return False
        for position, value in page:
            if position > self._head:
                return False
            if not self._check(position, value):
                return False
        if not page and self.last_position < self._head:
            self._fail(self.last_position + 1, "the log ends before its recorded head position")
            return False
        return self.last_position < self._head

    def _before_damage(self, limit: int) -> list[tuple[int, bytes]]:
        """After a page failed to read: its records before the damage, one at a time.

        Fails the walk at the first position that cannot be read, so the
        damage is reported where it is rather than at the page's start.
        """
        page: list[tuple[int, bytes]] = []
        position = self.last_position + 1
        while len(page) < limit and position <= self._head:
            try:
                page += self.log.read_all_page(position, backwards=False, limit=1)
            except DataLoss as exc:
                if not page:
                    self._fail(position, str(exc))
                break
            position += 1
        return page

    def _check(self, position: int, value: bytes) -> bool:
        if position != self.last_position + 1:
            return self._fail(self.last_position + 1, "a position is missing from the log")
        body, stored = codec.split_record(value)
        expected = codec.chain_hash(self._chain, body)
        if expected != stored:
            return self._fail(position, CHAIN_MISMATCH)
        try:
            event = self.reader.open(position, value)
        except DataLoss as exc:
            return self._fail(position, str(exc))
        self._chain = stored
        self.redacted += event.redacted
        self.checked += 1
        self.last_position = position
        return True

    def _fail(self, position: int, problem: str) -> bool:
        self.first_bad_position = position
        self.problem = problem
        return False

    def finish(self) -> None:
        """After the last step: the walk must end on the head's recorded chain hash."""
        meta = self.log.meta
        moved_on = meta.last_position != self._head  # appends since the walk began
        if self.ok and not moved_on and self._chain != meta.chain_head:
            self._fail(self._head, "the chain head recorded in the log meta does not match")


# -- offline: the data directory's files, read page by page --------------------------

#: What a person should do about any damage verify finds.
REMEDY = "restore the data directory from a backup, then run `lethedb verify --data` on it"
#: Events whose tags are checked per read of the key store; only a progress granule.
_TAG_CHUNK = 512


@dataclass(frozen=True)
class Damage:
    """One damaged place, named as precisely as the damage allows."""

    #: The log position of the damaged record, or 0 when no position applies
    #: (a page of LMDB's own structure, the log meta, a stream's record).
    position: int
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class DataReport:
    """What :func:`verify_data_dir` found."""

    data_dir: Path
    head: int = 0
    checked: int = 0
    redacted: int = 0
    #: Whether every readable record's AES-GCM tag was checked too (it is not
    #: when LMDB's own structure is damaged: LMDB must not touch such a file).
    tags_checked: bool = False
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def first_bad_position(self) -> int | None:
        positions = [d.position for d in self.damage if d.position]
        return min(positions) if positions else None

    def add(self, position: int, what: str, where: str = "") -> None:
        self.damage.append(Damage(position, where or f"position {position}", what))


def verify_data_dir(
    data_dir: Path, keyring: Path, progress: Callable[[int, int], None] | None = None
) -> DataReport:
    """Check a stopped server's data directory without letting LMDB walk a damaged file.

    First both ``data.mdb`` files are read page by page (:mod:`pagecheck`):
    LMDB's structure, then every log record: position keys contiguous from
    1 to the head, each record's chain link, each record decodable, the
    stream and subject indexes, the streams table and the log meta agreeing
    with the events. Only when both files' structure is intact are they
    opened with LMDB (read only, no writer) to check every event's AES-GCM
    tag with the keys from *keyring*. Every damaged place is reported, not
    only the first. The directory lock is held throughout, so a running
    server is refused rather than read mid-write.
    """
    from lethedb_server.engine.store import lock_data_dir

    report = DataReport(data_dir)
    lock = lock_data_dir(data_dir)
    try:
        log_file = pagecheck.check_file(data_dir / "log" / "data.mdb", LOG_DBS)
        _report_pages(report, log_file, "log")
        keys_file = pagecheck.check_file(data_dir / "keys" / "data.mdb", KEY_DBS)
        _report_pages(report, keys_file, "keys")
        content = _LogContent(report, log_file.tables)
        for problem in (p for p in log_file.problems if p.records_lost):
            content.lost.setdefault(problem.table, []).append((problem.low, problem.high))
        content.check()
        if log_file.ok and keys_file.ok and content.meta is not None:
            _check_tags(report, data_dir, keyring, content, progress)
    finally:
        lock.close()
    return report


def _report_pages(report: DataReport, checked: pagecheck.FileCheck, environment: str) -> None:
    for problem in checked.problems:
        if problem.page == pagecheck.FILE:
            report.add(0, problem.what, str(checked.path))
            continue
        where = f"{checked.path} page {problem.page}, table {problem.table}"
        if problem.table == "events" and environment == "log":
            where += _position_range(problem.low, problem.high)
        report.add(0, problem.what, where)


def _position_range(low: bytes | None, high: bytes | None) -> str:
    first = codec.position_from_key(low) if low is not None and len(low) == 8 else 1
    if high is None or len(high) != 8:
        return f" (positions {first} onwards)"
    last = codec.position_from_key(high) - (high != low)
    return f" (position {first})" if first == last else f" (positions {first} to {last})"


def _describe_key(key: bytes) -> str:
    return str(codec.position_from_key(key)) if len(key) == 8 else f"0x{key.hex()}"


class _LogContent:
    """Checks of the log's records against each other, on what the page walk returned."""

    def __init__(self, report: DataReport, tables: dict[str, pagecheck.Table]) -> None:
        self.report = report
        self.tables = tables
        self.meta: codec.LogMeta | None = None
        #: Position -> (stored value, decoded record) for every record found decodable.
        self.events: dict[int, tuple[bytes, codec.RecordBody]] = {}
        #: Table -> key ranges of its damaged pages, whose records were not read.
        self.lost: dict[str, list[tuple[bytes | None, bytes | None]]] = {}

    def records(self, name: str) -> list[tuple[bytes, bytes]]:
        table = self.tables.get(name)
        return [] if table is None else table.records

    def check(self) -> None:
        self._meta()
        head = self.meta.last_position if self.meta is not None else None
        last_chain = self._events(head)
        if self.meta is not None:
            self._meta_against_events(last_chain)
        if "events" in self.tables and not self.tables["events"].damaged:
            self._stream_index()
            self._streams()
            self._subject_index()
        self._small_tables()
        self._journal(head)

    def _journal(self, head: int | None) -> None:
        """Every journal entry checks out and the entries cover the log in order.

        Commits are numbered 1, 2, ... with no gap, terms never fall, and each
        entry's records follow the previous entry's, so a flipped position,
        term or key is found by its neighbours, and a flipped time or row key
        by the entry's own check (``codec.encode_journal``).
        """
        expected_commit, expected_first, last_term = 1, 1, 0
        for key, value in self.records("journal"):
            commit = codec.from_u64(key) if len(key) == 8 else -1
            where = f"journal entry {commit}" if commit >= 0 else f"journal key 0x{key.hex()}"
            if commit != expected_commit:
                self.report.add(0, f"expected journal entry {expected_commit} here", where)
            expected_commit = max(commit, expected_commit) + 1
            try:
                entry = codec.decode_journal(value)
            except Exception as exc:  # msgspec raises several types for damaged bytes
                self.report.add(0, f"cannot be decoded ({exc})", where)
                continue
            if entry.term < last_term:
                self.report.add(
                    0, f"its term {entry.term} is below the previous entry's {last_term}", where
                )
            if (
                entry.first_position != expected_first
                or entry.last_position < entry.first_position - 1
            ):
                self.report.add(
                    entry.first_position,
                    f"it covers positions {entry.first_position}..{entry.last_position}; "
                    f"the previous entry ends at {expected_first - 1}",
                    where,
                )
            last_term = max(last_term, entry.term)
            expected_first = max(expected_first, entry.last_position + 1)
        if expected_commit > 1 and head is not None and expected_first - 1 != head:
            self.report.add(
                head,
                f"the journal ends at position {expected_first - 1}, the log at {head}",
                f"journal entry {expected_commit - 1}",
            )

    def _meta(self) -> None:
        records = self.records("meta")
        if "meta" not in self.tables or self.tables["meta"].damaged:
            return
        raw = dict(records).get(META_LOG)
        where = "the log meta"
        strangers = [key for key, _ in records if key not in META_RECORDS]
        if raw is None or strangers:
            found = ", ".join(repr(k) for k, _ in records) or "nothing"
            problem = "its record is missing" if raw is None else "it holds a key never written"
            self.report.add(0, f"{problem} (the meta table holds {found})", where)
            return
        try:
            meta = codec.decode_meta(raw)
        except Exception as exc:  # msgspec raises several types for damaged bytes
            self.report.add(0, f"its record cannot be decoded ({exc})", where)
            return
        if (
            meta.format != codec.RECORD_FORMAT
            or len(meta.store_id) != 16
            or len(meta.chain_head) != codec.HASH_SIZE
            or not 0 <= meta.subject_indexed <= meta.last_position
        ):
            self.report.add(0, "its record holds impossible values (it was altered)", where)
            return
        self.meta = meta
        self.report.head = meta.last_position

    def _events(self, head: int | None) -> set[bytes]:
        """Walk the events in key order; return the chain values the last one may end on."""
        report = self.report
        records = self.records("events")
        expected = 1
        chain: set[bytes] | None = {codec.GENESIS_HASH}
        previous = codec.GENESIS_HASH  # the one link to chain from, while all is well
        blake2b, size, decode, events = (
            hashlib.blake2b,
            codec.HASH_SIZE,
            codec.decode_record,
            self.events,
        )
        for index, (key, value) in enumerate(records):
            if chain is not None and len(chain) == 1 and key == _U64.pack(expected):
                # The common case, inlined: the walk is most of verify's time.
                link = blake2b(previous, digest_size=size)
                link.update(value[:-size])
                if len(value) > size and link.digest() == value[-size:]:
                    previous = value[-size:]
                    chain = {previous}
                    try:
                        events[expected] = (value, decode(value))
                    except Exception:  # msgspec raises several types; _decode reports it
                        self._decode(expected, value)
                    expected += 1
                    continue
            position = codec.position_from_key(key) if len(key) == 8 else None
            if position != expected:
                following = records[index + 1][0] if index + 1 < len(records) else None
                last = head is not None and expected == head and following is None
                if following == codec.position_key(expected + 1) or last:
                    report.add(
                        expected,
                        f"its key in the events table is damaged (it reads {_describe_key(key)})",
                    )
                elif position is not None and position > expected:
                    report.add(
                        expected,
                        f"positions {expected} to {position - 1} are missing from the events table",
                    )
                    expected, chain = position, None
                else:
                    report.add(
                        expected,
                        f"the events table holds key {_describe_key(key)} "
                        "where this position belongs",
                    )
                    continue
            chain = self._chain(expected, value, chain)
            previous = next(iter(chain)) if chain else previous
            self._decode(expected, value)
            expected += 1
        if head is not None and expected - 1 < head:
            report.add(
                expected,
                f"positions {expected} to {head} are missing from the events table "
                f"(the log meta's head is {head})",
            )
        elif head is not None and expected - 1 > head:
            report.add(
                0,
                f"the events table goes on to position {expected - 1}, past the head "
                f"{head} it records (the head was altered)",
                "the log meta",
            )
        return chain or set()

    def _chain(self, position: int, value: bytes, chain: set[bytes] | None) -> set[bytes] | None:
        """Check one record's chain link; return what the next record may chain from.

        After a mismatch either the record (its stored hash is then the true
        link) or its hash trailer (the recomputed hash is) was damaged; the
        next record is accepted against either, so one damaged record is
        reported once, not along with every record after it.
        """
        if len(value) <= codec.HASH_SIZE:
            self.report.add(position, f"the record is {len(value)} bytes, too short to be one")
            return None
        body, stored = codec.split_record(value)
        if chain is None:
            return {stored}
        computed = [codec.chain_hash(previous, body) for previous in chain]
        if stored in computed:
            return {stored}
        self.report.add(position, CHAIN_MISMATCH)

        return {stored, *computed}

    def _decode(self, position: int, value: bytes) -> None:
        try:
            body = codec.decode_record(value)
        except Exception as exc:  # msgspec raises several types for damaged bytes
            self.report.add(position, f"the record cannot be decoded ({exc})")
            return
        self.events[position] = (value, body)

    def _meta_against_events(self, last_chain: set[bytes]) -> None:
        meta = self.meta
        assert meta is not None
        events_whole = "events" in self.tables and not self.tables["events"].damaged
        if events_whole and last_chain and meta.chain_head not in last_chain:
            self.report.add(
                0, "its chain head does not match the last record's chain hash", "the log meta"
            )
        epochs = {codec.from_u64(k) for k, _ in self.records("epochs") if len(k) == 8}
        if meta.shred_epoch != max(epochs, default=0):
            self.report.add(
                0,
                f"its shred epoch {meta.shred_epoch} is not the last one the "
                f"epochs table records ({max(epochs, default=0)})",
                "the log meta",
            )

    def _stream_index(self) -> None:
        expected: dict[bytes, tuple[bytes, int]] = {}
        prefixes: dict[str, bytes] = {}  # many events share a stream
        for position, (_, body) in self.events.items():
            prefix = prefixes.get(body.stream_id)
            if prefix is None:
                prefix = prefixes[body.stream_id] = codec.stream_prefix(body.stream_id)
            expected[prefix + codec.u64(body.stream_version)] = (
                codec.position_key(position),
                position,
            )
        self._compare_index(
            "stream index",
            expected,
            self.records("stream_index"),
            _stream_entry,
            lambda key, value: codec.from_u64(value) if len(value) == 8 else None,
        )

    def _subject_index(self) -> None:
        indexed = self.meta.subject_indexed if self.meta is not None else 0
        expected: dict[bytes, tuple[bytes, int]] = {}
        prefixes: dict[str, bytes] = {}  # many events share a subject
        for position, (_, body) in self.events.items():
            if position > indexed:
                continue
            prefix = prefixes.get(body.subject_id)
            if prefix is None:
                prefix = prefixes[body.subject_id] = codec.subject_prefix(body.subject_id)
            expected[prefix + codec.u64(position)] = (b"", position)
        self._compare_index(
            "subject index",
            expected,
            self.records("subject_index"),
            _subject_entry,
            lambda key, value: codec.from_u64(key[-8:]) if len(key) >= 12 else None,
        )

    def _compare_index(
        self,
        name: str,
        expected: dict[bytes, tuple[bytes, int]],
        actual: list[tuple[bytes, bytes]],
        describe: Callable[[bytes], str],
        position_of: Callable[[bytes, bytes], int | None],
    ) -> None:
        """Report every entry that differs from what the events say, by the events' positions.

        *expected* maps each key the events imply to (its value, the event's
        position); *position_of* reads the position an unexpected entry names.
        """
        report = self.report
        lost = self.lost.get(name.replace(" ", "_"), [])
        seen: set[bytes] = set()
        for key, value in actual:
            seen.add(key)
            want = expected.get(key)
            if want is not None:
                if value != want[0]:
                    held = f"position {_describe_key(value)}" if len(value) == 8 else "garbage"
                    report.add(
                        want[1], f"its {name} entry ({describe(key)}) is damaged: it holds {held}"
                    )
                continue
            position = position_of(key, value)
            what = f"the {name} holds an entry ({describe(key)}) no event matches (it was altered)"
            if position in self.events:
                report.add(position, what)
            else:
                report.add(0, what, f"the {name}")
        for key, (_, position) in expected.items():
            if key not in seen and not _within(key, lost):
                report.add(position, f"its {name} entry ({describe(key)}) is missing")

    def _streams(self) -> None:
        firsts: dict[str, tuple[int, int, int]] = {}  # stream -> (first position, last, time)
        for position, (_, body) in self.events.items():
            found = firsts.get(body.stream_id)
            if found is None:
                firsts[body.stream_id] = (position, body.stream_version, body.recorded_at)
            elif body.stream_version > found[1]:
                firsts[body.stream_id] = (found[0], body.stream_version, found[2])
        seen: set[str] = set()
        for key, value in self.records("streams"):
            stream = key.decode(errors="replace")
            seen.add(stream)
            where = f"stream {stream!r} (its record in the streams table)"
            want = firsts.get(stream)
            try:
                info = codec.decode_stream(value)
            except Exception as exc:  # msgspec raises several types for damaged bytes
                self.report.add(want[0] if want else 0, f"cannot be decoded ({exc})", where)
                continue
            if want is None:
                self.report.add(0, "no event belongs to this stream (a damaged name?)", where)
            elif (info.first_position, info.last_version, info.created_at) != want:
                self.report.add(
                    want[0],
                    f"it says first position {info.first_position}, last "
                    f"version {info.last_version}, created {info.created_at}; the "
                    f"events say {want[0]}, {want[1]}, {want[2]}",
                    where,
                )
        for stream in firsts.keys() - seen:
            self.report.add(
                firsts[stream][0],
                "its record in the streams table is missing",
                f"stream {stream!r}",
            )

    def _small_tables(self) -> None:
        """Tables no event derives: each record must at least decode."""
        decoders: dict[str, Callable[[bytes], object]] = {
            "tombstones": codec.decode_tombstone,
            "legal_holds": codec.decode_legal_hold,
            "epochs": codec.decode_epoch,
            "idempotency": codec.decode_idempotency,
        }
        for name, decode in decoders.items():
            for key, value in self.records(name):
                try:
                    decode(value)
                except Exception as exc:  # msgspec raises several types for damaged bytes
                    self.report.add(0, f"cannot be decoded ({exc})", f"the {name} record {key!r}")
        expiry = {key for key, _ in self.records("idempotency_expiry")}
        entries: set[bytes] = set()
        for key, value in self.records("idempotency"):
            try:
                entries.add(codec.u64(codec.decode_idempotency(value).created_at) + key)
            except Exception:  # reported above
                entries.add(next((e for e in expiry if e[8:] == key), key))
        for key in expiry ^ entries:
            self.report.add(
                0,
                "the idempotency key and its expiry entry do not match",
                f"the idempotency record {key[8:]!r}",
            )
        head = self.meta.last_position if self.meta is not None else None
        for key, value in self.records("checkpoints"):
            if len(value) != 8 or (head is not None and codec.from_u64(value) > head):
                self.report.add(
                    0,
                    "the checkpoint is not a position of this log",
                    f"the checkpoint of group {key!r}",
                )


def _within(key: bytes, ranges: list[tuple[bytes | None, bytes | None]]) -> bool:
    """Whether *key* falls in one of the key ranges (low inclusive, high exclusive)."""
    return any((low is None or key >= low) and (high is None or key < high) for low, high in ranges)


def _index_entry(key: bytes, name: str, number: str) -> str:
    """An index key (u32 length, *name*, u64 *number*) in words, or in hex when it is not one."""
    length = int.from_bytes(key[:4], "big") if len(key) >= 12 else -1
    if length != len(key) - 12:
        return f"key 0x{key.hex()}"
    text = key[4:-8].decode(errors="replace")
    return f"{name} {text!r}, {number} {codec.from_u64(key[-8:])}"


def _stream_entry(key: bytes) -> str:
    return _index_entry(key, "stream", "version")


def _subject_entry(key: bytes) -> str:
    return _index_entry(key, "subject", "position")


def _check_tags(
    report: DataReport,
    data_dir: Path,
    keyring: Path,
    content: _LogContent,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Every decodable event opened with its key: AES-GCM tag and associated data."""
    log = LogStore(data_dir / "log")
    try:
        keys = KeyStore(data_dir / "keys", FileKeyring(keyring))
        try:
            reader = EventReader(log, keys)
            _open_every_event(report, reader, content, progress)
        finally:
            keys.close()
    finally:
        log.close()
    report.tags_checked = True


def _open_every_event(
    report: DataReport,
    reader: EventReader,
    content: _LogContent,
    progress: Callable[[int, int], None] | None,
) -> None:
    already = {d.position for d in report.damage}
    page = [(p, value) for p, (value, _) in sorted(content.events.items()) if p not in already]
    opened = failed = 0
    for start in range(0, len(page), _TAG_CHUNK):
        chunk = page[start : start + _TAG_CHUNK]
        try:
            events = reader.open_page(chunk)
        except Exception:  # find which record(s) of the chunk
            events = []
            for position, value in chunk:
                try:
                    events.append(reader.open(position, value))
                except DataLoss as exc:
                    failed += 1
                    report.add(position, _without_position(str(exc), position))
                except Exception as exc:  # a damaged key record: never a traceback
                    failed += 1
                    report.add(position, f"its key cannot be read ({type(exc).__name__}: {exc})")
        opened += len(events)
        report.redacted += sum(e.redacted for e in events)
        if progress is not None:
            progress(opened, report.head)
    report.checked = opened
    if failed and not opened:
        report.damage = [d for d in report.damage if d.position not in {p for p, _ in page}]
        report.add(
            0,
            "every event fails its authentication check: the store id in the log "
            "meta was altered, or the keyring is not this store's",
            "the log meta",
        )


def _without_position(message: str, position: int) -> str:
    """A reader's message, without the position the report already names."""
    for prefix in (f"the event at position {position} ", f"the record at position {position} "):
        if message.startswith(prefix):
            return "it " + message[len(prefix) :]
    return message
