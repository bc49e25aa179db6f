"""Data keys (DEKs): one family per data subject, kept wrapped in ``<data>/keys/``.

A DEK is stored only wrapped by a master key (:mod:`lethedb_server.crypto.keyring`);
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
* ``forgotten``: subject id -> Tombstone (a copy of the log's tombstone)
* ``master_checks``: u32 BE master key version -> its key check value (a MAC
  of a fixed label under the key, never the key): which keys the keyring must
  hold for this store (see :mod:`lethedb_server.engine.custody`)
* ``meta``: ``keys`` -> KeyStoreMeta (the log it belongs to, its commit
  generation, the highest log position it has seen)

Every master key version that wraps a DEK here has its check value here: a
new version's value is recorded before anything is wrapped under it, and a
compacted key store (a shred epoch) holds only the new version's value.

The ``forgotten`` copy exists so that restoring an *old log* backup next to the
current key store cannot bring a forgotten subject back: the key store still
knows the subject is gone, refuses new keys for it and the reader redacts it.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgspec

from lethedb_server.crypto.aead import AESGCM, InvalidTag, fingerprint_key, new_key, wrap_aad
from lethedb_server.crypto.keyring import KeyProvider, MasterKeyUnavailable, WrappedKey
from lethedb_server.errors import DataLoss
from lethedb_server.faults import fault_point
from lethedb_server.storage import codec
from lethedb_server.storage.lmdbenv import LmdbEnv

log = logging.getLogger(__name__)

KEY_DBS = ("deks", "dek_state", "forgotten", "master_checks", "meta")
META_KEY = b"keys"
T = TypeVar("T")
#: Far below NIST's 2**32 random-nonce limit, as SP 800-38D asks.
DEFAULT_MAX_USES = 2**31
#: Subjects whose unwrapped data keys are kept in memory (``dek_cache_size``).
DEFAULT_CACHE_SIZE = 10_000
RESERVE_BLOCK = 4096


class DekState(msgspec.Struct, array_like=True, frozen=True):
    version: int
    reserved: int


_wrapped_decoder = msgspec.msgpack.Decoder(WrappedKey)
_state_decoder = msgspec.msgpack.Decoder(DekState)


#: ``DekState.reserved`` of a version installed from a replication leader: at
#: least any use cap, so a node that leads later starts a new version rather
#: than extend one whose nonce budget the leader spent where it cannot see.
INSTALLED_RESERVED = 2**32


@dataclass(frozen=True, slots=True)
class DataKey:
    """A raw data key (DEK) of a subject: only ever in memory or on the replication stream."""

    subject_id: str
    version: int
    key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(subject_id={self.subject_id!r}, version={self.version})"


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
    #: Derived from DEK version 1 (``crypto.fingerprint_key``) when first needed.
    fingerprint: bytes | None = None


def _consume(keys: _SubjectKeys, subject_id: str) -> tuple[int, AESGCM]:
    """One reserved use of the oldest lease that has any left: (DEK version, cipher)."""
    for lease in keys.leases:
        if lease.used < lease.reserved:
            lease.used += 1
            return lease.version, lease.aead
    raise RuntimeError(f"no reserved key use for subject {subject_id!r}; reserve() first")


class KeyStore:
    """The key store environment plus the cache of unwrapped DEKs."""

    def __init__(
        self,
        path: Path,
        provider: KeyProvider,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
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
        #: Bumped (under the lock) after each install commits, as it may replace a key.
        self._generation = 0
        self._forgotten = self._load_forgotten()
        #: None until the store binds this key store to its log at start-up.
        self.meta: codec.KeyStoreMeta | None = self._load_meta()
        #: The log's head, for the high-water mark each commit records (set by the store).
        self.log_head: Callable[[], int] = lambda: 0
        self.cache_hits = 0
        self.cache_misses = 0

    def close(self) -> None:
        self.lmdb.close()

    # -- encryption side (writer thread only) ---------------------------------

    def reserve(self, demand: Mapping[str, int]) -> None:
        """Make sure every subject in *demand* can encrypt that many more events.

        Creates first DEKs, extends reservations and rolls versions as needed,
        all in one key-store transaction committed (with fsync) before return,
        so the log never references a key that is not durable. A full key
        store map is grown (up to its ceiling, then StorageFull) and retried.
        """
        while True:
            try:
                self._reserve_once(demand)
                return
            except lmdb.MapFullError:
                self.lmdb.grow()

    def _reserve_once(self, demand: Mapping[str, int]) -> None:
        with self._lock:
            # Subjects of the batch being written may not be evicted before
            # take() consumes their reservations.
            self._pinned = frozenset(demand)
            cached = self._cached
            entries = [(s, n, cached(s)) for s, n in demand.items()]
        self._trim()
        txn: lmdb.Transaction | None = None
        try:
            for subject_id, count, keys in entries:
                if not keys.loaded_state:
                    self._load_state(subject_id, keys)
                available = 0
                for lease in keys.leases:
                    available += lease.reserved - lease.used
                while available < count:
                    if txn is None:
                        txn = self.lmdb.begin_write()
                    available += self._extend(txn, subject_id, keys, count - available)
            if txn is not None:
                stamped = self._stamp(txn)
                txn.commit()
                txn = None
                self.meta = stamped
        except BaseException:
            # Nothing planned here is durable: drop it from memory, or a later
            # batch would encrypt under a DEK that the key store never saved.
            with self._lock:
                for subject_id in demand:
                    self._cache.pop(subject_id, None)
            raise
        finally:
            if txn is not None:
                txn.abort()

    def take(self, subject_id: str) -> tuple[int, AESGCM]:
        """Consume one reserved encryption of *subject_id*: (DEK version, cipher)."""
        with self._lock:
            keys = self._cached(subject_id)
        return _consume(keys, subject_id)

    def take_each(self, subject_ids: Sequence[str]) -> list[tuple[int, AESGCM]]:
        """:meth:`take` for every subject of *subject_ids*, in order.

        One lock and one LRU touch per distinct subject instead of per event:
        on the writer's hot path that bookkeeping cost more than the cipher.
        """
        with self._lock:
            cached = self._cached
            entries = {s: cached(s) for s in dict.fromkeys(subject_ids)}
        return [_consume(entries[s], s) for s in subject_ids]

    def _extend(self, txn: lmdb.Transaction, subject_id: str, keys: _SubjectKeys, need: int) -> int:
        """Grow the newest lease or start a new version; return the uses added."""
        latest = keys.leases[-1] if keys.leases else None
        if latest is not None and latest.reserved < self.max_uses:
            new_reserved = min(self.max_uses, latest.reserved + max(need, RESERVE_BLOCK))
            added = new_reserved - latest.reserved
            latest.reserved = new_reserved
            self._put_state(txn, subject_id, latest)
            return added
        version = self._next_version(txn, subject_id, latest.version if latest else 0)
        dek = new_key()
        wrapped = self.provider.wrap(dek, functools.partial(wrap_aad, subject_id, version))
        txn.put(codec.dek_key(subject_id, version), codec.encode(wrapped), db=self.lmdb.dbs["deks"])
        aead = AESGCM(dek)
        if version == 1:
            keys.fingerprint = fingerprint_key(dek)
        del dek
        lease = _Lease(version, aead, 0, min(self.max_uses, max(need, RESERVE_BLOCK)))
        keys.leases = [lease_ for lease_ in keys.leases if lease_.used < lease_.reserved]
        keys.leases.append(lease)
        keys.aeads[version] = aead
        self._put_state(txn, subject_id, lease)
        return lease.reserved

    def _next_version(self, txn: lmdb.Transaction, subject_id: str, after: int = 0) -> int:
        """The version a new DEK of *subject_id* takes: above *after*, ``dek_state``
        and every version held.

        Versions are numbered per leader, so this node may hold a key under a
        number its ``dek_state`` does not name (one installed, or made for a
        tail it discarded); a new key under that number would give one
        version two keys across the cluster.
        """
        raw = txn.get(subject_id.encode(), db=self.lmdb.dbs["dek_state"])
        if raw is not None:
            after = max(after, _state_decoder.decode(raw).version)
        prefix = codec.dek_key(subject_id, 0)[:-4]
        cursor = txn.cursor(db=self.lmdb.dbs["deks"])
        if cursor.set_range(prefix):
            for key in cursor.iternext(values=False):
                if not bytes(key).startswith(prefix):
                    break
                after = max(after, codec.dek_version_from_key(key))
        return after + 1

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
        if subject_id in self._forgotten:
            return None
        with self._lock:
            keys = self._cached(subject_id)
            aead = keys.aeads.get(version)
            if aead is not None:
                self.cache_hits += 1
                return aead
            self.cache_misses += 1
            generation = self._generation
        aead = self._unwrap(subject_id, version)
        if aead is not None:
            with self._lock:
                # An install that committed meanwhile may have replaced the key
                # just read: use it for this read, never cache it.
                if generation == self._generation:
                    self._cached(subject_id).aeads[version] = aead
            self._trim()
        return aead

    def fingerprint_keys(self, subject_ids: Iterable[str]) -> list[bytes]:
        """The fingerprint key of each of *subject_ids*, in order (writer thread).

        Derived from the subject's DEK version 1 and cached beside its
        ciphers, so a request costs a dictionary lookup per distinct subject.
        Call it after :meth:`reserve` for the same subjects (which creates a
        new subject's version 1) and only for subjects that are not forgotten:
        a forgotten subject has no key any more, which is the point.
        """
        found: list[bytes] = []
        missed = False
        cache = self._cache
        for subject_id in subject_ids:
            # No lock and no LRU touch when cached: reserve() just touched and
            # pinned the subject; a lookup in a dict is atomic.
            keys = cache.get(subject_id)
            key = None if keys is None else keys.fingerprint
            if key is None:
                with self._lock:
                    keys = self._cached(subject_id)
                key = keys.fingerprint = self._derive_fingerprint_key(subject_id)
                missed = True
            found.append(key)
        if missed:
            self._trim()
        return found

    def _derive_fingerprint_key(self, subject_id: str) -> bytes:
        dek = None if subject_id in self._forgotten else self._unwrap_raw(subject_id, 1)
        if dek is None:
            raise DataLoss(
                f"version 1 of the key of subject {subject_id!r} is not in the key store, so a "
                "request naming the subject cannot be fingerprinted for idempotency"
            )
        key = fingerprint_key(dek)
        del dek
        return key

    def _unwrap(self, subject_id: str, version: int) -> AESGCM | None:
        dek = self._unwrap_raw(subject_id, version)
        return None if dek is None else AESGCM(dek)

    def _unwrap_raw(self, subject_id: str, version: int) -> bytes | None:
        with self.lmdb.read() as txn:
            raw = txn.get(codec.dek_key(subject_id, version), db=self.lmdb.dbs["deks"])
        if raw is None:
            return None
        wrapped = _wrapped_decoder.decode(raw)
        try:
            return self.provider.unwrap(
                wrapped, wrap_aad(subject_id, version, wrapped.master_version)
            )
        except (InvalidTag, MasterKeyUnavailable) as exc:
            raise DataLoss(
                f"the key of subject {subject_id!r} version {version} cannot be unwrapped "
                f"under master key version {wrapped.master_version}: {type(exc).__name__}"
            ) from exc

    # -- replication ------------------------------------------------------------

    def raw_keys(self, pairs: Iterable[tuple[str, int]]) -> list[DataKey]:
        """The raw keys of (subject, version) *pairs* that exist (a leader sending them).

        Forgotten subjects and versions not held are left out. The raw keys are
        returned, never written anywhere.
        """
        found: list[DataKey] = []
        for subject_id, version in pairs:
            if subject_id in self._forgotten:
                continue
            dek = self._unwrap_raw(subject_id, version)
            if dek is not None:
                found.append(DataKey(subject_id, version, dek))
        return found

    def install(self, keys: Sequence[DataKey]) -> int:
        """Keep a leader's data keys, wrapped at once under this node's master key.

        One key-store transaction, committed with fsync before return (the log
        transaction that needs them commits after). Forgotten subjects are
        skipped (their keys must never come back); a version already held
        with the same key is skipped. **The leader's key wins**: a version
        held with another key (made by this node for a tail it discarded, as
        versions are numbered per leader) is replaced, because every record
        this node holds was sealed under the leader's key for its version (a
        follower's log is the leader's log; see docs/ARCHITECTURE.md,
        "Failover"). Each installed subject's ``dek_state`` keeps the highest
        version this node ever held and is marked spent (see
        :data:`INSTALLED_RESERVED`), so should this node lead it starts a
        version above all of them. Every cached cipher and lease of an
        installed subject is dropped. Returns how many keys were installed.
        """
        wanted = [k for k in keys if k.subject_id not in self._forgotten]
        if not wanted:
            return 0

        def put(txn: lmdb.Transaction) -> list[str]:
            return [k.subject_id for k in wanted if self._install_one(txn, k)]

        installed = self._write(put)
        with self._lock:
            # A cached "no such version", stale cipher or lease goes; a reader
            # that unwrapped before this commit caches nothing (see cipher()).
            self._generation += 1
            for subject_id in installed:
                self._cache.pop(subject_id, None)
        return len(installed)

    def _install_one(self, txn: lmdb.Transaction, key: DataKey) -> bool:
        """Put one leader key in *txn* unless the same key is held; True if put."""
        deks, states = self.lmdb.dbs["deks"], self.lmdb.dbs["dek_state"]
        dek_key = codec.dek_key(key.subject_id, key.version)
        held = txn.get(dek_key, db=deks)
        if held is not None and self._holds_same(key, bytes(held)):
            return False
        if held is not None:
            log.warning(
                "replaced data key version %d of a subject with the leader's: this node "
                "made its own for a tail it discarded (the old one is destroyed at the next "
                "shred epoch)", key.version,
            )  # fmt: skip
        aad = functools.partial(wrap_aad, key.subject_id, key.version)
        txn.put(dek_key, codec.encode(self.provider.wrap(key.key, aad)), db=deks)
        raw_state = txn.get(key.subject_id.encode(), db=states)
        latest = 0 if raw_state is None else _state_decoder.decode(raw_state).version
        state = DekState(max(latest, key.version), INSTALLED_RESERVED)
        txn.put(key.subject_id.encode(), codec.encode(state), db=states)
        return True

    def _holds_same(self, key: DataKey, held: bytes) -> bool:
        """Whether the wrapped key *held* is *key*'s (one this node cannot unwrap is not)."""
        wrapped = _wrapped_decoder.decode(held)
        try:
            dek = self.provider.unwrap(
                wrapped, wrap_aad(key.subject_id, key.version, wrapped.master_version)
            )
        except (InvalidTag, MasterKeyUnavailable):
            return False
        return hmac.compare_digest(dek, key.key)

    def rebind(self, store_id: bytes) -> None:
        """Bind this key store to the log of store *store_id* (an empty follower adopting it)."""
        if self.meta is not None:
            self.record_checks([], msgspec.structs.replace(self.meta, store_id=store_id))

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

    # -- erasure ----------------------------------------------------------------

    def _load_forgotten(self) -> set[str]:
        with self.lmdb.read() as txn:
            return {
                bytes(k).decode()
                for k in txn.cursor(db=self.lmdb.dbs["forgotten"]).iternext(values=False)
            }

    def is_forgotten(self, subject_id: str) -> bool:
        return subject_id in self._forgotten

    def forgotten_tombstone(self, subject_id: str) -> codec.Tombstone | None:
        """The key store's copy of a subject's tombstone, if it was forgotten."""
        with self.lmdb.read() as txn:
            raw = txn.get(subject_id.encode(), db=self.lmdb.dbs["forgotten"])
        return None if raw is None else codec.decode_tombstone(raw)

    def forgotten_subjects(self) -> frozenset[str]:
        return frozenset(self._forgotten)

    def forget(self, tombstones: Mapping[str, codec.Tombstone]) -> int:
        """Delete every DEK version of each subject and remember it as forgotten.

        Returns how many wrapped DEK entries were deleted. The subjects are
        refused and redacted from the moment this is called, before the
        deletion commits, so no reader can race the erasure.
        """
        if not tombstones:
            return 0
        self._forgotten.update(tombstones)
        for subject_id in tombstones:
            self.evict(subject_id)
        deks, state, forgotten = (self.lmdb.dbs[n] for n in ("deks", "dek_state", "forgotten"))

        def delete(txn: lmdb.Transaction) -> int:
            # LMDB copies every page it changes, so even deleting needs map room.
            deleted = 0
            for subject_id, tombstone in tombstones.items():
                prefix = codec.dek_key(subject_id, 0)[:-4]
                cursor = txn.cursor(db=deks)
                cursor.set_range(prefix)
                while bytes(cursor.key()).startswith(prefix) and cursor.delete():
                    deleted += 1
                txn.delete(subject_id.encode(), db=state)
                txn.put(subject_id.encode(), codec.encode(tombstone), db=forgotten)
            return deleted

        return self._write(delete)

    def subject_count(self, *, excluding: str) -> int:
        """How many subjects hold data keys, not counting the subject *excluding*.

        The store passes its own key's subject (that of subject-less events),
        which is not a data subject.
        """
        with self.lmdb.read() as txn:
            state = self.lmdb.dbs["dek_state"]
            subjects = int(txn.stat(state)["entries"])
            return subjects - (txn.get(excluding.encode(), db=state) is not None)

    def dek_entries(self) -> int:
        with self.lmdb.read() as txn:
            return int(txn.stat(self.lmdb.dbs["deks"])["entries"])

    def write_compacted(self, path: Path, master_version: int) -> int:
        """Write a fresh key store at *path* with every live DEK re-wrapped.

        Live means not forgotten. Each DEK is unwrapped under its old master
        version and wrapped under *master_version* (the new current one). The
        new environment is written from empty, so it holds no free pages with
        stale data. Returns the number of DEKs written.
        """
        target = LmdbEnv(
            path,
            KEY_DBS,
            map_size=max(self.lmdb.map_size(), 1 << 20),
            max_map_size=self.lmdb.max_map_size,
        )
        written = 0
        try:
            chunk: list[tuple[bytes, bytes, str]] = []
            with self.lmdb.read() as source:
                for key, value in source.cursor(db=self.lmdb.dbs["deks"]):
                    raw_key = bytes(key)
                    subject_id = _subject_of(raw_key)
                    if subject_id in self._forgotten:
                        continue
                    chunk.append((raw_key, bytes(value), subject_id))
                state = [
                    (bytes(k), bytes(v))
                    for k, v in source.cursor(db=self.lmdb.dbs["dek_state"])
                    if bytes(k).decode() not in self._forgotten
                ]
                forgotten = [
                    (bytes(k), bytes(v)) for k, v in source.cursor(db=self.lmdb.dbs["forgotten"])
                ]
            for start in range(0, len(chunk), 10_000):
                self._rewrap_into(target, chunk[start : start + 10_000], master_version)
                written += len(chunk[start : start + 10_000])

            check = self.provider.check_value(master_version)

            def put_rest(txn: lmdb.Transaction) -> None:
                for k, v in state:
                    txn.put(k, v, db=target.dbs["dek_state"])
                for k, v in forgotten:
                    txn.put(k, v, db=target.dbs["forgotten"])
                # Only the new version: every other one is destroyed once this is swapped in.
                checks_db = target.dbs["master_checks"]
                txn.put(codec.master_check_key(master_version), check, db=checks_db)
                self._stamp(txn, db=target.dbs["meta"])

            target.write(put_rest)
        finally:
            target.close()
        return written

    def _rewrap_into(
        self, target: LmdbEnv, chunk: list[tuple[bytes, bytes, str]], master_version: int
    ) -> None:
        def put(txn: lmdb.Transaction) -> None:
            for raw_key, value, _ in chunk:
                if self.provider.current_version() != master_version:
                    raise RuntimeError("the master key version changed during a shred epoch")
                txn.put(
                    raw_key, self._rewrapped(raw_key, value), db=target.dbs["deks"], append=True
                )

        target.write(put)

    def _rewrapped(self, raw_key: bytes, value: bytes) -> bytes:
        """A stored DEK entry unwrapped and wrapped again under the current master version."""
        subject_id = _subject_of(raw_key)
        version = codec.dek_version_from_key(raw_key)
        wrapped = _wrapped_decoder.decode(value)
        dek = self.provider.unwrap(wrapped, wrap_aad(subject_id, version, wrapped.master_version))
        rewrapped = self.provider.wrap(dek, functools.partial(wrap_aad, subject_id, version))
        return codec.encode(rewrapped)

    def rotate(self) -> tuple[int, int]:
        """Re-wrap every live DEK under a new master key version, in place.

        Older master versions are kept, so a crash half-way leaves every key
        readable (some wrapped by the old version, some by the new); destroying
        old versions is a shred epoch's job. Returns (new version, keys re-wrapped).
        """
        master_version = self.provider.create_version()
        fault_point("rotate.new_master_key")
        self.record_checks([master_version])
        deks = self.lmdb.dbs["deks"]
        with self.lmdb.read() as source:
            entries = [(bytes(k), bytes(v)) for k, v in source.cursor(db=deks)]
        for start in range(0, len(entries), 10_000):
            chunk = entries[start : start + 10_000]

            def put(txn: lmdb.Transaction, chunk: list[tuple[bytes, bytes]] = chunk) -> None:
                for raw_key, value in chunk:
                    txn.put(raw_key, self._rewrapped(raw_key, value), db=deks)

            self._write(put)
        return master_version, len(entries)

    def swap_file(self, new_data_file: Path, old_copy: Path) -> None:
        """Atomically make *new_data_file* this key store's ``data.mdb``.

        The old file stays reachable as *old_copy* (a hard link) so the caller
        can overwrite its bytes before removing it.
        """
        self.lmdb.replace_data_file(new_data_file, old_copy)
        self.meta = self._load_meta()

    # -- custody: check values and high-water marks -------------------------------

    def _load_meta(self) -> codec.KeyStoreMeta | None:
        with self.lmdb.read() as txn:
            raw = txn.get(META_KEY, db=self.lmdb.dbs["meta"])
        return None if raw is None else codec.decode_key_meta(raw)

    def check_values(self) -> dict[int, bytes]:
        """The recorded key check value of every master key version this store uses."""
        with self.lmdb.read() as txn:
            return {
                int.from_bytes(bytes(k), "big"): bytes(v)
                for k, v in txn.cursor(db=self.lmdb.dbs["master_checks"])
            }

    def record_checks(
        self, versions: Sequence[int], meta: codec.KeyStoreMeta | None = None
    ) -> None:
        """Record the check values of *versions* (and *meta*, if given) in one commit.

        Called before anything is wrapped under a new version, so every
        version that wraps a key here has its value here.
        """
        checks = {v: self.provider.check_value(v) for v in versions}
        db = self.lmdb.dbs["master_checks"]

        def put(txn: lmdb.Transaction) -> None:
            for version, check in checks.items():
                txn.put(codec.master_check_key(version), check, db=db)
            if meta is not None:
                txn.put(META_KEY, codec.encode(meta), db=self.lmdb.dbs["meta"])

        if meta is not None:
            self.meta = meta
        self._write(put)

    def lower_log_position(self, position: int) -> None:
        """Record that the log now ends at *position*, below what this key store has seen.

        Only a truncation of the log's unacknowledged tail (a deposed leader
        rejoining) moves the high-water mark down; done before the log is
        truncated, so a crash in between leaves a log ahead of its key store
        (normal), never one behind it (a restored log, refused at start-up).
        """
        current = self.meta
        if current is None or current.log_position <= position:
            return
        meta = msgspec.structs.replace(
            current, generation=current.generation + 1, log_position=position
        )
        self.lmdb.write(lambda txn: txn.put(META_KEY, codec.encode(meta), db=self.lmdb.dbs["meta"]))
        self.meta = meta

    def mark_position(self) -> None:
        """Record the log's head as seen (a clean close does this last)."""
        self._write(lambda txn: None)

    def _write(self, apply: Callable[[lmdb.Transaction], T]) -> T:
        """:meth:`LmdbEnv.write` that also stamps the meta (generation, log position)."""

        def stamped(txn: lmdb.Transaction) -> tuple[T, codec.KeyStoreMeta | None]:
            return apply(txn), self._stamp(txn)

        result, meta = self.lmdb.write(stamped)
        self.meta = meta
        return result

    def _stamp(self, txn: lmdb.Transaction, db: Any = None) -> codec.KeyStoreMeta | None:
        """Put the next meta (one more commit, the log head as seen) in *txn*; return it."""
        if self.meta is None:
            return None
        meta = msgspec.structs.replace(
            self.meta,
            generation=self.meta.generation + 1,
            log_position=max(self.meta.log_position, self.log_head()),
        )
        txn.put(META_KEY, codec.encode(meta), db=db if db is not None else self.lmdb.dbs["meta"])
        return meta


def _subject_of(dek_key: bytes) -> str:
    length = int.from_bytes(dek_key[:4], "big")
    return dek_key[4 : 4 + length].decode()
