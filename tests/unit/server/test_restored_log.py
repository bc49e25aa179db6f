"""A log that is behind its key store is reported at start-up and served only on request.

Before these checks, a log restored from an old backup beside the newer key
store started silently (head 6 while 50,011 subjects were live), and every
later append reused positions that subscribers had already seen. The key
store now records the highest log position it has seen, and the log the key
store generation it last saw; start-up compares them before writing anything.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lethedb_server.engine import custody
from lethedb_server.engine.model import (
    ERASURE_STREAM,
    AppendCommand,
    ForgetCommand,
    ProposedEvent,
    ShredCommand,
    SubjectState,
)
from lethedb_server.engine.restore import restore
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import (
    DataDirDamaged,
    KeyringMismatch,
    RestoredLog,
    SubjectForgotten,
)
from lethedb_server.ops import config
from tests.unit.server.test_key_custody import snapshot

ACCEPT = StoreOptions(accept_restored_log=True)


def _append(store: Store, subject: str, count: int = 1) -> None:
    events = tuple(
        ProposedEvent(b"", "Noted", subject, "text/plain", f"{subject}-{i}".encode(), b"")
        for i in range(count)
    )
    store.writer.append(AppendCommand(f"user-{subject}", events))


def _restored(tmp_path: Path) -> Path:
    """A data directory whose log is a backup at head 5 while the key store saw 12."""
    data = tmp_path / "data"
    with Store.open(data) as store:
        for subject in ("a", "b", "c", "d", "e"):
            _append(store, subject)
        store.backup(tmp_path / "backup", include_keys=False)
        _append(store, "f", 3)
        _append(store, "g", 4)
        assert store.log.head == 12
    shutil.rmtree(data / "log")
    shutil.copytree(tmp_path / "backup" / "log", data / "log")
    return data


def test_log_behind_its_key_store_is_refused_with_the_missing_count(tmp_path: Path):
    data = _restored(tmp_path)
    before = snapshot(tmp_path)

    with pytest.raises(RestoredLog) as refused:
        Store.open(data)

    message = str(refused.value)
    assert "\n" not in message
    assert str(data / "log") in message
    assert "ends at position 5" in message
    assert "has seen position 12" in message
    assert "7 positions are missing" in message
    assert "--accept-restored-log" in message
    assert snapshot(tmp_path) == before, "a refused start must write nothing"


def test_accepting_a_restored_log_says_so_once_and_records_the_new_baseline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    data = _restored(tmp_path)

    with caplog.at_level(logging.WARNING), Store.open(data, ACCEPT) as store:
        stats = store.stats()
        _append(store, "h")
        assert store.log.head == 6
    lines = [r.getMessage() for r in caplog.records if "RESTORED LOG" in r.getMessage()]
    assert len(lines) == 1
    assert "ends at position 5 but the last known head was 12: 7 positions are missing" in lines[0]
    assert (stats.restored_from, stats.restored_to) == (12, 5)
    assert stats.restored_at > 0

    caplog.clear()
    with caplog.at_level(logging.WARNING), Store.open(data) as store:  # quiet now
        assert store.stats().restored_from == 12
        assert store.reader.read_stream("user-h", 0, backwards=False, limit=1)[0].data == b"h-0"
    assert not [r for r in caplog.records if "RESTORED" in r.getMessage()]


def test_a_clean_restart_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The production layout (keyring outside the data directory) starts without a warning."""
    data = tmp_path / "data"
    options = StoreOptions(keyring_path=tmp_path / "master.keyring")
    with Store.open(data, options) as store:
        _append(store, "a", 3)
    with caplog.at_level(logging.WARNING), Store.open(data, options) as store:
        assert store.stats().restored_at == 0
    assert not caplog.records


def test_missing_log_beside_a_key_store_is_refused(tmp_path: Path):
    data = tmp_path / "data"
    with Store.open(data) as store:
        _append(store, "a", 3)
    shutil.rmtree(data / "log")

    with pytest.raises(RestoredLog, match=r"ends at position 0, .* 3 positions are missing"):
        Store.open(data)
    assert not (data / "log").exists()


def test_log_beside_a_missing_key_store_is_refused(tmp_path: Path):
    """A log restored beside a fresh key store could decrypt nothing."""
    data = tmp_path / "data"
    with Store.open(data) as store:
        _append(store, "a", 3)
    shutil.rmtree(data / "keys")
    before = snapshot(tmp_path)

    with pytest.raises(DataDirDamaged, match=r"key store .* is missing or empty"):
        Store.open(data)
    assert snapshot(tmp_path) == before


def test_key_store_of_another_store_is_refused(tmp_path: Path):
    keyring = tmp_path / "shared.keyring"  # one keyring, so only the store binding differs
    for name in ("data", "other"):
        with Store.open(tmp_path / name, StoreOptions(keyring_path=keyring)) as store:
            _append(store, name)
    shutil.rmtree(tmp_path / "data" / "keys")
    shutil.copytree(tmp_path / "other" / "keys", tmp_path / "data" / "keys")

    with pytest.raises(DataDirDamaged, match="come from different stores"):
        Store.open(tmp_path / "data", StoreOptions(keyring_path=keyring))


def test_key_store_older_than_the_log_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    data = tmp_path / "data"
    with Store.open(data) as store:
        _append(store, "a")
        store.backup(tmp_path / "backup", include_keys=True)
        _append(store, "b")  # a key made after the backup
    shutil.rmtree(data / "keys")
    shutil.copytree(tmp_path / "backup" / "keys", data / "keys")

    with caplog.at_level(logging.WARNING), Store.open(data):
        pass

    assert any("KEY STORE BEHIND" in r.getMessage() for r in caplog.records)


def test_backup_with_keys_restores_as_a_consistent_pair(tmp_path: Path):
    """A hot backup copies the log, then the key store, which may meanwhile have
    seen later positions (here: appends between the two copies). The copy's key
    store is aligned with its log, so restoring both starts without a false
    restored-log alarm, and every event of the log copy decrypts."""
    data = tmp_path / "data"
    backup = tmp_path / "backup"
    with Store.open(data) as store:
        _append(store, "a", 2)
        store.log.lmdb.copy_to(backup / "log")
        _append(store, "b", 2)
        _append(store, "c")  # a new key, committed when the log's head was 4
        store.keys.lmdb.copy_to(backup / "keys")
        custody.align_backup(backup)
    shutil.copytree(backup, tmp_path / "restored")
    shutil.copy2(data / "master.keyring", tmp_path / "restored" / "master.keyring")

    with Store.open(tmp_path / "restored") as store:
        assert store.log.head == 2
        page = store.reader.read_all(1, backwards=False, limit=10)
        assert [e.data for e in page] == [b"a-0", b"a-1"]
        assert store.stats().restored_at == 0


def test_erasures_since_the_backup_hold_and_are_written_into_the_restored_log(tmp_path: Path):
    """Subjects forgotten after the backup stay erased, and the restored log records it."""
    data = tmp_path / "data"
    with Store.open(data) as store:
        for subject in ("live", "gone-before", "gone-after"):
            _append(store, subject, 2)
        store.writer.execute(ForgetCommand("gone-before", "gdpr-art17", "admin"))
        store.backup(tmp_path / "backup", include_keys=False)
        _append(store, "gone-new", 1)  # created and forgotten after the backup
        for subject in ("gone-after", "gone-new"):
            store.writer.execute(ForgetCommand(subject, "gdpr-art17", "admin"))
        store.writer.execute(ShredCommand())
    shutil.rmtree(data / "log")
    shutil.copytree(tmp_path / "backup" / "log", data / "log")

    with Store.open(data, ACCEPT) as store:
        events = store.reader.read_all(1, backwards=False, limit=100)
        by_subject = {(e.subject_id, e.redacted) for e in events if e.subject_id}
        assert by_subject == {("live", False), ("gone-before", True), ("gone-after", True)}
        for subject in ("gone-before", "gone-after", "gone-new"):
            with pytest.raises(SubjectForgotten):
                _append(store, subject)
            assert store.receipt(subject).state is SubjectState.SHREDDED
        erasures = [e for e in events if e.stream_id == ERASURE_STREAM]
        assert len(erasures) == 3  # one from the backup, two written again at start-up

    audit = subprocess.run(
        [sys.executable, "-m", "lethedb_server", "audit-erasure", "--data", str(data)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "subject gone-new" in audit.stdout


def test_restoring_a_key_store_backup_older_than_a_shred_epoch_says_it_cannot_start(
    tmp_path: Path,
):
    data, keyring = tmp_path / "data", tmp_path / "secrets" / "master.keyring"
    with Store.open(data, StoreOptions(keyring_path=keyring)) as store:
        _append(store, "a")
        store.backup(tmp_path / "keys-backup", include_keys=True)
        store.writer.execute(ShredCommand())  # destroys the master version of the backup
    shutil.rmtree(data)

    status, lines = restore(tmp_path / "keys-backup", data, keyring)

    assert status == 2
    assert "lacks master key version 1" in lines[-1]
    with pytest.raises(KeyringMismatch):
        Store.open(data, StoreOptions(keyring_path=keyring))


def test_restore_refuses_a_backup_of_another_store_and_changes_nothing(tmp_path: Path):
    for name in ("data", "other"):
        with Store.open(tmp_path / name) as store:
            _append(store, name)
    (tmp_path / "other").rename(tmp_path / "other-backup")  # log/ and keys/ like a backup
    before = snapshot(tmp_path / "data")

    with pytest.raises(DataDirDamaged, match="belongs to store"):
        restore(tmp_path / "other-backup", tmp_path / "data")

    assert snapshot(tmp_path / "data") == before


def test_a_new_empty_log_beside_a_key_store_that_saw_no_event_is_bound_to_it(tmp_path: Path):
    data = tmp_path / "data"
    Store.open(data).close()
    shutil.rmtree(data / "log")  # a new log, with a new store id, and nothing lost

    with Store.open(data) as store:
        _append(store, "a")
    with Store.open(data) as store:  # not refused as "a key store of another store"
        assert store.reader.read_stream("user-a", 0, backwards=False, limit=1)[0].data == b"a-0"


@pytest.mark.parametrize(
    ("environ", "flags", "expected"),
    [
        ({}, {}, False),
        ({"LETHEDB_ACCEPT_RESTORED_LOG": "true"}, {}, True),
        ({}, {"accept_restored_log": "true"}, True),
    ],
)
def test_accept_restored_log_comes_from_the_environment_or_a_flag(environ, flags, expected):
    loaded = config.load(flags, environ=environ)

    assert loaded.store_options().accept_restored_log is expected


def test_restore_will_not_replace_a_newer_log_when_only_the_key_store_is_lost(tmp_path: Path):
    data = tmp_path / "data"
    with Store.open(data) as store:
        _append(store, "a")
        store.backup(tmp_path / "backup", include_keys=True)
        _append(store, "b")
    shutil.rmtree(data / "keys")
    before = snapshot(data)

    with pytest.raises(DataDirDamaged, match="Losing only the key store"):
        restore(tmp_path / "backup", data)

    assert snapshot(data) == before
