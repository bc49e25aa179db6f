"""Customer accounts with the ``eventsourcing`` library on LetheDB, a SQLite projection
of them, and the right to erasure carried through both.

* :class:`CustomerAccounts` is an ordinary ``eventsourcing`` application. Run with
  ``PERSISTENCE_MODULE=lethedb.eventsourcing`` its events live in LetheDB, each
  encrypted under the key of its customer (the aggregate id is the data subject,
  the module's default), and so are its snapshots.
* :class:`CustomersView` is a SQLite table of customers, kept by the library's
  projection runner (``eventsourcing.sqlite``); each update is committed with its
  tracking record in one SQLite transaction, so it is applied exactly once.
* :meth:`CustomerAccounts.forget_customer` forgets a customer: the customer's
  aggregate and snapshots can never be read again (``AggregateForgotten``), and the
  projection receives ``SubjectWasForgotten`` and deletes the row, with SQLite's
  ``secure_delete`` so the bytes are overwritten in the file too.

Run it against a server (``make run`` in another shell), from the repository root::

    LETHEDB_URI=127.0.0.1:50051 python -m examples.customer_accounts
"""

from __future__ import annotations

import os
import tempfile
from decimal import Decimal
from functools import singledispatchmethod
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection, ProjectionRunner
from eventsourcing.sqlite import SQLiteTrackingRecorder
from eventsourcing.utils import get_topic

from lethedb import SubjectReceipt
from lethedb.eventsourcing import FORGOTTEN_TOPIC, SubjectWasForgotten, forget


class InsufficientFundsError(Exception):
    """A withdrawal larger than the balance."""


class Customer(Aggregate):
    """A customer and their account balance; the aggregate id is the data subject."""

    class Registered(Aggregate.Created):
        name: str
        email: str

    class EmailChanged(Aggregate.Event):
        email: str

    class Deposited(Aggregate.Event):
        amount: Decimal

    class Withdrawn(Aggregate.Event):
        amount: Decimal

    @event(Registered)
    def __init__(self, name: str, email: str) -> None:
        self.name = name
        self.email = email
        self.balance = Decimal("0.00")

    @event(EmailChanged)
    def change_email(self, email: str) -> None:
        self.email = email

    @event(Deposited)
    def deposit(self, amount: Decimal) -> None:
        self.balance += amount

    def withdraw(self, amount: Decimal) -> None:
        if amount > self.balance:
            raise InsufficientFundsError(f"balance {self.balance} is less than {amount}")
        self._withdrawn(amount)

    @event(Withdrawn)
    def _withdrawn(self, amount: Decimal) -> None:
        self.balance -= amount


class CustomerAccounts(Application[UUID]):
    """Register customers, move money, and forget a customer on request."""

    snapshotting_intervals = {Customer: 5}  # noqa: RUF012 (the library's class attribute)

    def register(self, name: str, email: str) -> UUID:
        customer = Customer(name, email)
        self.save(customer)
        return customer.id

    def change_email(self, customer_id: UUID, email: str) -> None:
        customer = self.get_customer(customer_id)
        customer.change_email(email)
        self.save(customer)

    def deposit(self, customer_id: UUID, amount: Decimal) -> None:
        customer = self.get_customer(customer_id)
        customer.deposit(amount)
        self.save(customer)

    def withdraw(self, customer_id: UUID, amount: Decimal) -> None:
        customer = self.get_customer(customer_id)
        customer.withdraw(amount)
        self.save(customer)

    def get_customer(self, customer_id: UUID) -> Customer:
        customer: Customer = self.repository.get(customer_id)
        return customer

    def forget_customer(self, customer_id: UUID) -> SubjectReceipt:
        """Erase a customer (GDPR art. 17): crypto-shreds every event and snapshot."""
        return forget(self, str(customer_id), reason="gdpr-art17")


class CustomersView(SQLiteTrackingRecorder):
    """Table ``customers(id, name, email, balance)``, updated with its tracking record
    in one transaction."""

    def construct_create_table_statements(self) -> list[str]:
        statements = super().construct_create_table_statements()
        statements.append(
            "CREATE TABLE IF NOT EXISTS customers ("
            "id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, "
            "balance TEXT NOT NULL)"
        )
        return statements

    def _write(self, tracking: Tracking, statement: str, params: tuple[Any, ...]) -> None:
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute("PRAGMA secure_delete = ON")  # a DELETE overwrites the bytes
            cursor.execute(statement, params)
            self._insert_tracking(cursor, tracking)

    def registered(self, customer_id: UUID, name: str, email: str, tracking: Tracking) -> None:
        self._write(
            tracking,
            "INSERT INTO customers VALUES (?, ?, ?, '0.00') ON CONFLICT (id) DO NOTHING",
            (str(customer_id), name, email),
        )

    def email_changed(self, customer_id: UUID, email: str, tracking: Tracking) -> None:
        self._write(
            tracking, "UPDATE customers SET email = ? WHERE id = ?", (email, str(customer_id))
        )

    def balance_changed(self, customer_id: UUID, delta: Decimal, tracking: Tracking) -> None:
        row = self.get(customer_id)
        balance = Decimal(row["balance"]) + delta if row else delta
        self._write(
            tracking,
            "UPDATE customers SET balance = ? WHERE id = ?",
            (str(balance), str(customer_id)),
        )

    def forget(self, subject_id: str, tracking: Tracking) -> None:
        """Delete everything derived from the subject (a no-op for a stranger)."""
        self._write(tracking, "DELETE FROM customers WHERE id = ?", (subject_id,))

    def get(self, customer_id: UUID) -> dict[str, str] | None:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                "SELECT id, name, email, balance FROM customers WHERE id = ?", (str(customer_id),)
            )
            row = cursor.fetchone()
        return None if row is None else {key: row[key] for key in row.keys()}  # noqa: SIM118


class CustomersProjection(Projection[CustomersView]):
    """Keeps :class:`CustomersView` from the application's events and erasures."""

    name = "customers_view"
    topics = (
        get_topic(Customer.Registered),
        get_topic(Customer.EmailChanged),
        get_topic(Customer.Deposited),
        get_topic(Customer.Withdrawn),
        FORGOTTEN_TOPIC,
    )

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)  # nothing to derive; progress still moves

    @process_event.register
    def _(self, domain_event: Customer.Registered, tracking: Tracking) -> None:
        self.view.registered(
            domain_event.originator_id, domain_event.name, domain_event.email, tracking
        )

    @process_event.register
    def _(self, domain_event: Customer.EmailChanged, tracking: Tracking) -> None:
        self.view.email_changed(domain_event.originator_id, domain_event.email, tracking)

    @process_event.register
    def _(self, domain_event: Customer.Deposited, tracking: Tracking) -> None:
        self.view.balance_changed(domain_event.originator_id, domain_event.amount, tracking)

    @process_event.register
    def _(self, domain_event: Customer.Withdrawn, tracking: Tracking) -> None:
        self.view.balance_changed(domain_event.originator_id, -domain_event.amount, tracking)

    @process_event.register
    def _(self, domain_event: SubjectWasForgotten, tracking: Tracking) -> None:
        self.view.forget(domain_event.subject_id, tracking)


def runner_env(sqlite_path: Path, namespace: str | None = None) -> dict[str, str]:
    """The environment: the application on LetheDB (``LETHEDB_URI`` from the process
    environment), the projection's view in a SQLite file."""
    env = {
        "PERSISTENCE_MODULE": "lethedb.eventsourcing",
        "CUSTOMERS_VIEW_PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "CUSTOMERS_VIEW_SQLITE_DBNAME": str(sqlite_path),
    }
    if namespace is not None:
        env["CUSTOMERACCOUNTS_LETHEDB_NAMESPACE"] = namespace
    return env


def main() -> None:
    """Register two customers, forget one, and show what the view holds."""
    os.environ.setdefault("LETHEDB_URI", "127.0.0.1:50051")
    with (
        tempfile.TemporaryDirectory() as tmp,
        ProjectionRunner(
            application_class=CustomerAccounts,
            projection_class=CustomersProjection,
            view_class=CustomersView,
            env=runner_env(Path(tmp) / "customers.db"),
        ) as runner,
    ):
        app, view = runner.app, runner.projection.view
        ada = app.register("Ada Lovelace", "ada@example.com")
        app.deposit(ada, Decimal("10.00"))
        receipt = app.forget_customer(ada)
        view.wait(app.name, receipt.tombstone_position, timeout=10)
        print("erasure receipt:", receipt.state.value)
        print("view row after the erasure:", view.get(ada))


if __name__ == "__main__":
    main()
