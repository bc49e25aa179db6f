"""Running the gRPC server: wiring the store to the services, start and drain.

Start-up order: the configuration and the security settings are checked,
then the address is bound, and only then is the data directory opened (lock,
file checks, keyring). A busy or invalid address therefore ends the start
with one line and leaves no file behind. No call is answered before the
store is open: the server starts serving only after that, so a client can
never reach a server that cannot write. Shutdown is the reverse: stop
accepting calls, give in-flight calls the grace period, let the writer finish
its queue, close LMDB.

Replication (docs/CLUSTERING.md): every node serves the Replication service
(a follower refuses followers with NotLeader). With ``follow`` the node also
runs the :class:`~lethedb_server.api.follower.Follower` loop, its reads wait
for the first catch-up, and its consumer-group checkpoints are stored by the
leader. With ``cluster`` a :class:`~lethedb_server.ops.failover.ClusterMember`
runs instead: etcd elects the leader, and the member leads or points the same
follower loop at whoever leads. On shutdown the follower loop stops first
(nothing more is applied; a cluster member resigns and revokes its lease, so
another node leads at once), then Follow streams of this node's own
followers end, then calls drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import msgspec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lethedb_contract import is_loopback_address
from lethedb_server.api import auth, connections, tls
from lethedb_server.api.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from lethedb_server.api.admin import AdminService, add_admin
from lethedb_server.api.follower import Follower, FollowSettings, channel_credentials
from lethedb_server.api.head_watch import HeadWatch, ReadGate
from lethedb_server.api.replication import SERVICE_NAME as REPLICATION_SERVICE_NAME
from lethedb_server.api.replication import ReplicationService, add_replication
from lethedb_server.api.service import SERVICE_NAME, EventStoreService, add_event_store
from lethedb_server.api.tokens import TokenStore
from lethedb_server.api.validation import Validator
from lethedb_server.coord.election import Election, ElectionOptions, NodeInfo
from lethedb_server.coord.etcd import EtcdClient
from lethedb_server.engine.cluster import ClusterNode
from lethedb_server.engine.model import CheckpointCommand
from lethedb_server.engine.store import Store
from lethedb_server.engine.subscriptions import SubscriptionEngine
from lethedb_server.errors import LetheError, ListenFailed, ValidationError
from lethedb_server.ops.config import Config
from lethedb_server.ops.failover import ClusterMember, store_progress
from lethedb_server.ops.metrics import (
    ClusterCollector,
    Metrics,
    MetricsServer,
    StoreCollector,
    metrics_host,
)

log = logging.getLogger(__name__)


def harden_process() -> None:
    """No core dumps: a core file would hold unwrapped keys and plaintext."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def server_options(config: Config) -> list[tuple[str, Any]]:
    """The channel arguments of the gRPC server, from the configuration."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.keepalive_min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
        # The server's own keepalive pings must continue on an idle connection
        # (a subscriber waiting for events), or dead peers would go unnoticed.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
        # Without it gRPC holds a connection that never sends a byte for two
        # minutes: a flood of those exhausted the file descriptors.
        ("grpc.server_handshake_timeout_ms", _ms(config.handshake_timeout_s)),
        *_connection_caps(config),
    ]


def _connection_caps(config: Config) -> list[tuple[str, int]]:
    options = []
    if config.max_connections:
        options.append(("grpc.max_allowed_incoming_connections", config.max_connections))
    if config.connection_idle_timeout_s:
        options.append(("grpc.max_connection_idle_ms", _ms(config.connection_idle_timeout_s)))
    return options


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def new_server(config: Config, access: auth.AccessInterceptor | None = None) -> grpc.aio.Server:
    """The gRPC server without services; *access* checks every call (auth.py, limits.py)."""
    return grpc.aio.server(
        options=server_options(config),
        interceptors=None if access is None else [access],
    )


def add_services(
    server: grpc.aio.Server,
    config: Config,
    store: Store,
    subscriptions: SubscriptionEngine | None = None,
    cluster: Cluster | None = None,
) -> tuple[HealthServicer, AdminService]:
    """Register every service on *server* (bound or not, but not yet started)."""
    validator = Validator(config.limits())
    if cluster is None:
        cluster = Cluster.single(config, store)
    if subscriptions is None:
        subscriptions = SubscriptionEngine(store, config.subscription_limits())
    add_event_store(
        server,
        EventStoreService(store, validator, subscriptions, cluster.reads, cluster=cluster.node),
    )
    add_replication(server, cluster.replication)
    admin = AdminService(store, validator, cluster.node)
    add_admin(server, admin)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            ADMIN_SERVICE_NAME,
            REPLICATION_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return health, admin


class Cluster:
    """This node's part in replication: the read gate, the Replication service, the
    follower loop (with ``follow``)."""

    def __init__(
        self,
        watch: HeadWatch,
        reads: ReadGate,
        replication: ReplicationService,
        node: ClusterNode,
        follower: Follower | None = None,
        member: ClusterMember | None = None,
    ) -> None:
        self.watch = watch
        self.reads = reads
        self.replication = replication
        #: This node's identity and views, shared by the services and the metrics.
        self.node = node
        self.follower = follower
        #: With ``cluster``: the election and the role changes it brings.
        self.member = member
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def single(cls, config: Config, store: Store, advertise: str = "") -> Cluster:
        """For a node without ``follow``: no follower loop, reads served at once."""
        watch = HeadWatch(store)
        reads = ReadGate(store, watch, follower=False)
        node = ClusterNode(node_name(config, advertise), config.sync_replicas)
        return cls(watch, reads, _replication(config, store, watch, advertise), node)

    @classmethod
    def of(cls, config: Config, store: Store, advertise: str) -> Cluster:
        """The cluster part *config* asks for; reads the follower's token and TLS files."""
        if config.cluster:
            return cls.elected(config, store, advertise)
        if not config.follow:
            return cls.single(config, store, advertise)
        watch = HeadWatch(store)
        reads = ReadGate(store, watch, follower=True)
        settings = follow_settings(config, advertise)
        follower = Follower(store, settings, watch, reads)
        node = ClusterNode(settings.node_id, config.sync_replicas, follower)
        replication = _replication(config, store, watch, advertise)
        return cls(watch, reads, replication, node, follower)

    @classmethod
    def elected(cls, config: Config, store: Store, advertise: str) -> Cluster:
        """A member of cluster ``config.cluster``: a follower of nobody until etcd elects
        a leader (maybe this node); needs a running event loop (the etcd channels)."""
        watch = HeadWatch(store)
        reads = ReadGate(store, watch, follower=True)
        settings = follow_settings(config, advertise)
        follower = Follower(store, settings, watch, reads)
        node = ClusterNode(settings.node_id, config.sync_replicas, follower)
        replication = _replication(config, store, watch, advertise, failover=True)
        election = Election(
            EtcdClient(config.etcd, timeout_s=min(2.0, max(0.5, config.lease_ttl_s / 2))),
            NodeInfo(settings.node_id, advertise, config.replication_advertise),
            election_options(config),
            lambda: store_progress(store),
        )
        member = ClusterMember(store, election, follower, reads, replication)
        return cls(watch, reads, replication, node, follower, member)

    def checkpoint_sink(self, store: Store) -> CheckpointSink | None:
        """Where consumer groups' checkpoints go: the leader's writer when this node is a
        follower, this node's own otherwise (None: the subscription engine's default)."""
        follower = self.follower
        if follower is None:
            return None
        if self.member is None:
            return follower.forward_checkpoint

        async def store_checkpoint(command: CheckpointCommand) -> int:
            if store.role == "follower":
                return await follower.forward_checkpoint(command)
            return await store.store_checkpoint(command)

        return store_checkpoint

    def start(self) -> None:
        self.watch.attach()
        if self.member is not None:
            self._task = asyncio.create_task(self.member.run(), name="lethedb-cluster-member")
        elif self.follower is not None:
            self._task = asyncio.create_task(self.follower.run(), name="lethedb-follower")

    async def stop(self) -> None:
        """Stop applying the leader's commits (a member leaves the cluster), and end this
        node's followers' streams."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.member is not None:
            await self.member.close()
        self.replication.shutdown()


CheckpointSink = Callable[[CheckpointCommand], Awaitable[int]]


def election_options(config: Config) -> ElectionOptions:
    """The election of ``config.cluster``: the lease TTL, a step-down margin that fits in
    it, and the quorum that makes the election safe with ``sync_replicas``.

    A write is acknowledged once ``sync_replicas`` followers hold it: ``sync_replicas + 1``
    nodes. A candidate must have seen that many fresh positions, so that with a cluster of
    ``2 * sync_replicas + 1`` nodes the two groups share a node (docs/CLUSTERING.md).
    """
    ttl = config.lease_ttl_s
    return ElectionOptions(
        config.cluster, ttl_s=ttl, margin_s=min(1.0, ttl / 4), quorum=config.sync_replicas + 1
    )


def _replication(
    config: Config, store: Store, watch: HeadWatch, advertise: str, *, failover: bool = False
) -> ReplicationService:
    return ReplicationService(
        store, watch, node_name(config, advertise), config.max_consumer_groups, failover=failover
    )


def node_name(config: Config, advertise: str = "") -> str:
    """``node_id``, or one derived from the host name and the data directory's path.

    Stable across restarts of the same directory on the same host, which is
    what the leader's follower registry needs.
    """
    if config.node_id:
        return config.node_id
    where = str(config.data_dir.resolve()).encode()
    host = socket.gethostname().split(".")[0] or "node"
    return f"{host}-{hashlib.sha256(where).hexdigest()[:8]}"


def follow_settings(config: Config, advertise: str) -> FollowSettings:
    """How this follower reaches its leader: token, TLS or plaintext (loopback only).

    A cluster member learns its leaders from etcd: plaintext when its own advertised
    address is loopback (a cluster on one machine), TLS otherwise.
    """
    peer = config.follow or advertise
    token = ""
    if config.follow_token_file:
        token = _read(config.follow_token_file, "follow_token_file").decode().strip()
        if not token:
            raise ValidationError(
                f"configuration: follow_token_file {config.follow_token_file!r} is empty"
            )
    tls_files = config.follow_tls_ca or config.follow_tls_cert
    credentials = None
    if tls_files or not (is_loopback_address(peer) or config.insecure):
        ca = _read(config.follow_tls_ca, "follow_tls_ca") if config.follow_tls_ca else None
        cert = _read(config.follow_tls_cert, "follow_tls_cert") if config.follow_tls_cert else None
        key = _read(config.follow_tls_key, "follow_tls_key") if config.follow_tls_key else None
        credentials = channel_credentials(ca, cert, key)
    elif not is_loopback_address(peer):
        log.warning(
            "INSECURE: following %s without TLS because --insecure was given; the stream "
            "carries every record and the data keys to read them",
            config.follow or "the elected leader",
        )
    return FollowSettings(
        leader=config.follow,
        node_id=node_name(config, advertise),
        advertise=advertise,
        token=token,
        credentials=credentials,
        max_message_bytes=max(config.max_message_bytes, 64 << 20),
    )


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(f"configuration: {option} {path!r}: {exc.strerror}") from None


def build_server(
    config: Config,
    store: Store,
    access: auth.AccessInterceptor | None = None,
    subscriptions: SubscriptionEngine | None = None,
) -> tuple[grpc.aio.Server, HealthServicer, AdminService]:
    """The server with every service; *access* checks every call (auth.py, limits.py)."""
    server = new_server(config, access)
    health, admin = add_services(server, config, store, subscriptions)
    return server, health, admin


def bind(
    server: grpc.aio.Server, listen: str, certificates: tls.CertificateReloader | None
) -> tuple[str, int]:
    """Bind *listen*; return the address clients use and the port (the real one for port 0).

    Raises :class:`ListenFailed` with one line naming the cause, before any
    file is created. A ``unix:`` path where a live server answers is refused
    here: gRPC would otherwise unlink that server's socket and take its place.
    """
    if listen.startswith("unix:"):
        _refuse_live_unix_socket(listen)
    try:
        if certificates is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, certificates.credentials())
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenFailed(_why_bind_failed(listen))
    if listen.startswith("unix:"):
        # gRPC reports 1 as the "port" of a unix socket; clients need the path,
        # absolute, since they need not share the server's working directory.
        path = os.path.abspath(listen.removeprefix("unix:").removeprefix("//"))
        return "unix:" + path, port
    if listen.startswith("unix-abstract:"):
        return listen, port
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}", port


def _refuse_live_unix_socket(listen: str) -> None:
    path = listen.removeprefix("unix:").removeprefix("//")
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # a stale socket file: gRPC replaces it
    raise ListenFailed(f"address {listen} is in use (a server answers on that socket)")


def _why_bind_failed(listen: str) -> str:
    """Find out why gRPC could not bind (it only says that it could not)."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return f"cannot listen on {listen}: check that the directory exists and is writable"
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, int(port_text), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        return f"cannot listen on {listen}: {exc}"
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"address {listen} is in use"
                if exc.errno == errno.EACCES:
                    return f"cannot listen on {listen}: permission denied (a port below 1024?)"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"cannot listen on {listen}: the host is not an address of this machine"
                return f"cannot listen on {listen}: {exc.strerror}"
    return f"cannot listen on {listen}"


async def shred_on_timer(store: Store, interval_s: float) -> None:
    """Run a shred epoch every *interval_s* seconds when forgets are pending.

    It calls the engine, as the Admin service's Shred does: no gRPC layer in between.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            pending = await asyncio.to_thread(store.pending_forgets)
            if pending:
                log.info("%d forgotten subjects await shredding; running a shred epoch", pending)
                await store.shred()
        except LetheError as exc:
            log.error("scheduled shred epoch failed: %s", exc)


async def serve(config: Config) -> None:
    harden_process()
    fd_limit = connections.raise_fd_limit()
    config = msgspec.structs.replace(
        config,
        max_connections=connections.effective_max_connections(config.max_connections, fd_limit),
    )
    # Security settings are checked before the data directory is opened: a
    # misconfigured server must not start, let alone start open.
    tls_files = tls.TlsFiles.from_options(config.tls_cert, config.tls_key, config.tls_client_ca)
    tokens = TokenStore.open(Path(config.tokens_file)) if config.tokens_file else None
    auth.check_exposure(
        config.listen,
        tls=tls_files is not None,
        tokens=tokens is not None,
        insecure=config.insecure,
    )
    certificates = tls.CertificateReloader(tls_files) if tls_files is not None else None
    access = auth.AccessInterceptor(
        tokens,
        max_streams_per_connection=config.max_streams_per_connection,
        quotas=auth.ClientQuotas(
            config.max_streams_per_client, config.max_subscriptions_per_client
        ),
    )
    server = new_server(config, access)
    address, port = bind(server, config.listen, certificates)
    # The metrics observe the writer from its first batch, so they exist
    # before the store; the store's gauges join them once it is open.
    metrics = Metrics() if config.metrics_port else None
    try:
        store = Store.open(config.data_dir, config.store_options(), observer=metrics)
    except BaseException:
        await server.stop(None)  # release the address: nothing was served
        raise
    metrics_server: MetricsServer | None = None
    try:
        cluster = Cluster.of(config, store, config.advertise or address)
        if metrics is not None:
            metrics.registry.register(StoreCollector(store))
            metrics.registry.register(ClusterCollector(store, cluster.node))
        access.observer = metrics
        subscriptions = SubscriptionEngine(
            store,
            config.subscription_limits(),
            cluster.checkpoint_sink(store),
        )
        health, _ = add_services(server, config, store, subscriptions, cluster)
        cluster.start()
        await server.start()
        watch = _watch_connections(config, port)
        if metrics is not None:
            metrics_server = metrics.serve(metrics_host(config.listen), config.metrics_port)
            log.info("Prometheus metrics on http://%s:%d/metrics", metrics_server.host,
                     metrics_server.port)  # fmt: skip
        auth.log_startup(tokens)
        log.info("transport: %s", "plaintext" if certificates is None else certificates.describe())
        _reload_on_sighup(tokens, certificates)
        # Revocation must not wait for the next call: the file is watched.
        watcher = asyncio.create_task(tokens.watch()) if tokens is not None else None
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "LetheDB serving on %s; data directory %s (log %s, keys %s), master keyring %s; "
            "head position %d",
            address,
            store.data_dir.resolve(),
            store.log_path,
            store.keys_path,
            config.keyring_path.resolve(),
            store.head,
        )
        if config.ready_file:
            _write_ready_file(Path(config.ready_file), address)
        timer = (
            asyncio.create_task(shred_on_timer(store, config.shred_interval_s))
            if config.shred_interval_s > 0
            else None
        )
        await _wait_for_signal()
        for task in (timer, watcher, watch):
            if task is not None:
                task.cancel()
        log.info("shutting down: draining in-flight calls (grace %.1fs)", config.shutdown_grace_s)
        await health.enter_graceful_shutdown()
        await cluster.stop()  # Follow streams never finish by themselves either
        subscriptions.shutdown()  # they never finish by themselves: end them first
        await server.stop(config.shutdown_grace_s)
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        store.close()
        log.info("stopped; all acknowledged appends are on disk")


def _watch_connections(config: Config, port: int) -> asyncio.Task[None] | None:
    """Start the per-peer connection cap and cap logging (TCP on Linux only)."""
    log.info(
        "connections: at most %d, %s per peer address; handshake timeout %.1fs, idle timeout %s",
        config.max_connections,
        config.max_connections_per_peer or "any number",
        config.handshake_timeout_s,
        f"{config.connection_idle_timeout_s:.0f}s" if config.connection_idle_timeout_s else "none",
    )
    if config.listen.startswith("unix:"):
        return None
    if not connections.ConnectionWatch.supported():
        log.warning("no /proc here: max_connections_per_peer is not enforced")
        return None
    watch = connections.ConnectionWatch(
        port, config.max_connections, config.max_connections_per_peer
    )
    return asyncio.create_task(watch.run(), name="lethedb-connection-watch")


def _write_ready_file(path: Path, address: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, path)


def _reload_on_sighup(
    tokens: TokenStore | None, certificates: tls.CertificateReloader | None
) -> None:
    """SIGHUP re-reads the tokens file now and the TLS files before the next handshake."""

    def reload() -> None:
        log.info("SIGHUP: reloading tokens and TLS certificates")
        if tokens is not None:
            tokens.reload(force=True)
        if certificates is not None:
            certificates.request_reload()

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
