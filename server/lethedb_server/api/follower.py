"""The follower's side of log shipping: one Follow stream to the leader, kept open.

:class:`Follower` runs in a follower's server process (``follow`` is set).
Each session says hello with this node's position, takes the leader's
welcome (an empty follower adopts the leader's store id), then applies every
commit the leader sends through the store's writer, several in flight at
once (they share group commits and fsyncs), and acks each durable position.
At most :data:`IN_FLIGHT` commits wait for the writer; beyond that it stops
reading the stream, and gRPC flow control holds the leader back. A leader
silent for :data:`LEADER_SILENCE_S` (it heartbeats every second) is taken
for gone. Any end of a session is logged with its reason, and the next one
starts after a backoff that grows to :data:`MAX_BACKOFF_S` (back to the
start once a session got as far as the welcome).

Until it has once applied the commit the leader's first welcome named, the
node answers reads with CatchingUp (:class:`~lethedb_server.api.head_watch.ReadGate`):
a subject forgotten while it was down must be erased here before it serves
anything.

Fencing: the node never follows a leader whose term is lower than the
highest it has seen (its own journal's, or an earlier welcome's), and each
ack carries the term it is for. When the welcome names a commit to truncate
after (this node holds commits the leader does not: a deposed leader's
unacknowledged tail, or the tail a follower received from it), the node
discards them, logging the positions, before it follows; should that mean
discarding acknowledged writes the engine refuses, and the loop stops with a
line that asks for an operator (:class:`NeedsOperator`).

A cluster member (automatic failover) points the same loop at each new
leader: :meth:`Follower.point_at` between runs.

A consumer group's checkpoint committed on a follower is stored by the
leader (:meth:`Follower.forward_checkpoint`, the subscription engine's
checkpoint sink); the follower answers once it has applied the commit that
holds it, so that its own GetCheckpoint then shows it.

Never logged: the token, keys, event data.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import threading
import time
from asyncio import Future
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import grpc.aio

from lethedb.v1 import replication_pb2 as rpb
from lethedb.v1 import replication_pb2_grpc as rpb_grpc
from lethedb_contract import ERROR_KEY, LEADER_KEY
from lethedb_server.api.frames import commit_frame
from lethedb_server.api.head_watch import HeadWatch, ReadGate
from lethedb_server.engine.cluster import LeaderLink
from lethedb_server.engine.model import CheckpointCommand
from lethedb_server.engine.store import Store
from lethedb_server.errors import (
    CatchingUp,
    LetheError,
    NotLeader,
    ReplicationRefused,
    ValidationError,
)

log = logging.getLogger(__name__)

#: Leader commits queued at this node's writer at once.
IN_FLIGHT: Final = 256
#: The leader heartbeats every second; this long without a message: it is gone.
LEADER_SILENCE_S: Final = 5.0
FIRST_BACKOFF_S: Final = 0.2
MAX_BACKOFF_S: Final = 5.0
#: How long a forwarded checkpoint waits for the leader, then for its commit here.
FORWARD_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class FollowSettings:
    """How this follower reaches its leader (built by the server from its configuration)."""

    leader: str
    node_id: str
    advertise: str
    #: The replica token; empty when the leader has no tokens file.
    token: str = field(default="", repr=False)
    #: None: plaintext (a loopback leader, or ``insecure``).
    credentials: grpc.ChannelCredentials | None = None
    max_message_bytes: int = 64 << 20


def channel_credentials(ca: bytes | None, cert: bytes | None, key: bytes | None) -> Any:
    """TLS to the leader: *ca* (None: the system roots) and an optional client certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class NeedsOperator(Exception):
    """Following cannot go on without a person: the loop logs why and stops."""


class _Session:
    """What one Follow stream learnt; the reason it ended."""

    def __init__(self) -> None:
        self.welcomed = False
        #: The leader's term as its welcome said (the term of this session's acks).
        self.term = 0


class Follower:
    """The client loop of a follower node; :meth:`run` until cancelled."""

    def __init__(
        self, store: Store, settings: FollowSettings, watch: HeadWatch, reads: ReadGate
    ) -> None:
        self.store = store
        self.settings = settings
        self.watch = watch
        self.reads = reads
        self.connected = False
        #: The leader's head as its last welcome or heartbeat said (lag).
        self.leader_position = 0
        self.leader_commit = 0
        #: (commit, committed_at) of commits received and maybe not durable here yet: the
        #: oldest one this node lacks dates its lag in seconds (:meth:`link`).
        self._received: collections.deque[tuple[int, int]] = collections.deque()
        self._received_lock = threading.Lock()
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {settings.token}"),) if settings.token else ()
        )
        self._channel: grpc.aio.Channel | None = None
        #: The highest leader term seen in a welcome; a leader below it is refused.
        self.seen_term = 0

    @property
    def leader(self) -> str:
        """The address of the leader this loop follows."""
        return self.settings.leader

    def point_at(self, leader: str) -> None:
        """Follow *leader* from the next :meth:`run` on (call it while the loop is not running)."""
        if leader != self.settings.leader:
            self.settings = dataclasses.replace(self.settings, leader=leader)
            self._channel = None  # the last run closed it

    # -- the channel ----------------------------------------------------------------------

    def _open_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            options = [
                ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                # gRPC's own reconnect backoff (up to two minutes by default) would
                # outlast this loop's: a restarted leader is found within MAX_BACKOFF_S.
                ("grpc.initial_reconnect_backoff_ms", int(FIRST_BACKOFF_S * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(FIRST_BACKOFF_S * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
            ]
            credentials = self.settings.credentials
            leader = self.settings.leader
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(leader, options=options)
            else:
                self._channel = grpc.aio.secure_channel(leader, credentials, options=options)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the leader for ever: sessions, and a growing backoff between them."""
        backoff = FIRST_BACKOFF_S
        leader = self.settings.leader
        log.info(
            "following the leader at %s as node %s (%s)",
            leader,
            self.settings.node_id,
            "plaintext" if self.settings.credentials is None else "TLS",
        )
        try:
            while True:
                session = _Session()
                try:
                    await self._session(session)
                    why = "the leader ended the stream"
                except NeedsOperator as exc:
                    log.error("stopped following the leader at %s: %s", leader, exc)
                    return
                except grpc.aio.AioRpcError as exc:
                    why = _rpc_failure(exc)
                except LetheError as exc:
                    why = f"{type(exc).__name__}: {exc}"
                except (TimeoutError, StopAsyncIteration):
                    why = f"no word from the leader for {LEADER_SILENCE_S:.0f}s"
                finally:
                    self.connected = False
                if session.welcomed:
                    backoff = FIRST_BACKOFF_S
                delay = backoff * random.uniform(0.8, 1.2)
                log.warning("reconnecting to the leader at %s in %.1fs: %s", leader, delay, why)
                await asyncio.sleep(delay)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        finally:
            self.connected = False
            await self.close()

    async def _session(self, session: _Session) -> None:
        """One Follow stream, from hello to its end (which raises or returns)."""
        store = self.store
        stub = rpb_grpc.ReplicationStub(self._open_channel())
        outbox: asyncio.Queue[rpb.FollowRequest] = asyncio.Queue()
        outbox.put_nowait(rpb.FollowRequest(hello=self._hello()))
        call = stub.Follow(_drain(outbox), metadata=self._metadata)
        applying = _InFlight(IN_FLIGHT)
        acker: asyncio.Task[None] | None = None
        try:
            responses = aiter(call)
            first = await asyncio.wait_for(anext(responses), LEADER_SILENCE_S)
            if first.WhichOneof("message") != "welcome":
                raise ReplicationRefused("the leader's first message was not a welcome")
            welcome = first.welcome
            self._check_term(welcome)
            await asyncio.to_thread(store.adopt_store_id, welcome.store_id)
            if welcome.HasField("truncate_after"):
                await self._truncate(welcome)
            session.welcomed = True
            session.term = self.seen_term = welcome.term
            self.connected = True
            self.leader_commit, self.leader_position = welcome.commit, welcome.position
            store.leader_visible(_visible(welcome, welcome.position))
            log.info(
                "connected to the leader %s at %s (term %d, commit %d, position %d); this "
                "node is at commit %d, position %d",
                welcome.node_id,
                self.settings.leader,
                welcome.term,
                welcome.commit,
                welcome.position,
                store.journal_head(),
                store.log_head,
            )
            target = welcome.commit
            self._check_caught_up(store.journal_head(), target)
            acker = asyncio.create_task(self._ack_durable(applying, outbox, target, session))
            while True:
                response = await asyncio.wait_for(anext(responses), LEADER_SILENCE_S)
                if acker.done():
                    acker.result()  # raises why applying failed
                kind = response.WhichOneof("message")
                if kind == "commit":
                    frame = commit_frame(response.commit)
                    self._note_received(frame.commit, frame.committed_at)
                    store.leader_visible(_visible(response.commit, frame.last_position))
                    applied = store.apply_replicated(frame, leader_term=session.term)
                    await applying.put(applied, frame.last_position)
                elif kind == "heartbeat":
                    beat = response.heartbeat
                    self.leader_commit, self.leader_position = beat.commit, beat.position
                    store.leader_visible(_visible(beat, beat.position))
                    if applying.idle():
                        outbox.put_nowait(rpb.FollowRequest(ack=self._ack(session, store.log_head)))
        except StopAsyncIteration:
            return
        finally:
            if acker is not None:
                acker.cancel()
                with contextlib.suppress(BaseException):
                    await acker
            call.cancel()

    # -- what ClusterStatus and the metrics show ---------------------------------------------

    def _note_received(self, commit: int, committed_at: int) -> None:
        with self._received_lock:
            self._received.append((commit, committed_at))

    def link(self) -> LeaderLink:
        """This node's link to its leader now: connected, caught up, and how far behind.

        The lag in positions is against the leader's head as its last welcome or
        heartbeat said; in seconds, the age (by the leader's clock) of the
        oldest commit received but not yet durable here (0 when there is none).
        Thread-safe: the metrics read it from their own thread.
        """
        held = self.store.journal_head()
        with self._received_lock:
            while self._received and self._received[0][0] <= held:
                self._received.popleft()
            oldest = self._received[0][1] if self._received else 0
        seconds = max(0.0, (time.time_ns() - oldest) / 1e9) if oldest else 0.0
        return LeaderLink(
            connected=self.connected,
            caught_up=self.reads.caught_up,
            lag_positions=max(0, self.leader_position - self.store.log_head),
            lag_seconds=seconds,
        )

    def _hello(self) -> rpb.FollowerHello:
        store = self.store
        commit = store.journal_head()
        empty = commit == 0 and store.log_head == 0
        return rpb.FollowerHello(
            node_id=self.settings.node_id,
            advertise=self.settings.advertise,
            # An empty follower adopts the leader's store id from the welcome.
            store_id=b"" if empty else store.store_id,
            commit=commit,
            position=store.log_head,
            chain_head=store.chain_head,
            # The last entry's term: with the commit, where this log may part from the leader's.
            term=store.journal_term(),
        )

    def _ack(self, session: _Session, position: int, commit: int | None = None) -> rpb.FollowerAck:
        """An ack of *commit* (default: the journal head), for the session's leader term or
        the term of the last commit applied, whichever is later."""
        store = self.store
        return rpb.FollowerAck(
            commit=store.journal_head() if commit is None else commit,
            position=position,
            shredded_through=store.shredded_through(),
            term=max(session.term, store.term),
        )

    def _check_term(self, welcome: rpb.LeaderWelcome) -> None:
        """Refuse a leader of a term older than one this node has seen (a deposed leader)."""
        seen = max(self.seen_term, self.store.term)
        if welcome.term < seen:
            raise ReplicationRefused(
                f"the node at {self.settings.leader} leads term {welcome.term}, older than term "
                f"{seen} this node has seen; it is no longer the leader"
            )

    async def _truncate(self, welcome: rpb.LeaderWelcome) -> None:
        """Discard this node's commits after the welcome's ``truncate_after``, or stop.

        The engine logs what it discarded (commits and positions) and refuses to
        discard a commit this node acknowledged to clients.
        """
        store = self.store
        keep = welcome.truncate_after
        log.warning(
            "leader %s (term %d) holds this node's journal only up to commit %d; this node is "
            "at commit %d, position %d: discarding its commits after %d before following",
            welcome.node_id,
            welcome.term,
            keep,
            store.journal_head(),
            store.log_head,
            keep,
        )
        try:
            await asyncio.to_thread(store.truncate_after, keep)
        except LetheError as exc:
            raise NeedsOperator(
                f"discarding this node's commits after {keep} was refused: {exc}; this data "
                f"directory needs an operator (leader {welcome.node_id}, term {welcome.term})"
            ) from exc

    async def _ack_durable(
        self,
        applying: _InFlight,
        outbox: asyncio.Queue[rpb.FollowRequest],
        target: int,
        session: _Session,
    ) -> None:
        """Ack each durable apply (several that became durable together: one ack)."""
        while True:
            commit, position = await applying.durable()
            outbox.put_nowait(rpb.FollowRequest(ack=self._ack(session, position, commit)))
            self._check_caught_up(commit, target)

    def _check_caught_up(self, commit: int, target: int) -> None:
        if commit >= target and not self.reads.caught_up:
            self.reads.mark_caught_up()
            log.info(
                "caught up with the leader at commit %d (position %d); serving reads",
                commit,
                self.store.log_head,
            )

    # -- checkpoints of consumer groups -------------------------------------------------

    async def forward_checkpoint(self, command: CheckpointCommand) -> int:
        """Store a group's checkpoint on the leader; return once this node holds it."""
        stub = rpb_grpc.ReplicationStub(self._open_channel())
        request = rpb.ForwardCheckpointRequest(
            group=command.group, position=command.position, rewind=command.rewind
        )
        try:
            answer = await stub.ForwardCheckpoint(
                request, metadata=self._metadata, timeout=FORWARD_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise self._forward_error(exc) from None
        store = self.store

        def applied() -> bool:
            return store.journal_head() >= answer.commit

        if not await self.watch.wait_until(applied, FORWARD_TIMEOUT_S):
            raise CatchingUp(
                f"the leader stored the checkpoint in its commit {answer.commit}; this follower "
                f"has applied only up to commit {store.journal_head()} so far; retry"
            )
        return int(answer.position)

    def _forward_error(self, exc: grpc.aio.AioRpcError) -> LetheError:
        """The leader's refusal as the domain error this node answers its client with."""
        metadata: Any = exc.trailing_metadata() or ()
        trailers = {str(key): str(value) for key, value in metadata}
        details = exc.details() or exc.code().name
        if trailers.get(ERROR_KEY) == "NotLeader":
            return NotLeader(trailers.get(LEADER_KEY, ""))
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return ValidationError(details)
        return CatchingUp(
            f"the leader at {self.settings.leader} did not store the checkpoint "
            f"({exc.code().name}: {details}); retry"
        )


class _InFlight:
    """Leader commits queued at the writer, in order, at most *limit* at once."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[tuple[Future[int], int]] = collections.deque()
        self._room = asyncio.Semaphore(limit)
        self._added = asyncio.Event()

    def idle(self) -> bool:
        return not self._items

    async def put(self, applied: Future[int], position: int) -> None:
        await self._room.acquire()
        self._items.append((applied, position))
        self._added.set()

    async def durable(self) -> tuple[int, int]:
        """(commit, position) of the newest apply that is durable, waiting for the oldest.

        Raises what the writer refused a commit with (ReplicationRefused).
        """
        while not self._items:
            self._added.clear()
            await self._added.wait()
        applied, position = self._items[0]
        commit = await applied
        self._pop()
        while self._items and self._items[0][0].done():
            applied, position = self._items[0]
            commit = applied.result()
            self._pop()
        return commit, position

    def _pop(self) -> None:
        self._items.popleft()
        self._room.release()


async def _drain(outbox: asyncio.Queue[rpb.FollowRequest]) -> AsyncIterator[rpb.FollowRequest]:
    while True:
        yield await outbox.get()


def _rpc_failure(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    details = exc.details() or ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (
            f"the leader refused this follower's token ({code.name}: {details}); give it a "
            "token of the replica role in follow_token_file"
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return f"the leader refused this follower: {details}"
    return f"{code.name}: {details}"


def _visible(
    message: rpb.LeaderWelcome | rpb.LeaderHeartbeat | rpb.ReplicatedCommit, position: int
) -> int:
    """The leader's visible head a message names; *position* when it names none (a
    leader from before visible heads, which shows its whole log)."""
    return message.visible_position if message.HasField("visible_position") else position
