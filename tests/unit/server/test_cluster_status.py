"""What a node reports of its cluster: the per-node erasure rule and the wire conversions."""

from __future__ import annotations

import time

import pytest

import lethedb
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.api import messages
from lethedb_server.api.follower import Follower, FollowSettings
from lethedb_server.api.head_watch import HeadWatch, ReadGate
from lethedb_server.engine.cluster import (
    ClusterView,
    FollowerLag,
    LeaderLink,
    NodeErasure,
    node_erasure_state,
    shown_role,
    slowest_follower,
    subject_nodes,
)
from lethedb_server.engine.model import AppendCommand, ProposedEvent, SubjectReceipt, SubjectState
from lethedb_server.engine.replication import FollowerState
from lethedb_server.engine.store import Store, StoreStats
from lethedb_server.ops.cli import cluster_table

TOMBSTONE = 100


def follower(
    node_id: str = "f1",
    *,
    position: int = 0,
    shredded_through: int = 0,
    connected: bool = True,
    lag_positions: int = 0,
    lag_seconds: float = 0.0,
) -> FollowerState:
    return FollowerState(
        node_id=node_id,
        advertise=f"{node_id}.example:7001",
        connected=connected,
        connected_since=1_700_000_000_000_000_000 if connected else 0,
        commit=position // 2,
        position=position,
        acked_at=1_700_000_001_000_000_000,
        shredded_through=shredded_through,
        lag_positions=lag_positions,
        lag_seconds=lag_seconds,
    )


def forgotten(state: SubjectState = SubjectState.FORGOTTEN_PENDING_SHRED) -> SubjectReceipt:
    return SubjectReceipt("s-1", state, tombstone_position=TOMBSTONE, forgotten_at=5)


@pytest.mark.parametrize(
    ("position", "shredded_through", "state"),
    [
        (0, 0, SubjectState.ACTIVE),  # never acked anything
        (TOMBSTONE - 1, 0, SubjectState.ACTIVE),  # acked up to just before the forget
        (TOMBSTONE, 0, SubjectState.FORGOTTEN_PENDING_SHRED),  # holds the tombstone
        (TOMBSTONE + 50, TOMBSTONE - 1, SubjectState.FORGOTTEN_PENDING_SHRED),  # epoch too early
        (TOMBSTONE, TOMBSTONE, SubjectState.SHREDDED),  # its epoch started at the tombstone
        (TOMBSTONE + 50, TOMBSTONE + 40, SubjectState.SHREDDED),
    ],
)
def test_a_followers_erasure_state_follows_its_acked_and_shredded_positions(
    position, shredded_through, state
):
    f = follower(position=position, shredded_through=shredded_through)
    assert node_erasure_state(TOMBSTONE, f) is state


def test_a_subject_never_forgotten_is_active_on_every_follower_however_far_they_are():
    f = follower(position=10_000, shredded_through=10_000)
    assert node_erasure_state(0, f) is SubjectState.ACTIVE
    nodes = subject_nodes(SubjectReceipt("s-1", SubjectState.ACTIVE), "leader", [f])
    assert [n.state for n in nodes] == [SubjectState.ACTIVE, SubjectState.ACTIVE]


def test_the_leader_lists_itself_first_then_each_follower_with_its_connection():
    followers = [
        follower("f1", position=TOMBSTONE + 1, shredded_through=TOMBSTONE + 1),
        follower("f2", position=TOMBSTONE - 1, connected=False),
        follower("f3", position=TOMBSTONE),
    ]
    nodes = subject_nodes(forgotten(SubjectState.SHREDDED), "leader-a", followers)
    assert nodes == (
        NodeErasure("leader-a", SubjectState.SHREDDED, connected=True),
        NodeErasure("f1", SubjectState.SHREDDED, connected=True),
        NodeErasure("f2", SubjectState.ACTIVE, connected=False),
        NodeErasure("f3", SubjectState.FORGOTTEN_PENDING_SHRED, connected=True),
    )


def test_a_leader_without_followers_lists_only_itself():
    assert subject_nodes(forgotten(), "solo", []) == (
        NodeErasure("solo", SubjectState.FORGOTTEN_PENDING_SHRED, connected=True),
    )


def test_the_receipt_on_the_wire_carries_every_nodes_state_in_order():
    nodes = (
        NodeErasure("leader-a", SubjectState.SHREDDED, connected=True),
        NodeErasure("f2", SubjectState.ACTIVE, connected=False),
    )
    message = messages.subject_receipt(forgotten(SubjectState.SHREDDED), nodes)
    assert [(n.node_id, n.state, n.connected) for n in message.nodes] == [
        ("leader-a", pb.SUBJECT_SHREDDED, True),
        ("f2", pb.SUBJECT_ACTIVE, False),
    ]
    assert message.tombstone_position == TOMBSTONE


def test_a_receipt_without_nodes_has_an_empty_list():
    assert len(messages.subject_receipt(forgotten()).nodes) == 0


@pytest.mark.parametrize(
    ("role", "has_followers", "shown"),
    [
        ("single", False, "single"),
        ("single", True, "leader"),  # a node needs no flag to be followed
        ("leader", False, "leader"),  # sync_replicas set, no follower yet
        ("follower", False, "follower"),
    ],
)
def test_a_node_that_followers_joined_is_reported_as_their_leader(role, has_followers, shown):
    assert shown_role(role, [follower()] if has_followers else []) == shown


def test_the_slowest_follower_sets_each_lag_on_its_own():
    followers = [
        follower("f1", lag_positions=30, lag_seconds=0.5),
        follower("f2", lag_positions=2, lag_seconds=4.0, connected=False),
    ]
    assert slowest_follower(followers) == FollowerLag(positions=30, seconds=4.0)
    assert slowest_follower([]) == FollowerLag(positions=0, seconds=0.0)


def test_stats_on_the_wire_carry_the_role_and_the_slowest_followers_lag():
    stats = StoreStats(
        last_position=9,
        streams=2,
        subjects=1,
        forgotten_subjects=0,
        pending_shred=0,
        shred_epoch=0,
        master_version=1,
        log_file_bytes=4096,
        log_map_bytes=1 << 20,
        key_file_bytes=4096,
        store_id=b"\x01" * 16,
    )
    message = messages.stats_response(stats, "leader", FollowerLag(7, 1.25))
    assert (message.role, message.max_follower_lag_positions) == ("leader", 7)
    assert message.max_follower_lag_seconds == 1.25
    assert message.last_position == 9
    assert message.store_id == b"\x01" * 16


def test_cluster_status_of_a_leader_lists_its_followers():
    view = ClusterView(
        node_id="leader-a",
        role="leader",
        term=1,
        leader="",
        commit=12,
        position=40,
        sync_replicas=1,
        followers=(
            follower("f1", position=40),
            follower("f2", position=30, connected=False, lag_positions=10, lag_seconds=2.5),
        ),
    )
    message = messages.cluster_status_response(view)
    assert (message.node_id, message.role, message.term) == ("leader-a", "leader", 1)
    assert (message.commit, message.position, message.sync_replicas) == (12, 40, 1)
    assert (message.connected, message.caught_up) == (False, False)
    f1, f2 = message.followers
    assert (f1.node_id, f1.advertise, f1.connected) == ("f1", "f1.example:7001", True)
    assert f1.connected_since == 1_700_000_000_000_000_000
    assert (f1.commit, f1.position, f1.lag_positions) == (20, 40, 0)
    assert (f2.connected, f2.connected_since) == (False, 0)
    assert (f2.lag_positions, f2.lag_seconds) == (10, 2.5)


def test_cluster_status_of_a_follower_reports_its_link_and_no_followers():
    link = LeaderLink(connected=True, caught_up=True, lag_positions=3, lag_seconds=0.02)
    view = ClusterView(
        node_id="f1",
        role="follower",
        term=1,
        leader="db-a:7000",
        commit=11,
        position=37,
        sync_replicas=0,
        followers=(),
        link=link,
    )
    message = messages.cluster_status_response(view)
    assert (message.role, message.leader) == ("follower", "db-a:7000")
    assert (message.connected, message.caught_up) == (True, True)
    assert (message.lag_positions, message.lag_seconds) == (3, 0.02)
    assert len(message.followers) == 0


#: 2026-12-07T00:00:00Z in ns since the epoch.
SINCE = 1_796_601_600 * 1_000_000_000


def _sdk_status(**fields: object) -> lethedb.ClusterStatus:
    defaults: dict[str, object] = {
        "node_id": "db-a", "role": "leader", "term": 1, "leader": "", "commit": 12,
        "position": 4200, "followers": (), "connected": False, "caught_up": False,
        "lag_positions": 0, "lag_seconds": 0.0, "sync_replicas": 1,
    }  # fmt: skip
    return lethedb.ClusterStatus(**{**defaults, **fields})  # type: ignore[arg-type]


def test_the_cluster_table_has_a_row_per_node_the_asked_one_first():
    gone = lethedb.FollowerStatus(
        "db-c", "db-c:7000", False, 0, 10, 4000, 200, 3.25, 0
    )  # fmt: skip
    live = lethedb.FollowerStatus(
        "db-b", "db-b:7000", True, SINCE, 12, 4200, 0, 0.0, 4100
    )  # fmt: skip
    lines = cluster_table(_sdk_status(followers=(live, gone)), "db-a:7000")
    assert lines[0] == "term 1, sync replicas 1"
    assert lines[1].split() == [
        "NODE", "ROLE", "ADDRESS", "CONNECTED", "SINCE", "COMMIT", "POSITION", "LAG", "LAG",
        "SECONDS",
    ]  # fmt: skip
    assert lines[2].split() == [
        "db-a", "leader", "db-a:7000", "(asked)", "12", "4,200", "0", "0.000"
    ]  # fmt: skip
    assert lines[3].split() == [
        "db-b", "follower", "db-b:7000", "2026-12-07T00:00:00Z", "12", "4,200", "0", "0.000"
    ]  # fmt: skip
    assert lines[4].split() == [
        "db-c", "follower", "db-c:7000", "disconnected", "10", "4,000", "200", "3.250"
    ]  # fmt: skip
    # Columns line up: each row's second cell starts where the header's does.
    role_column = lines[1].index("ROLE")
    assert [line[role_column:].split()[0] for line in lines[1:]] == [
        "ROLE", "leader", "follower", "follower"
    ]  # fmt: skip


def test_a_follower_says_whether_it_is_linked_and_caught_up():
    status = _sdk_status(
        node_id="db-b", role="follower", leader="db-a:7000", connected=True, caught_up=False,
        lag_positions=30, lag_seconds=0.5, sync_replicas=0,
    )  # fmt: skip
    lines = cluster_table(status, "db-b:7000")
    assert lines[0] == (
        "term 1, sync replicas 0; leader db-a:7000: connected, NOT caught up (reads refused)"
    )
    assert lines[2].split()[-2:] == ["30", "0.500"]
    assert len(lines) == 3


def test_a_followers_link_dates_its_lag_by_the_oldest_commit_it_has_not_made_durable(
    store: Store,
):
    watch = HeadWatch(store)
    follower = Follower(
        store,
        FollowSettings("127.0.0.1:9", "db-b", "127.0.0.1:8"),
        watch,
        ReadGate(store, watch, follower=True),
    )
    assert follower.link() == LeaderLink(False, False, 0, 0.0)  # before any welcome

    follower.leader_position = store.head + 7  # as a heartbeat says
    held = store.journal_head()
    follower._note_received(held + 1, time.time_ns() - 60 * 10**9)  # a minute old
    follower._note_received(held + 2, time.time_ns())
    link = follower.link()
    assert link.lag_positions == 7
    assert link.lag_seconds >= 60

    # Commits become durable here (this store's own writer stands in for applies).
    append(store)
    assert store.journal_head() == held + 1
    assert follower.link().lag_seconds < 60, "the next oldest commit dates the lag"
    append(store)
    assert follower.link().lag_seconds == 0.0
    assert follower.link().lag_positions == 5


def append(store: Store) -> None:
    event = ProposedEvent(b"", "Happened", "", "application/json", b"{}", b"")
    store.writer.append(AppendCommand("linked", (event,)), timeout=10.0)
