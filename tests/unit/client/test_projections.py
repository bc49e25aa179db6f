"""The projection runtime's store contract, without a server: dispatch, atomicity, reset."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import uuid
from pathlib import Path

import pytest

from lethedb import RecordedEvent, SubscriptionFilter
from lethedb.projections import (
    ERASURE_EVENT_TYPE,
    ERASURE_STREAM,
    Projection,
    ProjectionError,
    ProjectionRunner,
    SQLiteProjection,
    handles,
)


def event(position: int, event_type: str, subject: str = "s1", **data: object) -> RecordedEvent:
    return RecordedEvent(
        position=position,
        stream_id=f"user-{subject}",
        stream_version=position,
        event_id=uuid.uuid4(),
        event_type=event_type,
        subject_id=subject,
        content_type="application/json",
        recorded_at=position * 1000,
        data=json.dumps(data).encode(),
        metadata=b"",
        redacted=False,
    )


def erasure(position: int, subject: str) -> RecordedEvent:
    return RecordedEvent(
        position=position,
        stream_id=ERASURE_STREAM,
        stream_version=0,
        event_id=uuid.uuid4(),
        event_type=ERASURE_EVENT_TYPE,
        subject_id="",
        content_type="application/json",
        recorded_at=0,
        data=json.dumps({"subject_id": subject, "reason": "r"}).encode(),
        metadata=b"",
        redacted=False,
    )


class Names(SQLiteProjection):
    schema = """
        CREATE TABLE IF NOT EXISTS names (subject_id TEXT PRIMARY KEY, name TEXT);
        CREATE VIRTUAL TABLE IF NOT EXISTS names_fts USING fts5(name);
    """
    fail_on: int | None = None

    @handles("Named", "Renamed")
    def named(self, e: RecordedEvent) -> None:
        if e.position == self.fail_on:
            raise RuntimeError("crash in the middle of a batch")
        self.db.execute(
            "INSERT OR REPLACE INTO names VALUES (?, ?)", (e.subject_id, e.json()["name"])
        )
        self.db.execute("INSERT INTO names_fts (name) VALUES (?)", (e.json()["name"],))

    def forget(self, subject_id: str) -> None:
        self.db.execute("DELETE FROM names WHERE subject_id = ?", (subject_id,))

    def rows(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT * FROM names ORDER BY subject_id").fetchall()


@pytest.fixture
def names(tmp_path: Path):
    projection = Names(tmp_path / "names.db")
    projection.open()
    yield projection
    projection.close()


def test_handlers_are_found_by_decorator_and_become_the_server_side_filter():
    assert Names.event_types() == ("Named", "Renamed")
    assert Names().subscription_filter() == SubscriptionFilter(
        event_types=("Named", "Renamed"), include_erasures=True
    )


def test_an_event_type_handled_twice_in_one_class_is_refused():
    with pytest.raises(TypeError, match="handles 'A' twice"):

        class Twice(Projection):
            @handles("A")
            def one(self, e: RecordedEvent) -> None: ...

            @handles("A")
            def two(self, e: RecordedEvent) -> None: ...


def test_a_subclass_may_override_a_handler():
    class Base(Projection):
        @handles("A")
        def one(self, e: RecordedEvent) -> None: ...

    class Child(Base):
        @handles("A")
        def other(self, e: RecordedEvent) -> None: ...

    assert Child._handlers == {"A": "other"}


def test_a_projection_without_forget_is_refused_by_the_runner():
    class NoForget(SQLiteProjection):
        @handles("A")
        def one(self, e: RecordedEvent) -> None: ...

    with pytest.raises(ProjectionError, match="forget"):
        ProjectionRunner(NoForget(), client=None)  # type: ignore[arg-type]


def test_events_and_checkpoint_commit_together(names: Names):
    assert names.checkpoint() == 0
    assert names.apply([event(1, "Named", "a", name="Ada"), event(2, "Other")], 2) == 2
    assert names.checkpoint() == 2
    assert names.rows() == [("a", "Ada")]


def test_a_crash_in_a_batch_leaves_neither_effects_nor_checkpoint(names: Names):
    names.apply([event(1, "Named", "a", name="Ada")], 1)
    names.fail_on = 3
    batch = [event(2, "Named", "b", name="Bob"), event(3, "Named", "c", name="Cy")]
    with pytest.raises(RuntimeError, match="crash"):
        names.apply(batch, 3)
    assert names.checkpoint() == 1
    assert names.rows() == [("a", "Ada")]
    names.fail_on = None
    names.apply(batch, 3)
    assert names.rows() == [("a", "Ada"), ("b", "Bob"), ("c", "Cy")]


def test_events_at_or_before_the_checkpoint_are_not_applied_again(names: Names):
    names.apply([event(1, "Named", "a", name="Ada"), event(2, "Renamed", "a", name="Ann")], 2)
    # Re-delivered (a group rebalance, a second runner): no effect, the checkpoint stays.
    assert names.apply([event(1, "Named", "a", name="Ada")], 1) == 2
    assert names.rows() == [("a", "Ann")]
    # A checkpoint message moves the position with no events.
    assert names.apply([], 10) == 10


def test_the_erasure_event_calls_forget_with_the_subject(names: Names):
    names.apply([event(1, "Named", "a", name="Ada"), event(2, "Named", "b", name="Bob")], 2)
    names.apply([erasure(3, "a")], 3)
    assert names.rows() == [("b", "Bob")]


def test_redacted_events_are_skipped_unless_asked_for(names: Names):
    redacted = event(1, "Named", "a", name="x")
    redacted = RecordedEvent(**{**{f: getattr(redacted, f) for f in redacted.__struct_fields__},
                                "data": b"", "redacted": True})  # fmt: skip
    names.apply([redacted], 1)
    assert names.rows() == []
    assert names.checkpoint() == 1


def test_a_handler_that_commits_is_caught(names: Names):
    class Committer(Names):
        @handles("Named")
        def named(self, e: RecordedEvent) -> None:
            self.db.execute("COMMIT")

    projection = Committer(names.path)
    projection.open()
    try:
        with pytest.raises(ProjectionError, match="committed or rolled back"):
            projection.apply([event(1, "Named", name="x")], 1)
    finally:
        projection.close()


def test_reset_drops_tables_including_virtual_ones_and_the_checkpoint(names: Names):
    names.apply([event(1, "Named", "a", name="Ada")], 1)
    names.db.execute("CREATE VIEW v AS SELECT * FROM names")
    names.reset()
    assert names.checkpoint() == 0
    assert names.rows() == []
    assert names.db.execute("SELECT count(*) FROM names_fts").fetchone() == (0,)
    tables = {r[0] for r in names.db.execute("SELECT name FROM sqlite_master WHERE type='view'")}
    assert tables == set()


def test_the_database_runs_with_durable_commits_and_secure_delete(names: Names):
    assert names.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert names.db.execute("PRAGMA secure_delete").fetchone() == (1,)


def test_the_database_and_its_journal_are_private_whatever_the_umask(tmp_path: Path):
    """A read model holds personal data in clear: 0600 like every file LetheDB writes."""
    old = os.umask(0o022)
    try:
        projection = Names(tmp_path / "private.db")
        projection.open()
        projection.apply([event(1, "Named", "a", name="Alice")], 1)
        projection.close()
    finally:
        os.umask(old)
    made = sorted(tmp_path.glob("private.db*"))
    assert made
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in made} == {p.name: 0o600 for p in made}


def test_a_forgotten_subjects_row_leaves_no_bytes_in_the_file(names: Names):
    canary = "Zanzibar-" + uuid.uuid4().hex
    names.apply([event(1, "Named", "a", name=canary), event(2, "Named", "b", name="Bob")], 2)
    names.db.execute("BEGIN")
    names.db.execute("DELETE FROM names_fts")  # the FTS copy is Names' own business here
    names.db.execute("COMMIT")
    names.apply([erasure(3, "a")], 3)
    names.close()
    assert canary.encode() not in names.path.read_bytes()
    assert sqlite3.connect(names.path).execute("SELECT count(*) FROM names").fetchone() == (1,)
