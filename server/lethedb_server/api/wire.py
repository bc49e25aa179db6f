"""Counting the events of a serialized append request before protobuf parses it.

Parsing is the expensive step of a hostile append: a 31 MiB AppendBatch of
empty events is 6.5 million messages, and parsing it took 0.8 s and 800 MB
before any handler could look at it. The per-request limits are therefore
checked on the wire bytes first, by walking the protobuf encoding without
building anything. The walk stops as soon as the count passes the limit, so a
hostile request costs at most about as many steps as an allowed one.

Shapes (field numbers from ``proto/lethedb/v1/eventstore.proto``):

* ``AppendRequest`` and ``StreamAppend``: events are field 2;
* ``AppendBatchRequest`` and ``CommitRequest``: appends are field 1, each an
  ``AppendRequest`` or ``StreamAppend``, whose events are field 2.

This module never raises on malformed bytes: it reports them, and the caller
refuses the request as the protobuf parser would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

_LENGTH_DELIMITED: Final = 2
#: Keys (field number << 3 | wire type) of ``appends = 1`` and ``events = 2``.
_APPENDS_KEY: Final = 1 << 3 | _LENGTH_DELIMITED
_EVENTS_KEY: Final = 2 << 3 | _LENGTH_DELIMITED


@dataclass(frozen=True, slots=True)
class WireCount:
    """What a walk found: events, fields walked, and whether it stopped early.

    ``stopped``: more than the allowed events or fields, *events* is a lower
    bound. ``malformed``: the bytes are not a protobuf encoding (the parser
    would refuse them too); *events* is what came before the fault.
    """

    events: int
    fields: int
    stopped: bool
    malformed: bool = False


class _Malformed(Exception):
    """The bytes are not a protobuf encoding."""


class _Exhausted(Exception):
    """More fields than the walk may look at."""


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise _Malformed
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(raw: bytes, pos: int, wire_type: int) -> int:
    """The position after a field's value."""
    if wire_type == 0:
        return _varint(raw, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == _LENGTH_DELIMITED:
        length, pos = _varint(raw, pos)
        return pos + length
    if wire_type == 5:
        return pos + 4
    raise _Malformed  # an end-group key out of place, or an undefined wire type


def _skip_group(raw: bytes, pos: int, number: int, budget: int) -> tuple[int, int]:
    """The position after a group (wire type 3) and the fields walked in it.

    Proto2 groups are never sent by LetheDB clients, but the parser accepts
    an unknown one, so the walk must step over it rather than stop counting.
    """
    open_groups = [number]
    walked = 0
    while open_groups:
        key, pos = _varint(raw, pos)
        walked += 1
        if walked > budget:
            raise _Exhausted
        wire_type = key & 7
        if wire_type == 3:
            open_groups.append(key >> 3)
        elif wire_type == 4:
            if key >> 3 != open_groups.pop():
                raise _Malformed
        else:
            pos = _skip(raw, pos, wire_type)
        if pos > len(raw):
            raise _Malformed
    return pos, walked


def count_events(raw: bytes, *, nested: bool, stop_after: int, max_fields: int) -> WireCount:
    """Count the events in *raw*, stopping once there are more than *stop_after*
    or more than *max_fields* fields were walked.

    *nested*: the request carries appends that carry events (AppendBatch,
    Commit); otherwise it carries events itself (Append, AppendStream).
    A malformed encoding ends the walk (``malformed``).
    """
    events = 0
    fields = 0
    stack = [(0, len(raw), nested)]
    try:
        while stack:
            pos, end, outer = stack.pop()
            # The key of the field counted (or descended into) at this level.
            counted_key = _APPENDS_KEY if outer else _EVENTS_KEY
            while pos < end:
                fields += 1
                if fields > max_fields:
                    return WireCount(events, fields, True)
                if raw[pos] == counted_key:  # the usual one-byte key
                    key, pos = counted_key, pos + 1
                else:  # any other field, or the counted key spelt in more bytes
                    key, pos = _varint(raw, pos)
                if key == counted_key:
                    # One step per event: the length (usually one byte), then past it.
                    first = raw[pos]
                    if first < 0x80:
                        start, length = pos + 1, first
                    else:
                        length, start = _varint(raw, pos)
                    pos = start + length
                    if outer:
                        stack.append((start, min(pos, end), False))
                    else:
                        events += 1
                        if events > stop_after:
                            return WireCount(events, fields, True)
                elif key & 7 == 3:
                    pos, walked = _skip_group(raw, pos, key >> 3, max_fields - fields)
                    fields += walked
                else:
                    pos = _skip(raw, pos, key & 7)
    except _Exhausted:
        return WireCount(events, max_fields + 1, True)
    except (_Malformed, IndexError):
        return WireCount(events, fields, False, malformed=True)
    return WireCount(events, fields, False)
