"""AES-256-GCM sealing of event payloads and wrapping of data keys.

Pure functions over bytes: no storage, no key management. The associated data
built here binds each ciphertext to its slot, so a ciphertext copied into
another record, another subject or another key version fails to decrypt.

Idempotency fingerprints are keyed here too: a value derived from plaintext
may only reach a file under a key that erasure destroys (see
:func:`keyed_fingerprint`).

NIST SP 800-38D allows at most 2**32 encryptions with random 96-bit nonces
under one key; :mod:`lethedb_server.storage.keys` counts uses and rolls keys well
before that.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
#: The NIST limit for random nonces under one key.
NIST_RANDOM_NONCE_LIMIT: Final = 2**32

__all__ = [
    "AESGCM",
    "KEY_SIZE",
    "NONCE_SIZE",
    "InvalidTag",
    "event_aad",
    "fingerprint_key",
    "keyed_fingerprint",
    "new_key",
    "new_nonce",
    "new_nonces",
    "wrap_aad",
]

_encode = msgspec.msgpack.encode
#: Domain separation: a fingerprint key is never the DEK itself, and a
#: fingerprint is never a hash any other part of LetheDB computes.
_FINGERPRINT_KEY_LABEL: Final = b"lethedb.fingerprint-key.v1"
_FINGERPRINT_PERSON: Final = b"lethedb.fp.v1"
_COMBINED_PERSON: Final = b"lethedb.fpkeys1"


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def new_nonces(count: int) -> list[bytes]:
    """*count* random nonces cut from one ``os.urandom`` call.

    Each is 12 bytes of the kernel CSPRNG, exactly as random as a nonce from
    its own call; one system call per append instead of one per event is
    what the writer's hot path saves.
    """
    raw = os.urandom(NONCE_SIZE * count)
    return [raw[i : i + NONCE_SIZE] for i in range(0, len(raw), NONCE_SIZE)]


def event_aad(
    store_id: bytes,
    position: int,
    stream_id: str,
    stream_version: int,
    event_type: str,
    subject_id: str,
    event_id: bytes,
    dek_version: int,
    content_type: str,
    recorded_at: int,
) -> bytes:
    """Associated data of an event ciphertext: every clear field of its record.

    Binding all of them means a read never returns an altered clear field: a
    flipped byte anywhere in the record fails the tag, not just in the slot.
    """
    return _encode(
        (
            b"lethedb.event.v1",
            store_id,
            position,
            stream_id,
            stream_version,
            event_type,
            subject_id,
            event_id,
            dek_version,
            content_type,
            recorded_at,
        )
    )


def wrap_aad(subject_id: str, dek_version: int, master_version: int) -> bytes:
    """Associated data of a wrapped DEK: whose key it is, which version, under which KEK."""
    return _encode((b"lethedb.dek.v1", subject_id, dek_version, master_version))


def fingerprint_key(dek: bytes) -> bytes:
    """The subject's fingerprint key, derived from its DEK version 1.

    BLAKE2b in keyed mode (a PRF) over a fixed label. Version 1 is the key
    every subject has from its first event until it is forgotten, and never
    rolls over, so a retry fingerprints the same across DEK roll-overs and
    restarts; forgetting and shredding the subject destroys it, and with it
    every way to recompute or check a fingerprint of the subject's requests.
    """
    return hashlib.blake2b(_FINGERPRINT_KEY_LABEL, key=dek, digest_size=32).digest()


def keyed_fingerprint(request_hash: bytes, keys: Sequence[bytes]) -> bytes:
    """The stored fingerprint of a request: its hash MACed under its subjects' keys.

    *request_hash* is an unkeyed hash of the request's plaintext; it must
    never be stored, since a guess at the plaintext can be checked against
    it. The MAC key is the one subject's fingerprint key, or for several
    subjects (in a fixed order) a hash of all of them: once any one of them
    is destroyed the MAC key is unknowable, the stored value is noise, and no
    plaintext guess can be checked against it. Two BLAKE2b calls at most per
    request, however many subjects it names.
    """
    if not keys:
        raise ValueError("a fingerprint needs at least one subject key")
    key = keys[0]
    if len(keys) > 1:
        key = hashlib.blake2b(b"".join(keys), digest_size=32, person=_COMBINED_PERSON).digest()
    return hashlib.blake2b(
        request_hash, key=key, digest_size=32, person=_FINGERPRINT_PERSON
    ).digest()
