"""Micro benchmarks of the write and read hot paths, below gRPC.

Each benchmark times exactly what the server does per event, per command or
per page, with the production functions: the writer's seal step (msgpack
payload, associated data, AES-256-GCM, record encode, chain hash), the
reader's open step, the service's parse + convert + validate of a request,
a group-committed append through the writer thread (real
LMDB, real fsync) and a 512-event page read. They are for comparing a change
against its parent on the same machine, not for absolute claims; the
end-to-end tool (``python -m benchmarks.e2e``) gives the ratios the design's
targets ask for.
"""

from __future__ import annotations

import random

import pytest

from benchmarks import workload
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.api import messages
from lethedb_server.api.validation import Validator
from lethedb_server.crypto.aead import AESGCM, new_key, new_nonce
from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.reader import DEFAULT_PAGE
from lethedb_server.engine.record_codec import RecordSealer
from lethedb_server.engine.store import Store
from lethedb_server.storage import codec

STORE_ID = bytes(16)
EVENT_ID = bytes(range(16))
SUBJECT = "3f0b6c1e-9d3a-4c55-8a31-0d6e2f7b9a10"
STREAM = "order-42"


def test_seal_one_256_byte_event(benchmark, rng: random.Random):
    """The per-event work of an append without the LMDB puts, with the writer's sealer."""
    aead = AESGCM(new_key())
    data = workload.payload(rng)
    event = ProposedEvent(EVENT_ID, workload.EVENT_TYPE, SUBJECT, workload.CONTENT_TYPE, data, b"")
    seal = RecordSealer(STORE_ID, STREAM, 1_700_000_000_000_000_000).seal

    def seal_event() -> tuple[bytes, bytes]:
        return seal(codec.GENESIS_HASH, 43, 7, event, EVENT_ID, 1, aead, new_nonce())

    value, _ = benchmark(seal_event)
    assert len(value) > len(data) + codec.HASH_SIZE


def test_aes_gcm_encrypt_only_256_bytes(benchmark, rng: random.Random):
    """The floor under the seal step: the cipher alone."""
    aead = AESGCM(new_key())
    data, nonce = workload.payload(rng), new_nonce()
    benchmark(aead.encrypt, nonce, data, b"aad")


def test_open_one_256_byte_event(benchmark, store: Store, subjects: list[str], rng: random.Random):
    """Decode + decrypt + envelope of one stored event, as the reader does per event."""
    result = store.writer.append(workload.command(STREAM, 1, subjects, rng))
    [(position, value)] = store.log.read_all_page(result.first_position, backwards=False, limit=1)
    event = benchmark(store.reader.open, position, value)
    assert len(event.data) == workload.PAYLOAD_BYTES


def test_parse_convert_validate_100_event_request(
    benchmark, subjects: list[str], rng: random.Random
):
    """The service's work on the event loop before the writer sees a request."""
    raw = pb.AppendRequest(
        stream_id=STREAM,
        events=[
            pb.ProposedEvent(
                event_type=e.event_type,
                subject_id=e.subject_id,
                content_type=e.content_type,
                data=e.data,
            )
            for e in workload.proposed_events(100, subjects, rng)
        ],
    ).SerializeToString()
    validator = Validator()

    def handle() -> AppendCommand:
        command = messages.append_command(pb.AppendRequest.FromString(raw))
        validator.check_append(command)
        return command

    assert len(benchmark(handle).events) == 100
    benchmark.extra_info["events_per_round"] = 100


@pytest.mark.parametrize("events", [1, 100])
def test_append_through_writer(
    benchmark, store: Store, subjects: list[str], rng: random.Random, events: int
):
    """One command at a time: seal, LMDB puts, one commit with fsync, future resolved."""
    commands = [workload.command(f"stream-{i}", events, subjects, rng) for i in range(64)]
    for command in commands:  # create every subject's key before timing
        store.writer.append(command)
    count = iter(range(1 << 62))

    def append_one() -> None:
        store.writer.append(commands[next(count) % len(commands)])

    benchmark.pedantic(append_one, rounds=200 if events == 1 else 100, warmup_rounds=5)
    benchmark.extra_info["events_per_round"] = events


@pytest.fixture
def filled_store(store: Store, subjects: list[str], rng: random.Random) -> Store:
    for i in range(4 * DEFAULT_PAGE // 100 + 1):
        store.writer.append(workload.command(f"stream-{i}", 100, subjects, rng))
    return store


def test_read_all_page_of_512_events(benchmark, filled_store: Store):
    """One read transaction, decode and decrypt of 512 events (a server read page)."""
    page = benchmark(filled_store.reader.read_all, 1, backwards=False, limit=DEFAULT_PAGE)
    assert len(page) == DEFAULT_PAGE
    benchmark.extra_info["events_per_round"] = DEFAULT_PAGE


def test_read_raw_page_of_512_events(benchmark, filled_store: Store):
    """The LMDB share of the page read: raw values, nothing decrypted."""
    page = benchmark(filled_store.log.read_all_page, 1, backwards=False, limit=DEFAULT_PAGE)
    assert len(page) == DEFAULT_PAGE
