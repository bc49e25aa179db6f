"""Multi-stream commits and the operator calls (stats, verify, key rotation) on a real server.

Verification is also tested the hard way: a byte of one record's ciphertext
is flipped in ``log/data.mdb`` while the server is stopped, and both the
offline walk (``lethedb verify --data``) and the server's (``--server``) must
name exactly that position, while every other record stays readable.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import pytest

import lethedb
from lethedb import NO_STREAM, Append, Event
from lethedb_server.ops import cli
from lethedb_server.storage import codec


def _claim(user_id: str) -> Event:
    return Event("UsernameClaimed", {"user": user_id})


def _registered(user_id: str) -> Event:
    return Event("UserRegistered", {"email": f"{user_id}@example.com"}, subject_id=user_id)


def _head(db: lethedb.Client) -> int:
    last = next(db.read_all(backwards=True, max_count=1), None)
    return 0 if last is None else last.position


def _versions(db: lethedb.Client, stream: str) -> list[int] | None:
    try:
        return [e.stream_version for e in db.read_stream(stream)]
    except lethedb.StreamNotFound:
        return None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# --- Commit ----------------------------------------------------------------------------


def test_claiming_a_username_and_writing_the_user_commit_together(client, stream_id):
    username, user = f"username-{stream_id}", f"user-{stream_id}"

    result = client.commit(
        [Append(username, _claim("u-1"), NO_STREAM), Append(user, _registered("u-1"), NO_STREAM)]
    )

    claimed, registered = result.results
    assert not result.deduplicated
    assert (claimed.first_version, registered.first_version) == (0, 0)
    assert registered.first_position == claimed.last_position + 1
    assert [e.json() for e in client.read_stream(username)] == [{"user": "u-1"}]
    (event,) = client.read_stream(user)
    assert event.position == registered.first_position
    assert event.subject_id == "u-1"


def test_a_conflict_on_any_stream_writes_nothing(client, stream_id):
    username = f"username-{stream_id}"
    client.commit(
        [
            Append(username, _claim("u-1"), NO_STREAM),
            Append(f"user-{stream_id}-1", _registered("u-1"), NO_STREAM),
        ]
    )
    head = _head(client)
    second_user = f"user-{stream_id}-2"

    # The user stream comes first, so its part has been applied when the claim fails.
    with pytest.raises(lethedb.WrongExpectedVersion) as info:
        client.commit(
            [
                Append(second_user, _registered("u-2"), NO_STREAM),
                Append(username, _claim("u-2"), NO_STREAM),
            ]
        )

    assert info.value.actual_version == 0
    assert repr(username) in str(info.value)
    assert _head(client) == head
    assert _versions(client, second_user) is None
    assert [e.json() for e in client.read_stream(username)] == [{"user": "u-1"}]


def test_an_exact_expected_version_is_checked_per_stream(client, stream_id):
    a, b = f"{stream_id}-a", f"{stream_id}-b"
    client.append(a, [Event("E"), Event("E")])
    client.append(b, Event("E"))
    head = _head(client)

    with pytest.raises(lethedb.WrongExpectedVersion) as info:
        client.commit([Append(a, Event("F"), 1), Append(b, Event("F"), 1)])
    assert info.value.actual_version == 0
    assert _head(client) == head

    result = client.commit([Append(a, Event("F"), 1), Append(b, Event("F"), 0)])
    assert [(r.first_version, r.last_version) for r in result.results] == [(2, 2), (1, 1)]


def test_retry_with_the_same_idempotency_key_returns_the_first_result_and_writes_nothing(
    client, stream_id
):
    key = f"signup-{stream_id}"
    parts = [
        Append(f"username-{stream_id}", _claim("u-1"), NO_STREAM),
        Append(f"user-{stream_id}", [_registered("u-1"), Event("Welcomed")], NO_STREAM),
    ]
    first = client.commit(parts, idempotency_key=key)
    head = _head(client)

    again = client.commit(parts, idempotency_key=key)

    assert again.deduplicated
    assert all(r.deduplicated for r in again.results)
    assert [msgspec.structs.replace(r, deduplicated=False) for r in again.results] == list(
        first.results
    )
    assert _head(client) == head
    assert _versions(client, f"user-{stream_id}") == [0, 1]


def test_the_same_key_with_another_commit_is_an_idempotency_conflict(client, stream_id):
    key = f"signup-{stream_id}"
    client.commit([Append(f"username-{stream_id}", _claim("u-1"), NO_STREAM)], idempotency_key=key)
    head = _head(client)

    with pytest.raises(lethedb.IdempotencyConflict):
        client.commit(
            [Append(f"username-{stream_id}-other", _claim("u-1"), NO_STREAM)], idempotency_key=key
        )
    assert _head(client) == head
    assert _versions(client, f"username-{stream_id}-other") is None


@pytest.mark.parametrize(
    ("bad_part", "message"),
    [
        # Refused by the server (the SDK does not know the reserved namespace) ...
        (lambda s: Append(f"${s}", Event("E")), r"appends\[1\]\.stream_id '\$"),
        (
            lambda s: Append(s + "-b", [Event("E"), Event("E", b"x" * ((1 << 20) + 1))]),
            r"appends\[1\]\.events\[1\]\.",
        ),
        # ... and by the SDK, before sending.
        (lambda s: Append(s + "-b", Event("")), r"appends\[1\]\.events\[0\]\.event_type is empty"),
    ],
)
def test_a_commit_with_a_bad_part_is_refused_naming_it(client, stream_id, bad_part, message):
    head = _head(client)
    with pytest.raises(lethedb.ValidationError, match=message):
        client.commit([Append(stream_id, Event("E")), bad_part(stream_id)])
    assert _head(client) == head
    assert _versions(client, stream_id) is None


def test_a_forgotten_subject_in_any_part_writes_nothing(client, stream_id):
    subject = f"gone-{stream_id}"
    client.append(f"{stream_id}-old", Event("E", {}, subject_id=subject))
    client.forget_subject(subject)
    head = _head(client)

    with pytest.raises(lethedb.SubjectForgotten):
        client.commit(
            [Append(stream_id, Event("E")), Append(f"{stream_id}-b", _registered(subject))]
        )
    assert _head(client) == head
    assert _versions(client, stream_id) is None


def test_positions_of_a_commit_are_contiguous_in_part_order(client, stream_id):
    sizes = [2, 1, 3]
    parts = [
        Append(f"{stream_id}-{i}", [Event("E", {"i": i, "j": j}) for j in range(n)])
        for i, n in enumerate(sizes)
    ]
    result = client.commit(parts)

    spans = [(r.first_position, r.last_position) for r in result.results]
    assert [last - first + 1 for first, last in spans] == sizes
    assert all(spans[i + 1][0] == spans[i][1] + 1 for i in range(len(spans) - 1))
    events = list(client.read_all(from_position=spans[0][0], max_count=sum(sizes)))
    assert [e.stream_id for e in events] == [f"{stream_id}-{i}" for i, n in enumerate(sizes)
                                             for _ in range(n)]  # fmt: skip


def test_async_commit(server, stream_id):
    async def main() -> tuple[lethedb.CommitResult, lethedb.LetheError]:
        async with lethedb.AsyncClient(server.address) as db:
            parts = [Append(f"username-{stream_id}", _claim("u-1"), NO_STREAM)]
            result = await db.commit(parts)
            try:
                await db.commit(parts)
            except lethedb.WrongExpectedVersion as exc:
                return result, exc
            raise AssertionError("the second claim was not refused")

    result, error = asyncio.run(main())
    assert result.results[0].first_version == 0
    assert error.actual_version == 0


# --- Stats -----------------------------------------------------------------------------


def _counts(stats: lethedb.StoreStats) -> dict[str, int]:
    fields = ("last_position", "streams", "subjects", "forgotten_subjects", "pending_shred")
    return {name: getattr(stats, name) for name in (*fields, "shred_epoch", "master_version")}


def test_stats_count_the_work_done(fresh_server):
    with lethedb.Client(fresh_server.address) as db:
        empty = db.admin.stats()
        assert _counts(empty) == {
            "last_position": 0, "streams": 0, "subjects": 0, "forgotten_subjects": 0,
            "pending_shred": 0, "shred_epoch": 0, "master_version": 1,
        }  # fmt: skip
        assert len(empty.store_id) == 16
        assert 0 < empty.log_file_bytes <= empty.log_map_bytes
        assert empty.key_file_bytes > 0

        for i in range(3):
            db.append(
                f"orders-{i}",
                [Event("OrderPlaced", {"n": j}, subject_id=f"customer-{i}") for j in range(2)],
            )
        db.append("config", Event("FlagSet", {"on": True}))  # no subject: the store key
        # Subjects holding a key: the three customers (the store key is no subject).
        assert _counts(db.admin.stats()) == {
            "last_position": 7, "streams": 4, "subjects": 3, "forgotten_subjects": 0,
            "pending_shred": 0, "shred_epoch": 0, "master_version": 1,
        }  # fmt: skip

        db.forget_subject("customer-0")
        db.forget_subject("customer-1")
        # Two erasure events in the new stream $erasures; two subjects' keys gone.
        assert _counts(db.admin.stats()) == {
            "last_position": 9, "streams": 5, "subjects": 1, "forgotten_subjects": 2,
            "pending_shred": 2, "shred_epoch": 0, "master_version": 1,
        }  # fmt: skip

        shred = db.admin.shred()
        after = db.admin.stats()
        assert _counts(after) == {
            "last_position": 9, "streams": 5, "subjects": 1, "forgotten_subjects": 2,
            "pending_shred": 0, "shred_epoch": shred.epoch, "master_version": shred.master_version,
        }  # fmt: skip
        assert shred.epoch == 1
        assert after.store_id == empty.store_id


# --- Verify ----------------------------------------------------------------------------


def _fill(db: lethedb.Client) -> None:
    """Ten events: four of subject alice, three of bob, three without a subject."""
    for i in range(4):
        db.append("alice-notes", Event("Noted", {"text": f"alice secret {i}"}, subject_id="alice"))
    db.append("bob-notes", [Event("Noted", {"i": i}, subject_id="bob") for i in range(3)])
    db.append("config", [Event("FlagSet", {"flag": i}) for i in range(3)])


def test_verify_passes_on_a_healthy_store_with_redacted_events(fresh_server):
    with lethedb.Client(fresh_server.address) as db:
        _fill(db)
        db.forget_subject("alice")
        db.admin.shred()
        seen: list[lethedb.VerifyProgress] = []
        result = db.admin.verify(progress=seen.append)

    assert result.ok
    assert result.done
    assert (result.checked, result.last_position, result.redacted) == (11, 11, 4)
    assert result.first_bad_position is None
    assert result.problem == ""
    assert seen[-1] == result

    expected = "OK: 11 events verified (4 redacted), chain head matches"
    online = _cli("verify", "--server", fresh_server.address)
    assert (online.returncode, online.stdout.strip()) == (0, expected), online.stderr
    assert "11 / 11  100%" in online.stderr  # the progress line, on stderr

    fresh_server.stop()
    offline = _cli("verify", "--data", str(fresh_server.data_dir))
    assert (offline.returncode, offline.stdout.strip()) == (0, expected), offline.stderr


def _read_record(data_dir: Path, position: int) -> bytes:
    """A stored record's bytes, through LMDB read-only (the server must be stopped)."""
    env = lmdb.open(str(data_dir / "log"), readonly=True, lock=False, max_dbs=32)
    try:
        events = env.open_db(b"events", create=False)
        with env.begin(db=events) as txn:
            value = txn.get(codec.u64(position))
    finally:
        env.close()
    assert value is not None, f"no record at position {position}"
    return bytes(value)


def _flip_ciphertext_byte(data_dir: Path, position: int) -> int:
    """Flip one bit in the middle of the record's ciphertext wherever the file holds it.

    Copy-on-write leaves older copies of a page in the file, so every copy is
    damaged: the test must not depend on which one LMDB reads. Returns how
    many were flipped.
    """
    ciphertext = codec.decode_record(_read_record(data_dir, position)).ciphertext
    data_file = data_dir / "log" / "data.mdb"
    content = bytearray(data_file.read_bytes())
    flipped = 0
    offset = content.find(ciphertext)
    while offset >= 0:
        content[offset + len(ciphertext) // 2] ^= 0x01
        flipped += 1
        offset = content.find(ciphertext, offset + 1)
    data_file.write_bytes(bytes(content))
    return flipped


def test_a_flipped_byte_on_disk_is_reported_at_its_exact_position(fresh_server):
    with lethedb.Client(fresh_server.address) as db:
        for i in range(6):
            db.append("notes", Event("Noted", {"text": f"payload number {i} " * 8}, subject_id="p"))
    victim = 4
    fresh_server.stop()
    assert _flip_ciphertext_byte(fresh_server.data_dir, victim) >= 1

    offline = _cli("verify", "--data", str(fresh_server.data_dir))
    assert offline.returncode == 1, offline.stderr
    assert offline.stdout.startswith(f"FAILED at position {victim}: "), offline.stdout

    fresh_server.start()
    online = _cli("verify", "--server", fresh_server.address)
    assert online.returncode == 1, online.stderr
    assert online.stdout == offline.stdout

    with lethedb.Client(fresh_server.address) as db:
        result = db.admin.verify()
        assert not result.ok
        assert (result.first_bad_position, result.checked) == (victim, victim - 1)
        with pytest.raises(lethedb.DataLoss, match=f"position {victim}"):
            list(db.read_all(from_position=victim, max_count=1))
        with pytest.raises(lethedb.DataLoss, match=f"position {victim}"):
            list(db.read_stream("notes", from_version=victim - 1, max_count=1))
        before = [e.json()["text"] for e in db.read_all(max_count=victim - 1)]
        after = [e.json()["text"] for e in db.read_all(after=victim)]
    assert before == [f"payload number {i} " * 8 for i in range(victim - 1)]
    assert after == [f"payload number {i} " * 8 for i in range(victim, 6)]


def test_offline_verify_is_refused_while_a_server_holds_the_directory(server):
    result = _cli("verify", "--data", str(server.data_dir))
    assert result.returncode == 2
    assert "in use" in result.stderr
    assert "lethedb verify --server" in result.stderr
    assert result.stdout == ""


def test_offline_verify_never_creates_a_keyring_or_a_directory(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "log").mkdir(parents=True)
    assert cli.main(["verify", "--data", str(data)]) == 2
    assert "no master keyring at" in capsys.readouterr().err
    assert not (data / "master.keyring").exists()

    assert cli.main(["verify", "--data", str(tmp_path / "missing")]) == 2
    assert "not a LetheDB data directory" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "d", "--server", "localhost:50051"], "give --server or --data, not both"),
        (["--keyring", "k"], "--keyring goes with --data"),
    ],
)
def test_verify_refuses_conflicting_options(args, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["verify", *args])


# --- RotateMasterKey -------------------------------------------------------------------


def _keyring(data_dir: Path) -> tuple[int, set[int]]:
    doc: dict[str, Any] = json.loads((data_dir / "master.keyring").read_text())
    return doc["current"], {int(v) for v in doc["keys"]}


def test_rotating_the_master_key_keeps_every_event_readable_and_the_old_version(fresh_server):
    with lethedb.Client(fresh_server.address) as db:
        _fill(db)
        db.forget_subject("bob")
        written = [e.data for e in db.read_all()]
        assert db.admin.stats().master_version == 1

        rotated = db.admin.rotate_master_key()

        assert rotated.master_version == 2
        assert rotated.rewrapped_keys == 2  # alice and the store key; bob's is gone
        assert db.admin.stats().master_version == 2
        assert [e.data for e in db.read_all()] == written
        db.append("alice-notes", Event("Noted", {"text": "after"}, subject_id="alice"))
    assert _keyring(fresh_server.data_dir) == (2, {1, 2})

    # A restart empties the key cache: every key must now unwrap under version 2.
    fresh_server.restart()
    with lethedb.Client(fresh_server.address) as db:
        assert [e.data for e in db.read_all(max_count=len(written))] == written
        assert [e.json() for e in db.read_stream("alice-notes", from_version=4)] == [
            {"text": "after"}
        ]
        shred = db.admin.shred()
        assert [e.data for e in db.read_all(max_count=len(written))] == written
    # The shred epoch is what destroys the old versions.
    assert _keyring(fresh_server.data_dir) == (shred.master_version, {shred.master_version})


# --- CLI -------------------------------------------------------------------------------


def test_cli_stats_verify_and_rotate(server, client, stream_id):
    client.append(stream_id, Event("E", {}, subject_id=f"s-{stream_id}"))

    table = _cli("stats", "--server", server.address)
    assert table.returncode == 0, table.stderr
    labels = [line.split("  ")[0].strip() for line in table.stdout.splitlines()]
    assert labels[:3] == ["last position", "streams", "subjects (live)"]
    assert "master key version" in labels

    as_json = _cli("stats", "--json", "--server", server.address)
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    stats = client.admin.stats()
    assert doc["last_position"] == stats.last_position == _head(client)
    assert doc["streams"] == stats.streams
    assert doc["store_id"] == stats.store_id.hex()
    assert f"{stats.last_position:,}" in table.stdout

    verify = _cli("verify", "--server", server.address)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith(f"OK: {stats.last_position} events verified (")

    before = stats.master_version
    rotate = _cli("rotate-master-key", "--server", server.address)
    assert rotate.returncode == 0, rotate.stderr
    assert rotate.stdout.startswith(f"master key version {before + 1} is current: ")
    assert client.admin.stats().master_version == before + 1
