"""The event record codec: sealing an event into its stored record, and opening it.

A stored record is ``RecordBody || chain hash`` (see :mod:`codec`); its
ciphertext holds the event's data and metadata, sealed under the subject's
key with every clear field of the record as associated data. The writer
seals and the reader opens; both go through this module so that the
associated data is built in one place, and a field bound on one side cannot
be forgotten on the other.

Sealing is the writer's per-event hot path: a :class:`RecordSealer` binds
what is the same for every event of an append (store id, stream id, the
append's time) once, so sealing an event costs one method call on top of
the work itself.
"""

from __future__ import annotations

from lethedb_server.crypto.aead import AESGCM, event_aad
from lethedb_server.engine.model import ProposedEvent
from lethedb_server.storage import codec
from lethedb_server.storage.codec import Payload, RecordBody

_encode = codec.encode
_seal_record = codec.seal_record
_decode_payload = codec.decode_payload
_FORMAT = codec.RECORD_FORMAT


class RecordSealer:
    """Seals the events of one append (one stream, one time) into stored records."""

    __slots__ = ("_recorded_at", "_store_id", "_stream_id")

    def __init__(self, store_id: bytes, stream_id: str, recorded_at: int) -> None:
        self._store_id = store_id
        self._stream_id = stream_id
        self._recorded_at = recorded_at

    def seal(
        self,
        chain: bytes,
        position: int,
        version: int,
        event: ProposedEvent,
        event_id: bytes,
        dek_version: int,
        aead: AESGCM,
        nonce: bytes,
    ) -> tuple[bytes, bytes]:
        """The stored value of *event* at *position* chained after *chain*, and its hash.

        *aead* is the subject's key of *dek_version*; *nonce* must never
        have been used with it (``crypto.new_nonces``).
        """
        stream_id, now = self._stream_id, self._recorded_at
        aad = event_aad(
            self._store_id, position, stream_id, version, event.event_type,
            event.subject_id, event_id, dek_version, event.content_type, now,
        )  # fmt: skip
        body = RecordBody(
            _FORMAT, stream_id, version, event_id, event.event_type,
            event.subject_id, event.content_type, now, dek_version, nonce,
            aead.encrypt(nonce, _encode(Payload(event.data, event.metadata)), aad),
        )  # fmt: skip
        return _seal_record(chain, body)


def open_record(store_id: bytes, position: int, body: RecordBody, aead: AESGCM) -> Payload:
    """The data and metadata sealed in *body*, stored at *position* of store *store_id*.

    Raises ``crypto.InvalidTag`` when the ciphertext or any clear field of
    the record was altered, or the record was moved to another position or
    store; the caller names the position in the error it reports.
    """
    aad = event_aad(
        store_id, position, body.stream_id, body.stream_version, body.event_type,
        body.subject_id, body.event_id, body.dek_version, body.content_type, body.recorded_at,
    )  # fmt: skip
    return _decode_payload(aead.decrypt(body.nonce, body.ciphertext, aad))
