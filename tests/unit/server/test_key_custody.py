"""Start-up refuses a keyring that does not hold the keys the data directory uses.

Before these checks, a missing keyring was silently replaced by a new one
(and acknowledged writes became unreadable), and another store's keyring was
used as if it were the right one. The data directory now records a key check
value per master key version (a MAC of a fixed label under the key, never
the key), and start-up compares the keyring against it. A refused start
writes nothing at all: these tests snapshot every file before and after.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import lmdb
import pytest

from lethedb_server.crypto.keyring import FileKeyring, KeyProvider
from lethedb_server.engine.erasure import NEXT_KEYS, OLD_KEYS_FILE, Shredder, _Journal
from lethedb_server.engine.model import (
    AppendCommand,
    ForgetCommand,
    ProposedEvent,
    RotateCommand,
    ShredCommand,
)
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import KeyringMismatch
from tests.memory_keyring import MemoryKeyring

Snapshot = dict[str, tuple[int, int, str]]


def snapshot(*roots: Path) -> Snapshot:
    """Every file and directory under *roots*: size, mtime (ns) and a digest of its bytes."""
    seen: Snapshot = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            seen[str(path)] = (info.st_size if path.is_file() else 0, info.st_mtime_ns, digest)
    return seen


def _append(store: Store, subject: str, text: str, stream: str = "user") -> None:
    event = ProposedEvent(b"", "Noted", subject, "text/plain", text.encode(), b"")
    store.writer.append(AppendCommand(f"{stream}-{subject}", (event,)))


def _data_of(store: Store, subject: str, stream: str = "user") -> bytes:
    return store.reader.read_stream(f"{stream}-{subject}", 0, backwards=False, limit=1)[0].data


def _written(data_dir: Path, options: StoreOptions | None = None) -> None:
    """A data directory with one acknowledged event of subject s1, closed."""
    with Store.open(data_dir, options) as store:
        _append(store, "s1", "first")


def test_missing_keyring_is_refused_and_nothing_is_written(tmp_path: Path):
    data = tmp_path / "data"
    _written(data)
    keyring = data / "master.keyring"
    keyring.rename(tmp_path / "moved-away.keyring")
    before = snapshot(tmp_path)

    with pytest.raises(KeyringMismatch) as refused:
        Store.open(data)

    message = str(refused.value)
    assert "\n" not in message
    assert str(keyring) in message
    assert "missing" in message
    assert "expected master key version 1" in message
    assert "found none" in message
    assert snapshot(tmp_path) == before, "a refused start must write nothing"
    assert not keyring.exists()
    (tmp_path / "moved-away.keyring").rename(keyring)
    with Store.open(data) as store:
        assert _data_of(store, "s1") == b"first"


def test_keyring_of_another_store_is_refused(tmp_path: Path):
    _written(tmp_path / "data")
    _written(tmp_path / "other")
    other_keyring = tmp_path / "other" / "master.keyring"
    before = snapshot(tmp_path)

    with pytest.raises(KeyringMismatch) as refused:
        Store.open(tmp_path / "data", StoreOptions(keyring_path=other_keyring))

    message = str(refused.value)
    assert str(other_keyring) in message
    assert "different key" in message
    assert "expected master key version 1, found 1" in message
    assert snapshot(tmp_path) == before


def test_keyring_lacking_a_version_in_use_is_refused(tmp_path: Path):
    data = tmp_path / "data"
    _written(data)
    old_keyring = tmp_path / "old.keyring"
    shutil.copy2(data / "master.keyring", old_keyring)
    with Store.open(data) as store:
        store.writer.execute(RotateCommand())  # version 2 now wraps every key
        _append(store, "s2", "second")
    before = snapshot(tmp_path)

    with pytest.raises(KeyringMismatch) as refused:
        Store.open(data, StoreOptions(keyring_path=old_keyring))

    message = str(refused.value)
    assert "lacks" in message
    assert "expected master key versions 1, 2, found 1" in message
    assert snapshot(tmp_path) == before
    with Store.open(data) as store:
        assert _data_of(store, "s1") == b"first"
        assert _data_of(store, "s2") == b"second"


def test_an_s2_append_can_never_land_under_a_replacement_keyring(tmp_path: Path):
    """The issue's reproduction: s1 written, keyring moved away, a restart, an
    append of s2, the original keyring back. Both must be readable in the end,
    which needs the restart without the keyring to be refused."""
    data = tmp_path / "data"
    _written(data)
    (data / "master.keyring").rename(tmp_path / "kept.keyring")
    with pytest.raises(KeyringMismatch):
        Store.open(data)
    (tmp_path / "kept.keyring").rename(data / "master.keyring")
    with Store.open(data) as store:
        _append(store, "s2", "second")
    with Store.open(data) as store:
        assert _data_of(store, "s1") == b"first"
        assert _data_of(store, "s2") == b"second"


def test_fresh_directory_gets_a_new_keyring_and_records_its_check_value(tmp_path: Path):
    data = tmp_path / "data"

    with Store.open(data) as store:
        recorded = store.keys.check_values()
        keyring = FileKeyring(data / "master.keyring")

    assert recorded == {1: keyring.check_value(1)}
    assert keyring.check_value(1) not in (data / "master.keyring").read_bytes()


def test_keyring_outside_the_directory_is_created_only_for_a_fresh_directory(tmp_path: Path):
    data, keyring = tmp_path / "data", tmp_path / "secrets" / "master.keyring"
    with Store.open(data, StoreOptions(keyring_path=keyring)) as store:
        _append(store, "s1", "first")
    keyring.unlink()
    before = snapshot(tmp_path)

    with pytest.raises(KeyringMismatch, match="missing"):
        Store.open(data, StoreOptions(keyring_path=keyring))

    assert snapshot(tmp_path) == before


def test_started_but_empty_directory_still_needs_its_keyring(tmp_path: Path):
    """Recorded check values make a directory non-fresh even before its first event."""
    data = tmp_path / "data"
    Store.open(data).close()
    (data / "master.keyring").unlink()

    with pytest.raises(KeyringMismatch, match="missing"):
        Store.open(data)


class _ProviderStore:
    """The same start-up checks with a key provider that is not the file keyring."""

    def test_other_provider_is_refused_and_nothing_is_written(self, tmp_path: Path):
        data = tmp_path / "data"
        provider = MemoryKeyring()
        with Store.open(data, provider=provider) as store:
            _append(store, "s1", "first")
        before = snapshot(tmp_path)

        with pytest.raises(KeyringMismatch) as refused:
            Store.open(data, provider=MemoryKeyring())

        assert "different key" in str(refused.value)
        assert "MemoryKeyring" in str(refused.value)
        assert snapshot(tmp_path) == before
        with Store.open(data, provider=provider) as store:
            assert _data_of(store, "s1") == b"first"

    def test_provider_lacking_a_version_in_use_is_refused(self, tmp_path: Path):
        data = tmp_path / "data"
        provider = MemoryKeyring()
        with Store.open(data, provider=provider) as store:
            _append(store, "s1", "first")
            store.writer.execute(RotateCommand())
        stripped = MemoryKeyring()
        stripped.raw = {1: provider.raw[1]}

        with pytest.raises(KeyringMismatch, match="lacks"):
            Store.open(data, provider=stripped)


class TestMemoryProviderStore(_ProviderStore):
    pass


def test_check_values_follow_rotation_and_shred_epochs(tmp_path: Path):
    data = tmp_path / "data"
    _written(data)
    with Store.open(data) as store:
        store.writer.execute(RotateCommand())
        assert sorted(store.keys.check_values()) == [1, 2]
        _append(store, "gone", "x")
        store.writer.execute(ForgetCommand("gone", "test", "admin"))
        result = store.writer.execute(ShredCommand())
        assert sorted(store.keys.check_values()) == [result.master_version]
        assert store.provider.versions() == [result.master_version]
    with Store.open(data) as store:
        assert _data_of(store, "s1") == b"first"


def test_keyring_from_before_a_shred_epoch_is_refused(tmp_path: Path):
    data = tmp_path / "data"
    _written(data)
    shutil.copy2(data / "master.keyring", tmp_path / "before-shred.keyring")
    with Store.open(data) as store:
        store.writer.execute(ShredCommand())

    with pytest.raises(KeyringMismatch, match="lacks"):
        Store.open(data, StoreOptions(keyring_path=tmp_path / "before-shred.keyring"))


def _forget_check_values(data: Path) -> None:
    """Make *data* look like a directory written before check values existed."""
    env = lmdb.open(str(data / "keys"), max_dbs=16, subdir=True)
    try:
        with env.begin(write=True) as txn:
            for name in (b"master_checks", b"meta"):
                txn.drop(env.open_db(name, txn=txn), delete=True)
    finally:
        env.close()


def test_directory_from_before_check_values_is_checked_by_unwrapping(tmp_path: Path):
    data = tmp_path / "data"
    _written(data)
    _written(tmp_path / "other")
    _forget_check_values(data)
    before = snapshot(tmp_path)

    with pytest.raises(KeyringMismatch, match="different key"):
        Store.open(data, StoreOptions(keyring_path=tmp_path / "other" / "master.keyring"))
    assert snapshot(tmp_path) == before

    with Store.open(data) as store:  # the right keyring: accepted, and recorded from now on
        assert _data_of(store, "s1") == b"first"
        assert sorted(store.keys.check_values()) == [1]


def test_provider_accepts_keys_it_holds_beyond_those_recorded(tmp_path: Path):
    """A crash between creating a master version and recording its check value
    leaves the keyring one version ahead: that must not brick the store."""
    data = tmp_path / "data"
    provider: KeyProvider = MemoryKeyring()
    _written_with = Store.open(data, provider=provider)
    _append(_written_with, "s1", "first")
    _written_with.close()
    provider.create_version()  # as if the process died right after this

    with Store.open(data, provider=provider) as store:
        assert sorted(store.keys.check_values()) == [1, 2]
        assert _data_of(store, "s1") == b"first"


def test_interrupted_shred_epoch_in_a_directory_from_before_check_values_recovers(
    tmp_path: Path,
):
    """An epoch that died after the swap, in a directory without recorded check
    values: start-up must record only the version in use, not the old one the
    rolled-forward epoch destroys, or the next start would refuse the keyring."""
    data = tmp_path / "data"
    with Store.open(data) as store:
        _append(store, "s1", "first")
        # Steps 1-3 of an epoch and its journal, as a process killed at
        # "shred.swapped" leaves them (the writer is idle meanwhile).
        shredder = Shredder(data, store.log, store.keys, store.provider)
        epoch = store.log.meta.shred_epoch + 1
        version = store.provider.create_version()
        store.keys.write_compacted(data / NEXT_KEYS, version)
        store.keys.swap_file(data / NEXT_KEYS / "data.mdb", data / OLD_KEYS_FILE)
        shredder._journal(_Journal(epoch, "swapped", version))
    _forget_check_values(data)

    for _ in range(2):  # the epoch is finished by the first start; the second checks
        with Store.open(data) as store:
            assert _data_of(store, "s1") == b"first"
            assert store.provider.versions() == [2]
            assert sorted(store.keys.check_values()) == [2]
