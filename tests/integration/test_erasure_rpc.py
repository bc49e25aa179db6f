"""Erasure over gRPC against a real server: forget, receipts, holds, export, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import pytest

from lethedb.v1 import admin_pb2, admin_pb2_grpc, eventstore_pb2, eventstore_pb2_grpc


@pytest.fixture
def stubs(server):
    with grpc.insecure_channel(server.address) as channel:
        yield eventstore_pb2_grpc.EventStoreStub(channel), admin_pb2_grpc.AdminStub(channel)


def _event(subject: str, text: str) -> eventstore_pb2.ProposedEvent:
    return eventstore_pb2.ProposedEvent(
        event_type="Noted", subject_id=subject, content_type="application/json",
        data=json.dumps({"text": text}).encode(),
    )  # fmt: skip


def _cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", *args, "--server", server.address],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_forget_under_concurrent_appends_leaves_nothing_readable(stubs, stream_id):
    """Every append for the subject lands before the tombstone (and is redacted) or is refused."""
    store, _ = stubs
    subject = f"subject-{stream_id}"
    acknowledged: list[int] = []
    refused: list[grpc.StatusCode] = []
    stop = threading.Event()

    def appender(n: int) -> None:
        i = 0
        while not stop.is_set():
            request = eventstore_pb2.AppendRequest(
                stream_id=f"{stream_id}-{n}", events=[_event(subject, f"secret-{n}-{i}")]
            )
            try:
                acknowledged.append(store.Append(request, timeout=10).first_position)
            except grpc.RpcError as exc:
                refused.append(exc.code())
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return
            i += 1

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    receipt = store.ForgetSubject(eventstore_pb2.ForgetSubjectRequest(subject_id=subject))
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(30)

    assert acknowledged, "no append landed before the forget"
    assert max(acknowledged) < receipt.tombstone_position
    assert set(refused) <= {grpc.StatusCode.FAILED_PRECONDITION}
    events = [
        e
        for r in store.ReadAll(eventstore_pb2.ReadAllRequest(), timeout=10)
        for e in r.events
        if e.subject_id == subject
    ]
    assert sorted(e.position for e in events) == sorted(acknowledged)
    assert all(e.redacted and not e.data for e in events)


def test_receipt_reports_counts_states_and_legal_hold(stubs, stream_id):
    store, admin = stubs
    subject = f"subject-{stream_id}"
    store.Append(
        eventstore_pb2.AppendRequest(stream_id=stream_id, events=[_event(subject, "a")] * 2)
    )
    active = store.GetSubject(eventstore_pb2.GetSubjectRequest(subject_id=subject))
    assert active.state == eventstore_pb2.SUBJECT_ACTIVE
    assert active.event_count == 2

    held = admin.SetLegalHold(admin_pb2.SetLegalHoldRequest(subject_id=subject, reason="audit-7"))
    assert held.legal_hold.reason == "audit-7"
    with pytest.raises(grpc.RpcError) as info:
        store.ForgetSubject(eventstore_pb2.ForgetSubjectRequest(subject_id=subject))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "legal hold" in info.value.details()
    assert "audit-7" in info.value.details()

    admin.ReleaseLegalHold(admin_pb2.ReleaseLegalHoldRequest(subject_id=subject))
    forgotten = store.ForgetSubject(
        eventstore_pb2.ForgetSubjectRequest(subject_id=subject, reason="gdpr-art17")
    )
    assert forgotten.state == eventstore_pb2.SUBJECT_FORGOTTEN_PENDING_SHRED
    assert forgotten.reason == "gdpr-art17"

    shred = admin.Shred(admin_pb2.ShredRequest())
    shredded = store.GetSubject(eventstore_pb2.GetSubjectRequest(subject_id=subject))
    assert shredded.state == eventstore_pb2.SUBJECT_SHREDDED
    assert shredded.shred_epoch == shred.epoch
    assert shredded.shredded_at == shred.completed_at


def test_forgetting_a_reserved_or_empty_subject_is_invalid(stubs):
    store, _ = stubs
    for subject in ("", "$store"):
        with pytest.raises(grpc.RpcError) as info:
            store.ForgetSubject(eventstore_pb2.ForgetSubjectRequest(subject_id=subject))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_export_writes_the_subjects_events_as_one_json_document(
    server, stubs, stream_id, tmp_path
):
    store, _ = stubs
    subject, other = f"subject-{stream_id}", f"other-{stream_id}"
    store.Append(eventstore_pb2.AppendRequest(stream_id=stream_id, events=[_event(subject, "one")]))
    store.Append(
        eventstore_pb2.AppendRequest(stream_id=f"{stream_id}-x", events=[_event(other, "no")])
    )
    store.Append(
        eventstore_pb2.AppendRequest(stream_id=f"{stream_id}-y", events=[_event(subject, "two")])
    )
    out = tmp_path / "export.json"

    result = _cli(server, "export", subject, "--format", "json", "-o", str(out))

    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["format"] == "lethedb.subject-export.v1"
    assert document["subject_id"] == subject
    assert document["event_count"] == 2
    assert [e["data"] for e in document["events"]] == [{"text": "one"}, {"text": "two"}]
    assert {e["stream_id"] for e in document["events"]} == {stream_id, f"{stream_id}-y"}


def test_cli_forget_subject_shred_and_audit(server, stubs, stream_id):
    store, _ = stubs
    subject = f"subject-{stream_id}"
    canary = json.dumps({"text": "x"}).encode()
    store.Append(
        eventstore_pb2.AppendRequest(
            stream_id=stream_id, events=[_event(subject, "x")], idempotency_key=f"k-{stream_id}"
        )
    )

    forgotten = _cli(server, "forget", subject, "--reason", "gdpr-art17")
    assert forgotten.returncode == 0, forgotten.stderr
    assert json.loads(forgotten.stdout)["state"] == "forgotten_pending_shred"

    shred = _cli(server, "shred")
    assert shred.returncode == 0, shred.stderr
    assert "shred epoch" in shred.stdout

    receipt = json.loads(_cli(server, "subject", subject).stdout)
    assert receipt["state"] == "shredded"
    assert receipt["event_count"] == 1

    audit = subprocess.run(
        [sys.executable, "-m", "lethedb_server", "audit-erasure",
         "--data", str(server.data_dir), "--canary", canary.decode()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert f"subject {subject}" in audit.stdout
    assert "idempotency fingerprints of forgotten subjects' requests" in audit.stdout
