"""A backup that carries master keys defeats erasure, and the audit says so.

With the default layout the master keyring lives inside the data directory,
so a plain copy of that directory (``cp -a``, a disk snapshot) holds the
master key versions of its day next to the wrapped data keys they open. A
shred epoch destroys those versions in the live keyring only: the copy keeps
decrypting every subject that was not yet shredded when it was made, for ever.
``audit-erasure`` must find such key material (a keyring under any name, or
the raw bytes of a master key) in every backup it is given and in the data
directory, fail every forgotten subject it can decrypt, and prove it by
unwrapping the subject's key with it. ``lethedb backup`` never puts a backup
where a copy would sweep the keyring up with it.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import lethedb
from lethedb_server.engine.model import AppendCommand, ForgetCommand, ProposedEvent, ShredCommand
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import ValidationError
from tests.integration.serverproc import ServerProcess

ALICE, BOB, CAROL = "subj-alice", "subj-bob", "subj-carol"


def _audit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", "audit-erasure", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _lines(report: str, subject: str) -> list[str]:
    """The check lines printed under *subject*."""
    lines: list[str] = []
    inside = False
    for line in report.splitlines():
        if not line.startswith("  "):
            inside = line.startswith(f"subject {subject} ")
        elif inside:
            lines.append(line.strip())
    return lines


def _failures(report: str, subject: str) -> list[str]:
    return [line for line in _lines(report, subject) if line.startswith("FAIL")]


def _append(store: Store, stream: str, subject: str, text: str) -> None:
    event = ProposedEvent(b"", "Noted", subject, "application/json", text.encode(), b"")
    store.writer.append(AppendCommand(stream, (event,)))


def _forget_and_shred(store: Store, subject: str) -> None:
    store.writer.execute(ForgetCommand(subject, "gdpr-art17", "admin"))
    store.writer.execute(ShredCommand())


def _master_keys(keyring: Path) -> dict[int, bytes]:
    doc = json.loads(keyring.read_text())
    return {int(v): base64.b64decode(k) for v, k in doc["keys"].items()}


def test_a_copy_of_the_data_directory_from_before_a_forget_fails_the_audit(
    tmp_path: Path,
) -> None:
    data, copy = tmp_path / "data", tmp_path / "copy"
    proc = ServerProcess(data).start()
    with lethedb.Client(proc.address, timeout=10.0) as db:
        db.append("user-1", [lethedb.Event("Registered", {"pin": "4711"}, subject_id=ALICE)])
        db.append("user-2", [lethedb.Event("Registered", {"pin": "1234"}, subject_id=BOB)])
    proc.stop()
    shutil.copytree(data, copy)  # a plain copy, keyring included, as cp -a or a snapshot makes
    proc.start()
    with lethedb.Client(proc.address, timeout=10.0) as db:
        db.forget_subject(ALICE, reason="gdpr-art17")
        db.admin.shred()
        assert db.get_subject(ALICE).state is lethedb.SubjectState.SHREDDED
    proc.stop()

    report = _audit("--data", data, "--backup", copy)

    assert report.returncode == 1, report.stdout + report.stderr
    assert "RESULT: FAIL" in report.stdout
    [finding] = _failures(report.stdout, ALICE)
    assert f"{copy / 'master.keyring'} (in backup {copy}) is a master keyring" in finding
    assert "copied before the subject was shredded" in finding
    assert "proved: it unwraps the subject's key (version 1)" in finding
    assert f"of {copy / 'keys' / 'data.mdb'}" in finding
    assert "and decrypts its event at position 1" in finding
    assert "4711" not in report.stdout  # the proof never shows the data
    # The failure is real: the copy on its own reads the forgotten subject.
    with Store.open(copy) as stolen:
        [event] = stolen.reader.read_subject(ALICE, 0, 10)
    assert not event.redacted
    assert json.loads(event.data) == {"pin": "4711"}


KeyForm = Callable[[Path, dict[int, bytes]], Path]


def _keyring_under_another_name(backup: Path, keys: dict[int, bytes]) -> Path:
    target = backup / "settings" / "app-config.json"
    target.parent.mkdir()
    doc = {
        "format": 1,
        "current": max(keys),
        "keys": {str(v): base64.b64encode(k).decode() for v, k in keys.items()},
    }
    target.write_text(json.dumps(doc))
    return target


def _raw_key_bytes(backup: Path, keys: dict[int, bytes]) -> Path:
    target = backup / "kek.bin"
    target.write_bytes(keys[1])
    return target


def _base64_key_in_a_text_file(backup: Path, keys: dict[int, bytes]) -> Path:
    target = backup / "deploy.env"
    target.write_text(f"LOG_LEVEL=info\nMASTER_KEY={base64.b64encode(keys[1]).decode()}\n")
    return target


def _hex_key_in_a_text_file(backup: Path, keys: dict[int, bytes]) -> Path:
    target = backup / "vault-export.yaml"
    target.write_text(f"kek:\n  v1: {keys[1].hex().upper()}\n")
    return target


@pytest.mark.parametrize(
    ("form", "described"),
    [
        pytest.param(_keyring_under_another_name, "is a master keyring", id="keyring-renamed"),
        pytest.param(_raw_key_bytes, "holds a 256-bit key (raw bytes)", id="raw"),
        pytest.param(_base64_key_in_a_text_file, "holds a 256-bit key (base64)", id="base64"),
        pytest.param(_hex_key_in_a_text_file, "holds a 256-bit key (hex)", id="hex"),
    ],
)
def test_master_key_material_in_any_form_in_a_backup_fails_the_audit(
    tmp_path: Path, form: KeyForm, described: str
) -> None:
    data, backup = tmp_path / "data", tmp_path / "backup"
    with Store.open(data) as store:
        _append(store, "user-1", ALICE, '{"pin": "4711"}')
        store.backup(backup, include_keys=True)
        planted = form(backup, _master_keys(data / "master.keyring"))
        _forget_and_shred(store, ALICE)

    report = _audit("--data", data, "--backup", backup)

    assert report.returncode == 1, report.stdout
    [finding] = _failures(report.stdout, ALICE)
    assert f"{planted} (in backup {backup}) {described}, with master key versions [1]" in finding
    assert "proved: it unwraps the subject's key (version 1)" in finding


def test_key_material_fails_exactly_the_subjects_not_yet_shredded_when_it_was_copied(
    tmp_path: Path,
) -> None:
    """A copy made after Alice's shred holds no key of hers; Carol, shredded
    after the copy, is decryptable from it."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    with Store.open(data) as store:
        _append(store, "user-1", ALICE, '{"pin": "4711"}')
        _append(store, "user-3", CAROL, '{"pin": "9999"}')
        _forget_and_shred(store, ALICE)
    shutil.copytree(data, copy)

    after_alice = _audit("--data", data, "--backup", copy)
    assert after_alice.returncode == 0, after_alice.stdout
    assert _lines(after_alice.stdout, ALICE)[-1].startswith(
        "PASS    no master key material in the data directory or in 1 backup"
    )
    [warning] = [line for line in after_alice.stdout.splitlines() if line.startswith("  WARN")]
    assert f"{copy / 'master.keyring'} (in backup {copy}) is a master keyring" in warning
    assert "decrypts every subject not yet shredded when it was copied" in warning

    with Store.open(data) as store:
        _forget_and_shred(store, CAROL)
    after_carol = _audit("--data", data, "--backup", copy)

    assert after_carol.returncode == 1
    assert _failures(after_carol.stdout, ALICE) == []
    [finding] = _failures(after_carol.stdout, CAROL)
    assert "proved: it unwraps the subject's key" in finding


def test_a_keyring_left_in_the_data_directory_after_moving_it_out_fails_the_audit(
    tmp_path: Path,
) -> None:
    data, outside = tmp_path / "data", tmp_path / "etc" / "master.keyring"
    with Store.open(data) as store:
        _append(store, "user-1", ALICE, '{"pin": "4711"}')
    outside.parent.mkdir(mode=0o700)
    shutil.copy2(data / "master.keyring", outside)  # copied out, the old one forgotten
    with Store.open(data, StoreOptions(keyring_path=outside)) as store:
        _forget_and_shred(store, ALICE)

    report = _audit("--data", data, "--keyring", outside)

    assert report.returncode == 1, report.stdout
    [finding] = _failures(report.stdout, ALICE)
    assert f"{data / 'master.keyring'} (in the data directory) is a master keyring" in finding


def test_backup_refuses_a_destination_a_copy_of_the_keyring_directory_would_include(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with Store.open(data) as store:
        with pytest.raises(ValidationError) as refused:
            store.backup(data / "backups" / "b1", include_keys=False)
        assert not (data / "backups").exists()
        store.backup(tmp_path / "b1", include_keys=False)
    assert str(refused.value) == (
        f"backup destination {data / 'backups' / 'b1'} is inside {data}, the directory of "
        f"the master keyring {data / 'master.keyring'}: a copy of {data} would carry the "
        "backup and the keyring together, which decrypts every subject not yet shredded "
        "when the copy is made, for ever; choose a destination outside it"
    )


def test_lethedb_backup_into_the_data_directory_is_refused(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data").start()
    try:
        backup = subprocess.run(
            [sys.executable, "-m", "lethedb_server", "backup",
             str(tmp_path / "data" / "backup"), "--server", proc.address],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        proc.stop()
    assert backup.returncode == 1
    assert "the directory of the master keyring" in backup.stderr
    assert not (tmp_path / "data" / "backup").exists()


def test_start_up_warns_once_when_the_keyring_is_inside_the_data_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    outside = tmp_path / "kr" / "master.keyring"
    with caplog.at_level(logging.WARNING):
        Store.open(data).close()
        outside.parent.mkdir(mode=0o700)
        (data / "master.keyring").rename(outside)  # as docs/OPERATIONS.md says
        Store.open(data, StoreOptions(keyring_path=outside)).close()

    warnings = [r.getMessage() for r in caplog.records if "keyring" in r.getMessage()]
    assert warnings == [
        f"master keyring {data / 'master.keyring'} is inside the data directory {data}: "
        f"any copy of {data} (a backup, a snapshot, cp -a) decrypts every subject not yet "
        "shredded when it was made, for ever, whatever is forgotten later; keep the keyring "
        "outside the data directory (move it while the server is stopped and start with "
        "--keyring PATH)"
    ]
