"""Idempotency: the table of answered keys, how a request is fingerprinted, old entries upgraded.

An idempotency entry keeps a fingerprint of the request that first used its
key, so that a retry (same request) is answered from the entry and a key
reused for another request is refused. The fingerprint must tell requests
apart, so it is computed from their plaintext data and metadata; stored
unkeyed, it would let anyone with a copy of the log confirm guesses at a
forgotten subject's data (a PIN falls to 10,000 hashes). So what is stored is
the request's hash keyed under the fingerprint key of every subject the
request names (``crypto.keyed_fingerprint``), derived from the subject's DEK
version 1: forgetting and shredding a subject destroys that key, and the
fingerprint becomes noise.

What this module must never do: let an unkeyed request hash reach a file.

Entries written before fingerprints were keyed (``codec.UNKEYED_DIGEST``)
are upgraded once, at start-up, before the writer runs: each is re-keyed
(the old digest *is* the request hash, so a retry still deduplicates), or
dropped when its request names a forgotten subject (a retry answers
SubjectForgotten before any comparison) or its events are not in the log.
LMDB keeps a replaced value's bytes in free pages until it reuses them; see
docs/ERASURE.md for what that means and how to be rid of them.

The table itself (:class:`IdempotencyTable`: look a key up, remember an
answer, sweep expired entries) is used by the writer's appliers, inside the
writer's transactions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Final

import lmdb
import msgspec

from lethedb_server.crypto.aead import keyed_fingerprint
from lethedb_server.engine.model import STORE_SUBJECT
from lethedb_server.errors import DataLoss, IdempotencyConflict
from lethedb_server.faults import fault_point
from lethedb_server.storage import codec
from lethedb_server.storage.codec import KEYED_DIGEST, AppendResult, IdempotencyEntry
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.log import META_IDEMPOTENCY_FORMAT, LogStore

log = logging.getLogger(__name__)

#: Key in the log's ``meta`` database: u64 BE, the digest format every entry
#: of the ``idempotency`` table has (absent: written before keyed digests).
FORMAT_KEY: Final = META_IDEMPOTENCY_FORMAT
#: Entries upgraded per write transaction.
_CHUNK: Final = 2048


def fingerprint(keys: KeyStore, request_hash: bytes, subjects: Iterable[str]) -> bytes:
    """The stored fingerprint of a request naming *subjects* ("" for subject-less events).

    *subjects* in the order they first appear in the request: the request
    hash covers that order, so a retry repeats it (and so does the log, which
    is how start-up and the audit rebuild it). The subjects must have keys:
    call after ``KeyStore.reserve`` and after refusing forgotten subjects. A
    cache lookup per distinct subject and two BLAKE2b calls at most; the
    plaintext was hashed once, in memory, by the caller.
    """
    distinct = dict.fromkeys(s or STORE_SUBJECT for s in subjects)
    return keyed_fingerprint(request_hash, keys.fingerprint_keys(distinct))


class IdempotencyTable:
    """The ``idempotency`` table and its expiry index, within a window of *window_ns*.

    An entry maps a key to the fingerprint of the request that first used it
    and its answer; ``idempotency_expiry`` holds ``u64(created_at) || key``
    for each, so the sweeper deletes the oldest first without a full scan.
    Every method but :meth:`sweep` runs in the caller's write transaction.
    """

    def __init__(self, log_store: LogStore, window_ns: int, sweep_chunk: int) -> None:
        self.log = log_store
        self.window_ns = window_ns
        self.sweep_chunk = sweep_chunk
        #: ``time.monotonic()`` of the last sweep.
        self.last_sweep = 0.0

    def entry(
        self, txn: lmdb.Transaction, key: str, digest: bytes, now: int
    ) -> IdempotencyEntry | None:
        """The live entry stored under *key*; raise if it belongs to another request."""
        entry = self.log.idempotency_entry(txn, key.encode())
        if entry is None:
            return None
        if entry.created_at + self.window_ns < now:
            return None  # expired: the sweeper has not reached it yet
        if entry.digest_format != codec.KEYED_DIGEST:
            return None  # never compared: start-up re-keys or drops unkeyed entries
        if entry.digest != digest:
            raise IdempotencyConflict(key)
        return entry

    def append_result(
        self, txn: lmdb.Transaction, key: str, digest: bytes, now: int
    ) -> AppendResult | None:
        """The answer remembered for an append under *key*, marked deduplicated; or None."""
        entry = self.entry(txn, key, digest, now)
        if entry is None:
            return None
        r = entry.result
        return AppendResult(
            r.first_position, r.last_position, r.first_version, r.last_version,
            r.recorded_at, deduplicated=True,
        )  # fmt: skip

    def remember(
        self,
        txn: lmdb.Transaction,
        key: str,
        digest: bytes,
        result: AppendResult,
        now: int,
        commit: tuple[AppendResult, ...] = (),
    ) -> None:
        """Store the answer to the request fingerprinted *digest* under *key*."""
        entry = IdempotencyEntry(digest, result, now, commit, codec.KEYED_DIGEST)
        self.log.put_idempotency(txn, key.encode(), entry)

    def sweep_due(self, interval_s: float) -> bool:
        return time.monotonic() - self.last_sweep > interval_s

    def sweep(self, now: int) -> int:
        """Delete entries older than the window, a bounded chunk, in its own transaction."""
        self.last_sweep = time.monotonic()
        cutoff = max(0, now - self.window_ns)
        try:
            with self.log.lmdb.begin_write() as txn:
                removed = self.log.expire_idempotency(txn, cutoff, self.sweep_chunk)
        except lmdb.Error as exc:
            log.warning("idempotency sweep skipped: %s", exc)
            return 0
        if removed:
            log.debug("expired %d idempotency keys", removed)
        return removed


def upgrade_unkeyed_entries(log_store: LogStore, keys: KeyStore) -> tuple[int, int]:
    """Re-key or drop every unkeyed entry, once; return (re-keyed, dropped).

    Runs at start-up before the writer, in chunks of one write transaction
    each; a crash part-way leaves upgraded and old entries side by side, and
    the next start finishes (an upgraded entry is skipped). The format key in
    the log's meta is written last, so a store that finished never scans again.
    """
    env = log_store.lmdb
    with env.read() as txn:
        digest_format = log_store.idempotency_format(txn)
        entries = log_store.idempotency_count(txn)
    if digest_format is not None and digest_format >= KEYED_DIGEST:
        return 0, 0
    if entries:
        log.info(
            "upgrading up to %d idempotency entries to keyed fingerprints, once "
            "(about 2.5 s per 100,000 on a small machine)",
            entries,
        )
    rekeyed = dropped = 0
    after = b""
    while True:
        chunk = _unkeyed_chunk(log_store, after)
        plans = [(key, _upgraded(keys, entry, subjects)) for key, entry, subjects in chunk]

        def apply(txn: lmdb.Transaction, plans: list[tuple[bytes, bytes | None]] = plans) -> None:
            for key, value in plans:
                if value is None:
                    log_store.delete_idempotency(txn, key)
                else:
                    log_store.replace_idempotency(txn, key, value)
            if len(plans) < _CHUNK:
                log_store.put_idempotency_format(txn, KEYED_DIGEST)

        env.write(apply)
        fault_point("idempotency.upgrade_chunk_committed")
        rekeyed += sum(1 for _, value in plans if value is not None)
        dropped += sum(1 for _, value in plans if value is None)
        if len(chunk) < _CHUNK:
            break
        after = chunk[-1][0]
    if rekeyed or dropped:
        log.info(
            "idempotency entries upgraded to keyed fingerprints: %d re-keyed, %d dropped "
            "(their requests name forgotten subjects); LMDB keeps the old bytes in free pages "
            "until it reuses them (see docs/ERASURE.md)",
            rekeyed,
            dropped,
        )
    return rekeyed, dropped


#: An unkeyed entry's key, the entry (None: undecodable) and its request's subjects.
_Unkeyed = tuple[bytes, IdempotencyEntry | None, list[str] | None]


def _unkeyed_chunk(log_store: LogStore, after: bytes) -> list[_Unkeyed]:
    """Up to _CHUNK unkeyed entries after key *after*, with their subjects from the log.

    Subjects are None when an event of the entry is missing from the log.
    Keyed entries are skipped (and not counted), so the scan ends at the table's end.
    """
    found: list[_Unkeyed] = []
    with log_store.lmdb.read() as txn:
        for key, value in log_store.idempotency_entries_after(txn, after):
            if len(found) >= _CHUNK:
                break
            try:
                entry = codec.decode_idempotency(value)
            except msgspec.DecodeError:
                found.append((key, None, None))
                continue
            if entry.digest_format == KEYED_DIGEST:
                continue
            found.append((key, entry, _request_subjects(log_store, txn, entry)))
    return found


def _request_subjects(
    log_store: LogStore, txn: lmdb.Transaction, entry: IdempotencyEntry
) -> list[str] | None:
    """The subjects of the events the entry's request wrote, in log (= request) order."""
    subjects: dict[str, None] = {}
    for result in entry.commit or (entry.result,):
        for position in range(result.first_position, result.last_position + 1):
            value = log_store.record_at(txn, position)
            if value is None:
                return None
            subjects.setdefault(codec.record_subject(value) or STORE_SUBJECT)
    return list(subjects)


def _upgraded(
    keys: KeyStore, entry: IdempotencyEntry | None, subjects: list[str] | None
) -> bytes | None:
    """The entry re-keyed, or None to drop it."""
    if entry is None or not subjects or any(keys.is_forgotten(s) for s in subjects):
        return None
    try:
        digest = fingerprint(keys, entry.digest, subjects)
    except DataLoss:
        return None  # a subject without its version 1 key: nothing can deduplicate it
    upgraded = msgspec.structs.replace(entry, digest=digest, digest_format=KEYED_DIGEST)
    return codec.encode(upgraded)
