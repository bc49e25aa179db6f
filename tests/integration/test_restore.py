"""Back up, lose the log, restore, keep every erasure: docs/OPERATIONS.md, step by step.

The runbook's commands as an operator types them (``lethedb backup``,
``lethedb forget``, ``lethedb shred``, ``lethedb restore``, ``lethedb serve``,
``lethedb stats``, ``lethedb audit-erasure``), against a real server. Subjects
are forgotten before and after the backup; after the restore every one of
them stays forgotten (redacted, appends refused, receipts shredded, audit
green), every live subject of the backup reads back, the lost positions are
reported, and serving needs ``--accept-restored-log`` exactly once.
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

LIVE = ("live-1", "live-2")
GONE_BEFORE, GONE_AFTER, GONE_NEW = "gone-before", "gone-after", "gone-new"


def lethedb_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _ok(*args: str | Path) -> str:
    result = lethedb_cli(*args)
    assert result.returncode == 0, f"lethedb {args}: {result.stdout}{result.stderr}"
    return result.stdout


def _append(db: lethedb.Client, subject: str, n: int) -> None:
    db.append(
        f"user-{subject}", [lethedb.Event("Noted", {"s": subject, "n": n}, subject_id=subject)]
    )


def test_backup_lose_the_log_restore_and_keep_every_erasure(tmp_path: Path):
    data, backup = tmp_path / "data", tmp_path / "backups" / "nightly"
    proc = ServerProcess(data).start()
    try:
        server = ("--server", proc.address)
        with lethedb.Client(proc.address, timeout=10.0) as db:
            for subject in (*LIVE, GONE_BEFORE, GONE_AFTER):
                _append(db, subject, 1)
        _ok("forget", GONE_BEFORE, "--reason", "gdpr-art17", *server)
        backed_up = _ok("backup", backup, *server)
        with lethedb.Client(proc.address, timeout=10.0) as db:
            _append(db, "live-1", 2)  # lost with the log: it is after the backup
            _append(db, GONE_NEW, 1)
        _ok("forget", GONE_AFTER, "--reason", "gdpr-art17", *server)
        _ok("forget", GONE_NEW, "--reason", "gdpr-art17", *server)
        _ok("shred", *server)
        head = json.loads(_ok("stats", "--json", *server))["last_position"]
    finally:
        assert proc.stop() == 0, proc.logs()
    backup_head = 5  # four appends and one erasure event
    assert f"up to position {backup_head} " in backed_up

    shutil.rmtree(data / "log")  # the log is lost; the key store and the keyring are not

    restored = _ok("restore", backup, "--data", data)
    assert f"{head - backup_head} positions are missing" in restored
    assert "--accept-restored-log" in restored

    refused = lethedb_cli("serve", "--data", data, "--listen", "127.0.0.1:0")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert f"ends at position {backup_head}" in refused.stderr
    assert f"{head - backup_head} positions are missing" in refused.stderr

    proc = ServerProcess(data, "--accept-restored-log").start()
    try:
        assert proc.logs().count("RESTORED LOG") == 1
        server = ("--server", proc.address)
        with lethedb.Client(proc.address, timeout=10.0) as db:
            events = [e for e in db.read_all() if e.subject_id]
            readable = {(e.subject_id, json.loads(e.data)["n"]) for e in events if not e.redacted}
            assert readable == {("live-1", 1), ("live-2", 1)}
            assert {e.subject_id for e in events if e.redacted} == {GONE_BEFORE, GONE_AFTER}
            for subject in (GONE_BEFORE, GONE_AFTER, GONE_NEW):
                with pytest.raises(lethedb.SubjectForgotten):
                    _append(db, subject, 9)
                receipt = json.loads(_ok("subject", subject, *server))
                assert receipt["state"] == "shredded", receipt
        stats = _ok("stats", *server)
        assert "restored log" in stats
        assert f"ended at position {backup_head}" in stats
    finally:
        assert proc.stop() == 0, proc.logs()

    proc = ServerProcess(data).start()  # the next start is quiet and needs no flag
    proc.stop()
    assert proc.logs().count("RESTORED LOG") == 1

    audit = lethedb_cli("audit-erasure", "--data", data)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    for subject in (GONE_BEFORE, GONE_AFTER, GONE_NEW):
        assert f"subject {subject}" in audit.stdout


def test_lose_the_whole_data_directory_restore_keys_and_log_and_forget_again(tmp_path: Path):
    """OPERATIONS.md, "Losing the whole data directory": the keyring lives outside
    the directory, the key-store backup was taken right after a shred epoch, and
    the subjects forgotten after it are forgotten again before clients connect."""
    data, keyring = tmp_path / "data", tmp_path / "secrets" / "master.keyring"
    keys_backup = tmp_path / "backups" / "keys-1"
    outside = ("--keyring", str(keyring))
    proc = ServerProcess(data, *outside).start()
    try:
        server = ("--server", proc.address)
        with lethedb.Client(proc.address, timeout=10.0) as db:
            for subject in (*LIVE, GONE_BEFORE, GONE_AFTER):
                _append(db, subject, 1)
        _ok("forget", GONE_BEFORE, "--reason", "gdpr-art17", *server)
        _ok("shred", *server)
        _ok("backup", keys_backup, "--include-keys", *server)
        # Forgotten after the backup; the disk dies before the next shred epoch
        # (after one, the backup would be useless: see the unit tests).
        _ok("forget", GONE_AFTER, "--reason", "gdpr-art17", *server)
    finally:
        assert proc.stop() == 0, proc.logs()

    shutil.rmtree(data)  # the disk is gone; the keyring was elsewhere

    restored = _ok("restore", keys_backup, "--data", data, *outside)
    assert "restored the key store" in restored
    assert "forget them again" in restored

    # The runbook's warning is real: the key-store backup still decrypts a
    # subject forgotten after it, until that subject is forgotten again.
    proc = ServerProcess(data, *outside).start()
    try:
        server = ("--server", proc.address)
        with lethedb.Client(proc.address, timeout=10.0) as db:
            again = [e for e in db.read_all() if e.subject_id == GONE_AFTER]
            assert [e.redacted for e in again] == [False]
        _ok("forget", GONE_AFTER, "--reason", "gdpr-art17", *server)
        _ok("shred", *server)
        with lethedb.Client(proc.address, timeout=10.0) as db:
            events = [e for e in db.read_all() if e.subject_id]
            assert {e.subject_id for e in events if not e.redacted} == set(LIVE)
            assert {e.subject_id for e in events if e.redacted} == {GONE_BEFORE, GONE_AFTER}
            for subject in (GONE_BEFORE, GONE_AFTER):
                with pytest.raises(lethedb.SubjectForgotten):
                    _append(db, subject, 9)
    finally:
        assert proc.stop() == 0, proc.logs()

    audit = lethedb_cli("audit-erasure", "--data", data, *outside, "--backup", keys_backup)
    assert audit.returncode == 0, audit.stdout + audit.stderr
