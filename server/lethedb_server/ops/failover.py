"""A member of a cluster with automatic failover: lead or follow as etcd says.

``lethedb serve --cluster NAME --etcd URL`` runs one :class:`ClusterMember`
beside the gRPC services. It holds the node's
:class:`~lethedb_server.coord.election.Election` (its lease, its published
progress, its term) and moves the store between its two roles:

* **follower** (at start, of nobody: reads answer CatchingUp). It publishes
  its durable progress and, while etcd names no leader, campaigns; the
  election lets only the most advanced node of a majority win. While another
  node leads, the follower loop (:class:`~lethedb_server.api.follower.Follower`)
  follows it, at the address the leader key names; a leader change points
  the loop at the new one. When the loop's welcome says this node holds
  commits the leader does not, it truncates them before following.
* **leader**, once elected: the follower loop stops, the node checks that it
  holds everything it knows was acknowledged, then ``Store.promote(term)``:
  it takes writes, and its Replication service serves followers at the new
  term.

Fencing: the writer releases an answer only while ``Election.is_leader_now()``
(the lease's deadline on this node's own clock, before etcd can let the key
expire), so a leader cut off from etcd, or paused, stops acknowledging before
another node can be elected: its writes are answered NotLeader with the
leader unknown (clients try their other hosts; committed here, never
acknowledged). If etcd then shows the key still its own, in the same term, it
acknowledges again; once another node leads it demotes itself
(``Store.demote``), follows, and discards its unacknowledged tail. (It cannot
demote itself within its own term: a term's leader is the one node that
wrote it, and the store refuses a demotion that would say otherwise.)

No state of its own is persisted: the term and the leader live in etcd, the
log position in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from lethedb_server.api.follower import Follower
from lethedb_server.api.head_watch import ReadGate
from lethedb_server.api.replication import ReplicationService
from lethedb_server.coord.election import Election, Leader, Outcome, Progress
from lethedb_server.coord.etcd import EtcdError
from lethedb_server.engine.store import Store
from lethedb_server.errors import LetheError

log = logging.getLogger(__name__)

#: Longest wait between two looks at the state while nothing changes.
IDLE_CHECK_S: Final = 1.0
#: A campaign refused for the same reason is logged at most this often.
REFUSAL_LOG_S: Final = 30.0


def store_progress(store: Store) -> Progress:
    """What a node publishes before it campaigns: its last journal entry's term and commit
    (compared as Raft compares logs) and its head."""
    return Progress(store.journal_term(), store.journal_head(), store.log_head)


class ClusterMember:
    """This node's part in an elected cluster; :meth:`run` until cancelled, then :meth:`close`."""

    def __init__(
        self,
        store: Store,
        election: Election,
        follower: Follower,
        reads: ReadGate,
        replication: ReplicationService,
    ) -> None:
        self.store = store
        self.election = election
        self.follower = follower
        self.reads = reads
        self.replication = replication
        #: The leader etcd showed last (None: none); meaningful once ``_known``.
        self._seen: Leader | None = None
        self._known = False
        self._changed = asyncio.Event()
        #: The term this node leads (None: it does not).
        self._leading: int | None = None
        #: Leading, but past the lease's deadline: answers are refused until it is renewed.
        self._lapsed = False
        #: The leader the follower loop was last pointed at, and the loop's task.
        self._following: Leader | None = None
        self._loop: asyncio.Task[None] | None = None
        self._refusal_logged: tuple[str, float] = ("", 0.0)
        # Answers are released only while the lease holds (every role: False unless leading).
        store.set_fence(election.is_leader_now)

    @property
    def leading(self) -> int | None:
        """The term this node leads now, or None."""
        return self._leading

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Take part in the cluster until cancelled (etcd outages are waited out)."""
        await self._start_election()
        watcher = asyncio.create_task(self._watch_leader(), name="lethedb-leader-watch")
        try:
            while True:
                self._changed.clear()
                await self._step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._pause())
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self._stop_following()

    async def close(self) -> None:
        """Leave the cluster: resign if leading and revoke the lease, so another node
        leads at once instead of a TTL later (this node acknowledges nothing after)."""
        await self.election.close()
        await self.election.client.close()

    async def _start_election(self) -> None:
        while True:
            try:
                await self.election.start()
            except EtcdError as exc:
                log.warning("cannot reach etcd to join the cluster yet: %s", exc)
                await asyncio.sleep(self._retry_s())
            else:
                log.info(
                    "joined cluster %s as node %s (%s); lease TTL %ds",
                    self.election.options.cluster,
                    self.election.node.node_id,
                    self.election.node.advertise,
                    self.election.options.ttl_s,
                )
                return

    async def _watch_leader(self) -> None:
        async for leader in self.election.observe():
            self._seen, self._known = leader, True
            self._changed.set()

    # -- one look at the state ----------------------------------------------------------------

    async def _step(self) -> None:
        """Do what etcd's view and the lease ask now: campaign, lead or follow."""
        election = self.election
        if self._leading is not None:
            self._note_lease()
        if not self._known:
            return
        leader = self._seen
        if leader is None:
            await self._campaign()
        elif leader.node.node_id != election.node.node_id:
            await self._follow(leader)
        elif election.term == leader.term:
            if self._leading != leader.term and election.is_leader_now():
                await self._lead(leader.term)
        elif election.term is None:
            await self._clear_stale_key(leader)

    def _note_lease(self) -> None:
        """Log when this leader stops, and starts again, acknowledging (the fence decides)."""
        if not self.election.is_leader_now():
            if not self._lapsed:
                self._lapsed = True
                log.warning(
                    "stopped acknowledging writes as leader of term %s: its etcd lease was not "
                    "renewed in time; writes are answered NotLeader until it is, or another "
                    "node leads",
                    self._leading,
                )
        elif self._lapsed:
            self._lapsed = False
            log.warning("lease of term %s renewed: acknowledging writes again", self._leading)

    def _pause(self) -> float:
        """How long to wait for a change before looking again."""
        if self._leading is not None and not self._lapsed:  # wake at the lease's deadline
            deadline = self.election.leader_deadline()
            left = 0.0 if deadline is None else deadline - time.monotonic()
            return max(0.01, min(IDLE_CHECK_S, left))
        if self._lapsed or (self._known and self._seen is None):
            return self._retry_s()
        return IDLE_CHECK_S

    def _retry_s(self) -> float:
        return min(0.25, self.election.options.ttl_s / 4)

    # -- the transitions ----------------------------------------------------------------------

    async def _campaign(self) -> None:
        try:
            result = await self.election.campaign()
        except EtcdError as exc:
            log.debug("campaign failed: %s", exc)
            return
        if result.elected and result.leader is not None:
            self._seen = result.leader  # before the watch reports the key: not stale
            await self._lead(result.leader.term)
        elif result.outcome is Outcome.LED and result.leader is not None:
            self._seen = result.leader
            await self._follow(result.leader)
        else:
            self._log_refusal(f"{result.outcome.value}: {result.reason}")

    async def _lead(self, term: int) -> None:
        """Won *term*: stop following and lead.

        The election let this node win only if no live node holds more, and a
        majority's positions were seen (docs/CLUSTERING.md): it holds every
        acknowledged write. Commits the follower loop queued before it stopped
        are applied first (promotion is ordered after them in the writer).
        """
        if self._leading == term:
            return
        await self._stop_following()
        store = self.store
        try:
            await asyncio.to_thread(store.promote, term)
        except LetheError as exc:
            log.error("elected for term %d but cannot lead it: %s; resigning", term, exc)
            with contextlib.suppress(EtcdError):
                await self.election.resign()
            return
        self._leading, self._lapsed = term, False
        self._following = None
        store.leader = self.election.node.advertise  # what cluster status shows as the leader
        self.reads.mark_caught_up()
        log.info(
            "leading cluster %s at term %d; clients reach it at %s",
            self.election.options.cluster,
            term,
            self.election.node.advertise,
        )

    async def _demote(self, leader: Leader) -> None:
        """Stop leading: writes get NotLeader(*leader*), followers' streams end, reads wait
        until this node has caught up with *leader* (its own tail may go)."""
        term = self._leading
        self._leading, self._lapsed = None, False
        await self._record_leader(leader)
        self.replication.stepped_down()
        self.reads.reset()
        log.warning(
            "stepped down as leader of term %s: node %s leads term %d",
            term,
            leader.node.node_id,
            leader.term,
        )

    async def _record_leader(self, leader: Leader) -> None:
        """Make the store a follower of *leader*, its term recorded (NotLeader names it)."""
        store = self.store
        if leader.term > store.term or store.role != "follower":
            try:
                await asyncio.to_thread(store.demote, leader.node.advertise, leader.term)
            except LetheError as exc:
                log.error("cannot follow %s in term %d: %s", leader.node.node_id, leader.term, exc)
        store.leader = leader.node.advertise

    async def _follow(self, leader: Leader) -> None:
        """Follow *leader* (stepping down first if this node led)."""
        address = leader.node.replication_address
        if self._following == leader and self._loop is not None:
            return  # already following it (or stopped for an operator: not again)
        if self._leading is not None:
            await self._demote(leader)
        else:
            await self._record_leader(leader)
        await self._stop_following()
        self.follower.point_at(address)
        self._following = leader
        self._loop = asyncio.create_task(self.follower.run(), name="lethedb-follower")
        log.info(
            "following node %s at %s, leader of term %d", leader.node.node_id, address, leader.term
        )

    async def _stop_following(self) -> None:
        task, self._loop = self._loop, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _clear_stale_key(self, leader: Leader) -> None:
        """The leader key names this node, but not a term this process won: it is left by
        an earlier run of this node (the data directory's lock says that run is over).
        Deleting it ends that term now rather than a lease TTL later."""
        log.info("removing the leader key of term %d left by an earlier run", leader.term)
        with contextlib.suppress(EtcdError):
            await self.election.client.delete_if_created_at(self.election.keys.leader, leader.term)

    def _log_refusal(self, reason: str) -> None:
        last, at = self._refusal_logged
        now = time.monotonic()
        if reason != last or now - at >= REFUSAL_LOG_S:
            self._refusal_logged = (reason, now)
            log.info("not campaigning for now: %s", reason)
