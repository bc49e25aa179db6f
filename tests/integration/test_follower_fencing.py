"""What a follower does with a leader's welcome, against a leader played by the test.

* A leader of a term older than one the node has seen is refused (a deposed
  leader still speaking): nothing is applied, the refusal is logged.
* A welcome that asks the node to discard commits it acknowledged to clients
  is refused by the engine: nothing is discarded, and the follower loop stops
  with one line asking for an operator (it does not retry for ever).

The node is a real server process (``--follow`` the fake leader); its data
directory was written beforehand by an in-process store that led term 7 and
acknowledged one append.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import replication_pb2 as rpb
from lethedb.v1 import replication_pb2_grpc
from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.store import Store, StoreOptions
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port

WAIT_S = 30.0
LED_TERM = 7


class FakeLeader(replication_pb2_grpc.ReplicationServicer):
    """Answers every Follow with *welcome*, then heartbeats; records the hellos."""

    def __init__(self, welcome: rpb.LeaderWelcome) -> None:
        self.welcome = welcome
        self.hellos: list[rpb.FollowerHello] = []
        self.done = threading.Event()

    def Follow(  # noqa: N802 (the gRPC method's name)
        self, request_iterator: Iterator[rpb.FollowRequest], context: grpc.ServicerContext
    ) -> Iterator[rpb.FollowResponse]:
        self.hellos.append(next(request_iterator).hello)
        yield rpb.FollowResponse(welcome=self.welcome)
        while not self.done.wait(0.5) and context.is_active():
            yield rpb.FollowResponse(
                heartbeat=rpb.LeaderHeartbeat(
                    term=self.welcome.term,
                    commit=self.welcome.commit,
                    position=self.welcome.position,
                    sent_at=time.time_ns(),
                )
            )


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S:g}s")
        time.sleep(0.05)


@pytest.fixture
def led_store(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A data directory that led term 7 and acknowledged one append: (data, keyring, store id)."""
    data, keyring = tmp_path / "node" / "data", tmp_path / "node" / "master.keyring"
    (tmp_path / "node").mkdir(mode=0o700)
    with Store.open(data, StoreOptions(role="follower", keyring_path=keyring)) as store:
        store.promote(LED_TERM)
        event = ProposedEvent(b"", "OrderPlaced", "", "application/json", b"{}", b"")
        store.writer.append(AppendCommand("orders", (event,)), timeout=WAIT_S)
        assert store.acknowledged_commit == 1
        store_id = store.store_id
    return data, keyring, store_id


@contextmanager
def follow_fake(
    data: Path, keyring: Path, welcome: rpb.LeaderWelcome
) -> Iterator[tuple[ServerProcess, FakeLeader]]:
    """The node on *data*, started with ``--follow`` a fake leader that answers *welcome*."""
    fake = FakeLeader(welcome)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    replication_pb2_grpc.add_ReplicationServicer_to_server(fake, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    node = ServerProcess(data, "--keyring", str(keyring), "--follow", address, "--node-id", "n1")
    try:
        node.start()
        yield node, fake
    finally:
        fake.done.set()
        node.kill()
        server.stop(0)


def test_a_leader_of_an_older_term_than_the_node_has_seen_is_refused(
    led_store: tuple[Path, Path, bytes],
) -> None:
    data, keyring, store_id = led_store
    deposed = rpb.LeaderWelcome(node_id="old", term=LED_TERM - 2, store_id=store_id, commit=1)
    with follow_fake(data, keyring, deposed) as (node, fake):
        until(lambda: "older than term 7" in node.logs(), "the follower refuses the old term")
        assert fake.hellos[0].term == LED_TERM  # its last entry's term, with its commit
        assert fake.hellos[0].commit == 1


def test_discarding_acknowledged_commits_is_refused_and_the_follower_stops_for_an_operator(
    led_store: tuple[Path, Path, bytes],
) -> None:
    data, keyring, store_id = led_store
    welcome = rpb.LeaderWelcome(node_id="new", term=LED_TERM + 4, store_id=store_id)
    welcome.truncate_after = 0  # discard commit 1, which this node acknowledged
    with follow_fake(data, keyring, welcome) as (node, fake):
        until(lambda: "needs an operator" in node.logs(), "the follower stops for an operator")
        lines = node.logs().splitlines()
        stopped = [line for line in lines if "needs an operator" in line]
        assert len(stopped) == 1
        assert "acknowledged" in stopped[0]
        # A retry is announced where the stop line is: the loop ended instead.
        assert not [line for line in lines if "reconnecting to the leader" in line]
        assert len(fake.hellos) == 1
    with Store.open(data, StoreOptions(role="follower", keyring_path=keyring)) as store:
        assert (store.journal_head(), store.log_head) == (1, 1), "something was discarded"
