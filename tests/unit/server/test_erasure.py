"""Crypto-shredding in-process: forget, shred epochs, receipts, backups, audit.

These tests hold the raw keys of a subject in memory before forgetting it, so
they can search every byte the store writes for them.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from lethedb_server.crypto.aead import wrap_aad
from lethedb_server.crypto.keyring import FileKeyring, WrappedKey
from lethedb_server.engine.idempotency import FORMAT_KEY
from lethedb_server.engine.model import (
    ERASURE_EVENT_TYPE,
    ERASURE_STREAM,
    AppendCommand,
    ForgetCommand,
    LegalHoldCommand,
    ProposedEvent,
    ShredCommand,
    SubjectState,
)
from lethedb_server.engine.reader import EventReader
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import (
    DataLoss,
    KeyringMismatch,
    LegalHoldActive,
    RestoredLog,
    SubjectForgotten,
)
from lethedb_server.ops.server import shred_on_timer
from lethedb_server.storage import codec
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.log import LogStore

FORGOTTEN, KEPT = "subj-forgotten", "subj-kept"


def _event(subject: str, text: str) -> ProposedEvent:
    return ProposedEvent(b"", "ProfileChanged", subject, "application/json", text.encode(), b"")


def _append(store: Store, stream: str, subject: str, *texts: str) -> None:
    store.writer.append(AppendCommand(stream, tuple(_event(subject, t) for t in texts)))


def _raw_deks(store: Store, subject: str) -> list[bytes]:
    """Unwrap every stored DEK version of *subject* (the test's own copy)."""
    raw = []
    with store.keys.lmdb.read() as txn:
        for version in store.keys.versions_of(subject):
            value = txn.get(codec.dek_key(subject, version), db=store.keys.lmdb.dbs["deks"])
            wrapped = msgspec.msgpack.decode(value, type=WrappedKey)
            aad = wrap_aad(subject, version, wrapped.master_version)
            raw.append(store.provider.unwrap(wrapped, aad))
    return raw


def _wrapped_deks(store: Store, subject: str) -> list[bytes]:
    with store.keys.lmdb.read() as txn:
        return [
            bytes(txn.get(codec.dek_key(subject, v), db=store.keys.lmdb.dbs["deks"]))
            for v in store.keys.versions_of(subject)
        ]


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.fixture
def store(tmp_path: Path):
    # A tiny use cap gives the subject several DEK versions to erase.
    s = Store.open(tmp_path / "data", StoreOptions(dek_max_uses=2))
    yield s
    s.close()


def _forget(store: Store, subject: str = FORGOTTEN) -> None:
    store.writer.execute(ForgetCommand(subject, "gdpr-art17", "admin"))


def test_forgotten_subject_reads_back_redacted_with_every_clear_field(store):
    _append(store, "user-1", FORGOTTEN, "CANARY-ALICE-1", "CANARY-ALICE-2")
    _append(store, "user-2", KEPT, "bob")
    before = store.reader.read_all(1, backwards=False, limit=10)

    _forget(store)

    after = store.reader.read_all(1, backwards=False, limit=10)
    assert [e.redacted for e in after[:3]] == [True, True, False]
    for old, new in zip(before[:2], after[:2], strict=True):
        assert (new.position, new.stream_id, new.stream_version, new.event_id, new.event_type) == (
            old.position, old.stream_id, old.stream_version, old.event_id, old.event_type,
        )  # fmt: skip
        assert (new.data, new.metadata) == (b"", b"")
    assert after[2].data == b"bob"


def test_forget_appends_one_erasure_event_without_personal_data(store):
    _append(store, "user-1", FORGOTTEN, "CANARY-ALICE")

    _forget(store)

    [erasure] = store.reader.read_stream(ERASURE_STREAM, 0, backwards=False, limit=10)
    assert erasure.event_type == ERASURE_EVENT_TYPE
    assert erasure.subject_id == ""
    assert msgspec.json.decode(erasure.data) == {
        "subject_id": FORGOTTEN,
        "reason": "gdpr-art17",
        "forgotten_by": "admin",
    }


def test_appending_for_a_forgotten_subject_is_refused(store):
    _append(store, "user-1", FORGOTTEN, "x")
    _forget(store)
    with pytest.raises(SubjectForgotten):
        _append(store, "user-1", FORGOTTEN, "again")


def test_forgetting_twice_returns_the_first_receipt(store):
    _append(store, "user-1", FORGOTTEN, "x")
    first = store.writer.execute(ForgetCommand(FORGOTTEN, "first", "admin"))
    second = store.writer.execute(ForgetCommand(FORGOTTEN, "second", "admin"))
    assert second.tombstone_position == first.tombstone_position
    assert second.reason == "first"
    assert len(store.reader.read_stream(ERASURE_STREAM, 0, backwards=False, limit=10)) == 1


def test_receipt_moves_from_pending_shred_to_shredded(store):
    _append(store, "user-1", FORGOTTEN, "a", "b", "c")
    assert store.receipt(FORGOTTEN).state is SubjectState.ACTIVE

    _forget(store)
    pending = store.receipt(FORGOTTEN)
    assert pending.state is SubjectState.FORGOTTEN_PENDING_SHRED
    assert pending.event_count == 3
    assert pending.shredded_at == 0

    result = store.writer.execute(ShredCommand())
    shredded = store.receipt(FORGOTTEN)
    assert shredded.state is SubjectState.SHREDDED
    assert shredded.shred_epoch == result.epoch == 1
    assert shredded.shredded_at == result.completed_at


def test_the_shred_timer_runs_an_epoch_through_the_engine_when_forgets_are_pending(store):
    """The scheduled epoch calls the store itself: no gRPC service is needed for it."""
    _append(store, "user-1", FORGOTTEN, "a")
    _forget(store)
    assert store.pending_forgets() == 1

    async def until_shredded() -> None:
        timer = asyncio.create_task(shred_on_timer(store, 0.01))
        try:
            while await asyncio.to_thread(store.pending_forgets):
                await asyncio.sleep(0.01)
        finally:
            timer.cancel()

    asyncio.run(asyncio.wait_for(until_shredded(), 30))  # a bound against a hang, not timing
    assert store.receipt(FORGOTTEN).state is SubjectState.SHREDDED
    assert store.shred_epoch == 1


def test_legal_hold_blocks_forget_until_released(store):
    _append(store, "user-1", FORGOTTEN, "x")
    store.writer.execute(LegalHoldCommand(FORGOTTEN, "litigation 2026-17"))

    with pytest.raises(LegalHoldActive, match="litigation 2026-17"):
        _forget(store)
    assert store.receipt(FORGOTTEN).on_hold

    store.writer.execute(LegalHoldCommand(FORGOTTEN, release=True))
    _forget(store)
    assert store.receipt(FORGOTTEN).state is SubjectState.FORGOTTEN_PENDING_SHRED


def test_an_expired_legal_hold_does_not_block_forget(store):
    _append(store, "user-1", FORGOTTEN, "x")
    store.writer.execute(LegalHoldCommand(FORGOTTEN, "expired", until=1))
    _forget(store)
    assert store.receipt(FORGOTTEN).state is SubjectState.FORGOTTEN_PENDING_SHRED


def test_no_raw_key_of_the_subject_is_ever_on_disk_and_no_wrapped_one_after_shred(store):
    _append(store, "user-1", FORGOTTEN, *[f"CANARY-{i}" for i in range(5)])
    _append(store, "user-2", KEPT, "bob")
    raw = _raw_deks(store, FORGOTTEN)
    wrapped = _wrapped_deks(store, FORGOTTEN)
    assert len(raw) >= 2  # the use cap rolled the key over
    data_dir = store.data_dir

    for key in raw:
        assert _files_containing(data_dir, key) == []
    _forget(store)
    for key in raw:
        assert _files_containing(data_dir, key) == []

    store.writer.execute(ShredCommand())

    for key in raw + wrapped:
        assert _files_containing(data_dir, key) == []
    assert _files_containing(data_dir, b"CANARY") == []


def _audit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``lethedb audit-erasure`` as operators do: a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", "audit-erasure", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_audit_reports_pending_before_the_shred_and_passes_after(store):
    _append(store, "user-1", FORGOTTEN, "CANARY-AUDIT")
    _append(store, "user-2", KEPT, "bob")
    _forget(store)

    pending = _audit("--data", store.data_dir, "--canary", "CANARY-AUDIT")
    # Nothing failed, one check waits for the shred epoch: its own verdict and
    # exit status, so that scripts tell "not yet" from "erasure broken".
    assert pending.returncode == 3, pending.stdout + pending.stderr
    assert f"subject {FORGOTTEN}" in pending.stdout
    assert "PENDING" in pending.stdout
    assert "RESULT: PENDING" in pending.stdout

    store.writer.execute(ShredCommand())

    report = _audit("--data", store.data_dir, "--canary", "CANARY-AUDIT")
    assert report.returncode == 0, report.stdout + report.stderr
    # four subject checks, the canary, no unkeyed fingerprint, the canary's brute force
    assert report.stdout.count("  PASS ") == 7
    assert "RESULT: PASS" in report.stdout


def test_audit_fails_on_a_planted_canary(store):
    _append(store, "user-1", FORGOTTEN, "x")
    _forget(store)
    store.writer.execute(ShredCommand())
    (store.data_dir / "notes.txt").write_text("left behind: CANARY-PLANTED")

    report = _audit("--data", store.data_dir, "--canary", "CANARY-PLANTED")

    assert report.returncode == 1
    assert "notes.txt" in report.stdout


def test_audit_finds_a_key_store_backup_taken_before_the_forget_until_the_shred(store, tmp_path):
    _append(store, "user-1", FORGOTTEN, "x")
    store.backup(tmp_path / "backup", include_keys=True)
    _forget(store)

    before = _audit("--data", store.data_dir, "--backup", tmp_path / "backup")
    assert before.returncode == 3  # PENDING: the shred epoch destroys that master version
    assert "still unwraps" in before.stdout

    store.writer.execute(ShredCommand())

    after = _audit("--data", store.data_dir, "--backup", tmp_path / "backup")
    assert after.returncode == 0, after.stdout


def test_old_data_backup_beside_the_current_keyring_cannot_decrypt_the_forgotten_subject(
    store, tmp_path
):
    """A copy of log/ and keys/ from before the forget is useless to an attacker
    once the shred epoch destroyed the master key versions that wrap its keys."""
    _append(store, "user-1", FORGOTTEN, "alice")
    _append(store, "user-2", KEPT, "bob")
    stolen = tmp_path / "stolen"
    shutil.copytree(store.data_dir / "log", stolen / "log")
    shutil.copytree(store.data_dir / "keys", stolen / "keys")
    _forget(store)
    store.writer.execute(ShredCommand())
    shutil.copy2(store.data_dir / "master.keyring", stolen / "master.keyring")

    # The store itself refuses the mix: the copy uses a master version the keyring lacks.
    with pytest.raises(KeyringMismatch, match="lacks master key version 1"):
        Store.open(stolen)
    # Whoever bypasses that check still decrypts nothing: the version is destroyed.
    log_store = LogStore(stolen / "log")
    keys = KeyStore(stolen / "keys", FileKeyring(stolen / "master.keyring"))
    try:
        with pytest.raises(DataLoss, match="master key version"):
            EventReader(log_store, keys).read_stream("user-1", 0, backwards=False, limit=10)
    finally:
        log_store.close()
        keys.close()


def test_old_log_backup_beside_the_current_key_store_keeps_every_later_erasure(store, tmp_path):
    """Restoring the log from before a forget must not bring the subject back."""
    _append(store, "user-1", FORGOTTEN, "alice")
    _append(store, "user-2", KEPT, "bob")
    store.backup(tmp_path / "log-backup", include_keys=False)
    _forget(store)
    store.writer.execute(ShredCommand())
    data_dir = store.data_dir
    store.close()
    shutil.rmtree(data_dir / "log")
    shutil.copytree(tmp_path / "log-backup" / "log", data_dir / "log")

    with pytest.raises(RestoredLog, match="1 position is missing"):
        Store.open(data_dir)  # the forget's event is not in the restored log
    restored = Store.open(data_dir, StoreOptions(accept_restored_log=True))
    try:
        events = restored.reader.read_all(1, backwards=False, limit=10)
        assert [(e.subject_id, e.redacted) for e in events[:2]] == [
            (FORGOTTEN, True),
            (KEPT, False),
        ]
        assert events[1].data == b"bob"
        # The erasure the restored log lacked is written into it again.
        assert [e.event_type for e in events[2:]] == [ERASURE_EVENT_TYPE]
        with pytest.raises(SubjectForgotten):
            _append(restored, "user-1", FORGOTTEN, "resurrected?")
        assert restored.receipt(FORGOTTEN).state is SubjectState.SHREDDED
    finally:
        restored.close()
    # `store` fixture closes again: harmless
    store.close = lambda: None  # type: ignore[method-assign]


def test_old_key_store_backup_is_re_shredded_at_start_up(store, tmp_path):
    """A key store restored from before a forget holds the subject's keys: the
    tombstones in the log delete them again and a shred epoch runs at start."""
    _append(store, "user-1", FORGOTTEN, "alice")
    _append(store, "user-2", KEPT, "bob")
    _append(store, "system", "", "the store key exists before the backup")
    store.backup(tmp_path / "keys-backup", include_keys=True)
    _forget(store)
    data_dir = store.data_dir
    epoch_before = store.log.meta.shred_epoch
    store.close()
    shutil.rmtree(data_dir / "keys")
    shutil.copytree(tmp_path / "keys-backup" / "keys", data_dir / "keys")

    restored = Store.open(data_dir)
    try:
        assert restored.keys.versions_of(FORGOTTEN) == []
        assert restored.log.meta.shred_epoch == epoch_before + 1
        events = restored.reader.read_all(1, backwards=False, limit=10)
        assert events[0].redacted
        assert events[1].data == b"bob"
        assert events[3].event_type == ERASURE_EVENT_TYPE
    finally:
        restored.close()
    store.close = lambda: None  # type: ignore[method-assign]


def test_export_returns_exactly_the_subjects_events_decrypted(store):
    _append(store, "user-1", FORGOTTEN, "a1")
    _append(store, "orders-1", FORGOTTEN, "a2")
    _append(store, "user-2", KEPT, "b1")
    _append(store, "user-1", FORGOTTEN, "a3")

    exported = store.reader.read_subject(FORGOTTEN, 0, 100)

    assert [e.data for e in exported] == [b"a1", b"a2", b"a3"]
    assert {e.stream_id for e in exported} == {"user-1", "orders-1"}


def test_shredding_rotates_the_master_key_and_keeps_live_subjects_readable(store):
    _append(store, "user-2", KEPT, "bob")
    versions_before = store.provider.versions()
    _forget(store, "nobody-in-particular")

    result = store.writer.execute(ShredCommand())

    assert store.provider.versions() == [result.master_version]
    assert result.master_version > max(versions_before)
    assert store.reader.read_stream("user-2", 0, backwards=False, limit=1)[0].data == b"bob"
    keyring = FileKeyring(store.data_dir / "master.keyring")
    assert keyring.versions() == [result.master_version]


# -- idempotency fingerprints --------------------------------------------------------------

PIN_DATA = '{"pin":"4711"}'


def _append_pin(store: Store, key: str) -> AppendCommand:
    command = AppendCommand("pins", (_event(FORGOTTEN, PIN_DATA),), idempotency_key=key)
    store.writer.append(command)
    return command


def _store_as_old_code(store: Store, key: str, command: AppendCommand) -> None:
    """Rewrite the entry under *key* as versions before keyed fingerprints stored it:
    four fields, the unkeyed request hash, and no idempotency format in the meta."""
    with store.log.lmdb.begin_write() as txn:
        entry = codec.decode_idempotency(txn.get(key.encode(), db=store.log.idempotency))
        old = (command.request_hash(), entry.result, entry.created_at, entry.commit)
        txn.put(key.encode(), msgspec.msgpack.encode(old), db=store.log.idempotency)
        txn.delete(FORMAT_KEY, db=store.log.meta_db)


def test_audit_brute_forces_canaries_against_keyed_fingerprints_with_any_key_left(store):
    _append_pin(store, "k-pin")
    _append(store, "user-2", KEPT, "bob")
    _forget(store)

    # Before the shred the key store's free pages still hold the subject's
    # wrapped key, which the current master unwraps: the fingerprint is breakable.
    pending = _audit("--data", store.data_dir, "--canary", PIN_DATA)
    assert pending.returncode == 1
    assert "idempotency fingerprints" in pending.stdout
    assert "keyed under keys that the files still yield" in pending.stdout

    store.writer.execute(ShredCommand())

    report = _audit("--data", store.data_dir, "--canary", PIN_DATA)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "are keyed" in report.stdout
    assert "is confirmed by none of 1 idempotency fingerprints" in report.stdout


def test_audit_fails_on_an_unkeyed_fingerprint_written_by_old_code(store):
    command = _append_pin(store, "k-pin")
    _store_as_old_code(store, "k-pin", command)
    _forget(store)
    store.writer.execute(ShredCommand())

    report = _audit("--data", store.data_dir, "--canary", PIN_DATA)

    assert report.returncode == 1
    assert "1 unkeyed idempotency fingerprints of forgotten subjects' requests" in report.stdout
    assert f"{PIN_DATA!r} is confirmed by the idempotency fingerprint (unkeyed)" in report.stdout
    # Without a canary the unkeyed fingerprint fails the audit all the same.
    assert _audit("--data", store.data_dir).returncode == 1


def test_audit_finds_an_unkeyed_fingerprint_left_in_a_free_page(store):
    """The expiry sweep deletes an entry, but LMDB keeps its bytes in a free page."""
    command = _append_pin(store, "k-pin")
    _store_as_old_code(store, "k-pin", command)
    _forget(store)
    store.writer.execute(ShredCommand())
    with store.log.lmdb.begin_write() as txn:  # what the sweeper does to an expired entry
        txn.delete(b"k-pin", db=store.log.idempotency)
    assert command.request_hash() in (store.data_dir / "log" / "data.mdb").read_bytes()

    report = _audit("--data", store.data_dir, "--canary", PIN_DATA)

    assert report.returncode == 1
    assert "(a free page or an old copy)" in report.stdout
    assert f"{PIN_DATA!r} is confirmed by the idempotency fingerprint (unkeyed)" in report.stdout


def test_upgrading_an_old_store_drops_its_unkeyed_fingerprints_and_a_compacted_log_passes(
    store, tmp_path
):
    command = _append_pin(store, "k-pin")
    _store_as_old_code(store, "k-pin", command)
    _forget(store)
    store.writer.execute(ShredCommand())
    data_dir = store.data_dir
    store.close()

    upgraded = Store.open(data_dir)  # start-up drops the forgotten subject's entry
    try:
        with upgraded.log.lmdb.read() as txn:
            assert txn.get(b"k-pin", db=upgraded.log.idempotency) is None
        upgraded.backup(tmp_path / "compacted", include_keys=False)
    finally:
        upgraded.close()
    # A compacted copy of the log holds no free page: put it in place of the log.
    shutil.rmtree(data_dir / "log")
    shutil.copytree(tmp_path / "compacted" / "log", data_dir / "log")

    report = _audit("--data", data_dir, "--canary", PIN_DATA)

    assert report.returncode == 0, report.stdout
    assert command.request_hash() not in (data_dir / "log" / "data.mdb").read_bytes()
    store.close = lambda: None  # type: ignore[method-assign]
