"""A LetheDB cluster on loopback: a leader and followers as real server processes.

Each node is ``python -m lethedb_server serve`` (:class:`ServerProcess`) with
a data directory and a master keyring of its own (the keyring outside the data
directory, as in production, so nothing of one node's key custody is ever in
another's files). The nodes share one tokens file: the followers present a
``replica`` token to the leader (``--follow-token-file``) and the tests call
every node with an ``admin`` token. Every node listens on a port picked before
it starts, so a follower restarted after a SIGKILL comes back where the leader
and the clients knew it.

Besides starting and stopping nodes the harness answers the questions the
replication tests ask: where each node's log ends (:meth:`Cluster.head`),
waiting until every follower has what the leader has
(:meth:`Cluster.wait_caught_up`, by each node's head) or until the leader
sees them all connected (:meth:`Cluster.wait_connected`, by ClusterStatus),
and, once the nodes are stopped, whether two data directories hold the same
log byte for byte (:func:`assert_same_log`, reading each node's log LMDB
read-only).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import lmdb

import lethedb
from lethedb.v1 import admin_pb2, admin_pb2_grpc, eventstore_pb2, eventstore_pb2_grpc
from lethedb_server.api.tokens import create_token
from lethedb_server.storage import codec
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port

#: How long a wait for followers to catch up may take before the test fails.
CATCH_UP_TIMEOUT = 60.0
CALL_TIMEOUT = 10.0


@dataclass
class Node:
    """One member of the cluster: its server process and its files."""

    name: str
    root: Path
    process: ServerProcess
    address: str

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def keyring(self) -> Path:
        return self.root / "keyring" / "master.keyring"

    def logs(self) -> str:
        return self.process.logs()


@dataclass
class Tokens:
    """The cluster's tokens file and one token per role the tests use."""

    path: Path
    admin: str
    replica: str

    @classmethod
    def create(cls, directory: Path) -> Tokens:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokens.json"
        admin, _ = create_token(path, "admin", "test-admin")
        replica, _ = create_token(path, "replica", "test-replica")
        replica_file = directory / "replica.token"
        replica_file.write_text(replica + "\n")
        replica_file.chmod(0o600)
        return cls(path, admin, replica)

    @property
    def replica_file(self) -> Path:
        return self.path.parent / "replica.token"


@dataclass
class Cluster:
    """A leader and followers under *root*; build with :meth:`start` (or ``with``).

    *sync_replicas* is the leader's ``--sync-replicas``; *extra_args* go to
    every node's ``serve``, *leader_args* to the leader's only.
    """

    root: Path
    followers_count: int = 2
    sync_replicas: int = 0
    extra_args: Sequence[str] = ()
    leader_args: Sequence[str] = ()
    tokens: Tokens = field(init=False)
    leader: Node = field(init=False)
    followers: list[Node] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = Tokens.create(self.root / "auth")
        self.leader = self._node(
            "leader",
            "--sync-replicas",
            str(self.sync_replicas),
            *self.leader_args,
        )

    # -- building and stopping ---------------------------------------------------------

    def start(self) -> Cluster:
        """Start the leader, then the followers against it."""
        self.launch(self.leader)
        for index in range(self.followers_count):
            self.add_follower(f"follower{index + 1}")
        return self

    def add_follower(self, name: str, follow: str | None = None) -> Node:
        """Start one more follower of the leader (or of *follow*, another address)."""
        node = self._node(
            name,
            "--follow",
            follow or self.leader.address,
            "--follow-token-file",
            str(self.tokens.replica_file),
        )
        self.followers.append(node)
        return self.launch(node)

    def _node(self, name: str, *args: str) -> Node:
        root = self.root / name
        root.mkdir(parents=True)
        (root / "keyring").mkdir(mode=0o700)
        address = f"127.0.0.1:{free_port()}"
        process = ServerProcess(
            root / "data",
            "--keyring",
            str(root / "keyring" / "master.keyring"),
            "--tokens-file",
            str(self.tokens.path),
            "--node-id",
            name,
            "--advertise",
            address,
            *self.extra_args,
            *args,
        )
        return Node(name, root, process, address)

    def launch(self, node: Node) -> Node:
        """Start (or start again after a stop or a SIGKILL) *node* on its own port."""
        node.process.start(node.address)
        return node

    def kill(self, node: Node) -> None:
        """SIGKILL: the node loses whatever it had not made durable."""
        node.process.kill()

    def stop(self, node: Node) -> int:
        """SIGTERM and wait for a clean exit."""
        return node.process.stop()

    def stop_all(self) -> None:
        """Stop the followers, then the leader; a node already down is left as it is."""
        for node in [*self.followers, self.leader]:
            if node.process.proc is not None:
                node.process.stop()

    @property
    def nodes(self) -> list[Node]:
        return [self.leader, *self.followers]

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        for node in [*self.followers, self.leader]:
            if node.process.proc is not None:
                node.process.kill()

    # -- talking to the nodes ------------------------------------------------------------

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata with the admin token, for raw gRPC calls."""
        return (("authorization", f"Bearer {self.tokens.admin}"),)

    def client(self, node: Node | str, **kwargs: Any) -> lethedb.Client:
        """An SDK client of *node* (or of a connection string) with the admin token."""
        target = node if isinstance(node, str) else node.address
        kwargs.setdefault("timeout", CALL_TIMEOUT)
        return lethedb.Client(target, token=self.tokens.admin, **kwargs)

    @contextmanager
    def stubs(
        self, node: Node
    ) -> Iterator[tuple[eventstore_pb2_grpc.EventStoreStub, admin_pb2_grpc.AdminStub]]:
        """Raw EventStore and Admin stubs of *node* (pass ``metadata=cluster.metadata``)."""
        with grpc.insecure_channel(node.address) as channel:
            yield eventstore_pb2_grpc.EventStoreStub(channel), admin_pb2_grpc.AdminStub(channel)

    def head(self, node: Node) -> int | None:
        """The last position *node* serves; None while it cannot answer (down, catching up)."""
        try:
            with self.stubs(node) as (events, _):
                request = eventstore_pb2.ReadAllRequest(backwards=True, max_count=1)
                for response in events.ReadAll(
                    request, metadata=self.metadata, timeout=CALL_TIMEOUT
                ):
                    for event in response.events:
                        return int(event.position)
                return 0
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise

    def cluster_status(self, node: Node) -> admin_pb2.ClusterStatusResponse:
        with self.stubs(node) as (_, admin):
            response: admin_pb2.ClusterStatusResponse = admin.ClusterStatus(
                admin_pb2.ClusterStatusRequest(), metadata=self.metadata, timeout=CALL_TIMEOUT
            )
            return response

    def wait_connected(self, timeout: float = CATCH_UP_TIMEOUT) -> admin_pb2.ClusterStatusResponse:
        """Wait until the leader's ClusterStatus lists every follower as connected."""
        names = {node.name for node in self.followers}
        deadline = time.monotonic() + timeout
        while True:
            status = self.cluster_status(self.leader)
            if names <= {f.node_id for f in status.followers if f.connected}:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the leader does not see {sorted(names)} connected in {timeout:g}s: {status}"
                )
            time.sleep(0.05)

    def wait_caught_up(
        self,
        nodes: Sequence[Node] | None = None,
        *,
        position: int | None = None,
        timeout: float = CATCH_UP_TIMEOUT,
    ) -> int:
        """Wait until every follower (or *nodes*) serves the leader's head; return it.

        *position*: wait for that position instead of the leader's head now
        (when the leader is down, say).
        """
        target = position if position is not None else self.head(self.leader)
        if target is None:
            raise AssertionError(f"the leader does not answer:\n{self.leader.logs()[-3000:]}")
        waiting = list(nodes if nodes is not None else self.followers)
        deadline = time.monotonic() + timeout
        heads: dict[str, int | None] = {}
        while waiting:
            for node in list(waiting):
                heads[node.name] = self.head(node)
                if (heads[node.name] or 0) >= target:
                    waiting.remove(node)
            if not waiting:
                break
            if time.monotonic() > deadline:
                behind = {n.name: heads[n.name] for n in waiting}
                raise AssertionError(
                    f"followers did not reach position {target} in {timeout:g}s: {behind}\n"
                    + "\n".join(f"--- {n.name}:\n{n.logs()[-3000:]}" for n in waiting)
                )
            time.sleep(0.05)
        return target


# -- comparing stopped nodes' files ------------------------------------------------------


@dataclass
class LogSummary:
    """What a node's log says of itself, for failure messages and comparisons."""

    store_id: bytes
    last_position: int
    chain_head: bytes
    streams: dict[bytes, int]
    journal_head: int


@contextmanager
def _log_env(data_dir: Path) -> Iterator[lmdb.Environment]:
    env = lmdb.open(str(data_dir / "log"), readonly=True, lock=True, max_dbs=32, subdir=True)
    try:
        yield env
    finally:
        env.close()


def _table(env: lmdb.Environment, txn: lmdb.Transaction, name: str) -> object | None:
    """A named database of the log, or None when this log has none of that name."""
    try:
        return env.open_db(name.encode(), txn=txn, create=False)
    except lmdb.NotFoundError:
        return None


def log_summary(data_dir: Path) -> LogSummary:
    """The head, chain head, stream versions and journal head of a stopped node's log."""
    with _log_env(data_dir) as env, env.begin() as txn:
        meta = codec.decode_meta(txn.get(b"log", db=env.open_db(b"meta", txn=txn)))
        streams = {
            bytes(k): codec.decode_stream(v).last_version
            for k, v in txn.cursor(db=env.open_db(b"streams", txn=txn))
        }
        journal = _table(env, txn, "journal")
        journal_head = 0
        if journal is not None:
            cursor = txn.cursor(db=journal)
            if cursor.last():
                journal_head = codec.from_u64(cursor.key())
        return LogSummary(meta.store_id, meta.last_position, meta.chain_head, streams, journal_head)


def event_positions(data_dir: Path) -> dict[bytes, int]:
    """Every event id a stopped node's log holds, with its position (visible or not: a
    follower shows only what its leader said is visible, so its files tell what it holds)."""
    with _log_env(data_dir) as env, env.begin() as txn:
        events = env.open_db(b"events", txn=txn)
        return {
            codec.decode_record(value).event_id: codec.from_u64(key)
            for key, value in txn.cursor(db=events)
        }


#: Tables whose rows must be equal byte for byte on every node (the replicated state).
SAME_ROWS = ("events", "streams", "stream_index", "idempotency", "legal_holds", "checkpoints")


def assert_same_log(a: Path, b: Path, tables: Sequence[str] = SAME_ROWS) -> LogSummary:
    """Fail unless two stopped nodes' logs are the same: every record's stored bytes at
    every position, the chain head, every stream's last version, and each of *tables*
    row for row (tombstones differ only in the shred epoch each node stamps: compared
    apart). The journal, when both have one, is compared entry for entry too."""
    left, right = log_summary(a), log_summary(b)
    assert (left.last_position, left.chain_head.hex()) == (
        right.last_position,
        right.chain_head.hex(),
    ), f"log heads differ: {a} at {left.last_position}, {b} at {right.last_position}"
    assert left.store_id == right.store_id, "the two logs belong to different stores"
    assert left.streams == right.streams, "stream versions differ"
    with (
        _log_env(a) as env_a,
        _log_env(b) as env_b,
        env_a.begin() as txn_a,
        env_b.begin() as txn_b,
    ):
        for name in (*tables, "journal"):
            db_a, db_b = _table(env_a, txn_a, name), _table(env_b, txn_b, name)
            if name == "journal" and (db_a is None or db_b is None):
                continue
            assert db_a is not None, f"{a} has no {name} table"
            assert db_b is not None, f"{b} has no {name} table"
            _assert_same_rows(name, txn_a.cursor(db=db_a), txn_b.cursor(db=db_b))
        _assert_same_tombstones(env_a, txn_a, env_b, txn_b)
    return left


def _assert_same_rows(name: str, left: lmdb.Cursor, right: lmdb.Cursor) -> None:
    rows_a, rows_b = iter(left), iter(right)
    index = 0
    while True:
        row_a, row_b = next(rows_a, None), next(rows_b, None)
        if row_a is None and row_b is None:
            return
        where = f"{name} row {index}"
        assert row_a is not None, f"{where}: only the second log has {bytes(row_b[0])!r}"  # type: ignore[index]
        assert row_b is not None, f"{where}: only the first log has {bytes(row_a[0])!r}"
        key_a, key_b = bytes(row_a[0]), bytes(row_b[0])
        assert key_a == key_b, f"{where}: keys differ: {key_a!r} / {key_b!r}"
        assert bytes(row_a[1]) == bytes(row_b[1]), f"{where} (key {key_a!r}): values differ"
        index += 1


def _assert_same_tombstones(
    env_a: lmdb.Environment,
    txn_a: lmdb.Transaction,
    env_b: lmdb.Environment,
    txn_b: lmdb.Transaction,
) -> None:
    def tombstones(
        env: lmdb.Environment, txn: lmdb.Transaction
    ) -> dict[bytes, tuple[int, int, str]]:
        return {
            bytes(k): (t.position, t.forgotten_at, t.reason)
            for k, v in txn.cursor(db=env.open_db(b"tombstones", txn=txn))
            for t in [codec.decode_tombstone(v)]
        }

    assert tombstones(env_a, txn_a) == tombstones(env_b, txn_b), "tombstones differ"


def subject_key_entries(data_dir: Path, subject_id: str) -> int:
    """How many wrapped data keys of *subject_id* a node's key store holds.

    Read-only, so it works on a running node too (LMDB lets readers in beside
    the writer)."""
    prefix = codec.dek_key(subject_id, 0)[:-4]
    env = lmdb.open(str(data_dir / "keys"), readonly=True, lock=True, max_dbs=16, subdir=True)
    try:
        with env.begin() as txn:
            cursor = txn.cursor(db=env.open_db(b"deks", txn=txn))
            count = 0
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not bytes(key).startswith(prefix):
                        break
                    count += 1
            return count
    finally:
        env.close()
