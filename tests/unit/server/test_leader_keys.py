"""Data keys a follower receives from its leader (``KeyStore.install``).

Data key versions are numbered per leader, so two nodes may each hold a key
for the same (subject, version). A follower's log is the leader's log: the
leader's key wins, and a node that leads later never numbers a new key as a
version it holds. Real key stores on real LMDB directories.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lethedb_server.crypto.aead import AESGCM, new_key
from lethedb_server.crypto.keyring import FileKeyring
from lethedb_server.storage import codec
from lethedb_server.storage.keys import DataKey, KeyStore

NONCE = b"\0" * 12


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    provider, _ = FileKeyring.open_or_create(tmp_path / "master.keyring")
    store = KeyStore(tmp_path / "keys", provider)
    yield store
    store.close()


def sealed_by_own_key(keys: KeyStore, subject: str) -> bytes:
    """Reserve and use one encryption of *subject*, as a leader's writer does."""
    keys.reserve({subject: 1})
    version, aead = keys.take(subject)
    assert version == 1
    return aead.encrypt(NONCE, b"own", None)


def test_a_leaders_key_replaces_a_different_one_held_under_its_version(keys: KeyStore) -> None:
    sealed_by_own_key(keys, "sam")  # cached: a lease and a cipher of this node's version 1
    leaders = DataKey("sam", 1, new_key())
    sealed = AESGCM(leaders.key).encrypt(NONCE, b"leader", None)  # a record the leader wrote

    assert keys.install([leaders]) == 1

    aead = keys.cipher("sam", 1)
    assert aead is not None
    assert aead.decrypt(NONCE, sealed, None) == b"leader"
    assert keys.versions_of("sam") == [1]


def test_the_same_key_again_is_not_installed_twice(keys: KeyStore) -> None:
    leaders = DataKey("sam", 1, new_key())
    assert keys.install([leaders]) == 1
    assert keys.install([leaders]) == 0


def test_a_node_that_leads_after_a_replacement_starts_above_every_version_it_held(
    keys: KeyStore,
) -> None:
    sealed_by_own_key(keys, "sam")
    keys.install([DataKey("sam", 1, new_key())])  # this node's own version 1 replaced

    keys.reserve({"sam": 1})

    assert keys.take("sam")[0] == 2  # never extends nor re-creates version 1
    assert keys.versions_of("sam") == [1, 2]


def test_a_new_version_is_never_one_already_held_whatever_dek_state_says(
    keys: KeyStore,
) -> None:
    keys.install([DataKey("sam", 3, new_key())])
    keys.lmdb.write(lambda txn: txn.delete(b"sam", db=keys.lmdb.dbs["dek_state"]))

    keys.reserve({"sam": 1})

    assert keys.take("sam")[0] == 4


def test_a_forgotten_subjects_key_is_never_installed(keys: KeyStore) -> None:
    tombstone = codec.Tombstone(position=1, forgotten_at=0, reason="asked to", shred_epoch=0)
    keys.forget({"sam": tombstone})

    assert keys.install([DataKey("sam", 1, new_key())]) == 0
    assert keys.versions_of("sam") == []
