"""Every client-supplied field is checked before it reaches the writer.

A refusal names the field, the limit and what was found. Clear fields are
stored unencrypted, so they are bounded, printable and kept out of the ``$``
namespace the server reserves for itself.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lethedb_server.api import validation
from lethedb_server.api.validation import Limits, Validator, human_size
from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.subscriptions import EventFilter, SubscriptionSpec
from lethedb_server.errors import ValidationError

MiB = 1 << 20
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
SUBJECT = "3f1e2d4c-5b6a-4798-8a1b-2c3d4e5f6a7b"


def event(**changes: Any) -> ProposedEvent:
    good = ProposedEvent(
        event_id=bytes(range(16)),
        event_type="OrderPlaced",
        subject_id=SUBJECT,
        content_type="application/json",
        data=b'{"total": 42}',
        metadata=b"",
    )
    return msgspec.structs.replace(good, **changes)


def append(*events: ProposedEvent, **changes: Any) -> AppendCommand:
    good = AppendCommand(stream_id="order-1", events=events or (event(),), idempotency_key="k-1")
    return msgspec.structs.replace(good, **changes)


@pytest.mark.parametrize(
    ("command", "limits", "message"),
    [
        pytest.param(
            append(stream_id=""), Limits(), "stream_id is empty; it is required", id="empty-stream"
        ),
        pytest.param(
            append(stream_id="s" * 257),
            Limits(),
            "stream_id is 257 bytes; the limit is 256 bytes",
            id="stream-too-long",
        ),
        pytest.param(
            append(stream_id="é" * 129),
            Limits(),
            "stream_id is 258 bytes; the limit is 256 bytes",
            id="stream-too-long-in-utf8-bytes",
        ),
        pytest.param(
            append(stream_id="$erasures"),
            Limits(),
            "stream_id '$erasures' starts with '$', which is reserved for the server",
            id="stream-reserved-prefix",
        ),
        pytest.param(
            append(stream_id="order\x001"),
            Limits(),
            "stream_id contains the control character U+0000 at offset 5",
            id="stream-nul",
        ),
        pytest.param(
            append(stream_id="order\n1"),
            Limits(),
            "stream_id contains the control character U+000A at offset 5",
            id="stream-newline",
        ),
        pytest.param(
            append(stream_id="order\u20281"),
            Limits(),
            "stream_id contains the control character U+2028 at offset 5",
            id="stream-line-separator",
        ),
        pytest.param(
            append(stream_id="order\x851"),
            Limits(),
            "stream_id contains the control character U+0085 at offset 5",
            id="stream-c1-control",
        ),
        pytest.param(
            append(stream_id="order\u202e1"),
            Limits(),
            "stream_id contains U+202E (RIGHT-TO-LEFT OVERRIDE), an invisible format "
            "character, at offset 5",
            id="stream-bidi-override",
        ),
        pytest.param(
            append(stream_id="order\ud8001"),
            Limits(),
            "stream_id contains U+D800, a surrogate code point, at offset 5",
            id="stream-lone-surrogate",
        ),
        pytest.param(
            append(event(event_type="Order\u200bPlaced")),
            Limits(),
            "events[0].event_type contains U+200B (ZERO WIDTH SPACE), an invisible format "
            "character, at offset 5",
            id="event-type-zero-width-space",
        ),
        pytest.param(
            append(event(subject_id="user-\ue000")),
            Limits(),
            "events[0].subject_id contains U+E000, a private-use character, at offset 5",
            id="subject-private-use",
        ),
        pytest.param(
            append(event(content_type="text/\u0378plain")),
            Limits(),
            "events[0].content_type contains U+0378, an unassigned code point, at offset 5",
            id="content-type-unassigned",
        ),
        pytest.param(
            append(idempotency_key="\ufeffk-1"),
            Limits(),
            "idempotency_key contains U+FEFF (ZERO WIDTH NO-BREAK SPACE), an invisible "
            "format character, at offset 0",
            id="idempotency-key-byte-order-mark",
        ),
        pytest.param(
            append(stream_id=" order-1"),
            Limits(),
            "stream_id ' order-1' has leading or trailing white space",
            id="stream-leading-space",
        ),
        pytest.param(
            AppendCommand("order-1", ()),
            Limits(),
            "events is empty; an append needs at least one event",
            id="no-events",
        ),
        pytest.param(
            append(event(), event(), event()),
            Limits(max_events_per_append=2),
            "events has 3 events; the limit is 2 per append",
            id="too-many-events",
        ),
        pytest.param(
            append(idempotency_key="k" * 129),
            Limits(),
            "idempotency_key is 129 bytes; the limit is 128 bytes",
            id="idempotency-key-too-long",
        ),
        pytest.param(
            append(idempotency_key="k\t1"),
            Limits(),
            "idempotency_key contains the control character U+0009 at offset 1",
            id="idempotency-key-tab",
        ),
        pytest.param(
            append(event(event_id=b"12345")),
            Limits(),
            "events[0].event_id is 5 bytes; it must be a UUID's 16 bytes or empty",
            id="event-id-short",
        ),
        pytest.param(
            append(event(), event(event_id=bytes(17))),
            Limits(),
            "events[1].event_id is 17 bytes; it must be a UUID's 16 bytes or empty",
            id="event-id-long-in-second-event",
        ),
        pytest.param(
            append(event(event_type="")),
            Limits(),
            "events[0].event_type is empty; it is required",
            id="event-type-empty",
        ),
        pytest.param(
            append(event(event_type="$subject.forgotten")),
            Limits(),
            "events[0].event_type '$subject.forgotten' starts with '$'",
            id="event-type-reserved",
        ),
        pytest.param(
            append(event(event_type="t" * 257)),
            Limits(),
            "events[0].event_type is 257 bytes; the limit is 256 bytes",
            id="event-type-too-long",
        ),
        pytest.param(
            append(event(subject_id="$store")),
            Limits(),
            "events[0].subject_id '$store' starts with '$'",
            id="subject-reserved",
        ),
        pytest.param(
            append(event(subject_id="s" * 129)),
            Limits(),
            "events[0].subject_id is 129 bytes; the limit is 128 bytes",
            id="subject-too-long",
        ),
        pytest.param(
            append(event(subject_id="alice@example.com")),
            Limits(subject_id_pattern=UUID_PATTERN),
            "events[0].subject_id 'alice@example.com' does not match the required pattern",
            id="subject-pattern-mismatch",
        ),
        pytest.param(
            append(event(subject_id=SUBJECT + "0")),
            Limits(subject_id_pattern=UUID_PATTERN),
            "events[0].subject_id",
            id="subject-pattern-must-match-in-full",
        ),
        pytest.param(
            append(event(content_type="text/plain\r\n")),
            Limits(),
            "events[0].content_type contains the control character U+000D at offset 10",
            id="content-type-control",
        ),
        pytest.param(
            append(event(data=bytes(2 * MiB))),
            Limits(),
            "events[0].data is 2 MiB; the limit is 1 MiB per event",
            id="data-over-limit",
        ),
        pytest.param(
            append(event(), event(data=bytes(MiB), metadata=bytes(MiB // 2))),
            Limits(),
            "events[1].data and metadata is 1.5 MiB; the limit is 1 MiB per event",
            id="data-and-metadata-over-limit",
        ),
        pytest.param(
            append(*[event(data=bytes(MiB // 2)) for _ in range(3)]),
            Limits(max_append_bytes=MiB),
            "the append is 1.5 MiB (every field of its 3 events plus 128 bytes each); "
            "the limit is 1 MiB (max_append_bytes)",
            id="append-over-limit",
        ),
        pytest.param(
            # No data: 4,000 events of names and ids, 1.5 MiB counted.
            append(*[event(data=b"", event_type="T" * 200) for _ in range(4000)]),
            Limits(max_append_bytes=MiB),
            "the append is 1.5 MiB (every field of its 4000 events plus 128 bytes each)",
            id="clear-fields-count-against-the-append-limit",
        ),
    ],
)
def test_bad_field_is_refused_with_a_message_naming_it(
    command: AppendCommand, limits: Limits, message: str
):
    with pytest.raises(ValidationError) as refused:
        Validator(limits).check_append(command)

    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("command", "limits"),
    [
        pytest.param(append(), Limits(), id="typical"),
        pytest.param(append(event(event_id=b"")), Limits(), id="event-id-left-to-the-server"),
        pytest.param(append(event(subject_id="")), Limits(), id="subject-less-event"),
        pytest.param(append(idempotency_key=""), Limits(), id="no-idempotency-key"),
        pytest.param(append(event(content_type="")), Limits(), id="no-content-type"),
        pytest.param(append(stream_id="s" * 256), Limits(), id="stream-id-at-the-limit"),
        pytest.param(append(stream_id="ünïcødé-stream"), Limits(), id="non-ascii-stream-id"),
        pytest.param(append(stream_id="a$b"), Limits(), id="dollar-inside-a-name"),
        pytest.param(append(stream_id="заказ-1 注文 🎉"), Limits(), id="letters-and-symbols"),
        pytest.param(append(stream_id="שלום-1"), Limits(), id="right-to-left-script"),
        pytest.param(append(event(data=bytes(MiB))), Limits(), id="data-at-the-limit"),
        pytest.param(
            append(*[event() for _ in range(3)]),
            Limits(max_events_per_append=3),
            id="events-at-the-limit",
        ),
        pytest.param(
            append(event(subject_id=SUBJECT)),
            Limits(subject_id_pattern=UUID_PATTERN),
            id="subject-matching-the-pattern",
        ),
        pytest.param(
            append(event(subject_id="")),
            Limits(subject_id_pattern=UUID_PATTERN),
            id="subject-less-event-under-a-pattern",
        ),
    ],
)
def test_good_command_passes(command: AppendCommand, limits: Limits):
    Validator(limits).check_append(command)


def test_default_validator_uses_the_default_limits():
    assert Validator().limits == Limits()


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (MiB, "1 MiB"),
        (int(2.1 * MiB), "2.1 MiB"),
        (16 * MiB, "16 MiB"),
        (3 << 30, "3 GiB"),
    ],
)
def test_sizes_in_messages_are_human_readable(size: int, text: str):
    assert human_size(size) == text


def test_a_refused_name_is_refused_again_with_the_field_of_the_new_request():
    validator = Validator(Limits(subject_id_pattern=UUID_PATTERN))
    bad = event(subject_id="alice@example.com")

    with pytest.raises(ValidationError, match=r"events\[0\]\.subject_id"):
        validator.check_append(append(bad))
    with pytest.raises(ValidationError, match=r"events\[1\]\.subject_id"):
        validator.check_append(append(event(), bad))


def test_names_remembered_as_valid_are_still_checked_under_each_validators_limits():
    lenient = Validator(Limits())
    strict = Validator(Limits(subject_id_pattern=UUID_PATTERN))
    lenient.check_append(append(event(subject_id="alice")))

    with pytest.raises(ValidationError, match="does not match the required pattern"):
        strict.check_append(append(event(subject_id="alice")))


def test_the_memory_of_valid_names_is_bounded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(validation, "VALID_NAMES_CACHED", 3)
    validator = Validator()
    for i in range(10):
        validator.check_append(append(event(subject_id=f"subject-{i}")))

    assert all(len(known) <= 3 for known in validator._valid.values())


@pytest.mark.parametrize(
    ("check", "message"),
    [
        pytest.param(
            lambda v: v.check_subscription(SubscriptionSpec(group="billing\u2066")),
            "group contains U+2066 (LEFT-TO-RIGHT ISOLATE), an invisible format character",
            id="group",
        ),
        pytest.param(
            lambda v: v.check_subscription(SubscriptionSpec(group="g", member_id="m\u00ad")),
            "member_id contains U+00AD (SOFT HYPHEN), an invisible format character",
            id="member-id",
        ),
        pytest.param(
            lambda v: v.check_subscription(
                SubscriptionSpec(filter=EventFilter(stream_prefixes=("order\u202e",)))
            ),
            "filter.stream_prefixes[0] contains U+202E (RIGHT-TO-LEFT OVERRIDE)",
            id="filter-term",
        ),
        pytest.param(
            lambda v: validation.check_name("gdpr\u200e", "reason", 128),
            "reason contains U+200E (LEFT-TO-RIGHT MARK), an invisible format character",
            id="reason",
        ),
    ],
)
def test_invisible_characters_are_refused_in_every_clear_name(check: Any, message: str):
    with pytest.raises(ValidationError) as refused:
        check(Validator())

    assert message in str(refused.value)


def test_a_name_refused_for_an_invisible_character_is_never_remembered_as_valid():
    validator = Validator()
    for _ in range(2):
        with pytest.raises(ValidationError, match="U\\+202E"):
            validator.check_append(append(event(event_type="Paid\u202e")))


def test_a_request_over_the_per_call_event_limit_names_the_limit_and_its_size():
    with pytest.raises(ValidationError) as refused:
        Validator().check_request(10_001, 31 * MiB, exact=False)
    assert str(refused.value).startswith(
        "the request has more than 10000 events in 31 MiB; the limit is 10000 events per "
        "call (max_request_events)"
    )


def test_a_request_over_the_per_call_byte_limit_counts_an_overhead_per_event():
    Validator(Limits(max_request_bytes=MiB)).check_request(100, MiB - 100 * 128)
    with pytest.raises(ValidationError) as refused:
        Validator(Limits(max_request_bytes=MiB)).check_request(100, MiB - 100 * 128 + 1)
    assert "plus 128 bytes for each of its 100 events" in str(refused.value)
    assert "(max_request_bytes)" in str(refused.value)
