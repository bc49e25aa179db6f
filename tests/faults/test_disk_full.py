"""A full disk: appends are refused with RESOURCE_EXHAUSTED, nothing else breaks.

The data directory is put on a disk that fills up after a few MiB, in one of
two ways (each test runs with both where possible):

* ``tmpfs``: a 16 MiB tmpfs mounted by the test (needs root and a working
  ``mount``), holding a filler file; deleting the filler frees space. The
  file system really is full: writes fail with ENOSPC, or come up short.
* ``rlimit``: RLIMIT_FSIZE set on the server process with ``prlimit``, so
  its files cannot grow past a few MiB more than they hold; raising the
  limit frees space. Python ignores SIGXFSZ, so writes fail with EFBIG (or
  come up short) instead of killing the process.

Either way, LMDB meets the full disk at commit; the batch must be refused as
a whole, the server must stay up and keep serving reads, and it must write
again once space is freed, without having lost or half-written anything. A
subscription open throughout sees every acknowledged event, in order, and
nothing else.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import admin_pb2, admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb
from tests.faults.support import read_all, verify_offline
from tests.integration.serverproc import ServerProcess

MiB = 1 << 20
TMPFS_SIZE = "16m"
FILLER_BYTES = 4 * MiB
#: How far the server's files may grow in the rlimit mode.
RLIMIT_HEADROOM = 8 * MiB
PAYLOAD = 64 << 10
BIG_PAYLOAD = 900 << 10
#: More appends than the small disk can hold, so the loop always ends full.
MAX_APPENDS = 16 * MiB // PAYLOAD + 64
STREAMS = ("fill-a", "fill-b", "fill-c")


@dataclass
class SmallDisk:
    """A data directory on a disk that fills up, and the way to free space on it."""

    mode: str
    data: Path
    server: ServerProcess
    filler: Path | None = None

    def start(self, headroom: int = RLIMIT_HEADROOM) -> ServerProcess:
        """Start the server; in the rlimit mode its files may grow by *headroom* bytes."""
        self.server.start()
        if self.mode == "rlimit":
            assert self.server.proc is not None
            limit = _file_size(self.data / "log" / "data.mdb") + headroom
            _, hard = resource.prlimit(self.server.proc.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(self.server.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
        return self.server

    def free_space(self) -> None:
        if self.mode == "tmpfs":
            assert self.filler is not None
            self.filler.unlink()
        else:
            assert self.server.proc is not None
            _, hard = resource.prlimit(self.server.proc.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(self.server.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _mount_tmpfs(mountpoint: Path) -> str:
    """Mount a small tmpfs; return why it could not be done, or ''."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    mountpoint.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount failed: {exc}"
    return "" if done.returncode == 0 else f"mount failed: {done.stderr.strip()}"


def _unmount(mountpoint: Path) -> None:
    done = subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
    if done.returncode != 0:  # something still holds it open: detach it anyway
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    mode: str = request.param
    if mode == "tmpfs":
        mountpoint = tmp_path / "small"
        why_not = _mount_tmpfs(mountpoint)
        if why_not:
            pytest.skip(why_not)
        data = mountpoint / "data"
        filler = mountpoint / "filler"
        filler.write_bytes(os.urandom(FILLER_BYTES))
        disk = SmallDisk(mode, data, ServerProcess(data), filler)
    else:
        if not hasattr(resource, "prlimit"):
            pytest.skip("resource.prlimit is Linux-only")
        data = tmp_path / "data"
        disk = SmallDisk(mode, data, ServerProcess(data))
    # The server's log file lives beside the data directory: keep it off the
    # small disk, so that it can always be written and read.
    disk.server.log_path = tmp_path / "server.log"
    try:
        yield disk
    finally:
        disk.server.kill()
        if mode == "tmpfs":
            _unmount(mountpoint)


def _append_request(key: str, stream: str, size: int = PAYLOAD) -> pb.AppendRequest:
    return pb.AppendRequest(
        stream_id=stream,
        idempotency_key=key,
        events=[
            pb.ProposedEvent(
                event_type="Filled",
                subject_id=f"subj-{key}",
                content_type="application/octet-stream",
                data=key.encode() + os.urandom(size),
            )
        ],
    )


class Ledger:
    """Every acknowledged append, to compare with what the log holds."""

    def __init__(self, stub: eventstore_pb2_grpc.EventStoreStub) -> None:
        self.stub = stub
        self.acked: dict[int, bytes] = {}  # position -> data
        self.refusals: list[str] = []

    def append(self, request: pb.AppendRequest) -> bool:
        """Send *request*; True when acknowledged, False when refused as a full disk."""
        try:
            response = self.stub.Append(request, timeout=30)
        except grpc.RpcError as exc:
            error = exc
        else:
            assert not response.deduplicated
            self.acked[response.first_position] = request.events[0].data
            return True
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
        assert "full" in error.details(), error.details()
        self.refusals.append(error.details())
        return False

    def check_log(self, channel: grpc.Channel) -> None:
        """The log holds exactly the acknowledged appends, and every stream is whole."""
        events = read_all(channel)
        assert {e.position: e.data for e in events} == self.acked
        assert [e.position for e in events] == list(range(1, len(events) + 1))
        for stream in STREAMS:
            versions = [
                e.stream_version
                for r in self.stub.ReadStream(pb.ReadStreamRequest(stream_id=stream), timeout=30)
                for e in r.events
            ]
            assert versions == list(range(len(versions)))


class Subscriber:
    """A live subscription from the start, read by a thread, across the full disk."""

    def __init__(self, stub: eventstore_pb2_grpc.EventStoreStub) -> None:
        self.events: list[pb.RecordedEvent] = []
        self.changed = threading.Condition()
        self.error: grpc.RpcError | None = None
        self.call = stub.Subscribe(pb.SubscribeRequest(from_start=True))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                if message.WhichOneof("message") == "events":
                    with self.changed:
                        self.events.extend(message.events.events)
                        self.changed.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def wait_for(self, position: int) -> list[pb.RecordedEvent]:
        """Every event delivered once the subscription has reached *position*."""
        with self.changed:
            reached = self.changed.wait_for(
                lambda: bool(self.events) and self.events[-1].position >= position, timeout=30
            )
        assert self.error is None, self.error
        assert reached, f"the subscription stopped at {self.events[-1:]} before {position}"
        return list(self.events)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def _fill(ledger: Ledger) -> pb.AppendRequest:
    """Append until the disk is full; return the first refused request."""
    for i in range(MAX_APPENDS):
        request = _append_request(f"fill-{i}", STREAMS[i % len(STREAMS)])
        if not ledger.append(request):
            return request
    pytest.fail(f"{MAX_APPENDS} appends of {PAYLOAD} bytes fitted on the small disk")


def _hammer_while_full(ledger: Ledger) -> None:
    """8 concurrent writers against the full disk: refused (or fitted), never an error."""

    def writer(index: int) -> None:
        for n in range(4):
            ledger.append(_append_request(f"full-{index}-{n}", STREAMS[index % len(STREAMS)]))

    with ThreadPoolExecutor(8) as pool:
        for done in [pool.submit(writer, i) for i in range(8)]:
            done.result(timeout=60)  # re-raises a writer's failed assertion here


@pytest.mark.slow
def test_full_disk_refuses_appends_keeps_reads_and_writes_again_once_space_is_freed(
    small_disk: SmallDisk,
):
    server = small_disk.start()
    with grpc.insecure_channel(server.address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        ledger = Ledger(stub)
        subscriber = Subscriber(stub)
        refused = _fill(ledger)
        assert len(ledger.acked) >= 8, "the small disk filled up before it held anything"
        refusals_before = len(ledger.refusals)
        _hammer_while_full(ledger)
        assert len(ledger.refusals) > refusals_before

        assert server.proc is not None
        assert server.proc.poll() is None, server.logs()
        ledger.check_log(channel)
        stats = admin_pb2_grpc.AdminStub(channel).Stats(admin_pb2.StatsRequest(), timeout=30)
        assert stats.last_position == max(ledger.acked)
        receipt = stub.GetSubject(pb.GetSubjectRequest(subject_id="subj-fill-0"), timeout=30)
        assert receipt.event_count == 1
        delivered = subscriber.wait_for(max(ledger.acked))
        assert {e.position: e.data for e in delivered} == ledger.acked

        small_disk.free_space()
        retried = stub.Append(refused, timeout=30)
        assert not retried.deduplicated  # the refused append was never written
        ledger.acked[retried.first_position] = refused.events[0].data
        assert ledger.append(_append_request("after-free", STREAMS[0]))
        again = stub.Append(refused, timeout=30)
        assert again.deduplicated
        assert again.first_position == retried.first_position
        ledger.check_log(channel)
        # The same subscription, never interrupted, continues past the full disk.
        delivered = subscriber.wait_for(max(ledger.acked))
        assert [e.position for e in delivered] == sorted(ledger.acked)
        assert {e.position: e.data for e in delivered} == ledger.acked
        subscriber.close()

    assert server.stop() == 0
    verifier = verify_offline(small_disk.data)
    assert verifier.ok, (verifier.first_bad_position, verifier.problem)
    assert verifier.checked == len(ledger.acked)

    server.start()
    with grpc.insecure_channel(server.address) as channel:
        ledger.stub = eventstore_pb2_grpc.EventStoreStub(channel)
        ledger.check_log(channel)
    assert server.stop() == 0


@pytest.mark.slow
def test_a_server_killed_on_a_full_disk_restarts_with_everything_acknowledged(
    small_disk: SmallDisk,
):
    server = small_disk.start()
    with grpc.insecure_channel(server.address) as channel:
        ledger = Ledger(eventstore_pb2_grpc.EventStoreStub(channel))
        _fill(ledger)
        _hammer_while_full(ledger)
    server.kill()

    # Still full (tmpfs) or limited again (rlimit): the server must start and
    # serve every acknowledged event.
    server = small_disk.start(headroom=0)
    with grpc.insecure_channel(server.address) as channel:
        ledger.stub = eventstore_pb2_grpc.EventStoreStub(channel)
        ledger.check_log(channel)
        # Larger than any batch before it, so it cannot fit in file space that
        # an earlier, failed commit already extended the data file by.
        assert not ledger.append(_append_request("still-full", STREAMS[0], size=BIG_PAYLOAD))
        small_disk.free_space()
        assert ledger.append(_append_request("freed", STREAMS[0]))
        ledger.check_log(channel)
    assert server.stop() == 0
    assert verify_offline(small_disk.data).ok
