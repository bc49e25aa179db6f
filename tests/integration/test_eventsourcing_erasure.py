"""Per-subject encryption and erasure for eventsourcing applications on LetheDB:
which subject each event is stored under, and what forgetting one does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import singledispatchmethod
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import ProcessApplication, SingleThreadedRunner, System

import lethedb
from lethedb.eventsourcing import AggregateForgotten, SubjectWasForgotten, forget, subject
from tests.integration.serverproc import ServerProcess


class Person(Aggregate):
    """No declaration: every event's subject is the aggregate id."""

    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name


class Order(Aggregate):
    """Every event names the customer whose data it is."""

    @subject("customer_id")
    class Event(Aggregate.Event):
        customer_id: str

    class Placed(Event, Aggregate.Created):
        item: str

    class Shipped(Event):
        address: str

    @event(Placed)
    def __init__(self, customer_id: str, item: str) -> None:
        self.customer_id = customer_id
        self.item = item

    @event(Shipped)
    def ship(self, customer_id: str, address: str) -> None:
        self.address = address


class Parcel(Aggregate):
    """Mixed: the label holds the recipient's data, the weighing none."""

    @subject(lambda e: e.recipient.lower())
    class Labelled(Aggregate.Created):
        recipient: str

    @subject(None)
    class Weighed(Aggregate.Event):
        grams: int

    @event(Labelled)
    def __init__(self, recipient: str) -> None:
        self.recipient = recipient

    @event(Weighed)
    def weigh(self, grams: int) -> None:
        self.grams = grams


@pytest.fixture
def app(server: ServerProcess) -> Iterator[Application[UUID]]:
    env = {
        "PERSISTENCE_MODULE": "lethedb.eventsourcing",
        "LETHEDB_URI": server.address,
        "LETHEDB_NAMESPACE": f"t{uuid.uuid4().hex[:12]}",
        "IS_SNAPSHOTTING_ENABLED": "y",
    }
    with Application[UUID](env=env) as application:
        yield application


@pytest.fixture
def db(server: ServerProcess) -> Iterator[lethedb.Client]:
    with lethedb.Client(server.address) as client:
        yield client


def subjects(
    db: lethedb.Client, app: Application[Any], purpose: str, aggregate_id: UUID
) -> list[str]:
    namespace = app.factory.env.get("LETHEDB_NAMESPACE")
    stream = f"{namespace}/{purpose}/{aggregate_id}"
    return [recorded.subject_id for recorded in db.read_stream(stream)]


def test_by_default_the_aggregate_id_is_the_subject_and_snapshots_share_it(app, db):
    person = Person("Ada")
    app.save(person)
    app.take_snapshot(person.id)
    assert subjects(db, app, "events", person.id) == [str(person.id)]
    assert subjects(db, app, "snapshots", person.id) == [str(person.id)]


def test_an_attribute_names_the_subject(app, db):
    customer = f"customer-{uuid.uuid4().hex[:8]}"
    order = Order(customer, "teapot")
    order.ship(customer, "1 Lovelace Lane")
    app.save(order)
    app.take_snapshot(order.id)
    assert subjects(db, app, "events", order.id) == [customer, customer]
    assert subjects(db, app, "snapshots", order.id) == [customer]  # the aggregate's subject

    forget(app, customer, reason="test")

    with pytest.raises(AggregateForgotten) as raised:
        app.repository.get(order.id)
    assert raised.value.subject_id == customer
    assert raised.value.aggregate_id == str(order.id)
    assert app.snapshots is not None
    with pytest.raises(AggregateForgotten):
        list(app.snapshots.get(order.id))
    with pytest.raises(AggregateForgotten, match="forgotten"):  # nothing new for them
        app.save(Order(customer, "kettle"))


def test_a_function_names_the_subject_and_none_means_no_personal_data(app, db):
    recipient = f"Recipient-{uuid.uuid4().hex[:8]}"
    parcel = Parcel(recipient)
    parcel.weigh(1200)
    app.save(parcel)
    assert subjects(db, app, "events", parcel.id) == [recipient.lower(), ""]

    forget(app, recipient.lower(), reason="test")

    with pytest.raises(AggregateForgotten):  # one of its events is unreadable
        app.repository.get(parcel.id)
    weighed = list(db.read_stream(f"{app.factory.env.get('LETHEDB_NAMESPACE')}/events/{parcel.id}"))
    assert weighed[0].redacted
    assert not weighed[1].redacted  # the event without personal data survives


def test_forget_empties_the_aggregate_cache(server: ServerProcess):
    env = {
        "PERSISTENCE_MODULE": "lethedb.eventsourcing",
        "LETHEDB_URI": server.address,
        "LETHEDB_NAMESPACE": f"t{uuid.uuid4().hex[:12]}",
        "AGGREGATE_CACHE_MAXSIZE": "100",
        "AGGREGATE_CACHE_FASTFORWARD": "n",  # a cached aggregate is returned unread
    }
    with Application[UUID](env=env) as app:
        person = Person("Ada")
        app.save(person)
        assert app.repository.get(person.id).name == "Ada"  # now cached
        forget(app, str(person.id))
        with pytest.raises(AggregateForgotten):
            app.repository.get(person.id)


def test_forget_refuses_an_application_not_on_lethedb():
    with (
        Application[UUID](env={"PERSISTENCE_MODULE": "eventsourcing.popo"}) as app,
        pytest.raises(TypeError, match=r"PERSISTENCE_MODULE=lethedb\.eventsourcing"),
    ):
        forget(app, "anyone")


class Misdeclared(Aggregate):
    @subject("customer_id")
    class Created(Aggregate.Created):
        pass

    @event(Created)
    def __init__(self) -> None:
        pass


def test_a_subject_attribute_the_event_lacks_is_a_clear_error_and_writes_nothing(app):
    aggregate = Misdeclared()
    with pytest.raises(TypeError, match="has no attribute 'customer_id'"):
        app.save(aggregate)
    assert app.recorder.select_events(aggregate.id) == []


def test_writing_after_a_forgotten_subjects_event_is_refused_clearly(app, server):
    """Another process (no cached head) appends to an aggregate whose last event is
    redacted: its version is unreadable, so the write is refused with AggregateForgotten."""
    recipient = f"recipient-{uuid.uuid4().hex[:8]}"
    parcel = Parcel(recipient)
    app.save(parcel)
    forget(app, recipient, reason="test")
    parcel.weigh(900)  # an event without personal data
    env = dict(app.env)
    with Application[UUID](env=env) as other, pytest.raises(AggregateForgotten) as raised:
        other.save(parcel)
    assert raised.value.subject_id == recipient


class Greeter(ProcessApplication[UUID]):
    """Derives a greeting from each registered person; forgets it on the erasure."""

    def __init__(self, env: Any = None) -> None:
        super().__init__(env)
        self.greetings: dict[str, str] = {}

    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        pass

    @policy.register
    def _(self, domain_event: Person.Registered, processing_event: ProcessingEvent[UUID]) -> None:
        self.greetings[str(domain_event.originator_id)] = f"Hello {domain_event.name}"

    @policy.register
    def _(self, domain_event: SubjectWasForgotten, processing_event: ProcessingEvent[UUID]) -> None:
        self.greetings.pop(domain_event.subject_id, None)


class People(Application[UUID]):
    pass


def test_a_process_application_receives_the_erasure_at_its_next_pull(fresh_server):
    system = System(pipes=[[People, Greeter]])
    env = {"PERSISTENCE_MODULE": "lethedb.eventsourcing", "LETHEDB_URI": fresh_server.address}
    runner = SingleThreadedRunner[UUID](system, env=env)
    runner.start()
    try:
        people, greeter = runner.get(People), runner.get(Greeter)
        ada, bob = Person("Ada"), Person("Bob")
        people.save(ada, bob)  # prompts the greeter, which pulls and processes
        assert greeter.greetings == {str(ada.id): "Hello Ada", str(bob.id): "Hello Bob"}

        receipt = forget(people, str(ada.id), reason="test")
        greeter.pull_and_process("People")  # a save by People would prompt the same pull

        assert greeter.greetings == {str(bob.id): "Hello Bob"}
        assert greeter.recorder.max_tracking_id("People") == receipt.tombstone_position
    finally:
        runner.stop()
