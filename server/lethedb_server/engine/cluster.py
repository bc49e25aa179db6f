"""The cluster as one node sees it: for ClusterStatus, Stats, metrics and receipts.

Plain values and pure rules, no grpc and no I/O: the api layer gathers the
inputs (the store's role, term and followers; on a follower, its link to the
leader) and converts the result to the wire. Kept apart from the replication
machinery (engine/replication.py) because these are read-only views of it.

The per-node erasure rule (:func:`node_erasure_state`) is what lets a leader
answer "is this subject erased everywhere?": a follower that has acked a
position before the tombstone has not received the forget yet; one that has
applied it but whose last completed shred epoch started before the tombstone
still holds stale key copies until its next epoch; otherwise it is done there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lethedb_server.engine.model import SubjectReceipt, SubjectState
from lethedb_server.engine.replication import FollowerState

if TYPE_CHECKING:
    from lethedb_server.engine.store import Store

#: StoreOptions.role values (the store refuses any other).
LEADER = "leader"
FOLLOWER = "follower"
SINGLE = "single"


@dataclass(frozen=True, slots=True)
class NodeErasure:
    """Where one node stands in a subject's erasure (as last reported by it)."""

    node_id: str
    state: SubjectState
    #: False when the node is not connected now: its state is as last reported.
    connected: bool


@dataclass(frozen=True, slots=True)
class LeaderLink:
    """A follower's view of its leader (from the follower loop)."""

    connected: bool
    #: It has once applied the commit the leader's welcome named (it serves reads).
    caught_up: bool
    lag_positions: int
    lag_seconds: float


#: What a node reports before its follower loop has run (or when it is not a follower).
NO_LINK = LeaderLink(connected=False, caught_up=False, lag_positions=0, lag_seconds=0.0)


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Everything ``Admin.ClusterStatus`` answers."""

    node_id: str
    role: str
    term: int
    leader: str
    commit: int
    position: int
    sync_replicas: int
    #: On a leader, every follower it knows; empty elsewhere.
    followers: tuple[FollowerState, ...]
    #: On a follower, its link to the leader; NO_LINK elsewhere.
    link: LeaderLink = NO_LINK


@dataclass(frozen=True, slots=True)
class FollowerLag:
    """The slowest follower's lag (StatsResponse.max_follower_lag_*); zeros without followers."""

    positions: int
    seconds: float


def node_erasure_state(tombstone_position: int, follower: FollowerState) -> SubjectState:
    """The state on *follower* of a subject whose tombstone is at *tombstone_position*.

    A position of 0 means the subject was not forgotten: active everywhere.
    """
    if tombstone_position == 0 or follower.position < tombstone_position:
        return SubjectState.ACTIVE
    if follower.shredded_through < tombstone_position:
        return SubjectState.FORGOTTEN_PENDING_SHRED
    return SubjectState.SHREDDED


def subject_nodes(
    receipt: SubjectReceipt, node_id: str, followers: Sequence[FollowerState]
) -> tuple[NodeErasure, ...]:
    """The erasure state of *receipt*'s subject on every node a leader knows.

    This node first, with its own state, then each follower in the order given.
    """
    tombstone = receipt.tombstone_position if receipt.state is not SubjectState.ACTIVE else 0
    own = NodeErasure(node_id, receipt.state, connected=True)
    others = (
        NodeErasure(f.node_id, node_erasure_state(tombstone, f), f.connected) for f in followers
    )
    return (own, *others)


def shown_role(role: str, followers: Sequence[FollowerState]) -> str:
    """The role reported for a node whose store has *role* and has seen *followers*.

    A node needs no flag to be followed: one started without ``follow`` or
    ``sync_replicas`` runs as "single" until a follower joins, and from then
    on it leads that follower, so it is reported as the leader.
    """
    return LEADER if role == SINGLE and followers else role


def slowest_follower(followers: Sequence[FollowerState]) -> FollowerLag:
    """The largest lag among *followers*, in positions and in seconds (each on its own)."""
    return FollowerLag(
        positions=max((f.lag_positions for f in followers), default=0),
        seconds=max((f.lag_seconds for f in followers), default=0.0),
    )


class LinkSource(Protocol):
    """What a follower's loop tells about its leader link (api/follower.py implements it)."""

    def link(self) -> LeaderLink: ...


@dataclass
class ClusterNode:
    """This node's identity in the cluster, and where its views come from.

    One is shared by the Admin and EventStore services and the metrics: the
    node id is configured (or derived) once; ``follower`` is set when the
    follower loop starts, so a follower reports its link from then on.
    """

    node_id: str = ""
    sync_replicas: int = 0
    follower: LinkSource | None = None

    def view(self, store: Store) -> ClusterView:
        """The cluster as this node sees it now (blocking: reads the store)."""
        followers = self.followers(store)
        role = shown_role(store.role, followers)
        return ClusterView(
            node_id=self.node_id,
            role=role,
            term=store.term,
            leader=store.leader,
            commit=store.journal_head(),
            position=store.log_head,
            sync_replicas=self.sync_replicas,
            followers=tuple(followers),
            link=self.link() if role == FOLLOWER else NO_LINK,
        )

    @staticmethod
    def followers(store: Store) -> list[FollowerState]:
        """Every follower this node has seen (none on a follower)."""
        return [] if store.role == FOLLOWER else store.followers()

    def role(self, store: Store) -> str:
        """This node's role as operators see it (see :func:`shown_role`)."""
        return shown_role(store.role, self.followers(store))

    def link(self) -> LeaderLink:
        """The follower loop's view of the leader; NO_LINK before the loop runs."""
        return NO_LINK if self.follower is None else self.follower.link()

    def subject_nodes(self, store: Store, receipt: SubjectReceipt) -> tuple[NodeErasure, ...]:
        """Per-node erasure states for a receipt, on a node that has (or may have) followers.

        Empty on a follower (it knows no other node) and on a single node
        that no follower ever joined.
        """
        followers = self.followers(store)
        if shown_role(store.role, followers) != LEADER:
            return ()
        return subject_nodes(receipt, self.node_id, followers)

    def follower_lag(self, store: Store) -> FollowerLag:
        """On a leader, its slowest follower's lag; zeros elsewhere."""
        return slowest_follower(self.followers(store))
