"""Data keys (DEKs): one family per data subject, kept wrapped in ``<data>/keys/``.

A DEK is stored only wrapped by a master key (:mod:`lethedb_server.keyring`);
the plaintext key lives in memory, in a bounded LRU cache, and nowhere else.
The key store is a separate LMDB environment so that a backup of the log
never carries a key and the key store can be compacted cheaply at a shred
epoch.

Nonce budget: AES-GCM with random nonces is safe for at most 2**32
encryptions per key. Each DEK version has a use cap (configurable, far below
that); uses are *reserved* in blocks and the reservation is made durable
before any ciphertext under it is committed, so a crash can only waste uses,
never reuse them. When a version's cap is reached the subject rolls to a new
version; old versions stay readable until the subject is forgotten.

Databases of the key store:

* ``deks``: length-prefixed subject id + u32 BE version -> WrappedKey
* ``dek_state``: subject id -> DekState (latest version and its reserved uses)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import msgspec

from lethedb_server import codec
from lethedb_server.crypto import AESGCM, InvalidTag, new_key, wrap_aad
from lethedb_server.errors import DataLoss
from lethedb_server.keyring import KeyProvider, MasterKeyUnavailable, WrappedKey
from lethedb_server.lmdbenv import LmdbEnv

KEY_DBS = ("deks", "dek_state")
#: Far below NIST's 2**32 random-nonce limit, as SP 800-38D asks.
DEFAULT_MAX_USES = 2**31
RESERVE_BLOCK = 4096


class DekState(msgspec.Struct, array_like=True, frozen=True):
    version: int
    reserved: int


_wrapped_decoder = msgspec.msgpack.Decoder(WrappedKey)
_state_decoder = msgspec.msgpack.Decoder(DekState)


@dataclass
class _Lease:
    """Encryptions a DEK version may still perform: ``used`` of ``reserved``."""

    version: int
    aead: AESGCM
    used: int
    reserved: int


@dataclass
class _SubjectKeys:
    """What is cached for one subject: opened versions and the encryption leases."""

    aeads: dict[int, AESGCM] = field(default_factory=dict)
    leases: list[_Lease] = field(default_factory=list)
    loaded_state: bool = False


class KeyStore:
    """The key store environment plus the cache of unwrapped DEKs."""

    def __init__(
        self,
        path: Path,
        provider: KeyProvider,
        *,
        cache_size: int = 10_000,
        max_uses: int = DEFAULT_MAX_USES,
        map_size: int = 16 << 20,
        max_map_size: int = 1 << 40,
    ) -> None:
        self.lmdb = LmdbEnv(path, KEY_DBS, map_size=map_size, max_map_size=max_map_size)
        self.provider = provider
        self.cache_size = cache_size
        self.max_uses = max_uses
        self._cache: OrderedDict[str, _SubjectKeys] = OrderedDict()
        self._lock = threading.Lock()
        self._pinned: frozenset[str] = frozenset()
        self.cache_hits = 0
        self.cache_misses = 0

    def close(self) -> None:
        self.lmdb.close()

    # -- encryption side (writer thread only) ---------------------------------

    def reserve(self, demand: Mapping[str, int]) -> None:
        """Make sure every subject in *demand* can encrypt that many more events.

        Creates first DEKs, extends reservations and rolls versions as needed,
        all in one key-store transaction committed (with fsync) before return,
        so the log never references a key that is not durable.
        """
        with self._lock:
            # Subjects of the batch being written may not be evicted before
            # take() consumes their reservations.
            self._pinned = frozenset(demand)
        self._trim()
        txn: lmdb.Transaction | None = None
        try:
            for subject_id, count in demand.items():
                with self._lock:
                    keys = self._cached(subject_id)
                if not keys.loaded_state:
                    self._load_state(subject_id, keys)
                available = sum(lease.reserved - lease.used for lease in keys.leases)
                while available < count:
                    if txn is None:
                        txn = self.lmdb.begin_write()
                    available += self._extend(txn, subject_id, keys, count - available)
            if txn is not None:
                txn.commit()
                txn = None
        finally:
            if txn is not None:
                txn.abort()

    def take(self, subject_id: str) -> tuple[int, AESGCM]:
        """Consume one reserved encryption of *subject_id*: (DEK version, cipher)."""
        with self._lock:
            keys = self._cached(subject_id)
        for lease in keys.leases:
            if lease.used < lease.reserved:
                lease.used += 1
                return lease.version, lease.aead
        raise RuntimeError(f"no reserved key use for subject {subject_id!r}; reserve() first")

    def _extend(self, txn: lmdb.Transaction, subject_id: str, keys: _SubjectKeys, need: int) -> int:
        """Grow the newest lease or start a new version; return the uses added."""
        latest = keys.leases[-1] if keys.leases else None
        if latest is not None and latest.reserved < self.max_uses:
            new_reserved = min(self.max_uses, latest.reserved + max(need, RESERVE_BLOCK))
            added = new_reserved - latest.reserved
            latest.reserved = new_reserved
            self._put_state(txn, subject_id, latest)
            return added
        version = latest.version + 1 if latest is not None else self._next_version(txn, subject_id)
        dek = new_key()
        wrapped = self.provider.wrap(dek, lambda mv: wrap_aad(subject_id, version, mv))
        txn.put(codec.dek_key(subject_id, version), codec.encode(wrapped), db=self.lmdb.dbs["deks"])
        aead = AESGCM(dek)
        del dek
        lease = _Lease(version, aead, 0, min(self.max_uses, max(need, RESERVE_BLOCK)))
        keys.leases = [lease_ for lease_ in keys.leases if lease_.used < lease_.reserved]
        keys.leases.append(lease)
        keys.aeads[version] = aead
        self._put_state(txn, subject_id, lease)
        return lease.reserved

    def _next_version(self, txn: lmdb.Transaction, subject_id: str) -> int:
        raw = txn.get(subject_id.encode(), db=self.lmdb.dbs["dek_state"])
        return 1 if raw is None else _state_decoder.decode(raw).version + 1

    def _put_state(self, txn: lmdb.Transaction, subject_id: str, lease: _Lease) -> None:
        txn.put(
            subject_id.encode(),
            codec.encode(DekState(lease.version, lease.reserved)),
            db=self.lmdb.dbs["dek_state"],
        )

    def _load_state(self, subject_id: str, keys: _SubjectKeys) -> None:
        """Resume the newest version; uses reserved before a restart count as spent."""
        with self.lmdb.read() as txn:
            raw = txn.get(subject_id.encode(), db=self.lmdb.dbs["dek_state"])
        keys.loaded_state = True
        if raw is None:
            return
        state = _state_decoder.decode(raw)
        aead = self.cipher(subject_id, state.version)
        if aead is not None:
            keys.leases = [_Lease(state.version, aead, state.reserved, state.reserved)]

    # -- decryption side (any thread) -----------------------------------------

    def cipher(self, subject_id: str, version: int) -> AESGCM | None:
        """The cipher of one DEK version, or None when it no longer exists."""
        with self._lock:
            keys = self._cached(subject_id)
            aead = keys.aeads.get(version)
            if aead is not None:
                self.cache_hits += 1
                return aead
            self.cache_misses += 1
        aead = self._unwrap(subject_id, version)
        if aead is not None:
            with self._lock:
                self._cached(subject_id).aeads[version] = aead
            self._trim()
        return aead

    def _unwrap(self, subject_id: str, version: int) -> AESGCM | None:
        with self.lmdb.read() as txn:
            raw = txn.get(codec.dek_key(subject_id, version), db=self.lmdb.dbs["deks"])
        if raw is None:
            return None
        wrapped = _wrapped_decoder.decode(raw)
        try:
            return AESGCM(
                self.provider.unwrap(wrapped, wrap_aad(subject_id, version, wrapped.master_version))
            )
        except (InvalidTag, MasterKeyUnavailable) as exc:
            raise DataLoss(
                f"the key of subject {subject_id!r} version {version} cannot be unwrapped "
                f"under master key version {wrapped.master_version}: {type(exc).__name__}"
            ) from exc

    # -- cache ----------------------------------------------------------------

    def _cached(self, subject_id: str) -> _SubjectKeys:
        """The subject's cache entry, created if absent (caller holds the lock)."""
        keys = self._cache.get(subject_id)
        if keys is None:
            keys = self._cache[subject_id] = _SubjectKeys()
        else:
            self._cache.move_to_end(subject_id)
        return keys

    def _trim(self) -> None:
        with self._lock:
            while len(self._cache) > self.cache_size:
                oldest = next(iter(self._cache))
                if oldest in self._pinned:
                    break
                del self._cache[oldest]

    def evict(self, subject_id: str) -> None:
        with self._lock:
            self._cache.pop(subject_id, None)

    def versions_of(self, subject_id: str) -> list[int]:
        """Every stored DEK version of a subject."""
        prefix = codec.dek_key(subject_id, 0)[:-4]
        with self.lmdb.read() as txn:
            cursor = txn.cursor(db=self.lmdb.dbs["deks"])
            found: list[int] = []
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not bytes(key).startswith(prefix):
                        break
                    found.append(codec.dek_version_from_key(key))
            return found
