"""The `eventsourcing` library's own test cases, run unmodified against a real server.

Recorder test cases that count notification ids from 1 on an empty store (as
the library's do after dropping its tables) get a server of their own per test
(a start takes about a third of a second); the others share the module's server,
each test in a namespace of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    IntegrityError,
    ProcessRecorder,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)

# Modules, not names: a test case class imported by name would be collected and run too.
from eventsourcing.tests import application as application_cases
from eventsourcing.tests import persistence as persistence_cases
from eventsourcing.tests import projection as projection_cases
from eventsourcing.utils import Environment

import lethedb
from lethedb import Append, Event, StreamNotFound
from lethedb.eventsourcing import (
    LetheDBAggregateRecorder,
    LetheDBApplicationRecorder,
    LetheDBFactory,
    LetheDBProcessRecorder,
    LetheDBTrackingRecorder,
)
from tests.integration.serverproc import ServerProcess


class LetheDBTestMixin:
    """Gives each test ``address`` (of the module's server, or of its own one when the
    class sets ``FRESH_SERVER``), a ``namespace`` of its own, and clients closed after.

    The environment (``os.environ`` too, which applications read) selects this module;
    on a shared server it also sets LETHEDB_NAMESPACE, on a server of the test's own
    each application keeps its default namespace, its name.
    """

    FRESH_SERVER: ClassVar[bool] = False
    address: str
    namespace: str
    clients: list[lethedb.Client]

    @pytest.fixture(autouse=True)
    def _lethedb_server(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
        own: ServerProcess | None = None
        if self.FRESH_SERVER:
            own = ServerProcess(tmp_path / "data").start()
            self.address = own.address
        else:
            self.address = request.getfixturevalue("server").address
        self.namespace = f"t{uuid.uuid4().hex[:12]}"
        self.clients = []
        saved = dict(os.environ)
        os.environ.update(self.lethedb_env())
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)
            for client in self.clients:
                client.close()
            if own is not None:
                own.stop()

    def lethedb_env(self) -> dict[str, str]:
        env = {"PERSISTENCE_MODULE": "lethedb.eventsourcing", "LETHEDB_URI": self.address}
        if not self.FRESH_SERVER:
            env["LETHEDB_NAMESPACE"] = self.namespace
        return env

    def client(self) -> lethedb.Client:
        client = lethedb.Client(self.address)
        self.clients.append(client)
        return client


class TestAggregateRecorder(LetheDBTestMixin, persistence_cases.AggregateRecorderTestCase):
    def create_recorder(self) -> AggregateRecorder:
        return LetheDBAggregateRecorder(self.client(), self.namespace)


class TestApplicationRecorder(LetheDBTestMixin, persistence_cases.ApplicationRecorderTestCase):
    FRESH_SERVER = True

    def create_recorder(self) -> ApplicationRecorder:
        return LetheDBApplicationRecorder(self.client(), self.namespace)

    def test_insert_subscribe(self) -> None:
        self.optional_test_insert_subscribe()


class TestTrackingRecorder(LetheDBTestMixin, persistence_cases.TrackingRecorderTestCase):
    def create_recorder(self) -> TrackingRecorder:
        return LetheDBTrackingRecorder(self.client(), self.namespace)


class TestProcessRecorder(LetheDBTestMixin, persistence_cases.ProcessRecorderTestCase):
    def create_recorder(self) -> ProcessRecorder:
        return LetheDBProcessRecorder(self.client(), self.namespace)


class TestNonInterleavingNotificationIDs(
    LetheDBTestMixin, persistence_cases.NonInterleavingNotificationIDsBaseCase
):
    def create_recorder(self) -> ApplicationRecorder:
        return LetheDBApplicationRecorder(self.client(), self.namespace)


class TrackingRecorderSubclass(LetheDBTrackingRecorder):
    pass


class TestInfrastructureFactory(
    LetheDBTestMixin, persistence_cases.InfrastructureFactoryTestCase[LetheDBFactory]
):
    def setUp(self) -> None:
        self.env = Environment("TestCase", self.lethedb_env())
        super().setUp()

    def expected_factory_class(self) -> type[LetheDBFactory]:
        return LetheDBFactory

    def expected_aggregate_recorder_class(self) -> type[AggregateRecorder]:
        return LetheDBAggregateRecorder

    def expected_application_recorder_class(self) -> type[ApplicationRecorder]:
        return LetheDBApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[TrackingRecorder]:
        return LetheDBTrackingRecorder

    def tracking_recorder_subclass(self) -> type[TrackingRecorder]:
        return TrackingRecorderSubclass

    def expected_process_recorder_class(self) -> type[ProcessRecorder]:
        return LetheDBProcessRecorder


class TestExampleApplication(LetheDBTestMixin, application_cases.ExampleApplicationTestCase):
    FRESH_SERVER = True
    expected_factory_topic = "lethedb.eventsourcing:LetheDBFactory"


class TestApplication(LetheDBTestMixin, application_cases.ApplicationTestCase):
    FRESH_SERVER = True


class LetheDBEventCounters(LetheDBTrackingRecorder, projection_cases.EventCountersView):
    """The library's counters view kept in LetheDB: one stream per counter, each
    increment committed with its tracking record (both or neither)."""

    def _count(self, name: str) -> int:
        try:
            last = next(self.client.read_stream(self._stream(name), backwards=True, max_count=1))
        except StreamNotFound:
            return 0
        return last.stream_version + 1

    def _stream(self, name: str) -> str:
        return f"{self.namespace}/counters/{name}"

    def _increment(self, name: str, tracking: Tracking) -> None:
        self.record(tracking, Append(self._stream(name), Event("Incremented")))

    def get_created_event_counter(self) -> int:
        return self._count("created")

    def get_subsequent_event_counter(self) -> int:
        return self._count("subsequent")

    def incr_created_event_counter(self, tracking: Tracking) -> None:
        self._increment("created", tracking)

    def incr_subsequent_event_counter(self, tracking: Tracking) -> None:
        self._increment("subsequent", tracking)


class TestEventCountersView(LetheDBTestMixin, projection_cases.EventCountersViewTestCase):
    def construct_event_counters_view(self) -> projection_cases.EventCountersView:
        return LetheDBEventCounters(self.client(), self.namespace)


class TestAggregateEventCountersProjection(
    LetheDBTestMixin, projection_cases.AggregateEventCountersProjectionTestCase
):
    FRESH_SERVER = True
    view_class = LetheDBEventCounters

    def setUp(self) -> None:
        self.env = self.lethedb_env()


class TestEventSourcedProjection(LetheDBTestMixin, projection_cases.EventSourcedProjectionTestCase):
    FRESH_SERVER = True

    def setUp(self) -> None:
        self.env = self.lethedb_env()


def test_a_view_increment_and_its_tracking_record_are_atomic(server: ServerProcess) -> None:
    """A tracking record refused (IntegrityError) takes the view's own event with it."""
    with lethedb.Client(server.address) as client:
        view = LetheDBEventCounters(client, f"t{uuid.uuid4().hex[:12]}")
        view.incr_created_event_counter(Tracking("upstream", 5))
        with pytest.raises(IntegrityError):
            view.incr_created_event_counter(Tracking("upstream", 5))
        assert view.get_created_event_counter() == 1
        assert view.max_tracking_id("upstream") == 5


def test_a_page_holds_only_this_logs_notifications_up_to_stop(server: ServerProcess) -> None:
    """Pages are read from the whole log (another application's events skipped here),
    and from the server's filter once most of a read is another log's: either way a
    page holds this log's next notifications in order, up to ``limit`` and ``stop``."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    with lethedb.Client(server.address) as client:
        mine = LetheDBApplicationRecorder(client, f"{namespace}-mine")
        other = LetheDBApplicationRecorder(client, f"{namespace}-other")

        def write(recorder: LetheDBApplicationRecorder, count: int) -> list[int]:
            events = [StoredEvent(uuid.uuid4(), 1, "topic", b"{}") for _ in range(count)]
            return [nid for event in events for nid in recorder.insert_events([event]) or ()]

        ids = write(mine, 3)
        write(other, 20)  # a read of 8 from ids[0] is mostly the other log's
        ids += write(mine, 3)
        write(other, 1)
        ids += write(mine, 2)

        def page(start: int, limit: int, **kwargs: Any) -> list[int]:
            return [n.id for n in mine.select_notifications(start, limit, **kwargs)]

        assert page(ids[0], 8) == ids
        assert page(ids[0], 100) == ids
        assert page(ids[0], 2) == ids[:2]
        assert page(ids[0], 8, stop=ids[4]) == ids[:5]
        assert page(ids[2], 8, inclusive_of_start=False) == ids[3:]
        assert page(ids[3], 3, stop=ids[3] - 1) == []
        assert page(ids[-1], 8, inclusive_of_start=False) == []
        assert page(ids[-1] + 1000, 8) == []
