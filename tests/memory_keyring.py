"""A :class:`KeyProvider` that keeps its master keys in memory.

It stands for any provider other than the file keyring (a KMS, an HSM): the
shared contract in ``tests/unit/server/test_keyring.py`` runs against it, and the
store's start-up checks are tested with it, so nothing of them depends on the
keyring being a file.
"""

from __future__ import annotations

from collections.abc import Callable

from lethedb_server.crypto.aead import AESGCM, NONCE_SIZE, InvalidTag, new_key, new_nonce
from lethedb_server.crypto.keyring import (
    KeyProvider,
    MasterKeyUnavailable,
    WrappedKey,
    key_check_value,
)


class MemoryKeyring(KeyProvider):
    """Versioned master keys in a dict; one new random key per version."""

    def __init__(self) -> None:
        self.raw: dict[int, bytes] = {1: new_key()}
        self.current = 1

    def current_version(self) -> int:
        return self.current

    def versions(self) -> list[int]:
        return sorted(self.raw)

    def wrap(self, plaintext: bytes, aad_for: Callable[[int], bytes]) -> WrappedKey:
        nonce = new_nonce()
        sealed = AESGCM(self.raw[self.current]).encrypt(nonce, plaintext, aad_for(self.current))
        return WrappedKey(self.current, nonce, sealed)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        key = self.raw.get(wrapped.master_version)
        if key is None:
            raise MasterKeyUnavailable(f"master key version {wrapped.master_version} is gone")
        if len(wrapped.nonce) != NONCE_SIZE:
            raise InvalidTag()
        return AESGCM(key).decrypt(wrapped.nonce, wrapped.ciphertext, aad)

    def check_value(self, version: int) -> bytes:
        if version not in self.raw:
            raise MasterKeyUnavailable(f"master key version {version} is gone")
        return key_check_value(self.raw[version], version)

    def create_version(self) -> int:
        self.current = max(self.raw) + 1
        self.raw[self.current] = new_key()
        return self.current

    def destroy_version(self, version: int) -> None:
        if version == self.current:
            raise ValueError(f"master key version {version} is current and cannot be destroyed")
        self.raw.pop(version, None)
