"""Whose personal data an event carries, and what forgetting that person does.

LetheDB encrypts every event under the key of its data subject and forgets a
subject by destroying that key. An ``eventsourcing`` application says who the
subject of each event class is with :func:`subject` (by default the aggregate
id); :class:`SubjectMapper` puts that subject on each stored event for the
recorder, :func:`forget` erases a subject, and followers of the application
receive :class:`SubjectWasForgotten` so they can delete what they derived.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from eventsourcing.application import Application
from eventsourcing.domain import DomainEventProtocol, TAggregateID
from eventsourcing.persistence import Mapper, PersistenceError, StoredEvent
from eventsourcing.utils import get_topic

from lethedb import SubjectReceipt

__all__ = [
    "FORGOTTEN_TOPIC",
    "AggregateForgotten",
    "SubjectMapper",
    "SubjectSelector",
    "SubjectStoredEvent",
    "SubjectWasForgotten",
    "forget",
    "subject",
]

SUBJECT_ATTRIBUTE: Final = "__lethedb_subject__"

SubjectSelector = str | Callable[[Any], object] | None
"""An attribute name of the event, a function of the event, or None (no personal data)."""

_Class = TypeVar("_Class", bound=type)


def subject(selector: SubjectSelector) -> Callable[[_Class], _Class]:
    """Class decorator: say whose personal data the events of this class carry.

    ``selector`` is the name of an attribute of the event holding the subject
    id (``@subject("customer_id")``), a function of the event returning it, or
    ``None`` for events that hold no personal data (stored under the store's
    key, never erased). Subclasses inherit it, so decorating an aggregate's
    base ``Event`` class covers all its events. Without it, an event's subject
    is its aggregate's id.
    """

    def decorate(cls: _Class) -> _Class:
        setattr(cls, SUBJECT_ATTRIBUTE, selector)
        return cls

    return decorate


def subject_of(domain_event: object) -> str:
    """The subject id of an event: what its class's :func:`subject` selects, else its
    aggregate id; ``""`` for an event without personal data."""
    cls = type(domain_event)
    if not hasattr(cls, SUBJECT_ATTRIBUTE):
        return str(getattr(domain_event, "originator_id", ""))
    selector: SubjectSelector = getattr(cls, SUBJECT_ATTRIBUTE)
    if selector is None:
        return ""
    if isinstance(selector, str):
        if not hasattr(domain_event, selector):
            raise TypeError(
                f"{cls.__qualname__} has no attribute {selector!r}, which @subject names as "
                "the holder of its subject id"
            )
        value = getattr(domain_event, selector)
    else:
        value = selector(domain_event)
    return "" if value is None else str(value)


@dataclass(frozen=True)
class SubjectStoredEvent(StoredEvent):
    """A stored event that knows its data subject (set by :class:`SubjectMapper`)."""

    subject_id: str = ""


FORGOTTEN_TOPIC: Final = "lethedb.eventsourcing:SubjectWasForgotten"


@dataclass(frozen=True)
class SubjectWasForgotten:
    """A data subject was forgotten: delete everything derived from their events.

    Delivered to every follower of a LetheDB-backed application (projections,
    process applications, ``subscribe()``) at the log position of the erasure,
    whatever application the subject's events belonged to: deleting what was
    never derived is a no-op. ``originator_id`` is the subject id and
    ``originator_version`` the erasure's log position. ``reason`` is the short
    code given to :func:`forget`.
    """

    originator_id: str
    originator_version: int
    subject_id: str
    reason: str


class SubjectMapper(Mapper[TAggregateID]):
    """The library's mapper, plus the data subject of each event.

    ``to_stored_event`` returns :class:`SubjectStoredEvent` objects carrying
    :func:`subject_of` the event, which the LetheDB recorders encrypt it
    under. ``to_domain_event`` turns the recorders' erasure notifications into
    :class:`SubjectWasForgotten` events, whatever transcoder, cipher or
    compressor the application uses.
    """

    def to_stored_event(self, domain_event: DomainEventProtocol[TAggregateID]) -> StoredEvent:
        stored = super().to_stored_event(domain_event)
        return SubjectStoredEvent(
            originator_id=stored.originator_id,
            originator_version=stored.originator_version,
            topic=stored.topic,
            state=stored.state,
            subject_id=subject_of(domain_event),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[TAggregateID]:
        if stored_event.topic == FORGOTTEN_TOPIC:
            return forgotten_event(stored_event)  # type: ignore[return-value]
        return super().to_domain_event(stored_event)


def forgotten_event(stored_event: StoredEvent) -> SubjectWasForgotten:
    """Decode an erasure notification made by :func:`forgotten_state`."""
    data = json.loads(stored_event.state)
    return SubjectWasForgotten(
        originator_id=str(stored_event.originator_id),
        originator_version=stored_event.originator_version,
        subject_id=str(data["subject_id"]),
        reason=str(data.get("reason", "")),
    )


def forgotten_state(subject_id: str, reason: str) -> bytes:
    """The state of an erasure notification: plain JSON, readable by the default
    transcoder even without :class:`SubjectMapper`."""
    return json.dumps({"subject_id": subject_id, "reason": reason}).encode()


# Followers filter and dispatch on topics: give it its public name, not this module's.
SubjectWasForgotten.__module__ = "lethedb.eventsourcing"
assert get_topic(SubjectWasForgotten) == FORGOTTEN_TOPIC


class AggregateForgotten(PersistenceError):
    """The aggregate's data subject was forgotten: its events (and snapshots) can never
    be read again, and nothing more can be written for that subject.

    Raised by ``repository.get`` (through the recorder) instead of a decoding
    error. ``aggregate_id`` and ``subject_id`` say which aggregate and whose erasure.
    """

    def __init__(self, message: str, *, aggregate_id: str, subject_id: str) -> None:
        super().__init__(message)
        self.aggregate_id = aggregate_id
        self.subject_id = subject_id


def forget(
    app: Application[Any], subject_id: str, *, reason: str = "unspecified"
) -> SubjectReceipt:
    """Forget a data subject of a LetheDB-backed application (right to erasure).

    Every event and snapshot of the subject becomes unreadable for ever (its
    key is destroyed), the subject id can never be written to again, and every
    follower receives a :class:`SubjectWasForgotten` event. The application's
    aggregate cache is emptied, so no copy of the subject's aggregates survives
    in memory. Needs a token with the admin role. ``reason`` is stored in clear:
    a short code, no personal data. Returns the erasure receipt.
    """
    recorder: object = app.recorder
    if not hasattr(recorder, "forget_subject"):
        raise TypeError(
            f"{type(app).__name__} does not persist in LetheDB (its recorder is "
            f"{type(recorder).__name__}); set PERSISTENCE_MODULE=lethedb.eventsourcing"
        )
    receipt = recorder.forget_subject(subject_id, reason=reason)
    cache = app.repository.cache
    if cache is not None:
        cache.cache.clear()
    assert isinstance(receipt, SubjectReceipt)
    return receipt
