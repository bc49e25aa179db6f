"""Kill the server at every step of forget and of a shred epoch; restart; check.

Each test arms one fault point (``LETHEDB_FAULT_POINT``) in a real server
process, drives it into that point over gRPC, and sees it die there as if
SIGKILLed. A fresh server on the same directory must then finish the erasure
(roll forward), keep every other subject readable, and pass the audit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import admin_pb2, admin_pb2_grpc, eventstore_pb2, eventstore_pb2_grpc
from lethedb_server.faults import ENV_VAR, EXIT_CODE
from tests.integration.serverproc import ServerProcess

FORGOTTEN, KEPT = "subj-gone", "subj-kept"
SHRED_POINTS = [
    "shred.started",
    "shred.new_master_key",
    "shred.compacted_written",
    "shred.swapped_before_journal",
    "shred.swapped",
    "shred.old_keys_overwritten",
    "shred.old_master_destroyed",
    "shred.recorded",
]
FORGET_POINTS = ["forget.tombstone_committed", "forget.keys_deleted"]


def _stubs(
    address: str,
) -> tuple[grpc.Channel, eventstore_pb2_grpc.EventStoreStub, admin_pb2_grpc.AdminStub]:
    channel = grpc.insecure_channel(address)
    return channel, eventstore_pb2_grpc.EventStoreStub(channel), admin_pb2_grpc.AdminStub(channel)


def _append(
    store: eventstore_pb2_grpc.EventStoreStub, stream: str, subject: str, text: str
) -> None:
    event = eventstore_pb2.ProposedEvent(
        event_type="Noted", subject_id=subject, content_type="text/plain", data=text.encode()
    )
    store.Append(eventstore_pb2.AppendRequest(stream_id=stream, events=[event]), timeout=10)


def _read_all(store: eventstore_pb2_grpc.EventStoreStub) -> list[eventstore_pb2.RecordedEvent]:
    return [e for r in store.ReadAll(eventstore_pb2.ReadAllRequest(), timeout=10) for e in r.events]


def _crashing_server(data: Path, point: str) -> ServerProcess:
    return ServerProcess(data, env={ENV_VAR: point}).start()


def _expect_death(proc: ServerProcess, call) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
    assert proc.proc is not None
    assert proc.proc.wait(30) == EXIT_CODE, proc.logs()
    proc.proc = None


def _audit(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", "audit-erasure", "--data", str(data),
         "--canary", "CANARY-GONE"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _check_recovered(data: Path) -> None:
    """After a restart: erasure complete, the kept subject intact, the audit green."""
    proc = ServerProcess(data).start()
    try:
        channel, store, _ = _stubs(proc.address)
        with channel:
            receipt = store.GetSubject(eventstore_pb2.GetSubjectRequest(subject_id=FORGOTTEN))
            if receipt.state != eventstore_pb2.SUBJECT_SHREDDED:
                # A forget that crashed before its epoch: the operator's next shred finishes it.
                admin_pb2_grpc.AdminStub(channel).Shred(admin_pb2.ShredRequest(), timeout=30)
                receipt = store.GetSubject(eventstore_pb2.GetSubjectRequest(subject_id=FORGOTTEN))
            assert receipt.state == eventstore_pb2.SUBJECT_SHREDDED
            again = store.ForgetSubject(eventstore_pb2.ForgetSubjectRequest(subject_id=FORGOTTEN))
            assert again.tombstone_position == receipt.tombstone_position
            events = _read_all(store)
            by_subject = {e.subject_id: e for e in events if e.subject_id}
            assert by_subject[FORGOTTEN].redacted
            assert by_subject[KEPT].data == b"still here"
    finally:
        proc.stop()
    audit = _audit(data)
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.slow
@pytest.mark.parametrize("point", SHRED_POINTS)
def test_crash_at_each_step_of_a_shred_epoch_rolls_forward(tmp_path, point):
    data = tmp_path / "data"
    proc = _crashing_server(data, point)
    channel, store, admin = _stubs(proc.address)
    with channel:
        _append(store, "user-1", FORGOTTEN, "CANARY-GONE")
        _append(store, "user-2", KEPT, "still here")
        store.ForgetSubject(eventstore_pb2.ForgetSubjectRequest(subject_id=FORGOTTEN, reason="t"))
        _expect_death(proc, lambda: admin.Shred(admin_pb2.ShredRequest(), timeout=30))

    _check_recovered(data)


@pytest.mark.slow
@pytest.mark.parametrize("point", FORGET_POINTS)
def test_crash_at_each_step_of_forget_completes_the_erasure(tmp_path, point):
    data = tmp_path / "data"
    proc = _crashing_server(data, point)
    channel, store, _ = _stubs(proc.address)
    with channel:
        _append(store, "user-1", FORGOTTEN, "CANARY-GONE")
        _append(store, "user-2", KEPT, "still here")
        _expect_death(
            proc,
            lambda: store.ForgetSubject(
                eventstore_pb2.ForgetSubjectRequest(subject_id=FORGOTTEN, reason="t"), timeout=30
            ),
        )

    _check_recovered(data)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["rotate.new_master_key", "shred.new_master_key"])
def test_crash_between_a_new_master_key_and_its_check_value_keeps_the_store_usable(tmp_path, point):
    """The keyring gains a version before the key store records its check value:
    a crash in between leaves the keyring one version ahead, which start-up
    accepts (nothing can be wrapped under an unrecorded version) and records."""
    data = tmp_path / "data"
    proc = _crashing_server(data, point)
    channel, store, admin = _stubs(proc.address)
    with channel:
        _append(store, "user-2", KEPT, "still here")
        if point.startswith("rotate"):
            call = lambda: admin.RotateMasterKey(  # noqa: E731
                admin_pb2.RotateMasterKeyRequest(), timeout=30
            )
        else:
            call = lambda: admin.Shred(admin_pb2.ShredRequest(), timeout=30)  # noqa: E731
        _expect_death(proc, call)

    for starts in (1, 2):  # the second start checks what the first one recorded
        proc = ServerProcess(data).start()
        try:
            channel, store, admin = _stubs(proc.address)
            with channel:
                expected = [b"still here"] + [b"after the crash"] * (starts - 1)
                assert [e.data for e in _read_all(store)] == expected
                _append(store, "user-3", "subj-new", "after the crash")
                admin.RotateMasterKey(admin_pb2.RotateMasterKeyRequest(), timeout=30)
        finally:
            assert proc.stop() == 0, proc.logs()
