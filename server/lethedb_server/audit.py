"""``lethedb audit-erasure``: show, from the files alone, that erasure happened.

For every forgotten subject the audit checks that

1. its tombstone is in the log;
2. the key store holds no key entry of it;
3. every master key version that was current before its shred epoch is gone
   from the keyring (PENDING while that epoch has not run);
4. no byte window of the key store files, or of any backup given, unwraps
   under any master key version that still exists with that subject's
   associated data (a brute-force search for surviving wrapped keys);

and that no canary text appears in any file under the data directory or the
backups.

It also checks the idempotency fingerprints of requests that named a
forgotten subject, wherever they are: in the ``idempotency`` table, and in
the raw bytes of the log files and backups (free pages keep deleted entries).
An unkeyed fingerprint (written before fingerprints were keyed) fails: its
plaintext can be brute-forced by anyone holding the file. And each canary is
brute-forced against every such fingerprint, unkeyed or keyed under any key
the audit can still find (the key store, the backups, the keyring), as the
whole data (or metadata) of the request's events, as bytes or as a JSON
string.

The audit opens LMDB read-only, so it can run beside a live server.
"""

from __future__ import annotations

import itertools
import json
import mmap
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from lethedb_server import codec
from lethedb_server.codec import (
    UNKEYED_DIGEST,
    EpochRecord,
    IdempotencyEntry,
    LogMeta,
    RecordBody,
    Tombstone,
)
from lethedb_server.crypto import InvalidTag, fingerprint_key, keyed_fingerprint, wrap_aad
from lethedb_server.keyring import FileKeyring, MasterKeyUnavailable, WrappedKey
from lethedb_server.model import (
    STORE_SUBJECT,
    AppendCommand,
    CommitCommand,
    ExpectedState,
    ProposedEvent,
)
from lethedb_server.storage import indexed_subject_positions, tail_subject_positions

#: A wrapped DEK as msgpack: bin8 of the 12-byte nonce, then bin8 of the
#: 48-byte ciphertext (32-byte key + 16-byte tag).
_WRAPPED_WINDOW = re.compile(rb"\xc4\x0c(.{12})\xc4\x30(.{48})", re.DOTALL)
#: The start of an idempotency entry as msgpack: an array of four (unkeyed,
#: before keyed fingerprints) or five fields, whose first is a 32-byte bin8.
_ENTRY_WINDOW = re.compile(rb"[\x94\x95]\xc4\x20")
#: An entry's request wrote at most this many events (the append limit is far lower).
_MAX_ENTRY_EVENTS = 1 << 20

PASS, FAIL, PENDING = "PASS", "FAIL", "PENDING"


@dataclass
class Check:
    outcome: str
    text: str


@dataclass
class SubjectAudit:
    subject_id: str
    tombstone: Tombstone
    checks: list[Check] = field(default_factory=list)


@dataclass
class AuditReport:
    subjects: list[SubjectAudit]
    canaries: list[Check]
    files_scanned: int
    #: Idempotency fingerprints of forgotten subjects' requests.
    fingerprints: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        checks = [c for s in self.subjects for c in s.checks] + self.canaries + self.fingerprints
        return all(c.outcome == PASS for c in checks)

    def render(self) -> str:
        lines: list[str] = []
        for s in self.subjects:
            t = s.tombstone
            lines.append(
                f"subject {s.subject_id} (reason {t.reason!r}, tombstone position {t.position}, "
                f"shred epoch {t.shred_epoch})"
            )
            lines += [f"  {c.outcome:<7} {c.text}" for c in s.checks]
        if not self.subjects:
            lines.append("no forgotten subjects")
        if self.canaries:
            lines.append("canaries")
            lines += [f"  {c.outcome:<7} {c.text}" for c in self.canaries]
        if self.fingerprints:
            lines.append("idempotency fingerprints")
            lines += [f"  {c.outcome:<7} {c.text}" for c in self.fingerprints]
        count = sum(len(s.checks) for s in self.subjects) + len(self.canaries)
        count += len(self.fingerprints)
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"RESULT: {verdict} ({count} checks, {self.files_scanned} files scanned)")
        return "\n".join(lines)


def _open_readonly(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), readonly=True, lock=True, max_dbs=16, subdir=True)


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


@contextmanager
def _contents(path: Path) -> Iterator[bytes | mmap.mmap]:
    if path.stat().st_size == 0:
        yield b""
        return
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        yield view


def audit_erasure(
    data_dir: Path,
    keyring_path: Path | None = None,
    backups: list[Path] | None = None,
    canaries: list[str] | None = None,
) -> AuditReport:
    backups = backups or []
    keyring = FileKeyring(keyring_path or data_dir / "master.keyring")
    log_env = _open_readonly(data_dir / "log")
    keys_env = _open_readonly(data_dir / "keys")
    try:
        with log_env.begin() as log_txn, keys_env.begin() as keys_txn:
            tombstones = _tombstones(log_env, log_txn, keys_env, keys_txn)
            raw_meta = log_txn.get(b"log", db=log_env.open_db(b"meta", txn=log_txn))
            if raw_meta is None:
                raise FileNotFoundError(f"{data_dir / 'log'} holds no LetheDB log")
            meta = codec.decode_meta(raw_meta)
            epochs_db = log_env.open_db(b"epochs", txn=log_txn)
            epochs = {
                codec.from_u64(k): codec.decode_epoch(v) for k, v in log_txn.cursor(db=epochs_db)
            }
            deks_db = keys_env.open_db(b"deks", txn=keys_txn)
            subjects = []
            key_files = list(_files([data_dir / "keys", *backups]))
            #: DEK version 1 of forgotten subjects that some file still yields.
            surviving: dict[str, bytes] = {}
            for subject_id, (tombstone, in_log) in sorted(tombstones.items()):
                audit = SubjectAudit(subject_id, tombstone)
                audit.checks.append(
                    Check(PASS, "tombstone is in the log")
                    if in_log
                    else Check(
                        FAIL,
                        "tombstone is missing from the log (only the key store remembers the "
                        "subject: was an old log backup restored?)",
                    )
                )
                audit.checks.append(_no_key_entry(keys_txn, deks_db, subject_id))
                audit.checks.append(
                    _old_masters_destroyed(keyring, tombstone, meta.shred_epoch, epochs)
                )
                versions = _dek_versions(log_env, log_txn, meta, subject_id)
                hit = _unwrappable_window(keyring, subject_id, versions, key_files)
                audit.checks.append(_window_check(hit, len(key_files)))
                if not isinstance(hit, int):  # a file still yields a key of the subject
                    first = (
                        hit
                        if hit[2] == 1
                        else _unwrappable_window(keyring, subject_id, {1}, key_files)
                    )
                    if not isinstance(first, int):
                        surviving[subject_id] = first[4]
                subjects.append(audit)
            fingerprints = _Fingerprints(
                log_env, log_txn, meta, keys_txn, deks_db, keyring, set(tombstones), surviving
            ).checks(list(_files([data_dir / "log", *backups])), canaries or [])
    finally:
        log_env.close()
        keys_env.close()
    scanned = list(_files([data_dir, *backups]))
    canary_checks = [_canary(text, scanned) for text in canaries or []]
    return AuditReport(subjects, canary_checks, len(scanned), fingerprints)


def _tombstones(
    log_env: lmdb.Environment,
    log_txn: lmdb.Transaction,
    keys_env: lmdb.Environment,
    keys_txn: lmdb.Transaction,
) -> dict[str, tuple[Tombstone, bool]]:
    found: dict[str, tuple[Tombstone, bool]] = {}
    for k, v in keys_txn.cursor(db=keys_env.open_db(b"forgotten", txn=keys_txn)):
        found[bytes(k).decode()] = (codec.decode_tombstone(v), False)
    for k, v in log_txn.cursor(db=log_env.open_db(b"tombstones", txn=log_txn)):
        found[bytes(k).decode()] = (codec.decode_tombstone(v), True)
    return found


def _no_key_entry(txn: lmdb.Transaction, deks_db: Any, subject_id: str) -> Check:
    prefix = codec.dek_key(subject_id, 0)[:-4]
    cursor = txn.cursor(db=deks_db)
    left = 0
    if cursor.set_range(prefix):
        for key in cursor.iternext(values=False):
            if not bytes(key).startswith(prefix):
                break
            left += 1
    if left:
        return Check(FAIL, f"the key store still holds {left} key entries of the subject")
    return Check(PASS, "no key entry of the subject in the key store")


def _old_masters_destroyed(
    keyring: FileKeyring, tombstone: Tombstone, current_epoch: int, epochs: dict[int, EpochRecord]
) -> Check:
    if current_epoch < tombstone.shred_epoch:
        return Check(
            PENDING,
            f"shred epoch {tombstone.shred_epoch} has not run yet: stale copies of the "
            "subject's keys are still wrapped by existing master key versions "
            "(run `lethedb shred`)",
        )
    record = epochs.get(tombstone.shred_epoch)
    if record is None:
        return Check(FAIL, f"shred epoch {tombstone.shred_epoch} is not recorded in the log")
    survivors = [v for v in keyring.versions() if v < record.master_version]
    if survivors:
        return Check(
            FAIL,
            f"master key versions {survivors}, current before shred epoch "
            f"{tombstone.shred_epoch}, still exist",
        )
    return Check(
        PASS,
        f"every master key version before {record.master_version} (current since shred epoch "
        f"{tombstone.shred_epoch}) is destroyed",
    )


def _dek_versions(
    env: lmdb.Environment, txn: lmdb.Transaction, meta: LogMeta, subject_id: str
) -> set[int]:
    """DEK versions the subject's events were encrypted under (at least version 1).

    *meta* must come from *txn*: the subject index is complete only through
    ``meta.subject_indexed``, and the events after it are scanned.
    """
    index = env.open_db(b"subject_index", txn=txn)
    events = env.open_db(b"events", txn=txn)
    everything = 2**63
    positions = indexed_subject_positions(
        txn, index, subject_id, 0, meta.subject_indexed, everything
    ) + tail_subject_positions(txn, events, subject_id, meta.subject_indexed, everything)
    versions = {1}
    for position in positions:
        value = txn.get(codec.position_key(position), db=events)
        if value is not None:
            versions.add(codec.decode_record(value).dek_version)
    return versions


#: Where a wrapped key of a subject survives: (file, byte offset, DEK version,
#: master key version, the raw DEK); else the number of windows tried.
_Hit = tuple[Path, int, int, int, bytes]


def _unwrappable_window(
    keyring: FileKeyring, subject_id: str, dek_versions: set[int], files: list[Path]
) -> _Hit | int:
    """The first byte window of *files* that unwraps a key of the subject, or the count tried."""
    windows = 0
    for path in files:
        with _contents(path) as data:
            found = [(m.start(), m.group(1), m.group(2)) for m in _WRAPPED_WINDOW.finditer(data)]
        for offset, nonce, ciphertext in found:
            windows += 1
            for master_version in keyring.versions():
                for dek_version in dek_versions:
                    wrapped = WrappedKey(master_version, nonce, ciphertext)
                    try:
                        dek = keyring.unwrap(
                            wrapped, wrap_aad(subject_id, dek_version, master_version)
                        )
                    except (InvalidTag, MasterKeyUnavailable):
                        continue
                    return path, offset, dek_version, master_version, dek
    return windows


def _window_check(hit: _Hit | int, files: int) -> Check:
    if isinstance(hit, int):
        return Check(
            PASS,
            f"none of {hit} wrapped-key windows in {files} key-store and backup files "
            "unwraps a key of the subject",
        )
    path, offset, dek_version, master_version, _ = hit
    return Check(
        FAIL,
        f"{path} at byte {offset} holds a key of the subject (version "
        f"{dek_version}) that master key version {master_version} still unwraps",
    )


def _canary(text: str, files: list[Path]) -> Check:
    needle = text.encode()
    hits = []
    for path in files:
        with _contents(path) as data:
            if data.find(needle) != -1:
                hits.append(str(path))
    if hits:
        return Check(FAIL, f"{text!r} found in {', '.join(hits)}")
    return Check(PASS, f"{text!r} appears in none of {len(files)} files")


# -- idempotency fingerprints ---------------------------------------------------------


@dataclass(frozen=True)
class _Fingerprint:
    """One idempotency entry found in a file, with its request's clear fields from the log."""

    where: str
    entry: IdempotencyEntry
    #: Per stream of the request: stream id, first version written, its records.
    parts: list[tuple[str, int, list[RecordBody]]]
    forgotten: list[str]
    subjects: list[str]


class _Fingerprints:
    """Finds the fingerprints of forgotten subjects' requests and tries to break them."""

    def __init__(
        self,
        log_env: lmdb.Environment,
        log_txn: lmdb.Transaction,
        meta: LogMeta,
        keys_txn: lmdb.Transaction,
        deks_db: Any,
        keyring: FileKeyring,
        forgotten: set[str],
        surviving: dict[str, bytes],
    ) -> None:
        self.log_env, self.log_txn, self.meta = log_env, log_txn, meta
        self.events = log_env.open_db(b"events", txn=log_txn)
        self.keys_txn, self.deks_db, self.keyring = keys_txn, deks_db, keyring
        self.forgotten = forgotten
        self.surviving = surviving
        self._keys: dict[str, bytes | None] = {}

    def checks(self, files: list[Path], canaries: list[str]) -> list[Check]:
        found = self._collect(files)
        unkeyed = [f for f in found if f.entry.digest_format == UNKEYED_DIGEST]
        checks = [_unkeyed_check(unkeyed, len(found), len(files))]
        for canary in canaries:
            checks.append(self._canary_check(canary, found))
        return checks

    def _collect(self, files: list[Path]) -> list[_Fingerprint]:
        """Entries of the table, then any other copy in the files' raw bytes."""
        found: list[_Fingerprint] = []
        seen: set[bytes] = set()
        table = self.log_env.open_db(b"idempotency", txn=self.log_txn)
        for key, value in self.log_txn.cursor(db=table):
            try:
                entry = codec.decode_idempotency(value)
            except msgspec.DecodeError:
                continue
            seen.add(entry.digest)
            self._add(
                found, f"the idempotency table, key {bytes(key).decode(errors='replace')!r}", entry
            )
        for path in files:
            with _contents(path) as data:
                for match in _ENTRY_WINDOW.finditer(data):
                    end = _msgpack_end(data, match.start())
                    if end is None:
                        continue
                    try:
                        entry = codec.decode_idempotency(data[match.start() : end])
                    except msgspec.DecodeError:
                        continue
                    if entry.digest in seen:
                        continue
                    seen.add(entry.digest)
                    where = f"{path} at byte {match.start()} (a free page or an old copy)"
                    self._add(found, where, entry)
        return found

    def _add(self, found: list[_Fingerprint], where: str, entry: IdempotencyEntry) -> None:
        """Keep *entry* if its request's events are in the log and name a forgotten subject."""
        ranges = []
        for result in entry.commit or (entry.result,):
            first, last = result.first_position, result.last_position
            if not 0 < first <= last <= self.meta.last_position or last - first > _MAX_ENTRY_EVENTS:
                return  # not an entry of this log (or bytes that only look like one)
            ranges.append(range(first, last + 1))
        values: list[list[bytes]] = []
        for positions in ranges:
            raw = [self.log_txn.get(codec.position_key(p), db=self.events) for p in positions]
            if None in raw:
                return
            values.append([bytes(v) for v in raw if v is not None])
        # Subject ids first (cheap); whole records only for a forgotten subject's request.
        # In request order: the fingerprint's key follows it (idempotency.fingerprint).
        subjects = list(
            dict.fromkeys(codec.record_subject(v) or STORE_SUBJECT for p in values for v in p)
        )
        forgotten = [s for s in subjects if s in self.forgotten]
        if not forgotten:
            return
        parts = []
        for stored in values:
            records = [codec.decode_record(v) for v in stored]
            parts.append((records[0].stream_id, records[0].stream_version, records))
        found.append(_Fingerprint(where, entry, parts, forgotten, subjects))

    def _canary_check(self, canary: str, found: list[_Fingerprint]) -> Check:
        tried = 0
        for fingerprint in found:
            if fingerprint.entry.digest_format == UNKEYED_DIGEST:
                keys: list[bytes] | None = []
                how = "unkeyed"
            else:
                keys = self._keys_of(fingerprint.subjects)
                how = "keyed under keys that the files still yield"
            if keys is None:
                continue  # a key is destroyed: the fingerprint is noise
            tried += 1
            for request_hash in _candidate_hashes(fingerprint, canary):
                stored = keyed_fingerprint(request_hash, keys) if keys else request_hash
                if stored == fingerprint.entry.digest:
                    return Check(
                        FAIL,
                        f"{canary!r} is confirmed by the idempotency fingerprint ({how}) in "
                        f"{fingerprint.where}, of a request naming forgotten subject "
                        f"{', '.join(fingerprint.forgotten)}",
                    )
        return Check(
            PASS,
            f"{canary!r} is confirmed by none of {len(found)} idempotency fingerprints of "
            f"forgotten subjects' requests ({len(found) - tried} keyed under destroyed keys)",
        )

    def _keys_of(self, subjects: Sequence[str]) -> list[bytes] | None:
        """Every subject's fingerprint key, if the files still yield them all."""
        keys = [self._key_of(s) for s in subjects]
        return None if any(k is None for k in keys) else [k for k in keys if k is not None]

    def _key_of(self, subject_id: str) -> bytes | None:
        if subject_id not in self._keys:
            dek = self.surviving.get(subject_id) or self._live_dek(subject_id)
            self._keys[subject_id] = None if dek is None else fingerprint_key(dek)
        return self._keys[subject_id]

    def _live_dek(self, subject_id: str) -> bytes | None:
        raw = self.keys_txn.get(codec.dek_key(subject_id, 1), db=self.deks_db)
        if raw is None:
            return None
        wrapped = msgspec.msgpack.decode(raw, type=WrappedKey)
        try:
            return self.keyring.unwrap(wrapped, wrap_aad(subject_id, 1, wrapped.master_version))
        except (InvalidTag, MasterKeyUnavailable):
            return None


def _unkeyed_check(unkeyed: list[_Fingerprint], found: int, files: int) -> Check:
    if unkeyed:
        listed = "; ".join(f"{f.where} (subject {', '.join(f.forgotten)})" for f in unkeyed[:5])
        more = f" and {len(unkeyed) - 5} more" if len(unkeyed) > 5 else ""
        return Check(
            FAIL,
            f"{len(unkeyed)} unkeyed idempotency fingerprints of forgotten subjects' requests "
            f"survive, so anyone holding the file can brute-force their data: {listed}{more} "
            "(see docs/ERASURE.md, idempotency fingerprints)",
        )
    return Check(
        PASS,
        f"all {found} idempotency fingerprints of forgotten subjects' requests (in the table "
        f"and in the raw bytes of {files} log and backup files) are keyed",
    )


def _candidate_hashes(fingerprint: _Fingerprint, canary: str) -> Iterator[bytes]:
    """Request hashes of the request rebuilt with *canary* as every event's data.

    The clear fields come from the log. What the log does not hold is
    guessed: the data (the canary as bytes, or as a JSON string), the
    metadata (empty, or the same), whether the client sent the event ids,
    and each stream's expected version (any form that could have succeeded).
    """
    for data in dict.fromkeys((canary.encode(), json.dumps(canary).encode())):
        for metadata in (b"", data):
            for sent_ids in (True, False):
                options = [
                    _expected_forms(stream, first_version, records, data, metadata, sent_ids)
                    for stream, first_version, records in fingerprint.parts
                ]
                if not fingerprint.entry.commit:
                    yield from (command.request_hash() for command in options[0])
                    continue
                combos = (
                    itertools.product(*options)
                    if 4 ** len(options) <= 256
                    else [tuple(option[0] for option in options)]
                )
                for parts in combos:
                    yield CommitCommand(tuple(parts)).request_hash()


def _expected_forms(
    stream: str,
    first_version: int,
    records: list[RecordBody],
    data: bytes,
    metadata: bytes,
    sent_ids: bool,
) -> list[AppendCommand]:
    events = tuple(
        ProposedEvent(
            r.event_id if sent_ids else b"", r.event_type, r.subject_id, r.content_type,
            data, metadata,
        )
        for r in records
    )  # fmt: skip
    forms = [
        AppendCommand(stream, events, ExpectedState.ANY),
        AppendCommand(stream, events, ExpectedState.NO_STREAM),
        AppendCommand(stream, events, ExpectedState.STREAM_EXISTS),
    ]
    if first_version:
        forms.append(AppendCommand(stream, events, ExpectedState.EXACT, first_version - 1))
    return forms


def _msgpack_end(data: bytes | mmap.mmap, start: int, limit: int = 1 << 20) -> int | None:
    """Where the msgpack value at *start* ends, or None if it is not one we store.

    Enough of msgpack for idempotency entries (arrays, ints, bools, nil,
    bin and str), so an entry can be cut out of raw file bytes and decoded.
    """
    end = min(len(data), start + limit)
    pos, pending = start, 1
    while pending:
        if pos >= end:
            return None
        b = data[pos]
        pos += 1
        pending -= 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if 0x90 <= b <= 0x9F:
            pending += b & 0x0F
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
        elif b in _ARRAY_HEADER:
            size = _ARRAY_HEADER[b]
            pending += int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif b in _LENGTH_HEADER:
            size = _LENGTH_HEADER[b]
            pos += size + int.from_bytes(data[pos : pos + size], "big")
        elif b in _FIXED_SIZE:
            pos += _FIXED_SIZE[b]
        else:
            return None
    return pos if pos <= end else None


_ARRAY_HEADER = {0xDC: 2, 0xDD: 4}
#: bin8/16/32 and str8/16/32: the size of the length that follows the tag.
_LENGTH_HEADER = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
#: uint8..64 and int8..64: the bytes that follow the tag.
_FIXED_SIZE = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
