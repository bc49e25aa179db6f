"""``lethedb audit-erasure``: show, from the files alone, that erasure happened.

For every forgotten subject the audit checks that

1. its tombstone is in the log;
2. the key store holds no key entry of it;
3. every master key version that was current before its shred epoch is gone
   from the keyring (PENDING while that epoch has not run);
4. no byte window of the key store files, or of any backup given, unwraps
   under any master key version that still exists with that subject's
   associated data (a brute-force search for surviving wrapped keys);
5. no master key material outside the live keyring (a keyring under any
   name, or a master key's raw bytes, base64 or hex text) that holds a
   version the subject's shred epoch destroyed is in any backup or in the
   data directory: such a copy was made before the subject was shredded and
   decrypts it for ever. Each finding is tried on the wrapped keys of the
   backup it was found in, to prove it unwraps the subject's key and
   decrypts an event;

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
It never prints key material or decrypted data.
"""

from __future__ import annotations

import base64
import binascii
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

from lethedb_server.crypto.aead import (
    AESGCM,
    KEY_SIZE,
    InvalidTag,
    event_aad,
    fingerprint_key,
    keyed_fingerprint,
    wrap_aad,
)
from lethedb_server.crypto.keyring import FileKeyring, MasterKeyUnavailable, WrappedKey
from lethedb_server.engine.model import (
    STORE_SUBJECT,
    AppendCommand,
    CommitCommand,
    ExpectedState,
    ProposedEvent,
)
from lethedb_server.storage import codec
from lethedb_server.storage.codec import (
    UNKEYED_DIGEST,
    EpochRecord,
    IdempotencyEntry,
    LogMeta,
    RecordBody,
    Tombstone,
)
from lethedb_server.storage.log import indexed_subject_positions, tail_subject_positions

#: A wrapped DEK as msgpack: bin8 of the 12-byte nonce, then bin8 of the
#: 48-byte ciphertext (32-byte key + 16-byte tag).
_WRAPPED_WINDOW = re.compile(rb"\xc4\x0c(.{12})\xc4\x30(.{48})", re.DOTALL)
#: The start of an idempotency entry as msgpack: an array of four (unkeyed,
#: before keyed fingerprints) or five fields, whose first is a 32-byte bin8.
_ENTRY_WINDOW = re.compile(rb"[\x94\x95]\xc4\x20")
#: An entry's request wrote at most this many events (the append limit is far lower).
_MAX_ENTRY_EVENTS = 1 << 20

PASS, FAIL, PENDING = "PASS", "FAIL", "PENDING"
#: A finding that fails no check (yet): printed, never part of the verdict.
WARN = "WARN"


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
    #: Key material outside the live keyring that affects no forgotten subject yet.
    key_material: list[Check] = field(default_factory=list)
    #: Idempotency fingerprints of forgotten subjects' requests.
    fingerprints: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def verdict(self) -> str:
        """FAIL if any check failed, else PENDING if any waits for a shred epoch, else PASS."""
        checks = [c for s in self.subjects for c in s.checks] + self.canaries + self.fingerprints
        outcomes = {c.outcome for c in checks}
        if outcomes - {PASS, PENDING}:
            return FAIL
        return PENDING if PENDING in outcomes else PASS

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
        if self.key_material:
            lines.append("master key material outside the keyring")
            lines += [f"  {c.outcome:<7} {c.text}" for c in self.key_material]
        if self.canaries:
            lines.append("canaries")
            lines += [f"  {c.outcome:<7} {c.text}" for c in self.canaries]
        if self.fingerprints:
            lines.append("idempotency fingerprints")
            lines += [f"  {c.outcome:<7} {c.text}" for c in self.fingerprints]
        count = sum(len(s.checks) for s in self.subjects) + len(self.canaries)
        count += len(self.fingerprints)
        lines.append(f"RESULT: {self.verdict} ({count} checks, {self.files_scanned} files scanned)")
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
    keyring_path = keyring_path or data_dir / "master.keyring"
    keyring = FileKeyring(keyring_path)
    exposure = _KeyMaterialAudit(
        find_key_material(data_dir, keyring_path, backups, keyring.current_version()), backups
    )
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
                pending_epoch = meta.shred_epoch < tombstone.shred_epoch
                audit.checks.append(_window_check(hit, len(key_files), pending_epoch))
                if not isinstance(hit, int):  # a file still yields a key of the subject
                    first = (
                        hit
                        if hit[2] == 1
                        else _unwrappable_window(keyring, subject_id, {1}, key_files)
                    )
                    if not isinstance(first, int):
                        surviving[subject_id] = first[4]
                audit.checks += exposure.checks(
                    _SubjectKeys(
                        subject_id,
                        tombstone,
                        _destroyed_below(tombstone, meta.shred_epoch, epochs),
                        meta.store_id,
                        _first_event_per_dek_version(log_env, log_txn, meta, subject_id),
                    )
                )
                subjects.append(audit)
            fingerprints = _Fingerprints(
                log_env, log_txn, meta, keys_txn, deks_db, keyring, set(tombstones), surviving
            ).checks(list(_files([data_dir / "log", *backups])), canaries or [])
    finally:
        log_env.close()
        keys_env.close()
    scanned = list(_files([data_dir, *backups]))
    canary_checks = [_canary(text, scanned) for text in canaries or []]
    return AuditReport(
        subjects, canary_checks, len(scanned), exposure.warnings(), fingerprints=fingerprints
    )


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
    versions = {1}
    for _, body in _subject_records(env, txn, meta, subject_id):
        versions.add(body.dek_version)
    return versions


def _subject_records(
    env: lmdb.Environment, txn: lmdb.Transaction, meta: LogMeta, subject_id: str
) -> Iterator[tuple[int, RecordBody]]:
    """Every record of the subject with its position; *meta* must come from *txn*."""
    index = env.open_db(b"subject_index", txn=txn)
    events = env.open_db(b"events", txn=txn)
    everything = 2**63
    positions = indexed_subject_positions(
        txn, index, subject_id, 0, meta.subject_indexed, everything
    ) + tail_subject_positions(txn, events, subject_id, meta.subject_indexed, everything)
    for position in positions:
        value = txn.get(codec.position_key(position), db=events)
        if value is not None:
            yield position, codec.decode_record(value)


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


def _window_check(hit: _Hit | int, files: int, pending_epoch: bool = False) -> Check:
    """FAIL when a stale wrapped key still unwraps, or PENDING before the subject's shred epoch.

    Until that epoch has run, stale copies (free key-store pages, backups with
    keys) unwrapping under a master key version that exists now are expected:
    the epoch destroys every such version. Afterwards, one is a failure.
    """
    if isinstance(hit, int):
        return Check(
            PASS,
            f"none of {hit} wrapped-key windows in {files} key-store and backup files "
            "unwraps a key of the subject",
        )
    path, offset, dek_version, master_version, _ = hit
    where = (
        f"{path} at byte {offset} holds a key of the subject (version "
        f"{dek_version}) that master key version {master_version} still unwraps"
    )
    if pending_epoch:
        return Check(PENDING, f"{where}; the pending shred epoch destroys that version")
    return Check(FAIL, where)


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


# -- master key material outside the live keyring ------------------------------------
#
# A shred epoch destroys master key versions in the live keyring only. Any other
# copy of them (a keyring swept up by a copy of the data directory, a keyring
# left behind when it was moved out, a key pasted into a deployment file) keeps
# opening every wrapped key copied before that epoch: the subject is erased
# everywhere but there, for ever. So every file of the data directory and of
# each backup is searched for keyrings (by content, under any name), for every
# master key the audit knows (those of the live keyring and of every keyring
# found) in raw, base64 and hex form, and, in small files, for anything shaped
# like a 256-bit key (a 32-byte file, a base64 or hex token), which counts once
# it is shown to unwrap a forgotten subject's key.

#: Larger files are not read whole to look for a keyring or a key-shaped token.
_SMALL_FILE_BYTES = 1 << 20
_BASE64_TOKEN = re.compile(rb"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{43}=?(?![A-Za-z0-9+/_=-])")
_HEX_TOKEN = re.compile(rb"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")


class _KeyringDocument(msgspec.Struct):
    """The fields of a keyring file (see keyring.py) the audit needs; others are ignored."""

    format: int
    current: int
    keys: dict[str, str]


@dataclass(frozen=True)
class KeyMaterial:
    """Master keys found in a file that is not the live keyring."""

    path: Path
    #: Where it was found, for messages: ``in backup B`` or ``in the data directory``.
    where: str
    #: The backup (or data directory) whose wrapped keys it is tried on.
    root: Path
    #: What the file is or holds: ``is a master keyring``, ``holds ... in base64``.
    description: str
    #: Master keys by version. A key-shaped token of unknown version is listed
    #: under every version that may exist; it counts only once proved.
    keys: dict[int, bytes]
    identified: bool = True

    def label(self) -> str:
        return f"{self.path} ({self.where}) {self.description}"


def find_key_material(
    data_dir: Path, keyring_path: Path, backups: list[Path], max_version: int
) -> list[KeyMaterial]:
    """Every keyring, copy of a known master key and key-shaped token found.

    The live keyring (*keyring_path*) is not a finding in the data directory;
    anywhere in a backup it is. *max_version* is the newest master version.
    """
    files = _files_with_roots(data_dir, keyring_path, backups)
    keyrings = [
        KeyMaterial(path, where, root, "is a master keyring", keys)
        for path, where, root in files
        if (keys := _read_keyring(path))
    ]
    known = list((_read_keyring(keyring_path) or {}).items())
    known += [(v, k) for found in keyrings for v, k in found.keys.items()]
    needles = _key_needles(known)
    known_keys = {k for _, k in known}
    found_in_files: list[KeyMaterial] = []
    keyring_files = {m.path for m in keyrings}
    for path, where, root in files:
        if path in keyring_files:
            continue
        with _contents(path) as data:
            hits = {
                (v, k): text for needle, (v, k, text) in needles.items() if data.find(needle) != -1
            }
            shaped = _key_shaped(data) if len(data) <= _SMALL_FILE_BYTES else {}
            tokens = {key: form for key, form in shaped.items() if key not in known_keys}
        found_in_files += [
            KeyMaterial(path, where, root, f"holds {text}", {v: k}) for (v, k), text in hits.items()
        ]
        found_in_files += [
            KeyMaterial(
                path,
                where,
                root,
                f"holds a 256-bit key ({form})",
                dict.fromkeys(range(1, max_version + 1), key),
                identified=False,
            )
            for key, form in sorted(tokens.items())
        ]
    return keyrings + found_in_files


def _files_with_roots(
    data_dir: Path, keyring_path: Path, backups: list[Path]
) -> list[tuple[Path, str, Path]]:
    """(file, where, root) for every file to search, each once, the live keyring left out."""
    live = keyring_path.resolve()
    roots = [(data_dir, "in the data directory"), *((b, f"in backup {b}") for b in backups)]
    files: list[tuple[Path, str, Path]] = []
    seen: set[Path] = set()
    for root, where in roots:
        for path in _files([root]):
            resolved = path.resolve()
            if resolved in seen or (resolved == live and root == data_dir):
                continue
            seen.add(resolved)
            files.append((path, where, root))
    return files


def _read_keyring(path: Path) -> dict[int, bytes] | None:
    """The keys of *path* by version when it parses as a keyring, else None."""
    try:
        size = path.stat().st_size
        if not 0 < size <= _SMALL_FILE_BYTES:
            return None
        content = path.read_bytes()
    except OSError:
        return None
    if content.lstrip()[:1] != b"{":
        return None
    try:
        doc = msgspec.json.decode(content, type=_KeyringDocument)
        keys = {int(v): base64.b64decode(k, validate=True) for v, k in doc.keys.items()}
    except (msgspec.DecodeError, ValueError):
        return None
    if not keys or any(len(k) != KEY_SIZE for k in keys.values()):
        return None
    return keys


def _key_needles(keys: list[tuple[int, bytes]]) -> dict[bytes, tuple[int, bytes, str]]:
    """Byte strings that give a known master key away, with the key and how it is written.

    Base64 is matched without its padding (43 characters carry all 256 bits),
    so a key embedded in other text is found too.
    """
    needles: dict[bytes, tuple[int, bytes, str]] = {}
    for version, key in keys:
        forms = (
            (key, f"the raw bytes of master key version {version}"),
            (base64.b64encode(key)[:43], f"master key version {version} in base64"),
            (base64.urlsafe_b64encode(key)[:43], f"master key version {version} in base64"),
            (binascii.hexlify(key), f"master key version {version} in hex"),
            (binascii.hexlify(key).upper(), f"master key version {version} in hex"),
        )
        for needle, text in forms:
            needles.setdefault(needle, (version, key, text))
    return needles


def _key_shaped(data: bytes | mmap.mmap) -> dict[bytes, str]:
    """Whatever in a small file could be a 256-bit key: the file itself if it is
    32 bytes long, base64 tokens and hex tokens that decode to 32 bytes."""
    found: dict[bytes, str] = {}
    if len(data) == KEY_SIZE:
        found[bytes(data)] = "raw bytes"
    for match in _BASE64_TOKEN.finditer(data):
        token = match.group().rstrip(b"=") + b"="
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                key = decode(token)
            except ValueError:
                continue
            if len(key) == KEY_SIZE:
                found.setdefault(key, "base64")
    for match in _HEX_TOKEN.finditer(data):
        found.setdefault(binascii.unhexlify(match.group()), "hex")
    return found


@dataclass(frozen=True)
class _SubjectKeys:
    """What the key-material check needs to know about one forgotten subject."""

    subject_id: str
    tombstone: Tombstone
    #: Master versions below this one were destroyed by the subject's shred
    #: epoch; None while that epoch has not run (every version will be).
    destroyed_below: int | None
    store_id: bytes
    #: The first event of the subject under each of its DEK versions.
    samples: dict[int, tuple[int, RecordBody]]

    def exposed_versions(self, material: KeyMaterial) -> list[int]:
        below = self.destroyed_below
        return sorted(v for v in material.keys if below is None or v < below)


def _destroyed_below(
    tombstone: Tombstone, current_epoch: int, epochs: dict[int, EpochRecord]
) -> int | None:
    record = epochs.get(tombstone.shred_epoch)
    if current_epoch < tombstone.shred_epoch or record is None:
        return None
    return record.master_version


def _first_event_per_dek_version(
    env: lmdb.Environment, txn: lmdb.Transaction, meta: LogMeta, subject_id: str
) -> dict[int, tuple[int, RecordBody]]:
    samples: dict[int, tuple[int, RecordBody]] = {}
    for position, body in _subject_records(env, txn, meta, subject_id):
        samples.setdefault(body.dek_version, (position, body))
    return samples


@dataclass(frozen=True)
class _Window:
    """Bytes shaped like a wrapped data key, and where they are."""

    path: Path
    offset: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class _Proof:
    """A wrapped key of the subject that a found master key opened."""

    master_version: int
    dek_version: int
    window: _Window
    #: The subject's event the unwrapped key decrypts (its plaintext is dropped).
    position: int | None

    def text(self) -> str:
        opened = (
            f"proved: it unwraps the subject's key (version {self.dek_version}) at byte "
            f"{self.window.offset} of {self.window.path}"
        )
        if self.position is not None:
            opened += f" and decrypts its event at position {self.position}"
        return opened


class _KeyMaterialAudit:
    """Turns key material found into checks per subject, with proof where it exists."""

    def __init__(self, material: list[KeyMaterial], backups: list[Path]) -> None:
        self.material = material
        self.backups = backups
        self._windows: dict[Path, list[_Window]] = {}
        self._affecting: set[int] = set()

    def checks(self, subject: _SubjectKeys) -> list[Check]:
        """One FAIL per finding that holds a master version the subject's epoch destroys.

        With backups given and no such finding, one PASS saying so.
        """
        checks = []
        for index, found in enumerate(self.material):
            versions = subject.exposed_versions(found)
            if not versions:
                continue
            proof = self._prove(found, versions, subject)
            if proof is None and not found.identified:
                continue  # a key-shaped token that opens nothing of the subject's
            self._affecting.add(index)
            checks.append(Check(FAIL, self._finding(found, versions, subject, proof)))
        if not checks and self.backups:
            count = len(self.backups)
            checks.append(
                Check(
                    PASS,
                    f"no master key material in the data directory or in {count} "
                    f"backup{'s' if count > 1 else ''} holds a master key version the "
                    "subject's shred epoch destroyed",
                )
            )
        return checks

    def warnings(self) -> list[Check]:
        """Material that affects no forgotten subject yet: every later forget will be."""
        return [
            Check(
                WARN,
                f"{found.label()} (master key versions {sorted(found.keys)}): with a copy of "
                "the key store of its time it decrypts every subject not yet shredded when it "
                "was copied, for ever; no forgotten subject is affected yet, every subject "
                "forgotten from now on will be: destroy it",
            )
            for index, found in enumerate(self.material)
            if index not in self._affecting and found.identified
        ]

    def _finding(
        self, found: KeyMaterial, versions: list[int], subject: _SubjectKeys, proof: _Proof | None
    ) -> str:
        epoch = subject.tombstone.shred_epoch
        if not found.identified and proof is not None:
            versions = [proof.master_version]
        if subject.destroyed_below is None:
            when = (
                f"that the subject's shred epoch {epoch} (not run yet) is to destroy: a copy "
                "made before the subject is shredded decrypts the subject's events for ever"
            )
        else:
            when = (
                f"that the subject's shred epoch {epoch} destroyed: it was copied before the "
                "subject was shredded, so it decrypts the subject's events for ever"
            )
        if proof is not None:
            evidence = proof.text()
        else:
            evidence = (
                f"not proved on these files (no wrapped key of the subject in {found.root} "
                "unwraps under it), but it opens any copy of the key store made before the shred"
            )
        return f"{found.label()}, with master key versions {versions} {when}; {evidence}"

    def _prove(
        self, found: KeyMaterial, versions: list[int], subject: _SubjectKeys
    ) -> _Proof | None:
        """Try *found* on the wrapped keys of its backup: what does it open?"""
        dek_versions = sorted({1, *subject.samples})
        ciphers = [(v, AESGCM(found.keys[v])) for v in versions]
        for window in self._windows_of(found.root):
            for master_version, cipher in ciphers:
                for dek_version in dek_versions:
                    aad = wrap_aad(subject.subject_id, dek_version, master_version)
                    try:
                        dek = cipher.decrypt(window.nonce, window.ciphertext, aad)
                    except InvalidTag:
                        continue
                    position = _decrypts_event(dek, subject, dek_version)
                    return _Proof(master_version, dek_version, window, position)
        return None

    def _windows_of(self, root: Path) -> list[_Window]:
        if root not in self._windows:
            windows = []
            for path in _files([root]):
                with _contents(path) as data:
                    windows += [
                        _Window(path, m.start(), m.group(1), m.group(2))
                        for m in _WRAPPED_WINDOW.finditer(data)
                    ]
            self._windows[root] = windows
        return self._windows[root]


def _decrypts_event(dek: bytes, subject: _SubjectKeys, dek_version: int) -> int | None:
    """The position of the subject's event *dek* decrypts (the plaintext is dropped)."""
    sample = subject.samples.get(dek_version)
    if sample is None:
        return None
    position, body = sample
    aad = event_aad(
        subject.store_id, position, body.stream_id, body.stream_version, body.event_type,
        subject.subject_id, body.event_id, body.dek_version, body.content_type, body.recorded_at,
    )  # fmt: skip
    try:
        AESGCM(dek).decrypt(body.nonce, body.ciphertext, aad)
    except InvalidTag:
        return None
    return position


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
