"""Multi-stream commits, stats, verify and key rotation in the SDK.

Requests and conversions are tested against protobuf messages built by hand;
the calls against the scripted stand-in for the generated stubs of
``test_client_erasure``.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import msgspec
import pytest

import lethedb
from lethedb import (
    NO_STREAM,
    STREAM_EXISTS,
    Append,
    AppendResult,
    CommitResult,
    Event,
    RotateResult,
    StoreStats,
    VerifyProgress,
)
from lethedb._admin_requests import to_rotate_result, to_store_stats, to_verify_progress
from lethedb._requests import build_commit_request, to_commit_result
from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import eventstore_pb2 as pb
from tests.unit.client.test_client_erasure import (
    FakeRpcError,
    ScriptedStub,
    _client,
    _run_async,
    unavailable,
)

T0 = 1_700_000_000 * 1_000_000_000
ID = uuid.UUID(int=7)


def _claim(name: str = "alice", **kwargs: Any) -> Append:
    return Append(
        f"username-{name}", Event("UsernameClaimed", {"user": "u-1"}, **kwargs), NO_STREAM
    )


def _user(**kwargs: Any) -> Append:
    return Append("user-u-1", [Event("UserRegistered", b"\x01", subject_id="u-1", **kwargs)])


# --- commit requests -----------------------------------------------------------------


class TestCommitRequest:
    def test_each_part_is_encoded_as_an_append_with_its_own_expected_version(self):
        request = build_commit_request(
            [_claim(event_id=ID), Append("user-u-1", Event("E", event_id=ID), 4)], "k-1"
        )
        assert request.idempotency_key == "k-1"
        assert [p.stream_id for p in request.appends] == ["username-alice", "user-u-1"]
        claim, user = request.appends
        assert claim.expected_state == pb.EXPECTED_NO_STREAM
        assert (user.expected_state, user.expected_version) == (pb.EXPECTED_EXACT, 4)
        assert claim.events[0] == pb.ProposedEvent(
            event_id=ID.bytes,
            event_type="UsernameClaimed",
            content_type="application/json",
            data=b'{"user":"u-1"}',
        )

    def test_other_expected_states(self):
        request = build_commit_request(
            [Append("a", Event("E")), Append("b", Event("E"), STREAM_EXISTS)], None
        )
        assert [p.expected_state for p in request.appends] == [
            pb.EXPECTED_ANY,
            pb.EXPECTED_STREAM_EXISTS,
        ]

    def test_without_a_key_one_is_generated_and_event_ids_are_drawn_once(self):
        request = build_commit_request([_claim(), _user()], None)
        assert len(request.idempotency_key) == 32
        ids = [e.event_id for part in request.appends for e in part.events]
        assert all(len(i) == 16 for i in ids)
        assert len(set(ids)) == 2
        assert build_commit_request([_claim()], None).idempotency_key != request.idempotency_key

    def test_with_the_callers_key_the_request_is_a_pure_function_of_the_arguments(self):
        """So that calling again with the same arguments is recognised as a retry."""
        first = build_commit_request([_claim(), _user()], "k-1")
        again = build_commit_request([_claim(), _user()], "k-1")
        assert first == again
        assert all(not e.event_id for part in first.appends for e in part.events)

    def test_a_part_with_its_own_idempotency_key_is_refused(self):
        parts = [_claim(), Append("user-u-1", Event("E"), idempotency_key="mine")]
        with pytest.raises(lethedb.ValidationError, match=r"appends\[1\]\.idempotency_key is"):
            build_commit_request(parts, None)

    @pytest.mark.parametrize(
        ("part", "message"),
        [
            (Append("", Event("E")), r"appends\[1\]\.stream_id is empty"),
            (Append("s", Event("")), r"appends\[1\]\.events\[0\]\.event_type is empty"),
            (Append("s", []), r"appends\[1\]\.events is empty"),
            (Append("s", Event("E"), -1), r"appends\[1\]\.expected_version is -1"),
            (
                Append("s", Event("E", data=object())),
                r"appends\[1\]\.events\[0\]\.data is an object",
            ),
            ("s", r"appends\[1\] is a str; expected lethedb.Append"),
        ],
    )
    def test_a_bad_part_is_refused_naming_it(self, part, message):
        with pytest.raises(lethedb.ValidationError, match=message):
            build_commit_request([_claim(), part], None)

    def test_a_stream_may_appear_in_one_part_only(self):
        with pytest.raises(lethedb.ValidationError, match=r"appends\[2\]\.stream_id 'user-u-1'"):
            build_commit_request([_user(), _claim(), _user()], None)

    @pytest.mark.parametrize(
        ("appends", "message"),
        [
            ([], "appends is empty"),
            (_claim(), "appends is an Append; expected a sequence"),
            ("ab", "appends is a str"),
        ],
    )
    def test_appends_must_be_a_non_empty_sequence(self, appends, message):
        with pytest.raises(lethedb.ValidationError, match=message):
            build_commit_request(appends, None)

    @pytest.mark.parametrize("key", ["", 7])
    def test_a_bad_idempotency_key_is_refused(self, key):
        with pytest.raises(lethedb.ValidationError, match="idempotency_key is"):
            build_commit_request([_claim()], key)


def _appended(first: int, count: int = 1, version: int = 0) -> pb.AppendResponse:
    return pb.AppendResponse(
        first_position=first,
        last_position=first + count - 1,
        first_version=version,
        last_version=version + count - 1,
        recorded_at=T0,
    )


class TestCommitResult:
    def test_one_result_per_part_in_order(self):
        response = pb.CommitResponse(results=[_appended(10), _appended(11, 2, 5)])
        assert to_commit_result(response, 2) == CommitResult(
            results=(
                AppendResult(10, 10, 0, 0, T0, False),
                AppendResult(11, 12, 5, 6, T0, False),
            ),
            deduplicated=False,
        )

    def test_a_replayed_commit_marks_every_part_deduplicated(self):
        response = pb.CommitResponse(results=[_appended(10), _appended(11)], deduplicated=True)
        result = to_commit_result(response, 2)
        assert result.deduplicated
        assert all(r.deduplicated for r in result.results)
        assert [r.first_position for r in result.results] == [10, 11]

    def test_a_result_count_other_than_the_part_count_is_a_server_error(self):
        with pytest.raises(lethedb.ServerError, match="commit of 2 part"):
            to_commit_result(pb.CommitResponse(results=[_appended(10)]), 2)

    def test_results_are_immutable_values(self):
        result = to_commit_result(pb.CommitResponse(results=[_appended(1)]), 1)
        with pytest.raises(AttributeError):
            result.deduplicated = True
        assert isinstance(result.results, tuple)


# --- admin conversions ---------------------------------------------------------------


def _stats_message() -> apb.StatsResponse:
    return apb.StatsResponse(
        last_position=1234,
        streams=56,
        subjects=12,
        forgotten_subjects=3,
        pending_shred=1,
        shred_epoch=2,
        master_version=4,
        log_file_bytes=1 << 20,
        log_map_bytes=64 << 20,
        key_file_bytes=32 << 10,
        store_id=bytes(range(16)),
    )


class TestAdminConversions:
    def test_stats(self):
        assert to_store_stats(_stats_message()) == StoreStats(
            last_position=1234,
            streams=56,
            subjects=12,
            forgotten_subjects=3,
            pending_shred=1,
            shred_epoch=2,
            master_version=4,
            log_file_bytes=1 << 20,
            log_map_bytes=64 << 20,
            key_file_bytes=32 << 10,
            store_id=bytes(range(16)),
        )

    def test_stats_of_every_wire_field(self):
        """A field added to StatsResponse must be added to StoreStats too."""
        wire = {f.name for f in apb.StatsResponse.DESCRIPTOR.fields}
        assert wire == set(StoreStats.__struct_fields__)

    def test_verify_progress_while_running(self):
        update = to_verify_progress(apb.VerifyProgress(checked=500, last_position=2000))
        assert update == VerifyProgress(checked=500, last_position=2000, done=False)
        assert update.ok
        assert update.first_bad_position is None

    def test_a_clean_final_message(self):
        update = to_verify_progress(
            apb.VerifyProgress(checked=2000, last_position=2000, done=True, redacted=30)
        )
        assert update.done
        assert update.ok
        assert update.redacted == 30

    def test_a_bad_record(self):
        update = to_verify_progress(
            apb.VerifyProgress(
                checked=41,
                last_position=2000,
                done=True,
                first_bad_position=42,
                problem="the chain hash does not match the record",
            )
        )
        assert not update.ok
        assert update.first_bad_position == 42
        assert update.problem == "the chain hash does not match the record"

    def test_a_problem_without_a_position_is_still_not_ok(self):
        update = to_verify_progress(apb.VerifyProgress(done=True, problem="log truncated"))
        assert update.first_bad_position is None
        assert not update.ok

    def test_verify_of_every_wire_field(self):
        wire = {f.name for f in apb.VerifyProgress.DESCRIPTOR.fields}
        assert wire == set(VerifyProgress.__struct_fields__)

    def test_rotate(self):
        response = apb.RotateMasterKeyResponse(master_version=5, rewrapped_keys=1000)
        assert to_rotate_result(response) == RotateResult(master_version=5, rewrapped_keys=1000)

    def test_values_are_frozen(self):
        stats = to_store_stats(_stats_message())
        with pytest.raises(AttributeError):
            stats.streams = 0
        assert msgspec.structs.replace(stats, streams=0) != stats


# --- calls ---------------------------------------------------------------------------


class TestCommitCall:
    def test_commit_sends_one_request_and_returns_the_results(self):
        stub = ScriptedStub(Commit=[pb.CommitResponse(results=[_appended(3), _appended(4)])])
        with _client(stub, timeout=2.0) as db:
            result = db.commit([_claim(), _user()])
        assert [r.first_position for r in result.results] == [3, 4]
        assert not result.deduplicated
        (sent,) = stub.sent["Commit"]
        assert [p.stream_id for p in sent.appends] == ["username-alice", "user-u-1"]
        assert stub.timeouts == [2.0]

    def test_a_retry_resends_the_identical_request(self):
        """Same key, same event ids: the server can recognise a commit that did land."""
        response = pb.CommitResponse(results=[_appended(3), _appended(4)], deduplicated=True)
        stub = ScriptedStub(Commit=[unavailable(), unavailable(), response])
        with _client(stub) as db:
            result = db.commit([_claim(), _user()])
        first, *retries = stub.sent["Commit"]
        assert all(r == first for r in retries)
        assert len(retries) == 2
        assert result.deduplicated

    def test_a_conflict_is_raised_not_retried(self):
        conflict = FakeRpcError(
            grpc.StatusCode.ABORTED,
            "stream 'username-alice': expected no stream, found version 0",
            (("lethedb-error", "WrongExpectedVersion"), ("lethedb-actual-version", "0")),
        )
        stub = ScriptedStub(Commit=[conflict])
        with _client(stub) as db, pytest.raises(lethedb.WrongExpectedVersion) as info:
            db.commit([_user(), _claim()])
        assert info.value.actual_version == 0
        assert len(stub.sent["Commit"]) == 1

    def test_arguments_are_checked_before_any_call(self):
        stub = ScriptedStub(Commit=[])
        with _client(stub) as db:
            with pytest.raises(lethedb.ValidationError):
                db.commit([])
            with pytest.raises(lethedb.ValidationError, match="timeout"):
                db.commit([_claim()], timeout=0)
        assert stub.sent == {}

    def test_async_commit(self):
        response = pb.CommitResponse(results=[_appended(3), _appended(4)])
        stub = ScriptedStub(is_async=True, Commit=[unavailable(), response])

        async def work(db: lethedb.AsyncClient) -> CommitResult:
            return await db.commit([_claim(), _user()], idempotency_key="k-9")

        result = _run_async(work, stub)
        assert [r.first_position for r in result.results] == [3, 4]
        assert [r.idempotency_key for r in stub.sent["Commit"]] == ["k-9", "k-9"]


def _progress(checked: int, head: int = 100, **fields: Any) -> apb.VerifyProgress:
    return apb.VerifyProgress(checked=checked, last_position=head, **fields)


class TestAdminCalls:
    def test_stats_is_retried(self):
        admin = ScriptedStub(Stats=[unavailable(), _stats_message()])
        with _client(admin=admin) as db:
            stats = db.admin.stats()
        assert stats.last_position == 1234
        assert admin.sent["Stats"] == [apb.StatsRequest(), apb.StatsRequest()]

    def test_verify_reports_every_message_and_returns_the_final_one(self):
        final = _progress(100, done=True, redacted=4)
        admin = ScriptedStub(Verify=[[_progress(30), _progress(70), final]])
        seen: list[VerifyProgress] = []
        with _client(admin=admin) as db:
            result = db.admin.verify(progress=seen.append, timeout=60.0)
        assert [p.checked for p in seen] == [30, 70, 100]
        assert result == seen[-1]
        assert result.done
        assert result.ok
        assert result.redacted == 4
        assert admin.timeouts == [60.0]
        assert admin.calls[0].cancelled

    def test_a_bad_record_is_a_result_not_an_exception(self):
        final = _progress(41, done=True, first_bad_position=42, problem="tag")
        admin = ScriptedStub(Verify=[[final]])
        with _client(admin=admin) as db:
            result = db.admin.verify()
        assert not result.ok
        assert result.first_bad_position == 42

    def test_a_failure_before_the_first_message_is_retried(self):
        admin = ScriptedStub(Verify=[[unavailable()], [_progress(100, done=True)]])
        with _client(admin=admin) as db:
            assert db.admin.verify().done
        assert len(admin.sent["Verify"]) == 2

    def test_a_failure_after_a_message_is_raised_not_retried(self):
        admin = ScriptedStub(Verify=[[_progress(30), unavailable()], [_progress(100, done=True)]])
        seen: list[VerifyProgress] = []
        with _client(admin=admin) as db, pytest.raises(lethedb.Unavailable) as info:
            db.admin.verify(progress=seen.append)
        assert [p.checked for p in seen] == [30]
        assert len(admin.sent["Verify"]) == 1
        assert any("cannot resume" in note for note in info.value.__notes__)

    def test_a_refusal_is_not_retried(self):
        denied = FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "admin only")
        admin = ScriptedStub(Verify=[[denied]])
        with _client(admin=admin) as db, pytest.raises(lethedb.PermissionDenied):
            db.admin.verify()
        assert len(admin.sent["Verify"]) == 1

    def test_retries_before_the_first_message_are_bounded(self):
        admin = ScriptedStub(Verify=[[unavailable()] for _ in range(3)])
        with _client(admin=admin, max_retries=2) as db, pytest.raises(lethedb.Unavailable):
            db.admin.verify()
        assert len(admin.sent["Verify"]) == 3

    def test_a_stream_without_a_final_message_is_a_server_error(self):
        admin = ScriptedStub(Verify=[[_progress(30)]])
        with (
            _client(admin=admin) as db,
            pytest.raises(lethedb.ServerError, match="without a final"),
        ):
            db.admin.verify()

    def test_a_progress_callback_that_raises_stops_the_walk_and_cancels_the_call(self):
        admin = ScriptedStub(Verify=[[_progress(30), _progress(100, done=True)]])

        def explode(update: VerifyProgress) -> None:
            raise KeyboardInterrupt

        with _client(admin=admin) as db, pytest.raises(KeyboardInterrupt):
            db.admin.verify(progress=explode)
        assert admin.calls[0].cancelled

    def test_progress_must_be_callable(self):
        admin = ScriptedStub(Verify=[])
        with _client(admin=admin) as db, pytest.raises(lethedb.ValidationError, match="progress"):
            db.admin.verify(progress=42)  # type: ignore[arg-type]
        assert admin.sent == {}

    def test_rotate_master_key(self):
        response = apb.RotateMasterKeyResponse(master_version=2, rewrapped_keys=7)
        admin = ScriptedStub(RotateMasterKey=[unavailable(), response])
        with _client(admin=admin) as db:
            assert db.admin.rotate_master_key() == RotateResult(2, 7)
        assert len(admin.sent["RotateMasterKey"]) == 2

    def test_async_admin(self):
        admin = ScriptedStub(
            is_async=True,
            Stats=[_stats_message()],
            Verify=[[unavailable()], [_progress(50), _progress(100, done=True)]],
            RotateMasterKey=[apb.RotateMasterKeyResponse(master_version=3, rewrapped_keys=1)],
        )
        seen: list[int] = []

        async def work(db: lethedb.AsyncClient) -> tuple[Any, ...]:
            return (
                await db.admin.stats(),
                await db.admin.verify(progress=lambda p: seen.append(p.checked)),
                await db.admin.rotate_master_key(),
            )

        stats, verified, rotated = _run_async(work, admin=admin)
        assert stats.streams == 56
        assert verified.done
        assert seen == [50, 100]
        assert rotated.master_version == 3

    def test_async_verify_is_not_retried_after_a_message(self):
        admin = ScriptedStub(is_async=True, Verify=[[_progress(50), unavailable()]])
        with pytest.raises(lethedb.Unavailable):
            _run_async(lambda db: db.admin.verify(), admin=admin)
        assert len(admin.sent["Verify"]) == 1
