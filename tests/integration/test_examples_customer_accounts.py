"""examples/customer_accounts.py: an eventsourcing application on a real server, its
SQLite projection, and a customer forgotten through both."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from eventsourcing.projection import ProjectionRunner

from examples.customer_accounts import (
    CustomerAccounts,
    CustomersProjection,
    CustomersView,
    runner_env,
)
from lethedb import SubjectState
from lethedb.eventsourcing import AggregateForgotten, SubjectWasForgotten
from tests.integration.serverproc import ServerProcess

Runner = ProjectionRunner[CustomerAccounts, CustomersView]


@pytest.fixture
def runner(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runner]:
    monkeypatch.setenv("LETHEDB_URI", server.address)
    env = runner_env(tmp_path / "customers.db", namespace=f"t{uuid.uuid4().hex[:12]}")
    with ProjectionRunner(
        application_class=CustomerAccounts,
        projection_class=CustomersProjection,
        view_class=CustomersView,
        env=env,
    ) as running:
        yield running


def test_the_projection_follows_the_application(runner: Runner):
    app, view = runner.app, runner.projection.view
    ada = app.register("Ada Lovelace", "ada@example.com")
    app.deposit(ada, Decimal("10.00"))
    app.withdraw(ada, Decimal("2.50"))
    app.change_email(ada, "ada@analytical.engine")
    view.wait(app.name, app.recorder.max_notification_id(), timeout=10)

    assert view.get(ada) == {
        "id": str(ada),
        "name": "Ada Lovelace",
        "email": "ada@analytical.engine",
        "balance": "7.50",
    }
    assert app.get_customer(ada).balance == Decimal("7.50")


def test_forgetting_a_customer_erases_aggregate_snapshots_and_projected_row(
    runner: Runner, tmp_path: Path
):
    app, view = runner.app, runner.projection.view
    canary = f"quokka-{uuid.uuid4().hex}@canary.test"
    ada = app.register("Zanzibar Quokka", canary)
    for _ in range(5):  # snapshot every 5 events: a snapshot of ada exists
        app.deposit(ada, Decimal("1.00"))
    bob = app.register("Bob", "bob@example.com")
    assert app.snapshots is not None
    assert list(app.snapshots.get(ada))
    view.wait(app.name, app.recorder.max_notification_id(), timeout=10)
    assert view.get(ada) is not None

    receipt = app.forget_customer(ada)

    assert receipt.state is SubjectState.FORGOTTEN_PENDING_SHRED
    with pytest.raises(AggregateForgotten) as raised:
        app.get_customer(ada)
    assert raised.value.subject_id == str(ada)
    assert "forgotten" in str(raised.value)
    with pytest.raises(AggregateForgotten):
        list(app.snapshots.get(ada))
    with pytest.raises(AggregateForgotten):  # nor can anything be written for ada
        app.deposit(ada, Decimal("1.00"))
    assert app.get_customer(bob).name == "Bob"  # the others are untouched

    view.wait(app.name, receipt.tombstone_position, timeout=10)
    assert view.get(ada) is None
    assert view.get(bob) is not None


def test_followers_receive_the_erasure_and_no_redacted_event(runner: Runner):
    app = runner.app
    ada = app.register("Ada", "ada@example.com")
    before = app.recorder.max_notification_id()
    receipt = app.forget_customer(ada)

    notifications = app.recorder.select_notifications(start=None, limit=1000)
    erasures = [n for n in notifications if n.id == receipt.tombstone_position]
    assert len(erasures) == 1
    forgotten = app.mapper.to_domain_event(erasures[0])
    assert isinstance(forgotten, SubjectWasForgotten)
    assert forgotten.subject_id == str(ada)
    assert forgotten.reason == "gdpr-art17"
    # ada's own events are redacted: the log leaves them out rather than hand
    # followers something they cannot decode.
    assert all(n.originator_id != ada for n in notifications)
    assert before is not None
    assert app.recorder.max_notification_id() == receipt.tombstone_position


def test_the_projected_row_is_gone_from_the_file(runner: Runner, tmp_path: Path):
    app, view = runner.app, runner.projection.view
    canary = f"quokka-{uuid.uuid4().hex}@canary.test"
    ada = app.register("Zanzibar Quokka", canary)
    view.wait(app.name, app.recorder.max_notification_id(), timeout=10)
    assert any(canary.encode() in data for data in _files(view, tmp_path))  # the check bites
    receipt = app.forget_customer(ada)
    view.wait(app.name, receipt.tombstone_position, timeout=10)
    assert all(canary.encode() not in data for data in _files(view, tmp_path))


def _files(view: CustomersView, directory: Path) -> list[bytes]:
    """The bytes of the view's database files, after a checkpoint of its log."""
    with view.datastore.transaction(commit=True) as cursor:
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    paths = [path for path in directory.iterdir() if path.name.startswith("customers.db")]
    assert paths
    return [path.read_bytes() for path in paths]
