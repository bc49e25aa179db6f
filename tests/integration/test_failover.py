"""Automatic failover on loopback: a real etcd, three real server processes.

* The leader SIGKILLed: another node leads a higher term, and a client that
  knows the three hosts keeps appending (idempotency keys) without losing
  an acknowledged write; the old leader, started again, rejoins as a
  follower and ends byte-identical to the others.
* The leader SIGSTOPped past its lease, then SIGCONTed: it acknowledges
  nothing while stopped out, rejoins as a follower of the new leader and
  discards the tail it had committed alone (the log line says so).

Leases are 2 s, so each election takes a few seconds; every wait is bounded
and names what it waited for. The harness is tests/integration/failover_cluster.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import lethedb
from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from tests.etcdproc import EtcdProcess, etcd_binary
from tests.integration.cluster import Node, assert_same_log
from tests.integration.failover_cluster import WAIT_S, ElectedCluster

STREAM = "failover-orders"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    process = EtcdProcess(tmp_path / "etcd", etcd_binary()).start()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdProcess) -> Iterator[ElectedCluster]:
    with ElectedCluster(tmp_path / "cluster", etcd) as running:
        yield running


class Appender(threading.Thread):
    """Appends one event after another through an SDK client that knows every host.

    Each append has its own idempotency key; every one the server acknowledged
    is recorded with its number, so the test can look for each in the log.
    """

    def __init__(self, client: lethedb.Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.acknowledged: list[int] = []
        self.errors: list[BaseException] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        number = 0
        while not self._stop_event.is_set():
            number += 1
            event = lethedb.Event("OrderPlaced", {"n": number})
            try:
                self.client.append(STREAM, [event], idempotency_key=f"order-{number}")
            except lethedb.LetheError as exc:  # past the client's deadline: reported, not hidden
                self.errors.append(exc)
                return
            self.acknowledged.append(number)

    def wait_for(self, count: int, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        target = len(self.acknowledged) + count
        while len(self.acknowledged) < target:
            if self.errors:
                raise AssertionError(f"{what}: the appender failed: {self.errors[0]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: only {len(self.acknowledged)} of {target} appends acknowledged "
                    f"within {WAIT_S:g}s"
                )
            time.sleep(0.02)

    def finish(self) -> list[int]:
        self._stop_event.set()
        self.join(WAIT_S)
        assert not self.is_alive(), "the appender did not stop"
        assert not self.errors, f"an append failed instead of riding through: {self.errors[0]}"
        return self.acknowledged


def numbers_in_log(client: lethedb.Client) -> list[int]:
    """The order numbers of the stream's events, in log order."""
    return [event.json()["n"] for event in client.read_stream(STREAM)]


def assert_identical(nodes: list[Node]) -> None:
    first, *others = nodes
    for other in others:
        assert_same_log(first.data_dir, other.data_dir)


def test_killed_leader_is_replaced_and_no_acknowledged_append_is_lost(
    cluster: ElectedCluster,
) -> None:
    old_leader, old_term = cluster.wait_leader()
    with cluster.client() as client:
        appender = Appender(client)
        appender.start()
        appender.wait_for(20, "before the failover")

        cluster.kill(old_leader)
        killed_at = time.monotonic()
        survivors = [n for n in cluster.nodes if n is not old_leader]
        new_leader, new_term = cluster.wait_leader(above_term=old_term, among=survivors)
        elected_after = time.monotonic() - killed_at
        appender.wait_for(20, f"after {new_leader.name} took over in {elected_after:.1f}s")

        cluster.start_again(old_leader)
        acknowledged = appender.finish()
        leader = cluster.wait_following(old_leader)
        for node in cluster.nodes:
            if node is not leader:
                assert cluster.wait_following(node) is leader
        logged = numbers_in_log(client)

    assert new_term > old_term
    missing = sorted(set(acknowledged) - set(logged))
    assert not missing, f"acknowledged appends lost in the failover: {missing[:20]}"
    duplicated = sorted({n for n in logged if logged.count(n) > 1})
    assert not duplicated, f"appends stored twice: {duplicated[:20]}"
    cluster.stop_all()
    assert_identical(cluster.nodes)


def append_directly(node: Node, token: str, key: str) -> grpc.StatusCode:
    """One append sent to *node* alone, no retry: the status it was answered with."""
    request = pb.AppendRequest(
        stream_id=STREAM,
        events=[
            pb.ProposedEvent(
                event_type="OrderPlaced", content_type="application/json", data=b'{"n": 0}'
            )
        ],
        idempotency_key=key,
    )
    with grpc.insecure_channel(node.address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        try:
            stub.Append(request, metadata=(("authorization", f"Bearer {token}"),), timeout=WAIT_S)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_paused_leader_stops_acknowledging_and_discards_its_tail_when_it_rejoins(
    cluster: ElectedCluster,
) -> None:
    old_leader, old_term = cluster.wait_leader()
    followers = [n for n in cluster.nodes if n is not old_leader]
    with cluster.client() as client:
        client.append(STREAM, [lethedb.Event("OrderPlaced", {"n": 1})], idempotency_key="o-1")
    for node in followers:
        assert cluster.wait_following(node) is old_leader

    # A tail only the old leader holds: its followers are down while it commits an
    # append, which therefore is never acknowledged (no follower holds it).
    for node in followers:
        cluster.kill(node)
    answers: list[grpc.StatusCode] = []
    alone = threading.Thread(
        target=lambda: answers.append(append_directly(old_leader, cluster.tokens.admin, "tail"))
    )
    alone.start()
    deadline = time.monotonic() + WAIT_S
    while not committed_alone(cluster, old_leader):
        assert time.monotonic() < deadline, "the old leader did not commit the tail"
        time.sleep(0.02)

    cluster.pause(old_leader)
    for node in followers:
        cluster.start_again(node)
    _, new_term = cluster.wait_leader(above_term=old_term, among=followers)

    cluster.resume(old_leader)
    alone.join(WAIT_S)
    assert answers, "the append sent to the old leader alone got no answer"
    assert answers[0] != grpc.StatusCode.OK, "the old leader acknowledged an append it held alone"
    leader = cluster.wait_following(old_leader)  # the old leader follows ...
    assert leader is not old_leader  # ... another node
    logs = old_leader.logs()
    assert re.search(r"discard", logs, re.IGNORECASE), logs[-3000:]
    assert "stopped acknowledging writes" in logs or "stepped down" in logs, logs[-3000:]
    with cluster.client() as client:
        client.append(STREAM, [lethedb.Event("OrderPlaced", {"n": 2})], idempotency_key="o-2")
        logged = numbers_in_log(client)
    assert logged == [1, 2], "the tail the old leader held alone survived, or a write was lost"
    for node in cluster.nodes:
        if node is not leader:
            assert cluster.wait_following(node) is leader
    assert new_term > old_term
    cluster.stop_all()
    assert_identical(cluster.nodes)


def committed_alone(cluster: ElectedCluster, node: Node) -> bool:
    status = cluster.status(node)
    return status is not None and status.position >= 2
