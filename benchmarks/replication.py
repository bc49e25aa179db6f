"""Replication benchmark: what followers cost the leader, how far behind they are, what they add.

Run ``python -m benchmarks.replication`` (``make bench-replication``) or
``--quick`` for a run of a few minutes. In one run, every node a real
``lethedb serve`` process on loopback, each with its own data directory:

1. **Appends** against the leader, 1-event appends from ``--clients`` (64)
   clients and 100-event appends from one client (the loads of
   :mod:`benchmarks.e2e`), with no follower (the single node), two
   asynchronous followers, and two followers with ``--sync-replicas 1``;
   figures as ratios to the single node.
2. **Replication lag** with two asynchronous followers, under the full
   64-client load and at half of it (paced): one probe process subscribes to
   the leader and to a follower from the end of the log and, for every
   position, takes the follower's delivery time minus the leader's (both
   ``CLOCK_MONOTONIC`` of this machine, both through the same subscription
   path, so what remains is the replication: shipping, applying, fsync).
3. **Catch-up**: a follower started empty against a leader holding
   ``--catch-up-events`` events (built in-process first), from its start to
   holding the leader's head, against the leader's in-process scan of the
   same log (raw LMDB values, as the leader reads them to send).
4. **Fan-out**: ``--fanout`` (1,000) live subscribers on the leader alone
   against the same number spread over the three nodes, while one client
   appends at ``--fanout-rate``; the subscribers' load processes are three
   in both cases, so only where they subscribe changes.

It prints a Markdown report with the ratios against the targets of the
replication issue and writes it to ``benchmarks/results/replication-<date>.md``.
Load comes from spawned worker processes (:class:`benchmarks.harness.Workers`);
after each cluster's cases the followers must reach the leader's head, so a
run that lost writes on the way cannot pass quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from benchmarks import workload
from benchmarks.e2e import Case, Settings, run_case
from benchmarks.e2e import table as e2e_table
from benchmarks.harness import Server, Workers, process_cpu_s, temp_root, wait_for_quiet
from benchmarks.loadgen import (
    CHANNEL_OPTIONS,
    Result,
    Spec,
    Window,
    run_grpc,
    timed_window,
)
from benchmarks.report import (
    add_output_args,
    command_line,
    environment,
    environment_section,
    filesystem_of,
    fmt,
    percentile_ms,
    publish,
)
from benchmarks.subscribe import SUBSCRIBE, LiveSpec, _follow, _pace, build_log, reference_scans

#: The targets of the replication issue.
SYNC_TARGET = 0.7  # sync-replicas=1 / single node, 1-event appends from 64 clients
LAG_P99_TARGET_MS = 50.0  # replication lag p99 at half load
FANOUT_TARGET = 2.0  # deliveries/s, subscribers over three nodes / on one
FANOUT_PROCS = 3


# -- the cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    """A leader and *followers* as ``lethedb serve`` processes under *root*."""

    root: Path
    followers: int = 2
    sync_replicas: int = 0
    #: Where the followers' directories go (default: *root*); another filesystem
    #: (tmpfs, say) tells the followers' fsyncs from the rest of their cost.
    followers_root: Path | None = None
    leader: Server = field(init=False)
    nodes: list[Server] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.leader = self.server(
            "leader", ["--node-id", "leader", "--sync-replicas", str(self.sync_replicas)]
        )

    def server(self, name: str, args: list[str], root: Path | None = None) -> Server:
        """A node's server process (not started) in its own directory under *root*."""
        home = (root or self.root) / name
        home.mkdir(parents=True, exist_ok=True)
        keyring = ["--keyring", str(home / "master.keyring")]
        return Server(home / "data", home / "server.log", [*keyring, *args])

    def start(self) -> Cluster:
        self.leader.start()
        self.nodes = [self.leader]
        for index in range(self.followers):
            self.add_follower(f"follower{index + 1}")
        return self

    def add_follower(self, name: str) -> Server:
        follower = self.server(
            name, ["--node-id", name, "--follow", self.leader.address], self.followers_root
        )
        follower.start()
        self.nodes.append(follower)
        return follower

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes]

    def cpu_s(self, _pid: int = 0) -> float:
        """CPU seconds of every node together (the meters' ``server_cpu``)."""
        return sum(process_cpu_s(pid) for pid in self.pids)

    def stop(self) -> list[int]:
        """Stop the followers, then the leader; their exit codes."""
        return [node.stop() for node in reversed(self.nodes)]


def head_of(server: Server) -> int | None:
    """A node's head, or None while it answers UNAVAILABLE (a follower catching up)."""
    import grpc

    try:
        return server.head()
    except grpc.RpcError:
        return None


def wait_caught_up(cluster: Cluster, timeout: float = 300.0) -> tuple[int, list[int | None]]:
    """Wait until every follower serves the leader's head; (head, each follower's head)."""
    head = cluster.leader.head()
    deadline = time.monotonic() + timeout
    while True:
        heads = [head_of(f) for f in cluster.nodes[1:]]
        if all((h or 0) >= head for h in heads) or time.monotonic() > deadline:
            return head, heads
        time.sleep(0.02)


# -- worker processes: loadgen's specs, subscribe's live specs, the lag probe ------------------


@dataclass
class ProbeSpec:
    """One process following the leader and a follower from the end of the log."""

    name: str
    warmup_s: float
    leader: str
    follower: str
    drain_s: float = 2.0


def worker_main(conn: Connection) -> None:
    """Entry point of a worker process: run whatever spec arrives (harness protocol)."""
    while True:
        command, spec = conn.recv()
        if command == "exit":
            return
        try:
            if isinstance(spec, ProbeSpec):
                result = asyncio.run(_probe(spec, conn))
            elif isinstance(spec, LiveSpec):
                result = asyncio.run((_pace if spec.kind == "pace" else _follow)(spec, conn))
            else:
                result = asyncio.run(run_grpc(spec, conn))
        except Exception as exc:  # report, so the orchestrator never hangs on us
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("result", result))


async def _probe(spec: ProbeSpec, conn: Connection) -> Result:
    """Per position: follower delivery time minus leader delivery time, inside the window.

    ``Result.latencies_ns`` holds the lags; ``extra["missing"]`` counts positions
    the leader delivered inside the window that the follower had not delivered
    by the end of the drain.
    """
    import grpc

    from lethedb.v1 import eventstore_pb2 as pb

    window = Window()
    arrivals: dict[str, dict[int, int]] = {"leader": {}, "follower": {}}
    ready = {"leader": asyncio.Event(), "follower": asyncio.Event()}
    request = pb.SubscribeRequest(from_end=True).SerializeToString()
    errors: list[str] = []

    async def follow(role: str, address: str) -> None:
        seen = arrivals[role]
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_stream(
                SUBSCRIBE, response_deserializer=pb.SubscribeResponse.FromString
            )(request)
            try:
                async for response in call:
                    now = time.monotonic_ns()
                    kind = response.WhichOneof("message")
                    if kind == "events":
                        for event in response.events.events:
                            seen[event.position] = now
                    elif kind == "caught_up":
                        ready[role].set()
            except asyncio.CancelledError:
                pass
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors.append(f"{role}: {exc.code().name} {exc.details()}")
            ready[role].set()

    tasks = [
        asyncio.create_task(follow("leader", spec.leader)),
        asyncio.create_task(follow("follower", spec.follower)),
    ]
    await asyncio.gather(*(e.wait() for e in ready.values()))
    cpu0 = time.process_time()
    await timed_window(spec.warmup_s, conn, window)
    await asyncio.sleep(spec.drain_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    result = Result(cpu_s=time.process_time() - cpu0)
    leader, follower = arrivals["leader"], arrivals["follower"]
    inside = [p for p, t in leader.items() if window.start <= t <= window.end]
    result.latencies_ns = [follower[p] - leader[p] for p in inside if p in follower]
    result.ops = result.events = len(result.latencies_ns)
    result.extra["missing"] = len(inside) - len(result.latencies_ns)
    result.errors = len(errors)
    result.first_error = errors[0] if errors else ""
    return result


# -- 1. appends -------------------------------------------------------------------------------


def append_cases(settings: Settings) -> list[Case]:
    n, p, c = settings.clients, settings.procs, settings.channels
    return [
        Case(f"append-1x{n}", "Append, 1 event", "append", n, 1, procs=p, channels=c),
        Case("append-100x1", "Append, 100 events", "append", 1, 100),
    ]


def run_appends(label: str, cluster: Cluster, workers: Workers, settings: Settings) -> list[Case]:
    print(f"Appends, {label}:", flush=True)
    cases = []
    for case in append_cases(settings):
        case.key = f"{case.key}@{label}"
        case.title = f"{case.title} ({label})"
        cases.append(
            run_case(
                case,
                workers,
                settings,
                address=cluster.leader.address,
                server_pid=cluster.leader.pid,
            )
        )
    return cases


# -- 2. replication lag -------------------------------------------------------------------------


@dataclass
class LagCase:
    key: str
    title: str
    duration_s: float = 0.0
    appends: Result | None = None
    probe: Result | None = None
    cluster_cpu_s: float | None = None
    problems: list[str] = field(default_factory=list)

    def lag_ms(self, q: float) -> float:
        return percentile_ms(self.probe.latencies_ns if self.probe else [], q)

    @property
    def rate(self) -> float:
        return self.appends.ops / self.duration_s if self.appends and self.duration_s else 0.0


def run_lag(
    case: LagCase,
    load: Spec | LiveSpec,
    cluster: Cluster,
    workers: Workers,
    args: argparse.Namespace,
) -> LagCase:
    probe = ProbeSpec(case.key, args.warmup, cluster.leader.address, cluster.nodes[1].address)
    if args.quiet_wait:
        wait_for_quiet(args.quiet_wait)
    (appends, lags), usage = workers.run(
        [load, probe], args.duration, cluster.leader.pid, cluster.cpu_s
    )
    case.duration_s, case.appends, case.probe = args.duration, appends, lags
    case.cluster_cpu_s = usage["server_cpu_s"]
    if appends.errors:
        case.problems.append(f"{appends.errors} appends failed: {appends.first_error}")
    if lags.errors:
        case.problems.append(f"the probe failed: {lags.first_error}")
    if lags.extra.get("missing"):
        case.problems.append(
            f"{lags.extra['missing']} positions had not reached the follower's subscriber "
            "2 s after the window"
        )
    print(
        f"  {case.title:<52} {case.rate:>8,.0f} appends/s  lag p50 {case.lag_ms(0.5):6.2f} ms "
        f"p99 {case.lag_ms(0.99):6.2f} ms ({len(lags.latencies_ns):,} positions)"
        + (f"  PROBLEMS: {case.problems}" if case.problems else ""),
        flush=True,
    )
    return case


# -- 3. catch-up ----------------------------------------------------------------------------------


@dataclass
class CatchUp:
    events: int = 0
    scan_events_per_s: float = 0.0
    decrypt_events_per_s: float = 0.0
    ready_s: float = 0.0  # follower process start to its ready file
    seconds: float = 0.0  # follower process start to holding the head
    leader_cpu_s: float = 0.0  # over those seconds
    follower_cpu_s: float = 0.0  # since its start
    problems: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def run_catch_up(root: Path, args: argparse.Namespace, subjects: list[str]) -> CatchUp:
    from lethedb_server.engine.store import Store, StoreOptions

    result = CatchUp()
    cluster = Cluster(root, followers=0)
    print(f"Catch-up: building a log of {args.catch_up_events:,} events ...", flush=True)
    options = StoreOptions(keyring_path=cluster.leader.data_dir.parent / "master.keyring")
    with Store.open(cluster.leader.data_dir, options) as store:
        build_log(store, args.catch_up_events, subjects, args.payload_bytes)
        raw, decrypt = reference_scans(store, args.payload_bytes, 512)[:2]
        result.scan_events_per_s = max(raw().events_per_s for _ in range(3))
        result.decrypt_events_per_s = decrypt().events_per_s
    cluster.start()
    try:
        if args.quiet_wait:
            wait_for_quiet(args.quiet_wait)
        follower = cluster.server(
            "follower1",
            ["--node-id", "follower1", "--follow", cluster.leader.address],
            args.followers_dir and args.followers_dir / "catch-up",
        )
        t0, leader_cpu0 = time.monotonic(), process_cpu_s(cluster.leader.pid)
        follower.start()
        result.ready_s = time.monotonic() - t0
        cluster.nodes.append(follower)
        head, heads = wait_caught_up(cluster)
        result.seconds = time.monotonic() - t0
        result.leader_cpu_s = process_cpu_s(cluster.leader.pid) - leader_cpu0
        result.follower_cpu_s = process_cpu_s(follower.pid)
        result.events = heads[0] or 0
        if result.events < head:
            result.problems.append(f"the follower reached {heads[0]} of {head:,}")
    finally:
        codes = cluster.stop()
    if any(codes):
        result.problems.append(f"exit codes {codes}")
    print(
        f"  follower catch-up {result.events_per_s:,.0f} events/s "
        f"({result.seconds:.1f} s, ready after {result.ready_s:.2f} s); leader's in-process "
        f"raw scan {result.scan_events_per_s:,.0f} events/s",
        flush=True,
    )
    return result


# -- 4. fan-out -----------------------------------------------------------------------------------


@dataclass
class FanOut:
    key: str
    title: str
    duration_s: float = 0.0
    deliveries: int = 0
    appends: Result | None = None
    received: list[Result] = field(default_factory=list)
    cluster_cpu_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.duration_s if self.duration_s else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile_ms([v for r in self.received for v in r.latencies_ns], q)

    @property
    def subscriber_cpu_pct(self) -> float | None:
        """The subscriber processes' CPU together, percent of one core."""
        if not self.duration_s or not self.received:
            return None
        return sum(r.cpu_s for r in self.received) / self.duration_s * 100


def run_fanout(
    fan: FanOut,
    addresses: Sequence[str],
    cluster: Cluster,
    workers: Workers,
    args: argparse.Namespace,
) -> FanOut:
    subjects = workload.subject_pool(args.subjects)
    pace = LiveSpec(
        "pace",
        fan.key,
        args.warmup,
        cluster.leader.address,
        clients=4,
        channels=1,
        rate=args.fanout_rate,
        appender="stub",
        subjects=subjects,
        payload_bytes=args.payload_bytes,
    )
    per = [
        args.fanout // FANOUT_PROCS + (1 if i < args.fanout % FANOUT_PROCS else 0)
        for i in range(FANOUT_PROCS)
    ]
    follows = [
        LiveSpec(
            "follow",
            fan.key,
            args.warmup,
            address,
            clients=count,
            channels=max(1, -(-count // 100)),
            drain_s=1.0,
        )
        for address, count in zip(addresses, per, strict=True)
    ]
    if args.quiet_wait:
        wait_for_quiet(args.quiet_wait)
    results, usage = workers.run([pace, *follows], args.duration, cluster.leader.pid, cluster.cpu_s)
    fan.duration_s = args.duration
    fan.appends, fan.received = results[0], results[1:]
    fan.deliveries = sum(r.ops for r in fan.received)
    fan.cluster_cpu_s = usage["server_cpu_s"]
    for r in results:
        if r.errors:
            fan.problems.append(f"{r.errors} errors: {r.first_error}")
    print(
        f"  {fan.title:<52} {fan.deliveries_per_s:>10,.0f} deliveries/s "
        f"(appends {fan.appends.ops / args.duration:,.0f}/s), latency p50 "
        f"{fan.latency_ms(0.5):.1f} ms p99 {fan.latency_ms(0.99):.1f} ms"
        + (f"  PROBLEMS: {fan.problems}" if fan.problems else ""),
        flush=True,
    )
    return fan


# -- the report ------------------------------------------------------------------------------------


def pct(cpu_s: float, seconds: float) -> str:
    return fmt(cpu_s / seconds * 100 if seconds else None, 0, "%")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(
    args: argparse.Namespace,
    settings: Settings,
    env: dict[str, str],
    appends: dict[str, list[Case]],
    lags: list[LagCase],
    catch_up: CatchUp,
    fans: list[FanOut],
    integrity: list[str],
    started: dt.datetime,
    elapsed_s: float,
) -> str:
    n = settings.clients
    by_key = {c.key: c for cases in appends.values() for c in cases}

    def events(key: str, label: str) -> float:
        return by_key[f"{key}@{label}"].events_per_s

    sync_1 = ratio(events(f"append-1x{n}", "sync-1"), events(f"append-1x{n}", "single"))
    half = lags[-1]
    fan_ratio = ratio(fans[1].deliveries_per_s, fans[0].deliveries_per_s)
    met = {True: "yes", False: "**no**"}
    lines = [
        f"# LetheDB replication benchmark, {started:%Y-%m-%d %H:%M} UTC"
        + (" (quick)" if args.quick else ""),
        "",
        f"Each case ran {settings.duration_s:g} s after {settings.warmup_s:g} s of warm-up; "
        f"whole run {elapsed_s:.0f} s. Every node is a `lethedb serve` process on this "
        f"machine ({os.cpu_count()} cores), each with its own data directory; every append "
        "is durable on the leader (fsync) before it is acknowledged, and with "
        "`--sync-replicas 1` on one follower too.",
        "",
        "## Ratios against the targets",
        "",
        "| Ratio | Measured | Target | Met |",
        "|---|--:|--:|:-:|",
        f"| Append 1 event, {n} clients: sync-replicas=1 / single node (events/s) "
        f"| {sync_1:.2f} | >= {SYNC_TARGET:g} | {met[sync_1 >= SYNC_TARGET]} |",
        f"| Replication lag p99 at half load (ms) | {half.lag_ms(0.99):.2f} "
        f"| < {LAG_P99_TARGET_MS:g} | {met[half.lag_ms(0.99) < LAG_P99_TARGET_MS]} |",
        f"| Fan-out, {args.fanout} subscribers over three nodes / on one (deliveries/s) "
        f"| {fan_ratio:.2f} | >= {FANOUT_TARGET:g} | {met[fan_ratio >= FANOUT_TARGET]} |",
        "",
        "| Context ratio | Measured |",
        "|---|--:|",
    ]
    for key, title in (
        (f"append-1x{n}", f"Append 1 event, {n} clients"),
        ("append-100x1", "Append 100 events, 1 client"),
    ):
        lines.append(
            f"| {title}: 2 async followers / single node | "
            f"{ratio(events(key, 'async'), events(key, 'single')):.2f} |"
        )
        if key != f"append-1x{n}":
            lines.append(
                f"| {title}: sync-replicas=1 / single node | "
                f"{ratio(events(key, 'sync-1'), events(key, 'single')):.2f} |"
            )
    lines.append(
        f"| Append 1 event, {n} clients: sync-replicas=1 / 2 async followers | "
        f"{ratio(events(f'append-1x{n}', 'sync-1'), events(f'append-1x{n}', 'async')):.2f} |"
    )
    lines += [
        f"| Follower catch-up / leader's in-process raw scan (events/s) | "
        f"{ratio(catch_up.events_per_s, catch_up.scan_events_per_s):.3f} |",
        "",
        "## Appends",
        "",
        *e2e_table([c for cases in appends.values() for c in cases]),
        "",
        "*Server CPU* is the leader's process alone; the followers run on the same cores.",
        "",
        "## Replication lag (2 async followers)",
        "",
        "| Load | Appends/s | Lag p50 ms | Lag p90 ms | Lag p99 ms | Lag max ms | Positions "
        "| Cluster CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for lag in lags:
        cpu = None if lag.cluster_cpu_s is None else lag.cluster_cpu_s / lag.duration_s * 100
        lines.append(
            f"| {lag.title} | {fmt(lag.rate)} | {fmt(lag.lag_ms(0.5), 2)} | "
            f"{fmt(lag.lag_ms(0.9), 2)} | {fmt(lag.lag_ms(0.99), 2)} | "
            f"{fmt(lag.lag_ms(1.0), 2)} | {fmt(len(lag.probe.latencies_ns) if lag.probe else 0)} "
            f"| {fmt(cpu, 0, '%')} |"
        )
    lines += [
        "",
        "Lag is, per position, the time the follower's subscriber received it minus the time "
        "the leader's subscriber did (one probe process, one clock): shipping, applying and "
        "fsync on the follower, without the subscription path both share. *Cluster CPU* is "
        "the three server processes together, percent of one core.",
        "",
        "## Catch-up",
        "",
        "| | Events | Seconds | Events/s |",
        "|---|--:|--:|--:|",
        f"| Leader in-process: raw LMDB scan | {fmt(catch_up.events)} | - | "
        f"{fmt(catch_up.scan_events_per_s)} |",
        f"| Leader in-process: scan + decrypt | {fmt(catch_up.events)} | - | "
        f"{fmt(catch_up.decrypt_events_per_s)} |",
        f"| Empty follower: process start to the leader's head | {fmt(catch_up.events)} | "
        f"{catch_up.seconds:.2f} | {fmt(catch_up.events_per_s)} |",
        "",
        f"The follower's time includes its start-up ({catch_up.ready_s:.2f} s to its ready file). "
        f"CPU over those {catch_up.seconds:.2f} s, percent of one core: the leader "
        f"{pct(catch_up.leader_cpu_s, catch_up.seconds)}, the follower "
        f"{pct(catch_up.follower_cpu_s, catch_up.seconds)} (its start-up included).",
        "",
        "## Fan-out",
        "",
        "| Subscribers | Appends/s | Deliveries/s | Delivery p50 ms | Delivery p99 ms "
        "| Cluster CPU | Subscriber CPU |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for fan in fans:
        cpu = None if fan.cluster_cpu_s is None else fan.cluster_cpu_s / fan.duration_s * 100
        rate = fan.appends.ops / fan.duration_s if fan.appends and fan.duration_s else 0.0
        lines.append(
            f"| {fan.title} | {fmt(rate)} | {fmt(fan.deliveries_per_s)} | "
            f"{fmt(fan.latency_ms(0.5), 1)} | {fmt(fan.latency_ms(0.99), 1)} | {fmt(cpu, 0, '%')} "
            f"| {fmt(fan.subscriber_cpu_pct, 0, '%')} |"
        )
    lines += [
        "",
        f"One client appends {args.fanout_rate:g} one-event appends per second (paced) to the "
        f"leader; {FANOUT_PROCS} subscriber processes follow from the end of the log, each "
        "subscription parsing every event; a delivery is one event received inside the "
        "window; latency is receive time minus the append's send time. *Subscriber CPU* is "
        "those processes together, percent of one core.",
        "",
        "## Notes",
        "",
        *[f"* {line}" for line in integrity],
        *(
            [f"* The followers' data directories' filesystem: {filesystem_of(args.followers_dir)}."]
            if args.followers_dir is not None
            else []
        ),
    ]
    problems = [p for lag in lags for p in lag.problems] + [p for f in fans for p in f.problems]
    problems += catch_up.problems
    problems += [
        f"{c.title}: {c.errors} errors: {c.first_error}"
        for cs in appends.values()
        for c in cs
        if c.errors
    ]
    lines += [f"* **Problem**: {p}" for p in problems]
    lines += environment_section(env)
    lines += ["", command_line("benchmarks.replication"), ""]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.replication",
        description="LetheDB replication benchmark (see benchmarks/README.md).",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per case (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per case")
    p.add_argument("--quick", action="store_true", help="1.5 s per case, a smaller catch-up log")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--channels", type=int, default=4, help="channels of the many-client cases")
    p.add_argument("--catch-up-events", type=int, default=200_000)
    p.add_argument("--fanout", type=int, default=1000, help="live subscribers (default 1000)")
    p.add_argument("--fanout-rate", type=float, default=100.0, help="appends/s while fanning out")
    p.add_argument("--subjects", type=int, default=workload.SUBJECTS)
    p.add_argument("--payload-bytes", type=int, default=workload.PAYLOAD_BYTES)
    p.add_argument("--quiet-wait", type=float, default=10.0, help="wait for quiet before cases")
    p.add_argument(
        "--followers-dir",
        type=Path,
        default=None,
        help="put the followers' data directories here (e.g. /dev/shm: without their fsyncs)",
    )
    add_output_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = min(args.duration, 1.5), min(args.warmup, 0.5)
        args.catch_up_events = min(args.catch_up_events, 50_000)
        args.quiet_wait = min(args.quiet_wait, 2.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    subjects = workload.subject_pool(args.subjects)
    settings = Settings(
        duration_s=args.duration,
        warmup_s=args.warmup,
        clients=args.clients,
        procs=1,
        channels=args.channels,
        window=1,
        subjects=subjects,
        payload_bytes=args.payload_bytes,
        quiet_wait_s=args.quiet_wait,
    )
    appends: dict[str, list[Case]] = {}
    integrity: list[str] = []
    lags: list[LagCase] = []
    fans: list[FanOut] = []
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(temp_root(args.tmp_dir, prefix="lethedb-replication-"))
        if args.followers_dir is not None:
            # Their own temporary directory there, removed with the rest.
            args.followers_dir = stack.enter_context(
                temp_root(args.followers_dir, prefix="lethedb-replication-followers-")
            )
        env = environment(root)
        workers = Workers(1 + FANOUT_PROCS, target=worker_main)
        try:
            for label, followers, sync in (("single", 0, 0), ("async", 2, 0), ("sync-1", 2, 1)):
                followers_root = args.followers_dir and args.followers_dir / label
                cluster = Cluster(
                    root / label, followers, sync, followers_root=followers_root
                ).start()
                try:
                    appends[label] = run_appends(label, cluster, workers, settings)
                    if label == "async":
                        lags, fans = lag_and_fanout(cluster, workers, args, settings)
                    integrity.append(check_caught_up(label, cluster))
                finally:
                    codes = cluster.stop()
                if any(codes):
                    integrity.append(f"{label}: a node exited with {codes} on SIGTERM")
            catch_up = run_catch_up(root / "catch-up", args, subjects)
        finally:
            workers.close()
    text = report(
        args,
        settings,
        env,
        appends,
        lags,
        catch_up,
        fans,
        integrity,
        started,
        time.monotonic() - t0,
    )
    publish(text, "replication", started, args)
    return 0


def lag_and_fanout(
    cluster: Cluster, workers: Workers, args: argparse.Namespace, settings: Settings
) -> tuple[list[LagCase], list[FanOut]]:
    n = settings.clients
    print("Replication lag, 2 async followers:", flush=True)
    full = Spec(
        kind="append",
        name="lag-full",
        warmup_s=args.warmup,
        clients=n,
        channels=settings.channels,
        events=1,
        address=cluster.leader.address,
        subjects=settings.subjects,
        payload_bytes=settings.payload_bytes,
    )
    at_full = run_lag(
        LagCase("lag-full", f"Full load: {n} clients, 1-event appends"),
        full,
        cluster,
        workers,
        args,
    )
    full_rate = at_full.rate
    half = LiveSpec(
        "pace",
        "lag-half",
        args.warmup,
        cluster.leader.address,
        clients=n,
        channels=settings.channels,
        rate=max(1.0, full_rate / 2),
        appender="stub",
        subjects=settings.subjects,
        payload_bytes=settings.payload_bytes,
    )
    at_half = run_lag(
        LagCase("lag-half", f"Half load: {n} clients paced to {full_rate / 2:,.0f} appends/s"),
        half,
        cluster,
        workers,
        args,
    )
    print(f"Fan-out, {args.fanout} subscribers:", flush=True)
    leader = cluster.leader.address
    one = run_fanout(
        FanOut("fan-one", f"{args.fanout} on the leader"),
        [leader] * FANOUT_PROCS,
        cluster,
        workers,
        args,
    )
    spread = run_fanout(
        FanOut("fan-spread", f"{args.fanout} over the three nodes"),
        [node.address for node in cluster.nodes],
        cluster,
        workers,
        args,
    )
    return [at_full, at_half], [one, spread]


def check_caught_up(label: str, cluster: Cluster) -> str:
    head, heads = wait_caught_up(cluster, timeout=120)
    if all(h == head for h in heads):
        return f"{label}: the leader's head is {head:,}" + (
            f" and every follower reached it ({heads})." if heads else "."
        )
    return f"**{label}: the followers stopped at {heads}, the leader's head is {head:,}**"


if __name__ == "__main__":
    raise SystemExit(main())
