"""Three LetheDB nodes coordinated by a real etcd, with every link between them cuttable.

The failover harness (tests/faults/test_failover_jepsen.py) and the failover
benchmark (benchmarks/failover.py) build on this. Each node is a real
``lethedb serve --cluster NAME --etcd URL --advertise HOST:PORT`` process on
loopback with a data directory and master keyring of its own. Two proxies
stand in front of each node's links (tests/faults/tcpproxy.py):

* its **replication proxy** forwards to the node's own port, and the node
  advertises it as the address followers replicate from
  (``--replication-advertise``); cutting it cuts the node off from its
  followers while clients still reach it directly;
* its **etcd proxy** forwards to etcd, and the node is given it as its etcd
  endpoint; cutting it cuts the node off from the coordinator.

So :meth:`FailoverCluster.isolate` with ``from_etcd`` is a full partition of
one node (its lease runs out and another node takes over), and without it a
partition between a leader and its followers only.

Who leads is read from etcd itself, over its JSON gateway (not through any
LetheDB code): the leader key's value names the node, its create revision is
the term. The harness never decides anything the cluster should decide; it
only observes and breaks things.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lethedb.v1 import admin_pb2, admin_pb2_grpc
from tests.etcdproc import EtcdProcess
from tests.faults.tcpproxy import Proxy, ProxyLoop
from tests.integration.cluster import Tokens
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port

CALL_TIMEOUT = 3.0


@dataclass(frozen=True)
class ClusterSettings:
    """How the nodes are run: the knobs a failover test turns.

    ``lease_ttl_s``: the etcd lease of each node (whole seconds, as etcd counts);
    ``sync_replicas``: followers that must hold a write before it is acknowledged;
    ``sync_timeout_s``: how long a write waits for them before NotEnoughReplicas.
    """

    nodes: int = 3
    lease_ttl_s: int = 2
    sync_replicas: int = 1
    sync_timeout_s: float = 2.0
    extra_args: Sequence[str] = ()


@dataclass
class ClusterNode:
    """One node: its process, its client address, and the proxies of its links."""

    name: str
    root: Path
    address: str
    replication: Proxy
    etcd_link: Proxy
    process: ServerProcess = field(init=False)
    paused: bool = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def keyring(self) -> Path:
        return self.root / "keyring" / "master.keyring"

    @property
    def running(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def logs(self, tail: int = 4000) -> str:
        return self.process.logs()[-tail:]


@dataclass(frozen=True)
class EtcdLeader:
    """The leader as etcd holds it: the node's id and the term (the key's create revision)."""

    node_id: str
    advertise: str
    term: int


class FailoverCluster:
    """etcd and *settings.nodes* nodes under *root*; :meth:`start` them, :meth:`close` last."""

    def __init__(self, root: Path, etcd_binary: str, settings: ClusterSettings) -> None:
        self.root = root
        self.settings = settings
        self.name = "jepsen"
        self.tokens = Tokens.create(root / "auth")
        self.etcd = EtcdProcess(root / "etcd", etcd_binary)
        self.proxies = ProxyLoop()
        self.nodes: list[ClusterNode] = []

    # -- building and tearing down ------------------------------------------------------

    def start(self) -> FailoverCluster:
        self.etcd.start()
        etcd_address = self.etcd.endpoint.removeprefix("http://")
        for index in range(self.settings.nodes):
            name = f"n{index + 1}"
            address = f"127.0.0.1:{free_port()}"
            node = ClusterNode(
                name,
                self.root / name,
                address,
                self.proxies.proxy(f"{name}-replication", address),
                self.proxies.proxy(f"{name}-etcd", etcd_address),
            )
            node.root.mkdir(parents=True)
            (node.root / "keyring").mkdir(mode=0o700)
            node.process = ServerProcess(node.data_dir, *self._serve_args(node))
            self.nodes.append(node)
        for node in self.nodes:
            node.process.start(node.address)
        return self

    def _serve_args(self, node: ClusterNode) -> list[str]:
        s = self.settings
        return [
            "--keyring", str(node.keyring),
            "--tokens-file", str(self.tokens.path),
            "--follow-token-file", str(self.tokens.replica_file),
            "--node-id", node.name,
            "--advertise", node.address,
            "--replication-advertise", node.replication.address,
            "--cluster", self.name,
            "--etcd", f"http://{node.etcd_link.address}",
            "--lease-ttl-s", str(s.lease_ttl_s),
            "--sync-replicas", str(s.sync_replicas),
            "--sync-timeout-s", str(s.sync_timeout_s),
            *s.extra_args,
        ]  # fmt: skip

    def close(self) -> None:
        """Kill whatever still runs (a test that passed has stopped the nodes already)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.resume(node)
                node.process.kill()
        self.proxies.close()
        with contextlib.suppress(Exception):
            self.etcd.resume()
            self.etcd.kill()

    def __enter__(self) -> FailoverCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the connection string clients use ----------------------------------------------

    @property
    def target(self) -> str:
        return "lethedb://" + ",".join(node.address for node in self.nodes)

    @property
    def names(self) -> dict[str, str]:
        """Each node's name by its client address."""
        return {node.address: node.name for node in self.nodes}

    def node(self, name_or_address: str) -> ClusterNode:
        for node in self.nodes:
            if name_or_address in (node.name, node.address):
                return node
        raise KeyError(name_or_address)

    # -- faults ---------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL: whatever the node had not made durable is lost."""
        node.process.kill()
        node.paused = False

    def restart(self, node: ClusterNode) -> None:
        """Start a stopped or killed node again on its own port and data directory."""
        node.process.start(node.address)

    def pause(self, node: ClusterNode) -> None:
        """SIGSTOP: the node holds its connections and its lease renewals stop."""
        assert node.process.proc is not None
        node.process.proc.send_signal(signal.SIGSTOP)
        node.paused = True

    def resume(self, node: ClusterNode) -> None:
        if node.process.proc is not None and node.paused:
            node.process.proc.send_signal(signal.SIGCONT)
        node.paused = False

    def isolate(self, node: ClusterNode, *, from_etcd: bool) -> None:
        """Cut *node*'s replication links (and its etcd link if *from_etcd*)."""
        self.proxies.cut(node.replication, *([node.etcd_link] if from_etcd else []))

    def heal(self) -> None:
        """Let every link through again."""
        self.proxies.heal(*self.proxies.proxies)

    def restart_etcd(self, down_s: float) -> None:
        """Stop etcd (SIGTERM), keep it down *down_s* seconds, start it on the same ports."""
        self.etcd.stop()
        self.proxies.reset(*(node.etcd_link for node in self.nodes))
        time.sleep(down_s)
        self.etcd.start()

    def stop_all(self) -> None:
        """Stop every node cleanly (resumed and healed first), so their files can be read."""
        self.heal()
        for node in self.nodes:
            self.resume(node)
        for node in self.nodes:
            if node.process.proc is not None:
                node.process.stop()

    # -- observing -----------------------------------------------------------------------

    def etcd_leader(self) -> EtcdLeader | None:
        """The leader key as etcd holds it now (None: no leader, or etcd unreachable)."""
        key = f"/lethedb/{self.name}/leader".encode()
        body = json.dumps({"key": base64.b64encode(key).decode()}).encode()
        request = urllib.request.Request(
            f"{self.etcd.endpoint}/v3/kv/range",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as answer:
                kvs = json.loads(answer.read()).get("kvs") or []
        except (OSError, urllib.error.URLError, ValueError):
            return None
        if not kvs:
            return None
        value = json.loads(base64.b64decode(kvs[0]["value"]))
        return EtcdLeader(value["node_id"], value["advertise"], int(kvs[0]["create_revision"]))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens.admin}"),)

    @contextlib.contextmanager
    def admin(self, node: ClusterNode) -> Iterator[admin_pb2_grpc.AdminStub]:
        with grpc.insecure_channel(node.address) as channel:
            yield admin_pb2_grpc.AdminStub(channel)

    def status(self, node: ClusterNode) -> admin_pb2.ClusterStatusResponse | None:
        """*node*'s ClusterStatus, or None when it cannot answer (down, paused)."""
        if not node.running or node.paused:
            return None
        try:
            with self.admin(node) as admin:
                response: admin_pb2.ClusterStatusResponse = admin.ClusterStatus(
                    admin_pb2.ClusterStatusRequest(), metadata=self.metadata, timeout=CALL_TIMEOUT
                )
                return response
        except grpc.RpcError:
            return None

    def statuses(self) -> dict[str, admin_pb2.ClusterStatusResponse | None]:
        return {node.name: self.status(node) for node in self.nodes}

    def settled(self) -> tuple[bool, str]:
        """Whether one leader leads with every other node following it, connected and caught
        up; and, when not, what is missing (for failure messages)."""
        leader = self.etcd_leader()
        if leader is None:
            return False, "etcd holds no leader"
        statuses = self.statuses()
        lead = statuses.get(leader.node_id)
        if lead is None or lead.role != "leader":
            role = lead.role if lead is not None else "no answer"
            return False, f"etcd names {leader.node_id} (term {leader.term}); it says {role}"
        for name, status in statuses.items():
            if name == leader.node_id:
                continue
            if status is None:
                return False, f"{name} does not answer"
            if status.role != "follower" or status.leader != leader.advertise:
                return False, f"{name} is {status.role} of {status.leader or 'nobody'}"
            if not (status.connected and status.caught_up):
                return False, f"{name} follows {leader.node_id} but has not caught up"
        return True, f"{leader.node_id} leads term {leader.term}"

    def describe(self) -> str:
        """Every node's view, one line each, for failure reports."""
        lines = [f"etcd leader: {self.etcd_leader()}"]
        for name, status in self.statuses().items():
            if status is None:
                lines.append(f"  {name}: no answer")
            else:
                lines.append(
                    f"  {name}: {status.role} term {status.term} leader {status.leader or '-'}"
                    f" commit {status.commit} position {status.position}"
                    f" connected {status.connected} caught_up {status.caught_up}"
                )
        return "\n".join(lines)
