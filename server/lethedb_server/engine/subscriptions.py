"""Subscriptions: following the log from a position, catch-up and live in one loop.

A subscription is a loop over the log by position. It reads one page (at most
``page_size`` events, one short LMDB read transaction, in a worker thread, or
on the event loop when it is a live tail of a few events), hands it to the
caller, and reads the next; when it has read everything up to
the head it waits for the writer's head notification and reads again. There
is no separate "live" mode fed by the writer, so there is no hand-over between
catch-up and live where an event could be missed or sent twice: an unfiltered
subscription delivers every position exactly once, strictly increasing.

Head notification: the writer calls :meth:`SubscriptionEngine._on_commit`
from its thread after every commit. The engine forwards that to every event
loop that has subscriptions (``call_soon_threadsafe``, at most one pending
callback per loop however fast the writer commits), where one
:class:`asyncio.Event` per loop wakes every waiting subscription at once.
There is no polling and no thread per subscriber. A waiting subscription
takes the loop's event *before* it compares its position with the head, so a
commit that lands in between sets an event it is already holding.

Backpressure: a subscription is an async generator; it reads its next page
only when the caller asks for the next message, and the gRPC layer asks only
when the transport has accepted the previous one. A subscriber that stops
reading therefore holds at most one page here and pins no LMDB snapshot
(the read transaction ended with the page).

Consumer groups: the live subscriptions of a group on this server share its
events by partition (see :func:`partition_of` and docs/ARCHITECTURE.md,
"Subscriptions"); the group's checkpoint is the lowest position its live
members have committed, stored through the writer, and it only moves
forward unless an admin sets it back (the writer checks both, and bounds the
number of groups with a stored checkpoint). At every join or leave,
each member restarts after that checkpoint with its new share, so no event is
lost; events after the checkpoint may be delivered twice across a rebalance.

This module must never import grpc or protobuf, and never write the log
environment itself: checkpoints go through the writer like every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from lethedb_server.engine.model import ERASURE_STREAM, CheckpointCommand, StoredEvent
from lethedb_server.engine.reader import DEFAULT_PAGE
from lethedb_server.engine.store import Store
from lethedb_server.errors import (
    DataLoss,
    NotGroupMember,
    PositionBeyondHead,
    ShuttingDown,
    SubscriptionReplaced,
    TooManyGroups,
    TooManySubscribers,
)
from lethedb_server.storage import codec
from lethedb_server.storage.log import REMEDY

#: Stores a consumer group's checkpoint; resolves to the position stored.
CheckpointSink = Callable[[CheckpointCommand], Awaitable[int]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscriptionLimits:
    #: Events per read transaction (and at most per Events message).
    page_size: int = DEFAULT_PAGE
    #: A filtered subscription reports progress at least every this many
    #: skipped events ...
    checkpoint_every: int = 1000
    #: ... or this many seconds after skipped events went unreported.
    checkpoint_interval_s: float = 1.0
    #: An idle subscription sends a heartbeat when nothing else was sent for
    #: this long, so both ends notice a dead connection.
    heartbeat_interval_s: float = 5.0
    max_subscribers: int = 10_000
    #: Most consumer groups with a stored checkpoint (0: no limit): each is a
    #: row kept for ever, so a client must not be able to create them without end.
    max_consumer_groups: int = 10_000
    #: A page of at most this many events (a live tail) is read and decrypted on
    #: the event loop: that costs less than handing it to a worker thread and
    #: back (0: always in a worker thread).
    inline_read_events: int = 64


# -- what a subscriber asks for -------------------------------------------------


class EventFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Server-side filter on clear fields; every condition that is set must hold."""

    stream_prefixes: tuple[str, ...] = ()
    event_types: frozenset[str] = frozenset()
    subject_id: str = ""
    #: Erasure events pass whatever the other conditions say, so a filtered
    #: projection can still delete what it derived from a forgotten subject.
    include_erasures: bool = False

    def matches(self, stream_id: str, event_type: str, subject_id: str) -> bool:
        if self.include_erasures and stream_id == ERASURE_STREAM:
            return True
        if self.stream_prefixes and not stream_id.startswith(self.stream_prefixes):
            return False
        if self.event_types and event_type not in self.event_types:
            return False
        return not self.subject_id or subject_id == self.subject_id


class SubscriptionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A Subscribe request as the engine takes it (checked by Validator.check_subscription)."""

    #: Deliver events after this position (ignored when ``from_end``).
    after: int = 0
    from_end: bool = False
    filter: EventFilter | None = None
    #: Consumer group, or empty for a plain subscription.
    group: str = ""
    #: Member id within the group; empty: the engine assigns one.
    member_id: str = ""


# -- what a subscription yields ---------------------------------------------------


class Events(msgspec.Struct, frozen=True, gc=False):
    """The next events in log order: one page, never empty."""

    events: list[StoredEvent]


class CaughtUp(msgspec.Struct, frozen=True, gc=False):
    """First time at the head (per session, and per group assignment)."""

    position: int


class Checkpoint(msgspec.Struct, frozen=True, gc=False):
    """Everything up to ``position`` was delivered or skipped by the filter."""

    position: int


class Heartbeat(msgspec.Struct, frozen=True, gc=False):
    head: int


class Assignment(msgspec.Struct, frozen=True):
    """A group member's share of the log, valid until the next rebalance."""

    group: str
    member_id: str
    generation: int
    members: tuple[str, ...]
    member_index: int
    restart_after: int

    def owns(self, stream_id: str, subject_id: str) -> bool:
        """Whether an event with these clear fields belongs to this member."""
        if stream_id == ERASURE_STREAM:
            # The erased subject is not a clear field of the erasure event, so
            # its owner is unknown here: every member gets it and deletes what
            # it derived (a delete of nothing is harmless).
            return True
        count = len(self.members)
        return count == 1 or partition_of(subject_id or stream_id, count) == self.member_index


SubscriptionMessage = Events | CaughtUp | Checkpoint | Heartbeat | Assignment
#: A page as read: the selected events and the last position read.
Page = tuple[list[StoredEvent], int]


class CheckpointResult(msgspec.Struct, frozen=True):
    #: The group's checkpoint as stored after the commit (0: none stored).
    position: int
    accepted: bool


def partition_of(key: str, partitions: int) -> int:
    """The partition of a subject (or stream) id: stable across processes and versions.

    BLAKE2b-64 of the UTF-8 key, big-endian, modulo the partition count.
    Python's ``hash`` is salted per process, so it cannot be used: clients may
    compute the same function to tell which member owns a subject.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


# -- the head bridge --------------------------------------------------------------


class _LoopHead:
    """The writer's head notifications, delivered into one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.users = 0
        self._store = store
        self._seen = store.head
        self._scheduled = False
        self._reads: dict[tuple[int, int], asyncio.Future[Page]] = {}
        self._inline_page: tuple[tuple[int, int], Page] | None = None

    def publish(self) -> None:
        """Writer thread: schedule one delivery unless one is already pending."""
        if self._scheduled:
            return
        self._scheduled = True
        # A closed loop raises RuntimeError: nobody is waiting on it any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        # Clear the flag before reading the head: a commit after this line
        # schedules a new delivery; one before it is seen by this one.
        self._scheduled = False
        head = self._store.head
        if head > self._seen:  # checkpoint-only commits do not wake anyone
            self._seen = head
            self.wake()

    def wake(self) -> None:
        """Wake every subscription of this loop that waits on the current event."""
        event, self.event = self.event, asyncio.Event()
        event.set()

    async def shared_read(
        self, start: int, head: int, read: Callable[[], Page], inline: bool
    ) -> Page:
        """One page read for every subscription here that asks for the same page at once.

        A commit wakes every live subscriber together and they all want the
        page after the same position: without this, a thousand of them would
        each read and decrypt the same events. Only reads of this moment are
        shared, keyed by start and head, so a joiner gets what a read of its
        own made at the same head would return (a forget moves the head, so
        a read from before it is never handed to a reader after it): a read
        in a worker thread while it is in flight, an *inline* read (on this
        loop) until the loop's next turn, when the subscribers woken with the
        reader have run. Nothing is kept longer, so no decrypted event
        outlives its delivery here.
        """
        key = (start, head)
        if inline:
            if self._inline_page is not None and self._inline_page[0] == key:
                return self._inline_page[1]
            page = read()
            if self._inline_page is None:
                self.loop.call_soon(self._drop_inline_page)
            self._inline_page = (key, page)
            return page
        future = self._reads.get(key)
        if future is None:
            future = self._reads[key] = asyncio.ensure_future(asyncio.to_thread(read))
            future.add_done_callback(functools.partial(self._read_done, key))
        # Shielded: one cancelled subscriber must not cancel its neighbours' read.
        return await asyncio.shield(future)

    def _drop_inline_page(self) -> None:
        self._inline_page = None

    def _read_done(self, key: tuple[int, int], future: asyncio.Future[Page]) -> None:
        if self._reads.get(key) is future:
            del self._reads[key]
        if not future.cancelled():
            future.exception()  # marks it retrieved even if every reader has gone


# -- consumer groups ---------------------------------------------------------------


@dataclass
class _Member:
    subscription: Subscription
    #: Highest position this member committed in the current generation.
    progress: int


@dataclass
class _Group:
    name: str
    #: The checkpoint stored in LMDB as far as this process knows (None: never).
    durable: int | None
    #: Lowest position every live member committed: where a rebalance restarts.
    watermark: int
    generation: int = 0
    #: Live members on this server by member id.
    members: dict[str, _Member] = field(default_factory=dict)


# -- one subscription ----------------------------------------------------------------


class Subscription:
    """One subscriber's loop; iterate :meth:`messages`, then :meth:`close`."""

    def __init__(
        self, engine: SubscriptionEngine, spec: SubscriptionSpec, head: _LoopHead, start: int
    ) -> None:
        self._engine = engine
        self.spec = spec
        self._head = head
        #: Last position read (delivered or skipped).
        self.position = start
        #: Last position the subscriber was told about (event, checkpoint, caught-up).
        self.reported = start
        self.member_id = ""
        self._group: _Group | None = None
        self._assignment: Assignment | None = None
        self._next_assignment: Assignment | None = None
        self._replaced = False
        self._closed = False

    def _assign(self, assignment: Assignment) -> None:
        self._next_assignment = assignment
        self._head.wake()

    def _replace(self) -> None:
        self._replaced = True
        self._head.wake()

    def close(self) -> None:
        """Leave the engine (and the group, which rebalances). Idempotent."""
        if not self._closed:
            self._closed = True
            self._engine._release(self)

    async def messages(self) -> AsyncGenerator[SubscriptionMessage, None]:
        """The subscription loop; see the module docstring."""
        limits = self._engine.limits
        store = self._engine.store
        now = self._head.loop.time
        last_sent = last_report = now()
        caught_up = False
        while True:
            if self._replaced:
                raise SubscriptionReplaced(self.spec.group, self.member_id)
            if self._engine.closing:
                raise ShuttingDown()
            assignment = self._next_assignment
            if assignment is not self._assignment:
                assert assignment is not None
                self._assignment = assignment
                self.position = self.reported = assignment.restart_after
                caught_up = False
                last_sent = last_report = now()
                yield assignment
                continue
            waiter = self._head.event  # taken before the head is compared: see module doc
            if store.head > self.position:
                start = self.position + 1
                events, scanned = await self._page(start, store.head, assignment)
                if self._replaced or assignment is not self._next_assignment:
                    continue  # the member's share changed while reading: the page is stale
                if scanned < start:
                    raise _missing(start)  # the head says it exists: never spin on a hole
                self.position = scanned
                if events:
                    self.reported = events[-1].position
                    last_sent = last_report = now()
                    yield Events(events)
                skipped = self.position - self.reported
                if skipped and (
                    skipped >= limits.checkpoint_every
                    or now() - last_report >= limits.checkpoint_interval_s
                ):
                    self.reported = self.position
                    last_sent = last_report = now()
                    yield Checkpoint(self.position)
                continue
            if not caught_up:
                caught_up = True
                self.reported = self.position
                last_sent = last_report = now()
                yield CaughtUp(self.position)
                continue
            unreported = self.position > self.reported
            deadline = last_sent + limits.heartbeat_interval_s
            if unreported:
                deadline = min(deadline, last_report + limits.checkpoint_interval_s)
            delay = deadline - now()
            if delay <= 0:
                last_sent = now()
                if unreported:
                    self.reported = self.position
                    last_report = last_sent
                    yield Checkpoint(self.position)
                else:
                    yield Heartbeat(store.head)
                continue
            try:
                async with asyncio.timeout(delay):
                    await waiter.wait()
            except TimeoutError:
                pass

    async def _page(self, start: int, head: int, assignment: Assignment | None) -> Page:
        """The page from *start*: on the loop if the tail to *head* is short, else in a thread."""
        read = functools.partial(self._read, start, assignment)
        inline = head - start < self._engine.limits.inline_read_events
        if self.spec.filter is None and assignment is None:
            return await self._head.shared_read(start, head, read, inline)
        return read() if inline else await asyncio.to_thread(read)

    def _read(self, start: int, assignment: Assignment | None) -> Page:
        """One page from *start*: the selected events and the last position read."""
        engine = self._engine
        limit = engine.limits.page_size
        selector = self.spec.filter
        if selector is None and assignment is None:
            events = _before_damage(engine.store.read_all, start, limit)
            if events and events[0].position != start:
                raise _missing(start)
            return events, events[-1].position if events else start - 1
        page = engine.store.read_all_raw(start, limit)
        if page and page[0][0] != start:
            raise _missing(start)
        selected: list[StoredEvent] = []
        open_event = engine.store.open_event
        for position, value in page:
            try:
                body = codec.decode_record(value)
                if selector is not None and not selector.matches(
                    body.stream_id, body.event_type, body.subject_id
                ):
                    continue
                if assignment is not None and not assignment.owns(body.stream_id, body.subject_id):
                    continue
                selected.append(open_event(position, value))
            except Exception as exc:  # msgspec raises several types for damaged bytes
                if position > start:  # deliver what came before; the next page raises
                    return selected, position - 1
                if isinstance(exc, DataLoss):
                    raise
                raise DataLoss(
                    f"the record at position {position} cannot be decoded ({exc}); {REMEDY}"
                ) from exc
        return selected, page[-1][0] if page else start - 1


def _before_damage(
    read_all: Callable[..., list[StoredEvent]], start: int, limit: int
) -> list[StoredEvent]:
    """A page from *start*; if a record in it is damaged, the events before that record.

    The damaged record's DataLoss is raised only once it is first: every event
    before it is delivered first, so a subscriber knows exactly where it stopped.
    """
    try:
        return read_all(start, backwards=False, limit=limit)
    except DataLoss:
        if limit == 1:
            raise
    events: list[StoredEvent] = []
    while len(events) < limit:
        try:
            one = read_all(start + len(events), backwards=False, limit=1)
        except DataLoss:
            if not events:
                raise
            break
        if not one:
            break
        events += one
    return events


def _missing(position: int) -> DataLoss:
    return DataLoss(f"position {position} is missing from the log (positions must be contiguous)")


# -- the engine ----------------------------------------------------------------------------


class SubscriptionEngine:
    """Every subscription of one store: limits, the head bridge, consumer groups.

    The head bridge serves any number of event loops. Consumer-group state
    belongs to one loop (the server's); it is only touched from there.
    """

    def __init__(
        self,
        store: Store,
        limits: SubscriptionLimits | None = None,
        checkpoint_sink: CheckpointSink | None = None,
    ) -> None:
        """*checkpoint_sink* stores a group's checkpoint: the store's writer by default;
        on a follower, which never writes on its own, its leader (the server wires it)."""
        self.store = store
        self.limits = limits or SubscriptionLimits()
        self._checkpoint_sink: CheckpointSink = checkpoint_sink or store.store_checkpoint
        self._lock = threading.Lock()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopHead] = {}
        #: Read by the writer thread without the lock: replaced, never mutated.
        self._published: tuple[_LoopHead, ...] = ()
        self._count = 0
        self._groups: dict[str, _Group] = {}
        self.closing = False
        store.on_commit(self._on_commit)

    @property
    def subscriber_count(self) -> int:
        return self._count

    def shutdown(self) -> None:
        """End every subscription (UNAVAILABLE) and refuse new ones.

        A subscription never finishes by itself, so a graceful server stop
        would otherwise wait out its whole grace period for them; subscribers
        reconnect and resume after their last position instead.
        """
        self.closing = True
        for loop_head in self._published:
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to wake
                loop_head.loop.call_soon_threadsafe(loop_head.wake)

    def _on_commit(self, head: int) -> None:
        """Writer thread, after every commit."""
        for loop_head in self._published:
            loop_head.publish()

    # -- opening and closing ----------------------------------------------------------

    async def open(self, spec: SubscriptionSpec) -> Subscription:
        """Register a subscription (and join its group); raise if it cannot start."""
        loop = asyncio.get_running_loop()
        if self.closing:
            raise ShuttingDown()
        with self._lock:
            if self._count >= self.limits.max_subscribers:
                raise TooManySubscribers(self.limits.max_subscribers)
            self._count += 1
            loop_head = self._loops.get(loop)
            if loop_head is None:
                loop_head = self._loops[loop] = _LoopHead(loop, self.store)
                self._published = tuple(self._loops.values())
            loop_head.users += 1
        head = self.store.head
        if spec.from_end:
            start = head
        elif spec.after > head:
            self._detach(loop_head)
            raise PositionBeyondHead("after_position", spec.after, head)
        else:
            start = spec.after
        subscription = Subscription(self, spec, loop_head, start)
        if spec.group:
            try:
                await self._join(subscription)
            except BaseException:
                subscription._closed = True
                self._detach(loop_head)
                raise
        return subscription

    def _release(self, subscription: Subscription) -> None:
        self._detach(subscription._head)
        group = subscription._group
        if group is None:
            return
        member = group.members.get(subscription.member_id)
        if member is None or member.subscription is not subscription:
            return  # replaced by a newer subscription of the same member
        del group.members[subscription.member_id]
        if group.members:
            log.info("member %r left group %r; rebalancing", subscription.member_id, group.name)
            self._rebalance(group)
        else:
            del self._groups[group.name]

    def _detach(self, loop_head: _LoopHead) -> None:
        with self._lock:
            self._count -= 1
            loop_head.users -= 1
            if loop_head.users == 0 and self._loops.get(loop_head.loop) is loop_head:
                del self._loops[loop_head.loop]
                self._published = tuple(self._loops.values())

    # -- consumer groups ----------------------------------------------------------------

    async def _join(self, subscription: Subscription) -> None:
        name = subscription.spec.group
        group = self._groups.get(name)
        if group is None:
            stored = await asyncio.to_thread(self.store.checkpoint, name)
            if stored is None:
                await self._check_room_for_a_group()
            group = self._groups.get(name)  # another member may have created it meanwhile
            if group is None:
                head = self.store.head
                if stored is not None and stored > head:
                    raise PositionBeyondHead(f"the checkpoint of group {name!r}", stored, head)
                start = subscription.position if stored is None else stored
                group = self._groups[name] = _Group(name, stored, start)
        member_id = subscription.spec.member_id or uuid.uuid4().hex
        previous = group.members.get(member_id)
        if previous is not None:
            previous.subscription._replace()
        subscription.member_id = member_id
        subscription._group = group
        group.members[member_id] = _Member(subscription, group.watermark)
        log.info("member %r joined group %r; rebalancing", member_id, name)
        self._rebalance(group)

    def _rebalance(self, group: _Group) -> None:
        """A new generation: every member restarts after the group's watermark.

        The watermark is the lowest position every live member has committed,
        so whatever a departed member had not committed is handed out again
        under the new assignment: nothing is lost, some events are delivered
        twice. Members' progress restarts there too.
        """
        group.generation += 1
        members = tuple(sorted(group.members))
        for index, member_id in enumerate(members):
            member = group.members[member_id]
            member.progress = group.watermark
            member.subscription._assign(
                Assignment(
                    group=group.name,
                    member_id=member_id,
                    generation=group.generation,
                    members=members,
                    member_index=index,
                    restart_after=group.watermark,
                )
            )

    async def _check_room_for_a_group(self) -> None:
        """Refuse a new group at once when its first commit would be refused (the limit).

        The writer's check at that commit is the one that holds; this one
        tells a joining member now rather than at its first commit.
        """
        limit = self.limits.max_consumer_groups
        if limit and await asyncio.to_thread(self.store.consumer_groups) >= limit:
            raise TooManyGroups(limit)

    async def commit_checkpoint(
        self,
        group_name: str,
        position: int,
        member_id: str = "",
        generation: int = 0,
        *,
        may_rewind: bool = False,
    ) -> CheckpointResult:
        """Record progress of a member (or set a member-less group's checkpoint).

        A member-less commit may move the checkpoint back only with
        *may_rewind* (the caller is an admin); PermissionDenied otherwise.
        """
        group = self._groups.get(group_name)
        if not member_id:
            if group is not None and group.members:
                raise NotGroupMember(
                    f"group {group_name!r} has {len(group.members)} live members on this server; "
                    "its checkpoint is committed by them (with member_id and generation), "
                    "or set without a member once they have left"
                )
            head = self.store.head
            if position > head:
                raise PositionBeyondHead("position", position, head)
            await self._store_checkpoint(group_name, position, rewind=may_rewind)
            return CheckpointResult(position, accepted=True)
        member = None if group is None else group.members.get(member_id)
        if group is None or member is None:
            raise NotGroupMember(
                f"member {member_id!r} is not subscribed to group {group_name!r} on this "
                "server; its share of the events has moved to the live members"
            )
        if generation != group.generation:
            return CheckpointResult(group.durable or 0, accepted=False)
        # A member cannot have handled what it was never sent.
        member.progress = max(member.progress, min(position, member.subscription.reported))
        low = min(m.progress for m in group.members.values())
        if low > group.watermark:
            group.watermark = low
            await self._store_checkpoint(group_name, low)
            group.durable = max(group.durable or 0, low)
        return CheckpointResult(group.durable or 0, accepted=True)

    async def _store_checkpoint(self, group: str, position: int, *, rewind: bool = False) -> None:
        command = CheckpointCommand(
            group, position, rewind=rewind, max_groups=self.limits.max_consumer_groups
        )
        await self._checkpoint_sink(command)

    async def get_checkpoint(self, group: str) -> int | None:
        return await asyncio.to_thread(self.store.checkpoint, group)
