"""Idempotency fingerprints: how a request is fingerprinted, and old entries upgraded.

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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final

import lmdb
import msgspec

from lethedb_server import codec
from lethedb_server.codec import KEYED_DIGEST, IdempotencyEntry
from lethedb_server.crypto import keyed_fingerprint
from lethedb_server.errors import DataLoss
from lethedb_server.faults import fault_point
from lethedb_server.keys import KeyStore
from lethedb_server.model import STORE_SUBJECT
from lethedb_server.storage import META_IDEMPOTENCY_FORMAT, LogStore

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


def upgrade_unkeyed_entries(log_store: LogStore, keys: KeyStore) -> tuple[int, int]:
    """Re-key or drop every unkeyed entry, once; return (re-keyed, dropped).

    Runs at start-up before the writer, in chunks of one write transaction
    each; a crash part-way leaves upgraded and old entries side by side, and
    the next start finishes (an upgraded entry is skipped). The format key in
    the log's meta is written last, so a store that finished never scans again.
    """
    env = log_store.lmdb
    with env.read() as txn:
        raw = txn.get(FORMAT_KEY, db=log_store.meta_db)
        entries = int(txn.stat(log_store.idempotency)["entries"])
    if raw is not None and codec.from_u64(raw) >= KEYED_DIGEST:
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
                    _drop(txn, log_store, key)
                else:
                    txn.put(key, value, db=log_store.idempotency)
            if len(plans) < _CHUNK:
                txn.put(FORMAT_KEY, codec.u64(KEYED_DIGEST), db=log_store.meta_db)

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


def _drop(txn: lmdb.Transaction, log_store: LogStore, key: bytes) -> None:
    """Delete an entry and its expiry index key."""
    old = txn.get(key, db=log_store.idempotency)
    if old is None:
        return
    try:
        created = codec.decode_idempotency(old).created_at
    except msgspec.DecodeError:
        pass  # no expiry key can be found for it; the sweeper skips a missing entry
    else:
        txn.delete(codec.u64(created) + key, db=log_store.idempotency_expiry)
    txn.delete(key, db=log_store.idempotency)


def _unkeyed_chunk(log_store: LogStore, after: bytes) -> list[_Unkeyed]:
    """Up to _CHUNK unkeyed entries after key *after*, with their subjects from the log.

    Subjects are None when an event of the entry is missing from the log.
    Keyed entries are skipped (and not counted), so the scan ends at the table's end.
    """
    found: list[_Unkeyed] = []
    with log_store.lmdb.read() as txn:
        cursor = txn.cursor(db=log_store.idempotency)
        positioned = cursor.set_range(after) if after else cursor.first()
        if positioned and after and bytes(cursor.key()) == after:
            positioned = cursor.next()
        while positioned and len(found) < _CHUNK:
            key, value = bytes(cursor.key()), bytes(cursor.value())
            positioned = cursor.next()
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
            value = txn.get(codec.position_key(position), db=log_store.events)
            if value is None:
                return None
            subjects.setdefault(codec.record_subject(bytes(value)) or STORE_SUBJECT)
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
