"""The domain values passed between the service, the writer and storage.

Plain msgspec structs with no gRPC or LMDB knowledge: the service layer builds
them from protobuf messages after validation, the writer and reader consume
them.
"""

from __future__ import annotations

import enum
import hashlib

import msgspec

#: Subject id under which subject-less events are encrypted. Client ids may
#: not start with ``$``, so it can never collide with a real subject.
STORE_SUBJECT = "$store"


class ExpectedState(enum.IntEnum):
    """Numbering shared with ``lethedb.v1.ExpectedState``."""

    ANY = 0
    NO_STREAM = 1
    STREAM_EXISTS = 2
    EXACT = 3


class ProposedEvent(msgspec.Struct, frozen=True, gc=False):
    event_id: bytes
    event_type: str
    subject_id: str
    content_type: str
    data: bytes
    metadata: bytes


class AppendCommand(msgspec.Struct, frozen=True):
    """One validated append: a batch of events for one stream, all or nothing."""

    stream_id: str
    events: tuple[ProposedEvent, ...]
    expected_state: ExpectedState = ExpectedState.ANY
    expected_version: int = 0
    idempotency_key: str = ""

    def size(self) -> int:
        """Approximate bytes this command adds to a write batch."""
        return sum(len(e.data) + len(e.metadata) + 128 for e in self.events)

    def digest(self) -> bytes:
        """Fingerprint of the request as sent, to tell a retry from a key reused."""
        fingerprint = msgspec.msgpack.encode(
            (
                self.stream_id,
                int(self.expected_state),
                self.expected_version,
                [
                    (e.event_id, e.event_type, e.subject_id, e.content_type, e.data, e.metadata)
                    for e in self.events
                ],
            )
        )
        return hashlib.blake2b(fingerprint, digest_size=32).digest()

    def describe_expected(self) -> str:
        if self.expected_state is ExpectedState.EXACT:
            return f"version {self.expected_version}"
        return self.expected_state.name.lower().replace("_", " ")


class StoredEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as read back: clear fields always, data unless redacted."""

    position: int
    stream_id: str
    stream_version: int
    event_id: bytes
    event_type: str
    subject_id: str
    content_type: str
    recorded_at: int
    data: bytes
    metadata: bytes
    redacted: bool
