"""Erased data must not be recoverable from idempotency fingerprints.

An append with an idempotency key leaves a fingerprint of the request in the
log, so that a retry can be told from a key reused for another request. If
that fingerprint is computed from the plaintext without a key that erasure
destroys, anyone with a copy of the log can confirm guesses at a forgotten
subject's data: a four-digit PIN falls to 10,000 hashes. And a writer can ask
the server the same question by retrying the key after the forget.

These tests play the attacker against a real server: offline with every file
the data directory and a log backup hold (the master keyring included), and
online with a writer's retries.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgspec
import pytest

from lethedb.v1 import admin_pb2, admin_pb2_grpc, eventstore_pb2, eventstore_pb2_grpc
from lethedb_server.crypto.aead import InvalidTag, fingerprint_key, keyed_fingerprint, wrap_aad
from lethedb_server.crypto.keyring import FileKeyring, MasterKeyUnavailable, WrappedKey
from tests.integration.serverproc import ServerProcess

PIN = "4711"
EVENT_TYPE = "PinSet"
CONTENT_TYPE = "application/json"
#: A wrapped DEK as msgpack: bin8 of the 12-byte nonce, then bin8 of 32-byte key + tag.
_WRAPPED = re.compile(rb"\xc4\x0c(.{12})\xc4\x30(.{48})", re.DOTALL)
#: Any 32-byte binary value as msgpack stores it (bin8, length 32).
_BIN32 = re.compile(rb"\xc4\x20(.{32})", re.DOTALL)


@pytest.fixture
def stubs(fresh_server: ServerProcess) -> Iterator[tuple[Stubs, ServerProcess]]:
    with grpc.insecure_channel(fresh_server.address) as channel:
        yield Stubs(channel), fresh_server


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.store = eventstore_pb2_grpc.EventStoreStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)


def _pin_data(pin: str) -> bytes:
    return json.dumps({"pin": pin}, separators=(",", ":")).encode()


def _event(subject: str, pin: str) -> eventstore_pb2.ProposedEvent:
    return eventstore_pb2.ProposedEvent(
        event_type=EVENT_TYPE, subject_id=subject, content_type=CONTENT_TYPE, data=_pin_data(pin)
    )


def _request_hash(stream_id: str, subject: str, pin: str) -> bytes:
    """The request as the server fingerprinted it, rebuilt from clear fields and a guess.

    Everything but the PIN is in the log in clear: stream id, event type,
    subject id, content type; the client sent no event id and expected ANY.
    """
    encoded = msgspec.msgpack.encode(
        (stream_id, 0, 0, [(b"", EVENT_TYPE, subject, CONTENT_TYPE, _pin_data(pin), b"")])
    )
    return hashlib.blake2b(encoded, digest_size=32).digest()


def _fingerprint_keys(data_dir: Path) -> list[bytes]:
    """Every fingerprint key an attacker holding all of *data_dir* can derive.

    Every wrapped-key window of the key store file is tried under every
    master key version the keyring still holds, as version 1 of every subject
    the log names (subject ids are clear fields).
    """
    keyring = FileKeyring(data_dir / "master.keyring")
    raw = (data_dir / "keys" / "data.mdb").read_bytes()
    log = (data_dir / "log" / "data.mdb").read_bytes()
    subjects = {m.decode() for m in re.findall(rb"subject-[0-9a-f]{12}", log)} | {"$store"}
    found = []
    for match in _WRAPPED.finditer(raw):
        for master in keyring.versions():
            wrapped = WrappedKey(master, match.group(1), match.group(2))
            for subject in subjects:
                try:
                    dek = keyring.unwrap(wrapped, wrap_aad(subject, 1, master))
                except (InvalidTag, MasterKeyUnavailable):
                    continue
                found.append(fingerprint_key(dek))
    return found


def _confirmed_pins(files: list[Path], stream_id: str, subject: str, keys: list[bytes]) -> set[str]:
    """The PINs whose fingerprint appears in *files*: unkeyed, or under any of *keys*."""
    windows: set[bytes] = set()
    for path in files:
        windows.update(m.group(1) for m in _BIN32.finditer(path.read_bytes()))
    confirmed = set()
    for n in range(10_000):
        pin = f"{n:04d}"
        plain = _request_hash(stream_id, subject, pin)
        candidates = [plain] + [keyed_fingerprint(plain, [key]) for key in keys]
        if any(c in windows for c in candidates):
            confirmed.add(pin)
    return confirmed


def test_a_forgotten_pin_cannot_be_brute_forced_from_the_log_or_a_backup(stubs, tmp_path):
    s, server = stubs
    subject, stream = "subject-0123456789ab", "pins-1"
    s.store.Append(
        eventstore_pb2.AppendRequest(
            stream_id=stream, idempotency_key="key-pin-1", events=[_event(subject, PIN)]
        )
    )
    data_dir = server.data_dir
    log_file = data_dir / "log" / "data.mdb"
    # The attacker's reconstruction is right: with every file, keys included,
    # the PIN of a live subject is confirmed (as reading the event would).
    assert _confirmed_pins([log_file], stream, subject, _fingerprint_keys(data_dir)) == {PIN}

    s.store.ForgetSubject(eventstore_pb2.ForgetSubjectRequest(subject_id=subject))
    s.admin.Shred(admin_pb2.ShredRequest())
    receipt = s.store.GetSubject(eventstore_pb2.GetSubjectRequest(subject_id=subject))
    assert receipt.state == eventstore_pb2.SUBJECT_SHREDDED
    s.admin.Backup(admin_pb2.BackupRequest(destination=str(tmp_path / "backup")))

    keys = _fingerprint_keys(data_dir)
    backup = tmp_path / "backup" / "log" / "data.mdb"
    live_pins = _confirmed_pins([log_file], stream, subject, keys)
    backup_pins = _confirmed_pins([backup], stream, subject, keys)
    assert (live_pins, backup_pins) == (set(), set())


def _error_name(exc: grpc.RpcError) -> str:
    return dict(exc.trailing_metadata() or ()).get("lethedb-error", "")


def _assert_forgotten(exc: grpc.RpcError) -> None:
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
    assert _error_name(exc) == "SubjectForgotten", exc.details()


def _forget(s: Stubs, subject: str) -> None:
    s.store.ForgetSubject(eventstore_pb2.ForgetSubjectRequest(subject_id=subject))


def test_append_retried_after_forget_answers_subject_forgotten_never_a_comparison(stubs):
    s, _ = stubs
    subject = "subject-00000000000a"

    def append(pin: str) -> eventstore_pb2.AppendResponse:
        request = eventstore_pb2.AppendRequest(
            stream_id="pins-a", idempotency_key="key-a", events=[_event(subject, pin)]
        )
        return s.store.Append(request)

    append(PIN)
    assert append(PIN).deduplicated  # a plain retry deduplicates while the subject lives
    _forget(s, subject)
    for guess in ("0000", PIN):
        with pytest.raises(grpc.RpcError) as info:
            append(guess)
        _assert_forgotten(info.value)


def test_batch_and_stream_retries_after_forget_answer_subject_forgotten(stubs):
    s, _ = stubs
    subject = "subject-00000000000b"

    def request(pin: str) -> eventstore_pb2.AppendRequest:
        return eventstore_pb2.AppendRequest(
            stream_id="pins-b", idempotency_key="key-b", events=[_event(subject, pin)]
        )

    s.store.Append(request(PIN))
    _forget(s, subject)
    guesses = [request("0000"), request(PIN)]
    batch = s.store.AppendBatch(eventstore_pb2.AppendBatchRequest(appends=guesses))
    streamed = list(s.store.AppendStream(iter(guesses)))
    for result in [*batch.results, *streamed]:
        assert result.WhichOneof("result") == "error"
        assert result.error.error == "SubjectForgotten", result.error.message
        assert result.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_commit_retried_after_forget_of_any_part_answers_subject_forgotten(stubs):
    s, _ = stubs
    live, forgotten = "subject-00000000000c", "subject-00000000000d"

    def commit(pin: str) -> eventstore_pb2.CommitResponse:
        return s.store.Commit(
            eventstore_pb2.CommitRequest(
                idempotency_key="key-c",
                appends=[
                    eventstore_pb2.StreamAppend(stream_id="pins-c1", events=[_event(live, "1")]),
                    eventstore_pb2.StreamAppend(
                        stream_id="pins-c2", events=[_event(forgotten, pin)]
                    ),
                ],
            )
        )

    commit(PIN)
    assert commit(PIN).deduplicated
    _forget(s, forgotten)
    for guess in ("0000", PIN):
        with pytest.raises(grpc.RpcError) as info:
            commit(guess)
        _assert_forgotten(info.value)
