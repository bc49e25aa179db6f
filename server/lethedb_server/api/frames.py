"""Commit frames to and from the wire (``lethedb.v1.ReplicatedCommit``).

The engine's :class:`~lethedb_server.engine.replication.CommitFrame` and the
protobuf message carry the same fields; the one difference is a deleted
row, which the engine spells ``value=None`` and the wire ``deleted=true``.
Raw data keys pass through here in memory only: they are never logged and
never written by this module.
"""

from __future__ import annotations

from lethedb.v1 import replication_pb2 as rpb
from lethedb_server.engine.replication import CommitFrame, DataKey, RowChange


def commit_message(frame: CommitFrame, visible_position: int) -> rpb.ReplicatedCommit:
    """*visible_position*: the leader's visible head as it sends the frame."""
    return rpb.ReplicatedCommit(
        visible_position=visible_position,
        term=frame.term,
        commit=frame.commit,
        first_position=frame.first_position,
        last_position=frame.last_position,
        records=frame.records,
        changes=[
            rpb.RowChange(
                table=change.table,
                key=change.key,
                value=change.value or b"",
                deleted=change.value is None,
            )
            for change in frame.changes
        ],
        keys=[
            rpb.DataKey(subject_id=key.subject_id, version=key.version, key=key.key)
            for key in frame.keys
        ],
        journal_entry=frame.journal_entry,
        committed_at=frame.committed_at,
    )


def commit_frame(message: rpb.ReplicatedCommit) -> CommitFrame:
    return CommitFrame(
        term=message.term,
        commit=message.commit,
        first_position=message.first_position,
        last_position=message.last_position,
        records=tuple(message.records),
        changes=tuple(
            RowChange(change.table, change.key, None if change.deleted else change.value)
            for change in message.changes
        ),
        keys=tuple(DataKey(key.subject_id, key.version, key.key) for key in message.keys),
        journal_entry=message.journal_entry,
        committed_at=message.committed_at,
    )
