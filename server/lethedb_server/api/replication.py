"""``lethedb.v1.Replication``: the leader's side of log shipping (docs/CLUSTERING.md).

**Follow.** A follower opens one stream with a ``replica`` token and says
who it is and where its log ends (FollowerHello). The leader refuses a
follower of another store and one that holds commits the leader does not
(both FAILED_PRECONDITION, ReplicationRefused, with a log line naming why);
a follower cannot be followed (NotLeader). Otherwise it answers with its
LeaderWelcome (the commit and position the follower must reach before it
serves reads) and then sends every commit after the follower's, in order,
as the engine's :meth:`~lethedb_server.engine.store.Store.frames_after`
reads them. Once caught up it sleeps until the next journal entry
(:class:`~lethedb_server.api.head_watch.HeadWatch`, no polling) and sends a
heartbeat after a second of silence. Each ``yield`` waits for the transport,
so a slow follower holds the leader back by gRPC flow control: nothing is
buffered beyond one batch of frames. Acks are read concurrently and handed
to the store (lag, synchronous writes); in an elected cluster an ack for
another term than this leader's is ignored (fencing: it was meant for an
earlier leader, or its follower has seen a newer one).

**Divergence** (a cluster with automatic failover, ``failover=True``): a
follower whose journal runs ahead of this leader's or diverges from it (a
deposed leader's unacknowledged tail) is not refused: the welcome names the
commit it must discard everything after (``truncate_after``, from
:meth:`~lethedb_server.engine.store.Store.divergence_point`), and the stream
continues from there. A node that stops leading ends its followers' streams
with NotLeader, so they turn to the new leader.

**ForwardCheckpoint.** A consumer group's checkpoint committed on a
follower, stored by the leader's writer; the answer names the commit that
holds it, so the follower can wait until it has applied it.

Log lines name node ids, peers, commit numbers and positions; never event
data or keys (the frames carry raw data keys: they are only serialized).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

import grpc

from lethedb.v1 import replication_pb2 as rpb
from lethedb_server.api import status
from lethedb_server.api.frames import commit_message
from lethedb_server.api.head_watch import HeadWatch
from lethedb_server.api.rpc import Context, Undecodable, decoded, register, unary
from lethedb_server.api.validation import check_group
from lethedb_server.engine.model import CheckpointCommand
from lethedb_server.engine.store import Store
from lethedb_server.errors import (
    LetheError,
    NotLeader,
    PositionBeyondHead,
    ReplicationRefused,
    ShuttingDown,
    ValidationError,
)

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "lethedb.v1.Replication"
#: A heartbeat after this long without a commit to send.
HEARTBEAT_S: Final = 1.0
#: A follower this many positions behind the head after an ack "fell behind" ...
FELL_BEHIND_POSITIONS: Final = 10_000
#: ... which is logged at most once per this many seconds per follower; so is
#: the same refusal of the same node (it retries every few seconds).
FELL_BEHIND_LOG_S: Final = 60.0
REFUSAL_LOG_S: Final = 60.0


class ReplicationService:
    """``lethedb.v1.Replication`` on any node; only a non-follower accepts followers."""

    def __init__(
        self,
        store: Store,
        watch: HeadWatch,
        node_id: str,
        max_consumer_groups: int = 0,
        *,
        failover: bool = False,
    ) -> None:
        self.store = store
        self.watch = watch
        self.node_id = node_id
        self.max_consumer_groups = max_consumer_groups
        #: In an elected cluster a diverged follower is told where to truncate, not refused.
        self.failover = failover
        self.closing = False
        #: The newest stream of each follower: an older one that ends late must
        #: not mark a reconnected follower as gone.
        self._streams: dict[str, object] = {}
        #: When each (node id, reason) refusal was last logged.
        self._refusals_logged: dict[tuple[str, str], float] = {}

    def shutdown(self) -> None:
        """End every Follow stream (UNAVAILABLE): followers reconnect, to this node or another."""
        self.closing = True
        self.watch.poke()

    def stepped_down(self) -> None:
        """This node no longer leads: its Follow streams end (NotLeader) within a moment."""
        self.watch.poke()

    # -- Follow -------------------------------------------------------------------------

    async def Follow(  # noqa: N802
        self, requests: AsyncIterator[rpb.FollowRequest | Undecodable], context: Context
    ) -> AsyncIterator[rpb.FollowResponse]:
        first = await anext(aiter(requests), None)
        if first is None:
            return
        try:
            hello = _hello(decoded(first))
            start = self._admit(hello)
        except LetheError as exc:
            node_id = first.hello.node_id if isinstance(first, rpb.FollowRequest) else ""
            self._log_refusal(node_id, context.peer(), exc)
            await status.abort(context, exc)
            return
        stream = object()
        self._streams[hello.node_id] = stream
        self.store.replica_connected(hello.node_id, hello.advertise)
        log.info(
            "follower %s connected from %s at commit %d (term %d), position %d%s",
            hello.node_id,
            context.peer(),
            hello.commit,
            hello.term,
            hello.position,
            "" if start == hello.commit else f"; it must discard its commits after {start}",
        )
        acks = asyncio.create_task(self._read_acks(requests, hello.node_id))
        ended = "the follower closed the stream"
        try:
            yield rpb.FollowResponse(welcome=self._welcome(hello.commit, start))
            async for message in self._commits(start, acks):
                yield message
            if self.closing:
                ended = "this leader is shutting down"
                await status.abort(context, ShuttingDown())
            if self.store.role == "follower":
                ended = "this node no longer leads"
                await status.abort(context, NotLeader(self.store.leader))
            error = _ack_error(acks)
            if error is not None:
                ended = f"{type(error).__name__}: {error}"
                if isinstance(error, LetheError):
                    await status.abort(context, error)
        except asyncio.CancelledError:
            ended = "the stream was cancelled"
            raise
        finally:
            acks.cancel()
            if self._streams.get(hello.node_id) is stream:
                del self._streams[hello.node_id]
                self.store.replica_disconnected(hello.node_id)
            log.info("follower %s disconnected: %s", hello.node_id, ended)

    def _log_refusal(self, node_id: str, peer: str, error: LetheError) -> None:
        key = (node_id, type(error).__name__)
        now = time.monotonic()
        if now - self._refusals_logged.get(key, -REFUSAL_LOG_S) < REFUSAL_LOG_S:
            return
        if len(self._refusals_logged) > 1000:  # bounded, whoever keeps knocking
            self._refusals_logged.clear()
        self._refusals_logged[key] = now
        log.warning("refused follower %r from %s: %s", node_id, peer, error)

    def _admit(self, hello: rpb.FollowerHello) -> int:
        """The commit to stream after, or raise why this node cannot lead that follower.

        Below the follower's own commit when it must truncate first (failover only).
        """
        store = self.store
        if store.role == "follower":
            raise NotLeader(store.leader)
        if hello.store_id and hello.store_id != store.store_id:
            raise ReplicationRefused(
                f"the follower's data directory holds another store ({hello.store_id.hex()}) "
                f"than this leader's ({store.store_id.hex()}); give the follower an empty data "
                "directory, or point it at the leader of its own store"
            )
        if hello.term > store.term:
            raise ReplicationRefused(
                f"the follower has seen term {hello.term}, newer than this leader's term "
                f"{store.term}; this node is not the current leader"
            )
        if self.failover:
            return min(hello.commit, store.divergence_point(hello.commit, hello.term))
        head = store.journal_head()
        if hello.commit > head:
            raise ReplicationRefused(
                f"the follower holds commits this leader does not (follower at commit "
                f"{hello.commit}, leader at {head}); it cannot follow this leader"
            )
        return hello.commit

    def _welcome(self, follower_commit: int, start: int) -> rpb.LeaderWelcome:
        store = self.store
        commit = store.journal_head()  # before the head: the head then covers that commit
        welcome = rpb.LeaderWelcome(
            node_id=self.node_id,
            term=store.term,
            store_id=store.store_id,
            commit=commit,
            position=store.log_head,
            visible_position=store.head,
        )
        if start < follower_commit:
            welcome.truncate_after = start
        return welcome

    def _heartbeat(self) -> rpb.LeaderHeartbeat:
        store = self.store
        return rpb.LeaderHeartbeat(
            term=store.term,
            commit=store.journal_head(),
            position=store.log_head,
            sent_at=time.time_ns(),
            visible_position=store.head,
        )

    async def _commits(
        self, after: int, acks: asyncio.Task[None]
    ) -> AsyncIterator[rpb.FollowResponse]:
        """Every commit after *after*, then each new one; heartbeats when idle.

        Ends when the follower's side ends (the ack reader is done) or on shutdown.
        """
        sent_keys: set[tuple[str, int]] = set()
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        # The stream's first frame carries the legal holds and checkpoints as they stand:
        # a follower that truncated its tail cannot restore those rows on its own.
        refresh = True
        #: The visible head the follower last heard of: a new one goes out at once
        #: (a heartbeat), so its readers see what enough followers hold promptly.
        told = -1
        store = self.store
        while not self.closing and not acks.done() and store.role != "follower":
            changed = self.watch.changed()  # before reading: no commit slips between
            frames = await asyncio.to_thread(store.frames_after, after, sent_keys, refresh=refresh)
            if frames:
                refresh = False
                for frame in frames:
                    told = store.head
                    yield rpb.FollowResponse(commit=commit_message(frame, told))
                after = frames[-1].commit
                last_sent = loop.time()
                continue
            idle = loop.time() - last_sent
            if idle < HEARTBEAT_S and store.head == told:
                await _first_of(changed, acks, HEARTBEAT_S - idle)
                continue
            beat = self._heartbeat()
            told = beat.visible_position
            yield rpb.FollowResponse(heartbeat=beat)
            last_sent = loop.time()

    async def _read_acks(
        self, requests: AsyncIterator[rpb.FollowRequest | Undecodable], node_id: str
    ) -> None:
        """Hand each ack to the store; return when the follower ends its side."""
        logged_behind = -FELL_BEHIND_LOG_S
        loop = asyncio.get_running_loop()
        async for request in requests:
            message = decoded(request)
            if message.WhichOneof("message") != "ack":
                raise ValidationError("a follower sends its hello once, then only acks")
            ack = message.ack
            try:
                self.store.replica_acked(
                    node_id,
                    ack.commit,
                    ack.position,
                    ack.shredded_through,
                    term=ack.term if self.failover else None,
                )
            except ReplicationRefused as exc:  # fenced: another term's ack is not counted
                log.debug("ignored follower %s's ack: %s", node_id, exc)
                continue
            behind = self.store.log_head - ack.position
            now = loop.time()
            if behind > FELL_BEHIND_POSITIONS and now - logged_behind >= FELL_BEHIND_LOG_S:
                logged_behind = now
                log.warning(
                    "follower %s fell behind: it holds position %d, %d behind this leader's "
                    "head %d",
                    node_id,
                    ack.position,
                    behind,
                    self.store.log_head,
                )

    # -- ForwardCheckpoint ---------------------------------------------------------------

    @unary
    async def ForwardCheckpoint(  # noqa: N802
        self, request: rpb.ForwardCheckpointRequest, context: Context
    ) -> rpb.ForwardCheckpointResponse:
        check_group(request.group)
        store = self.store
        if store.role == "follower":
            raise NotLeader(store.leader)
        if request.position > store.head:
            raise PositionBeyondHead("position", request.position, store.head)
        command = CheckpointCommand(
            request.group,
            request.position,
            rewind=request.rewind,
            max_groups=self.max_consumer_groups,
        )
        position = await store.store_checkpoint(command)
        # Read after the write: at or after the commit that holds the checkpoint.
        return rpb.ForwardCheckpointResponse(position=position, commit=store.journal_head())


def _hello(request: rpb.FollowRequest) -> rpb.FollowerHello:
    if request.WhichOneof("message") != "hello":
        raise ValidationError("a Follow stream starts with the follower's hello")
    hello = request.hello
    if not hello.node_id:
        raise ValidationError("the follower's hello names no node_id")
    return hello


async def _first_of(changed: asyncio.Event, acks: asyncio.Task[None], timeout: float) -> None:
    """Wait for a change of the log, the end of the follower's side, or *timeout*."""
    waiter = asyncio.ensure_future(changed.wait())
    try:
        await asyncio.wait((waiter, acks), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter


def _ack_error(acks: asyncio.Task[None]) -> BaseException | None:
    """Why the ack reader ended, if it failed (a bad message, a lost connection)."""
    if not acks.done() or acks.cancelled():
        return None
    return acks.exception()


def add_replication(server: grpc.aio.Server, service: ReplicationService) -> None:
    register(
        server,
        SERVICE_NAME,
        {
            "Follow": ("stream_stream", service.Follow, rpb.FollowRequest, rpb.FollowResponse),
            "ForwardCheckpoint": (
                "unary",
                service.ForwardCheckpoint,
                rpb.ForwardCheckpointRequest,
                rpb.ForwardCheckpointResponse,
            ),
        },
    )
