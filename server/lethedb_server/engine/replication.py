"""Replication in the engine: the frames a leader sends, the registry of its followers.

The unit of replication is one commit of the writer and its journal entry
(``journal`` table, see storage/log.py): a :class:`CommitFrame` carries the
records that commit wrote, byte for byte, the current value of every side
table row it touched (state-based, so a later frame that touches the row
again simply sends it again) and the raw data keys a follower lacks to read
them. A follower's writer applies a frame as one more command kind
(:class:`~lethedb_server.engine.model.ReplicatedCommitCommand`).

Plain dataclasses, no grpc: the api layer converts them to and from the wire.

The leader keeps a :class:`Followers` registry fed by the Replication
service (connected, acked, disconnected); the writer's :class:`SyncGate`
holds back the answer of a write until ``sync_replicas`` followers have acked
a commit at or after it, or fails it with NotEnoughReplicas after
``sync_timeout_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The replicated side tables (LogStore db names) a journal entry may touch.
REPLICATED_TABLES = ("streams", "idempotency", "tombstones", "legal_holds", "checkpoints")


@dataclass(frozen=True, slots=True)
class DataKey:
    """A raw data key (DEK) of a subject: only ever in memory or on the replication stream."""

    subject_id: str
    version: int
    key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(subject_id={self.subject_id!r}, version={self.version})"


@dataclass(frozen=True, slots=True)
class RowChange:
    """A side table row as it stands on the leader when the frame is sent.

    ``value`` None: the row no longer exists on the leader (deleted).
    """

    table: str
    key: bytes
    value: bytes | None


@dataclass(frozen=True, slots=True)
class CommitFrame:
    """One leader commit, everything a follower needs to apply it identically."""

    term: int
    commit: int
    first_position: int
    last_position: int
    #: Stored values from ``events``, byte for byte (body || chain hash).
    records: tuple[bytes, ...]
    changes: tuple[RowChange, ...]
    keys: tuple[DataKey, ...]
    #: The leader's journal value, byte for byte.
    journal_entry: bytes
    committed_at: int


@dataclass(frozen=True, slots=True)
class FollowerState:
    """What the leader knows of one follower (for lag metrics, receipts, ClusterStatus)."""

    node_id: str
    advertise: str
    connected: bool
    connected_since: int  # ns; 0 when not connected
    commit: int  # the last commit it acked as durable
    position: int  # the log head of that commit
    acked_at: int  # ns; 0 before its first ack
    shredded_through: int
    lag_positions: int  # leader head - position
    lag_seconds: float  # now - committed_at of the oldest commit it lacks; 0 if none
