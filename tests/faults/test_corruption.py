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

import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from lethedb.v1 import admin_pb2, admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.store import Store
from lethedb_server.storage import codec
from lethedb_server.storage.log import LogStore
from tests.faults import flipworker
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
        [sys.executable, "-m", "lethedb_server", "serve",
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
        [sys.executable, "-m", "lethedb_server", "verify", "--data", str(data)],
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


# -- 200 random single-byte flips across a 50,000-event log ----------------------------
#
# Each flip lands in a copy of the log file of a store the writer filled; ``lethedb
# verify --data`` checks it in a child process (tests/faults/flipworker.py), which a
# LMDB assertion or SIGBUS would kill: a dead child counts as a failure to report.
# What the flip hit is read off the pristine file's pages by this test's own decoder
# of LMDB's format, so the test knows which record, if any, the flip damaged.

FLIPS = 200
FLIP_EVENTS = 50_000
FLIP_SEED = 20261207
#: Every this many events one is large enough to take LMDB overflow pages.
LARGE_EVERY = 1000
_P_BRANCH, _P_LEAF, _F_BIGDATA, _F_SUBDATA = 0x01, 0x02, 0x01, 0x02


@dataclass(frozen=True)
class Spot:
    """What a byte of the pristine file belongs to."""

    kind: str  # record, node, page, slack, free, meta, catalog, freelist
    table: str = ""
    key: bytes = b""
    value: bytes = b""
    page: int = 0


class PageMap:
    """Which table, record and part of it each byte of an intact LMDB file holds.

    A deliberately plain decoder of LMDB's 64-bit format, independent of the
    server's pagecheck module, which it is here to judge.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.regions: dict[int, list[tuple[int, int, Spot]]] = {}
        metas = [struct.unpack_from("<QQ", data, i * PAGE + 16 + 24 + 96) for i in (0, 1)]
        newest = 0 if metas[0][1] > metas[1][1] else 1
        self.newest_meta = newest
        base = newest * PAGE + 16 + 24
        self._walk("(free list)", struct.unpack_from("<Q", data, base + 40)[0])
        self._walk("(catalog)", struct.unpack_from("<Q", data, base + 48 + 40)[0])

    def _walk(self, table: str, pgno: int) -> None:
        if pgno == 2**64 - 1:
            return
        data, base = self.data, pgno * PAGE
        _, _, flags, lower, upper = struct.unpack_from("<QHHHH", data, base)
        regions = [(0, lower, Spot("page", table, page=pgno))]
        regions.append((lower, upper, Spot("slack", table, page=pgno)))
        count = (lower - 16) // 2
        for offset in struct.unpack_from(f"<{count}H", data, base + 16):
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", data, base + offset)
            key = data[base + offset + 8 : base + offset + 8 + ksize]
            if flags & _P_BRANCH:
                node = Spot("node", table, key, page=pgno)
                regions.append((offset, offset + 8 + ksize, node))
                self._walk(table, lo | hi << 16 | nflags << 32)
                continue
            size, start = lo | hi << 16, offset + 8 + ksize
            if nflags & _F_BIGDATA:
                overflow = struct.unpack_from("<Q", data, base + start)[0]
                value = data[overflow * PAGE + 16 : overflow * PAGE + 16 + size]
                end = start + 8
                self._overflow(table, key, value, overflow)
            else:
                value = data[base + start : base + start + size]
                end = start + size
            regions.append((offset, offset + 8, Spot("node", table, key, value, pgno)))
            regions.append((offset + 8, end, Spot("record", table, key, value, pgno)))
            if nflags & _F_SUBDATA:
                self._walk(key.decode(), struct.unpack_from("<Q", value, 40)[0])
        self.regions[pgno] = sorted(regions, key=lambda r: r[0])

    def _overflow(self, table: str, key: bytes, value: bytes, pgno: int) -> None:
        """A run of overflow pages: a header, the value from byte 16 on, then slack."""
        pages = struct.unpack_from("<I", self.data, pgno * PAGE + 12)[0]
        for index in range(pages):
            first, end = index * PAGE, (index + 1) * PAGE
            start, stop = max(16, first) - first, min(16 + len(value), end) - first
            record = Spot("record", table, key, value, pgno)
            regions = [(start, stop, record), (max(stop, start), PAGE, Spot("slack", table))]
            if index == 0:
                regions.insert(0, (0, 16, Spot("page", table, page=pgno)))
            self.regions[pgno + index] = regions

    def spot(self, offset: int) -> Spot:
        page, at = divmod(offset, PAGE)
        if page < 2:
            return Spot("meta", page=page)
        for start, end, spot in self.regions.get(page, []):
            if start <= at < end:
                if spot.kind == "slack":
                    return spot
                if spot.table == "(catalog)":
                    return Spot("catalog", spot.table, spot.key, spot.value, spot.page)
                if spot.table == "(free list)":
                    return Spot("freelist", spot.table, spot.key, spot.value, spot.page)
                return spot
        return Spot("free" if page not in self.regions else "slack", page=page)


def _names(spot: Spot) -> list[str]:
    """What verify must name for a damaged record: its position, stream or the log meta."""
    if spot.table == "events":
        return [f"position {codec.position_from_key(spot.key)}"]
    if spot.table == "stream_index":
        return [f"position {codec.from_u64(spot.value)}"]
    if spot.table == "subject_index":
        return [f"position {codec.from_u64(spot.key[-8:])}"]
    if spot.table == "streams":
        return [repr(spot.key.decode())]
    if spot.table == "meta":
        return ["the log meta"]
    if spot.table == "journal":
        return [f"journal entry {codec.from_u64(spot.key)}"]
    raise AssertionError(f"the store should have no records in table {spot.table}")


class FlipWorker:
    """The child that runs the checks; restarted when a damaged file kills it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def ask(self, request: dict[str, str]) -> dict[str, Any] | None:
        """The answer, or None if the child died serving the request."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("flipworker.py"))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return None
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def store_50k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50,000 events appended by the writer in-process: 500 streams, 997 subjects."""
    data = tmp_path_factory.mktemp("flips") / "data"
    with Store.open(data) as store:
        for batch in range(FLIP_EVENTS // 100):
            events = tuple(
                ProposedEvent(
                    b"", "Noted", f"subj-{(batch * 100 + i) % 997}", "application/json",
                    _flip_payload(batch * 100 + i), b"",
                )
                for i in range(100)
            )  # fmt: skip
            store.writer.append(AppendCommand(f"user-L{batch * 100}", events))
    return data


def _flip_payload(n: int) -> bytes:
    filler = "y" * (6000 if n % LARGE_EVERY == 0 else 20)
    return f'{{"n": {n}, "text": "{filler}"}}'.encode()


#: Flips checked side by side, each lane with its own copy and child (2 cores in CI).
LANES = 2


@pytest.mark.slow
# ~2 min on 2 cores, ~3 under heavy load (measured); the suite's 300 s guard is too close.
@pytest.mark.timeout(600)
def test_random_byte_flips_are_each_reported_where_they_are_or_change_no_record(
    store_50k: Path, tmp_path: Path
):
    """200 seeded flips: each damaged record named; a pass only when no record changed."""
    rng = random.Random(FLIP_SEED)
    print(f"byte-flip seed {FLIP_SEED}")
    pristine = (store_50k / "log" / "data.mdb").read_bytes()
    flips = [(rng.randrange(len(pristine)), 1 << rng.randrange(8)) for _ in range(FLIPS)]
    pages = PageMap(pristine)
    digests = flipworker.table_digests(store_50k / "log")
    lanes = []
    for lane in range(LANES):
        copy = tmp_path / f"data-{lane}"
        shutil.copytree(store_50k, copy)
        lanes.append((copy, list(enumerate(flips))[lane::LANES]))
    with ThreadPoolExecutor(LANES) as pool:
        results = list(pool.map(lambda lane: _flip_lane(*lane, pristine, pages, digests), lanes))
    kinds: Counter[str] = sum((kinds for kinds, _ in results), Counter())
    failures = sorted(failure for _, lane_failures in results for failure in lane_failures)
    print(f"flips by what they hit: {dict(kinds)}")
    for copy, _ in lanes:
        assert (copy / "log" / "data.mdb").read_bytes() == pristine, "verify wrote to the file"
    assert not failures, "\n".join(failures)
    assert kinds["record"] >= FLIPS // 2  # the flips really did land in records


def _flip_lane(
    copy: Path,
    flips: list[tuple[int, tuple[int, int]]],
    pristine: bytes,
    pages: PageMap,
    digests: dict[str, str],
) -> tuple[Counter[str], list[str]]:
    """Flip, verify and flip back, one flip at a time, in one copy of the store."""
    worker = FlipWorker()
    failures: list[str] = []
    kinds: Counter[str] = Counter()
    try:
        with (copy / "log" / "data.mdb").open("r+b") as f:
            for number, (offset, bit) in flips:
                spot = pages.spot(offset)
                kinds[spot.kind] += 1
                f.seek(offset)
                f.write(bytes([pristine[offset] ^ bit]))
                f.flush()
                problem = _judge(worker, copy, spot, digests)
                if problem:
                    failures.append(
                        f"flip {number:3} at byte {offset} (page {offset // PAGE}, "
                        f"{spot.kind} of {spot.table or '-'}): {problem}"
                    )
                f.seek(offset)
                f.write(pristine[offset : offset + 1])
                f.flush()
    finally:
        worker.close()
    return kinds, failures


def _judge(worker: FlipWorker, data: Path, spot: Spot, digests: dict[str, str]) -> str:
    """Why this flip's verify run is wrong, or "" if it is right."""
    answer = worker.ask({"verify": str(data)})
    if answer is None:
        return "verify --data died (LMDB assertion or signal)"
    rc, out, err = answer["rc"], answer["out"], answer["err"]
    if rc not in (0, 1) or "Traceback" in err:
        return f"verify --data exited {rc}: {out} {err}"
    if rc == 1:
        if spot.kind in ("free", "slack"):
            return f"reported damage where no record changed:\n{out}"
        if spot.kind == "record":
            wanted = _names(spot)
        elif spot.kind == "node" and spot.table not in ("(catalog)", "(free list)"):
            wanted = [*_names(spot), f"page {spot.page},"]
        elif spot.kind == "page":
            wanted = [f"page {spot.page},"]
        elif spot.kind == "meta":
            wanted = ["meta page", "the log meta"]
        else:
            wanted = [f"page {spot.page},", "table (", "free list"]
        if not any(name in out for name in wanted):
            return f"verify --data does not name {' or '.join(wanted)}:\n{out}"
        return ""
    if spot.kind in ("record", "node"):
        return f"verify --data passed with a damaged record:\n{out}"
    read_back = worker.ask({"dump": str(data / "log")})
    if read_back is None or read_back.get("tables") != digests:
        return f"verify --data passed, but LMDB reads other records now: {read_back}"
    return ""


# -- reads of a damaged key or index entry: DATA_LOSS at the true position -------------


def _flip_in_file(data: Path, needle: bytes, at: int, bit: int = 0x01) -> None:
    """Flip one bit at *at* within every copy of *needle* in the log file."""
    data_file = data / "log" / "data.mdb"
    content = bytearray(data_file.read_bytes())
    found = content.find(needle)
    assert found >= 0
    while found >= 0:
        content[found + at] ^= bit
        found = content.find(needle, found + 1)
    data_file.write_bytes(bytes(content))


def _victim_record(data: Path) -> bytes:
    log = LogStore(data / "log")
    try:
        [(_, value)] = log.read_all_page(VICTIM, backwards=False, limit=1)
    finally:
        log.close()
    return value


def _damage_victim_key(data: Path) -> None:
    """Position 17's key in the events table reads 81: the record sits where 17 belongs."""
    _flip_in_file(data, codec.position_key(VICTIM) + _victim_record(data), 7, 0x40)


VICTIM_VERSION = (VICTIM - 1) // len(STREAMS)
#: (byte of the entry's value, bit) to flip in the stream index entry of position 17.
INDEX_DAMAGE = {
    # The entry names a position that holds nothing (2**56 + 17): a TypeError before.
    "names no record": (0, 0x01),
    # The entry names position 19, another stream's event: served silently before.
    "names another record": (7, 0x02),
}


def _damage_victim_index_entry(data: Path, byte: int, bit: int) -> None:
    entry = codec.stream_version_key(VICTIM_STREAM, VICTIM_VERSION) + codec.position_key(VICTIM)
    _flip_in_file(data, entry, len(entry) - 8 + byte, bit)


def _read_until_error(call: Any) -> tuple[list[pb.RecordedEvent], grpc.RpcError | None]:
    """The events a server stream delivered, and the error it ended with."""
    events: list[pb.RecordedEvent] = []
    try:
        for response in call:
            if isinstance(response, pb.SubscribeResponse):
                events.extend(response.events.events)
            else:
                events.extend(response.events)
    except grpc.RpcError as exc:
        return events, exc
    return events, None


def _assert_data_loss_after(
    events: list[pb.RecordedEvent], error: grpc.RpcError | None, delivered: list[int]
) -> None:
    assert error is not None, "the read ended without an error"
    assert error.code() == grpc.StatusCode.DATA_LOSS, error.details()
    assert f"position {VICTIM}" in error.details()
    assert "lethedb verify" in error.details()
    assert "backup" in error.details()
    assert "Error" not in error.details(), error.details()  # no Python exception names
    assert [e.position for e in events] == delivered


def test_a_damaged_events_key_is_data_loss_at_its_true_position_after_every_earlier_event(
    data: Path,
):
    """``read --from 66`` reported an authentication failure at position 4278190146."""
    _damage_victim_key(data)

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            from_start = stub.ReadAll(pb.ReadAllRequest(), timeout=10)
            _assert_data_loss_after(*_read_until_error(from_start), list(range(1, VICTIM)))
            just_before = stub.ReadAll(pb.ReadAllRequest(from_position=VICTIM - 1), timeout=10)
            _assert_data_loss_after(*_read_until_error(just_before), [VICTIM - 1])
            at = stub.ReadAll(pb.ReadAllRequest(from_position=VICTIM), timeout=10)
            _assert_data_loss_after(*_read_until_error(at), [])
            backwards = stub.ReadAll(
                pb.ReadAllRequest(from_position=VICTIM + 2, backwards=True), timeout=10
            )
            _assert_data_loss_after(*_read_until_error(backwards), [VICTIM + 2, VICTIM + 1])
            subscription = stub.Subscribe(pb.SubscribeRequest(from_start=True), timeout=20)
            _assert_data_loss_after(*_read_until_error(subscription), list(range(1, VICTIM)))
            assert _verify_online(channel).first_bad_position == VICTIM
            cli = _cli_read(server.address, "--from", str(VICTIM - 1))
    finally:
        assert server.stop() == 0
    _assert_one_clear_line(cli, [VICTIM - 1])
    _assert_verify_names(data, VICTIM)


@pytest.mark.parametrize("damage", INDEX_DAMAGE.values(), ids=INDEX_DAMAGE.keys())
def test_a_damaged_stream_index_entry_is_data_loss_at_the_events_true_position(
    data: Path, damage: tuple[int, int]
):
    """``read user-L20000`` said "memoryview: a bytes-like object is required, not 'NoneType'"."""
    _damage_victim_index_entry(data, *damage)

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            read = stub.ReadStream(pb.ReadStreamRequest(stream_id=VICTIM_STREAM), timeout=10)
            events, error = _read_until_error(read)
            assert [e.stream_version for e in events] == list(range(VICTIM_VERSION))
            _assert_data_loss_after(events, error, [e.position for e in events])
            assert f"version {VICTIM_VERSION}" in error.details()  # type: ignore[union-attr]
            # The log itself is intact: ReadAll serves every event.
            everything = _events(stub.ReadAll(pb.ReadAllRequest(max_count=EVENTS), timeout=10))
            assert [e.position for e in everything] == list(range(1, EVENTS + 1))
            cli = _cli_read(server.address, VICTIM_STREAM)
    finally:
        assert server.stop() == 0
    _assert_one_clear_line(cli, [e.position for e in events])
    _assert_verify_names(data, VICTIM)


def test_a_damaged_record_read_through_its_stream_delivers_the_versions_before_it(data: Path):
    _flip_byte_of_record(data, VICTIM, "ciphertext")

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            read = stub.ReadStream(pb.ReadStreamRequest(stream_id=VICTIM_STREAM), timeout=10)
            events, error = _read_until_error(read)
            assert [e.stream_version for e in events] == list(range(VICTIM_VERSION))
            _assert_data_loss_after(events, error, [e.position for e in events])
    finally:
        assert server.stop() == 0


def _cli_read(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", "read", "--server", address, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _assert_one_clear_line(cli: subprocess.CompletedProcess[str], delivered: list[int]) -> None:
    """The CLI prints what it read, then one line naming the position and what to do."""
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert [json.loads(line)["position"] for line in cli.stdout.splitlines()] == delivered
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1, cli.stderr
    assert f"position {VICTIM}" in lines[0]
    assert "lethedb verify" in lines[0]
    assert "Traceback" not in cli.stderr
    assert "Error:" not in cli.stderr


def _assert_verify_names(data: Path, position: int) -> None:
    cli = _verify_cli(data)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert cli.stdout.startswith(f"FAILED at position {position}: "), cli.stdout
    assert "Traceback" not in cli.stderr


def test_verify_reports_every_damaged_record_not_only_the_first(data: Path):
    """Damage in two records: both named, in order, and verify still exits 1."""
    for position in (5, VICTIM):
        _flip_byte_of_record(data, position, "ciphertext")
    _flip_byte_of_record(data, 25, "chain hash")

    cli = _verify_cli(data)

    assert cli.returncode == 1, cli.stdout + cli.stderr
    lines = cli.stdout.splitlines()
    assert lines[0].startswith("FAILED at position 5: "), cli.stdout
    assert [line.split(":")[0].strip() for line in lines if line.startswith("  position")] == [
        "position 5",
        f"position {VICTIM}",
        "position 25",
    ]
    assert "restore the data directory from a backup" in cli.stdout


# -- damage to LMDB's own structure: named by page and table, never a crash ------------


def _first_spot(data_file: Path, wanted: Callable[[int, Spot], bool]) -> int:
    """The offset of the first byte of the file that *wanted* accepts."""
    content = data_file.read_bytes()
    pages = PageMap(content)
    for offset in range(2 * PAGE, len(content)):
        if wanted(offset, pages.spot(offset)):
            return offset
    raise AssertionError("no such byte in the file")


def _branch_child_pointer(offset: int, spot: Spot) -> bool:
    return spot.kind == "node" and spot.table == "events" and not spot.value and offset % 8 == 0


def _overflow_header(offset: int, spot: Spot) -> bool:
    return spot.kind == "page" and spot.table == "events" and offset % PAGE == 12  # page count


def _events_table_record(offset: int, spot: Spot) -> bool:
    return spot.kind == "catalog" and spot.key == b"events"


#: How to find the byte to damage: the first byte a test accepts, then a shift
#: from it, and the bit to flip there.
STRUCTURE_DAMAGE = {
    "branch page's child pointer": (_branch_child_pointer, 0, 0x04),
    "overflow page's page count": (_overflow_header, 0, 0x02),
    # The catalog's leaf node of the events table: an 8-byte node header, the
    # name, then the table's 48-byte record, whose last 8 bytes are its root.
    "root page in the catalog of tables": (_events_table_record, 8 + 6 + 40, 0x01),
}


@pytest.mark.parametrize(
    ("where", "shift", "bit"), STRUCTURE_DAMAGE.values(), ids=STRUCTURE_DAMAGE.keys()
)
def test_damage_to_lmdb_structure_is_named_by_page_and_table_without_a_crash(
    data: Path, where: Callable[[int, Spot], bool], shift: int, bit: int
):
    data_file = data / "log" / "data.mdb"
    offset = _first_spot(data_file, where) + shift
    with data_file.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))

    cli = _verify_cli(data)

    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "Traceback" not in cli.stderr
    assert f"{data_file} page " in cli.stdout, cli.stdout
    assert "Authentication tags were not checked" in cli.stdout


def test_a_damaged_legal_hold_record_is_data_loss_naming_the_subject(data: Path):
    """Before: UNKNOWN with msgspec's "Expected `array` of length 3" text."""
    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin_pb2_grpc.AdminStub(channel).SetLegalHold(
                admin_pb2.SetLegalHoldRequest(subject_id="subj-2", reason="ZZZZ-hold"), timeout=10
            )
    finally:
        assert server.stop() == 0
    # The record is a 3-element msgpack array: make its header say 2.
    _flip_in_file(data, b"\x93\xa9ZZZZ-hold", 0, 0x01)

    server = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                stub.GetSubject(pb.GetSubjectRequest(subject_id="subj-2"), timeout=10)
            receipt = stub.GetSubject(pb.GetSubjectRequest(subject_id="subj-3"), timeout=10)
    finally:
        assert server.stop() == 0
    assert failed.value.code() == grpc.StatusCode.DATA_LOSS, failed.value.details()
    assert "subject 'subj-2'" in failed.value.details()
    assert "lethedb verify" in failed.value.details()
    assert receipt.subject_id == "subj-3"
