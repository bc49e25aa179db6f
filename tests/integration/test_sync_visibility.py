"""With ``--sync-replicas 1`` a leader shows no reader a write its follower does not hold.

A real leader and one follower (tests/integration/cluster.py). The follower is
stopped with SIGSTOP: an append then commits on the leader but is answered
NotEnoughReplicas (not acknowledged), and neither a subscriber on the leader
nor a read there sees it, since a failover now could discard it. SIGCONT: the
follower applies and acks it, and the subscriber receives it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from lethedb_contract import ERROR_KEY
from tests.integration.cluster import Cluster

WAIT_S = 30.0
#: The leader's --sync-timeout-s: how long an append waits for the stopped follower.
SYNC_TIMEOUT_S = 1.0


class Subscriber:
    """A raw Subscribe stream on one node, every delivered position recorded."""

    def __init__(self, cluster: Cluster, address: str) -> None:
        self.positions: list[int] = []
        self._changed = threading.Condition()
        self._channel = grpc.insecure_channel(address)
        stub = eventstore_pb2_grpc.EventStoreStub(self._channel)
        self._call = stub.Subscribe(pb.SubscribeRequest(from_start=True), metadata=cluster.metadata)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for response in self._call:
                if response.WhichOneof("message") == "events":
                    with self._changed:
                        self.positions += [int(e.position) for e in response.events.events]
                        self._changed.notify_all()
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    def wait_for(self, position: int) -> list[int]:
        """Every position received once *position* has been, or fail naming what came."""
        with self._changed:
            if not self._changed.wait_for(lambda: position in self.positions, WAIT_S):
                raise AssertionError(
                    f"the subscriber did not receive position {position} within {WAIT_S:g}s; "
                    f"it received {self.positions}"
                )
            return list(self.positions)

    def received(self) -> list[int]:
        with self._changed:
            return list(self.positions)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(WAIT_S)
        self._channel.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(
        tmp_path,
        followers_count=1,
        sync_replicas=1,
        leader_args=("--sync-timeout-s", str(SYNC_TIMEOUT_S)),
    ) as cluster:
        cluster.wait_connected()
        yield cluster


def append(cluster: Cluster, text: str) -> int:
    with cluster.stubs(cluster.leader) as (events, _):
        answer = events.Append(
            pb.AppendRequest(
                stream_id="visibility",
                events=[pb.ProposedEvent(event_type="Noted", data=text.encode())],
            ),
            metadata=cluster.metadata,
            timeout=WAIT_S,
        )
    return int(answer.last_position)


def test_a_subscriber_on_a_sync_leader_never_sees_a_write_that_was_not_acknowledged(
    cluster: Cluster,
) -> None:
    subscriber = Subscriber(cluster, cluster.leader.address)
    follower = cluster.followers[0]
    try:
        first = append(cluster, "acknowledged")
        assert subscriber.wait_for(first) == [first]

        os.kill(follower.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                append(cluster, "not acknowledged")
            error = refused.value
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
            assert trailers.get(ERROR_KEY) == "NotEnoughReplicas", error
            # Committed on the leader a whole sync timeout ago, and still shown to nobody.
            assert subscriber.received() == [first]
            assert cluster.head(cluster.leader) == first
        finally:
            os.kill(follower.process.pid, signal.SIGCONT)

        assert subscriber.wait_for(first + 1) == [first, first + 1]  # held by the follower now
        assert cluster.head(cluster.leader) == first + 1
    finally:
        subscriber.close()
