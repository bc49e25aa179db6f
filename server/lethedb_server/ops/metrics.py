"""Prometheus metrics: what the server did and what state it is in, over HTTP.

Three sources feed one registry, served on ``metrics_port`` (off when 0) at
``/metrics`` in the Prometheus text format:

* the writer, through :class:`WriterMetrics` (a
  :class:`~lethedb_server.engine.writer.WriterObserver`): appends, commits, events
  and bytes written, errors by kind, append latency (submit to answer), batch
  sizes and LMDB commit (fsync) time;
* the access interceptor (:class:`~lethedb_server.api.auth.AccessObserver`):
  calls refused, by reason;
* :class:`StoreCollector`, read at scrape time: head position, writer queue
  depth, DEK cache hits and misses, subjects forgotten and shred epochs so far
  (both persisted, so they survive restarts), LMDB map size and use, file
  sizes, and the subscriptions reported through :data:`SUBSCRIBERS`;
* :class:`ClusterCollector`, read at scrape time too: this node's role, term
  and journal head; on a leader each follower's lag and connection; on a
  follower its own lag behind the leader.

Labels never carry stream ids, subject ids, event types, token names or any
other client-chosen text: metrics are not a side channel for personal data,
and their cardinality stays fixed. The one label naming something is a
follower's ``node_id``, which operators choose (one series per follower).

For subscription code (no Prometheus knowledge needed)::

    from lethedb_server.ops.metrics import SUBSCRIBERS

    with SUBSCRIBERS.track() as subscriber:     # counted while open
        ...
        subscriber.set_lag(head - last_position_sent)

Exposed as ``lethedb_subscribers`` and ``lethedb_subscriber_lag_max_events``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lethedb_server.engine.cluster import FOLLOWER, LEADER, SINGLE, ClusterNode
from lethedb_server.engine.model import AppendCommand, Command, CommitCommand, CommitResult
from lethedb_server.errors import LetheError
from lethedb_server.storage.codec import AppendResult

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from lethedb_server.engine.cluster import LeaderLink
    from lethedb_server.engine.replication import FollowerState
    from lethedb_server.engine.store import Store
    from lethedb_server.engine.writer import Result

log = logging.getLogger(__name__)

_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


# --- subscriptions ----------------------------------------------------------------------


class SubscriberHandle:
    """One open subscription as the metrics see it; close it when the call ends."""

    __slots__ = ("_owner", "lag")

    def __init__(self, owner: Subscribers) -> None:
        self._owner = owner
        self.lag = 0

    def set_lag(self, events: int) -> None:
        """How many positions the subscriber is behind the head (0 when live)."""
        self.lag = max(0, events)

    def close(self) -> None:
        self._owner._remove(self)

    def __enter__(self) -> SubscriberHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Subscribers:
    """Open subscriptions and their lag, for the collector; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[SubscriberHandle] = set()

    def track(self) -> SubscriberHandle:
        handle = SubscriberHandle(self)
        with self._lock:
            self._open.add(handle)
        return handle

    def _remove(self, handle: SubscriberHandle) -> None:
        with self._lock:
            self._open.discard(handle)

    def snapshot(self) -> tuple[int, int]:
        """(open subscriptions, the largest lag among them)."""
        with self._lock:
            return len(self._open), max((h.lag for h in self._open), default=0)


#: The process's subscriptions; see the module docstring.
SUBSCRIBERS: Final = Subscribers()


# --- the writer and the interceptor ------------------------------------------------------


class _BatchTally:
    """What one committed batch adds to the writer's counters."""

    __slots__ = ("appends", "bytes", "commits", "deduplicated", "events")

    def __init__(self) -> None:
        self.appends = self.commits = self.deduplicated = self.events = self.bytes = 0

    def add(self, append: AppendCommand) -> None:
        self.events += len(append.events)
        self.bytes += sum(len(e.data) + len(e.metadata) for e in append.events)


class Metrics:
    """The registry and the metrics the server updates as it works."""

    def __init__(self, store: Store | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.appends = Counter(
            "lethedb_appends", "Appends written (deduplicated retries excluded).", registry=r
        )
        self.deduplicated = Counter(
            "lethedb_appends_deduplicated",
            "Appends answered from the idempotency store, writing nothing.",
            registry=r,
        )
        self.commits = Counter(
            "lethedb_commits", "Multi-stream commits written (deduplicated excluded).", registry=r
        )
        self.events = Counter(
            "lethedb_events_appended", "Events written by appends and commits.", registry=r
        )
        self.bytes = Counter(
            "lethedb_appended_bytes",
            "Data plus metadata bytes of the events written (before encryption).",
            registry=r,
        )
        self.append_errors = Counter(
            "lethedb_append_errors",
            "Appends and commits refused, by error.",
            ["error"],
            registry=r,
        )
        self.latency = Histogram(
            "lethedb_append_latency_seconds",
            "Seconds from an append or commit reaching the writer to its durable answer.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_commands = Histogram(
            "lethedb_batch_commands",
            "Commands committed per writer transaction (group commit).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "lethedb_commit_seconds",
            "Seconds per LMDB commit of a batch, fsync included.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.refused_calls = Counter(
            "lethedb_refused_calls",
            "Calls refused before their handler ran, by reason.",
            ["reason"],
            registry=r,
        )
        ProcessCollector(registry=r)
        if store is not None:
            r.register(StoreCollector(store))

    # WriterObserver (called from the writer thread)

    def batch_committed(
        self,
        outcomes: Sequence[tuple[Command, Result | LetheError, float]],
        commit_seconds: float,
    ) -> None:
        # Tallied first and added once per batch: each counter update takes a
        # lock, and this runs on the writer thread between commits, so a
        # 64-command batch would otherwise pay for hundreds of them.
        self.batch_commands.observe(len(outcomes))
        self.commit_seconds.observe(commit_seconds)
        tally = _BatchTally()
        for command, outcome, seconds in outcomes:
            if not isinstance(command, AppendCommand | CommitCommand):
                continue  # forgets and shreds: counted from the store at scrape time
            if isinstance(outcome, LetheError):
                self.append_errors.labels(type(outcome).__name__).inc()
                continue
            self.latency.observe(seconds)
            if isinstance(outcome, AppendResult | CommitResult) and outcome.deduplicated:
                tally.deduplicated += 1
            elif isinstance(command, AppendCommand):
                tally.appends += 1
                tally.add(command)
            else:
                tally.commits += 1
                for append in command.appends:
                    tally.add(append)
        for counter, amount in (
            (self.appends, tally.appends),
            (self.commits, tally.commits),
            (self.deduplicated, tally.deduplicated),
            (self.events, tally.events),
            (self.bytes, tally.bytes),
        ):
            if amount:
                counter.inc(amount)

    def refused(self, command: Command, error: LetheError) -> None:
        """WriterObserver: refused at submit (Overloaded, ShuttingDown)."""
        if isinstance(command, AppendCommand | CommitCommand):
            self.append_errors.labels(type(error).__name__).inc()

    # AccessObserver (called on the event loop)

    def call_refused(self, reason: str) -> None:
        self.refused_calls.labels(reason).inc()

    # HTTP

    def serve(self, host: str, port: int) -> MetricsServer:
        return MetricsServer(self.registry, host, port)


class MetricsServer:
    """``/metrics`` over HTTP on a daemon thread (prometheus_client's WSGI server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd: WSGIServer
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._httpd.server_port)
        self.host = host

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def metrics_host(listen: str) -> str:
    """The host the metrics endpoint binds: the gRPC listen host (loopback for unix:)."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return "127.0.0.1"
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return host.strip("[]") or "0.0.0.0"


# --- state read at scrape time --------------------------------------------------------------


class StoreCollector(Collector):
    """Gauges and persisted counters read from the open store when scraped.

    Every read is cheap (no scans): LMDB environment info and statistics in a
    short read transaction, ``stat`` of the data files, counters kept in memory.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        yield _gauge("lethedb_head_position", "Last committed global position.", store.log_head)
        yield _gauge(
            "lethedb_writer_queue_depth",
            "Commands waiting for the writer.",
            store.queue_depth(),
        )
        hits, misses = store.dek_cache_counts()
        yield _counter("lethedb_dek_cache_hits", "Data keys found unwrapped in memory.", hits)
        yield _counter(
            "lethedb_dek_cache_misses",
            "Data keys that had to be unwrapped from the key store.",
            misses,
        )
        yield _counter(
            "lethedb_shred_epochs",
            "Shred epochs completed in the life of this store.",
            store.shred_epoch,
        )
        count, lag = SUBSCRIBERS.snapshot()
        yield _gauge("lethedb_subscribers", "Open subscriptions.", count)
        yield _gauge(
            "lethedb_subscriber_lag_max_events",
            "Positions the furthest-behind open subscription is behind the head.",
            lag,
        )
        yield from self._lmdb()
        files = GaugeMetricFamily(
            "lethedb_file_size_bytes", "Size of the server's files.", labels=["file"]
        )
        for name, path in (
            ("log/data.mdb", store.log_path / "data.mdb"),
            ("keys/data.mdb", store.keys_path / "data.mdb"),
        ):
            size = _size(path)
            if size is not None:
                files.add_metric([name], size)
        yield files

    def _lmdb(self) -> Iterator[Metric]:
        map_size = GaugeMetricFamily(
            "lethedb_lmdb_map_size_bytes", "LMDB map size (address space).", labels=["env"]
        )
        used = GaugeMetricFamily(
            "lethedb_lmdb_used_bytes", "LMDB pages in use, in bytes.", labels=["env"]
        )
        forgets: int | None = None
        for env in self.store.environment_usage():
            map_size.add_metric([env.name], env.map_bytes)
            used.add_metric([env.name], env.used_bytes)
            if env.forgets is not None:
                forgets = env.forgets
        yield map_size
        yield used
        if forgets is not None:
            yield _counter(
                "lethedb_forgets", "Subjects forgotten in the life of this store.", forgets
            )


class ClusterCollector(Collector):
    """Replication gauges, read from the store (and the follower loop) when scraped.

    Every node: ``lethedb_role{role}`` (1 for this node's role, 0 for the
    others), ``lethedb_term``, ``lethedb_journal_head``. A leader (or a single
    node a follower joined): ``lethedb_followers_connected`` and, per
    follower, ``lethedb_follower_connected``, ``lethedb_follower_lag_positions``
    and ``lethedb_follower_lag_seconds``. A follower: ``lethedb_leader_connected``,
    ``lethedb_caught_up`` and ``lethedb_replication_lag_positions`` / ``_seconds``.
    """

    def __init__(self, store: Store, cluster: ClusterNode) -> None:
        self.store = store
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        view = self.cluster.view(self.store)
        role = GaugeMetricFamily(
            "lethedb_role", "This node's role: 1 for the one it has.", labels=["role"]
        )
        for name in (LEADER, FOLLOWER, SINGLE):
            role.add_metric([name], 1 if view.role == name else 0)
        yield role
        yield _gauge("lethedb_term", "This node's term (its last journal entry's).", view.term)
        yield _gauge(
            "lethedb_journal_head", "The last commit (journal entry) this node holds.", view.commit
        )
        if view.role == FOLLOWER:
            yield from _leader_link(view.link)
        else:
            yield from _followers(view.followers)


def _leader_link(link: LeaderLink) -> Iterator[Metric]:
    yield _gauge(
        "lethedb_leader_connected", "1 while this follower is connected to its leader.",
        int(link.connected),
    )  # fmt: skip
    yield _gauge(
        "lethedb_caught_up",
        "1 once this follower has caught up with its leader (it serves reads).",
        int(link.caught_up),
    )
    yield _gauge(
        "lethedb_replication_lag_positions",
        "Positions the leader holds that this follower has not applied yet.",
        link.lag_positions,
    )
    yield _gauge(
        "lethedb_replication_lag_seconds",
        "Age of the oldest leader commit this follower has not applied yet (0 when none).",
        link.lag_seconds,
    )


def _followers(followers: Sequence[FollowerState]) -> Iterator[Metric]:
    yield _gauge(
        "lethedb_followers_connected",
        "Followers connected to this node now.",
        sum(1 for f in followers if f.connected),
    )
    connected = GaugeMetricFamily(
        "lethedb_follower_connected",
        "1 while the follower is connected (every follower seen since start is listed).",
        labels=["node_id"],
    )
    positions = GaugeMetricFamily(
        "lethedb_follower_lag_positions",
        "Positions this node holds that the follower has not acknowledged as durable.",
        labels=["node_id"],
    )
    seconds = GaugeMetricFamily(
        "lethedb_follower_lag_seconds",
        "Age of the oldest commit the follower has not acknowledged (0 when none).",
        labels=["node_id"],
    )
    for f in followers:
        connected.add_metric([f.node_id], int(f.connected))
        positions.add_metric([f.node_id], f.lag_positions)
        seconds.add_metric([f.node_id], f.lag_seconds)
    yield connected
    yield positions
    yield seconds


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
