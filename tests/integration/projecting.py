"""Helpers for the projection tests: user events, and runners followed by a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import lethedb
from lethedb import Event
from lethedb.projections import Projection, ProjectionRunner

#: A restarted server is found again quickly (gRPC's default first backoff is 1 s).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def connect(address: str) -> lethedb.Client:
    return lethedb.Client(
        address, channel_options=FAST_RECONNECT, initial_backoff=0.05, max_backoff=0.5
    )


def head(db: lethedb.Client) -> int:
    return next((e.position for e in db.read_all(backwards=True, max_count=1)), 0)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Users:
    """Writes the example's user events: registrations, changes, noise between them."""

    def __init__(self, db: lethedb.Client, tag: str) -> None:
        self.db = db
        self.tag = tag

    def subject(self, n: int) -> str:
        return f"{self.tag}-{n:04d}"

    def register(self, n: int, name: str | None = None, email: str | None = None) -> str:
        subject = self.subject(n)
        self.db.append(
            f"user-{subject}",
            Event(
                "UserRegistered",
                {"name": name or f"User Number{n}", "email": email or f"user{n}@{self.tag}.test"},
                subject_id=subject,
            ),
        )
        return subject

    def change_email(self, n: int, email: str) -> None:
        subject = self.subject(n)
        self.db.append(
            f"user-{subject}", Event("EmailChanged", {"email": email}, subject_id=subject)
        )

    def rename(self, n: int, name: str) -> None:
        subject = self.subject(n)
        self.db.append(f"user-{subject}", Event("NameChanged", {"name": name}, subject_id=subject))

    def noise(self, count: int) -> None:
        self.db.append(f"orders-{self.tag}", [Event("OrderPlaced", {"n": i}) for i in range(count)])

    def populate(self, users: int) -> None:
        """*users* registrations with some changes and unrelated events between them."""
        for n in range(users):
            self.register(n)
            if n % 3 == 0:
                self.change_email(n, f"changed{n}@{self.tag}.test")
            if n % 4 == 0:
                self.rename(n, f"Renamed Person{n}")
            if n % 5 == 0:
                self.noise(7)


class Running:
    """A :class:`ProjectionRunner` in a thread of its own, stopped like a daemon is."""

    def __init__(
        self, projection: Projection, address: str, *, rebuild: bool = False, **options: object
    ) -> None:
        self.client = connect(address)
        self.runner = ProjectionRunner(projection, self.client, **options)  # type: ignore[arg-type]
        self.error: BaseException | None = None
        self.result: int | None = None
        self.thread = threading.Thread(target=self._run, args=(rebuild,))
        self.thread.start()

    def _run(self, rebuild: bool) -> None:
        try:
            self.result = self.runner.run(rebuild=rebuild)
        except BaseException as exc:
            self.error = exc

    def wait_position(self, position: int, timeout: float = 30.0) -> None:
        def reached() -> bool:
            if self.error is not None:
                raise self.error
            return self.runner.position >= position

        wait_for(reached, timeout, f"the projection to reach position {position}")

    def stop(self) -> int:
        self.runner.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.client.close()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def run_until_caught_up(projection: Projection, address: str, *, rebuild: bool = False) -> int:
    """Catch up (a rebuild, with ``rebuild``) and return the checkpoint; the log is quiet."""
    with connect(address) as db:
        runner = ProjectionRunner(projection, db, until_caught_up=True)
        return runner.run(rebuild=rebuild)
