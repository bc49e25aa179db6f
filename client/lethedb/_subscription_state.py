"""A subscription's state on the wire and towards the caller (no I/O).

:class:`SubscriptionCursor` follows every message received and builds the
request of each reconnect; :class:`SubscriptionState` is what both
subscription classes (:mod:`lethedb._subscriptions`) hand the caller.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from typing import TypeAlias

import grpc

from lethedb._checks import check_name, check_position, type_name
from lethedb._exceptions import (
    LetheError,
    ServerError,
    Unavailable,
    ValidationError,
    error_from_rpc_error,
)
from lethedb._models import CaughtUp, Checkpoint, GroupAssignment, RecordedEvent, SubscriptionFilter
from lethedb._requests import to_recorded_event
from lethedb._retry import RetryPolicy
from lethedb.v1 import eventstore_pb2 as pb

log = logging.getLogger("lethedb")

SubscriptionItem: TypeAlias = list[RecordedEvent] | Checkpoint | CaughtUp | GroupAssignment
"""One message of a subscription as ``batches()`` yields it (heartbeats stay inside)."""


def build_subscribe_request(
    *,
    after: int | None,
    from_start: bool,
    from_end: bool,
    filter: SubscriptionFilter | None,
    group: str | None,
    member_id: str | None,
    batch_size: int | None,
) -> pb.SubscribeRequest:
    """Check and encode a Subscribe request; with no start given, from the start of the log."""
    for name, flag in (("from_start", from_start), ("from_end", from_end)):
        if not isinstance(flag, bool):
            raise ValidationError(f"{name} is {type_name(flag)}; expected a bool")
    starts = [name for name, given in (
        ("after", after is not None), ("from_start", from_start), ("from_end", from_end)
    ) if given]  # fmt: skip
    if len(starts) > 1:
        raise ValidationError(f"{' and '.join(starts)} are given; give at most one start")
    request = pb.SubscribeRequest()
    if after is not None:
        request.after_position = check_position("after", after)
    elif from_end:
        request.from_end = True
    else:
        request.from_start = True
    if filter is not None:
        request.filter.CopyFrom(_subscription_filter(filter))
    if group is not None:
        check_name("group", group)
        request.group = group
    if member_id is not None:
        check_name("member_id", member_id)
        if group is None:
            raise ValidationError("member_id is given without a group; a member needs a group")
        request.member_id = member_id
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValidationError(f"batch_size is {type_name(batch_size)}; expected an int")
        if not 1 <= batch_size < 2**32:
            raise ValidationError(f"batch_size is {batch_size}; it must be >= 1 (or None)")
        request.max_events_per_message = batch_size
    return request


def _subscription_filter(selector: SubscriptionFilter) -> pb.SubscriptionFilter:
    if not isinstance(selector, SubscriptionFilter):
        raise ValidationError(
            f"filter is {type_name(selector)}; expected lethedb.SubscriptionFilter or None"
        )
    lists: dict[str, list[str]] = {}
    for field in ("stream_prefixes", "event_types"):
        values = getattr(selector, field)
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise ValidationError(f"filter.{field} is {type_name(values)}; expected a tuple of str")
        lists[field] = list(values)
        for index, value in enumerate(lists[field]):
            check_name(f"filter.{field}[{index}]", value)
    if not isinstance(selector.subject_id, str):
        raise ValidationError(
            f"filter.subject_id is {type_name(selector.subject_id)}; expected a str"
        )
    if not isinstance(selector.include_erasures, bool):
        raise ValidationError(
            f"filter.include_erasures is {type_name(selector.include_erasures)}; expected a bool"
        )
    return pb.SubscriptionFilter(
        stream_prefixes=lists["stream_prefixes"],
        event_types=lists["event_types"],
        subject_id=selector.subject_id,
        include_erasures=selector.include_erasures,
    )


def to_group_assignment(message: pb.GroupAssignment) -> GroupAssignment:
    return GroupAssignment(
        group=message.group,
        member_id=message.member_id,
        generation=message.generation,
        members=tuple(message.members),
        member_index=message.member_index,
        restart_after=message.restart_after,
    )


class SubscriptionCursor:
    """Where a subscription stands on the wire, so that a reconnect resumes without a gap.

    It follows every message received: the last position an event, a
    checkpoint or a caught-up message reported, the current group
    assignment, the last head the server mentioned. A reconnect then asks
    for what comes after that position, so the caller, who is handed exactly
    what was received, sees no gap and no duplicate. For ``from_end``, the
    first caught-up message tells where the subscription started; a
    connection lost before it resends ``from_end``.

    A reconnect may reach another node of a cluster (the same log, position
    for position); it asks that node to wait until it holds the last position
    received (``min_position``), so a lagging follower neither refuses the
    start nor leaves a gap.

    A consumer group member reconnects with the member id the server gave it
    (a stale call of the same member is then replaced, not left as a ghost
    member) and the server decides the start from the group's checkpoint; only
    a group that has none takes the start of the request, and that is the
    ``restart_after`` of the member's latest assignment, the group's watermark.
    Within one assignment positions must strictly increase; a server that
    breaks that is reported, not papered over.
    """

    def __init__(
        self, request: pb.SubscribeRequest, policy: RetryPolicy, *, reconnect: bool
    ) -> None:
        if not isinstance(reconnect, bool):
            raise ValidationError(f"reconnect is {type_name(reconnect)}; expected a bool")
        self._original = request
        self._policy = policy
        self._reconnect = reconnect
        self._delays = policy.reconnect_delays()
        self._progressed = False
        self.group = request.group or None
        self.member_id = request.member_id or None
        #: Last position received (event, checkpoint, caught-up), or None before any.
        self.position: int | None = None
        self.assignment: GroupAssignment | None = None
        #: The head of the log as the server last reported it (caught-up, heartbeat).
        self.head: int | None = None
        self.reconnects = 0

    def request(self) -> pb.SubscribeRequest:
        """The request of the next attempt."""
        request = pb.SubscribeRequest()
        request.CopyFrom(self._original)
        if self.member_id:
            request.member_id = self.member_id
        if self.group is not None:
            if self.assignment is not None:
                request.after_position = self.assignment.restart_after
        elif self.position is not None:
            request.after_position = self.position
        if self.position is not None and self.position > request.min_position:
            # The reconnect may reach another node of a cluster, one that lags:
            # it waits until it holds what was received instead of refusing a
            # start beyond its head.
            request.min_position = self.position
        return request

    def take(self, response: pb.SubscribeResponse) -> SubscriptionItem | None:
        """Follow one message; return what the caller gets from it (None: nothing)."""
        kind = response.WhichOneof("message")
        if kind == "events":
            batch = response.events.events
            if not batch:
                return None
            first = batch[0].position
            if self.position is not None and first <= self.position:
                raise ServerError(
                    f"the server sent position {first} after position {self.position} "
                    "on one subscription; positions must strictly increase"
                )
            events = [to_recorded_event(event) for event in batch]
            self._advance(events[-1].position)
            return events
        if kind == "checkpoint":
            self._advance(response.checkpoint.position)
            return Checkpoint(response.checkpoint.position)
        if kind == "caught_up":
            position = response.caught_up.position
            self._advance(position)
            self.head = max(self.head or 0, position)
            return CaughtUp(position)
        if kind == "heartbeat":
            self.head = response.heartbeat.head
            self._progressed = True
            return None
        if kind == "assignment":
            assignment = to_group_assignment(response.assignment)
            self.assignment = assignment
            self.member_id = assignment.member_id
            self.position = assignment.restart_after
            self._progressed = True
            return assignment
        return None  # a message type newer than this SDK: nothing the caller can use

    def _advance(self, position: int) -> None:
        if self.position is not None and position < self.position:
            raise ServerError(
                f"the server reported position {position} after position {self.position} "
                "on one subscription; positions must not go backwards"
            )
        self.position = position
        self._progressed = True

    def retry_delay(self, exc: grpc.RpcError | None) -> float:
        """Wait before reconnecting; raises the mapped error when the subscription must end.

        ``exc`` is None when the server ended the call without an error,
        which it never does by itself (a proxy or a load balancer may).
        """
        if exc is None:
            error: LetheError = Unavailable("the server ended the subscription call")
        else:
            error = error_from_rpc_error(exc)
        if not RetryPolicy.is_retryable(error):
            raise error from exc
        if not self._reconnect:
            error.add_note(
                "lethedb: not reconnected: the subscription was made with reconnect=False"
            )
            raise error from exc
        if self._progressed:
            self._delays = self._policy.reconnect_delays()
            self._progressed = False
        delay = next(self._delays)
        self.reconnects += 1
        log.warning(
            "subscription%s lost its connection (%s); reconnecting in %.2fs after position %s",
            f" of group {self.group!r}" if self.group else "",
            error,
            delay,
            "(start)" if self.position is None else self.position,
        )
        return delay

    def commit_request(self, position: int) -> pb.CommitCheckpointRequest:
        """A member's CommitCheckpoint: its id and the generation of its latest assignment."""
        if self.group is None:
            raise ValidationError(
                "commit is for consumer groups; this subscription has no group (save the "
                "position yourself and subscribe with after=position)"
            )
        if self.assignment is None:
            raise ValidationError(
                "this member has no group assignment yet; commit after receiving events"
            )
        return pb.CommitCheckpointRequest(
            group=self.assignment.group,
            member_id=self.assignment.member_id,
            generation=self.assignment.generation,
            position=check_position("position", position),
        )


class SubscriptionState:
    """What a subscription hands the caller: the state both I/O classes share.

    ``position`` is the last position *delivered* to the caller (the last
    event taken, or a checkpoint or caught-up message), which is what a
    caller saves and what ``commit()`` reports by default. The cursor's
    position can be ahead of it, by the rest of a batch not yet taken; those
    events are kept and handed out first, so nothing is lost in between.
    """

    def __init__(self, cursor: SubscriptionCursor) -> None:
        self._cursor = cursor
        self._pending: deque[RecordedEvent] = deque()
        self._closed = False
        #: Last position delivered to the caller, or None before anything was.
        self.position: int | None = None
        #: The node of the current (or last) Subscribe call (host:port).
        self._address: str | None = None

    def _serving(self) -> str | None:
        """Where a member's commit goes: the node its group membership lives on.

        A follower forwards the commit to its leader; sent to the leader itself,
        it would name a member the leader does not know.
        """
        return self._address

    @property
    def assignment(self) -> GroupAssignment | None:
        """The latest group assignment (None without a group, or before the first)."""
        return self._cursor.assignment

    @property
    def group(self) -> str | None:
        return self._cursor.group

    @property
    def member_id(self) -> str | None:
        """This member's id: the one given, or the one the server assigned (groups only)."""
        return self._cursor.member_id

    @property
    def head(self) -> int | None:
        """The log's head as the server last reported it (caught-up and heartbeat messages)."""
        return self._cursor.head

    @property
    def reconnects(self) -> int:
        """How many times the subscription has reconnected."""
        return self._cursor.reconnects

    @property
    def closed(self) -> bool:
        return self._closed

    def _pop_pending(self) -> RecordedEvent | None:
        if not self._pending:
            return None
        event = self._pending.popleft()
        self.position = event.position
        return event

    def _flatten(self, item: SubscriptionItem) -> RecordedEvent | Checkpoint | CaughtUp | None:
        """One item for ``__next__``: an event (the rest of its batch waits) or a position."""
        if isinstance(item, list):
            self._pending.extend(item)
            return self._pop_pending()
        if isinstance(item, GroupAssignment):
            return None
        self.position = item.position
        return item

    def _take_pending(self) -> list[RecordedEvent]:
        batch = list(self._pending)
        self._pending.clear()
        if batch:
            self.position = batch[-1].position
        return batch

    def _delivered(self, item: SubscriptionItem) -> SubscriptionItem:
        if isinstance(item, list):
            self.position = item[-1].position
        elif not isinstance(item, GroupAssignment):
            self.position = item.position
        return item

    def _commit_request(self, position: int | None) -> pb.CommitCheckpointRequest:
        if position is None:
            if self.position is None:
                raise ValidationError("nothing was delivered yet; there is no position to commit")
            position = self.position
        return self._cursor.commit_request(position)

    def __repr__(self) -> str:
        group = f", group={self.group!r}, member_id={self.member_id!r}" if self.group else ""
        return f"{type(self).__name__}(position={self.position}{group}, closed={self._closed})"
