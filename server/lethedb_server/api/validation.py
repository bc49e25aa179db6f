"""Validation of every client-supplied field before it reaches the writer.

A request that fails here is refused with a message that names the field, the
limit and what was found (``events[3].data is 2.1 MiB; the limit is 1 MiB``)
and changes nothing. Clear fields are stored unencrypted, so they are held to
strict rules: no control characters, no invisible or meaningless code points
(format characters such as bidirectional overrides, private-use, surrogate and
unassigned code points: a name must read the same to every person and tool
that shows it), bounded length, and the ``$`` prefix is reserved for the
server's own streams, types and subjects.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lethedb_contract import DEFAULT_MAX_REQUEST_EVENTS, MAX_APPENDS_PER_BATCH, RESERVED_PREFIX
from lethedb_server.engine.model import (
    EVENT_OVERHEAD,
    AppendCommand,
    CommitCommand,
    ProposedEvent,
    human_size,
)
from lethedb_server.engine.subscriptions import SubscriptionSpec
from lethedb_server.errors import ValidationError

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: Unicode categories refused in a clear name, with what to call them in a message.
#: Cf holds the bidirectional controls (U+202A-U+202E, U+2066-U+2069), zero-width
#: characters and the byte-order mark: they change how a name is displayed, or hide
#: in it, so two names that look the same could name different streams.
_INVISIBLE = {
    "Cf": "an invisible format character",
    "Co": "a private-use character",
    "Cs": "a surrogate code point",
    "Cn": "an unassigned code point",
}
EVENT_ID_SIZE = 16


@dataclass(frozen=True)
class Limits:
    max_stream_id_bytes: int = 256
    max_event_type_bytes: int = 256
    max_subject_id_bytes: int = 128
    max_content_type_bytes: int = 128
    max_idempotency_key_bytes: int = 128
    max_event_bytes: int = 1 << 20
    max_events_per_append: int = 10_000
    #: Every field of an append's events plus EVENT_OVERHEAD bytes each.
    max_append_bytes: int = 16 << 20
    #: Events in one call (Append, Commit, AppendBatch, one AppendStream
    #: message), counted on the wire before the request is parsed.
    max_request_events: int = DEFAULT_MAX_REQUEST_EVENTS
    #: Bytes of one call: its encoded size plus EVENT_OVERHEAD per event.
    max_request_bytes: int = 16 << 20
    #: When set, subject ids must match it in full (e.g. a UUID pattern), so
    #: nobody can put an e-mail address into a clear field by mistake.
    subject_id_pattern: str | None = None


def check_name(value: str, field: str, max_bytes: int, *, required: bool = True) -> None:
    """A clear-text identifier: bounded, printable, not in the reserved namespace."""
    if not value:
        if required:
            raise ValidationError(f"{field} is empty; it is required")
        return
    # The common case, ASCII, is checked cheaply (this runs for every field of
    # every event): one byte a character. str.isprintable() is false for every
    # "Other" (C*) and "Separator" (Z*) character but the space, so a printable
    # name needs no closer look.
    size = len(value) if value.isascii() else _utf8_size(value)
    if size > max_bytes:
        raise ValidationError(f"{field} is {size} bytes; the limit is {max_bytes} bytes")
    if value[0] == RESERVED_PREFIX:
        raise ValidationError(
            f"{field} {value[:40]!r} starts with {RESERVED_PREFIX!r}, which is reserved for "
            "the server"
        )
    if not value.isprintable():
        _check_characters(value, field)
    if value[0].isspace() or value[-1].isspace():
        raise ValidationError(f"{field} {value[:40]!r} has leading or trailing white space")


#: Most stream prefixes (and, separately, event types) in one subscription filter.
MAX_FILTER_TERMS = 100
MAX_GROUP_BYTES = 128


def check_group(group: str, field: str = "group", *, required: bool = True) -> None:
    """A consumer-group name: stored in clear and kept for ever, so held to the rules
    of stream ids (bounded, printable, no reserved ``$`` prefix, no outer white space)."""
    check_name(group, field, MAX_GROUP_BYTES, required=required)


def check_append_batch(count: int) -> None:
    """An AppendBatch carries 1 to MAX_APPENDS_PER_BATCH appends; else nothing is written."""
    if count == 0:
        raise ValidationError("appends is empty; an AppendBatch needs at least one append")
    if count > MAX_APPENDS_PER_BATCH:
        raise ValidationError(
            f"appends has {count} appends; the limit is {MAX_APPENDS_PER_BATCH} per "
            "AppendBatch: split it into several calls"
        )


def _utf8_size(value: str) -> int:
    """Bytes of *value* in UTF-8; a lone surrogate (possible in-process only) counts 3."""
    return len(value.encode("utf-8", "surrogatepass"))


def _check_characters(value: str, field: str) -> None:
    """Refuse control characters and the code points of :data:`_INVISIBLE`."""
    match = _CONTROL.search(value)
    if match:
        raise ValidationError(
            f"{field} contains the control character U+{ord(match.group()):04X} "
            f"at offset {match.start()}"
        )
    for offset, char in enumerate(value):
        kind = _INVISIBLE.get(unicodedata.category(char))
        if kind is not None:
            name = unicodedata.name(char, "")
            label = f"U+{ord(char):04X}" + (f" ({name})" if name else "")
            raise ValidationError(f"{field} contains {label}, {kind}, at offset {offset}")


def _check_filter_term(value: str, field: str, max_bytes: int) -> None:
    if not value:
        raise ValidationError(f"{field} is empty; leave the list empty to match everything")
    size = _utf8_size(value)
    if size > max_bytes:
        raise ValidationError(f"{field} is {size} bytes; the limit is {max_bytes} bytes")
    if not value.isprintable():
        _check_characters(value, field)


class Validator:
    """Checks commands against the configured :class:`Limits`."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        pattern = self.limits.subject_id_pattern
        self._subject_re = re.compile(pattern) if pattern else None
        # Event names found valid before, by kind: a store sees the same few
        # types and the same subjects again and again, and each check is a
        # regex search plus an encode. Validity depends only on the value and
        # the limits, which never change for a Validator, so only the field
        # label of an error message would differ; bounded by clearing.
        # Keyed by the event field the names come from.
        self._valid: dict[str, set[str]] = {
            "event_type": set(),
            "subject_id": set(),
            "content_type": set(),
        }

    def _check_event_type(self, value: str, field: str) -> None:
        check_name(value, field, self.limits.max_event_type_bytes)

    def _check_event_subject(self, value: str, field: str) -> None:
        self.check_subject_id(value, field, required=False)

    def _check_content_type(self, value: str, field: str) -> None:
        check_name(value, field, self.limits.max_content_type_bytes, required=False)

    def check_stream_id(self, stream_id: str, field: str = "stream_id") -> None:
        check_name(stream_id, field, self.limits.max_stream_id_bytes)

    def check_subject_id(self, subject_id: str, field: str, *, required: bool) -> None:
        check_name(subject_id, field, self.limits.max_subject_id_bytes, required=required)
        if subject_id and self._subject_re and not self._subject_re.fullmatch(subject_id):
            raise ValidationError(
                f"{field} {subject_id[:40]!r} does not match the required pattern "
                f"{self._subject_re.pattern!r}; subject ids must be opaque (UUID-like)"
            )

    def check_append(self, command: AppendCommand) -> None:
        limits = self.limits
        self.check_stream_id(command.stream_id)
        count = len(command.events)
        if count == 0:
            raise ValidationError("events is empty; an append needs at least one event")
        if count > limits.max_events_per_append:
            raise ValidationError(
                f"events has {count} events; the limit is {limits.max_events_per_append} per append"
            )
        check_name(
            command.idempotency_key,
            "idempotency_key",
            limits.max_idempotency_key_bytes,
            required=False,
        )
        total = self._check_events(command.events)
        total += len(command.stream_id) + len(command.idempotency_key)
        if total > limits.max_append_bytes:
            raise ValidationError(
                f"the append is {human_size(total)} (every field of its {count} events "
                f"plus {EVENT_OVERHEAD} bytes each); the limit is "
                f"{human_size(limits.max_append_bytes)} (max_append_bytes)"
            )

    def check_commit(self, command: CommitCommand) -> None:
        """A multi-stream commit: each part like an append, limits over the whole."""
        if not command.appends:
            raise ValidationError("appends is empty; a commit needs at least one stream")
        check_name(
            command.idempotency_key,
            "idempotency_key",
            self.limits.max_idempotency_key_bytes,
            required=False,
        )
        seen: set[str] = set()
        for index, part in enumerate(command.appends):
            try:
                self.check_append(part)
            except ValidationError as exc:
                raise ValidationError(f"appends[{index}].{exc}") from None
            if part.stream_id in seen:
                raise ValidationError(
                    f"appends[{index}].stream_id {part.stream_id!r} appears twice; "
                    "put all of a stream's events in one part"
                )
            seen.add(part.stream_id)
        events = command.event_count()
        if events > self.limits.max_events_per_append:
            raise ValidationError(
                f"the commit has {events} events; the limit is "
                f"{self.limits.max_events_per_append} per commit (max_events_per_append)"
            )
        size = command.size()
        if size > self.limits.max_append_bytes:
            raise ValidationError(
                f"the commit is {human_size(size)} (every field of its {events} events plus "
                f"{EVENT_OVERHEAD} bytes each); the limit is "
                f"{human_size(self.limits.max_append_bytes)} (max_append_bytes)"
            )

    def check_request(self, events: int, encoded: int, *, exact: bool = True) -> None:
        """The per-call limits: events and bytes of one whole request.

        *encoded* is the request's serialized size; its size against the limit
        adds EVENT_OVERHEAD per event. Checked on the wire bytes before the
        request is parsed (see :mod:`lethedb_server.api.wire`), so an oversized call
        costs no parsing, no conversion and no writer time. *exact* false: the
        count stopped early, *events* is a lower bound.
        """
        limits = self.limits
        if events > limits.max_request_events:
            count = f"{events} events" if exact else f"more than {limits.max_request_events} events"
            raise ValidationError(
                f"the request has {count} in {human_size(encoded)}; the limit is "
                f"{limits.max_request_events} events per call (max_request_events): "
                "split it into several calls"
            )
        size = encoded + events * EVENT_OVERHEAD
        if size > limits.max_request_bytes:
            raise ValidationError(
                f"the request is {human_size(size)} ({human_size(encoded)} encoded, plus "
                f"{EVENT_OVERHEAD} bytes for each of its {events} events); the limit is "
                f"{human_size(limits.max_request_bytes)} per call (max_request_bytes): "
                "split it into several calls"
            )

    def check_subscription(self, spec: SubscriptionSpec) -> None:
        """Group, member and filter of a Subscribe request.

        Filter terms may name the server's own ``$`` streams and types (a
        projection may follow ``$erasures``), so they are checked for size
        and control characters only.
        """
        check_group(spec.group, required=False)
        if spec.member_id and not spec.group:
            raise ValidationError("member_id is set but group is empty; a member needs a group")
        check_name(spec.member_id, "member_id", MAX_GROUP_BYTES, required=False)
        selector = spec.filter
        if selector is None:
            return
        terms = (
            ("filter.stream_prefixes", selector.stream_prefixes, self.limits.max_stream_id_bytes),
            ("filter.event_types", sorted(selector.event_types), self.limits.max_event_type_bytes),
        )
        for field, values, max_bytes in terms:
            if len(values) > MAX_FILTER_TERMS:
                raise ValidationError(
                    f"{field} has {len(values)} entries; the limit is {MAX_FILTER_TERMS}"
                )
            for index, value in enumerate(values):
                _check_filter_term(value, f"{field}[{index}]", max_bytes)
        self.check_subject_id(selector.subject_id, "filter.subject_id", required=False)

    def _check_events(self, events: Sequence[ProposedEvent]) -> int:
        """Check every event of an append; return their size (ProposedEvent.size, summed).

        The events of an append mostly repeat a few types, content types and
        subjects, so each distinct name is checked once, and an error names
        the first event that carries it: per event this leaves a size and a
        few dictionary lookups.
        """
        limits = self.limits
        types: dict[str, int] = {}
        subjects: dict[str, int] = {}
        content_types: dict[str, int] = {}
        total = 0
        for index, event in enumerate(events):
            if event.event_id and len(event.event_id) != EVENT_ID_SIZE:
                raise ValidationError(
                    f"events[{index}].event_id is {len(event.event_id)} bytes; it must be a "
                    "UUID's 16 bytes or empty"
                )
            types.setdefault(event.event_type, index)
            subjects.setdefault(event.subject_id, index)
            content_types.setdefault(event.content_type, index)
            size = len(event.data) + len(event.metadata)
            if size > limits.max_event_bytes:
                part = "data" if not event.metadata else "data and metadata"
                raise ValidationError(
                    f"events[{index}].{part} is {human_size(size)}; the limit is "
                    f"{human_size(limits.max_event_bytes)} per event"
                )
            total += (
                size
                + len(event.event_id)
                + len(event.event_type)
                + len(event.subject_id)
                + len(event.content_type)
                + EVENT_OVERHEAD
            )
        checks: tuple[tuple[str, dict[str, int], Callable[[str, str], None]], ...] = (
            ("event_type", types, self._check_event_type),
            ("subject_id", subjects, self._check_event_subject),
            ("content_type", content_types, self._check_content_type),
        )
        for name, first_index, check in checks:
            known = self._valid[name]
            for value, index in first_index.items():
                if value not in known:
                    check(value, f"events[{index}].{name}")
                    _remember_valid(known, value)
        return total


#: Names remembered as valid per kind before the set starts over.
VALID_NAMES_CACHED = 65_536


def _remember_valid(known: set[str], name: str) -> None:
    if len(known) >= VALID_NAMES_CACHED:
        known.clear()
    known.add(name)
