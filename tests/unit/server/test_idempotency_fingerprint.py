"""Idempotency fingerprints are keyed by the subjects' keys, and old ones are upgraded.

A fingerprint must tell a retry from a key reused for another request, and
must never let a copy of the log confirm a guess at a subject's data. These
tests use a real store (real LMDB files) in-process; the attack itself runs
against a server in tests/integration/test_erasure_fingerprint.py.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from lethedb_server.crypto.aead import fingerprint_key, keyed_fingerprint, wrap_aad
from lethedb_server.crypto.keyring import WrappedKey
from lethedb_server.engine.idempotency import FORMAT_KEY
from lethedb_server.engine.model import (
    STORE_SUBJECT,
    AppendCommand,
    CommitCommand,
    ForgetCommand,
    ProposedEvent,
    ShredCommand,
)
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import IdempotencyConflict, SubjectForgotten
from lethedb_server.storage import codec

SUBJECT, OTHER = "subj-a", "subj-b"


def _command(stream: str, key: str, *events: tuple[str, bytes]) -> AppendCommand:
    proposed = tuple(
        ProposedEvent(b"", "PinSet", subject, "application/json", data, b"")
        for subject, data in events
    )
    return AppendCommand(stream, proposed, idempotency_key=key)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path):
    # A tiny use cap makes subjects roll over to new DEK versions.
    s = Store.open(data_dir, StoreOptions(dek_max_uses=2))
    yield s
    s.close()


def _entry(store: Store, key: str) -> codec.IdempotencyEntry | None:
    with store.log.lmdb.read() as txn:
        raw = txn.get(key.encode(), db=store.log.idempotency)
    return None if raw is None else codec.decode_idempotency(raw)


def _format(store: Store, key: str) -> int | None:
    entry = _entry(store, key)
    return None if entry is None else entry.digest_format


def _log_bytes(store: Store) -> bytes:
    return (store.data_dir / "log" / "data.mdb").read_bytes()


def _write_as_old_code(store: Store, key: str, request_hash: bytes) -> None:
    """Store the entry under *key* exactly as versions before keyed fingerprints did:
    a four-field array holding the unkeyed request hash, and no format key in the meta."""
    entry = _entry(store, key)
    assert entry is not None
    old = msgspec.msgpack.encode((request_hash, entry.result, entry.created_at, entry.commit))
    with store.log.lmdb.begin_write() as txn:
        txn.put(key.encode(), old, db=store.log.idempotency)
        txn.delete(FORMAT_KEY, db=store.log.meta_db)


def test_the_stored_fingerprint_is_keyed_and_no_plaintext_hash_reaches_the_file(store):
    command = _command("pins", "k", (SUBJECT, b'{"pin":"4711"}'))
    store.writer.append(command)

    entry = _entry(store, "k")
    assert entry is not None
    assert entry.digest_format == codec.KEYED_DIGEST
    assert command.request_hash() not in _log_bytes(store)
    # The key is the one derived from the subject's DEK version 1.
    with store.keys.lmdb.read() as txn:
        raw = txn.get(codec.dek_key(SUBJECT, 1), db=store.keys.lmdb.dbs["deks"])
    wrapped = msgspec.msgpack.decode(raw, type=WrappedKey)
    dek = store.provider.unwrap(wrapped, wrap_aad(SUBJECT, 1, wrapped.master_version))
    assert entry.digest == keyed_fingerprint(command.request_hash(), [fingerprint_key(dek)])


def test_a_retry_deduplicates_across_dek_roll_overs_and_restarts(store, data_dir):
    first = _command("pins", "k", (SUBJECT, b"1"), (SUBJECT, b"2"))
    subject_less = _command("system", "k-store", ("", b"config"))
    result = store.writer.append(first)
    store.writer.append(subject_less)
    for i in range(6):  # roll the subject's DEK over, twice or more
        store.writer.append(_command("pins", "", (SUBJECT, str(i).encode())))
    assert len(store.keys.versions_of(SUBJECT)) >= 3

    assert store.writer.append(first).deduplicated
    store.close()
    reopened = Store.open(data_dir, StoreOptions(dek_max_uses=2))
    try:
        again = reopened.writer.append(first)
        assert again.deduplicated
        assert again.first_position == result.first_position
        assert reopened.writer.append(subject_less).deduplicated
    finally:
        reopened.close()
    store.close = lambda: None  # type: ignore[method-assign]


def test_a_commit_retry_deduplicates_and_a_changed_part_is_a_conflict(store):
    commit = CommitCommand(
        (_command("a", "", (SUBJECT, b"1")), _command("b", "", (OTHER, b"2"), ("", b"3"))),
        "k-commit",
    )
    store.writer.execute(commit)

    assert store.writer.execute(commit).deduplicated
    changed = msgspec.structs.replace(
        commit, appends=(commit.appends[0], _command("b", "", (OTHER, b"X"), ("", b"3")))
    )
    with pytest.raises(IdempotencyConflict):
        store.writer.execute(changed)


def test_old_unkeyed_entries_are_re_keyed_or_dropped_once_at_start_up(store, data_dir):
    """A store written before keyed fingerprints: live subjects' entries keep
    deduplicating, a forgotten subject's entry is gone, the unkeyed hashes are
    out of the table."""
    live = _command("pins-live", "k-live", (SUBJECT, b'{"pin":"1234"}'))
    subject_less = _command("system", "k-store", ("", b"config"))
    doomed = _command("pins-doomed", "k-doomed", (OTHER, b'{"pin":"4711"}'))
    commit = CommitCommand(
        (_command("c1", "", (SUBJECT, b"x")), _command("c2", "", ("", b"y"))), "k-commit"
    )
    for command in (live, subject_less, doomed):
        store.writer.append(command)
    store.writer.execute(commit)
    for key, request_hash in (
        ("k-live", live.request_hash()),
        ("k-store", subject_less.request_hash()),
        ("k-doomed", doomed.request_hash()),
        ("k-commit", commit.request_hash()),
    ):
        _write_as_old_code(store, key, request_hash)
    store.writer.execute(ForgetCommand(OTHER, "gdpr-art17", "admin"))
    store.writer.execute(ShredCommand())
    store.close()

    reopened = Store.open(data_dir, StoreOptions(dek_max_uses=2))
    try:
        for key in ("k-live", "k-store", "k-commit"):
            assert _format(reopened, key) == codec.KEYED_DIGEST, key
        assert _entry(reopened, "k-doomed") is None
        with reopened.log.lmdb.read() as txn:
            expiry = list(txn.cursor(db=reopened.log.idempotency_expiry).iternext(values=False))
            table = [bytes(v) for v in txn.cursor(db=reopened.log.idempotency).iternext(keys=False)]
            assert (
                codec.from_u64(txn.get(FORMAT_KEY, db=reopened.log.meta_db)) == codec.KEYED_DIGEST
            )
        assert not any(k.endswith(b"k-doomed") for k in map(bytes, expiry))
        for request_hash in (live.request_hash(), doomed.request_hash(), commit.request_hash()):
            assert not any(request_hash in value for value in table)

        assert reopened.writer.append(live).deduplicated
        assert reopened.writer.append(subject_less).deduplicated
        assert reopened.writer.execute(commit).deduplicated
        with pytest.raises(SubjectForgotten):
            reopened.writer.append(doomed)
    finally:
        reopened.close()
    store.close = lambda: None  # type: ignore[method-assign]


def test_an_unkeyed_entry_is_never_compared(store):
    """Lookups trust only keyed digests: an unkeyed one is no evidence either way."""
    command = _command("pins", "k", (SUBJECT, b"1"))
    store.writer.append(command)
    _write_as_old_code(store, "k", command.request_hash())

    assert not store.writer.append(command).deduplicated
    assert _format(store, "k") == codec.KEYED_DIGEST


def test_the_store_key_fingerprints_subject_less_requests(store):
    command = _command("system", "k", ("", b"config"))
    store.writer.append(command)
    entry = _entry(store, "k")
    assert entry is not None
    [key] = store.keys.fingerprint_keys([STORE_SUBJECT])
    assert entry.digest == keyed_fingerprint(command.request_hash(), [key])


def test_a_request_naming_several_subjects_needs_every_ones_key(store):
    command = _command("pins", "k", (SUBJECT, b"1"), ("", b"2"), (OTHER, b"3"))
    store.writer.append(command)
    entry = _entry(store, "k")
    assert entry is not None
    a, s, b = store.keys.fingerprint_keys([SUBJECT, STORE_SUBJECT, OTHER])
    h = command.request_hash()

    assert entry.digest == keyed_fingerprint(h, [a, s, b])
    # Without any one of the keys (a forgotten subject's), nothing reproduces it.
    for partial in ([a, s], [s, b], [a, b], [a], [b], [s]):
        assert entry.digest != keyed_fingerprint(h, partial)
