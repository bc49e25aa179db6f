"""examples/user_search.py: an FTS5 index that finds users by text, and forgets them entirely."""

from __future__ import annotations

import uuid
from pathlib import Path

from examples.user_search import UserSearch
from tests.integration.projecting import Running, Users, connect, head, run_until_caught_up
from tests.integration.serverproc import ServerProcess


def test_the_index_finds_users_by_name_and_email_and_follows_changes(
    server: ServerProcess, tmp_path: Path
):
    db = connect(server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    ada = users.register(1, name="Ada Lovelace", email="ada@analytical.test")
    grace = users.register(2, name="Grace Hopper", email="grace@cobol.test")
    users.register(3, name="Ada Yonath", email="yonath@ribosome.test")
    users.rename(2, "Grace Brewster Hopper")
    users.change_email(1, "countess@lovelace.test")
    path = tmp_path / "search.db"
    run_until_caught_up(UserSearch(path), server.address)

    index = UserSearch(path)
    index.open()
    try:
        assert index.search("lovelace") == [ada]  # name and new email both match
        assert index.search("brewster") == [grace]
        assert index.search("hopp") == [grace]  # prefixes
        assert set(index.search("ada")) == {ada, users.subject(3)}
        assert index.search("ada lovelace") == [ada]  # every word must match
        assert index.search("analytical") == []  # the old email is gone from the index
        assert index.search("countess@lovelace.test") == [ada]
        assert index.search('" OR * NEAR(') == []  # user text is never FTS5 syntax
    finally:
        index.close()


def test_a_forgotten_user_is_not_found_and_not_in_the_file_and_a_rebuild_agrees(
    server: ServerProcess, tmp_path: Path
):
    db = connect(server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    canary = "quokkafrangipane" + uuid.uuid4().hex[:6]  # lowercase: as the index stores it
    live = Running(UserSearch(tmp_path / "live.db"), server.address)
    users.populate(20)
    forgotten = users.register(77, name=f"Zed {canary}", email=f"{canary}@canary.test")
    live.wait_position(head(db))
    index = UserSearch(tmp_path / "live.db")
    index.open()
    assert index.search(canary) == [forgotten]
    index.close()
    assert canary.encode() in (tmp_path / "live.db").read_bytes()

    db.forget_subject(forgotten, reason="test")
    users.populate(2)
    end = head(db)
    live.wait_position(end)
    live.stop()

    index.open()
    assert index.search(canary) == []
    documents = index.documents()
    assert forgotten not in {d[0] for d in documents}
    index.close()
    rebuilt = UserSearch(tmp_path / "rebuilt.db")
    assert run_until_caught_up(rebuilt, server.address, rebuild=True) == end
    rebuilt.open()
    assert rebuilt.documents() == documents
    assert rebuilt.search(canary) == []
    rebuilt.close()
    for path in (tmp_path / "live.db", tmp_path / "rebuilt.db"):
        assert canary.encode() not in path.read_bytes(), path.name
