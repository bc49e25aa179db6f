"""``lethedb project``: the projection daemon, its clean stop on SIGTERM, and ``--rebuild``."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from examples.users_read_model import Users as ReadModel
from tests.integration.projecting import Users, connect, head, wait_for
from tests.integration.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def project(server: ServerProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lethedb_server", "project",
         "examples.users_read_model:Users", "--server", server.address, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def local_checkpoint(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path, timeout=10) as db:
        try:
            row = db.execute("SELECT position FROM lethedb_checkpoint").fetchone()
        except sqlite3.OperationalError:  # not created yet
            return 0
    return int(row[0]) if row else 0


def expected_rows(server: ServerProcess, upto: int, path: Path) -> list[tuple[object, ...]]:
    """The read model of the log's first *upto* positions, built by applying them directly."""
    model = ReadModel(path)
    model.open()
    with connect(server.address) as db:
        batch = []
        for event in db.read_all(after=0, max_count=upto):
            batch.append(event)
            if len(batch) == 100:
                model.apply(batch, batch[-1].position)
                batch = []
        if batch:
            model.apply(batch, batch[-1].position)
    rows = model.rows()
    model.close()
    return rows


def test_sigterm_stops_the_daemon_cleanly_with_its_checkpoints_consistent(
    server: ServerProcess, tmp_path: Path
):
    db = connect(server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    group = f"users-{users.tag}"
    path = tmp_path / "users.db"
    daemon = project(server, "--db", str(path), "--group", group)
    stop_writing = threading.Event()

    def write() -> None:
        n = 0
        while not stop_writing.is_set():
            users.register(n)
            users.change_email(n, f"new{n}@{users.tag}.test")
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_for(lambda: local_checkpoint(path) > 0 and head(db) > 150, what="the daemon working")
        daemon.send_signal(signal.SIGTERM)  # with appends still flowing
        _out, err = daemon.communicate(timeout=30)
    finally:
        stop_writing.set()
        writer.join(30)
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err
    checkpoint = local_checkpoint(path)
    assert f"stopped at position {checkpoint}" in err
    # The server's group checkpoint is the local one, committed on the way out.
    assert db.get_checkpoint(group) == checkpoint
    # The state is exactly the log up to the checkpoint: nothing half-applied.
    model = ReadModel(path)
    model.open()
    rows = model.rows()
    model.close()
    assert rows == expected_rows(server, checkpoint, tmp_path / "expected.db")

    # Started again, it resumes after its checkpoint and catches up to the head.
    end = head(db)
    again = project(server, "--db", str(path), "--group", group, "--until-caught-up")
    _, err = again.communicate(timeout=30)
    assert again.returncode == 0, err
    assert local_checkpoint(path) == end == db.get_checkpoint(group)
    model.open()
    rows = model.rows()
    model.close()
    assert rows == expected_rows(server, end, tmp_path / "expected-end.db")


def test_rebuild_replays_from_zero_with_a_progress_line(server: ServerProcess, tmp_path: Path):
    db = connect(server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    users.populate(10)
    path = tmp_path / "users.db"
    with sqlite3.connect(path) as junk:  # state that a rebuild must throw away
        junk.execute("CREATE TABLE users (subject_id TEXT PRIMARY KEY, junk TEXT)")
        junk.execute("INSERT INTO users VALUES ('nobody', 'x')")
    group = f"rebuild-{users.tag}"
    db.set_checkpoint(group, head(db))  # a group ahead of the rebuild: set back to 0
    proc = project(server, "--db", str(path), "--group", group, "--rebuild", "--until-caught-up")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    end = head(db)
    assert f"{end:,} / {end:,}" in err  # the progress line: position / head
    assert "events/s" in err
    assert local_checkpoint(path) == end == db.get_checkpoint(group)
    model = ReadModel(path)
    model.open()
    rows = model.rows()
    model.close()
    assert rows == expected_rows(server, end, tmp_path / "expected.db")


def test_a_bad_projection_argument_is_a_clear_error(server: ServerProcess):
    proc = subprocess.run(
        [sys.executable, "-m", "lethedb_server", "project", "examples.nothing:Here",
         "--server", server.address],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "cannot import examples.nothing" in proc.stderr
