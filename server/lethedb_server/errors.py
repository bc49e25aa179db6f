"""Domain errors of the LetheDB server.

Every layer below the gRPC service raises these and nothing else for
conditions a client can cause or must learn about. They carry no gRPC
knowledge: :mod:`lethedb_server.api.status` is the one place that maps them to
status codes. Messages are written for the person reading them: they name the
field, the limit and what was found, and never contain event data or keys.

    LetheError
    ├── ValidationError          a request is malformed; nothing was changed
    ├── WrongExpectedVersion     the stream is not in the expected state
    ├── StreamNotFound           a read named a stream that does not exist
    ├── SubjectForgotten         the subject was erased; its id is never reused
    ├── LegalHoldActive          a legal hold blocks forgetting the subject
    ├── IdempotencyConflict      a key was reused for a different request
    ├── StorageFull              the disk or the LMDB map cannot grow
    ├── DataLoss                 a record fails its integrity checks
    ├── DataDirLocked            another process holds the data directory
    ├── DataDirDamaged           the files on disk are unusable as they are
    │   ├── KeyringMismatch      the keyring does not hold the keys the directory uses
    │   └── RestoredLog          the log is behind its key store (restored from a backup?)
    ├── ForkedProcess            a forked child tried to write through its parent's store
    ├── PermissionDenied         the request's content needs a role the caller lacks
    ├── TooManySubscribers       a subscription limit (server or client) is reached
    ├── TooManyGroups            the consumer-group limit is reached
    ├── PositionBeyondHead       a subscription starts after a position the log never had
    ├── NotGroupMember           a checkpoint commit from outside a group's live members
    ├── SubscriptionReplaced     a newer subscription took over the same group member
    ├── Overloaded               a server limit on work in flight is reached; retry later
    ├── ShuttingDown             the server is draining and takes no new work
    ├── NotLeader                a write reached a follower; it names the leader
    ├── NotEnoughReplicas        a synchronous write did not reach its copies in time
    ├── CatchingUp               a follower has not caught up with its leader yet
    ├── ReplicationRefused       a leader's commit (or a follower) that does not fit this log
    └── ListenFailed             the server cannot bind its address (start-up only)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def iso_time(ns: int) -> str:
    """Nanoseconds since the epoch as ISO 8601 UTC, for messages a person reads."""
    seconds, rest = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest // 1000)
    return moment.isoformat().replace("+00:00", "Z")


class LetheError(Exception):
    """Base of every error the server reports to clients."""


class ValidationError(LetheError):
    """A request failed validation before it reached the writer."""


class WrongExpectedVersion(LetheError):
    """The stream's version did not match the request's expectation.

    ``actual_version`` is the stream's last version, or ``None`` when the
    stream does not exist.
    """

    def __init__(self, stream_id: str, expected: str, actual_version: int | None) -> None:
        self.stream_id = stream_id
        self.actual_version = actual_version
        actual = "no stream" if actual_version is None else f"version {actual_version}"
        super().__init__(f"stream {stream_id!r}: expected {expected}, found {actual}")


class StreamNotFound(LetheError):
    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        super().__init__(f"stream {stream_id!r} does not exist")


class SubjectForgotten(LetheError):
    def __init__(self, subject_id: str) -> None:
        self.subject_id = subject_id
        super().__init__(
            f"subject {subject_id!r} has been forgotten; an erased subject id is never reused"
        )


class IdempotencyConflict(LetheError):
    def __init__(self, key: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different request; "
            "use a new key for a new request"
        )


class StorageFull(LetheError):
    """The write could not be made durable for lack of space; nothing was written."""


class DataLoss(LetheError):
    """A stored record failed its integrity check (hash chain or AEAD tag)."""


class DataDirLocked(LetheError):
    """Another process has the data directory open."""


class DataDirDamaged(LetheError):
    """The data directory's files are truncated, corrupt or inconsistent."""


class ListenFailed(LetheError):
    """The listen address is in use or unusable; raised before any file is created."""


class ShuttingDown(LetheError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry against another node or later")


class LegalHoldActive(LetheError):
    def __init__(self, subject_id: str, reason: str, until: int) -> None:
        self.subject_id = subject_id
        when = "until released" if until == 0 else f"until {iso_time(until)}"
        super().__init__(
            f"subject {subject_id!r} is under legal hold ({reason!r}, {when}); "
            "release the hold before forgetting the subject"
        )


class ForkedProcess(LetheError):
    def __init__(self, owner_pid: int) -> None:
        super().__init__(
            f"this store was opened by process {owner_pid}; a forked child cannot write "
            "through it (LMDB environments must not cross fork()); open the store in the "
            "child instead"
        )


class PermissionDenied(LetheError):
    """The caller's role allows the method but not this request (a group, a rewind).

    Most role checks are by method, before any handler runs (the access
    interceptor); this is for the few decided by what the request asks.
    """


class TooManySubscribers(LetheError):
    def __init__(self, limit: int, option: str = "max_subscribers", holder: str = "") -> None:
        self.limit = limit
        if holder:
            super().__init__(
                f"{holder} already has {limit} subscriptions, its limit ({option}); "
                "close unused subscriptions, or ask the operator to raise the limit"
            )
            return
        super().__init__(
            f"the server already serves {limit} subscriptions, its limit ({option}); "
            "close unused subscriptions, retry later, or raise the limit"
        )


class TooManyGroups(LetheError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"the store already keeps checkpoints of {limit} consumer groups, its limit "
            "(max_consumer_groups); reuse an existing group, or ask the operator to raise "
            "the limit. Nothing was written"
        )


class PositionBeyondHead(LetheError):
    """A subscription would start after the head: its checkpoint is not from this log.

    Following it would skip the positions up to the checkpoint once the log
    reaches them, silently; a log restored from an older backup is the usual
    cause.
    """

    def __init__(self, what: str, position: int, head: int) -> None:
        self.position = position
        self.head = head
        super().__init__(
            f"{what} {position} is beyond the head of the log ({head}); the checkpoint "
            "belongs to another store or to a newer copy of this one"
        )


class NotGroupMember(LetheError):
    """A checkpoint commit that the group's live membership does not allow."""


class SubscriptionReplaced(LetheError):
    def __init__(self, group: str, member_id: str) -> None:
        super().__init__(
            f"member {member_id!r} of group {group!r} subscribed again on another call; "
            "this call is replaced"
        )


class Overloaded(LetheError):
    """A limit on work in flight is reached; nothing was done, a later retry may succeed."""


class NotLeader(LetheError):
    """A write reached a follower, which never writes on its own.

    ``leader`` is the leader's client address (host:port), empty when the
    follower does not know it (it is not connected): retry elsewhere.
    """

    def __init__(self, leader: str) -> None:
        self.leader = leader
        where = f"the leader is {leader}" if leader else "the leader is not known right now"
        super().__init__(f"this node is a follower and takes no writes; {where}")


class NotEnoughReplicas(LetheError):
    """A write committed on the leader did not become durable on enough followers in time.

    It was not acknowledged: retry it with the same idempotency key (a retry
    that finds it committed is deduplicated).
    """


class CatchingUp(LetheError):
    """A follower cannot answer yet: it has not caught up with its leader (or the
    position a read asked for with ``min_position``)."""


class ReplicationRefused(LetheError):
    """A replication peer sent something that does not fit this node's log.

    A commit whose position, chain hash or term does not follow this log, or
    a follower of another store: nothing of it is written.
    """


class KeyringMismatch(DataDirDamaged):
    """The master keyring (or key provider) does not hold the keys the data directory uses.

    Raised at start-up, before anything is written: serving with another
    keyring would make acknowledged writes unreadable and wrap new keys under
    a key the rest of the data does not know.
    """


class RestoredLog(DataDirDamaged):
    """The log ends before a position its key store has seen: it was restored or lost data.

    Serving it needs the operator's explicit consent (``accept_restored_log``).
    """
