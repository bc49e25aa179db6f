"""A full-text index of users (SQLite FTS5), built from the log by the projection runtime.

Same events as :mod:`examples.users_read_model`. ``UserSearch.search("ada
lovelace")`` returns the subject ids of users whose name or email contains
every word, best match first.

Erasure: an FTS5 index keeps the words of a deleted row in its older index
segments until they are merged, so deleting the row alone would leave the
forgotten subject's name and email in the file. After a batch that forgot
anybody the index is therefore merged (``optimize``) inside the same
transaction, and the runtime's ``secure_delete`` overwrites the freed pages:
the test checks that the file holds no byte of a forgotten user's data.

    lethedb project examples.user_search:UserSearch --db search.db --group user-search
"""

from __future__ import annotations

import re

from lethedb import RecordedEvent
from lethedb.projections import SQLiteProjection, handles

_WORD = re.compile(r"\w+", re.UNICODE)


class UserSearch(SQLiteProjection):
    """``user_search`` FTS5 table (name, email) with ``user_docs`` mapping subjects to rows."""

    schema = """
        CREATE TABLE IF NOT EXISTS user_docs (
            subject_id TEXT PRIMARY KEY,
            doc_id     INTEGER NOT NULL UNIQUE
        );
        CREATE VIRTUAL TABLE IF NOT EXISTS user_search
            USING fts5(name, email, tokenize = 'unicode61 remove_diacritics 2');
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(path)
        self._forgot = False

    @handles("UserRegistered")
    def registered(self, event: RecordedEvent) -> None:
        data = event.json()
        self._put(event.subject_id, name=data.get("name", ""), email=data.get("email", ""))

    @handles("EmailChanged")
    def email_changed(self, event: RecordedEvent) -> None:
        self._put(event.subject_id, email=event.json()["email"])

    @handles("NameChanged")
    def name_changed(self, event: RecordedEvent) -> None:
        self._put(event.subject_id, name=event.json()["name"])

    def forget(self, subject_id: str) -> None:
        doc_id = self._doc_id(subject_id)
        if doc_id is None:
            return
        self.db.execute("DELETE FROM user_search WHERE rowid = ?", (doc_id,))
        self.db.execute("DELETE FROM user_docs WHERE subject_id = ?", (subject_id,))
        self._forgot = True

    def before_commit(self) -> None:
        if self._forgot:
            # Merge every segment: the deleted row's words leave the index.
            self.db.execute("INSERT INTO user_search (user_search) VALUES ('optimize')")
            self._forgot = False

    def _put(self, subject_id: str, **fields: str) -> None:
        doc_id = self._doc_id(subject_id)
        if doc_id is None:
            cursor = self.db.execute(
                "INSERT INTO user_search (name, email) VALUES (?, ?)",
                (fields.get("name", ""), fields.get("email", "")),
            )
            self.db.execute(
                "INSERT INTO user_docs (subject_id, doc_id) VALUES (?, ?)",
                (subject_id, cursor.lastrowid),
            )
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(
            f"UPDATE user_search SET {assignments} WHERE rowid = ?", (*fields.values(), doc_id)
        )

    def _doc_id(self, subject_id: str) -> int | None:
        row = self.db.execute(
            "SELECT doc_id FROM user_docs WHERE subject_id = ?", (subject_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    # -- queries -----------------------------------------------------------------------

    def search(self, text: str, limit: int = 20) -> list[str]:
        """Subject ids of the users matching every word of ``text`` (prefixes too), best first."""
        words = _WORD.findall(text)
        if not words:
            return []
        # Each word quoted (no FTS5 syntax from user input) and matched as a prefix.
        query = " ".join('"' + word.replace('"', '""') + '"*' for word in words)
        rows = self.db.execute(
            "SELECT d.subject_id FROM user_search JOIN user_docs d ON d.doc_id = user_search.rowid "
            "WHERE user_search MATCH ? ORDER BY rank LIMIT ?",
            (query, limit),
        ).fetchall()
        return [str(row[0]) for row in rows]

    def documents(self) -> list[tuple[str, str, str]]:
        """(subject id, name, email) of every indexed user, ordered by subject id."""
        rows = self.db.execute(
            "SELECT d.subject_id, s.name, s.email FROM user_docs d "
            "JOIN user_search s ON s.rowid = d.doc_id ORDER BY d.subject_id"
        ).fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]
