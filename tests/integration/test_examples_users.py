"""examples/users_read_model.py: a SQLite read model, live, after an erasure, rebuilt.

The read model is built twice from a real server's log: live, by a runner
following the appends as they happen (with a forget among them), and from
zero by a rebuild afterwards. Both must hold the same rows, and neither may
hold anything of the forgotten subject, not even in the file's free pages.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from examples.users_read_model import Users as ReadModel
from tests.integration.projecting import (
    Running,
    Users,
    connect,
    head,
    run_until_caught_up,
    wait_for,
)
from tests.integration.serverproc import ServerProcess


def test_the_live_read_model_equals_a_rebuild_and_forgets_the_erased_subject(
    server: ServerProcess, tmp_path: Path
):
    db = connect(server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    canary_name, canary_email = "Zanzibar Quokka", f"quokka-{uuid.uuid4().hex}@canary.test"
    live = Running(ReadModel(tmp_path / "live.db"), server.address, group_commit_interval=0.1)
    users.populate(30)
    forgotten = users.register(99, name=canary_name, email=canary_email)
    users.change_email(99, "second-" + canary_email)
    live.wait_position(head(db))
    model = ReadModel(tmp_path / "live.db")
    model.open()
    assert model.get(forgotten) is not None  # derived while the subject was active
    model.close()
    assert canary_name.encode() in (tmp_path / "live.db").read_bytes()  # the check below bites
    db.forget_subject(forgotten, reason="test")
    users.populate(3)  # life goes on after the erasure
    end = head(db)
    live.wait_position(end)
    assert live.stop() == end

    model.open()
    live_rows = model.rows()
    assert model.get(forgotten) is None
    assert model.get(users.subject(3)) == {
        "subject_id": users.subject(3),
        "email": f"changed3@{users.tag}.test",
        "name": "User Number3",
        "active": 1,
        "version": 1,
    }
    assert model.get(users.subject(4))["name"] == "Renamed Person4"  # type: ignore[index]
    model.close()

    rebuilt = ReadModel(tmp_path / "rebuilt.db")
    assert run_until_caught_up(rebuilt, server.address, rebuild=True) == end
    rebuilt.open()
    assert rebuilt.rows() == live_rows
    assert rebuilt.get(forgotten) is None
    rebuilt.close()
    for path in (tmp_path / "live.db", tmp_path / "rebuilt.db"):
        content = path.read_bytes()
        assert canary_email.encode() not in content
        assert canary_name.encode() not in content


def test_a_restarted_runner_resumes_after_its_checkpoint_and_applies_each_event_once(
    server: ServerProcess, tmp_path: Path
):
    db = connect(server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    users.populate(5)
    path = tmp_path / "users.db"
    first = run_until_caught_up(ReadModel(path), server.address)
    assert first == head(db)
    users.populate(5)  # registrations again: same subjects, new stream versions
    second = run_until_caught_up(ReadModel(path), server.address)
    assert second == head(db) > first
    resumed = ReadModel(path)
    resumed.open()
    rows = resumed.rows()
    resumed.close()
    fresh = ReadModel(tmp_path / "fresh.db")
    run_until_caught_up(fresh, server.address)
    fresh.open()
    assert fresh.rows() == rows
    fresh.close()


def test_a_server_crash_under_a_grouped_runner_costs_nothing(
    fresh_server: ServerProcess, tmp_path: Path
):
    db = connect(fresh_server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    users.populate(10)
    group = "users-crash"
    live = Running(
        ReadModel(tmp_path / "live.db"), fresh_server.address, group=group, group_commit_interval=0
    )
    live.wait_position(head(db))
    address = fresh_server.address
    fresh_server.kill()
    fresh_server.start(listen=address)
    db = connect(fresh_server.address)
    users.db = db
    users.populate(10)
    end = head(db)
    live.wait_position(end)
    wait_for(lambda: db.get_checkpoint(group) == end, what="the group checkpoint to follow")
    assert live.stop() == end
    model = ReadModel(tmp_path / "live.db")
    model.open()
    rows = model.rows()
    model.close()
    rebuilt = ReadModel(tmp_path / "rebuilt.db")
    run_until_caught_up(rebuilt, fresh_server.address, rebuild=True)
    rebuilt.open()
    assert rebuilt.rows() == rows
    rebuilt.close()
