"""The domain values passed between the service, the writer and storage.

Plain msgspec structs with no gRPC or LMDB knowledge: the service layer builds
them from protobuf messages after validation, the writer and reader consume
them.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

# Re-exported for the engine: where erasure events go, and their type (wire contract).
from lethedb_contract import ERASURE_EVENT_TYPE as ERASURE_EVENT_TYPE
from lethedb_contract import ERASURE_STREAM as ERASURE_STREAM
from lethedb_contract import RESERVED_PREFIX
from lethedb_server.storage.codec import AppendResult

if TYPE_CHECKING:  # replication.py builds on this module
    from lethedb_server.engine.replication import CommitFrame

#: Subject id under which subject-less events are encrypted. Client ids may
#: not start with ``$``, so it can never collide with a real subject.
STORE_SUBJECT = RESERVED_PREFIX + "store"

#: Bytes counted for each event on top of its fields, in every size limit and
#: in-flight budget: what an event costs in memory and in the log whatever it
#: carries (its objects, its record header, its index entries). Without it a
#: request of millions of empty events would count as a few bytes.
EVENT_OVERHEAD = 128


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


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

    def size(self) -> int:
        """Every field (names counted in characters) plus :data:`EVENT_OVERHEAD`."""
        return (
            len(self.event_id)
            + len(self.event_type)
            + len(self.subject_id)
            + len(self.content_type)
            + len(self.data)
            + len(self.metadata)
            + EVENT_OVERHEAD
        )


class AppendCommand(msgspec.Struct, frozen=True):
    """One validated append: a batch of events for one stream, all or nothing."""

    stream_id: str
    events: tuple[ProposedEvent, ...]
    expected_state: ExpectedState = ExpectedState.ANY
    expected_version: int = 0
    idempotency_key: str = ""

    def size(self) -> int:
        """Bytes this command counts against the size limits and the in-flight budget.

        Every field of every event, the stream id and the idempotency key, plus
        :data:`EVENT_OVERHEAD` per event (see :meth:`ProposedEvent.size`).
        """
        return (
            len(self.stream_id) + len(self.idempotency_key) + sum([e.size() for e in self.events])
        )

    def request_hash(self) -> bytes:
        """Unkeyed hash of the request as sent: memory only, never stored.

        It covers the plaintext data and metadata, so a copy of it would let
        anyone confirm a guess at them. What is stored is this hash keyed under
        the subjects' fingerprint keys (``crypto.keyed_fingerprint``), which
        erasure destroys.
        """
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


class CommitCommand(msgspec.Struct, frozen=True):
    """Appends to several streams, all or nothing, under one idempotency key."""

    appends: tuple[AppendCommand, ...]
    idempotency_key: str = ""

    def size(self) -> int:
        return len(self.idempotency_key) + sum(a.size() for a in self.appends)

    def event_count(self) -> int:
        return sum(len(a.events) for a in self.appends)

    def request_hash(self) -> bytes:
        """Unkeyed hash of the whole commit: memory only (see AppendCommand)."""
        h = hashlib.blake2b(b"commit", digest_size=32)
        for part in self.appends:
            h.update(part.request_hash())
        return h.digest()


class CommitResult(msgspec.Struct, frozen=True):
    results: tuple[AppendResult, ...]
    deduplicated: bool = False


class CheckpointCommand(msgspec.Struct, frozen=True):
    """Store a consumer group's checkpoint; through the writer so the log env has one writer.

    Checked in the writer's transaction, so that concurrent commits cannot
    slip past the checks: the checkpoint only moves forward unless
    ``rewind`` (an admin's reset), and a new group is refused when the store
    already keeps ``max_groups`` of them (0: no limit).
    """

    group: str
    position: int
    rewind: bool = False
    max_groups: int = 0

    def size(self) -> int:
        return 64


class ForgetCommand(msgspec.Struct, frozen=True):
    subject_id: str
    reason: str
    by_role: str

    def size(self) -> int:
        return 256


class LegalHoldCommand(msgspec.Struct, frozen=True):
    """Set (``release`` false) or release a subject's legal hold."""

    subject_id: str
    reason: str = ""
    until: int = 0
    release: bool = False

    def size(self) -> int:
        return 128


class ShredCommand(msgspec.Struct, frozen=True):
    """Run a shred epoch; always alone, never inside a batch."""

    def size(self) -> int:
        return 0


class RotateCommand(msgspec.Struct, frozen=True):
    """Re-wrap live keys under a new master key version; alone, never in a batch."""

    def size(self) -> int:
        return 0


class ReplicatedCommitCommand(msgspec.Struct, frozen=True):
    """Apply one leader commit on a follower; resolves to the frame's commit number."""

    frame: CommitFrame

    def size(self) -> int:
        frame = self.frame
        return (
            256
            + sum(len(r) for r in frame.records)
            + sum(len(c.key) + len(c.value or b"") for c in frame.changes)
        )


class RotateResult(msgspec.Struct, frozen=True):
    master_version: int
    rewrapped_keys: int


class SubjectState(enum.IntEnum):
    """Numbering shared with ``lethedb.v1.SubjectState``."""

    ACTIVE = 1
    FORGOTTEN_PENDING_SHRED = 2
    SHREDDED = 3


class SubjectReceipt(msgspec.Struct, frozen=True):
    subject_id: str
    state: SubjectState
    tombstone_position: int = 0
    forgotten_at: int = 0
    reason: str = ""
    shred_epoch: int = 0
    shredded_at: int = 0
    event_count: int = 0
    hold_reason: str = ""
    hold_set_at: int = 0
    hold_until: int = 0
    on_hold: bool = False


class ShredResult(msgspec.Struct, frozen=True):
    epoch: int
    master_version: int
    live_keys: int
    shredded_subjects: int
    completed_at: int


class ExclusiveTask(msgspec.Struct, frozen=True):
    """Run *run* in the writer thread, alone between batches; resolves to its result.

    How a change of role (a promotion, a demotion) and a truncation are
    ordered against every write: what was queued before runs before it.
    """

    run: Callable[[], Any]

    def size(self) -> int:
        return 0


Command = (
    AppendCommand
    | CommitCommand
    | ForgetCommand
    | LegalHoldCommand
    | CheckpointCommand
    | ShredCommand
    | RotateCommand
    | ReplicatedCommitCommand
    | ExclusiveTask
)
#: Commands the writer runs alone, between batches.
MAINTENANCE = (ShredCommand, RotateCommand, ExclusiveTask)
