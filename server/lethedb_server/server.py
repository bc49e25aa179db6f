"""Running the gRPC server: wiring the store to the services, start and drain.

Start-up order matters for durability: the data directory is opened (lock,
file checks, keyring) before the port is bound, so a client can never reach a
server that cannot write. Shutdown is the reverse: stop accepting calls, give
in-flight calls the grace period, let the writer finish its queue, close LMDB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from pathlib import Path

import grpc
import msgspec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lethedb_server import auth, connections, limits, tls
from lethedb_server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from lethedb_server.admin import AdminService, add_admin
from lethedb_server.config import Config
from lethedb_server.errors import LetheError
from lethedb_server.metrics import Metrics, MetricsServer, metrics_host
from lethedb_server.service import SERVICE_NAME, EventStoreService, add_event_store
from lethedb_server.store import Store
from lethedb_server.subscriptions import SubscriptionEngine
from lethedb_server.tokens import TokenStore
from lethedb_server.validation import Validator

log = logging.getLogger(__name__)


def harden_process() -> None:
    """No core dumps: a core file would hold unwrapped keys and plaintext."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def build_server(
    config: Config,
    store: Store,
    access: auth.AccessInterceptor | None = None,
    subscriptions: SubscriptionEngine | None = None,
) -> tuple[grpc.aio.Server, HealthServicer, AdminService]:
    """The server with every service; *access* checks every call (auth.py, limits.py)."""
    server = grpc.aio.server(
        options=limits.server_options(config),
        interceptors=None if access is None else [access],
    )
    validator = Validator(config.limits())
    if subscriptions is None:
        subscriptions = SubscriptionEngine(store, config.subscription_limits())
    add_event_store(server, EventStoreService(store, validator, subscriptions))
    admin = AdminService(store, validator)
    add_admin(server, admin)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            ADMIN_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server, health, admin


async def shred_on_timer(store: Store, admin: AdminService, interval_s: float) -> None:
    """Run a shred epoch every *interval_s* seconds when forgets are pending."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            pending = await asyncio.to_thread(store.log.pending_forgets)
            if pending:
                log.info("%d forgotten subjects await shredding; running a shred epoch", pending)
                await admin.shred()
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
    store = Store.open(config.data_dir, config.store_options())
    metrics_server: MetricsServer | None = None
    try:
        metrics = Metrics(store) if config.metrics_port else None
        store.writer.observer = metrics
        access = auth.AccessInterceptor(
            tokens,
            max_streams_per_connection=config.max_streams_per_connection,
            quotas=auth.ClientQuotas(
                config.max_streams_per_client, config.max_subscriptions_per_client
            ),
            observer=metrics,
        )
        subscriptions = SubscriptionEngine(store, config.subscription_limits())
        server, health, admin = build_server(config, store, access, subscriptions)
        if certificates is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, certificates.credentials())
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}: the address is in use or invalid")
        host = config.listen.rsplit(":", 1)[0]
        address = f"{host}:{port}"
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
            store.log.lmdb.path,
            store.keys.lmdb.path,
            config.keyring_path.resolve(),
            store.log.head,
        )
        if config.ready_file:
            _write_ready_file(Path(config.ready_file), address)
        timer = (
            asyncio.create_task(shred_on_timer(store, admin, config.shred_interval_s))
            if config.shred_interval_s > 0
            else None
        )
        await _wait_for_signal()
        for task in (timer, watcher, watch):
            if task is not None:
                task.cancel()
        log.info("shutting down: draining in-flight calls (grace %.1fs)", config.shutdown_grace_s)
        await health.enter_graceful_shutdown()
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
