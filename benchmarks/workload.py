"""The synthetic workload shared by the micro and end-to-end benchmarks.

Events carry 256 random bytes of data and a subject id drawn from a fixed pool,
so every run encrypts under the same number of per-subject keys. Everything is
seeded: two runs send the same bytes.
"""

from __future__ import annotations

import random
import uuid

from lethedb_server.engine.model import AppendCommand, ProposedEvent

PAYLOAD_BYTES = 256
SUBJECTS = 1000
EVENT_TYPE = "BenchEvent"
CONTENT_TYPE = "application/octet-stream"


def subject_pool(count: int = SUBJECTS, seed: int = 1) -> list[str]:
    """Opaque, UUID-like subject ids, as the docs ask real applications to use."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def payload(rng: random.Random, size: int = PAYLOAD_BYTES) -> bytes:
    return rng.randbytes(size)


def proposed_events(
    count: int, subjects: list[str], rng: random.Random, size: int = PAYLOAD_BYTES
) -> tuple[ProposedEvent, ...]:
    """*count* events as the service hands them to the writer (ids left to the server)."""
    return tuple(
        ProposedEvent(b"", EVENT_TYPE, rng.choice(subjects), CONTENT_TYPE, payload(rng, size), b"")
        for _ in range(count)
    )


def command(stream_id: str, count: int, subjects: list[str], rng: random.Random) -> AppendCommand:
    return AppendCommand(stream_id, proposed_events(count, subjects, rng))
