"""Leader election through etcd: one leader per term, a term that only grows.

The keys of a cluster named C (docs/CLUSTERING.md, "Coordinator: etcd"):

* ``/lethedb/C/leader``: the leader's :class:`NodeInfo`, attached to its lease.
  Whoever creates it leads; its create revision is the **term**. etcd revisions
  only grow, so every new leader has a higher term than every earlier one.
* ``/lethedb/C/term``: written (without lease) in the same transaction as the
  leader key, so its mod revision is the latest term, still readable once that
  leader is gone.
* ``/lethedb/C/nodes/<node_id>``: each live node's durable progress
  (term, commit, position) under its lease, and the term it saw end before
  reading that progress.

Two rules make the election safe for acknowledged writes:

* **Step-down on the own clock.** A lease renewal sent at ``t`` that etcd
  answers keeps the lease alive until at least ``t + ttl`` (etcd counts from
  when it received it, which is later). The leader considers itself leader only
  until ``t + ttl - margin`` by its own monotonic clock: when etcd cannot be
  reached it stops acknowledging before etcd can let the key expire and elect
  another node. :meth:`Election.is_leader_now` is that check.
* **Only an up-to-date node campaigns.** A node campaigns only when no live node
  has published a greater (term, commit), and only after it has seen
  ``quorum`` positions (its own included) read after the last leader was gone;
  the transaction that makes it leader fails if another election happened
  meanwhile. With ``quorum`` a majority and ``sync_replicas`` a majority less
  the leader, the new leader holds every acknowledged write (the argument is in
  docs/CLUSTERING.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum

from lethedb_server.coord.endpoints import DEFAULT_TTL_S
from lethedb_server.coord.etcd import EtcdClient, EtcdError, EventKind, KeyValue

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: The lease's time to live unless configured: a few seconds, as issue 22 asks.


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Who a node is: its stable id, the address clients reach it at, and the address
    followers replicate from when it leads (*replication*; empty: the same as *advertise*,
    unless a separate network or a proxy carries replication)."""

    node_id: str
    advertise: str
    replication: str = ""

    @property
    def replication_address(self) -> str:
        """Where a follower dials this node when it leads."""
        return self.replication or self.advertise


@dataclass(frozen=True, slots=True)
class Progress:
    """A node's durable replication state: its last journal entry's term and commit, its head.

    Nodes are compared on (term, commit), as Raft compares logs: a later term
    wins, and within a term the longer log. The head breaks a tie only where
    the journal cannot: a store that predates the journal (commit 0) holding
    records must outrank an empty node, or an upgraded node's history would
    lose the first election to an empty newcomer.
    """

    term: int
    commit: int
    position: int

    def rank(self) -> tuple[int, int, int]:
        return (self.term, self.commit, self.position)


@dataclass(frozen=True, slots=True)
class Leader:
    """The current leader and its term (the leader key's create revision)."""

    node: NodeInfo
    term: int


@dataclass(frozen=True, slots=True)
class PublishedNode:
    """A live node's published progress, and the last term it saw end before reading it."""

    node: NodeInfo
    progress: Progress
    after_term: int


class Outcome(Enum):
    ELECTED = "elected"
    LED = "another node leads"
    BEHIND = "a live node is more advanced"
    TOO_FEW = "too few positions seen since the last leader went"
    RACED = "another election happened meanwhile"


@dataclass(frozen=True, slots=True)
class CampaignResult:
    outcome: Outcome
    leader: Leader | None = None
    reason: str = ""

    @property
    def elected(self) -> bool:
        return self.outcome is Outcome.ELECTED


@dataclass(frozen=True, slots=True)
class ElectionOptions:
    """How a node takes part in the election of cluster *cluster*.

    ``ttl_s``: the lease's time to live (whole seconds, as etcd counts them);
    ``margin_s``: how long before the lease could expire the leader stops
    acknowledging (covers clock-rate differences and the time a check takes);
    ``renew_every_s``: the interval of lease renewals (default a third of the TTL);
    ``quorum``: how many nodes' fresh positions, its own included, a candidate
    must have seen (a majority of the cluster when sync_replicas is a majority less one).
    """

    cluster: str
    ttl_s: int = DEFAULT_TTL_S
    margin_s: float = 1.0
    renew_every_s: float | None = None
    quorum: int = 1

    def __post_init__(self) -> None:
        if not self.cluster or "/" in self.cluster:
            raise ValueError(f"cluster name {self.cluster!r} must be non-empty without '/'")
        if self.ttl_s < 1:
            raise ValueError(f"the lease TTL must be at least 1 s, not {self.ttl_s}")
        if not 0 < self.margin_s < self.ttl_s:
            raise ValueError(f"the margin must be between 0 and the TTL, not {self.margin_s}")
        if self.quorum < 1:
            raise ValueError(f"quorum must be at least 1, not {self.quorum}")

    @property
    def renew_interval_s(self) -> float:
        return self.renew_every_s if self.renew_every_s is not None else self.ttl_s / 3


class ClusterKeys:
    """The etcd keys of one cluster."""

    def __init__(self, cluster: str) -> None:
        root = f"/lethedb/{cluster}/"
        self.leader = f"{root}leader".encode()
        self.term = f"{root}term".encode()
        self.nodes = f"{root}nodes/".encode()

    def node(self, node_id: str) -> bytes:
        return self.nodes + node_id.encode()


def encode_node(node: NodeInfo) -> bytes:
    data = {"node_id": node.node_id, "advertise": node.advertise}
    if node.replication:
        data["replication"] = node.replication
    return json.dumps(data).encode()


def decode_leader(kv: KeyValue) -> Leader:
    data = json.loads(kv.value)
    node = NodeInfo(data["node_id"], data["advertise"], data.get("replication", ""))
    return Leader(node, kv.create_revision)


def encode_published(node: NodeInfo, progress: Progress, after_term: int) -> bytes:
    return json.dumps(
        {
            "node_id": node.node_id,
            "advertise": node.advertise,
            "term": progress.term,
            "commit": progress.commit,
            "position": progress.position,
            "after_term": after_term,
        }
    ).encode()


def decode_published(kv: KeyValue) -> PublishedNode:
    data = json.loads(kv.value)
    return PublishedNode(
        NodeInfo(data["node_id"], data["advertise"]),
        Progress(data["term"], data["commit"], data["position"]),
        data["after_term"],
    )


def campaign_refusal(
    me: NodeInfo, mine: Progress, nodes: list[PublishedNode], last_term: int, quorum: int
) -> CampaignResult | None:
    """Why *me* (at *mine*) may not campaign, or None when it may.

    *nodes*: every live node's publication (*me*'s included); *last_term*: the
    last term, seen over together with the leader key's absence. Refused when
    a live node is more advanced, whatever its publication's age (it only
    grows), or when fewer than *quorum* publications were read after
    *last_term* ended.
    """
    ahead = [n for n in nodes if n.node.node_id != me.node_id and n.progress.rank() > mine.rank()]
    if ahead:
        best = max(ahead, key=lambda n: n.progress.rank())
        reason = (
            f"node {best.node.node_id} is at term {best.progress.term} commit"
            f" {best.progress.commit}, this node at term {mine.term} commit {mine.commit}"
        )
        return CampaignResult(Outcome.BEHIND, reason=reason)
    fresh = sum(1 for n in nodes if n.after_term == last_term)
    if fresh < quorum:
        reason = f"{fresh} of the {quorum} positions needed since term {last_term}"
        return CampaignResult(Outcome.TOO_FEW, reason=reason)
    return None


class Election:
    """One node's part in its cluster's election: its lease, its published progress, its term.

    ``progress`` returns the node's durable progress; it is called each time
    the node campaigns, after it has seen that no leader exists, so what it
    publishes includes every write it acknowledged to the last leader.
    Call :meth:`start` first and :meth:`close` (or :meth:`abandon`) last.
    """

    def __init__(
        self,
        client: EtcdClient,
        node: NodeInfo,
        options: ElectionOptions,
        progress: Callable[[], Progress],
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.client = client
        self.node = node
        self.options = options
        self.keys = ClusterKeys(options.cluster)
        self._progress = progress
        self._clock = clock
        self._lease = 0
        self._lease_valid_until = 0.0  # own clock: the lease cannot expire in etcd before
        self._term: int | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._renewing = asyncio.Lock()

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        """Take a lease and keep renewing it in the background."""
        await self._new_lease()
        self._renewer = asyncio.create_task(self._renew_forever())

    async def close(self) -> None:
        """Leave cleanly: resign if leading and revoke the lease (the node key goes with it)."""
        await self._stop_renewing()
        lease, self._lease = self._lease, 0
        with contextlib.suppress(EtcdError):
            await self.resign()
            if lease:
                await self.client.revoke_lease(lease)

    async def abandon(self) -> None:
        """Stop renewing without resigning, as a crashed node would: the lease runs out."""
        await self._stop_renewing()
        self._step_down("abandoned")

    async def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    # -- leadership as this node sees it ---------------------------------------

    @property
    def term(self) -> int | None:
        """The term this node won and has not seen end (it may have lapsed: see is_leader_now)."""
        return self._term

    def leader_deadline(self) -> float | None:
        """Until when (own monotonic clock) this node may acknowledge writes; None: not leader."""
        if self._term is None:
            return None
        return self._lease_valid_until

    def is_leader_now(self) -> bool:
        """Whether this node may acknowledge a write now. Safe to call from any thread."""
        deadline = self.leader_deadline()
        return deadline is not None and self._clock() < deadline

    # -- etcd's view -------------------------------------------------------------

    async def leader(self) -> Leader | None:
        """The leader etcd holds now (None while there is none)."""
        kv, _ = await self.client.get(self.keys.leader)
        current = decode_leader(kv) if kv is not None else None
        self._note(current)
        return current

    async def nodes(self) -> list[PublishedNode]:
        """Every live node's published progress (nodes whose lease has expired are gone)."""
        kvs, _ = await self.client.get_prefix(self.keys.nodes)
        return [decode_published(kv) for kv in kvs]

    async def observe(self, retry_s: float = 0.2) -> AsyncIterator[Leader | None]:
        """The leader now, then each change (None: no leader), across etcd outages, forever.

        After an outage it yields the leader as etcd then holds it, so a change
        missed while disconnected is never lost, only coalesced.
        """
        while True:
            try:
                kv, revision = await self.client.get(self.keys.leader)
                current = decode_leader(kv) if kv is not None else None
                self._note(current)
                yield current
                async for event in self.client.watch(self.keys.leader, start_revision=revision + 1):
                    current = None if event.kind is EventKind.DELETE else decode_leader(event.kv)
                    self._note(current)
                    yield current
            except EtcdError as error:
                log.debug("leader watch interrupted: %s", error)
                await asyncio.sleep(retry_s)

    # -- campaigning ---------------------------------------------------------------

    async def campaign(self) -> CampaignResult:
        """Try once to become leader; the result says why not when it did not."""
        if self._clock() >= self._lease_valid_until:
            # Unrenewed for a while (etcd was out of reach): the lease may be gone, or
            # about to be, with the leader key it holds; know which before going on.
            await self._renew()
        (leader_kv, term_kv), _ = await self.client.get_many(self.keys.leader, self.keys.term)
        if leader_kv is not None:
            return self._found_leader(leader_kv)
        last_term = term_kv.mod_revision if term_kv is not None else 0
        mine = self._progress()
        await self.client.put(
            self.keys.node(self.node.node_id),
            encode_published(self.node, mine, last_term),
            self._lease,
        )
        refusal = campaign_refusal(
            self.node, mine, await self.nodes(), last_term, self.options.quorum
        )
        if refusal is not None:
            return refusal
        result = await self.client.put_if_absent(
            self.keys.leader,
            encode_node(self.node),
            self._lease,
            also_put=[(self.keys.term, self.node.node_id.encode())],
            unchanged=[(self.keys.term, last_term)],
        )
        if result.kv is not None:
            return self._found_leader(result.kv)
        return CampaignResult(Outcome.RACED, reason="a leader came and went meanwhile")

    def _found_leader(self, kv: KeyValue) -> CampaignResult:
        leader = decode_leader(kv)
        if kv.lease == self._lease:
            if self._term != leader.term:
                log.info("elected leader of %s, term %d", self.options.cluster, leader.term)
            self._term = leader.term
            return CampaignResult(Outcome.ELECTED, leader)
        self._note(leader)
        return CampaignResult(
            Outcome.LED, leader, f"{leader.node.node_id} leads term {leader.term}"
        )

    async def campaign_until_elected(self, retry_s: float | None = None) -> int:
        """Campaign until elected (cancel to give up); the term won."""
        pause = retry_s if retry_s is not None else min(0.25, self.options.ttl_s / 4)
        while True:
            try:
                result = await self.campaign()
            except EtcdError as error:
                log.debug("campaign failed: %s", error)
            else:
                if result.elected and result.leader is not None:
                    return result.leader.term
            await asyncio.sleep(pause)

    async def resign(self) -> None:
        """Give up leadership now (the lease and the node key stay)."""
        term, self._term = self._term, None
        if term is not None:
            await self.client.delete_if_created_at(self.keys.leader, term)
            log.info("resigned leadership of %s, term %d", self.options.cluster, term)

    # -- the lease -------------------------------------------------------------------

    async def _new_lease(self) -> None:
        sent_at = self._clock()
        self._lease, ttl = await self.client.grant_lease(self.options.ttl_s)
        self._lease_valid_until = sent_at + ttl - self.options.margin_s

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.renew_interval_s)
            try:
                await self._renew()
            except EtcdError as error:
                log.warning("etcd lease renewal failed: %s", error)

    async def _renew(self) -> None:
        """Renew the lease (one renewal at a time); if leading, check the key is still its own."""
        async with self._renewing:
            if not self._lease:
                await self._new_lease()
                return
            sent_at = self._clock()
            ttl = await self.client.keep_alive_once(self._lease, self.options.renew_interval_s)
            if ttl <= 0:
                log.warning("etcd lease of node %s expired", self.node.node_id)
                self._lease = 0
                self._step_down("its lease expired")
                await self._new_lease()
                return
            if self._term is not None:
                kv, _ = await self.client.get(self.keys.leader)
                if kv is None or kv.create_revision != self._term:
                    self._step_down("the leader key is no longer its own")
            self._lease_valid_until = sent_at + ttl - self.options.margin_s

    def _note(self, current: Leader | None) -> None:
        """A leader seen in etcd: if this node led another term, that term is over."""
        if self._term is not None and (current is None or current.term != self._term):
            self._step_down("etcd shows another leader or none")

    def _step_down(self, why: str) -> None:
        if self._term is not None:
            log.warning("stepped down from term %d: %s", self._term, why)
            self._term = None
