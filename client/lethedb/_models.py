"""The values an application passes to and gets from LetheDB.

These are plain msgspec Structs with no I/O and no protobuf: turning them into
requests and back is :mod:`lethedb._requests`'s job. ``repr`` of an event never
shows its data or metadata, because those hold personal data and event reprs
end up in logs and tracebacks.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

import msgspec

from lethedb._exceptions import SubjectForgotten

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Append",
    "AppendResult",
    "BackupResult",
    "CaughtUp",
    "Checkpoint",
    "ClusterStatus",
    "CommitResult",
    "Event",
    "ExpectedVersion",
    "FollowerStatus",
    "GroupAssignment",
    "LegalHold",
    "NodeErasure",
    "RecordedEvent",
    "RotateResult",
    "ShredResult",
    "StoreStats",
    "StreamState",
    "SubjectReceipt",
    "SubjectState",
    "SubscriptionFilter",
    "VerifyProgress",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class StreamState(enum.Enum):
    """What an append expects of its stream, short of an exact version."""

    ANY = "any"
    """Append whatever state the stream is in."""
    NO_STREAM = "no_stream"
    """The stream must not exist yet (the append creates it)."""
    STREAM_EXISTS = "stream_exists"
    """The stream must already hold at least one event."""


ANY: Final = StreamState.ANY
NO_STREAM: Final = StreamState.NO_STREAM
STREAM_EXISTS: Final = StreamState.STREAM_EXISTS

ExpectedVersion: TypeAlias = StreamState | int
"""A :class:`StreamState`, or an int: the stream's exact last version (0-based)."""


class Event(msgspec.Struct, frozen=True):
    """An event to append.

    ``data`` given as bytes is sent as is (content type
    ``application/octet-stream`` unless ``content_type`` says otherwise); any
    other value is encoded as JSON (``application/json``). ``metadata`` is
    bytes, a JSON-able value, or ``None`` for none. ``subject_id`` names the
    data subject whose personal data the event holds, so that forgetting the
    subject makes this event's data unreadable; leave it empty only for events
    without personal data. Without an ``event_id`` a random one is assigned:
    by the SDK, once per request, or, when you pass your own idempotency key,
    by the server, so that calling ``append`` again with the same arguments is
    recognised as a retry.
    """

    event_type: str
    data: Any = b""
    subject_id: str = ""
    metadata: Any = None
    content_type: str = ""
    event_id: uuid.UUID | None = None

    def __repr__(self) -> str:
        return (
            f"Event(event_type={self.event_type!r}, data={_describe(self.data)}, "
            f"subject_id={self.subject_id!r}, metadata={_describe(self.metadata)}, "
            f"content_type={self.content_type!r}, event_id={self.event_id!r})"
        )


class RecordedEvent(msgspec.Struct, frozen=True):
    """An event as stored: where it sits in the log and in its stream, and its content.

    ``redacted`` means its subject was forgotten: every clear field is intact,
    ``data`` and ``metadata`` are empty and can never be recovered.
    """

    position: int
    stream_id: str
    stream_version: int
    event_id: uuid.UUID
    event_type: str
    subject_id: str
    content_type: str
    recorded_at: int
    data: bytes
    metadata: bytes
    redacted: bool

    @property
    def recorded_at_datetime(self) -> datetime:
        """Commit time as an aware UTC datetime (microsecond precision)."""
        return _EPOCH + timedelta(microseconds=self.recorded_at // 1000)

    def json(self) -> Any:
        """Decode ``data`` as JSON.

        Raises SubjectForgotten for a redacted event, rather than returning
        something that looks like an empty payload, and ValueError when the
        data is not JSON.
        """
        return self._decode(self.data, "data")

    def metadata_json(self) -> Any:
        """Decode ``metadata`` as JSON; empty metadata (none was given) is ``None``."""
        if not self.metadata and not self.redacted:
            return None
        return self._decode(self.metadata, "metadata")

    def _decode(self, payload: bytes, field: str) -> Any:
        if self.redacted:
            raise SubjectForgotten(
                f"{self._where()} is redacted: subject {self.subject_id!r} was forgotten, "
                f"so its {field} can never be read"
            )
        try:
            return msgspec.json.decode(payload)
        except msgspec.DecodeError as exc:
            content_type = self.content_type or "application/octet-stream"
            raise ValueError(
                f"{self._where()}: {field} is not JSON (content type {content_type!r}, "
                f"{len(payload)} bytes): {exc}"
            ) from exc

    def _where(self) -> str:
        return (
            f"event at position {self.position} "
            f"(stream {self.stream_id!r} version {self.stream_version})"
        )

    def __repr__(self) -> str:
        return (
            f"RecordedEvent(position={self.position}, stream_id={self.stream_id!r}, "
            f"stream_version={self.stream_version}, event_id={self.event_id!r}, "
            f"event_type={self.event_type!r}, subject_id={self.subject_id!r}, "
            f"content_type={self.content_type!r}, recorded_at={self.recorded_at}, "
            f"data=<{len(self.data)} bytes>, metadata=<{len(self.metadata)} bytes>, "
            f"redacted={self.redacted})"
        )


class AppendResult(msgspec.Struct, frozen=True):
    """Where an acknowledged (durably committed) append landed.

    ``deduplicated`` is true when this is the stored result of an earlier
    request with the same idempotency key: nothing new was written.
    """

    first_position: int
    last_position: int
    first_version: int
    last_version: int
    recorded_at: int
    deduplicated: bool


class Append(msgspec.Struct, frozen=True):
    """One append of a pipelined ``append_many`` call, or one stream's part of a ``commit``.

    Its fields are the arguments of ``append``. A commit part leaves
    ``idempotency_key`` ``None``: the commit has one key for all its parts.
    """

    stream_id: str
    events: Event | Sequence[Event]
    expected_version: ExpectedVersion = ANY
    idempotency_key: str | None = None


class CommitResult(msgspec.Struct, frozen=True):
    """Where an acknowledged multi-stream commit landed: one result per part, in order.

    The parts' events take contiguous log positions, in the order the parts
    were given. ``deduplicated`` is true when this is the stored result of an
    earlier commit with the same idempotency key (then every part's result
    says so too): nothing new was written.
    """

    results: tuple[AppendResult, ...]
    deduplicated: bool


class SubscriptionFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which events a subscription delivers, decided on the server before decryption.

    Every condition that is set must hold: the stream id starts with one of
    ``stream_prefixes``, the event type is one of ``event_types``, the event
    belongs to ``subject_id``. An empty tuple or string sets no condition.
    With ``include_erasures`` every erasure event (``$subject.forgotten`` in
    stream ``$erasures``) is delivered whatever the other conditions say, so a
    filtered projection can still delete what it derived from a forgotten
    subject. Skipped events are reported as :class:`Checkpoint` messages.
    """

    stream_prefixes: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()
    subject_id: str = ""
    include_erasures: bool = False


class Checkpoint(msgspec.Struct, frozen=True):
    """Progress over events a filter skipped: everything up to ``position`` was delivered
    or filtered out, so resuming after it loses nothing. Save it as a consumer's progress."""

    position: int


class CaughtUp(msgspec.Struct, frozen=True):
    """The subscription reached the head of the log at ``position`` (everything up to it
    was delivered or filtered out); new events follow as they are committed.

    Sent once per connection (and, for a group, once per assignment); with
    ``from_end`` the first one tells where the subscription started.
    """

    position: int


class GroupAssignment(msgspec.Struct, frozen=True):
    """A consumer group member's share of the log, valid until the next rebalance.

    ``members`` are the group's live members on the server, sorted; this
    member is ``members[member_index]`` and receives the events whose subject
    (or, without one, stream) partitions to it, plus every erasure event.
    Delivery under this assignment continues after ``restart_after``, the
    group's checkpoint: at a rebalance events after it may be delivered again
    (at least once across a rebalance), none is lost.
    """

    group: str
    member_id: str
    generation: int
    members: tuple[str, ...]
    member_index: int
    restart_after: int


class SubjectState(enum.Enum):
    """Where a data subject stands in its erasure."""

    ACTIVE = "active"
    """Not forgotten: the subject's events are readable."""
    FORGOTTEN_PENDING_SHRED = "forgotten_pending_shred"
    """Forgotten: tombstoned, its events read as redacted and its keys deleted; stale
    copies of the keys (in the key store's free pages, under older master key versions)
    are destroyed by the next shred epoch."""
    SHREDDED = "shredded"
    """A shred epoch has completed since the forget: no key that could decrypt the
    subject's events exists any more."""


class LegalHold(msgspec.Struct, frozen=True):
    """A legal hold that blocks forgetting a subject.

    Times are nanoseconds since the Unix epoch; ``until`` is ``None`` for a
    hold that lasts until it is released.
    """

    reason: str
    set_at: int
    until: int | None = None


class NodeErasure(msgspec.Struct, frozen=True):
    """A subject's erasure on one node of a cluster, as the leader last heard of it.

    ACTIVE there: the node has not received the forget yet;
    FORGOTTEN_PENDING_SHRED: applied and its keys deleted there, that node's
    shred epoch not yet run; SHREDDED: done on that node. ``connected`` is
    False when the node is not connected to the leader now.
    """

    node_id: str
    state: SubjectState
    connected: bool


class SubjectReceipt(msgspec.Struct, frozen=True):
    """The erasure receipt: what the store knows of one data subject.

    While the subject is ACTIVE, ``tombstone_position``, ``forgotten_at``,
    ``shred_epoch`` and ``shredded_at`` are 0 and ``reason`` is empty. Once
    forgotten, ``tombstone_position`` is the log position of the erasure event
    (in stream ``$erasures``), ``forgotten_at`` its time and ``shred_epoch``
    the shred epoch that destroys (or destroyed) the subject's keys;
    ``shredded_at`` is that epoch's completion time, 0 until it has run. Times
    are nanoseconds since the Unix epoch. ``event_count`` counts the subject's
    events in the log (they stay there, redacted, after a forget).
    ``legal_hold`` is set while a hold is in force. Asked of a leader,
    ``nodes`` gives the subject's state on every node of the cluster, the
    leader first; it is empty from a follower or a server without followers.
    """

    subject_id: str
    state: SubjectState
    tombstone_position: int = 0
    forgotten_at: int = 0
    reason: str = ""
    shred_epoch: int = 0
    shredded_at: int = 0
    event_count: int = 0
    legal_hold: LegalHold | None = None
    nodes: tuple[NodeErasure, ...] = ()


class ShredResult(msgspec.Struct, frozen=True):
    """A completed shred epoch.

    ``master_version`` is the master key version now current (every older one
    was destroyed), ``live_keys`` the data keys re-wrapped under it,
    ``shredded_subjects`` the forgotten subjects whose erasure this epoch
    completed, ``completed_at`` nanoseconds since the Unix epoch.
    """

    epoch: int
    master_version: int
    live_keys: int
    shredded_subjects: int
    completed_at: int


class BackupResult(msgspec.Struct, frozen=True):
    """A backup written on the server's machine.

    It holds the log up to and including ``last_position``; ``key_bytes`` is 0
    unless the key store was included.
    """

    destination: str
    last_position: int
    log_bytes: int
    key_bytes: int


class StoreStats(msgspec.Struct, frozen=True):
    """Counts and sizes of a store, for operators.

    ``subjects`` counts subjects holding at least one data key (live ones),
    ``forgotten_subjects`` every tombstoned subject and ``pending_shred`` those
    whose keys the next shred epoch has still to destroy. ``master_version``
    is the current master key version. Sizes are in bytes: the log file, the
    log's LMDB map (its current ceiling) and the key-store file. When an
    operator accepted a restored log (``accept_restored_log``), positions
    after ``restored_to`` up to ``restored_from`` were lost with the newer
    log, at ``restored_at`` (ns since the epoch; 0: never). ``role`` is
    "single", "leader" or "follower" ("" from an older server); on a leader
    the ``max_follower_lag_*`` fields give its slowest follower's lag.
    """

    last_position: int
    streams: int
    subjects: int
    forgotten_subjects: int
    pending_shred: int
    shred_epoch: int
    master_version: int
    log_file_bytes: int
    log_map_bytes: int
    key_file_bytes: int
    store_id: bytes
    restored_from: int = 0
    restored_to: int = 0
    restored_at: int = 0
    role: str = ""
    max_follower_lag_positions: int = 0
    max_follower_lag_seconds: float = 0.0


class FollowerStatus(msgspec.Struct, frozen=True):
    """One follower as its leader sees it (an item of :attr:`ClusterStatus.followers`).

    ``advertise`` is the address clients use for it; ``connected_since`` is
    in ns since the epoch (0 when not connected). ``commit`` and ``position``
    are the last commit and log position it acknowledged as durable; its lag
    is ``lag_positions`` behind the leader's head, and ``lag_seconds`` the age
    of the oldest commit it lacks. ``shredded_through``: every erasure at or
    before this position is shredded on that node.
    """

    node_id: str
    advertise: str
    connected: bool
    connected_since: int
    commit: int
    position: int
    lag_positions: int
    lag_seconds: float
    shredded_through: int


class ClusterStatus(msgspec.Struct, frozen=True):
    """The cluster as one node sees it (``admin.cluster_status()``, ``lethedb cluster status``).

    ``role`` is "leader", "follower" or "single" (no replication); ``term``
    the leadership term; ``leader`` the leader's client address ("" when
    unknown); ``commit`` and ``position`` this node's last commit and log
    position. A leader lists every follower it knows in ``followers``, and
    ``sync_replicas`` is how many must hold a write before it is
    acknowledged. A follower says whether it is ``connected`` to its leader,
    whether it has ``caught_up`` once (it serves reads only then) and its lag.
    """

    node_id: str
    role: str
    term: int
    leader: str
    commit: int
    position: int
    followers: tuple[FollowerStatus, ...]
    connected: bool
    caught_up: bool
    lag_positions: int
    lag_seconds: float
    sync_replicas: int


class VerifyProgress(msgspec.Struct, frozen=True):
    """Where a verification walk stands; the last one (``done``) is its result.

    ``checked`` records have been verified so far, of ``last_position``: the
    head when the walk began (records appended since are not part of this
    walk). As positions start at 1 and have no gaps, ``checked`` is also the
    position the walk has reached. ``redacted`` counts the checked events of
    forgotten subjects: their chain links verify, their authentication tags
    cannot be checked any more, as their keys are gone. When the walk found a
    bad record, ``first_bad_position`` is its position and ``problem`` says
    what is wrong; otherwise they are ``None`` and empty.
    """

    checked: int
    last_position: int
    done: bool
    first_bad_position: int | None = None
    problem: str = ""
    redacted: int = 0

    @property
    def ok(self) -> bool:
        """Nothing bad found (so far, until ``done``)."""
        return self.first_bad_position is None and not self.problem


class RotateResult(msgspec.Struct, frozen=True):
    """A master key rotation: the new current version and the data keys re-wrapped under it.

    Older master versions still exist until the next shred epoch destroys them.
    """

    master_version: int
    rewrapped_keys: int


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"
