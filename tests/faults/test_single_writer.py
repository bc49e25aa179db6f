"""One data directory, one server: a second ``lethedb serve`` is refused, the first serves on.

Two processes writing one LMDB environment would each keep their own head
position and chain hash in memory and interleave positions. The server takes
an exclusive lock on ``<data>/lethedb.lock`` before it touches LMDB, so a
second one must exit at once, non-zero, with a message that says who holds
the directory, and without disturbing the first. (A process *forked* from a
running server is refused by the writer itself: see
tests/unit/server/test_writer_guards.py.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from tests.faults.support import read_all, verify_offline
from tests.integration.serverproc import ServerProcess

REFUSAL_WITHIN_S = 20.0


def _second_serve(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", "serve",
         "--data", str(data), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _append(stub: eventstore_pb2_grpc.EventStoreStub, text: str) -> int:
    event = pb.ProposedEvent(event_type="Written", content_type="text/plain", data=text.encode())
    request = pb.AppendRequest(stream_id="single", events=[event])
    return stub.Append(request, timeout=10).first_position


@pytest.mark.slow
def test_second_server_on_the_same_data_directory_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
):
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        assert first.proc is not None
        with grpc.insecure_channel(first.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            assert _append(stub, "before") == 1

            for _ in range(2):  # a second attempt meets the same lock, not a stale state
                started = time.monotonic()
                second = _second_serve(data)
                output = second.stdout + second.stderr
                assert second.returncode == 2, output
                assert time.monotonic() - started < REFUSAL_WITHIN_S
                assert "is in use by another LetheDB process" in output
                assert f"(pid {first.proc.pid})" in output
                assert "Traceback" not in output

            assert first.proc.poll() is None
            assert _append(stub, "after") == 2
            assert [e.data for e in read_all(channel)] == [b"before", b"after"]
    finally:
        assert first.stop() == 0

    # The lock goes with the process: the directory opens again, intact.
    assert verify_offline(data).ok
    again = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(again.address) as channel:
            assert [e.data for e in read_all(channel)] == [b"before", b"after"]
    finally:
        assert again.stop() == 0


@pytest.mark.slow
def test_lock_of_a_killed_server_does_not_keep_the_directory_locked(tmp_path: Path):
    """flock dies with its process: SIGKILL leaves no stale lock to clean up by hand."""
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    with grpc.insecure_channel(first.address) as channel:
        _append(eventstore_pb2_grpc.EventStoreStub(channel), "acknowledged")
    first.kill()

    second = ServerProcess(data).start()
    try:
        with grpc.insecure_channel(second.address) as channel:
            assert [e.data for e in read_all(channel)] == [b"acknowledged"]
    finally:
        assert second.stop() == 0
