"""A leader and a follower, as operators see them: ClusterStatus, Stats, metrics, the CLI,
and each node's erasure state on the leader's receipts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

import lethedb
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port

WAIT_S = 20.0
T = TypeVar("T")


@dataclass
class Node:
    proc: ServerProcess
    metrics_port: int

    @property
    def address(self) -> str:
        return self.proc.address

    def client(self) -> lethedb.Client:
        return lethedb.Client(self.address, max_retries=0)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def start_node(data: Path, node_id: str, *extra: str) -> Node:
    port = free_port()
    proc = ServerProcess(data, "--node-id", node_id, "--metrics-port", str(port), *extra)
    return Node(proc.start(), port)


def wait_for(what: str, probe: Callable[[], T], done: Callable[[T], bool]) -> T:
    """Poll *probe* until *done* holds, up to WAIT_S; fail naming *what* and the last value."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached in {WAIT_S}s; last seen: {value!r}")
        time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    leader = start_node(tmp_path / "leader", "db-a")
    follower: Node | None = None
    try:
        follower = start_node(tmp_path / "follower", "db-b", "--follow", leader.address)
        yield leader, follower
    finally:
        if follower is not None:
            follower.proc.stop()
        leader.proc.stop()


def caught_up_with(leader: Node, follower: Node) -> lethedb.ClusterStatus:
    """Wait until the follower has caught up and the leader has its ack of the head."""
    with leader.client() as db:
        head = db.admin.stats().last_position

    def acked(status: lethedb.ClusterStatus) -> bool:
        return [(f.node_id, f.position) for f in status.followers] == [("db-b", head)]

    with follower.client() as db:
        wait_for("the follower's catch-up", db.admin.cluster_status,
                 lambda s: s.caught_up and s.position == head)  # fmt: skip
    with leader.client() as db:
        return wait_for("the follower's ack of the head", db.admin.cluster_status, acked)


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples[(name, frozenset(labels.items()))]


def test_cluster_status_stats_metrics_and_the_cli_show_both_nodes(cluster):
    leader, follower = cluster
    with leader.client() as db:
        for i in range(5):
            db.append(f"order-{i}", [lethedb.Event("Placed", {"n": i}, subject_id=f"s-{i}")])

    status = caught_up_with(leader, follower)
    assert (status.node_id, status.role, status.term) == ("db-a", "leader", 1)
    assert status.position == 5
    (b,) = status.followers
    assert (b.connected, b.advertise, b.lag_positions) == (True, follower.address, 0)
    assert b.commit == status.commit
    assert b.connected_since > 0

    with follower.client() as db:
        own = db.admin.cluster_status()
        follower_stats = db.admin.stats()
    assert (own.node_id, own.role, own.leader) == ("db-b", "follower", leader.address)
    assert (own.connected, own.caught_up, own.lag_positions) == (True, True, 0)
    assert (own.commit, own.position, own.followers) == (status.commit, 5, ())
    assert (follower_stats.role, follower_stats.last_position) == ("follower", 5)

    with leader.client() as db:
        stats = db.admin.stats()
    assert (stats.role, stats.max_follower_lag_positions) == ("leader", 0)
    rows = [line.split("  ")[0] for line in cli("stats", "--server", leader.address)]
    assert rows[-2:] == ["role", "slowest follower lag"]

    samples = leader.metrics()
    assert value(samples, "lethedb_role", role="leader") == 1
    assert value(samples, "lethedb_role", role="single") == 0
    assert value(samples, "lethedb_term") == 1
    assert value(samples, "lethedb_journal_head") == status.commit
    assert value(samples, "lethedb_followers_connected") == 1
    assert value(samples, "lethedb_follower_connected", node_id="db-b") == 1
    assert value(samples, "lethedb_follower_lag_positions", node_id="db-b") == 0
    assert value(samples, "lethedb_follower_lag_seconds", node_id="db-b") == 0
    samples = follower.metrics()
    assert value(samples, "lethedb_role", role="follower") == 1
    assert value(samples, "lethedb_journal_head") == status.commit
    assert value(samples, "lethedb_leader_connected") == 1
    assert value(samples, "lethedb_caught_up") == 1
    assert value(samples, "lethedb_replication_lag_positions") == 0

    table = cli("cluster", "status", "--server", leader.address)
    assert table[0] == "term 1, sync replicas 0"
    assert table[1].split()[:3] == ["NODE", "ROLE", "ADDRESS"]
    assert table[2].split()[:3] == ["db-a", "leader", leader.address]
    assert table[3].split()[:3] == ["db-b", "follower", follower.address]
    assert len(table) == 4
    document = json.loads("\n".join(cli("cluster", "status", "--json", "--server",
                                         follower.address)))  # fmt: skip
    assert (document["role"], document["leader"], document["caught_up"]) == (
        "follower", leader.address, True
    )  # fmt: skip

    follower.proc.stop()
    with leader.client() as db:
        gone = wait_for("the follower's disconnection", db.admin.cluster_status,
                        lambda s: not s.followers[0].connected)  # fmt: skip
    assert gone.followers[0].connected_since == 0
    assert value(leader.metrics(), "lethedb_followers_connected") == 0
    assert cli("cluster", "status", "--server", leader.address)[3].split()[3] == "disconnected"

    with leader.client() as db:  # the leader moves on without it: its lag grows
        db.append("order-late", [lethedb.Event("Placed", {}) for _ in range(3)])
        behind = db.admin.cluster_status().followers[0]
        stats = db.admin.stats()
    assert behind.lag_positions == 3
    assert behind.lag_seconds > 0
    assert (stats.max_follower_lag_positions, stats.max_follower_lag_seconds > 0) == (3, True)
    samples = leader.metrics()
    assert value(samples, "lethedb_follower_lag_positions", node_id="db-b") == 3
    assert value(samples, "lethedb_follower_lag_seconds", node_id="db-b") > 0


def test_the_leaders_receipt_follows_the_erasure_onto_each_node(cluster):
    leader, follower = cluster
    with leader.client() as db:
        db.append("user-7", [lethedb.Event("Registered", {"email": "a@b.c"}, subject_id="u-7")])
        caught_up_with(leader, follower)
        active = db.get_subject("u-7")
        assert [(n.node_id, n.state, n.connected) for n in active.nodes] == [
            ("db-a", lethedb.SubjectState.ACTIVE, True),
            ("db-b", lethedb.SubjectState.ACTIVE, True),
        ]

        forgotten = db.forget_subject("u-7", reason="test")
        pending = lethedb.SubjectState.FORGOTTEN_PENDING_SHRED
        receipt = wait_for("the forget on the follower", lambda: db.get_subject("u-7"),
                           lambda r: r.nodes[1].state is pending)  # fmt: skip
        assert receipt.tombstone_position == forgotten.tombstone_position
        assert [n.state for n in receipt.nodes] == [pending, pending]

        db.admin.shred()
        receipt = db.get_subject("u-7")
        assert [n.state for n in receipt.nodes] == [lethedb.SubjectState.SHREDDED, pending]

        with follower.client() as on_follower:
            on_follower.admin.shred()
            assert on_follower.get_subject("u-7").nodes == ()  # a follower knows no nodes
        done = lethedb.SubjectState.SHREDDED
        shredded = wait_for("the follower's shred on the leader's receipt",
                            lambda: db.get_subject("u-7"),
                            lambda r: r.nodes[1].state is done)  # fmt: skip
        assert shredded.nodes[0].state is done
        shown = json.loads("\n".join(cli("subject", "u-7", "--server", leader.address)))
        assert shown["nodes"] == [
            {"node_id": "db-a", "state": "shredded", "connected": True},
            {"node_id": "db-b", "state": "shredded", "connected": True},
        ]

        follower.proc.stop()
        receipt = wait_for("the follower's disconnection", lambda: db.get_subject("u-7"),
                           lambda r: not r.nodes[1].connected)  # fmt: skip
        assert receipt.nodes[1].state is lethedb.SubjectState.SHREDDED  # as last reported


def cli(*args: str) -> list[str]:
    """Run the ``lethedb`` command; its output lines (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "lethedb_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()
