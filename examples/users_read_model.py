"""A SQLite read model of users, built from the log by the projection runtime.

Events (stream ``user-<id>``, subject ``<id>``, JSON data):

* ``UserRegistered`` ``{"email": ..., "name": ...}``
* ``EmailChanged`` ``{"email": ...}``
* ``NameChanged`` ``{"name": ...}``
* ``UserDeactivated`` ``{}``

Table ``users(subject_id, email, name, active, registered_at, updated_at,
version)``: one row per user, ``version`` the stream version of the last
event applied. When a subject is forgotten its row is deleted (and, with the
runtime's ``secure_delete``, overwritten in the file).

Run it as a daemon::

    lethedb project examples.users_read_model:Users --db users.db --group users
    lethedb project examples.users_read_model:Users --db users.db --rebuild --until-caught-up
"""

from __future__ import annotations

from typing import Any

from lethedb import RecordedEvent
from lethedb.projections import SQLiteProjection, handles


class Users(SQLiteProjection):
    """``users`` table: who is registered, with their current email and name."""

    schema = """
        CREATE TABLE IF NOT EXISTS users (
            subject_id    TEXT PRIMARY KEY,
            email         TEXT NOT NULL,
            name          TEXT NOT NULL,
            active        INTEGER NOT NULL DEFAULT 1,
            registered_at INTEGER NOT NULL,
            updated_at    INTEGER NOT NULL,
            version       INTEGER NOT NULL
        );
        CREATE INDEX IF NOT EXISTS users_email ON users (email);
    """

    @handles("UserRegistered")
    def registered(self, event: RecordedEvent) -> None:
        data = event.json()
        self.db.execute(
            "INSERT INTO users (subject_id, email, name, registered_at, updated_at, version) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (subject_id) DO UPDATE SET email = excluded.email, "
            "name = excluded.name, active = 1, updated_at = excluded.updated_at, "
            "version = excluded.version",
            (
                event.subject_id,
                data.get("email", ""),
                data.get("name", ""),
                event.recorded_at,
                event.recorded_at,
                event.stream_version,
            ),
        )

    @handles("EmailChanged")
    def email_changed(self, event: RecordedEvent) -> None:
        self._update(event, email=event.json()["email"])

    @handles("NameChanged")
    def name_changed(self, event: RecordedEvent) -> None:
        self._update(event, name=event.json()["name"])

    @handles("UserDeactivated")
    def deactivated(self, event: RecordedEvent) -> None:
        self._update(event, active=0)

    def forget(self, subject_id: str) -> None:
        self.db.execute("DELETE FROM users WHERE subject_id = ?", (subject_id,))

    def _update(self, event: RecordedEvent, **columns: Any) -> None:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self.db.execute(
            f"UPDATE users SET {assignments}, updated_at = ?, version = ? WHERE subject_id = ?",
            (*columns.values(), event.recorded_at, event.stream_version, event.subject_id),
        )

    # -- queries (for the application and the tests) -------------------------------

    def get(self, subject_id: str) -> dict[str, Any] | None:
        cursor = self.db.execute(
            "SELECT subject_id, email, name, active, version FROM users WHERE subject_id = ?",
            (subject_id,),
        )
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip([c[0] for c in cursor.description], row, strict=True))

    def rows(self) -> list[tuple[Any, ...]]:
        """Every row, ordered: a comparable picture of the model (times come from the events)."""
        return self.db.execute("SELECT * FROM users ORDER BY subject_id").fetchall()
