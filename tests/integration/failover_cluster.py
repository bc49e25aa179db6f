"""A cluster with automatic failover on loopback: a real etcd and real server processes.

Every node is ``lethedb serve --cluster NAME --etcd URL --advertise ADDR`` on a
port picked before it starts (so a node killed and started again comes back
where the others and the clients knew it), with its own data directory and
keyring, the cluster's tokens file and the ``replica`` token it presents to
whichever node leads. etcd is :class:`tests.etcdproc.EtcdProcess`.

Beside starting, killing, pausing and resuming nodes, the harness answers
what failover tests ask: which node leads and in which term
(:meth:`ElectedCluster.wait_leader`, from each node's ClusterStatus), when a
node has rejoined as a follower and caught up
(:meth:`ElectedCluster.wait_following`), and an SDK client that knows every
host (:meth:`ElectedCluster.client`). Comparing stopped nodes' files is
:func:`tests.integration.cluster.assert_same_log`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

import lethedb
from lethedb.v1 import admin_pb2, admin_pb2_grpc
from tests.etcdproc import EtcdProcess
from tests.integration.cluster import Node, Tokens
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port

#: Bound of the waits for an election or a catch-up (a failure names what it waited for).
WAIT_S = 30.0
CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Status:
    """One node's ClusterStatus, the part failover tests look at."""

    node: str
    role: str
    term: int
    leader: str
    commit: int
    position: int
    caught_up: bool


@dataclass
class ElectedCluster:
    """*size* nodes of cluster *name* under *root*, elected through *etcd*.

    *sync_replicas* and *lease_ttl_s* go to every node (a majority less one and
    a short lease: failover tests stay short); *extra_args* too.
    """

    root: Path
    etcd: EtcdProcess
    size: int = 3
    sync_replicas: int = 1
    lease_ttl_s: int = 2
    name: str = "test"
    extra_args: Sequence[str] = ()
    tokens: Tokens = field(init=False)
    nodes: list[Node] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = Tokens.create(self.root / "auth")
        self.nodes = [self._node(f"node{index + 1}") for index in range(self.size)]

    def _node(self, name: str) -> Node:
        root = self.root / name
        root.mkdir(parents=True)
        (root / "keyring").mkdir(mode=0o700)
        address = f"127.0.0.1:{free_port()}"
        process = ServerProcess(
            root / "data",
            "--keyring", str(root / "keyring" / "master.keyring"),
            "--tokens-file", str(self.tokens.path),
            "--node-id", name,
            "--advertise", address,
            "--cluster", self.name,
            "--etcd", self.etcd.endpoint,
            "--lease-ttl-s", str(self.lease_ttl_s),
            "--sync-replicas", str(self.sync_replicas),
            "--follow-token-file", str(self.tokens.replica_file),
            *self.extra_args,
        )  # fmt: skip
        return Node(name, root, process, address)

    # -- processes ------------------------------------------------------------------------

    def start(self) -> ElectedCluster:
        for node in self.nodes:
            node.process.start(node.address)
        return self

    def start_again(self, node: Node) -> Node:
        """Start *node* again (after a kill or a stop) on its own port."""
        node.process.start(node.address)
        return node

    def kill(self, node: Node) -> None:
        node.process.kill()

    def pause(self, node: Node) -> None:
        """SIGSTOP: the node keeps its sockets open and does nothing (a long GC, a VM freeze)."""
        os.kill(node.process.pid, signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        os.kill(node.process.pid, signal.SIGCONT)

    def stop_all(self) -> None:
        """SIGTERM every running node, followers first (a stopping leader resigns)."""
        running = [n for n in self.nodes if n.process.running]
        statuses = {n.name: self.status(n) for n in running}
        running.sort(key=lambda n: (statuses[n.name] or _DOWN).role == "leader")
        for node in running:
            self.resume(node)
            node.process.stop()

    def __enter__(self) -> ElectedCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            if node.process.proc is not None:
                self.resume(node)
                node.process.kill()

    # -- what the nodes say -----------------------------------------------------------------

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens.admin}"),)

    def connection_string(self, nodes: Sequence[Node] | None = None) -> str:
        return "lethedb://" + ",".join(n.address for n in nodes or self.nodes)

    def client(self, nodes: Sequence[Node] | None = None, **kwargs: Any) -> lethedb.Client:
        """An SDK client that knows every node (or *nodes*), with the admin token."""
        kwargs.setdefault("timeout", WAIT_S)
        return lethedb.Client(self.connection_string(nodes), token=self.tokens.admin, **kwargs)

    def status(self, node: Node) -> Status | None:
        """*node*'s ClusterStatus; None when it does not answer (down, paused)."""
        if not node.process.running:
            return None
        try:
            with grpc.insecure_channel(node.address) as channel:
                answer = admin_pb2_grpc.AdminStub(channel).ClusterStatus(
                    admin_pb2.ClusterStatusRequest(),
                    metadata=self.metadata,
                    timeout=CALL_TIMEOUT_S,
                )
        except grpc.RpcError:
            return None
        return Status(
            node.name,
            answer.role,
            answer.term,
            answer.leader,
            answer.commit,
            answer.position,
            answer.caught_up,
        )

    def statuses(self, nodes: Sequence[Node] | None = None) -> dict[str, Status | None]:
        return {n.name: self.status(n) for n in nodes or self.nodes}

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def wait_leader(
        self,
        *,
        above_term: int = 0,
        among: Sequence[Node] | None = None,
        timeout: float = WAIT_S,
    ) -> tuple[Node, int]:
        """The node that leads a term above *above_term* (among *among*), and its term."""
        candidates = list(among or self.nodes)
        deadline = time.monotonic() + timeout
        while True:
            seen = self.statuses(candidates)
            leaders = [
                s
                for s in seen.values()
                if s is not None and s.role == "leader" and s.term > above_term
            ]
            if leaders:
                best = max(leaders, key=lambda s: s.term)
                return self.node(best.node), best.term
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no node led a term above {above_term} within {timeout:g}s: {seen}\n"
                    + self.logs(candidates)
                )
            time.sleep(0.05)

    def wait_following(self, node: Node, *, timeout: float = WAIT_S) -> Node:
        """Wait until *node* follows the node that leads now, has caught up with it and
        holds its head; return that leader (another election meanwhile is waited out)."""
        deadline = time.monotonic() + timeout
        while True:
            mine = self.status(node)
            leader = self._node_at(mine.leader) if mine is not None else None
            theirs = self.status(leader) if leader is not None else None
            if (
                mine is not None
                and theirs is not None
                and mine.role == "follower"
                and theirs.role == "leader"
                and mine.caught_up
                and (mine.commit, mine.position) == (theirs.commit, theirs.position)
            ):
                assert leader is not None
                return leader
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{node.name} did not catch up with a leader within {timeout:g}s: "
                    f"{mine} / {theirs}\n" + self.logs()
                )
            time.sleep(0.05)

    def _node_at(self, address: str) -> Node | None:
        return next((n for n in self.nodes if n.address == address), None)

    def logs(self, nodes: Sequence[Node] | None = None, tail: int = 3000) -> str:
        return "\n".join(f"--- {n.name}:\n{n.logs()[-tail:]}" for n in nodes or self.nodes)


_DOWN = Status("", "down", 0, "", 0, 0, False)
