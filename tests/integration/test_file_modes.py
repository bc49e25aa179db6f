"""Store files are private to the server's user, whatever the umask.

Everything under the data directory, in a backup, in a keyring or tokens file
and in a subject export holds personal data (encrypted or not) or keys. With
the common umask 022 a process's new files are 0644 and its directories 0755:
readable by every local user. LetheDB sets the modes itself (directories 0700,
files 0600), and start-up names every path it finds wider, with the command
that narrows it.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lethedb
from lethedb_server.engine.store import Store, StoreOptions
from tests.integration.serverproc import ServerProcess

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual default umask, for this process and the servers it starts."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _wider_than_private(*roots: Path) -> dict[str, str]:
    """Every path under *roots* (the roots included) that is not 0700 / 0600."""
    found: dict[str, str] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            wanted = PRIVATE_DIR if path.is_dir() else PRIVATE_FILE
            if mode != wanted:
                found[str(path)] = f"{mode:04o}"
    return found


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_file_the_server_and_cli_write_is_private_under_umask_022(
    tmp_path: Path, umask_022: None
) -> None:
    data = tmp_path / "data"
    backup = tmp_path / "backups" / "b1"
    export = tmp_path / "alice.json"
    proc = ServerProcess(data).start()
    try:
        with lethedb.Client(proc.address, timeout=10.0) as db:
            db.append(
                "user-1", [lethedb.Event("Registered", {"email": "a@example.com"}, subject_id="s1")]
            )
            db.append(
                "user-2", [lethedb.Event("Registered", {"email": "b@example.com"}, subject_id="s2")]
            )
            db.forget_subject("s1")
            db.admin.shred()  # shred.journal, keys.next/, a rewritten keyring
            db.admin.backup(str(backup), include_keys=True)
        exported = _cli("export", "s2", "-o", str(export), "--server", proc.address)
        assert exported.returncode == 0, exported.stderr
    finally:
        proc.stop()
    assert (data / "log" / "data.mdb").exists()
    assert (backup / "keys" / "data.mdb").exists()

    assert _wider_than_private(data, backup) == {}
    assert stat.S_IMODE(export.stat().st_mode) == PRIVATE_FILE
    assert "chmod" not in proc.logs()


def test_a_keyring_and_a_tokens_file_outside_the_data_directory_are_private(
    tmp_path: Path, umask_022: None
) -> None:
    secrets = tmp_path / "etc" / "lethedb"
    Store.open(tmp_path / "data", StoreOptions(keyring_path=secrets / "master.keyring")).close()
    created = _cli(
        "token", "create", "--role", "admin", "--tokens-file", str(secrets / "tokens.json")
    )
    assert created.returncode == 0, created.stderr

    assert _wider_than_private(secrets, tmp_path / "data") == {}


@pytest.mark.parametrize("through_a_link", [False, True], ids=["directory", "symlink"])
def test_start_up_names_every_path_other_users_can_open_and_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, through_a_link: bool
) -> None:
    data = tmp_path / "data"
    if through_a_link:  # e.g. /var/lib/lethedb -> /srv/disk2/lethedb
        (tmp_path / "disk2").mkdir(mode=0o700)
        data.symlink_to(tmp_path / "disk2")
    Store.open(data).close()
    os.chmod(data, 0o755)
    os.chmod(data / "keys", 0o750)
    os.chmod(data / "log" / "data.mdb", 0o644)
    os.chmod(data / "lethedb.lock", 0o660)

    with caplog.at_level(logging.WARNING):
        Store.open(data).close()

    warnings = sorted(r.getMessage() for r in caplog.records if "chmod" in r.getMessage())
    assert warnings == sorted(
        [
            f"{data} is mode 0755: other local users can open it; run: chmod 700 {data}",
            f"{data / 'keys'} is mode 0750: other local users can open it; "
            f"run: chmod 700 {data / 'keys'}",
            f"{data / 'log' / 'data.mdb'} is mode 0644: other local users can open it; "
            f"run: chmod 600 {data / 'log' / 'data.mdb'}",
            f"{data / 'lethedb.lock'} is mode 0660: other local users can open it; "
            f"run: chmod 600 {data / 'lethedb.lock'}",
        ]
    )
