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
backups. The audit opens LMDB read-only, so it can run beside a live server.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from lethedb_server import codec
from lethedb_server.codec import EpochRecord, LogMeta, Tombstone
from lethedb_server.crypto import InvalidTag, wrap_aad
from lethedb_server.keyring import FileKeyring, MasterKeyUnavailable, WrappedKey
from lethedb_server.storage import indexed_subject_positions, tail_subject_positions

#: A wrapped DEK as msgpack: bin8 of the 12-byte nonce, then bin8 of the
#: 48-byte ciphertext (32-byte key + 16-byte tag).
_WRAPPED_WINDOW = re.compile(rb"\xc4\x0c(.{12})\xc4\x30(.{48})", re.DOTALL)

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

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def verdict(self) -> str:
        """FAIL if any check failed, else PENDING if any waits for a shred epoch, else PASS."""
        outcomes = {c.outcome for s in self.subjects for c in s.checks}
        outcomes.update(c.outcome for c in self.canaries)
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
        if self.canaries:
            lines.append("canaries")
            lines += [f"  {c.outcome:<7} {c.text}" for c in self.canaries]
        count = sum(len(s.checks) for s in self.subjects) + len(self.canaries)
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
                pending_epoch = meta.shred_epoch < tombstone.shred_epoch
                audit.checks.append(
                    _no_unwrappable_window(
                        keyring, subject_id, versions, key_files, pending_epoch=pending_epoch
                    )
                )
                subjects.append(audit)
    finally:
        log_env.close()
        keys_env.close()
    scanned = list(_files([data_dir, *backups]))
    canary_checks = [_canary(text, scanned) for text in canaries or []]
    return AuditReport(subjects, canary_checks, len(scanned))


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


def _no_unwrappable_window(
    keyring: FileKeyring,
    subject_id: str,
    dek_versions: set[int],
    files: list[Path],
    *,
    pending_epoch: bool = False,
) -> Check:
    """FAIL when a stale wrapped key still unwraps, or PENDING before the subject's shred epoch.

    Until that epoch has run, stale copies (free key-store pages, backups with
    keys) unwrapping under a master key version that exists now are expected:
    the epoch destroys every such version. Afterwards, one is a failure.
    """
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
                        keyring.unwrap(wrapped, wrap_aad(subject_id, dek_version, master_version))
                    except (InvalidTag, MasterKeyUnavailable):
                        continue
                    where = (
                        f"{path} at byte {offset} holds a key of the subject (version "
                        f"{dek_version}) that master key version {master_version} still unwraps"
                    )
                    if pending_epoch:
                        return Check(
                            PENDING, f"{where}; the pending shred epoch destroys that version"
                        )
                    return Check(FAIL, where)
    return Check(
        PASS,
        f"none of {windows} wrapped-key windows in {len(files)} key-store and backup files "
        "unwraps a key of the subject",
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
