"""The SDK's values and request building: what goes on the wire for what the caller wrote."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

import lethedb
from lethedb import ANY, NO_STREAM, STREAM_EXISTS, Append, Event, RecordedEvent, StreamState
from lethedb._pipeline import AppendPipeline
from lethedb._requests import (
    build_append_request,
    build_read_all_request,
    build_read_stream_request,
    proposed_event,
    to_append_result,
    to_recorded_event,
)
from lethedb.v1 import eventstore_pb2 as pb


def _recorded(**overrides: object) -> RecordedEvent:
    fields: dict[str, object] = {
        "position": 7,
        "stream_id": "order-1",
        "stream_version": 2,
        "event_id": uuid.UUID(int=1),
        "event_type": "OrderPlaced",
        "subject_id": "subj-1",
        "content_type": "application/json",
        "recorded_at": 1_700_000_000_123_456_789,
        "data": b'{"total": 42}',
        "metadata": b"",
        "redacted": False,
    }
    fields.update(overrides)
    return RecordedEvent(**fields)


def test_public_api_is_exactly_the_documented_names():
    assert set(lethedb.__all__) == {
        "Client",
        "AsyncClient",
        "RetryPolicy",
        "Event",
        "RecordedEvent",
        "AppendResult",
        "Append",
        "ANY",
        "NO_STREAM",
        "STREAM_EXISTS",
        "StreamState",
        "LetheError",
        "ValidationError",
        "WrongExpectedVersion",
        "StreamNotFound",
        "SubjectForgotten",
        "IdempotencyConflict",
        "LegalHoldActive",
        "StorageFull",
        "RequestTooLarge",
        "DataLoss",
        "Unavailable",
        "DeadlineExceeded",
        "Unauthenticated",
        "PermissionDenied",
        "ServerError",
        "SubjectReceipt",
        "SubjectState",
        "LegalHold",
        "NodeErasure",
        "ShredResult",
        "BackupResult",
        "CommitResult",
        "StoreStats",
        "ClusterStatus",
        "FollowerStatus",
        "VerifyProgress",
        "RotateResult",
        "Subscription",
        "AsyncSubscription",
        "SubscriptionFilter",
        "Checkpoint",
        "CaughtUp",
        "GroupAssignment",
        "TooManySubscribers",
        "PositionBeyondHead",
        "NotGroupMember",
        "NotLeader",
        "Overloaded",
        "SubscriptionReplaced",
    }
    for name in lethedb.__all__:
        assert getattr(lethedb, name) is not None


class TestEventEncoding:
    def test_bytes_data_is_sent_raw_as_octet_stream(self):
        message = proposed_event(Event("Blob", b"\x00\xff"))
        assert message.data == b"\x00\xff"
        assert message.content_type == "application/octet-stream"

    def test_bytearray_and_memoryview_count_as_raw_bytes(self):
        assert proposed_event(Event("Blob", bytearray(b"ab"))).data == b"ab"
        assert proposed_event(Event("Blob", memoryview(b"cd"))).data == b"cd"

    def test_other_data_is_json_encoded_as_application_json(self):
        message = proposed_event(Event("OrderPlaced", {"total": 42, "items": ["a"]}))
        assert msgspec.json.decode(message.data) == {"total": 42, "items": ["a"]}
        assert message.content_type == "application/json"

    def test_a_string_is_json_data_not_raw_text(self):
        assert proposed_event(Event("Note", "hi")).data == b'"hi"'

    def test_an_explicit_content_type_wins(self):
        raw = proposed_event(Event("Doc", b"<a/>", content_type="application/xml"))
        encoded = proposed_event(Event("Doc", {"a": 1}, content_type="application/vnd.x+json"))
        assert raw.content_type == "application/xml"
        assert encoded.content_type == "application/vnd.x+json"

    def test_metadata_may_be_bytes_json_or_absent(self):
        assert proposed_event(Event("E", metadata=b"\x01")).metadata == b"\x01"
        assert proposed_event(Event("E", metadata={"trace": "t1"})).metadata == b'{"trace":"t1"}'
        assert proposed_event(Event("E")).metadata == b""

    def test_subject_and_type_are_sent_in_clear_fields(self):
        message = proposed_event(Event("UserRegistered", {}, subject_id="7f3a"))
        assert (message.event_type, message.subject_id) == ("UserRegistered", "7f3a")

    def test_a_given_event_id_is_sent_as_its_16_bytes(self):
        event_id = uuid.uuid4()
        assert proposed_event(Event("E", event_id=event_id)).event_id == event_id.bytes

    def test_a_missing_event_id_takes_the_id_drawn_for_it(self):
        drawn = bytes(range(16))
        assert proposed_event(Event("E"), drawn_id=drawn).event_id == drawn
        assert proposed_event(Event("E")).event_id == b""  # the server draws one

    def test_data_that_is_not_json_able_is_refused_naming_the_field(self):
        with pytest.raises(lethedb.ValidationError, match=r"events\[1\]\.data is an object"):
            build_append_request("s", [Event("A"), Event("B", object())], ANY, None)

    def test_event_repr_does_not_show_personal_data(self):
        text = repr(Event("UserRegistered", {"email": "a@b.c"}, metadata=b"secret"))
        assert "a@b.c" not in text
        assert "secret" not in text
        assert "<dict>" in text
        assert "<6 bytes>" in text


class TestAppendRequest:
    @pytest.mark.parametrize(
        ("expected", "state"),
        [
            (ANY, pb.EXPECTED_ANY),
            (NO_STREAM, pb.EXPECTED_NO_STREAM),
            (STREAM_EXISTS, pb.EXPECTED_STREAM_EXISTS),
        ],
    )
    def test_stream_states_map_to_expected_state(self, expected, state):
        request = build_append_request("s", Event("E"), expected, None)
        assert request.expected_state == state

    def test_an_int_is_an_exact_expected_version(self):
        request = build_append_request("s", Event("E"), 0, None)
        assert request.expected_state == pb.EXPECTED_EXACT
        assert request.expected_version == 0

    def test_constants_are_the_stream_state_members(self):
        assert (ANY, NO_STREAM, STREAM_EXISTS) == (
            StreamState.ANY,
            StreamState.NO_STREAM,
            StreamState.STREAM_EXISTS,
        )

    def test_a_single_event_is_accepted_without_a_list(self):
        assert len(build_append_request("s", Event("E"), ANY, None).events) == 1

    def test_a_missing_idempotency_key_is_generated_fresh_for_each_request(self):
        first = build_append_request("s", Event("E"), ANY, None).idempotency_key
        second = build_append_request("s", Event("E"), ANY, None).idempotency_key
        assert len(first) == 32
        assert first != second

    def test_a_generated_idempotency_key_is_a_time_ordered_version_7_uuid(self):
        before_ms = time.time_ns() // 1_000_000
        first = build_append_request("s", Event("E"), ANY, None).idempotency_key
        time.sleep(0.002)
        second = build_append_request("s", Event("E"), ANY, None).idempotency_key

        parsed = uuid.UUID(hex=first)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert 0 <= (parsed.int >> 80) - before_ms < 1000  # its leading 48 bits: Unix ms
        assert first < second  # later keys sort after: the server's index grows at one edge

    def test_a_given_idempotency_key_is_kept(self):
        assert build_append_request("s", Event("E"), ANY, "order-42").idempotency_key == "order-42"

    def test_with_a_generated_key_event_ids_are_drawn_client_side(self):
        request = build_append_request("s", [Event("A"), Event("B")], ANY, None)
        assert all(len(e.event_id) == 16 for e in request.events)

    def test_with_a_caller_key_the_same_arguments_give_the_same_bytes(self):
        events = [Event("A", {"n": 1}, subject_id="s1"), Event("B", b"x")]
        first = build_append_request("s", events, 3, "order-42")
        second = build_append_request("s", events, 3, "order-42")
        assert first.SerializeToString() == second.SerializeToString()
        assert all(e.event_id == b"" for e in first.events)

    def test_with_a_caller_key_a_given_event_id_is_still_sent(self):
        event_id = uuid.uuid4()
        request = build_append_request("s", Event("A", event_id=event_id), ANY, "k")
        assert request.events[0].event_id == event_id.bytes


class TestClientSideValidation:
    def test_negative_expected_version_is_refused_naming_the_field(self):
        with pytest.raises(lethedb.ValidationError) as info:
            build_append_request("s", Event("E"), -1, None)
        assert str(info.value) == (
            "expected_version is -1; it must be >= 0 or ANY/NO_STREAM/STREAM_EXISTS"
        )
        assert info.value.code is None

    def test_a_bool_is_not_an_expected_version(self):
        with pytest.raises(lethedb.ValidationError, match="expected_version is a bool"):
            build_append_request("s", Event("E"), True, None)

    def test_an_empty_event_list_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match="events is empty"):
            build_append_request("s", [], ANY, None)

    def test_an_empty_stream_id_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match="stream_id is empty"):
            build_append_request("", Event("E"), ANY, None)

    def test_an_empty_event_type_is_refused_naming_the_event(self):
        with pytest.raises(lethedb.ValidationError, match=r"events\[1\]\.event_type is empty"):
            build_append_request("s", [Event("A"), Event("")], ANY, None)

    def test_a_refused_event_of_a_pipelined_append_is_named_by_item_and_index(self):
        events = [Event("A"), Event("B", subject_id=5)]  # type: ignore[arg-type]
        with pytest.raises(
            lethedb.ValidationError, match=r"^items\[2\]\.events\[1\]\.subject_id is an int"
        ):
            build_append_request("s", events, ANY, None, where="items[2].")

    def test_something_other_than_an_event_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match=r"events\[0\] is a dict"):
            build_append_request("s", [{"type": "A"}], ANY, None)

    def test_an_empty_idempotency_key_is_refused(self):
        with pytest.raises(lethedb.ValidationError, match="idempotency_key is ''"):
            build_append_request("s", Event("E"), ANY, "")

    def test_after_and_from_position_are_exclusive(self):
        with pytest.raises(lethedb.ValidationError, match="give at most one"):
            build_read_all_request(after=3, from_position=4, backwards=False, max_count=None)

    def test_negative_positions_and_versions_are_refused(self):
        with pytest.raises(lethedb.ValidationError, match="after is -1"):
            build_read_all_request(after=-1, from_position=None, backwards=False, max_count=None)
        with pytest.raises(lethedb.ValidationError, match="from_version is -2"):
            build_read_stream_request("s", from_version=-2, backwards=False, max_count=None)

    def test_a_zero_max_count_is_refused_because_zero_means_unlimited_on_the_wire(self):
        with pytest.raises(lethedb.ValidationError, match="max_count is 0"):
            build_read_stream_request("s", from_version=None, backwards=False, max_count=0)


class TestReadRequests:
    def test_read_stream_without_from_version_leaves_it_unset(self):
        request = build_read_stream_request("s", None, backwards=True, max_count=None)
        assert not request.HasField("from_version")
        assert request.backwards
        assert request.max_count == 0

    def test_read_stream_from_version_zero_is_set(self):
        request = build_read_stream_request("s", 0, backwards=False, max_count=5)
        assert request.HasField("from_version")
        assert request.from_version == 0
        assert request.max_count == 5

    def test_read_all_after_is_the_exclusive_start(self):
        request = build_read_all_request(
            after=10, from_position=None, backwards=False, max_count=None
        )
        assert request.WhichOneof("start") == "after_position"
        assert request.after_position == 10

    def test_read_all_from_position_is_the_inclusive_start(self):
        request = build_read_all_request(after=None, from_position=3, backwards=True, max_count=2)
        assert request.WhichOneof("start") == "from_position"

    def test_read_all_with_neither_start_sets_none(self):
        request = build_read_all_request(None, None, backwards=False, max_count=None)
        assert request.WhichOneof("start") is None


class TestResponses:
    def test_append_response_becomes_an_append_result(self):
        result = to_append_result(
            pb.AppendResponse(
                first_position=5,
                last_position=6,
                first_version=0,
                last_version=1,
                recorded_at=99,
                deduplicated=True,
            )
        )
        assert result == lethedb.AppendResult(5, 6, 0, 1, 99, True)

    def test_recorded_event_message_becomes_a_recorded_event(self):
        event_id = uuid.uuid4()
        event = to_recorded_event(
            pb.RecordedEvent(
                position=3,
                stream_id="s",
                stream_version=1,
                event_id=event_id.bytes,
                event_type="E",
                subject_id="subj",
                content_type="application/json",
                recorded_at=5,
                data=b"{}",
                metadata=b"[]",
                redacted=False,
            )
        )
        assert event == RecordedEvent(
            3, "s", 1, event_id, "E", "subj", "application/json", 5, b"{}", b"[]", False
        )


class TestRecordedEvent:
    def test_json_decodes_the_data(self):
        assert _recorded().json() == {"total": 42}

    def test_metadata_json_decodes_the_metadata(self):
        assert _recorded(metadata=b'{"trace": "t"}').metadata_json() == {"trace": "t"}

    def test_empty_metadata_is_none(self):
        assert _recorded(metadata=b"").metadata_json() is None

    def test_json_of_a_redacted_event_says_the_subject_was_forgotten(self):
        event = _recorded(data=b"", redacted=True)
        with pytest.raises(lethedb.SubjectForgotten, match="subject 'subj-1' was forgotten"):
            event.json()
        with pytest.raises(lethedb.SubjectForgotten):
            event.metadata_json()

    def test_json_of_non_json_data_names_the_event_and_content_type(self):
        event = _recorded(data=b"\x00\x01", content_type="application/octet-stream")
        with pytest.raises(ValueError, match=r"position 7.*application/octet-stream"):
            event.json()

    def test_recorded_at_datetime_is_utc(self):
        assert _recorded().recorded_at_datetime == datetime(
            2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC
        )

    def test_repr_does_not_show_data_or_metadata(self):
        text = repr(_recorded(data=b"alice@example.com", metadata=b"ip=1.2.3.4"))
        assert "alice" not in text
        assert "1.2.3.4" not in text
        assert "data=<17 bytes>" in text

    def test_recorded_events_are_immutable(self):
        with pytest.raises(AttributeError):
            _recorded().position = 1


class TestAppendPipelineBuilding:
    def test_an_invalid_item_takes_its_slot_as_a_validation_error_and_is_not_sent(self):
        pipeline = AppendPipeline(
            [
                Append("a", Event("E")),
                Append("b", Event("E"), expected_version=-1),
                Append("c", Event("E")),
            ]
        )
        assert [r.stream_id for r in pipeline.requests()] == ["a", "c"]
        pipeline.acknowledge(pb.AppendResult(ok=pb.AppendResponse(first_position=1)))
        pipeline.acknowledge(pb.AppendResult(ok=pb.AppendResponse(first_position=2)))
        results = pipeline.results()
        assert isinstance(results[1], lethedb.ValidationError)
        assert "items[1].expected_version is -1" in str(results[1])
        assert isinstance(results[0], lethedb.AppendResult)
        assert isinstance(results[2], lethedb.AppendResult)

    def test_something_other_than_an_append_is_raised_at_once(self):
        with pytest.raises(lethedb.ValidationError, match=r"items\[0\] is a tuple"):
            AppendPipeline([("s", Event("E"))])
