"""Damaged files, end to end: refused at start-up, or pinned to the exact record.

LMDB has no page checksums. A truncated ``data.mdb`` opens fine and then dies
with SIGBUS on the first read of a missing page, and a damaged meta page makes
LMDB fall back silently to an older state. ``lethedb serve`` must refuse both
before LMDB maps the file: a non-zero exit, quickly, with a message that
names the file and says what to do, never a signal.

A flipped byte inside one record must not take the server down: the server
starts, reading that record is DATA_LOSS naming its position, every other
record still reads, and ``lethedb verify`` (online and ``--data`` offline)
reports exactly that position.

Damage to LMDB's own pages (it has no checksums) that LMDB reports as
MDB_CORRUPTED must be DATA_LOSS too, naming the file, never UNKNOWN.

Reads check each record's AES-GCM tag, whose associated data binds the
ciphertext to its slot and to every clear field of its record (store,
position, stream, version, type, subject, event id, key version, content
type, time), so a flip in any of them is DATA_LOSS on read as well as a
``verify`` failure.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import admin_pb2, admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server import codec
from lethedb_server.storage import LogStore
from tests.faults.support import verify_offline
from tests.integration.serverproc import ServerProcess

PAGE = 4096
STREAMS = ("corrupt-a", "corrupt-b", "corrupt-c")
EVENTS = 30
#: Position 17 is stream corrupt-b, version 5 (positions cycle through the streams).
VICTIM = 17
VICTIM_STREAM = STREAMS[(VICTIM - 1) % len(STREAMS)]
SIGBUS_CODES = (-signal.SIGBUS, 128 + signal.SIGBUS)
#: A refusal must not wait for anything: it happens before the port is bound.
REFUSAL_WITHIN_S = 20.0


def _payload(position: int) -> bytes:
    return f'{{"n": {position}, "text": "{"x" * 100}"}}'.encode()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A healthy data directory written by a real server, stopped gracefully."""
    data = tmp_path_factory.mktemp("corruption") / "data"
    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            for position in range(1, EVENTS + 1):
                event = pb.ProposedEvent(
                    event_type="Noted",
                    subject_id=f"subj-{position % 4}",
                    content_type="application/json",
                    data=_payload(position),
                )
                stream = STREAMS[(position - 1) % len(STREAMS)]
                response = stub.Append(
                    pb.AppendRequest(stream_id=stream, events=[event]), timeout=10
                )
                assert response.first_position == position
            # Enough bulk that the log file spans many pages.
            bulk = [pb.ProposedEvent(event_type="Bulk", data=bytes(3000)) for _ in range(100)]
            stub.Append(pb.AppendRequest(stream_id="bulk", events=bulk), timeout=10)
    finally:
        assert server.stop() == 0
    return data


@pytest.fixture
def data(template: Path, tmp_path: Path) -> Path:
    """A copy of the template for one test to damage."""
    copy = tmp_path / "data"
    shutil.copytree(template, copy)
    return copy


def _serve(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server.cli", "serve",
         "--data", str(data), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _truncate_half(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _truncate_one_page(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - PAGE)


def _zero_pages(*pages: int) -> Callable[[Path], None]:
    def zero(path: Path) -> None:
        with path.open("r+b") as f:
            for page in pages:
                f.seek(page * PAGE)
                f.write(bytes(PAGE))

    return zero


DAMAGE = {
    "truncated to half": (_truncate_half, "is truncated"),
    "short by one page": (_truncate_one_page, "is truncated"),
    "meta page 0 zeroed": (_zero_pages(0), "meta page 0 is damaged"),
    "meta page 1 zeroed": (_zero_pages(1), "meta page 1 is damaged"),
    "both meta pages zeroed": (_zero_pages(0, 1), "no valid LMDB meta page"),
}


@pytest.mark.parametrize("environment", ["log", "keys"])
@pytest.mark.parametrize(("damage", "message"), DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_data_file_is_refused_at_start_up_with_a_clear_message(
    data: Path, environment: str, damage: Callable[[Path], None], message: str
):
    data_file = data / environment / "data.mdb"
    assert data_file.stat().st_size > 4 * PAGE
    damage(data_file)

    started = time.monotonic()
    refused = _serve(data)
    elapsed = time.monotonic() - started

    output = refused.stdout + refused.stderr
    assert refused.returncode not in SIGBUS_CODES, output
    assert refused.returncode == 2, output
    assert elapsed < REFUSAL_WITHIN_S
    assert message in output
    assert str(data_file) in output
    assert "restore it from a backup" in output
    assert "Traceback" not in output


# -- a flipped byte inside one record --------------------------------------------


def _field_offset(field: str, value: bytes) -> int:
    """Offset, within a stored event value, of a byte belonging to *field*."""
    body = codec.decode_record(value)
    offsets = {
        "ciphertext": lambda: value.index(body.ciphertext) + len(body.ciphertext) // 2,
        "nonce": lambda: value.index(body.nonce) + 5,
        "event_type": lambda: value.index(body.event_type.encode()) + 2,
        "event_id": lambda: value.index(body.event_id) + 7,
        "record header": lambda: 0,
        "chain hash": lambda: len(value) - 1,
        "content_type": lambda: value.index(body.content_type.encode()) + 4,
        # msgpack uint64: 0xcf and 8 bytes; flip the least significant one.
        "recorded_at": lambda: value.index(b"\xcf" + body.recorded_at.to_bytes(8, "big")) + 8,
    }
    return offsets[field]()


def _flip_byte_of_record(data: Path, position: int, field: str) -> None:
    """Flip one bit of *field* in every copy of the record in the log file.

    Copy-on-write leaves older copies of a page in the file; damaging them
    all makes sure the live one is hit whichever it is.
    """
    log = LogStore(data / "log")
    try:
        [(found, value)] = log.read_all_page(position, backwards=False, limit=1)
    finally:
        log.close()
    assert found == position
    offset_in_value = _field_offset(field, value)
    data_file = data / "log" / "data.mdb"
    content = bytearray(data_file.read_bytes())
    at = content.find(value)
    assert at >= 0
    while at >= 0:
        content[at + offset_in_value] ^= 0x01
        at = content.find(value, at + 1)
    data_file.write_bytes(bytes(content))


def _events(call) -> list[pb.RecordedEvent]:
    return [e for response in call for e in response.events]


def _expect_data_loss(call: Callable[[], list[pb.RecordedEvent]], position: int) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    assert failed.value.code() == grpc.StatusCode.DATA_LOSS
    assert f"position {position}" in failed.value.details()


def _verify_online(channel: grpc.Channel) -> admin_pb2.VerifyProgress:
    admin = admin_pb2_grpc.AdminStub(channel)
    *_, last = admin.Verify(admin_pb2.VerifyRequest(), timeout=60)
    assert last.done
    return last


def _verify_cli(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server.cli", "verify", "--data", str(data)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _assert_verify_pins(data: Path, position: int) -> None:
    """Offline, in this process and through ``lethedb verify --data``: that position."""
    verifier = verify_offline(data)
    assert not verifier.ok
    assert verifier.first_bad_position == position, verifier.problem
    cli = _verify_cli(data)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert f"position {position}" in cli.stdout


def _assert_everything_else_reads(stub: eventstore_pb2_grpc.EventStoreStub) -> None:
    before = _events(stub.ReadAll(pb.ReadAllRequest(max_count=VICTIM - 1), timeout=10))
    assert [e.position for e in before] == list(range(1, VICTIM))
    after = _events(stub.ReadAll(pb.ReadAllRequest(from_position=VICTIM + 1), timeout=10))
    assert [e.position for e in after][:2] == [VICTIM + 1, VICTIM + 2]
    assert all(e.data == _payload(e.position) for e in before + after if e.event_type == "Noted")
    for stream in STREAMS:
        if stream != VICTIM_STREAM:
            assert len(_events(stub.ReadStream(pb.ReadStreamRequest(stream_id=stream)))) == 10
    victim_version = (VICTIM - 1) // len(STREAMS)
    rest = stub.ReadStream(
        pb.ReadStreamRequest(stream_id=VICTIM_STREAM, from_version=victim_version + 1), timeout=10
    )
    assert [e.stream_version for e in _events(rest)] == list(range(victim_version + 1, 10))


READ_CHECKED_FIELDS = ["ciphertext", "nonce", "event_type", "event_id", "record header"]


@pytest.mark.parametrize("field", READ_CHECKED_FIELDS)
def test_flipped_byte_in_a_record_is_data_loss_for_that_record_only(data: Path, field: str):
    _flip_byte_of_record(data, VICTIM, field)

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            _expect_data_loss(lambda: _events(stub.ReadAll(pb.ReadAllRequest())), VICTIM)
            _expect_data_loss(
                lambda: _events(stub.ReadStream(pb.ReadStreamRequest(stream_id=VICTIM_STREAM))),
                VICTIM,
            )
            _assert_everything_else_reads(stub)
            assert _verify_online(channel).first_bad_position == VICTIM
            # The server is still healthy and still writes.
            stub.Append(
                pb.AppendRequest(stream_id="after", events=[pb.ProposedEvent(event_type="Ok")]),
                timeout=10,
            )
    finally:
        assert server.stop() == 0
    _assert_verify_pins(data, VICTIM)


def test_flipped_byte_in_a_chain_hash_is_found_by_verify_and_reads_stay_right(data: Path):
    """The trailer is not event data: reads are right, the chain names the record."""
    _flip_byte_of_record(data, VICTIM, "chain hash")

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            events = _events(stub.ReadAll(pb.ReadAllRequest(max_count=EVENTS)))
            assert [e.data for e in events] == [_payload(p) for p in range(1, EVENTS + 1)]
            assert _verify_online(channel).first_bad_position == VICTIM
    finally:
        assert server.stop() == 0
    _assert_verify_pins(data, VICTIM)


# The fields the hash chain covered before the tag did: now both must catch a flip.
LATE_BOUND_FIELDS = ["content_type", "recorded_at"]


@pytest.mark.parametrize("field", LATE_BOUND_FIELDS)
def test_flipped_byte_in_content_type_or_time_is_found_by_verify(data: Path, field: str):
    _flip_byte_of_record(data, VICTIM, field)

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            _assert_everything_else_reads(stub)
            assert _verify_online(channel).first_bad_position == VICTIM
    finally:
        assert server.stop() == 0
    _assert_verify_pins(data, VICTIM)


@pytest.mark.parametrize("field", LATE_BOUND_FIELDS)
def test_flipped_byte_in_any_clear_field_is_data_loss_on_read(data: Path, field: str):
    _flip_byte_of_record(data, VICTIM, field)

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            _expect_data_loss(lambda: _events(stub.ReadAll(pb.ReadAllRequest())), VICTIM)
    finally:
        assert server.stop() == 0


def _zero_pages_holding_record(data: Path, position: int) -> None:
    """Zero every page of the log file that holds a copy of the record: LMDB's own structure."""
    log = LogStore(data / "log")
    try:
        [(_, value)] = log.read_all_page(position, backwards=False, limit=1)
    finally:
        log.close()
    data_file = data / "log" / "data.mdb"
    content = bytearray(data_file.read_bytes())
    at = content.find(value)
    assert at >= 0
    while at >= 0:
        page = at // PAGE
        content[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
        at = content.find(value, at + 1)
    data_file.write_bytes(bytes(content))


def test_zeroed_btree_page_is_data_loss_naming_the_file_not_an_unknown_error(data: Path):
    """LMDB reports a page of the wrong type as MDB_CORRUPTED; that is data loss.

    Before the fix the read ended in UNKNOWN ("Unexpected <class
    'lmdb.CorruptedError'>") and offline verify died with a traceback.
    """
    _zero_pages_holding_record(data, VICTIM)

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                _events(stub.ReadAll(pb.ReadAllRequest()))
            assert failed.value.code() == grpc.StatusCode.DATA_LOSS
            assert str(data / "log") in failed.value.details()
            assert "restore" in failed.value.details()
            assert server.proc is not None
            assert server.proc.poll() is None
            stats = admin_pb2_grpc.AdminStub(channel).Stats(admin_pb2.StatsRequest(), timeout=10)
            assert stats.last_position == EVENTS + 100
    finally:
        assert server.stop() == 0
    cli = _verify_cli(data)
    assert cli.returncode not in (0, *SIGBUS_CODES, -signal.SIGABRT), cli.stdout + cli.stderr
    assert "Traceback" not in cli.stderr
    assert str(data / "log") in cli.stdout + cli.stderr
