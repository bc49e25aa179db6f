"""The record codec: what the writer seals, the reader opens, and only there."""

from __future__ import annotations

import pytest

from lethedb_server.crypto.aead import AESGCM, InvalidTag, new_key, new_nonce
from lethedb_server.engine.model import ProposedEvent
from lethedb_server.engine.record_codec import RecordSealer, open_record
from lethedb_server.storage import codec

STORE_ID = bytes(range(16))
EVENT_ID = bytes(16)
EVENT = ProposedEvent(EVENT_ID, "OrderPlaced", "subject-1", "application/json", b"{}", b"m")


def sealed(aead: AESGCM, position: int = 7) -> tuple[bytes, bytes]:
    sealer = RecordSealer(STORE_ID, "order-1", 1_700_000_000)
    return sealer.seal(codec.GENESIS_HASH, position, 3, EVENT, EVENT_ID, 2, aead, new_nonce())


def test_a_sealed_record_opens_to_its_data_with_every_clear_field_as_sealed():
    aead = AESGCM(new_key())
    value, chain = sealed(aead)
    body = codec.decode_record(value)
    payload = open_record(STORE_ID, 7, body, aead)
    assert (payload.data, payload.metadata) == (b"{}", b"m")
    assert (body.stream_id, body.stream_version, body.subject_id) == ("order-1", 3, "subject-1")
    assert (body.recorded_at, body.dek_version, body.event_id) == (1_700_000_000, 2, EVENT_ID)
    assert chain == codec.chain_hash(codec.GENESIS_HASH, value[: -codec.HASH_SIZE])


def test_a_record_opened_at_another_position_or_store_or_with_a_changed_field_fails():
    aead = AESGCM(new_key())
    body = codec.decode_record(sealed(aead)[0])
    with pytest.raises(InvalidTag):
        open_record(STORE_ID, 8, body, aead)
    with pytest.raises(InvalidTag):
        open_record(bytes(16), 7, body, aead)
    changed = codec.RecordBody(
        body.format, body.stream_id, body.stream_version, body.event_id, "OrderCancelled",
        body.subject_id, body.content_type, body.recorded_at, body.dek_version, body.nonce,
        body.ciphertext,
    )  # fmt: skip
    with pytest.raises(InvalidTag):
        open_record(STORE_ID, 7, changed, aead)
