"""Random append sequences against a real store agree with a plain Python model.

Hypothesis drives appends (single, several queued into one batch, and retries
with an idempotency key) to a few streams with random expectations, many of
them wrong. A model applies the same commands in submission order, which is
the writer's order. After every step the log's positions are contiguous from
1, every stream's versions are contiguous from 0, and both equal the model.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lethedb_server.engine.model import AppendCommand, ExpectedState, ProposedEvent
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import StreamNotFound, WrongExpectedVersion
from lethedb_server.storage.codec import AppendResult

# "s-b" is a prefix of "s-bb": their index ranges must never mix.
STREAMS = ("s-a", "s-b", "s-bb")
SUBJECTS = ("person-1", "person-2", "")

EXPECTATIONS = st.one_of(
    st.tuples(st.sampled_from(list(ExpectedState)), st.integers(min_value=0, max_value=6)),
    st.just((ExpectedState.EXACT, -1)),  # -1: the stream's actual version, so EXACT often holds
)
APPENDS = st.tuples(
    st.sampled_from(STREAMS),
    st.lists(st.sampled_from(SUBJECTS), min_size=1, max_size=3),
    EXPECTATIONS,
)


@dataclass
class Model:
    """What the store must hold: the log in order, and each stream's events."""

    log: list[tuple[str, int, bytes]] = field(default_factory=list)
    streams: dict[str, list[bytes]] = field(default_factory=dict)
    accepted: dict[str, tuple[AppendCommand, AppendResult]] = field(default_factory=dict)

    def last_version(self, stream: str) -> int | None:
        events = self.streams.get(stream)
        return None if events is None else len(events) - 1

    def admits(self, command: AppendCommand) -> bool:
        last = self.last_version(command.stream_id)
        state = command.expected_state
        return (
            state is ExpectedState.ANY
            or (state is ExpectedState.NO_STREAM and last is None)
            or (state is ExpectedState.STREAM_EXISTS and last is not None)
            or (state is ExpectedState.EXACT and last == command.expected_version)
        )

    def apply(self, command: AppendCommand) -> None:
        events = self.streams.setdefault(command.stream_id, [])
        for proposed in command.events:
            events.append(proposed.data)
            self.log.append((command.stream_id, len(events) - 1, proposed.data))


class AppendOrdering(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="lethedb-ordering-"))
        # A small DEK use cap makes key roll-over part of every longer run.
        self.store = Store.open(self.directory / "data", StoreOptions(dek_max_uses=4))
        self.model = Model()
        self.counter = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def make_command(
        self, stream: str, subjects: list[str], expectation: tuple[ExpectedState, int]
    ) -> AppendCommand:
        state, version = expectation
        if version < 0:
            actual = self.model.last_version(stream)
            version = 0 if actual is None else actual
        events = []
        for subject in subjects:
            self.counter += 1
            events.append(
                ProposedEvent(
                    uuid.UUID(int=self.counter).bytes,
                    "Happened",
                    subject,
                    "text/plain",
                    f"event {self.counter}".encode(),
                    b"",
                )
            )
        return AppendCommand(stream, tuple(events), state, version, f"key-{self.counter}")

    def check_outcome(self, command: AppendCommand, outcome: AppendResult | BaseException) -> None:
        """Compare one command's outcome with the model's, then apply it to the model."""
        if not self.model.admits(command):
            assert isinstance(outcome, WrongExpectedVersion), outcome
            assert outcome.actual_version == self.model.last_version(command.stream_id)
            return
        assert isinstance(outcome, AppendResult), outcome
        first_position = len(self.model.log) + 1
        last = self.model.last_version(command.stream_id)
        first_version = 0 if last is None else last + 1
        count = len(command.events)
        assert not outcome.deduplicated
        assert (outcome.first_position, outcome.last_position) == (
            first_position,
            first_position + count - 1,
        )
        assert (outcome.first_version, outcome.last_version) == (
            first_version,
            first_version + count - 1,
        )
        self.model.apply(command)
        self.model.accepted[command.idempotency_key] = (command, outcome)

    @rule(append=APPENDS)
    def append_one(self, append: tuple[str, list[str], tuple[ExpectedState, int]]) -> None:
        command = self.make_command(*append)
        try:
            outcome: AppendResult | BaseException = self.store.writer.append(command, timeout=30)
        except WrongExpectedVersion as exc:
            outcome = exc
        self.check_outcome(command, outcome)

    @rule(appends=st.lists(APPENDS, min_size=2, max_size=4))
    def append_several_at_once(
        self, appends: list[tuple[str, list[str], tuple[ExpectedState, int]]]
    ) -> None:
        # Built against the model as it stands before any of them is applied,
        # as concurrent clients would: later ones often expect a stale version.
        commands = [self.make_command(*append) for append in appends]
        futures = [self.store.writer.submit(command) for command in commands]
        for command, future in zip(commands, futures, strict=True):
            error = future.exception(timeout=30)
            self.check_outcome(command, error if error is not None else future.result())

    @precondition(lambda self: bool(self.model.accepted))
    @rule(data=st.data())
    def retry_an_accepted_append(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.accepted)), label="idempotency key")
        command, original = self.model.accepted[key]

        retried = self.store.writer.append(command, timeout=30)

        assert retried.deduplicated
        assert (retried.first_position, retried.last_position) == (
            original.first_position,
            original.last_position,
        )
        assert (retried.first_version, retried.last_version) == (
            original.first_version,
            original.last_version,
        )

    @invariant()
    def log_is_contiguous_and_equals_the_model(self) -> None:
        events = self.store.reader.read_all(1, backwards=False, limit=100_000)

        assert [e.position for e in events] == list(range(1, len(events) + 1))
        assert [(e.stream_id, e.stream_version, e.data) for e in events] == self.model.log
        assert self.store.log.head == len(self.model.log)

    @invariant()
    def every_stream_is_contiguous_and_equals_the_model(self) -> None:
        for stream in STREAMS:
            expected = self.model.streams.get(stream)
            if expected is None:
                assert self.store.log.last_version(stream) is None
                try:
                    self.store.reader.read_stream(stream, 0, backwards=False, limit=100)
                except StreamNotFound:
                    continue
                raise AssertionError(f"{stream!r} should not exist")
            forwards = self.store.reader.read_stream(stream, 0, backwards=False, limit=100_000)
            backwards = self.store.reader.read_stream(
                stream, len(expected) + 5, backwards=True, limit=100_000
            )
            assert [e.stream_version for e in forwards] == list(range(len(expected)))
            assert [e.data for e in forwards] == expected
            assert backwards == forwards[::-1]
            assert self.store.log.last_version(stream) == len(expected) - 1


AppendOrdering.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=15,
    deadline=None,
    derandomize=True,  # the same examples on every run: the suite is deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAppendOrdering = AppendOrdering.TestCase
