"""Master keys (KEKs): the :class:`KeyProvider` interface and the file keyring.

A key provider wraps and unwraps data keys; it never hands out a master key.
That is what lets a KMS stand behind the same interface later. Versions only
grow: a new version becomes current, and destroying a version (at a shred
epoch) makes every DEK copy wrapped under it unreadable for good.

The file keyring is one small JSON document, mode 0600, rewritten atomically
(temporary file, fsync, rename, fsync of the directory) so a crash leaves
either the old or the new keyring, never a torn one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import msgspec

from lethedb_server.crypto.aead import AESGCM, NONCE_SIZE, InvalidTag, new_key, new_nonce
from lethedb_server.errors import DataDirDamaged, LetheError
from lethedb_server.files import make_private_dir, write_atomically

KEYRING_FORMAT = 1
#: Domain separation of key check values: this MAC input is used for nothing else.
KEY_CHECK_LABEL = b"lethedb.master-key-check.v1\x00"


def key_check_value(key: bytes, version: int) -> bytes:
    """HMAC-SHA256 of a fixed label and the version under *key*.

    It tells which key a version holds without revealing anything of it, so
    the data directory can record it (see :mod:`lethedb_server.engine.custody`) and
    a keyring holding another key under the same version number is caught
    before anything is read or written with it.
    """
    return hmac.new(key, KEY_CHECK_LABEL + version.to_bytes(4, "big"), hashlib.sha256).digest()


class MasterKeyUnavailable(LetheError):
    """The master key version needed to unwrap a DEK does not exist (any more)."""


class WrappedKey(msgspec.Struct, array_like=True, frozen=True):
    """A DEK sealed under a master key version."""

    master_version: int
    nonce: bytes
    ciphertext: bytes


class KeyProvider(ABC):
    """Holds versioned master keys and wraps data keys under them."""

    @abstractmethod
    def current_version(self) -> int: ...

    @abstractmethod
    def versions(self) -> list[int]:
        """Every version that still exists, oldest first."""

    @abstractmethod
    def wrap(self, plaintext: bytes, aad_for: Callable[[int], bytes]) -> WrappedKey:
        """Seal *plaintext* under the current version; *aad_for* gives the AAD for a version."""

    @abstractmethod
    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Open *wrapped*; raise :class:`MasterKeyUnavailable` or ``InvalidTag``."""

    @abstractmethod
    def check_value(self, version: int) -> bytes:
        """A key check value of *version*: a MAC of a fixed label under that key.

        Equal for the same key, different for any other; never the key nor
        anything it can be derived from. Raise :class:`MasterKeyUnavailable`
        for a version the provider does not hold. A KMS-backed provider can
        compute it with the KMS's MAC operation, or keep it beside the key.
        """

    @abstractmethod
    def create_version(self) -> int:
        """Create a new master key version, make it current and persist; return it."""

    @abstractmethod
    def destroy_version(self, version: int) -> None:
        """Destroy *version* durably. The current version cannot be destroyed."""


class _KeyringFile(msgspec.Struct):
    format: int
    current: int
    keys: dict[str, str]


class FileKeyring(KeyProvider):
    """Master keys in a local file (mode 0600), one AES-256 key per version."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: dict[int, AESGCM] = {}
        self._raw: dict[int, bytes] = {}
        self._current = 0
        self._load()

    @classmethod
    def open_or_create(cls, path: Path) -> tuple[FileKeyring, bool]:
        """Open the keyring at *path*, creating it with version 1 if it is missing."""
        created = not path.exists()
        if created:
            make_private_dir(path.parent)
            write_atomically(path, _dump({1: new_key()}, current=1))
        return cls(path), created

    def _load(self) -> None:
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise DataDirDamaged(
                f"master keyring {self.path} is readable by others (mode {mode:o}); "
                f"run: chmod 600 {self.path}"
            )
        try:
            doc = msgspec.json.decode(self.path.read_bytes(), type=_KeyringFile)
            raw = {int(v): base64.b64decode(k, validate=True) for v, k in doc.keys.items()}
        except (msgspec.DecodeError, ValueError) as exc:
            raise DataDirDamaged(f"master keyring {self.path} is unreadable: {exc}") from exc
        if doc.format != KEYRING_FORMAT or doc.current not in raw:
            raise DataDirDamaged(
                f"master keyring {self.path} has format {doc.format} and current version "
                f"{doc.current}, which it does not hold"
            )
        self._raw = raw
        self._keys = {v: AESGCM(k) for v, k in raw.items()}
        self._current = doc.current

    def current_version(self) -> int:
        return self._current

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def wrap(self, plaintext: bytes, aad_for: Callable[[int], bytes]) -> WrappedKey:
        version = self._current
        nonce = new_nonce()
        return WrappedKey(
            version, nonce, self._keys[version].encrypt(nonce, plaintext, aad_for(version))
        )

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        key = self._keys.get(wrapped.master_version)
        if key is None:
            raise MasterKeyUnavailable(
                f"master key version {wrapped.master_version} does not exist "
                "(destroyed at a shred epoch, or never made)"
            )
        if len(wrapped.nonce) != NONCE_SIZE:
            raise InvalidTag()
        return key.decrypt(wrapped.nonce, wrapped.ciphertext, aad)

    def check_value(self, version: int) -> bytes:
        raw = self._raw.get(version)
        if raw is None:
            raise MasterKeyUnavailable(f"master key version {version} is not in {self.path}")
        return key_check_value(raw, version)

    def create_version(self) -> int:
        with self._lock:
            version = max(self._raw) + 1
            raw = {**self._raw, version: new_key()}
            write_atomically(self.path, _dump(raw, current=version))
            self._raw = raw
            self._keys[version] = AESGCM(raw[version])
            self._current = version
            return version

    def destroy_version(self, version: int) -> None:
        with self._lock:
            if version == self._current:
                raise ValueError(f"master key version {version} is current and cannot be destroyed")
            if version not in self._raw:
                return
            raw = {v: k for v, k in self._raw.items() if v != version}
            write_atomically(self.path, _dump(raw, current=self._current))
            self._raw = raw
            self._keys.pop(version, None)


def _dump(raw: dict[int, bytes], current: int) -> bytes:
    doc = _KeyringFile(
        format=KEYRING_FORMAT,
        current=current,
        keys={str(v): base64.b64encode(k).decode() for v, k in sorted(raw.items())},
    )
    return msgspec.json.format(msgspec.json.encode(doc))
