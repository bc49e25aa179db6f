"""Event ids the SDK draws for an append are random version-4 UUIDs, one per event."""

from __future__ import annotations

import uuid

from lethedb import ANY, Event
from lethedb._requests import build_append_request, random_event_ids


def test_drawn_ids_are_distinct_version_4_uuids():
    ids = random_event_ids(1000)
    assert len(set(ids)) == 1000
    for raw in ids:
        drawn = uuid.UUID(bytes=raw)
        assert drawn.version == 4
        assert drawn.variant == uuid.RFC_4122


def test_events_without_an_id_get_one_each_and_given_ids_are_kept():
    given = uuid.uuid4()
    request = build_append_request(
        "orders-1", [Event("Placed"), Event("Paid", event_id=given), Event("Shipped")], ANY, None
    )
    ids = [e.event_id for e in request.events]
    assert ids[1] == given.bytes
    assert len({ids[0], ids[2], given.bytes}) == 3
    assert all(uuid.UUID(bytes=i).version == 4 for i in (ids[0], ids[2]))


def test_with_a_caller_key_the_server_draws_the_ids():
    request = build_append_request("orders-1", [Event("Placed")] * 3, ANY, "order-1-placed")
    assert [e.event_id for e in request.events] == [b""] * 3
