"""SIGKILL the server under load, again and again; nothing acknowledged is ever lost.

Jepsen-style: many rounds on one data directory (the log keeps growing across
them). In every round 8 writer threads append with idempotency keys, some
several events at once, some to several streams in one Commit, to a few shared
streams; the server is killed with SIGKILL at a moment drawn from a seeded
random generator. Then, for every round:

* offline, before anything restarts: the hash chain verifies up to the head
  recorded on disk, which is at or past every acknowledged position (and
  every tenth round, and at the end, the whole log is verified from genesis
  as ``lethedb verify --data`` does, every authentication tag included);
* after the restart: every acknowledged append is in the log exactly once, at
  the positions and versions its acknowledgement named; every unacknowledged
  one is there completely or not at all; no event appears that nobody sent;
  every stream's versions are contiguous from 0;
* retrying every unacknowledged request (same key, the same bytes) applies it
  at most once: it is deduplicated if it had reached the disk and written
  once if it had not.

The events carry their idempotency key in their data, which is how the test
maps the log back to the requests.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.storage import codec
from lethedb_server.storage.log import LogStore
from tests.faults.support import EVENT_STORE, raw_unary, read_all, verify_offline
from tests.integration.serverproc import ServerProcess

ROUNDS = 50
WRITERS = 8
SEED = 20240607
STREAMS = [f"kill9-s{i}" for i in range(6)]
#: When the kill lands, counted from the first acknowledgement of the round.
KILL_AFTER_S = (0.0, 0.35)
#: Rounds between full offline verifications (chain and every tag, from genesis).
FULL_VERIFY_EVERY = 10


@dataclass
class Attempt:
    """One request a writer sent, byte for byte, and what came back."""

    key: str
    method: str  # "Append" or "Commit"
    raw: bytes
    parts: list[tuple[str, int]]  # (stream, number of events) per stream
    acked: list[pb.AppendResponse] | None = None

    @property
    def events(self) -> int:
        return sum(count for _, count in self.parts)


@dataclass
class Model:
    """What the test knows: every request, and what it has checked of the log."""

    attempts: dict[str, Attempt] = field(default_factory=dict)
    checked_head: int = 0
    next_version: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # key -> [(position, stream, version, part index, event index)]
    seen: dict[str, list[tuple[int, str, int, int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def observe(self, events: list[pb.RecordedEvent]) -> None:
        """Take in the log after ``checked_head``; check order and stream contiguity."""
        for event in events:
            assert event.position == self.checked_head + 1, "a position is missing from the log"
            self.checked_head = event.position
            assert event.stream_version == self.next_version[event.stream_id], (
                f"stream {event.stream_id} jumps to version {event.stream_version} "
                f"at position {event.position}; expected {self.next_version[event.stream_id]}"
            )
            self.next_version[event.stream_id] += 1
            key, part, index = event.data.decode().rsplit("/", 2)
            assert key in self.attempts, f"position {event.position} holds an event nobody sent"
            self.seen[key].append(
                (event.position, event.stream_id, event.stream_version, int(part), int(index))
            )

    def check_applied_whole(self, attempt: Attempt) -> bool:
        """Whether the attempt is in the log; raise if it is there partly or twice."""
        seen = self.seen.get(attempt.key, [])
        if not seen:
            return False
        assert len(seen) == attempt.events, f"{attempt.key}: {len(seen)} of {attempt.events}"
        for part, (stream, count) in enumerate(attempt.parts):
            mine = [s for s in seen if s[3] == part]
            assert [s[4] for s in mine] == list(range(count)), f"{attempt.key} part {part}"
            assert {s[1] for s in mine} == {stream}
            positions = [s[0] for s in mine]
            assert positions == list(range(positions[0], positions[0] + count)), (
                f"{attempt.key}: the events of one append are not contiguous"
            )
        # A Commit is one transaction: all its parts are contiguous in the log.
        everything = sorted(s[0] for s in seen)
        assert everything == list(range(everything[0], everything[0] + len(everything)))
        return True

    def check_acknowledged(self, attempt: Attempt) -> None:
        """Present exactly once, where the acknowledgement said."""
        assert attempt.acked is not None
        assert self.check_applied_whole(attempt), f"acknowledged {attempt.key} was lost"
        seen = self.seen[attempt.key]
        for part, response in enumerate(attempt.acked):
            mine = [s for s in seen if s[3] == part]
            assert [s[0] for s in mine] == list(
                range(response.first_position, response.last_position + 1)
            )
            assert [s[2] for s in mine] == list(
                range(response.first_version, response.last_version + 1)
            )


class ChainWalk:
    """The hash chain on disk, checked incrementally from round to round.

    Each round walks only the records written since the last walk, starting
    from the last checked record, whose stored hash must not have changed.
    (The full walk, with every authentication tag, is :func:`verify_offline`,
    run every few rounds; the reads after each restart open every new record.)
    """

    def __init__(self) -> None:
        self.position = 0
        self.chain = codec.GENESIS_HASH

    def walk(self, data: Path) -> int:
        """Check the records after the last walk; return the head on disk."""
        log = LogStore(data / "log")
        try:
            meta = log.meta
            start = max(self.position, 1)
            expected = self.position if self.position else 1
            while expected <= meta.last_position:
                page = log.read_all_page(start, backwards=False, limit=4096)
                assert page, f"the log ends before its head {meta.last_position}"
                for position, value in page:
                    assert position == expected, f"position {expected} is missing"
                    body, stored = codec.split_record(value)
                    if position == self.position:
                        assert stored == self.chain, f"record {position} changed on disk"
                    else:
                        assert codec.chain_hash(self.chain, body) == stored, (
                            f"the chain breaks at position {position}"
                        )
                        self.chain = stored
                    self.position = position
                    expected = position + 1
                start = expected
            assert self.chain == meta.chain_head, "the log meta names another chain head"
            return meta.last_position
        finally:
            log.close()


def _request(rng: random.Random, key: str) -> tuple[str, bytes, list[tuple[str, int]]]:
    """A random Append (one to three events) or, now and then, a two-stream Commit."""

    def events(part: int, count: int) -> list[pb.ProposedEvent]:
        subject = rng.choice(["", "subj-a", "subj-b", f"subj-{rng.randrange(10_000)}"])
        return [
            pb.ProposedEvent(
                event_type="Killed",
                subject_id=subject,
                content_type="text/plain",
                data=f"{key}/{part}/{i}".encode(),
            )
            for i in range(count)
        ]

    if rng.random() < 0.15:
        streams = rng.sample(STREAMS, 2)
        counts = [rng.randint(1, 3) for _ in streams]
        request = pb.CommitRequest(
            idempotency_key=key,
            appends=[
                pb.StreamAppend(stream_id=s, events=events(part, n))
                for part, (s, n) in enumerate(zip(streams, counts, strict=True))
            ],
        )
        return "Commit", request.SerializeToString(), list(zip(streams, counts, strict=True))
    stream, count = rng.choice(STREAMS), rng.randint(1, 3)
    request = pb.AppendRequest(stream_id=stream, idempotency_key=key, events=events(0, count))
    return "Append", request.SerializeToString(), [(stream, count)]


def _responses(method: str, raw: bytes) -> tuple[list[pb.AppendResponse], bool]:
    if method == "Commit":
        commit = pb.CommitResponse.FromString(raw)
        return list(commit.results), commit.deduplicated
    append = pb.AppendResponse.FromString(raw)
    return [append], append.deduplicated


class Round:
    """One round of load: writer threads until the kill, recording every attempt."""

    def __init__(self, number: int, channel: grpc.Channel, model: Model) -> None:
        self.number = number
        self.calls = {m: raw_unary(channel, EVENT_STORE + m) for m in ("Append", "Commit")}
        self.model = model
        self.killed = threading.Event()
        self.first_ack = threading.Event()
        self.unexpected: list[str] = []
        self.lock = threading.Lock()

    def writer(self, index: int) -> None:
        rng = random.Random(f"{SEED}-{self.number}-{index}")
        sequence = 0
        while not self.killed.is_set():
            key = f"r{self.number}-w{index}-{sequence}"
            sequence += 1
            method, raw, parts = _request(rng, key)
            attempt = Attempt(key, method, raw, parts)
            with self.lock:
                self.model.attempts[key] = attempt
            try:
                answer = self.calls[method](raw, timeout=10)
            except grpc.RpcError as exc:
                if not self.killed.is_set():
                    self.unexpected.append(f"{key}: {exc.code()} {exc.details()}")
                return
            attempt.acked, deduplicated = _responses(method, answer)
            if deduplicated:
                self.unexpected.append(f"{key}: a first attempt came back deduplicated")
            self.first_ack.set()


def _retry_unacknowledged(channel: grpc.Channel, model: Model, round_keys: list[str]) -> int:
    """Resend every unacknowledged request of the round: it must apply at most once.

    Returns how many of them had been committed although their
    acknowledgement never arrived (the case idempotency keys exist for).
    """
    calls = {m: raw_unary(channel, EVENT_STORE + m) for m in ("Append", "Commit")}
    fresh: list[Attempt] = []
    committed_unacknowledged = 0
    for key in round_keys:
        attempt = model.attempts[key]
        if attempt.acked is not None:
            continue
        was_applied = model.check_applied_whole(attempt)
        responses, deduplicated = _responses(attempt.method, calls[attempt.method](attempt.raw))
        assert deduplicated == was_applied, (
            f"{key}: retried after the crash, deduplicated={deduplicated} "
            f"but the log {'holds' if was_applied else 'lacks'} it"
        )
        attempt.acked = responses
        if was_applied:
            committed_unacknowledged += 1
            model.check_acknowledged(attempt)
        else:
            fresh.append(attempt)
    model.observe(read_all(channel, after=model.checked_head))
    for attempt in fresh:
        model.check_acknowledged(attempt)
    return committed_unacknowledged


def _check_round(channel: grpc.Channel, model: Model, round_keys: list[str]) -> None:
    """After the restart: the acknowledged are there once, the rest whole or absent."""
    model.observe(read_all(channel, after=model.checked_head))
    for key in round_keys:
        attempt = model.attempts[key]
        if attempt.acked is not None:
            model.check_acknowledged(attempt)
        else:
            model.check_applied_whole(attempt)


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_append(tmp_path: Path):
    schedule = random.Random(SEED)
    data = tmp_path / "data"
    server = ServerProcess(data)
    model = Model()
    chain = ChainWalk()
    previous_keys: list[str] = []
    acknowledged = unacknowledged = committed_unacknowledged = 0
    try:
        for number in range(ROUNDS + 1):
            server.start()
            with grpc.insecure_channel(server.address) as channel:
                _check_round(channel, model, previous_keys)
                committed_unacknowledged += _retry_unacknowledged(channel, model, previous_keys)
                if number == ROUNDS:
                    break
                load = Round(number, channel, model)
                threads = [
                    threading.Thread(target=load.writer, args=(i,), daemon=True)
                    for i in range(WRITERS)
                ]
                for thread in threads:
                    thread.start()
                assert load.first_ack.wait(10), "no append was acknowledged"
                time.sleep(schedule.uniform(*KILL_AFTER_S))
                load.killed.set()
                server.kill()
                for thread in threads:
                    thread.join(15)
                    assert not thread.is_alive()
                assert not load.unexpected, load.unexpected
            previous_keys = [k for k in model.attempts if k.startswith(f"r{number}-")]
            acknowledged += sum(model.attempts[k].acked is not None for k in previous_keys)
            unacknowledged += sum(model.attempts[k].acked is None for k in previous_keys)

            on_disk = chain.walk(data)
            newest_ack = max(
                (r.last_position for a in model.attempts.values() for r in a.acked or ()),
                default=0,
            )
            assert on_disk >= newest_ack, "the head on disk is behind an acknowledgement"
            if number % FULL_VERIFY_EVERY == 0:
                verifier = verify_offline(data)
                assert verifier.ok, (verifier.first_bad_position, verifier.problem)
                assert verifier.head == on_disk

        # The whole log once more from position 1: nothing acknowledged in any
        # round went missing in a later crash.
        with grpc.insecure_channel(server.address) as channel:
            final = Model(attempts=model.attempts)
            final.observe(read_all(channel))
        for attempt in model.attempts.values():
            final.check_acknowledged(attempt)
        assert final.checked_head == model.checked_head
    finally:
        if server.proc is not None:
            server.stop()
    assert verify_offline(data).ok
    # The schedule really did crash writers mid-flight, often, and some of
    # the crashes fell between a commit and its acknowledgement. (A typical
    # run: ~12,000 acknowledged, ~370 cut off, ~40 of those committed.)
    assert acknowledged > 10 * ROUNDS
    assert unacknowledged >= ROUNDS
    assert committed_unacknowledged >= 1
