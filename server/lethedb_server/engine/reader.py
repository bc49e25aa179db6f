"""Reading events back: pages from the log, opened with the subjects' keys.

Decryption happens here, on the server, for authorised readers. An event
whose subject has been forgotten comes back *redacted* (every clear field
intact, no data) rather than skipped, so positions stay contiguous for
consumers. A record whose ciphertext fails its authentication tag is reported
as :class:`DataLoss` naming its position; it is never returned wrong.
"""

from __future__ import annotations

from lethedb_server.crypto.aead import InvalidTag
from lethedb_server.engine.model import STORE_SUBJECT, StoredEvent
from lethedb_server.engine.record_codec import open_record
from lethedb_server.errors import DataLoss, StreamNotFound
from lethedb_server.storage import codec
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.log import REMEDY, LogStore, RawPage

#: Events per read transaction: short enough never to pin old pages for long.
DEFAULT_PAGE = 512


class EventReader:
    def __init__(self, log_store: LogStore, keys: KeyStore) -> None:
        self.log = log_store
        self.keys = keys

    # *upto*: the last position a reader may see (the visible head, see
    # engine/visibility.py); None: the whole log. The log stops there itself.

    def read_all(
        self, start: int, *, backwards: bool, limit: int, upto: int | None = None
    ) -> list[StoredEvent]:
        return self.open_page(
            self.log.read_all_page(start, backwards=backwards, limit=limit, upto=upto)
        )

    def read_stream(
        self, stream_id: str, start: int, *, backwards: bool, limit: int, upto: int | None = None
    ) -> list[StoredEvent]:
        page = self.log.read_stream_page(
            stream_id, start, backwards=backwards, limit=limit, upto=upto
        )
        if page is None:
            raise StreamNotFound(stream_id)
        return self.open_page(page)

    def read_subject(
        self, subject_id: str, after: int, limit: int, upto: int | None = None
    ) -> list[StoredEvent]:
        """The subject's events after position *after*, across all streams, in log order."""
        positions = self.log.subject_positions(subject_id, after, limit, upto)
        events = self.open_page(self.log.read_positions(positions)) if positions else []
        for event in events:
            if event.subject_id != subject_id:
                raise DataLoss(
                    f"the subject index names position {event.position} for subject "
                    f"{subject_id!r}, whose record belongs to another subject: the index entry "
                    f"is damaged; {REMEDY}"
                )
        return events

    def open(self, position: int, value: bytes) -> StoredEvent:
        """Decode and decrypt one stored event."""
        return self.open_page([(position, value)])[0]

    def open_page(self, page: RawPage) -> list[StoredEvent]:
        """Decode and decrypt every event of a page, in order.

        The hot path of reads and subscriptions, hence the loop's shape: names
        are looked up once per page and each event is built in one call.
        Every event is still decrypted and its associated data checked.
        """
        store_id = self.log.store_id
        cipher = self.keys.cipher
        decode_record = codec.decode_record
        open_payload = open_record
        events: list[StoredEvent] = []
        append = events.append
        for position, value in page:
            try:
                body = decode_record(value)
            except Exception as exc:  # msgspec raises several types for damaged bytes
                raise DataLoss(
                    f"the record at position {position} cannot be decoded ({exc}); {REMEDY}"
                ) from exc
            subject_id = body.subject_id
            try:
                aead = cipher(subject_id or STORE_SUBJECT, body.dek_version)
            except Exception as exc:  # a damaged key record: DataLoss, never a TypeError
                raise DataLoss(
                    f"the event at position {position} cannot be opened: the key it names "
                    f"(subject {subject_id!r}, version {body.dek_version}) is unreadable "
                    f"({exc}); {REMEDY}"
                ) from exc
            if aead is None:
                append(self._redacted(position, body))
                continue
            try:
                payload = open_payload(store_id, position, body, aead)
            except InvalidTag as exc:
                raise DataLoss(
                    f"the event at position {position} fails its authentication check "
                    f"(the record was altered or moved); {REMEDY}"
                ) from exc
            event = StoredEvent(
                position, body.stream_id, body.stream_version, body.event_id, body.event_type,
                subject_id, body.content_type, body.recorded_at, payload.data, payload.metadata,
                False,
            )  # fmt: skip
            append(event)
        return events

    def _redacted(self, position: int, body: codec.RecordBody) -> StoredEvent:
        """The envelope of an event whose key is gone, which only a forget may explain."""
        if body.subject_id and (
            self.keys.is_forgotten(body.subject_id) or self.log.is_forgotten(body.subject_id)
        ):
            return _envelope(position, body, b"", b"", redacted=True)
        raise DataLoss(
            f"the key for the event at position {position} is missing "
            f"(subject {body.subject_id!r}, key version {body.dek_version}) "
            "and the subject was never forgotten"
        )


def _envelope(
    position: int, body: codec.RecordBody, data: bytes, metadata: bytes, *, redacted: bool
) -> StoredEvent:
    return StoredEvent(
        position=position,
        stream_id=body.stream_id,
        stream_version=body.stream_version,
        event_id=body.event_id,
        event_type=body.event_type,
        subject_id=body.subject_id,
        content_type=body.content_type,
        recorded_at=body.recorded_at,
        data=data,
        metadata=metadata,
        redacted=redacted,
    )
