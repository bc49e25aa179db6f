"""``lethedb serve`` refuses a keyring that does not hold the data directory's keys.

The issue's reproduction, through the real command: serve a directory,
append, stop; then start it without its keyring, with another store's
keyring, and with a keyring from before a rotation. Each start must exit
with status 2 and one line on standard error naming the keyring, the
versions expected and those found, and leave every file as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lethedb
from tests.integration.serverproc import ServerProcess
from tests.unit.server.test_key_custody import snapshot


def _serve(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``lethedb serve`` as an operator runs it; a refused start returns at once."""
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", "serve", "--data", str(data),
         "--listen", "127.0.0.1:0", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _served(data: Path, subject: str, *args: str) -> None:
    """Serve *data*, append one event for *subject*, stop."""
    proc = ServerProcess(data, *args).start()
    try:
        with lethedb.Client(proc.address, timeout=10.0) as db:
            db.append(
                f"user-{subject}", [lethedb.Event("Noted", {"n": subject}, subject_id=subject)]
            )
    finally:
        assert proc.stop() == 0, proc.logs()


def _refused(data: Path, *args: str, roots: tuple[Path, ...]) -> str:
    before = snapshot(*roots)
    result = _serve(data, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert snapshot(*roots) == before, "a refused start must write nothing"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lethedb: ")
    return lines[0]


def test_serve_without_its_keyring_is_refused(tmp_path: Path):
    data = tmp_path / "data"
    _served(data, "s1")
    (data / "master.keyring").rename(tmp_path / "away.keyring")

    line = _refused(data, roots=(tmp_path,))

    assert str(data / "master.keyring") in line
    assert "missing" in line
    assert "expected master key version 1, found none" in line
    assert not (data / "master.keyring").exists()
    # With its keyring back, s1 is readable and s2 can be added: nothing was lost.
    (tmp_path / "away.keyring").rename(data / "master.keyring")
    _served(data, "s2")
    proc = ServerProcess(data).start()
    try:
        with lethedb.Client(proc.address, timeout=10.0) as db:
            assert [json.loads(e.data) for e in db.read_all()] == [{"n": "s1"}, {"n": "s2"}]
    finally:
        proc.stop()


def test_serve_with_another_stores_keyring_is_refused(tmp_path: Path):
    _served(tmp_path / "data", "s1")
    _served(tmp_path / "other", "o1")
    other_keyring = tmp_path / "other" / "master.keyring"

    line = _refused(tmp_path / "data", "--keyring", str(other_keyring), roots=(tmp_path,))

    assert str(other_keyring) in line
    assert "different key" in line
    assert "expected master key version 1, found 1" in line


def test_serve_with_a_keyring_lacking_a_version_in_use_is_refused(tmp_path: Path):
    data = tmp_path / "data"
    _served(data, "s1")
    shutil.copy2(data / "master.keyring", tmp_path / "old.keyring")
    proc = ServerProcess(data).start()
    try:
        with lethedb.Client(proc.address, timeout=10.0) as db:
            db.admin.rotate_master_key()
    finally:
        proc.stop()

    line = _refused(data, "--keyring", str(tmp_path / "old.keyring"), roots=(tmp_path,))

    assert str(tmp_path / "old.keyring") in line
    assert "lacks master key version 2" in line
    assert "expected master key versions 1, 2, found 1" in line


@pytest.mark.parametrize(
    ("lost", "expected"),
    [
        ("keys", "is missing or empty, so no event could be decrypted"),
        ("log", "ends at position 0, but its key store has seen position 1"),
    ],
)
def test_serve_with_the_log_or_the_key_store_lost_is_refused(tmp_path: Path, lost, expected):
    data = tmp_path / "data"
    _served(data, "s1")
    shutil.rmtree(data / lost)

    line = _refused(data, roots=(tmp_path,))

    assert expected in line
    assert str(data / ("keys" if lost == "keys" else "log")) in line
