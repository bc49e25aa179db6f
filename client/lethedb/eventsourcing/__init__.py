"""LetheDB as a persistence module of the ``eventsourcing`` library (9.5 line).

Select it with ``PERSISTENCE_MODULE=lethedb.eventsourcing`` and point it at a
server with ``LETHEDB_URI`` (see docs/EVENTSOURCING.md for every setting).
Each aggregate sequence is a LetheDB stream, every event is encrypted under
the key of the data subject it is about, and :func:`forget` crypto-shreds a
subject: its aggregates then raise :class:`AggregateForgotten` and followers
of the application receive a :class:`SubjectWasForgotten` event.

This module talks to the server only through the public SDK (:mod:`lethedb`).
"""

from lethedb.eventsourcing._erasure import (
    FORGOTTEN_TOPIC,
    AggregateForgotten,
    SubjectMapper,
    SubjectStoredEvent,
    SubjectWasForgotten,
    forget,
    subject,
)
from lethedb.eventsourcing._factory import LetheDBFactory
from lethedb.eventsourcing._recorders import (
    LetheDBAggregateRecorder,
    LetheDBApplicationRecorder,
    LetheDBProcessRecorder,
    LetheDBSubscription,
    LetheDBTrackingRecorder,
)

# Topics (the library's names of classes, stored in events and environment
# variables) should name this package, not the private module a class lives in.
for _cls in (
    AggregateForgotten,
    LetheDBFactory,
    SubjectMapper,
    SubjectStoredEvent,
    LetheDBAggregateRecorder,
    LetheDBApplicationRecorder,
    LetheDBProcessRecorder,
    LetheDBSubscription,
    LetheDBTrackingRecorder,
):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "FORGOTTEN_TOPIC",
    "AggregateForgotten",
    "LetheDBAggregateRecorder",
    "LetheDBApplicationRecorder",
    "LetheDBFactory",
    "LetheDBProcessRecorder",
    "LetheDBSubscription",
    "LetheDBTrackingRecorder",
    "SubjectMapper",
    "SubjectStoredEvent",
    "SubjectWasForgotten",
    "forget",
    "subject",
]
