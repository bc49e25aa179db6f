"""Start-up checks that a data directory's keyring, key store and log belong together.

A data directory is three things that only work together: the log (events
sealed under data keys), the key store (data keys wrapped under master keys)
and the master keyring (or another :class:`KeyProvider`). Each can be lost,
replaced or restored on its own, and every mix-up used to start silently:

* a missing keyring was replaced by a new one, and every acknowledged write
  became unreadable (new data keys were then wrapped under the new keyring,
  so putting the old one back lost those too);
* another store's keyring was used as if it were the right one;
* a log restored from an old backup was served beside a newer key store.

So the key store records a **key check value** for every master key version
it uses (a MAC of a fixed label under the key; never the key) and two
high-water marks: the highest log position it has seen (``KeyStoreMeta``)
and, in the log, the key store generation the log last saw
(``KeyStoreMark``). Start-up compares them in :func:`preflight` **before
anything is written**: a refusal leaves every file as it was, and is one
line naming the path, the versions expected and those found. Only then does
:func:`settle` record what is new (check values of versions created since,
the new high-water marks, an accepted restore).

A keyring is created only for a fresh directory: no event in the log, no
key, no recorded check value. Once the store runs,
:func:`record_missing_erasures` writes into a restored log the erasures only
the key store remembers; :func:`align_backup` makes a hot backup's key store
agree with its log copy. This module never writes before a check has passed,
and never logs or stores a key.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from lethedb_server.crypto.aead import InvalidTag, wrap_aad
from lethedb_server.crypto.keyring import FileKeyring, KeyProvider, MasterKeyUnavailable, WrappedKey
from lethedb_server.engine.model import ForgetCommand, ShredCommand
from lethedb_server.engine.writer import Writer
from lethedb_server.errors import DataDirDamaged, KeyringMismatch, LetheError, RestoredLog
from lethedb_server.storage import codec
from lethedb_server.storage.codec import KeyStoreMeta
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.lmdbenv import check_data_file
from lethedb_server.storage.log import META_KEY_STORE_MARK, META_LOG, LogStore

log = logging.getLogger(__name__)

#: The log's ``meta`` key under which it records the key store generation it saw.
LOG_MARK_KEY = META_KEY_STORE_MARK


@dataclass(frozen=True)
class DirState:
    """What the files of a data directory say, read without writing anything."""

    log_head: int = 0
    log_store_id: bytes | None = None
    log_key_generation: int = 0
    key_meta: KeyStoreMeta | None = None
    checks: dict[int, bytes] = field(default_factory=dict)
    key_entries: int = 0  # wrapped data keys plus forgotten subjects
    #: One wrapped key per master version (subject, DEK version, key), read only
    #: for a key store that predates check values: it is the proof to test.
    samples: dict[int, tuple[str, int, WrappedKey]] = field(default_factory=dict)

    @property
    def fresh(self) -> bool:
        """No event, no key, no recorded check value: nothing a new keyring could lose."""
        seen = self.key_meta.log_position if self.key_meta is not None else 0
        return not (self.log_head or self.checks or self.key_entries or seen)


@dataclass(frozen=True)
class Plan:
    """What :func:`preflight` decided; :func:`settle` carries it out."""

    provider: KeyProvider | None  # None: create the keyring at keyring_path
    keyring_path: Path
    record_versions: tuple[int, ...]
    accepted_restore: tuple[int, int] | None = None  # (last known head, restored head)
    #: (key store generation, generation the log saw) when the key store is older.
    key_store_behind: tuple[int, int] | None = None


def preflight(
    data_dir: Path,
    keyring_path: Path,
    provider: KeyProvider | None,
    accept_restored_log: bool,
) -> Plan:
    """Check keyring, key store and log against each other; write nothing.

    Raises :class:`KeyringMismatch`, :class:`RestoredLog` or
    :class:`DataDirDamaged` with one line an operator can act on.
    """
    state = read_state(data_dir)
    if state.log_head and not (state.key_entries or state.checks or state.key_meta):
        raise DataDirDamaged(
            f"the log {data_dir / 'log'} holds {state.log_head:,} positions but the key store "
            f"{data_dir / 'keys'} is missing or empty, so no event could be decrypted; "
            "restore keys/ beside it (see docs/OPERATIONS.md), or choose another --data directory"
        )
    if provider is None and keyring_path.exists():
        try:
            provider = FileKeyring(keyring_path)
        except OSError as exc:
            raise KeyringMismatch(f"master keyring {keyring_path} cannot be read: {exc}") from exc
    if provider is None:
        if not state.fresh:
            raise KeyringMismatch(
                f"master keyring {keyring_path} is missing, but the data directory {data_dir} "
                f"is not new: expected master key {_versions(_expected(state))}, found none; "
                "restore the keyring file or give its path with --keyring (a new keyring "
                "could not read anything written so far)"
            )
        return Plan(None, keyring_path, (1,))
    what = _describe(provider, keyring_path)
    _check_keys(state, provider, what, data_dir)
    _check_binding(state, data_dir)
    accepted = _check_log_lag(state, data_dir, accept_restored_log)
    record = _to_record(state, provider)
    behind = None
    if state.key_meta is not None and state.key_meta.generation < state.log_key_generation:
        behind = (state.key_meta.generation, state.log_key_generation)
    return Plan(provider, keyring_path, record, accepted, behind)


def _to_record(state: DirState, provider: KeyProvider) -> tuple[int, ...]:
    """The versions whose check values the key store must record now.

    Only versions something needs: those wrapping keys (a key store from
    before check values), and those newer than every version in use, which a
    process that died between creating a version and recording it leaves
    behind (nothing can be wrapped under them yet). An older version that
    nothing uses is never recorded: a shred epoch may be about to destroy
    it, and recording it would make the store refuse the keyring after.
    """
    known = set(state.checks) or set(state.samples)
    if not known:
        return (provider.current_version(),)
    newest = max(known)
    newer = {v for v in provider.versions() if v > newest}
    return tuple(sorted((known - set(state.checks)) | newer))


def provide(plan: Plan) -> KeyProvider:
    """The plan's provider; for a fresh directory, a new keyring file."""
    if plan.provider is not None:
        return plan.provider
    keyring, _ = FileKeyring.open_or_create(plan.keyring_path)
    log.info("created master keyring %s (mode 0600) for a new data directory", plan.keyring_path)
    return keyring


def settle(plan: Plan, log_store: LogStore, keys: KeyStore) -> None:
    """Record what the checks allowed: new check values, marks, an accepted restore."""
    keys.log_head = lambda: log_store.head
    meta = keys.meta or KeyStoreMeta(log_store.store_id, 0, log_store.head)
    if not log_store.head:
        # An empty log passed the checks: the key store has seen no position of
        # the log it was bound to, so it belongs to this one from now on.
        meta = msgspec.structs.replace(meta, store_id=log_store.store_id)
    if plan.accepted_restore is not None:
        known, head = plan.accepted_restore
        log.warning(
            "RESTORED LOG: %s ends at position %d but the last known head was %d: "
            "%s; serving it as accepted (accept_restored_log), and this is the new baseline",
            log_store.lmdb.path, head, known, _missing(known - head),
        )  # fmt: skip
        meta = msgspec.structs.replace(
            meta,
            store_id=log_store.store_id,
            log_position=head,
            restored_from=known,
            restored_to=head,
            restored_at=time.time_ns(),
        )
    if plan.key_store_behind is not None:
        log.warning(
            "KEY STORE BEHIND: %s is at generation %d but the log last saw generation %d "
            "(restored from an older backup?): events whose keys were created since read as "
            "DATA_LOSS; restore the newest key store (see docs/OPERATIONS.md)",
            keys.lmdb.path, *plan.key_store_behind,
        )  # fmt: skip
    keys.record_checks(plan.record_versions, meta)
    record_key_generation(log_store, keys)


def record_key_generation(log_store: LogStore, keys: KeyStore) -> None:
    """Tell the log which key store generation it goes with (start-up, clean close)."""
    if keys.meta is None:
        return
    mark = codec.KeyStoreMark(keys.meta.generation)
    log_store.lmdb.write(lambda txn: log_store.put_key_store_mark(txn, mark))


def record_missing_erasures(log_store: LogStore, keys: KeyStore, writer: Writer) -> int:
    """Write into the log every erasure the key store remembers and the log lacks.

    Only a log restored from before a forget lacks its tombstone: the key store
    already refuses and redacts the subject, but the log (the audit record,
    what subscribers replay) must say so too. Each subject is forgotten again
    through the writer (a new ``$subject.forgotten`` event, same reason), and a
    shred epoch follows so receipts and ``audit-erasure`` show it complete.
    Returns how many erasures were written.
    """
    in_log = {subject for subject, _ in log_store.all_tombstones()}
    missing = sorted(keys.forgotten_subjects() - in_log)
    if not missing:
        return 0
    pending = []
    for subject in missing:
        tombstone = keys.forgotten_tombstone(subject)
        reason = tombstone.reason if tombstone is not None else "restored"
        pending.append((subject, writer.submit(ForgetCommand(subject, reason, "restore"))))
    for subject, future in pending:
        try:
            future.result()
        except LetheError as exc:  # a legal hold from the old log: the key store still erases
            log.error("could not record the erasure of %r in the restored log: %s", subject, exc)
    writer.execute(ShredCommand())
    log.warning(
        "re-recorded %d erasures in the restored log (subjects forgotten after its backup) "
        "and ran a shred epoch",
        len(missing),
    )
    return len(missing)


def align_backup(destination: Path) -> None:
    """Make a backup's key store claim no log position beyond the backup's log.

    A hot backup copies the log first and the key store after it, so every
    key the log copy names is in the key copy; a key-store commit in between
    may have stamped a later log position, which would make the restored pair
    look like a log restored behind its key store. Only the copy is changed.
    """
    log_head = read_state(destination).log_head
    # A fresh copy nobody else opens: no lock file is needed (or left behind).
    env = lmdb.open(str(destination / "keys"), subdir=True, max_dbs=16, lock=False)
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(b"meta", txn=txn)
            raw = txn.get(b"keys", db=db)
            if raw is not None:
                meta = codec.decode_key_meta(raw)
                if meta.log_position > log_head:
                    aligned = msgspec.structs.replace(meta, log_position=log_head)
                    txn.put(b"keys", codec.encode(aligned), db=db)
    finally:
        env.close()


# -- the checks ------------------------------------------------------------------


def _check_keys(state: DirState, provider: KeyProvider, what: str, data_dir: Path) -> None:
    """Every version the directory uses must be in *provider*, holding the same key."""
    expected = _expected(state)
    found = provider.versions()
    lacking = [v for v in expected if v not in found]
    if lacking:
        raise KeyringMismatch(
            f"{what} lacks master key {_versions(lacking)} that the data directory {data_dir} "
            f"uses: expected master key {_versions(expected)}, found {_list(found)}; use the "
            "keyring this directory was written with (a keyring from before a shred epoch or a "
            "rotation does not hold the newer versions)"
        )
    wrong = [v for v in expected if not _holds_same_key(state, provider, v)]
    if wrong:
        raise KeyringMismatch(
            f"{what} holds a different key than the one the data directory {data_dir} was "
            f"written with (key check value mismatch for {_versions(wrong)}): expected master "
            f"key {_versions(expected)}, found {_list(found)}; use the keyring this directory "
            "was written with (is it another store's?)"
        )


def _holds_same_key(state: DirState, provider: KeyProvider, version: int) -> bool:
    recorded = state.checks.get(version)
    try:
        if recorded is not None:
            return hmac.compare_digest(provider.check_value(version), recorded)
        subject, dek_version, wrapped = state.samples[version]
        provider.unwrap(wrapped, wrap_aad(subject, dek_version, version))
    except (InvalidTag, MasterKeyUnavailable):
        return False
    return True


def _check_binding(state: DirState, data_dir: Path) -> None:
    """A key store bound to another log's store id cannot decrypt this log."""
    meta = state.key_meta
    if meta is None or not state.log_head or meta.store_id == state.log_store_id:
        return
    assert state.log_store_id is not None
    raise DataDirDamaged(
        f"the key store {data_dir / 'keys'} belongs to store {meta.store_id.hex()}, but the "
        f"log {data_dir / 'log'} is store {state.log_store_id.hex()}: they come from different "
        "stores; put the matching log/ and keys/ together (see docs/OPERATIONS.md)"
    )


def _check_log_lag(state: DirState, data_dir: Path, accept: bool) -> tuple[int, int] | None:
    """A log behind its key store's high-water mark needs the operator's consent."""
    known = state.key_meta.log_position if state.key_meta is not None else 0
    if state.log_head >= known:
        if accept:
            log.warning(
                "accept_restored_log is set, but the log is not behind its key store: nothing "
                "to accept; remove the option, or a later restore would be accepted unasked"
            )
        return None
    missing = known - state.log_head
    if not accept:
        raise RestoredLog(
            f"the log {data_dir / 'log'} ends at position {state.log_head:,}, but its key store "
            f"has seen position {known:,}: {_missing(missing)} (a log restored "
            "from an older backup?); restore the newest log, or serve this one as it is with "
            "--accept-restored-log (see docs/OPERATIONS.md)"
        )
    return known, state.log_head


def _missing(count: int) -> str:
    return "1 position is missing" if count == 1 else f"{count:,} positions are missing"


def _expected(state: DirState) -> list[int]:
    return sorted(state.checks or state.samples)


def _describe(provider: KeyProvider, keyring_path: Path) -> str:
    if isinstance(provider, FileKeyring):
        return f"master keyring {provider.path}"
    return f"key provider {type(provider).__name__}"


def _versions(versions: list[int]) -> str:
    if not versions:
        return "versions (none recorded)"
    return ("version " if len(versions) == 1 else "versions ") + _list(versions)


def _list(versions: list[int]) -> str:
    return ", ".join(map(str, versions)) if versions else "none"


# -- reading the files without writing ---------------------------------------------


def read_state(data_dir: Path) -> DirState:
    """Read the log's and the key store's records, opening LMDB read-only without locks.

    The caller holds the directory's lock file, so no other LetheDB process
    writes meanwhile; without LMDB's lock file nothing on disk changes at all.
    """
    log_head, store_id, key_generation = 0, None, 0
    with _readonly(data_dir / "log") as log_env:
        if log_env is not None:
            with log_env.begin() as txn:
                meta_db = _db(log_env, txn, b"meta")
                raw_meta = txn.get(META_LOG, db=meta_db) if meta_db is not None else None
                raw_mark = txn.get(LOG_MARK_KEY, db=meta_db) if meta_db is not None else None
            if raw_meta is not None:
                meta = codec.decode_meta(raw_meta)
                log_head, store_id = meta.last_position, meta.store_id
            if raw_mark is not None:
                key_generation = codec.decode_key_mark(raw_mark).key_generation
    with _readonly(data_dir / "keys") as keys_env:
        if keys_env is None:
            return DirState(log_head, store_id, key_generation)
        with keys_env.begin() as txn:
            key_meta, checks = _key_records(keys_env, txn)
            entries = 0
            for name in (b"deks", b"forgotten"):
                db = _db(keys_env, txn, name)
                entries += int(txn.stat(db)["entries"]) if db is not None else 0
            samples = {} if checks else _samples(keys_env, txn)
    return DirState(log_head, store_id, key_generation, key_meta, checks, entries, samples)


def _key_records(
    env: lmdb.Environment, txn: lmdb.Transaction
) -> tuple[KeyStoreMeta | None, dict[int, bytes]]:
    meta_db = _db(env, txn, b"meta")
    raw = txn.get(LOG_MARK_KEY, db=meta_db) if meta_db is not None else None
    checks_db = _db(env, txn, b"master_checks")
    checks = (
        {int.from_bytes(bytes(k), "big"): bytes(v) for k, v in txn.cursor(db=checks_db)}
        if checks_db is not None
        else {}
    )
    return (None if raw is None else codec.decode_key_meta(raw)), checks


def _samples(
    env: lmdb.Environment, txn: lmdb.Transaction
) -> dict[int, tuple[str, int, WrappedKey]]:
    """One wrapped key per master version, from a key store that predates check values."""
    deks = _db(env, txn, b"deks")
    found: dict[int, tuple[str, int, WrappedKey]] = {}
    if deks is None:
        return found
    for key, value in txn.cursor(db=deks):
        wrapped = msgspec.msgpack.decode(bytes(value), type=WrappedKey)
        if wrapped.master_version not in found:
            raw_key = bytes(key)
            length = int.from_bytes(raw_key[:4], "big")
            subject = raw_key[4 : 4 + length].decode()
            found[wrapped.master_version] = (subject, codec.dek_version_from_key(raw_key), wrapped)
    return found


@contextmanager
def _readonly(path: Path) -> Iterator[lmdb.Environment | None]:
    data = path / "data.mdb"
    if not data.exists():
        yield None
        return
    check_data_file(data)
    env = lmdb.open(
        str(path),
        readonly=True,
        lock=False,
        subdir=True,
        max_dbs=16,
        map_size=max(data.stat().st_size, 1 << 20),
    )
    try:
        yield env
    finally:
        env.close()


def _db(env: lmdb.Environment, txn: lmdb.Transaction, name: bytes) -> Any:
    try:
        return env.open_db(name, txn=txn, create=False)
    except lmdb.NotFoundError:
        return None
