"""Master keys: the KeyProvider contract, and what the file keyring adds on disk.

``KeyProviderContract`` states what every provider must do; a KMS-backed
provider gets the same tests by subclassing it with its own ``provider``
fixture, as ``TestFileKeyring`` does.
"""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest

from lethedb_server.crypto.aead import AESGCM, InvalidTag, new_key, wrap_aad
from lethedb_server.crypto.keyring import FileKeyring, KeyProvider, MasterKeyUnavailable, WrappedKey
from lethedb_server.errors import DataDirDamaged
from tests.memory_keyring import MemoryKeyring


def aad(version: int) -> bytes:
    return wrap_aad("subject-1", 1, version)


class KeyProviderContract:
    """Behaviour every :class:`KeyProvider` must have."""

    @pytest.fixture
    def provider(self) -> KeyProvider:
        raise NotImplementedError

    def test_wrapped_key_unwraps_to_the_same_bytes(self, provider: KeyProvider):
        dek = new_key()

        wrapped = provider.wrap(dek, aad)

        assert wrapped.master_version == provider.current_version()
        assert dek not in wrapped.ciphertext
        assert provider.unwrap(wrapped, aad(wrapped.master_version)) == dek

    def test_wrap_binds_the_associated_data_of_the_current_version(self, provider: KeyProvider):
        asked: list[int] = []

        def aad_for(version: int) -> bytes:
            asked.append(version)
            return aad(version)

        provider.wrap(new_key(), aad_for)

        assert asked == [provider.current_version()]

    @pytest.mark.parametrize(
        "other_aad",
        [
            wrap_aad("subject-2", 1, 1),  # another subject's slot
            wrap_aad("subject-1", 2, 1),  # another DEK version
            wrap_aad("subject-1", 1, 2),  # another master version
            b"",
        ],
        ids=["other-subject", "other-dek-version", "other-master-version", "empty"],
    )
    def test_unwrap_with_other_associated_data_fails(self, provider: KeyProvider, other_aad: bytes):
        wrapped = provider.wrap(new_key(), lambda version: wrap_aad("subject-1", 1, version))

        with pytest.raises(InvalidTag):
            provider.unwrap(wrapped, other_aad)

    def test_tampered_wrapped_key_fails_to_unwrap(self, provider: KeyProvider):
        wrapped = provider.wrap(new_key(), aad)
        damaged = bytearray(wrapped.ciphertext)
        damaged[0] ^= 0x80

        with pytest.raises(InvalidTag):
            provider.unwrap(
                WrappedKey(wrapped.master_version, wrapped.nonce, bytes(damaged)),
                aad(wrapped.master_version),
            )

    def test_new_version_becomes_current_and_old_wrapped_keys_still_unwrap(
        self, provider: KeyProvider
    ):
        dek = new_key()
        old = provider.wrap(dek, aad)

        version = provider.create_version()

        assert version > old.master_version
        assert provider.current_version() == version
        assert provider.versions() == [old.master_version, version]
        assert provider.wrap(new_key(), aad).master_version == version
        assert provider.unwrap(old, aad(old.master_version)) == dek

    def test_destroyed_version_makes_its_wrapped_keys_unavailable(self, provider: KeyProvider):
        old = provider.wrap(new_key(), aad)
        provider.create_version()

        provider.destroy_version(old.master_version)

        assert old.master_version not in provider.versions()
        with pytest.raises(MasterKeyUnavailable, match=f"version {old.master_version}"):
            provider.unwrap(old, aad(old.master_version))

    def test_current_version_cannot_be_destroyed(self, provider: KeyProvider):
        dek = new_key()
        wrapped = provider.wrap(dek, aad)

        with pytest.raises(ValueError, match="is current"):
            provider.destroy_version(provider.current_version())

        assert provider.unwrap(wrapped, aad(wrapped.master_version)) == dek

    def test_check_value_is_stable_per_version_and_differs_between_versions(
        self, provider: KeyProvider
    ):
        first = provider.current_version()
        second = provider.create_version()

        assert provider.check_value(first) == provider.check_value(first)
        assert len(provider.check_value(first)) >= 16
        assert provider.check_value(first) != provider.check_value(second)

    def test_check_value_tells_two_providers_apart(self, provider: KeyProvider):
        other = MemoryKeyring()

        assert provider.check_value(1) != other.check_value(1)

    def test_check_value_reveals_nothing_that_unwraps(self, provider: KeyProvider):
        """The check value is no key: it does not open what the version wrapped."""
        version = provider.current_version()
        dek = new_key()
        wrapped = provider.wrap(dek, aad)
        check = provider.check_value(version)

        assert dek not in check
        with pytest.raises(InvalidTag):
            AESGCM(check[:32]).decrypt(wrapped.nonce, wrapped.ciphertext, aad(version))

    def test_check_value_of_a_destroyed_or_unknown_version_is_unavailable(
        self, provider: KeyProvider
    ):
        old = provider.current_version()
        provider.create_version()
        provider.destroy_version(old)

        with pytest.raises(MasterKeyUnavailable):
            provider.check_value(old)
        with pytest.raises(MasterKeyUnavailable):
            provider.check_value(99)


class TestMemoryKeyring(KeyProviderContract):
    """The in-memory provider the store's start-up checks are tested with."""

    @pytest.fixture
    def provider(self) -> KeyProvider:
        return MemoryKeyring()


class TestFileKeyring(KeyProviderContract):
    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        return tmp_path / "secrets" / "master.keyring"

    @pytest.fixture
    def provider(self, path: Path) -> FileKeyring:
        keyring, created = FileKeyring.open_or_create(path)
        assert created
        return keyring

    def test_check_value_persists_across_reopen(self, provider: FileKeyring, path: Path):
        before = provider.check_value(1)

        assert FileKeyring(path).check_value(1) == before

    def test_new_keyring_file_has_mode_0600(self, provider: FileKeyring, path: Path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_existing_keyring_is_opened_not_replaced(self, provider: FileKeyring, path: Path):
        dek = new_key()
        wrapped = provider.wrap(dek, aad)

        reopened, created = FileKeyring.open_or_create(path)

        assert not created
        assert reopened.unwrap(wrapped, aad(wrapped.master_version)) == dek

    @pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o606])
    def test_keyring_readable_or_writable_by_others_is_refused(
        self, provider: FileKeyring, path: Path, mode: int
    ):
        path.chmod(mode)

        with pytest.raises(DataDirDamaged, match=f"mode {mode:o}") as refused:
            FileKeyring(path)

        assert f"chmod 600 {path}" in str(refused.value)

    def test_unparseable_keyring_is_refused_as_damaged(self, provider: FileKeyring, path: Path):
        path.write_bytes(b'{"format": 1, "current": 1, "keys": {"1": "not base64!"}}')

        with pytest.raises(DataDirDamaged, match="unreadable"):
            FileKeyring(path)

    def test_keyring_without_its_current_version_is_refused_as_damaged(
        self, provider: FileKeyring, path: Path
    ):
        path.write_bytes(b'{"format": 1, "current": 2, "keys": {}}')

        with pytest.raises(DataDirDamaged, match="current version 2"):
            FileKeyring(path)

    def test_new_and_destroyed_versions_persist_across_reopen(
        self, provider: FileKeyring, path: Path
    ):
        dek = new_key()
        old = provider.wrap(dek, aad)
        provider.create_version()
        newer = provider.wrap(dek, aad)
        provider.create_version()
        provider.destroy_version(old.master_version)

        reopened = FileKeyring(path)

        assert reopened.current_version() == 3
        assert reopened.versions() == [2, 3]
        assert reopened.unwrap(newer, aad(2)) == dek
        with pytest.raises(MasterKeyUnavailable):
            reopened.unwrap(old, aad(1))

    def test_keyring_is_replaced_by_rename_never_rewritten_in_place(
        self, provider: FileKeyring, path: Path
    ):
        inodes = [path.stat().st_ino]

        provider.create_version()
        inodes.append(path.stat().st_ino)
        provider.destroy_version(1)
        inodes.append(path.stat().st_ino)

        # A new inode each time: the file was written aside and renamed over it.
        assert all(before != after for before, after in itertools.pairwise(inodes))
        assert os.listdir(path.parent) == [path.name], "no temporary file is left behind"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
