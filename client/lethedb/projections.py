"""Projections: derived stores that follow the log with exactly-once effects.

A projection is a class with one handler per event type and a ``forget``
method, run by :class:`ProjectionRunner` (or ``lethedb project``) as a daemon
that follows the log::

    from lethedb.projections import SQLiteProjection, handles

    class Users(SQLiteProjection):
        schema = '''
            CREATE TABLE IF NOT EXISTS users (subject_id TEXT PRIMARY KEY, email TEXT);
        '''

        @handles("UserRegistered")
        def registered(self, event):
            self.db.execute("INSERT OR REPLACE INTO users VALUES (?, ?)",
                            (event.subject_id, event.json()["email"]))

        @handles("EmailChanged")
        def email_changed(self, event):
            self.db.execute("UPDATE users SET email = ? WHERE subject_id = ?",
                            (event.json()["email"], event.subject_id))

        def forget(self, subject_id):
            self.db.execute("DELETE FROM users WHERE subject_id = ?", (subject_id,))

    $ lethedb project myapp.projections:Users --db users.db [--group users] [--rebuild]

**Handlers.** A method decorated with ``@handles("TypeA", "TypeB")`` is
called with each :class:`~lethedb.RecordedEvent` of those types, in log
order (a decorator rather than a naming rule, because event types need not be
Python identifiers: ``order.placed``). Events of other types are not even
sent: the runner subscribes with a server-side filter on the handled types.
Events of forgotten subjects arrive *redacted* (no data); they are skipped
unless the class sets ``handle_redacted = True``, as their subject's erasure
event follows them in the log anyway.

**Erasure.** Every projection must implement ``forget(subject_id)``: the
runner calls it for each ``$subject.forgotten`` event (stream ``$erasures``)
and it must delete everything derived from that subject. A projection that
stores nothing personal implements it as a no-op, explicitly: the runner
refuses a class without one.

**Exactly-once effects.** The runner hands each batch of events (one server
message, up to 512 events) to :meth:`Projection.apply`, which handles them
*and* stores the batch's last position as the projection's checkpoint in one
transaction of the projection's own store. A crash can therefore never
separate an effect from its checkpoint: after a restart the runner resumes
after the stored checkpoint and every event has been applied exactly once.
``apply`` also reads the checkpoint inside its transaction and skips events
at or before it, so re-delivered events (a consumer group's rebalance, a
second runner on the same store) change nothing.
:class:`SQLiteProjection` implements this with one SQLite transaction; the
Redis example in ``examples/redis_cache.py`` with MULTI/EXEC.

**Groups.** The local checkpoint is authoritative: the runner subscribes
after it. With a consumer group (``--group``) the runner also commits the
local checkpoint to the server's group checkpoint, after local commits (at
most once per ``group_commit_interval`` seconds, when caught up, and when
stopping), so operators can watch the projection's progress on the server
(``GetCheckpoint``) and a second runner with the same group and member id
replaces the first instead of writing beside it. At start the runner sets the
group's checkpoint to the local one (also backwards, after a rebuild); if
the group has live members that refuse it and the group would restart after
the local checkpoint, it stops with an error rather than skip events. Its
token needs the ``consumer`` role; moving the group's checkpoint back (a
rebuild, or a local store restored from an older copy) needs ``admin``, so
such a start with a consumer token stops with :class:`ProjectionError`
saying so: run the rebuild once with an admin token (``--until-caught-up``),
then the daemon with its own token again. A
projection must be its group's only member: members share the events by
subject, so each would see only part of the log; a runner whose group gets a
second member stops with :class:`ProjectionError`.

**Rebuild.** :meth:`Projection.reset` drops the projection's state and
checkpoint; the runner then replays from position 0 (``--rebuild``).

This module knows nothing of the server package and must not import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from lethedb._client import Client
from lethedb._exceptions import LetheError, NotGroupMember, PermissionDenied, Unavailable
from lethedb._models import (
    CaughtUp,
    Checkpoint,
    GroupAssignment,
    RecordedEvent,
    SubscriptionFilter,
)
from lethedb._subscriptions import Subscription
from lethedb_contract import ERASURE_EVENT_TYPE, ERASURE_STREAM

__all__ = [
    "ERASURE_EVENT_TYPE",
    "ERASURE_STREAM",
    "Projection",
    "ProjectionError",
    "ProjectionRunner",
    "SQLiteProjection",
    "handles",
]

log = logging.getLogger("lethedb.projections")

#: The member id a runner uses in its group unless told otherwise: a second
#: runner of the same group then replaces the first instead of joining it.
DEFAULT_MEMBER_ID: Final = "projection"

_HANDLES_ATTR: Final = "__lethedb_handles__"
_Handler = TypeVar("_Handler", bound=Callable[..., Any])
_Result = TypeVar("_Result")


class _Stopped(Exception):
    """stop() was called while the runner waited for the server at start-up."""


class ProjectionError(LetheError):
    """A projection cannot run correctly as configured (and stopped before doing harm)."""


def handles(*event_types: str) -> Callable[[_Handler], _Handler]:
    """Mark a projection method as the handler of these event types.

    The method is called as ``handler(self, event)`` with a
    :class:`~lethedb.RecordedEvent`. One event type has one handler per class
    (a subclass may override it).
    """
    if not event_types or not all(isinstance(t, str) and t for t in event_types):
        raise TypeError("@handles needs one or more non-empty event type strings")

    def mark(function: _Handler) -> _Handler:
        setattr(function, _HANDLES_ATTR, (*getattr(function, _HANDLES_ATTR, ()), *event_types))
        return function

    return mark


class Projection:
    """Base of every projection: handler dispatch, and the store contract the runner uses.

    A store-specific subclass (:class:`SQLiteProjection`) implements
    :meth:`open`, :meth:`close`, :meth:`checkpoint`, :meth:`apply` and
    :meth:`reset`; an application's class adds ``@handles`` methods and
    :meth:`forget`.
    """

    #: Deliver events of forgotten subjects (redacted: no data) to handlers.
    handle_redacted: ClassVar[bool] = False
    #: Event type -> name of its handler method (filled per class).
    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            own: dict[str, str] = {}
            for name, attribute in vars(klass).items():
                for event_type in getattr(attribute, _HANDLES_ATTR, ()):
                    if event_type in own:
                        raise TypeError(
                            f"{klass.__name__} handles {event_type!r} twice: in "
                            f"{own[event_type]}() and {name}()"
                        )
                    own[event_type] = name
            handlers.update(own)
        cls._handlers = handlers

    @classmethod
    def event_types(cls) -> tuple[str, ...]:
        """The event types this projection has handlers for, sorted."""
        return tuple(sorted(cls._handlers))

    def subscription_filter(self) -> SubscriptionFilter | None:
        """What the runner asks the server for: the handled types and every erasure event."""
        return SubscriptionFilter(event_types=self.event_types(), include_erasures=True)

    def handle(self, event: RecordedEvent) -> None:
        """Dispatch one event: erasures to :meth:`forget`, others to their handler."""
        if event.stream_id == ERASURE_STREAM and event.event_type == ERASURE_EVENT_TYPE:
            subject_id = event.json().get("subject_id")
            if not isinstance(subject_id, str) or not subject_id:
                raise ProjectionError(
                    f"the erasure event at position {event.position} names no subject_id"
                )
            self.forget(subject_id)
            return
        name = self._handlers.get(event.event_type)
        if name is None or (event.redacted and not self.handle_redacted):
            return
        getattr(self, name)(event)

    def forget(self, subject_id: str) -> None:
        """Delete everything derived from this data subject; every projection must define it."""
        raise NotImplementedError

    @classmethod
    def implements_forget(cls) -> bool:
        return cls.forget is not Projection.forget

    # -- the store contract ------------------------------------------------------------

    def open(self, *, rebuild: bool = False) -> None:
        """Connect to the store and create the schema if needed (idempotent).

        With ``rebuild``, drop the projection's state and checkpoint first (as
        :meth:`reset`), before the schema is looked at: a rebuild must also
        work when the stored state no longer fits the code.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the store (idempotent)."""
        raise NotImplementedError

    def checkpoint(self) -> int:
        """The position stored with the projection's state (0: nothing applied)."""
        raise NotImplementedError

    def apply(self, events: Sequence[RecordedEvent], position: int) -> int:
        """In one transaction: handle the events after the stored checkpoint, store ``position``.

        ``position`` is at least the last event's (a Checkpoint message may
        move it with no events). Returns the checkpoint as stored: it never
        moves backwards.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Drop the projection's state and set its checkpoint to 0 (for a rebuild)."""
        raise NotImplementedError


def _create_private(path: Path) -> None:
    """Create *path* mode 0600 unless it exists: a read model holds personal data in clear.

    SQLite gives its journal and WAL files the database file's mode, so they
    are private too; an existing file keeps the mode its owner chose.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SQLiteProjection(Projection):
    """A projection kept in a SQLite database, its checkpoint in the same transaction.

    ``schema`` is an SQL script run at every open, so it must be idempotent
    (``CREATE TABLE IF NOT EXISTS``). Handlers and :meth:`forget` write
    through :attr:`db` inside the runner's transaction and must never commit
    or roll back themselves (the runner checks). :meth:`before_commit` runs
    at the end of each transaction, before the checkpoint is written.

    The connection runs with ``synchronous=FULL`` (a commit is durable when
    it returns) and ``secure_delete=ON``: deleted rows, such as a forgotten
    subject's, are overwritten in the file instead of lingering in free pages.

    :meth:`reset` drops every table and view except the checkpoint's (or
    override it) and runs ``schema`` again.
    """

    schema: ClassVar[str] = ""
    CHECKPOINT_TABLE: ClassVar[str] = "lethedb_checkpoint"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """``path``: the database file (default: ``<classname>.db`` in the working directory)."""
        self.path = Path(path) if path is not None else Path(f"{type(self).__name__.lower()}.db")
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (autocommit mode; the runner opens the transactions)."""
        if self._db is None:
            raise ProjectionError(f"{type(self).__name__} is not open; call open() first")
        return self._db

    def open(self, *, rebuild: bool = False) -> None:
        if self._db is None:
            _create_private(self.path)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA secure_delete = ON")
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {self.CHECKPOINT_TABLE} "
                "(id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL)"
            )
            self._db = db
        if rebuild:
            self.reset()
        else:
            self.create_schema()

    def create_schema(self) -> None:
        """Run ``schema`` (override for schemas that are not a plain script)."""
        if self.schema.strip():
            self.db.executescript(self.schema)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def checkpoint(self) -> int:
        row = self.db.execute(
            f"SELECT position FROM {self.CHECKPOINT_TABLE} WHERE id = 1"
        ).fetchone()
        return int(row[0]) if row else 0

    def before_commit(self) -> None:
        """Called inside every transaction after the batch's handlers (no-op by default)."""

    def apply(self, events: Sequence[RecordedEvent], position: int) -> int:
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # the write lock first: the checkpoint read is then current
        try:
            stored = self.checkpoint()
            for event in events:
                if event.position > stored:
                    self.handle(event)
            self.before_commit()
            if not db.in_transaction:
                raise ProjectionError(
                    f"a handler of {type(self).__name__} committed or rolled back the runner's "
                    "transaction; handlers must leave transactions to the runner"
                )
            checkpoint = max(stored, position)
            if checkpoint != stored:
                db.execute(
                    f"INSERT INTO {self.CHECKPOINT_TABLE} (id, position) VALUES (1, ?) "
                    "ON CONFLICT (id) DO UPDATE SET position = excluded.position",
                    (checkpoint,),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return checkpoint

    def reset(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            self.drop_schema()
            db.execute(f"DELETE FROM {self.CHECKPOINT_TABLE}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.create_schema()

    def drop_schema(self) -> None:
        """Drop every view and table but the checkpoint's (inside :meth:`reset`'s transaction)."""
        db = self.db

        def objects(kind: str) -> list[tuple[str, str]]:
            rows = db.execute(
                "SELECT name, coalesce(sql, '') FROM sqlite_master WHERE type = ? "
                "AND name NOT LIKE 'sqlite_%' AND name != ?",
                (kind, self.CHECKPOINT_TABLE),
            ).fetchall()
            return [(str(name), str(sql)) for name, sql in rows]

        for name, _ in objects("view"):
            db.execute(f"DROP VIEW IF EXISTS {_quote(name)}")
        # Virtual tables first: dropping one drops its shadow tables with it.
        for name, sql in objects("table"):
            if sql.upper().startswith("CREATE VIRTUAL TABLE"):
                db.execute(f"DROP TABLE IF EXISTS {_quote(name)}")
        for name, _ in objects("table"):
            db.execute(f"DROP TABLE IF EXISTS {_quote(name)}")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


# -- the runner ------------------------------------------------------------------------

_Item = list[RecordedEvent] | Checkpoint | CaughtUp | GroupAssignment | BaseException


class ProjectionRunner:
    """Runs a projection as a daemon: subscribe after its checkpoint, apply batch by batch.

    :meth:`run` blocks until :meth:`stop` (safe from a signal handler or any
    thread), until caught up when ``until_caught_up``, or until an error. A
    stop lets the batch being applied finish and commit, commits the group
    checkpoint, then closes the subscription: a stopped runner's checkpoint is
    consistent with its state (and with the server's group checkpoint).

    ``progress(position, head)`` is called while the runner catches up (a
    rebuild), last when it has caught up; ``head`` is the log's head as known
    (read at start, then from the server's caught-up and heartbeat messages).
    """

    def __init__(
        self,
        projection: Projection,
        client: Client,
        *,
        group: str | None = None,
        member_id: str | None = None,
        until_caught_up: bool = False,
        progress: Callable[[int, int], None] | None = None,
        group_commit_interval: float = 1.0,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(projection, Projection):
            raise TypeError(f"projection is a {type(projection).__name__}; expected a Projection")
        if not type(projection).implements_forget():
            raise ProjectionError(
                f"{type(projection).__name__} does not define forget(subject_id); every "
                "projection must delete what it derived from a forgotten subject (define it "
                "as a no-op if it stores nothing personal)"
            )
        self.projection = projection
        self.client = client
        self.group = group
        self.member_id = (member_id or DEFAULT_MEMBER_ID) if group else None
        self.until_caught_up = until_caught_up
        self.progress = progress
        self.group_commit_interval = group_commit_interval
        self.batch_size = batch_size
        #: The projection's checkpoint as last stored.
        self.position = 0
        #: The log's head as last known.
        self.head = 0
        self.caught_up = False
        self._stopping = threading.Event()
        self._committed = 0  # last position committed to the group
        self._committed_at = 0.0

    def stop(self) -> None:
        """Ask the runner to stop after the current batch (signal- and thread-safe)."""
        self._stopping.set()

    def run(self, *, rebuild: bool = False) -> int:
        """Follow the log into the projection; return the checkpoint stored when stopping."""
        projection = self.projection
        if rebuild:
            log.info("rebuild: dropping the state of %s", type(projection).__name__)
        projection.open(rebuild=rebuild)
        try:
            self.position = self._committed = projection.checkpoint()
            self.head = self._until_available(self._read_head)
            if self.position > self.head:
                raise ProjectionError(
                    f"the checkpoint of {type(projection).__name__} ({self.position}) is beyond "
                    f"the head of the log ({self.head}): it was built from another store or a "
                    "newer copy of this one; rebuild it"
                )
            if self.group is not None:
                self._until_available(self._align_group_checkpoint)
            log.info(
                "%s starts after position %d (head %d)",
                type(projection).__name__,
                self.position,
                self.head,
            )
            subscription = self.client.subscribe(
                after=self.position,
                filter=projection.subscription_filter(),
                group=self.group,
                member_id=self.member_id,
                batch_size=self.batch_size,
            )
            try:
                self._follow(subscription)
            finally:
                subscription.close()
        except _Stopped:
            log.info("stopped before the server could be reached")
        finally:
            projection.close()
        return self.position

    def _follow(self, subscription: Subscription) -> None:
        items: queue.Queue[_Item] = queue.Queue(maxsize=2)
        reader = threading.Thread(
            target=self._read, args=(subscription, items), name="lethedb-projection-reader"
        )
        reader.daemon = True
        reader.start()
        try:
            while not self._stopping.is_set():
                try:
                    item = items.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                self._take(item, subscription)
                if self.caught_up and self.until_caught_up:
                    break
            if self.group is not None:
                self._commit_group(subscription, force=True)
        finally:
            self._stopping.set()
            subscription.close()
            reader.join(5)

    def _read(self, subscription: Subscription, items: queue.Queue[_Item]) -> None:
        """Reader thread: the subscription's messages into the queue, one or two ahead."""
        try:
            for item in subscription.batches():
                if not self._put(items, item):
                    return
        except BaseException as exc:  # handed to the main thread, which raises it
            self._put(items, exc)

    def _put(self, items: queue.Queue[_Item], item: _Item) -> bool:
        while not self._stopping.is_set():
            try:
                items.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _take(self, item: _Item, subscription: Subscription) -> None:
        projection = self.projection
        if isinstance(item, GroupAssignment):
            self._check_assignment(item)
            return
        if isinstance(item, list):
            self.position = projection.apply(item, item[-1].position)
        elif isinstance(item, Checkpoint | CaughtUp) and item.position > self.position:
            self.position = projection.apply((), item.position)
        self.head = max(self.head, self.position, subscription.head or 0)
        if isinstance(item, CaughtUp):
            self.head = max(self.head, item.position)
            if not self.caught_up:
                self.caught_up = True
                log.info("%s caught up at position %d", type(projection).__name__, self.position)
                if self.progress is not None:
                    self.progress(self.position, self.head)
        elif not self.caught_up and self.progress is not None:
            self.progress(self.position, self.head)
        if self.group is not None:
            self._commit_group(subscription, force=isinstance(item, CaughtUp))

    def _check_assignment(self, assignment: GroupAssignment) -> None:
        if len(assignment.members) > 1:
            raise ProjectionError(
                f"group {assignment.group!r} has {len(assignment.members)} members "
                f"({', '.join(assignment.members)}); a projection must be its group's only "
                "member, as members share the events and each would see only part of the log. "
                "Run one runner per group (a second one with the same --member-id replaces "
                "the first), or give each projection its own group"
            )
        if assignment.restart_after > self.position:
            raise ProjectionError(
                f"group {assignment.group!r} restarts after position "
                f"{assignment.restart_after}, beyond this projection's checkpoint "
                f"{self.position}: events in between would be skipped. Another member of the "
                "group kept the group's checkpoint from being reset; stop it and start again"
            )

    def _commit_group(self, subscription: Subscription, *, force: bool) -> None:
        if self.position <= self._committed or subscription.assignment is None:
            return
        now = time.monotonic()
        if not force and now - self._committed_at < self.group_commit_interval:
            return
        self._committed_at = now
        try:
            subscription.commit(self.position)
            self._committed = self.position
        except LetheError as exc:
            # The local checkpoint is authoritative; the server's copy catches
            # up at the next commit (or is aligned at the next start).
            log.warning("could not commit group checkpoint %d: %s", self.position, exc)

    def _align_group_checkpoint(self) -> None:
        assert self.group is not None
        stored = self.client.get_checkpoint(self.group)
        if stored == self.position:
            return
        try:
            self.client.set_checkpoint(self.group, self.position)
            log.info(
                "group %r checkpoint set from %s to the projection's %d",
                self.group,
                stored,
                self.position,
            )
        except NotGroupMember as exc:
            # Live members (a previous runner still connected): the first
            # assignment tells whether the group would skip anything.
            log.warning("group %r checkpoint not aligned: %s", self.group, exc)
        except PermissionDenied as exc:
            raise ProjectionError(
                f"group {self.group!r} is at position {stored} on the server, ahead of this "
                f"projection's checkpoint {self.position} (a rebuild, or an older copy of its "
                "store); moving a group's checkpoint back needs the admin role, and this "
                "token lacks it. Run this once with an admin token (with --until-caught-up "
                "for a rebuild), then with the usual token again; or use a new --group "
                f"({exc.details})"
            ) from exc

    def _until_available(self, call: Callable[[], _Result]) -> _Result:
        """Retry a start-up call while the server is unreachable, like the subscription does."""
        while True:
            try:
                return call()
            except Unavailable as exc:
                log.warning("server unavailable at start (%s); retrying in 1s", exc)
                if self._stopping.wait(1.0):
                    raise _Stopped from exc

    def _read_head(self) -> int:
        for event in self.client.read_all(backwards=True, max_count=1):
            return event.position
        return 0
