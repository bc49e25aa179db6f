"""The aggregate, application, tracking and process recorders on LetheDB streams.

Layout of one application's data (``<ns>`` is its namespace, by default the
application's name in lower case):

* ``<ns>/events/<aggregate id>``: one stream per aggregate sequence, one
  LetheDB event per stored event (event type = topic, data = state, metadata
  = the originator version, subject = the event's data subject);
* ``<ns>/snapshots/<aggregate id>``: its snapshots, under the same subject;
* ``<ns>/tracking/<upstream application>``: one event per tracking record
  (metadata = the notification id), written in the same commit as the events
  it tracks.

A sequence's versions must grow: a write is sent with the expected version of
the stream's last event, so a concurrent or repeated write of the same
version fails on the server (``IntegrityError``), whatever process made it.
Notification ids are LetheDB log positions; the notification log of an
application holds its ``<ns>/events/`` events and every erasure event.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final
from uuid import UUID

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    Notification,
    OperationalError,
    ProcessRecorder,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
)

from lethedb import (
    NO_STREAM,
    Append,
    AppendResult,
    CaughtUp,
    Checkpoint,
    Client,
    DeadlineExceeded,
    Event,
    LetheError,
    Overloaded,
    PermissionDenied,
    PositionBeyondHead,
    RecordedEvent,
    StorageFull,
    StreamNotFound,
    StreamState,
    SubjectForgotten,
    SubjectReceipt,
    SubscriptionFilter,
    Unauthenticated,
    Unavailable,
    ValidationError,
    WrongExpectedVersion,
)
from lethedb.eventsourcing._erasure import (
    FORGOTTEN_TOPIC,
    AggregateForgotten,
    forgotten_state,
)
from lethedb_contract import ERASURE_STREAM

__all__ = [
    "LetheDBAggregateRecorder",
    "LetheDBApplicationRecorder",
    "LetheDBProcessRecorder",
    "LetheDBSubscription",
    "LetheDBTrackingRecorder",
]

TRACKING_EVENT_TYPE: Final = "eventsourcing.tracking"
#: Most event types one subscription filter may hold; more topics filter here.
MAX_FILTER_TOPICS: Final = 100
#: Attempts of a write whose expected versions were stale (another writer went first).
WRITE_ATTEMPTS: Final = 5
#: Stream heads remembered per recorder (a guess of the expected version; a miss costs
#: one extra round trip, never a wrong answer).
MAX_HEADS: Final = 100_000


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Raise the SDK's errors as the library's PEP 249 style persistence errors."""
    try:
        yield
    except SubjectForgotten as exc:
        raise AggregateForgotten(str(exc), aggregate_id="", subject_id="") from exc
    except WrongExpectedVersion as exc:
        raise IntegrityError(str(exc)) from exc
    except ValidationError as exc:
        raise DataError(str(exc)) from exc
    except (Unavailable, DeadlineExceeded, Overloaded, StorageFull) as exc:
        raise OperationalError(str(exc)) from exc
    except (PermissionDenied, Unauthenticated) as exc:
        raise InterfaceError(str(exc)) from exc
    except LetheError as exc:
        raise DatabaseError(str(exc)) from exc


class _Part:
    """One stream's share of a write: events keyed by strictly growing versions."""

    def __init__(self, stream_id: str, keys: list[int], events: list[Event]) -> None:
        if any(later <= earlier for earlier, later in itertools.pairwise(keys)):
            raise IntegrityError(
                f"versions {keys} for stream {stream_id!r} are not strictly increasing"
            )
        self.stream_id = stream_id
        self.keys = keys
        self.events = events


class LetheDBRecorder:
    """What every LetheDB recorder shares: the client, the namespace, guarded writes."""

    def __init__(self, client: Client, namespace: str) -> None:
        if not namespace or "/" in namespace:
            raise ValueError(f"namespace {namespace!r} must be non-empty and without '/'")
        self.client = client
        self.namespace = namespace
        self._heads: dict[str, tuple[int, int]] = {}
        self._heads_lock = threading.Lock()

    def forget_subject(self, subject_id: str, *, reason: str = "unspecified") -> SubjectReceipt:
        """Forget a data subject on the server (admin role); see :func:`forget`."""
        with translated_errors():
            return self.client.forget_subject(subject_id, reason=reason)

    def _last(self, stream_id: str) -> RecordedEvent | None:
        """The stream's last event, or None when it has none."""
        try:
            return next(self.client.read_stream(stream_id, backwards=True, max_count=1), None)
        except StreamNotFound:
            return None

    def _head(self, stream_id: str) -> tuple[int, int] | None:
        """(stream version, key) of the stream's last event, read from the server."""
        last = self._last(stream_id)
        if last is None:
            return None
        if last.redacted:  # its version is gone with its subject's key
            raise AggregateForgotten(
                f"stream {stream_id!r} ends with an event of forgotten subject "
                f"{last.subject_id!r}: its versions can never be read again",
                aggregate_id=stream_id.rsplit("/", 1)[-1],
                subject_id=last.subject_id,
            )
        return last.stream_version, _key(last)

    def _remember(self, stream_id: str, head: tuple[int, int] | None) -> None:
        with self._heads_lock:
            if head is None:
                self._heads.pop(stream_id, None)
                return
            if len(self._heads) >= MAX_HEADS:
                self._heads.clear()
            self._heads[stream_id] = head

    def _write(self, parts: Sequence[_Part], extra: Sequence[Append] = ()) -> list[AppendResult]:
        """Append every part (and ``extra``) in one transaction; IntegrityError when a
        part's first version is not above its stream's last one.

        The expected version of each stream comes from what this recorder last
        saw of it (NO_STREAM for a stream it never saw): right almost always,
        and when another writer went first the server refuses the write, the
        heads are read afresh and the write is tried again (or refused, when
        the versions are taken).
        """
        parts = [part for part in parts if part.events]
        for _ in range(WRITE_ATTEMPTS):
            appends = [
                Append(part.stream_id, part.events, expected_version=self._expected(part))
                for part in parts
            ]
            appends.extend(extra)
            try:
                with translated_errors():
                    results = self._send(appends)
            except IntegrityError as exc:
                if not isinstance(exc.__cause__, WrongExpectedVersion):
                    raise
                with translated_errors():
                    for part in parts:
                        self._remember(part.stream_id, self._head(part.stream_id))
                continue
            for part, result in zip(parts, results, strict=False):
                self._remember(part.stream_id, (result.last_version, part.keys[-1]))
            return results
        raise IntegrityError(f"gave up after {WRITE_ATTEMPTS} attempts: other writers went first")

    def _expected(self, part: _Part) -> StreamState | int:
        with self._heads_lock:
            head = self._heads.get(part.stream_id)
        if head is None:
            return NO_STREAM
        stream_version, key = head
        if key >= part.keys[0]:
            raise IntegrityError(
                f"version {part.keys[0]} of stream {part.stream_id!r} is already recorded "
                f"(its last version is {key})"
            )
        return stream_version

    def _send(self, appends: list[Append]) -> list[AppendResult]:
        if not appends:
            return []
        if len(appends) == 1:
            only = appends[0]
            return [
                self.client.append(
                    only.stream_id, only.events, expected_version=only.expected_version
                )
            ]
        return list(self.client.commit(appends).results)


def _key(event: RecordedEvent) -> int:
    """The originator version (or notification id) kept in an event's metadata: a
    JSON integer, read as ``int`` (a hot path: once per event read)."""
    try:
        return int(event.metadata)
    except ValueError:
        raise DataError(
            f"event at position {event.position} in stream {event.stream_id!r} was not "
            "written by lethedb.eventsourcing (no version in its metadata)"
        ) from None


class LetheDBAggregateRecorder(LetheDBRecorder, AggregateRecorder):
    """Aggregate sequences as streams ``<namespace>/<purpose>/<aggregate id>``."""

    def __init__(self, client: Client, namespace: str, purpose: str = "events") -> None:
        super().__init__(client, namespace)
        if not purpose or "/" in purpose:
            raise ValueError(f"purpose {purpose!r} must be non-empty and without '/'")
        self.purpose = purpose
        self.prefix = f"{namespace}/{purpose}/"

    def stream_id(self, originator_id: UUID | str) -> str:
        return f"{self.prefix}{originator_id}"

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        self._insert(stored_events, **kwargs)
        return None

    def _insert(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> list[int]:
        """Write the events, grouped by sequence, and :meth:`_tracked` parts in one
        transaction; their notification ids (log positions), in the order given."""
        groups: dict[str, tuple[list[int], list[int], list[Event]]] = {}
        for index, stored in enumerate(stored_events):
            stream_id = self.stream_id(stored.originator_id)
            indexes, keys, events = groups.setdefault(stream_id, ([], [], []))
            indexes.append(index)
            keys.append(stored.originator_version)
            events.append(self._event(stored))
        parts = [_Part(stream_id, keys, events) for stream_id, (_, keys, events) in groups.items()]
        results = self._write([*parts, *self._tracked(kwargs)])
        positions = [0] * len(stored_events)
        for (indexes, _, _), result in zip(groups.values(), results, strict=False):
            for offset, index in enumerate(indexes):
                positions[index] = result.first_position + offset
        return positions

    def _tracked(self, kwargs: dict[str, Any]) -> list[_Part]:
        """Parts to commit with the events: the process recorder's tracking record."""
        return []

    def _event(self, stored: StoredEvent) -> Event:
        return Event(
            stored.topic,
            bytes(stored.state),
            subject_id=self._subject(stored),
            metadata=stored.originator_version,
        )

    def _subject(self, stored: StoredEvent) -> str:
        """The subject the event is encrypted under: the mapper's choice, else (for a
        plain StoredEvent) the aggregate id. A snapshot takes its aggregate's subject."""
        if self.purpose != "events":
            first = self._first_event(f"{self.namespace}/events/{stored.originator_id}")
            if first is not None:
                return first.subject_id
        given = getattr(stored, "subject_id", None)
        return str(stored.originator_id) if given is None else str(given)

    def _first_event(self, stream_id: str) -> RecordedEvent | None:
        try:
            return next(self.client.read_stream(stream_id, max_count=1), None)
        except StreamNotFound:
            return None

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        stream_id = self.stream_id(originator_id)
        selected: list[StoredEvent] = []
        last: tuple[int, int] | None = None
        with translated_errors():
            try:
                for event in self.client.read_stream(stream_id, backwards=desc):
                    if event.redacted:
                        raise AggregateForgotten(
                            f"aggregate {originator_id} can never be read again: its data "
                            f"subject {event.subject_id!r} was forgotten",
                            aggregate_id=str(originator_id),
                            subject_id=event.subject_id,
                        )
                    version = _key(event)
                    last = (event.stream_version, version)
                    if (gt is not None and version <= gt) or (lte is not None and version > lte):
                        continue
                    selected.append(
                        StoredEvent(
                            originator_id=originator_id,
                            originator_version=version,
                            topic=event.event_type,
                            state=event.data,
                        )
                    )
                    if limit is not None and len(selected) >= limit:
                        break
            except StreamNotFound:
                return []
        if not desc and last is not None and limit is None:
            self._remember(stream_id, last)  # read to the end: the head is known
        return selected


class LetheDBApplicationRecorder(LetheDBAggregateRecorder, ApplicationRecorder):
    """Adds the notification log: the namespace's events (and every erasure) in log
    order, notification ids being LetheDB log positions."""

    def __init__(self, client: Client, namespace: str) -> None:
        super().__init__(client, namespace, purpose="events")

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        return self._insert(stored_events, **kwargs)

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        after = None if start is None else (start - 1 if inclusive_of_start else start)
        notifications: list[Notification] = []
        if limit <= 0:
            return notifications
        start = after if after is not None and after > 0 else None
        subscription = self.client.subscribe(
            after=start, filter=self.filter(topics), reconnect=False, batch_size=min(limit, 1000)
        )
        with translated_errors(), subscription:
            try:
                for item in subscription:
                    if isinstance(item, CaughtUp):
                        break
                    if stop is not None and item.position > stop:
                        break
                    if isinstance(item, Checkpoint):
                        continue
                    notification = self.notification(item, topics)
                    if notification is not None:
                        notifications.append(notification)
                        if len(notifications) >= limit:
                            break
            except PositionBeyondHead:
                return []
        return notifications

    def max_notification_id(self) -> int | None:
        with translated_errors():
            for event in self.client.read_all(backwards=True):
                if event.stream_id.startswith(self.prefix) or event.stream_id == ERASURE_STREAM:
                    return event.position
        return None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return LetheDBSubscription(self, gt=gt, topics=topics)

    def filter(self, topics: Sequence[str]) -> SubscriptionFilter:
        """Select this log on the server: by stream prefix and, when there are few
        enough topics, by event type; erasures unless ``topics`` leaves them out."""
        server_topics = tuple(topic for topic in topics if topic != FORGOTTEN_TOPIC)
        erasures = not topics or FORGOTTEN_TOPIC in topics
        if topics and not server_topics:  # only erasures wanted
            return SubscriptionFilter(stream_prefixes=(ERASURE_STREAM,), include_erasures=True)
        if len(server_topics) > MAX_FILTER_TOPICS:
            server_topics = ()  # filtered here instead
        return SubscriptionFilter(
            stream_prefixes=(self.prefix,), event_types=server_topics, include_erasures=erasures
        )

    def notification(self, event: RecordedEvent, topics: Sequence[str] = ()) -> Notification | None:
        """The notification for a delivered event: None for a redacted event (its data
        is gone; the erasure event that follows says so) or one outside ``topics``."""
        if event.stream_id == ERASURE_STREAM:
            if topics and FORGOTTEN_TOPIC not in topics:
                return None
            data = event.json()
            subject_id = str(data["subject_id"])
            return Notification(
                id=event.position,
                originator_id=subject_id,
                originator_version=event.position,
                topic=FORGOTTEN_TOPIC,
                state=forgotten_state(subject_id, str(data.get("reason", ""))),
            )
        if event.redacted or not event.stream_id.startswith(self.prefix):
            return None
        if topics and event.event_type not in topics:
            return None
        return Notification(
            id=event.position,
            originator_id=_originator_id(event.stream_id[len(self.prefix) :]),
            originator_version=_key(event),
            topic=event.event_type,
            state=event.data,
        )


@functools.lru_cache(maxsize=65_536)
def _originator_id(aggregate_id: str) -> UUID | str:
    """The aggregate id in a stream id, as the UUID it was when it is one (cached:
    an aggregate's events come together, and parsing UUIDs is a hot path)."""
    try:
        return UUID(aggregate_id)
    except ValueError:
        return aggregate_id


class LetheDBSubscription(Subscription[LetheDBApplicationRecorder]):
    """``subscribe()``: a LetheDB subscription (catch up, then follow live), as
    notifications. Redacted events are skipped; erasures arrive as notifications
    of :data:`FORGOTTEN_TOPIC`. A lost connection is resumed by the SDK."""

    def __init__(
        self,
        recorder: LetheDBApplicationRecorder,
        gt: int | None = None,
        topics: Sequence[str] = (),
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        start = gt if gt is not None and gt > 0 else None
        self._topics_given = tuple(topics)
        self._subscription = recorder.client.subscribe(after=start, filter=recorder.filter(topics))

    def stop(self) -> None:
        super().stop()
        self._subscription.close()

    def __next__(self) -> Notification:
        while not self._has_been_stopped:
            with translated_errors():
                item = next(self._subscription, None)
            if item is None or self._has_been_stopped:
                break
            if isinstance(item, RecordedEvent):
                notification = self._recorder.notification(item, self._topics_given)
                if notification is not None:
                    self._last_notification_id = notification.id
                    return notification
        raise StopIteration


class LetheDBTrackingRecorder(LetheDBRecorder, TrackingRecorder):
    """Tracking records as events of ``<namespace>/tracking/<upstream application>``.

    A record is refused (IntegrityError) unless its notification id is above
    the stream's last one, checked by the server through the expected version,
    so two processes cannot both record the same notification. Subclasses (a
    materialised view kept in LetheDB) use :meth:`record` to write their own
    events atomically with a tracking record.
    """

    def tracking_stream_id(self, application_name: str) -> str:
        return f"{self.namespace}/tracking/{application_name}"

    def tracking_part(self, tracking: Tracking) -> _Part:
        event = Event(TRACKING_EVENT_TYPE, b"", metadata=tracking.notification_id)
        return _Part(
            self.tracking_stream_id(tracking.application_name), [tracking.notification_id], [event]
        )

    def insert_tracking(self, tracking: Tracking) -> None:
        self._write([self.tracking_part(tracking)])

    def record(self, tracking: Tracking, *appends: Append) -> list[AppendResult]:
        """Commit ``appends`` (each with its own expected version) and the tracking
        record in one transaction: all or nothing. Results of ``appends``, in order."""
        results = self._write([self.tracking_part(tracking)], appends)
        return results[1:]

    def max_tracking_id(self, application_name: str) -> int | None:
        with translated_errors():
            last = self._last(self.tracking_stream_id(application_name))
        return None if last is None else _key(last)


class LetheDBProcessRecorder(LetheDBTrackingRecorder, LetheDBApplicationRecorder, ProcessRecorder):
    """Events and the tracking record of the notification they follow, in one commit."""

    def _tracked(self, kwargs: dict[str, Any]) -> list[_Part]:
        tracking: Tracking | None = kwargs.get("tracking")
        return [] if tracking is None else [self.tracking_part(tracking)]
