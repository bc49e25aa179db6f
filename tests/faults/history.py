"""The client side of a failover run: writers, a subscriber, forgets, and what they were told.

Every acknowledgement is recorded as it arrives on the wire: a gRPC
interceptor (:class:`AckTap`) on the SDK's channels reads each successful
Append, AppendBatch and ForgetSubject answer with the node that sent it and
the term in its ``lethedb-term`` trailer. Recording at the wire rather than at
the SDK's return means an acknowledgement the SDK then lost (a batch answered
after its caller gave up) is still held against the cluster: the server said
it, so it must be true.

Writers append through one SDK client that knows every node, each append
with its own idempotency key and event ids derived from the key, and retry an
append with the same key and events until it is acknowledged; only the
append in flight when the run stops may be left unacknowledged. The checks
that judge the history are in tests/faults/jepsen_checks.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

import lethedb
from lethedb.v1 import eventstore_pb2 as pb

EVENT_STORE = "/lethedb.v1.EventStore/"
TERM_TRAILER = "lethedb-term"
NAMESPACE = uuid.UUID("5d0b1f6e-6a47-4c1f-9b7e-0f6a6e1f4a21")
#: Events of one writer per data subject before it moves to the next subject.
EVENTS_PER_SUBJECT = 12


def event_id(key: str, index: int) -> uuid.UUID:
    """The id of the *index*-th event of the append with idempotency key *key*."""
    return uuid.uuid5(NAMESPACE, f"{key}/{index}")


@dataclass(frozen=True)
class Ack:
    """One acknowledged append, as the node that acknowledged it answered."""

    key: str
    first_position: int
    last_position: int
    deduplicated: bool
    node: str  # the node that answered (its name, or its address when unnamed)
    term: int  # its lethedb-term trailer (0: none)
    at: float  # monotonic time the answer arrived


@dataclass(frozen=True)
class ForgetAck:
    subject_id: str
    tombstone_position: int
    node: str
    term: int
    at: float


@dataclass
class History:
    """Everything the clients were told, in arrival order; thread-safe appends."""

    acks: list[Ack] = field(default_factory=list)
    forgets: list[ForgetAck] = field(default_factory=list)
    #: Idempotency key -> (stream id, event ids) of every append ever attempted.
    attempted: dict[str, tuple[str, tuple[uuid.UUID, ...]]] = field(default_factory=dict)
    #: Keys whose append was still unacknowledged when the run stopped.
    indeterminate: set[str] = field(default_factory=set)
    #: Errors the writers met (kind -> count): latency a failover costs, as the caller saw it.
    errors: dict[str, int] = field(default_factory=dict)
    #: The first error of each kind: when (monotonic) and what it said.
    first_errors: dict[str, tuple[float, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_ack(self, ack: Ack) -> None:
        with self.lock:
            self.acks.append(ack)

    def record_forget(self, ack: ForgetAck) -> None:
        with self.lock:
            self.forgets.append(ack)

    def record_error(self, error: BaseException) -> None:
        with self.lock:
            kind = type(error).__name__
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.first_errors.setdefault(kind, (time.monotonic(), str(error)[:200]))

    def acks_after(self, moment: float) -> list[Ack]:
        with self.lock:
            return [ack for ack in self.acks if ack.at > moment]

    def acked_keys(self) -> set[str]:
        with self.lock:
            return {ack.key for ack in self.acks}


def _term(call: grpc.Call) -> int:
    value = dict(call.trailing_metadata() or ()).get(TERM_TRAILER)
    return int(value) if value else 0


class AckTap(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Records, from every write answered on one node's channel, what it acknowledged."""

    def __init__(self, node: str, history: History) -> None:
        self.node = node
        self.history = history

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        outcome = continuation(details, request)
        method = details.method.removeprefix(EVENT_STORE)
        if method in ("Append", "AppendBatch", "ForgetSubject"):
            outcome.add_done_callback(lambda call: self._answered(method, request, call))
        return outcome

    def _answered(self, method: str, request: Any, call: Any) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        at = time.monotonic()
        response, term = call.result(), _term(call)
        if method == "ForgetSubject":
            self.history.record_forget(
                ForgetAck(request.subject_id, response.tombstone_position, self.node, term, at)
            )
            return
        pairs: list[tuple[pb.AppendRequest, pb.AppendResponse]]
        if method == "Append":
            pairs = [(request, response)]
        else:
            pairs = [
                (append, result.ok)
                for append, result in zip(request.appends, response.results, strict=True)
                if result.HasField("ok")
            ]
        for append, ok in pairs:
            self.history.record_ack(
                Ack(
                    append.idempotency_key,
                    ok.first_position,
                    ok.last_position,
                    ok.deduplicated,
                    self.node,
                    term,
                    at,
                )
            )


def tapped_client(
    target: str, history: History, names: Mapping[str, str], **kwargs: Any
) -> lethedb.Client:
    """An SDK client whose every channel records acknowledgements into *history*, each
    under the name *names* gives its node's address.

    The SDK opens one channel per node (``Transport._open``); the tap wraps
    each in :class:`AckTap`. The SDK has no interceptor option, so this
    replaces that one method on this client's transport, before any call.
    """
    client = lethedb.Client(target, **kwargs)
    transport = client._transport
    open_channel = transport._open

    def open_tapped(address: str) -> grpc.Channel:
        tap = AckTap(names.get(address, address), history)
        return grpc.intercept_channel(open_channel(address), tap)

    with transport._lock:
        untapped = list(transport._nodes.values())
        transport._nodes.clear()
    transport._open = open_tapped  # type: ignore[method-assign]
    transport._first = transport.node(transport.settings.target)
    for node in untapped:
        node.channel.close()
    return client


# -- the load ----------------------------------------------------------------------------


class Writer(threading.Thread):
    """Appends 1-3 events at a time, each append retried with its key until acknowledged."""

    def __init__(
        self, index: int, client: lethedb.Client, history: History, stop: threading.Event
    ) -> None:
        super().__init__(name=f"writer-{index}", daemon=True)
        self.index = index
        self.client = client
        self.history = history
        self.stop_event = stop
        self.seq = 0
        self.events_written = 0

    def subject(self, seq: int) -> str:
        return f"p{self.index}-{seq // EVENTS_PER_SUBJECT}"

    def finished_subject(self) -> str | None:
        """A subject of this writer that it will not write again (all its appends acked)."""
        done = self.seq // EVENTS_PER_SUBJECT - 1
        return f"p{self.index}-{done}" if done >= 0 else None

    def run(self) -> None:
        while not self.stop_event.is_set():
            key = f"w{self.index}-{self.seq}"
            stream = f"s{self.index}-{self.seq % 5}"
            count = 1 + self.seq % 3
            events = [
                lethedb.Event(
                    "Appended",
                    {"writer": self.index, "seq": self.seq, "n": n},
                    subject_id=self.subject(self.seq) if n == 0 else "",
                    event_id=event_id(key, n),
                )
                for n in range(count)
            ]
            with self.history.lock:
                self.history.attempted[key] = (stream, tuple(e.event_id for e in events))  # type: ignore[misc]
            if self._append_until_acked(key, stream, events):
                self.seq += 1
            else:
                with self.history.lock:
                    self.history.indeterminate.add(key)

    def _append_until_acked(self, key: str, stream: str, events: list[lethedb.Event]) -> bool:
        while not self.stop_event.is_set():
            try:
                self.client.append(stream, events, idempotency_key=key)
                return True
            except lethedb.LetheError as error:
                self.history.record_error(error)
                self.stop_event.wait(0.05)
        return False


@dataclass(frozen=True)
class Seen:
    position: int
    event_id: uuid.UUID
    redacted: bool
    at: float = 0.0  # monotonic time it was delivered


class Subscriber(threading.Thread):
    """One subscription from the start over every node; records each position delivered."""

    def __init__(self, client: lethedb.Client) -> None:
        super().__init__(name="subscriber", daemon=True)
        self.client = client
        self.seen: list[Seen] = []
        self.error: BaseException | None = None
        self._subscription: Any = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            with self.client.subscribe(from_start=True) as subscription:
                self._subscription = subscription
                for item in subscription:
                    if isinstance(item, lethedb.RecordedEvent):
                        self.seen.append(
                            Seen(item.position, item.event_id, item.redacted, time.monotonic())
                        )
        except BaseException as error:  # reported by the checks, not lost in a thread
            if not self._stopping.is_set():
                self.error = error

    @property
    def position(self) -> int:
        return self.seen[-1].position if self.seen else 0

    def close(self) -> None:
        self._stopping.set()
        if self._subscription is not None:
            self._subscription.close()
        self.join(10)


class Load:
    """The writers and the subscriber of one run, over one tapped client each."""

    def __init__(
        self,
        target: str,
        token: str,
        history: History,
        names: Mapping[str, str],
        writers: int = 8,
    ) -> None:
        """*names*: each node's name by its client address (acknowledgements carry names)."""
        retry = lethedb.RetryPolicy(max_retries=1000, initial_backoff=0.02, max_backoff=0.25)
        self.history = history
        self.stop_event = threading.Event()
        self.client = tapped_client(target, history, names, token=token, timeout=5.0, retry=retry)
        self.reader = lethedb.Client(target, token=token, timeout=5.0, retry=retry)
        self.writers = [
            Writer(index, self.client, history, self.stop_event) for index in range(writers)
        ]
        self.subscriber = Subscriber(self.reader)

    def start(self) -> Load:
        self.subscriber.start()
        for writer in self.writers:
            writer.start()
        return self

    def stop_writers(self, timeout: float = 30.0) -> None:
        """Stop appending; an append still unacknowledged is left indeterminate."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for writer in self.writers:
            writer.join(max(0.1, deadline - time.monotonic()))
        alive = [w.name for w in self.writers if w.is_alive()]
        if alive:
            raise AssertionError(f"writers still running {timeout:g}s after the stop: {alive}")

    def close(self) -> None:
        """Stop everything; writers are waited for before their client closes under them."""
        self.stop_event.set()
        for writer in self.writers:
            writer.join(30)
        self.subscriber.close()
        self.client.close()
        self.reader.close()
