"""Conversion between protobuf messages and domain values.

The service layer is the only user. Conversions are written for the hot path:
one protobuf object per event, no intermediate dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import msgspec
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from lethedb.v1 import admin_pb2
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.engine.cluster import ClusterView, FollowerLag, NodeErasure
from lethedb_server.engine.model import (
    AppendCommand,
    CommitCommand,
    CommitResult,
    ExpectedState,
    ProposedEvent,
    ShredResult,
    StoredEvent,
    SubjectReceipt,
)
from lethedb_server.engine.replication import FollowerState
from lethedb_server.engine.store import StoreStats
from lethedb_server.engine.subscriptions import (
    CaughtUp,
    Checkpoint,
    CheckpointResult,
    EventFilter,
    Events,
    Heartbeat,
    SubscriptionMessage,
    SubscriptionSpec,
)
from lethedb_server.engine.verify import Verifier
from lethedb_server.errors import ValidationError
from lethedb_server.storage.codec import AppendResult

#: Target size of one streamed read message. A single event larger than this
#: still travels alone in its own message.
READ_MESSAGE_BYTES = 1 << 20

_EXPECTED_STATES = {state.value: state for state in ExpectedState}


def append_command(request: pb.AppendRequest | pb.StreamAppend) -> AppendCommand:
    state = _EXPECTED_STATES.get(request.expected_state)
    if state is None:
        raise ValidationError(f"expected_state is {request.expected_state}, which is not defined")
    key = request.idempotency_key if isinstance(request, pb.AppendRequest) else ""
    return AppendCommand(
        stream_id=request.stream_id,
        events=tuple(
            ProposedEvent(
                e.event_id, e.event_type, e.subject_id, e.content_type, e.data, e.metadata
            )
            for e in request.events
        ),
        expected_state=state,
        expected_version=request.expected_version,
        idempotency_key=key,
    )


def commit_command(request: pb.CommitRequest) -> CommitCommand:
    return CommitCommand(
        tuple(append_command(part) for part in request.appends), request.idempotency_key
    )


def commit_response(result: CommitResult) -> pb.CommitResponse:
    return pb.CommitResponse(
        results=[append_response(r) for r in result.results], deduplicated=result.deduplicated
    )


def append_response(result: AppendResult) -> pb.AppendResponse:
    return pb.AppendResponse(**msgspec.structs.asdict(result))


def add_event(batch: RepeatedCompositeFieldContainer[pb.RecordedEvent], event: StoredEvent) -> None:
    """Append *event* to a repeated field in place: no message built and copied in.

    Spelled out rather than built from a dict: this runs once per event read.
    """
    batch.add(
        position=event.position,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        event_id=event.event_id,
        event_type=event.event_type,
        subject_id=event.subject_id,
        content_type=event.content_type,
        recorded_at=event.recorded_at,
        data=event.data,
        metadata=event.metadata,
        redacted=event.redacted,
    )


def read_responses(events: Sequence[StoredEvent]) -> Iterator[pb.ReadResponse]:
    """Pack events into messages of about READ_MESSAGE_BYTES each."""
    response = pb.ReadResponse()
    size = 0
    for event in events:
        add_event(response.events, event)
        size += len(event.data) + len(event.metadata) + 96
        if size >= READ_MESSAGE_BYTES:
            yield response
            response, size = pb.ReadResponse(), 0
    if len(response.events):
        yield response


def subject_receipt(
    receipt: SubjectReceipt, nodes: Sequence[NodeErasure] = ()
) -> pb.SubjectReceipt:
    """The receipt; *nodes*: on a leader, the subject's erasure state on every node."""
    message = pb.SubjectReceipt(
        subject_id=receipt.subject_id,
        state=int(receipt.state),  # type: ignore[arg-type]
        tombstone_position=receipt.tombstone_position,
        forgotten_at=receipt.forgotten_at,
        reason=receipt.reason,
        shred_epoch=receipt.shred_epoch,
        shredded_at=receipt.shredded_at,
        event_count=receipt.event_count,
        nodes=[node_erasure(node) for node in nodes],
    )
    if receipt.on_hold:
        message.legal_hold.CopyFrom(
            pb.LegalHold(
                reason=receipt.hold_reason, set_at=receipt.hold_set_at, until=receipt.hold_until
            )
        )
    return message


def shred_response(result: ShredResult) -> admin_pb2.ShredResponse:
    return admin_pb2.ShredResponse(**msgspec.structs.asdict(result))


def node_erasure(node: NodeErasure) -> pb.NodeErasure:
    return pb.NodeErasure(
        node_id=node.node_id,
        state=int(node.state),  # type: ignore[arg-type]
        connected=node.connected,
    )


def stats_response(stats: StoreStats, role: str, lag: FollowerLag) -> admin_pb2.StatsResponse:
    """The store's counts, this node's *role* and, on a leader, its slowest follower's *lag*."""
    fields = dataclasses.asdict(stats)
    fields.update(
        role=role,
        max_follower_lag_positions=lag.positions,
        max_follower_lag_seconds=lag.seconds,
    )
    return admin_pb2.StatsResponse(**fields)


def cluster_status_response(view: ClusterView) -> admin_pb2.ClusterStatusResponse:
    link = view.link
    return admin_pb2.ClusterStatusResponse(
        node_id=view.node_id,
        role=view.role,
        term=view.term,
        leader=view.leader,
        commit=view.commit,
        position=view.position,
        followers=[follower_status(f) for f in view.followers],
        connected=link.connected,
        caught_up=link.caught_up,
        lag_positions=link.lag_positions,
        lag_seconds=link.lag_seconds,
        sync_replicas=view.sync_replicas,
    )


def follower_status(follower: FollowerState) -> admin_pb2.FollowerStatus:
    return admin_pb2.FollowerStatus(
        node_id=follower.node_id,
        advertise=follower.advertise,
        connected=follower.connected,
        connected_since=follower.connected_since if follower.connected else 0,
        commit=follower.commit,
        position=follower.position,
        lag_positions=follower.lag_positions,
        lag_seconds=follower.lag_seconds,
        shredded_through=follower.shredded_through,
    )


def verify_progress(verifier: Verifier, *, done: bool) -> admin_pb2.VerifyProgress:
    return admin_pb2.VerifyProgress(
        checked=verifier.checked,
        last_position=verifier.head,
        done=done,
        first_bad_position=verifier.first_bad_position,
        problem=verifier.problem,
        redacted=verifier.redacted,
    )


# -- subscriptions -----------------------------------------------------------------


def subscription_spec(request: pb.SubscribeRequest) -> SubscriptionSpec:
    start = request.WhichOneof("start")
    if start == "from_start" and not request.from_start:
        raise ValidationError("from_start is false; set it to true or leave the start unset")
    if start == "from_end" and not request.from_end:
        raise ValidationError("from_end is false; set it to true or leave the start unset")
    selector = None
    if request.HasField("filter"):
        f = request.filter
        selector = EventFilter(
            stream_prefixes=tuple(f.stream_prefixes),
            event_types=frozenset(f.event_types),
            subject_id=f.subject_id,
            include_erasures=f.include_erasures,
        )
    return SubscriptionSpec(
        after=request.after_position if start == "after_position" else 0,
        from_end=start == "from_end",
        filter=selector,
        group=request.group,
        member_id=request.member_id,
    )


def subscribe_responses(
    item: SubscriptionMessage, max_events: int
) -> Iterator[pb.SubscribeResponse]:
    """One engine message as protobuf; a page of events becomes one or more batches.

    A batch holds at most *max_events* events and about READ_MESSAGE_BYTES;
    events are added in place (``add``) rather than built and copied in.
    """
    if isinstance(item, Events):
        response = pb.SubscribeResponse()
        batch = response.events.events
        size = 0
        for event in item.events:
            add_event(batch, event)
            size += len(event.data) + len(event.metadata) + 96
            if len(batch) >= max_events or size >= READ_MESSAGE_BYTES:
                yield response
                response = pb.SubscribeResponse()
                batch = response.events.events
                size = 0
        if len(batch):
            yield response
    elif isinstance(item, CaughtUp):
        yield pb.SubscribeResponse(caught_up=pb.CaughtUp(position=item.position))
    elif isinstance(item, Checkpoint):
        yield pb.SubscribeResponse(checkpoint=pb.Checkpoint(position=item.position))
    elif isinstance(item, Heartbeat):
        yield pb.SubscribeResponse(heartbeat=pb.Heartbeat(head=item.head))
    else:
        yield pb.SubscribeResponse(
            assignment=pb.GroupAssignment(
                group=item.group,
                member_id=item.member_id,
                generation=item.generation,
                members=item.members,
                member_index=item.member_index,
                restart_after=item.restart_after,
            )
        )


def commit_checkpoint_response(result: CheckpointResult) -> pb.CommitCheckpointResponse:
    return pb.CommitCheckpointResponse(position=result.position, accepted=result.accepted)
