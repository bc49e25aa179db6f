"""Erasure and admin calls: receipts, legal-hold times, what is retried and what is not.

The conversions are tested against protobuf messages built by hand; the calls
against a scripted stand-in for the generated stubs that records what it is
sent and answers (or fails) in the order given.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import grpc
import msgspec
import pytest

import lethedb
from lethedb import LegalHold, NodeErasure, SubjectReceipt, SubjectState
from lethedb._admin_requests import (
    build_backup_request,
    build_release_legal_hold_request,
    build_set_legal_hold_request,
    legal_hold_until,
    to_backup_result,
    to_cluster_status,
    to_shred_result,
)
from lethedb._requests import (
    build_export_subject_request,
    build_forget_subject_request,
    build_get_subject_request,
    to_legal_hold,
    to_subject_receipt,
)
from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import eventstore_pb2 as pb
from tests.unit.client.grpc_fakes import AsyncCall, FakeRpcError, SyncCall, unavailable

FAST = {"initial_backoff": 0.001, "max_backoff": 0.002}
NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def legal_hold_active() -> FakeRpcError:
    return FakeRpcError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "subject 's-1' is under legal hold",
        (("lethedb-error", "LegalHoldActive"),),
    )


# --- conversions ---------------------------------------------------------------------


def _receipt_message(**fields: Any) -> pb.SubjectReceipt:
    return pb.SubjectReceipt(subject_id="s-1", **fields)


class TestSubjectReceipt:
    def test_an_active_subject(self):
        receipt = to_subject_receipt(_receipt_message(state=pb.SUBJECT_ACTIVE, event_count=3))
        assert receipt == SubjectReceipt("s-1", SubjectState.ACTIVE, event_count=3)
        assert receipt.legal_hold is None

    def test_a_forgotten_subject_awaiting_its_shred_epoch(self):
        receipt = to_subject_receipt(
            _receipt_message(
                state=pb.SUBJECT_FORGOTTEN_PENDING_SHRED,
                tombstone_position=42,
                forgotten_at=T0,
                reason="gdpr-art17-request",
                shred_epoch=5,
                event_count=7,
            )
        )
        assert receipt == SubjectReceipt(
            subject_id="s-1",
            state=SubjectState.FORGOTTEN_PENDING_SHRED,
            tombstone_position=42,
            forgotten_at=T0,
            reason="gdpr-art17-request",
            shred_epoch=5,
            shredded_at=0,
            event_count=7,
            legal_hold=None,
        )

    def test_a_shredded_subject_carries_the_epoch_completion_time(self):
        receipt = to_subject_receipt(
            _receipt_message(
                state=pb.SUBJECT_SHREDDED,
                tombstone_position=42,
                forgotten_at=T0,
                shred_epoch=5,
                shredded_at=T0 + 60 * NS,
            )
        )
        assert receipt.state is SubjectState.SHREDDED
        assert receipt.shred_epoch == 5
        assert receipt.shredded_at == T0 + 60 * NS

    def test_a_hold_until_released_has_no_until(self):
        receipt = to_subject_receipt(
            _receipt_message(
                state=pb.SUBJECT_ACTIVE,
                legal_hold=pb.LegalHold(reason="litigation-17", set_at=T0, until=0),
            )
        )
        assert receipt.legal_hold == LegalHold(reason="litigation-17", set_at=T0, until=None)

    def test_a_hold_with_an_end_keeps_it_in_nanoseconds(self):
        hold = to_legal_hold(pb.LegalHold(reason="audit", set_at=T0, until=T0 + 5 * NS))
        assert hold.until == T0 + 5 * NS

    def test_an_empty_but_present_hold_message_still_counts_as_a_hold(self):
        message = _receipt_message(state=pb.SUBJECT_ACTIVE)
        message.legal_hold.SetInParent()
        assert to_subject_receipt(message).legal_hold == LegalHold("", 0, None)

    @pytest.mark.parametrize("state", [pb.SUBJECT_STATE_UNSPECIFIED, 99])
    def test_an_unknown_state_is_a_server_error_not_a_guess(self, state):
        with pytest.raises(lethedb.ServerError, match=f"subject state {state}"):
            to_subject_receipt(_receipt_message(state=state))

    def test_a_leaders_receipt_gives_the_state_on_every_node_in_its_order(self):
        message = _receipt_message(
            state=pb.SUBJECT_SHREDDED,
            tombstone_position=42,
            nodes=[
                pb.NodeErasure(node_id="db-a", state=pb.SUBJECT_SHREDDED, connected=True),
                pb.NodeErasure(
                    node_id="db-b", state=pb.SUBJECT_FORGOTTEN_PENDING_SHRED, connected=True
                ),
                pb.NodeErasure(node_id="db-c", state=pb.SUBJECT_ACTIVE, connected=False),
            ],
        )
        assert to_subject_receipt(message).nodes == (
            NodeErasure("db-a", SubjectState.SHREDDED, connected=True),
            NodeErasure("db-b", SubjectState.FORGOTTEN_PENDING_SHRED, connected=True),
            NodeErasure("db-c", SubjectState.ACTIVE, connected=False),
        )

    def test_a_receipt_from_a_single_node_names_no_nodes(self):
        assert to_subject_receipt(_receipt_message(state=pb.SUBJECT_ACTIVE)).nodes == ()

    def test_an_unknown_state_of_one_node_is_a_server_error_too(self):
        message = _receipt_message(
            state=pb.SUBJECT_ACTIVE, nodes=[pb.NodeErasure(node_id="db-b", state=99)]
        )
        with pytest.raises(lethedb.ServerError, match="subject state 99"):
            to_subject_receipt(message)

    def test_receipts_are_immutable_values(self):
        receipt = SubjectReceipt("s-1", SubjectState.ACTIVE)
        with pytest.raises(AttributeError):
            receipt.state = SubjectState.SHREDDED
        assert msgspec.structs.replace(receipt, event_count=1) != receipt

    def test_subject_state_names_match_the_wire_names(self):
        for state in SubjectState:
            assert pb.SubjectState.Value(f"SUBJECT_{state.name}") > 0


class TestLegalHoldUntil:
    def test_none_is_until_released(self):
        assert legal_hold_until(None) == 0

    def test_an_int_is_nanoseconds_as_given(self):
        assert legal_hold_until(T0 + 1) == T0 + 1

    def test_an_aware_datetime_is_converted_exactly_to_nanoseconds(self):
        when = datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
        assert legal_hold_until(when) == 1_893_553_445_678_901_000

    def test_the_time_zone_of_an_aware_datetime_is_honoured(self):
        utc = datetime(2030, 1, 1, 12, tzinfo=UTC)
        cet = datetime(2030, 1, 1, 13, tzinfo=timezone(timedelta(hours=1)))
        assert legal_hold_until(cet) == legal_hold_until(utc)

    def test_a_naive_datetime_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match="naive datetime"):
            legal_hold_until(datetime(2030, 1, 1))

    def test_zero_is_refused_in_favour_of_none(self):
        with pytest.raises(lethedb.ValidationError, match="pass None"):
            legal_hold_until(0)

    @pytest.mark.parametrize(
        "until",
        [-1, 2**64, datetime(1969, 12, 31, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)],
    )
    def test_times_outside_the_wire_range_are_refused(self, until):
        with pytest.raises(lethedb.ValidationError, match="after the Unix epoch"):
            legal_hold_until(until)

    def test_a_datetime_beyond_2554_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match="before 2554"):
            legal_hold_until(datetime(2600, 1, 1, tzinfo=UTC))

    @pytest.mark.parametrize("until", [True, 1.5, "2030-01-01"])
    def test_other_types_are_refused(self, until):
        with pytest.raises(lethedb.ValidationError, match="until is"):
            legal_hold_until(until)

    def test_the_request_carries_the_converted_time(self):
        when = datetime(2030, 1, 1, tzinfo=UTC)
        request = build_set_legal_hold_request("s-1", "litigation", when)
        assert request.until == int(when.timestamp()) * NS
        assert build_set_legal_hold_request("s-1", "litigation", None).until == 0


class TestRequests:
    def test_forget_sends_subject_and_reason(self):
        request = build_forget_subject_request("s-1", "gdpr-art17-request")
        assert request == pb.ForgetSubjectRequest(subject_id="s-1", reason="gdpr-art17-request")

    @pytest.mark.parametrize(
        "build",
        [
            lambda s: build_forget_subject_request(s, "r"),
            build_get_subject_request,
            build_export_subject_request,
            lambda s: build_set_legal_hold_request(s, "r", None),
            build_release_legal_hold_request,
        ],
    )
    @pytest.mark.parametrize(
        ("subject_id", "message"), [("", "is empty"), (None, "is None; expected")]
    )
    def test_a_subject_id_is_required(self, build, subject_id, message):
        with pytest.raises(lethedb.ValidationError, match=f"subject_id {message}"):
            build(subject_id)

    def test_an_empty_reason_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match="reason is empty"):
            build_forget_subject_request("s-1", "")
        with pytest.raises(lethedb.ValidationError, match="reason is empty"):
            build_set_legal_hold_request("s-1", "", None)

    def test_backup_request(self):
        assert build_backup_request("/backups/1", True) == apb.BackupRequest(
            destination="/backups/1", include_keys=True
        )
        with pytest.raises(lethedb.ValidationError, match="destination is empty"):
            build_backup_request("", False)
        with pytest.raises(lethedb.ValidationError, match="include_keys is"):
            build_backup_request("/b", "yes")


class TestResults:
    def test_shred_response(self):
        result = to_shred_result(
            apb.ShredResponse(
                epoch=3, master_version=4, live_keys=100, shredded_subjects=2, completed_at=T0
            )
        )
        assert result == lethedb.ShredResult(
            epoch=3, master_version=4, live_keys=100, shredded_subjects=2, completed_at=T0
        )

    def test_backup_response(self):
        result = to_backup_result(
            apb.BackupResponse(destination="/b", last_position=9, log_bytes=4096, key_bytes=0)
        )
        assert result == lethedb.BackupResult(
            destination="/b", last_position=9, log_bytes=4096, key_bytes=0
        )

    def test_cluster_status_of_a_leader_with_one_follower_gone(self):
        follower = apb.FollowerStatus(
            node_id="db-b",
            advertise="db-b:7000",
            connected=False,
            commit=11,
            position=40,
            lag_positions=2,
            lag_seconds=1.5,
            shredded_through=30,
        )
        status = to_cluster_status(
            apb.ClusterStatusResponse(
                node_id="db-a", role="leader", term=1, commit=12, position=42,
                followers=[follower], sync_replicas=1,
            )
        )  # fmt: skip
        assert (status.node_id, status.role, status.term, status.leader) == (
            "db-a", "leader", 1, ""
        )  # fmt: skip
        assert (status.commit, status.position, status.sync_replicas) == (12, 42, 1)
        assert status.followers == (
            lethedb.FollowerStatus(
                node_id="db-b",
                advertise="db-b:7000",
                connected=False,
                connected_since=0,
                commit=11,
                position=40,
                lag_positions=2,
                lag_seconds=1.5,
                shredded_through=30,
            ),
        )


# --- calls ---------------------------------------------------------------------------


class ScriptedStub:
    """Any method: pops that method's next scripted outcome, records request and timeout.

    A unary outcome is a response or an exception; a streaming one (a list) is
    the call's messages, possibly ending in an exception.
    """

    def __init__(self, is_async: bool = False, **scripts: list[Any]) -> None:
        self.scripts = scripts
        self.sent: dict[str, list[Any]] = {}
        self.timeouts: list[float | None] = []
        self.calls: list[SyncCall] = []
        self.is_async = is_async

    def __getattr__(self, method: str) -> Any:
        if method not in self.scripts:
            raise AttributeError(method)

        def call(request: Any, timeout: float | None = None) -> Any:
            self.sent.setdefault(method, []).append(request)
            self.timeouts.append(timeout)
            outcome = self.scripts[method].pop(0)
            if isinstance(outcome, list):
                stream = (AsyncCall if self.is_async else SyncCall)(outcome)
                self.calls.append(stream)
                return stream
            if self.is_async:
                return self._answer(outcome)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        return call

    @staticmethod
    async def _answer(outcome: Any) -> Any:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def _client(
    stub: ScriptedStub | None = None, admin: ScriptedStub | None = None, **settings: Any
) -> lethedb.Client:
    client = lethedb.Client("127.0.0.1:9", **{**FAST, **settings})
    if stub is not None:
        client._transport.events = stub
    if admin is not None:
        client._transport.admin = admin
    return client


def _run_async(
    work: Any, stub: ScriptedStub | None = None, admin: ScriptedStub | None = None
) -> Any:
    async def main() -> Any:
        async with lethedb.AsyncClient("127.0.0.1:9", **FAST) as db:
            if stub is not None:
                db._transport.events = stub
            if admin is not None:
                db._transport.admin = admin
            return await work(db)

    return asyncio.run(main())


def _forgotten(subject_id: str = "s-1") -> pb.SubjectReceipt:
    return pb.SubjectReceipt(
        subject_id=subject_id,
        state=pb.SUBJECT_FORGOTTEN_PENDING_SHRED,
        tombstone_position=42,
        forgotten_at=T0,
        reason="unspecified",
        shred_epoch=1,
    )


def _event(position: int) -> pb.RecordedEvent:
    return pb.RecordedEvent(
        position=position,
        stream_id=f"stream-{position}",
        event_id=uuid.UUID(int=position).bytes,
        event_type="E",
        subject_id="s-1",
        data=b"{}",
    )


def _batch(*positions: int) -> pb.ReadResponse:
    return pb.ReadResponse(events=[_event(p) for p in positions])


class TestForgetAndGetSubject:
    def test_forget_returns_the_receipt_and_sends_the_default_reason(self):
        stub = ScriptedStub(ForgetSubject=[_forgotten()])
        with _client(stub) as db:
            receipt = db.forget_subject("s-1")
        assert receipt.state is SubjectState.FORGOTTEN_PENDING_SHRED
        assert receipt.tombstone_position == 42
        assert stub.sent["ForgetSubject"] == [
            pb.ForgetSubjectRequest(subject_id="s-1", reason="unspecified")
        ]

    def test_forget_is_retried_with_the_same_request(self):
        stub = ScriptedStub(ForgetSubject=[unavailable(), unavailable(), _forgotten()])
        with _client(stub, timeout=2.0) as db:
            db.forget_subject("s-1", reason="gdpr-art17-request")
        sent = stub.sent["ForgetSubject"]
        assert len(sent) == 3
        assert all(r == sent[0] for r in sent)
        assert stub.timeouts == [2.0, 2.0, 2.0]

    def test_a_legal_hold_blocking_a_forget_is_raised_not_retried(self):
        stub = ScriptedStub(ForgetSubject=[legal_hold_active(), _forgotten()])
        with _client(stub) as db, pytest.raises(lethedb.LegalHoldActive) as info:
            db.forget_subject("s-1")
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert len(stub.sent["ForgetSubject"]) == 1

    def test_get_subject(self):
        active = pb.SubjectReceipt(subject_id="s-1", state=pb.SUBJECT_ACTIVE, event_count=2)
        stub = ScriptedStub(GetSubject=[unavailable(), active])
        with _client(stub) as db:
            receipt = db.get_subject("s-1", timeout=0.5)
        assert receipt == SubjectReceipt("s-1", SubjectState.ACTIVE, event_count=2)
        assert stub.timeouts == [0.5, 0.5]

    def test_arguments_are_checked_before_any_call(self):
        stub = ScriptedStub()
        with _client(stub) as db:
            with pytest.raises(lethedb.ValidationError, match="subject_id is empty"):
                db.forget_subject("")
            with pytest.raises(lethedb.ValidationError, match="timeout is 0"):
                db.get_subject("s-1", timeout=0)
            with pytest.raises(lethedb.ValidationError, match="subject_id is empty"):
                db.export_subject("")
        assert stub.sent == {}

    def test_async_forget_and_get(self):
        stub = ScriptedStub(
            is_async=True,
            ForgetSubject=[unavailable(), _forgotten()],
            GetSubject=[_forgotten()],
        )

        async def work(db: lethedb.AsyncClient) -> tuple[SubjectReceipt, SubjectReceipt]:
            return await db.forget_subject("s-1"), await db.get_subject("s-1")

        forgot, got = _run_async(work, stub)
        assert forgot == got
        assert forgot.state is SubjectState.FORGOTTEN_PENDING_SHRED
        assert len(stub.sent["ForgetSubject"]) == 2

    def test_async_legal_hold_is_raised(self):
        stub = ScriptedStub(is_async=True, ForgetSubject=[legal_hold_active()])
        with pytest.raises(lethedb.LegalHoldActive):
            _run_async(lambda db: db.forget_subject("s-1"), stub)


def _export(db: lethedb.Client) -> list[int]:
    return [e.position for e in db.export_subject("s-1")]


class TestExportSubject:
    def test_events_of_every_batch_are_yielded_in_order(self):
        stub = ScriptedStub(ExportSubject=[[_batch(3, 8), _batch(11)]])
        with _client(stub) as db:
            events = list(db.export_subject("s-1"))
        assert [e.position for e in events] == [3, 8, 11]
        assert events[0].event_id == uuid.UUID(int=3)
        assert stub.sent["ExportSubject"] == [pb.ExportSubjectRequest(subject_id="s-1")]

    def test_a_drop_before_the_first_event_is_retried(self):
        stub = ScriptedStub(ExportSubject=[[unavailable()], [_batch(3, 8)]])
        with _client(stub) as db:
            assert _export(db) == [3, 8]
        assert len(stub.sent["ExportSubject"]) == 2

    def test_an_empty_batch_then_a_drop_is_still_before_the_first_event(self):
        stub = ScriptedStub(ExportSubject=[[pb.ReadResponse(), unavailable()], [_batch(3)]])
        with _client(stub) as db:
            assert _export(db) == [3]

    def test_a_drop_after_events_were_yielded_is_raised_not_retried(self):
        stub = ScriptedStub(ExportSubject=[[_batch(3, 8), unavailable()], [_batch(3, 8, 11)]])
        seen: list[int] = []

        def export(db: lethedb.Client) -> None:
            for event in db.export_subject("s-1"):
                seen.append(event.position)

        with _client(stub) as db, pytest.raises(lethedb.Unavailable) as info:
            export(db)
        assert seen == [3, 8]
        assert len(stub.sent["ExportSubject"]) == 1
        assert any("broke after 2 event(s)" in note for note in info.value.__notes__)
        assert stub.calls[0].cancelled

    def test_a_refusal_mid_export_is_raised_without_the_resume_note(self):
        refused = FakeRpcError(grpc.StatusCode.DATA_LOSS, "bad record")
        stub = ScriptedStub(ExportSubject=[[_batch(3), refused]])
        with _client(stub) as db, pytest.raises(lethedb.DataLoss) as info:
            _export(db)
        assert not getattr(info.value, "__notes__", [])

    def test_a_refusal_before_any_event_is_not_retried(self):
        denied = FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "admin only")
        stub = ScriptedStub(ExportSubject=[[denied]])
        with _client(stub) as db, pytest.raises(lethedb.PermissionDenied):
            _export(db)
        assert len(stub.sent["ExportSubject"]) == 1

    def test_retries_before_the_first_event_are_bounded(self):
        stub = ScriptedStub(ExportSubject=[[unavailable()] for _ in range(3)])
        with _client(stub, max_retries=2) as db, pytest.raises(lethedb.Unavailable) as info:
            _export(db)
        assert "gave up after 3 attempts" in info.value.__notes__[0]

    def test_the_call_starts_on_first_next_and_stopping_early_cancels_it(self):
        stub = ScriptedStub(ExportSubject=[[_batch(3, 8)]])
        with _client(stub) as db:
            events = db.export_subject("s-1")
            assert "ExportSubject" not in stub.sent
            next(events)
            events.close()
        assert stub.calls[0].cancelled

    def test_async_export_retries_only_before_the_first_event(self):
        stub = ScriptedStub(
            is_async=True,
            ExportSubject=[[unavailable()], [_batch(3), unavailable()], [_batch(3, 8)]],
        )
        seen: list[int] = []

        async def work(db: lethedb.AsyncClient) -> None:
            async for event in db.export_subject("s-1"):
                seen.append(event.position)

        with pytest.raises(lethedb.Unavailable):
            _run_async(work, stub)
        assert seen == [3]
        assert len(stub.sent["ExportSubject"]) == 2


def _shred_response(epoch: int) -> apb.ShredResponse:
    return apb.ShredResponse(
        epoch=epoch, master_version=epoch + 1, live_keys=10, shredded_subjects=1, completed_at=T0
    )


def _held(until: int = 0) -> pb.SubjectReceipt:
    return pb.SubjectReceipt(
        subject_id="s-1",
        state=pb.SUBJECT_ACTIVE,
        legal_hold=pb.LegalHold(reason="litigation", set_at=T0, until=until),
    )


class TestAdmin:
    def test_admin_is_one_object_bound_to_the_client(self):
        with _client() as db:
            assert db.admin is db.admin
            assert db.admin._transport is db._transport
            assert repr(db.admin) == "AdminClient('127.0.0.1:9')"

    def test_shred_is_retried(self):
        admin = ScriptedStub(Shred=[unavailable(), _shred_response(4)])
        with _client(admin=admin, timeout=30.0) as db:
            result = db.admin.shred()
        assert result.epoch == 4
        assert result.master_version == 5
        assert admin.timeouts == [30.0, 30.0]

    def test_set_legal_hold_sends_nanoseconds_and_returns_the_receipt(self):
        until = datetime(2030, 1, 1, tzinfo=UTC)
        until_ns = legal_hold_until(until)
        admin = ScriptedStub(SetLegalHold=[unavailable(), _held(until_ns)])
        with _client(admin=admin) as db:
            receipt = db.admin.set_legal_hold("s-1", "litigation", until=until)
        assert receipt.legal_hold == LegalHold("litigation", T0, until_ns)
        sent = admin.sent["SetLegalHold"]
        assert sent[0] == apb.SetLegalHoldRequest(
            subject_id="s-1", reason="litigation", until=until_ns
        )
        assert sent[0] == sent[1]

    def test_set_legal_hold_without_until_lasts_until_released(self):
        admin = ScriptedStub(SetLegalHold=[_held()])
        with _client(admin=admin) as db:
            receipt = db.admin.set_legal_hold("s-1", "litigation")
        assert admin.sent["SetLegalHold"][0].until == 0
        assert receipt.legal_hold is not None
        assert receipt.legal_hold.until is None

    def test_a_bad_until_is_refused_before_any_call(self):
        admin = ScriptedStub()
        with _client(admin=admin) as db, pytest.raises(lethedb.ValidationError):
            db.admin.set_legal_hold("s-1", "litigation", until=datetime(2030, 1, 1))
        assert admin.sent == {}

    def test_release_legal_hold(self):
        released = pb.SubjectReceipt(subject_id="s-1", state=pb.SUBJECT_ACTIVE)
        admin = ScriptedStub(ReleaseLegalHold=[unavailable(), released])
        with _client(admin=admin) as db:
            receipt = db.admin.release_legal_hold("s-1")
        assert receipt.legal_hold is None
        assert admin.sent["ReleaseLegalHold"][0] == apb.ReleaseLegalHoldRequest(subject_id="s-1")
        assert len(admin.sent["ReleaseLegalHold"]) == 2

    def test_backup_returns_its_result(self):
        response = apb.BackupResponse(
            destination="/b", last_position=9, log_bytes=4096, key_bytes=512
        )
        admin = ScriptedStub(Backup=[response])
        with _client(admin=admin) as db:
            result = db.admin.backup("/b", include_keys=True)
        assert result.key_bytes == 512
        assert admin.sent["Backup"] == [apb.BackupRequest(destination="/b", include_keys=True)]

    @pytest.mark.parametrize(
        ("error", "expected"),
        [
            (unavailable(), lethedb.Unavailable),
            (FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"), lethedb.DeadlineExceeded),
        ],
    )
    def test_backup_is_never_retried(self, error, expected):
        admin = ScriptedStub(Backup=[error, apb.BackupResponse()])
        with _client(admin=admin) as db, pytest.raises(expected) as info:
            db.admin.backup("/b")
        assert len(admin.sent["Backup"]) == 1
        assert any("not retried" in note for note in info.value.__notes__)

    def test_a_refused_backup_has_no_retry_note(self):
        refused = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "destination is not empty")
        admin = ScriptedStub(Backup=[refused])
        with _client(admin=admin) as db, pytest.raises(lethedb.ValidationError) as info:
            db.admin.backup("/b")
        assert not getattr(info.value, "__notes__", [])

    def test_async_admin(self):
        admin = ScriptedStub(
            is_async=True,
            Shred=[unavailable(), _shred_response(2)],
            SetLegalHold=[_held()],
            ReleaseLegalHold=[pb.SubjectReceipt(subject_id="s-1", state=pb.SUBJECT_ACTIVE)],
            Backup=[unavailable()],
        )

        async def work(db: lethedb.AsyncClient) -> list[Any]:
            assert db.admin is db.admin
            results: list[Any] = [
                await db.admin.shred(),
                await db.admin.set_legal_hold("s-1", "litigation"),
                await db.admin.release_legal_hold("s-1"),
            ]
            with pytest.raises(lethedb.Unavailable):
                await db.admin.backup("/b")
            return results

        shred, held, released = _run_async(work, admin=admin)
        assert shred.epoch == 2
        assert held.legal_hold == LegalHold("litigation", T0, None)
        assert released.legal_hold is None
        assert len(admin.sent["Shred"]) == 2
        assert len(admin.sent["Backup"]) == 1
