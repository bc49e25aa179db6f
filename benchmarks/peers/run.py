"""Orchestration of a peer run: start everything, run every case, stop everything.

Cases are interleaved: every repetition of a case runs on each system back to
back (all servers stay up, idle when not measured), so slow drift of the disk
or of other jobs on the machine spreads over the systems instead of landing on
one of them. Each figure in the report is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import workload
from benchmarks.e2e import Case as RefCase
from benchmarks.e2e import Settings as RefSettings
from benchmarks.e2e import run_case
from benchmarks.harness import CpuMeter, CpuUsage, Workers, temp_root, wait_for_quiet
from benchmarks.loadgen import Result
from benchmarks.peers.servers import (
    SYSTEMS,
    PeerServer,
    ensure_clients,
    ensure_installed,
)
from benchmarks.peers.worker import Job, worker_main
from benchmarks.report import (
    add_output_args,
    environment,
    median,
    other_cpu_pct,
    percentile_ms,
)

ALL_SYSTEMS = ["lethedb", "redis", "postgres", "nats"]
#: Channels of the raw-stub reference load: the end-to-end tool's default.
RAW_STUB_CHANNELS = 4
PHASES = ["appends", "follow", "catchup", "scaling", "forget"]
#: Subscribers each see every event: the appender's rate is chosen so that
#: the load process receives at most this many deliveries per second in all
#: (a Python client process, not the server, would otherwise set the figure).
FANOUT_DELIVERIES_PER_S = 10_000
FANOUT_MAX_RATE = 200.0


@dataclass
class Run:
    """One measurement of one case on one system."""

    system: str
    case: str
    duration_s: float = 0.0
    ops: int = 0
    events: int = 0
    latencies_ns: list[int] = field(default_factory=list, repr=False)
    deliveries: int = 0
    delivery_ns: list[int] = field(default_factory=list, repr=False)
    errors: int = 0
    first_error: str = ""
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    machine_busy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.duration_s if self.duration_s else float("nan")

    @property
    def events_per_s(self) -> float:
        return self.events / self.duration_s if self.duration_s else float("nan")

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.duration_s if self.duration_s else float("nan")

    def call_ms(self, q: float) -> float:
        return percentile_ms(self.latencies_ns, q)

    def e2e_ms(self, q: float) -> float:
        return percentile_ms(self.delivery_ns, q)

    @property
    def server_cpu_pct(self) -> float | None:
        return None if self.server_cpu_s is None else 100 * self.server_cpu_s / self.duration_s

    @property
    def client_cpu_pct(self) -> float:
        return 100 * self.client_cpu_s / self.duration_s if self.duration_s else float("nan")

    @property
    def other_cpu_pct(self) -> float | None:
        ours = (self.server_cpu_s or 0.0) + self.client_cpu_s
        return other_cpu_pct(self.machine_busy, self.duration_s, ours)

    def metrics(self) -> dict[str, float]:
        """Every figure the report may quote, by name (NaN where it does not apply)."""
        out = {
            "ops_per_s": self.ops_per_s,
            "events_per_s": self.events_per_s,
            "call_p50_ms": self.call_ms(0.5),
            "call_p99_ms": self.call_ms(0.99),
            "deliveries_per_s": self.deliveries_per_s,
            "e2e_p50_ms": self.e2e_ms(0.5),
            "e2e_p99_ms": self.e2e_ms(0.99),
            "e2e_p999_ms": self.e2e_ms(0.999),
            "server_cpu_pct": nan_if_none(self.server_cpu_pct),
            "client_cpu_pct": self.client_cpu_pct,
            "other_cpu_pct": nan_if_none(self.other_cpu_pct),
        }
        for key, value in self.extra.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = float(value)
        return out


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def median_metrics(runs: list[Run]) -> dict[str, float]:
    """The median of each figure over the repetitions (NaNs left out)."""
    names: dict[str, list[float]] = {}
    for run in runs:
        for key, value in run.metrics().items():
            names.setdefault(key, [])
            if value == value:
                names[key].append(value)
    return {k: median(v) for k, v in names.items()}


@dataclass
class Settings:
    duration_s: float
    warmup_s: float
    repeat: int
    catchup_events: int
    scale_events: list[int]
    forget_subjects: int
    forget_store_subjects: int
    payload_bytes: int
    subjects: list[str]
    quiet_wait_s: float
    systems: list[str]
    fanout: list[int]
    mixed_writers: int
    mixed_subscribers: int


@dataclass
class Results:
    """Everything a run measured, for the report."""

    settings: Settings
    started: dt.datetime
    env: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    server_settings: dict[str, list[str]] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    reference: dict[str, list[RefCase]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    stop_codes: dict[str, int] = field(default_factory=dict)

    def add(self, run: Run) -> None:
        self.runs.setdefault((run.case, run.system), []).append(run)

    def median(self, case: str, system: str) -> dict[str, float] | None:
        runs = self.runs.get((case, system))
        return median_metrics(runs) if runs else None


# -- the cases ------------------------------------------------------------------------------


def fanout_rate(subscribers: int) -> float:
    return min(FANOUT_MAX_RATE, FANOUT_DELIVERIES_PER_S / subscribers)


class Runner:
    def __init__(self, settings: Settings, results: Results, workers: Workers) -> None:
        self.s = settings
        self.results = results
        self.workers = workers
        self.servers: dict[str, PeerServer] = {}
        self.counter = 0

    def prefix(self, case: str) -> str:
        self.counter += 1
        return f"{case}-{self.counter}"

    def job(self, system: str, role: str, case: str, **kw: Any) -> Job:
        server = self.servers[system]
        return Job(
            role=role,
            system="lethedb" if system.startswith("lethedb") else system,
            address=server.address,
            prefix=self.prefix(case),
            warmup_s=self.s.warmup_s,
            payload_bytes=self.s.payload_bytes,
            subjects=self.s.subjects,
            **kw,
        )

    def timed(self, system: str, case: str, jobs: list[Job]) -> Run:
        """Run *jobs* (one per worker) as one case; the first is the writer, if any."""
        if self.s.quiet_wait_s:
            wait_for_quiet(self.s.quiet_wait_s)
        server = self.servers[system]
        results, usage = self.workers.run(jobs, self.s.duration_s, server.pid, server.cpu)
        run = Run(system=system, case=case, duration_s=self.s.duration_s)
        for job, result in zip(jobs, results, strict=True):
            self._merge(run, job, result)
        run.server_cpu_s = usage["server_cpu_s"]
        run.machine_busy = usage["machine_busy"]
        self.results.add(run)
        print(f"  {describe(run)}", flush=True)
        if run.errors:
            self.results.failures.append(f"{system} {case}: {run.errors} errors: {run.first_error}")
        return run

    @staticmethod
    def _merge(run: Run, job: Job, result: Result) -> None:
        run.client_cpu_s += result.cpu_s
        run.errors += result.errors
        run.first_error = run.first_error or result.first_error
        if job.role == "subscribe":
            run.deliveries += result.ops
            run.delivery_ns.extend(result.latencies_ns)
            run.extra["stalled_subscribers"] = result.extra.get("stalled_subscribers", 0)
        else:
            run.ops += result.ops
            run.events += result.events
            run.latencies_ns.extend(result.latencies_ns)

    def append_case(self, system: str, case: str, clients: int, events: int) -> Run:
        job = self.job(system, "append", case, clients=clients, events=events)
        return self.timed(system, case, [job])

    def raw_stub_case(self, case: str, clients: int, events: int) -> Run:
        """LetheDB through pre-serialised raw stubs (loadgen), for the SDK's share."""
        server = self.servers["lethedb"]
        ref = RefCase(
            f"raw-{case}",
            "raw stubs",
            "append",
            clients,
            events,
            procs=1,
            channels=RAW_STUB_CHANNELS,
        )
        settings = RefSettings(
            duration_s=self.s.duration_s,
            warmup_s=self.s.warmup_s,
            clients=clients,
            procs=1,
            channels=RAW_STUB_CHANNELS,
            window=1,
            subjects=self.s.subjects,
            payload_bytes=self.s.payload_bytes,
            quiet_wait_s=self.s.quiet_wait_s,
        )
        done = run_case(
            ref, self.workers, settings, address=server.address["target"], server_pid=server.pid
        )
        run = Run(
            system="lethedb-raw",
            case=case,
            duration_s=done.duration_s,
            ops=done.ops,
            events=done.events_done,
            latencies_ns=done.latencies_ns,
            errors=done.errors,
            first_error=done.first_error,
            server_cpu_s=done.server_cpu_s,
            client_cpu_s=done.client_cpu_s or 0.0,
            machine_busy=done.machine_busy,
        )
        self.results.add(run)
        return run

    def follow_case(
        self, system: str, case: str, subscribers: int, writers: int, rate: float
    ) -> Run:
        writer = self.job(system, "append", case, clients=writers, events=1, rate=rate)
        readers = self.job(system, "subscribe", case, clients=subscribers)
        run = self.timed(system, case, [writer, readers])
        # Every subscriber sees every event: what a perfect fan-out would deliver.
        expected = run.events * subscribers
        run.extra["delivered_fraction"] = run.deliveries / expected if expected else float("nan")
        return run

    def one_shot(self, system: str, job: Job, timeout: float = 3600) -> tuple[Result, CpuUsage]:
        """Run a one-shot job; also return the server's and the machine's CPU meanwhile."""
        server = self.servers.get(system)
        meter = CpuMeter(None) if server is None else CpuMeter(server.pid, server.cpu)
        result: Result = self.workers.call(job, timeout)
        return result, meter.read()

    def catch_up(
        self, label: str, case: str, count: int, role: str = "catchup", system: str = ""
    ) -> Run:
        """Read *count* events from the start through server *label*; file under *system*."""
        if self.s.quiet_wait_s:
            wait_for_quiet(self.s.quiet_wait_s)
        result, spent = self.one_shot(label, self.job(label, role, case, count=count))
        elapsed = float(result.extra["elapsed_s"])
        run = Run(
            system=system or label,
            case=case,
            duration_s=elapsed,
            ops=result.ops,
            events=result.events,
            server_cpu_s=spent.server_cpu_s,
            client_cpu_s=result.cpu_s,
            machine_busy=spent.machine_busy_s / elapsed if elapsed else None,
        )
        if result.events < count:
            self.results.failures.append(
                f"{run.system} {case}: read {result.events:,} of {count:,} events"
            )
        self.results.add(run)
        print(f"  {describe(run)}", flush=True)
        return run


def describe(run: Run) -> str:
    m = run.metrics()
    text = f"{run.system:<12} {run.case:<18} {m['events_per_s']:>10,.0f} ev/s"
    if run.latencies_ns:
        text += f"  call p50 {m['call_p50_ms']:6.2f} p99 {m['call_p99_ms']:7.2f} ms"
    if run.deliveries:
        text += (
            f"  e2e p50 {m['e2e_p50_ms']:6.2f} p99 {m['e2e_p99_ms']:7.2f} "
            f"p999 {m['e2e_p999_ms']:7.2f} ms, {m['deliveries_per_s']:,.0f} deliveries/s"
        )
    cpu = run.server_cpu_pct
    text += f"  server CPU {cpu:.0f}%" if cpu is not None else ""
    if run.errors:
        text += f"  ERRORS {run.errors}: {run.first_error}"
    return text


# -- the run -----------------------------------------------------------------------------------


def reference(runner: Runner, root: Path) -> None:
    """The physical reference: the disk's fsync rate and the in-process writer (e2e's cases)."""
    s = runner.s
    settings = RefSettings(
        duration_s=s.duration_s,
        warmup_s=s.warmup_s,
        clients=64,
        procs=1,
        channels=1,
        window=1,
        subjects=s.subjects,
        payload_bytes=s.payload_bytes,
        quiet_wait_s=s.quiet_wait_s,
    )
    cases = [
        RefCase("fsync", "Disk: write 4 KiB + fsync", "fsync"),
        RefCase("ref-1x1", "In-process writer, 1-event commands", "inprocess", 1, 1),
        RefCase("ref-1x64", "In-process writer, 1-event commands", "inprocess", 64, 1),
        RefCase("ref-100x1", "In-process writer, 100-event commands", "inprocess", 1, 100),
    ]
    print("Physical reference (disk fsync, in-process LMDB + AES-GCM writer):", flush=True)
    for _ in range(s.repeat):
        for template in cases:
            case = RefCase(
                template.key, template.title, template.kind, template.clients, template.events
            )
            runner.results.reference.setdefault(case.key, []).append(
                run_case(case, runner.workers, settings, data_dir=root / "reference")
            )


def start(runner: Runner, root: Path, system: str, label: str = "", **kw: Any) -> PeerServer:
    """Start *system* (registered as *label*, default its name) in *root*/<label>."""
    server = SYSTEMS[system](root, label=label or system, **kw)
    server.start()
    old = runner.servers.get(label or system)
    if old is not None:
        runner.results.stop_codes[f"{label or system} (earlier)"] = old.stop()
    runner.servers[label or system] = server
    return server


def run_all(args: argparse.Namespace, settings: Settings) -> Results:
    results = Results(settings=settings, started=dt.datetime.now(dt.UTC))
    t0 = time.monotonic()
    systems = settings.systems
    with temp_root(args.tmp_dir, prefix="lethedb-peers-") as root:
        results.env = environment(root)
        workers = Workers(2, target=worker_main)
        runner = Runner(settings, results, workers)
        try:
            reference(runner, root)
            print("Starting the systems ...", flush=True)
            for system in systems:
                server = start(runner, root, system)
                results.titles[system] = server.title
                setup, _ = runner.one_shot(system, runner.job(system, "setup", "setup"))
                results.versions[system] = setup.extra.get("version") or server.version
                if system == "lethedb":
                    results.versions[system] = server.version
                results.server_settings[system] = server.settings
                print(f"  {server.title}: {results.versions[system]}", flush=True)
            results.titles["lethedb-raw"] = "LetheDB (raw stubs)"
            results.titles["redis+group"] = "Redis Streams (consumer group)"
            phases = args.phases
            if "appends" in phases:
                phase_appends(runner)
            if "follow" in phases:
                phase_follow(runner)
            if "catchup" in phases:
                phase_catch_up(runner, root)
                if "scaling" in phases:
                    phase_scaling(runner, root)
            if "forget" in phases:
                phase_forget(runner, root)
        finally:
            for label, server in runner.servers.items():
                results.stop_codes[label] = server.stop()
            workers.close()
    results.elapsed_s = time.monotonic() - t0
    return results


def phase_appends(runner: Runner) -> None:
    s = runner.s
    for case, clients, events in (
        ("append-1x1", 1, 1),
        ("append-1x64", 64, 1),
        ("append-100x1", 1, 100),
    ):
        print(f"{case}:", flush=True)
        for _ in range(s.repeat):
            for system in s.systems:
                runner.append_case(system, case, clients, events)
                if system == "lethedb":
                    runner.raw_stub_case(case, clients, events)


def phase_follow(runner: Runner) -> None:
    s = runner.s
    # Four writer tasks share the fixed schedule, so one slow acknowledgement
    # does not lower the offered rate.
    plans = [(f"fanout-{n}", n, 4, fanout_rate(n)) for n in s.fanout]
    plans.append(("mixed", s.mixed_subscribers, s.mixed_writers, 0.0))
    for case, subscribers, writers, rate in plans:
        print(
            f"{case}: {subscribers} subscribers, {writers} writer(s)"
            + (f" at {rate:g} appends/s" if rate else " as fast as they can"),
            flush=True,
        )
        for system in s.systems:
            if system == "postgres":
                runner.one_shot(system, runner.job(system, "setup", "notify", notify=True))
        for _ in range(s.repeat):
            for system in s.systems:
                runner.follow_case(system, case, subscribers, writers, rate)
        for system in s.systems:
            if system == "postgres":
                runner.one_shot(system, runner.job(system, "setup", "notify", notify=False))


def build_lethe(runner: Runner, data_dir: Path, count: int, distinct: int = 0) -> float:
    job = Job(
        role="build",
        system="lethedb",
        data_dir=str(data_dir),
        count=count,
        subjects=runner.s.subjects,
        payload_bytes=runner.s.payload_bytes,
        distinct_subjects=distinct,
        prefix="fill",
    )
    t0 = time.monotonic()
    result: Result = runner.workers.call(job, 7200)
    os.sync()  # write back what the build left dirty, so the next fsyncs do not pay for it
    elapsed = time.monotonic() - t0
    print(
        f"  built {result.events:,} events in-process in {elapsed:.0f} s "
        f"({result.events / max(elapsed, 1e-9):,.0f} events/s); head {result.extra['head']:,}",
        flush=True,
    )
    return elapsed


def scan_lethe(runner: Runner, data_dir: Path, count: int) -> None:
    """The catch-up's physical reference: read + decrypt in-process, one thread."""
    for _ in range(runner.s.repeat):
        job = Job(
            role="scan",
            system="lethedb",
            data_dir=str(data_dir),
            count=count,
            payload_bytes=runner.s.payload_bytes,
        )
        result: Result = runner.workers.call(job, 3600)
        case = RefCase(
            "ref-catchup", "In-process scan + decrypt of the catch-up log", "inprocess", 1, 1
        )
        case.duration_s = result.extra["elapsed_s"]
        case.ops = case.events_done = result.events
        case.server_cpu_s = result.cpu_s
        runner.results.reference.setdefault(case.key, []).append(case)
        print(f"  in-process scan + decrypt: {case.events_per_s:,.0f} events/s", flush=True)


def phase_catch_up(runner: Runner, root: Path) -> None:
    s = runner.s
    n = s.catchup_events
    print(f"Catch-up: loading every log to {n:,} events ...", flush=True)
    for system in s.systems:
        if system == "lethedb":
            runner.results.notes.append(
                f"LetheDB's {n:,}-event log was built in-process with `Store.writer` "
                "(1,000-event commands, the server's own seal and fsynced commits, no "
                "gRPC) before a server was started on it."
            )
            elapsed = build_lethe(runner, root / "lethedb-log" / "data", n)
            runner.results.notes.append(f"Building it took {elapsed:.0f} s.")
            scan_lethe(runner, root / "lethedb-log" / "data", n)
            start(
                runner, root, "lethedb", label="lethedb-log", data_dir=root / "lethedb-log" / "data"
            )
            continue
        t0 = time.monotonic()
        result, _ = runner.one_shot(system, runner.job(system, "fill", "fill", count=n))
        os.sync()
        print(
            f"  {system}: {result.extra['count']:,} events ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )
    case = f"catchup-{n}"
    for _ in range(s.repeat):
        for system in s.systems:
            label = "lethedb-log" if system == "lethedb" else system
            runner.catch_up(label, case, n, system=system)
            if system == "redis" and not any(
                k == (case, "redis+group") for k in runner.results.runs
            ):  # once: it shows consumer groups, no target depends on it
                runner.catch_up("redis", case, n, role="catchup-group", system="redis+group")


def phase_scaling(runner: Runner, root: Path) -> None:
    """LetheDB only: appends and catch-up with 1x and 10x the catch-up log in place."""
    s = runner.s
    data = root / "lethedb-log" / "data"
    for index, size in enumerate(s.scale_events):
        if index > 0:
            runner.results.stop_codes["lethedb-log (earlier)"] = runner.servers[
                "lethedb-log"
            ].stop()
            print(f"Scaling: growing LetheDB's log to {size:,} events in-process ...", flush=True)
            elapsed = build_lethe(runner, data, size)
            runner.results.notes.append(
                f"LetheDB's log was grown to {size:,} events in-process the same way "
                f"({elapsed:.0f} s)."
            )
            start(runner, root, "lethedb", label="lethedb-log", data_dir=data)
        print(f"Scaling, {size:,} events in the log:", flush=True)
        for _ in range(s.repeat):
            for case, clients, events in (("append-100x1", 1, 100), ("append-1x64", 64, 1)):
                run = runner.append_case("lethedb-log", case, clients, events)
                move(runner.results, run, f"scale-{size}-{case}")
            if index > 0:
                run = runner.catch_up("lethedb-log", f"scale-{size}-catchup", s.catchup_events)
    # The first size's catch-up figures are the main catch-up runs.
    for run in runner.results.runs.get((f"catchup-{s.catchup_events}", "lethedb"), []):
        runner.results.add(
            Run(
                **{
                    **run.__dict__,
                    "case": f"scale-{s.scale_events[0]}-catchup",
                    "system": "lethedb-log",
                }
            )
        )


def move(results: Results, run: Run, case: str) -> None:
    runs = results.runs[(run.case, run.system)]
    runs.remove(run)
    if not runs:
        del results.runs[(run.case, run.system)]
    run.case = case
    results.add(run)


def phase_forget(runner: Runner, root: Path) -> None:
    s = runner.s
    data = root / "lethedb-forget" / "data"
    print(
        f"Forget: {s.forget_subjects:,} of {s.forget_store_subjects:,} subjects "
        "(one event each) ...",
        flush=True,
    )
    elapsed = build_lethe(runner, data, s.forget_store_subjects, s.forget_store_subjects)
    runner.results.notes.append(
        f"The forget store ({s.forget_store_subjects:,} subjects, one event each) was built "
        f"in-process the same way ({elapsed:.0f} s)."
    )
    if "lethedb-log" in runner.servers:
        runner.results.stop_codes["lethedb-log"] = runner.servers.pop("lethedb-log").stop()
    server = start(runner, root, "lethedb", label="lethedb-forget", data_dir=data)
    job = Job(
        role="forget",
        system="lethedb",
        address=server.address,
        count=s.forget_subjects,
        distinct_subjects=s.forget_store_subjects,
    )
    result, spent = runner.one_shot("lethedb-forget", job, 7200)
    run = Run(
        system="lethedb",
        case="forget",
        duration_s=float(result.extra["forget_s"]) + float(result.extra["shred_s"]),
        ops=result.ops,
        server_cpu_s=spent.server_cpu_s,
        client_cpu_s=result.cpu_s,
        extra=dict(result.extra),
    )
    runner.results.add(run)
    print(
        f"  forgot {result.ops:,} subjects in {result.extra['forget_s']:.1f} s "
        f"({result.ops / result.extra['forget_s']:,.0f}/s); shred epoch "
        f"{result.extra['shred_s']:.1f} s, {result.extra['live_keys']:,} live keys re-wrapped; "
        f"receipts say shredded: {result.extra['receipts_shredded']}",
        flush=True,
    )
    if not result.extra["receipts_shredded"]:
        runner.results.failures.append("forget: sampled receipts are not SHREDDED")


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description="LetheDB against Redis Streams, PostgreSQL and NATS JetStream "
        "(see benchmarks/README.md).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, 1.5 s cases, one repetition: a few minutes",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repetitions of every case; the report shows medians (default 3, quick 1)",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per timed case (default 3, quick 1.5)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds per timed case (default 1, quick 0.5)",
    )
    p.add_argument(
        "--catchup-events",
        type=int,
        default=None,
        help="events in the catch-up read (default 1,000,000; quick 100,000)",
    )
    p.add_argument(
        "--scale-events",
        type=str,
        default=None,
        help="log sizes of the scaling cases, comma-separated "
        "(default 1000000,10000000; quick 100000,1000000)",
    )
    p.add_argument(
        "--forget",
        type=str,
        default=None,
        help="SUBJECTS/STORE: forget this many subjects of a store holding STORE "
        "subjects (default 10000/1000000; quick 1000/100000)",
    )
    p.add_argument(
        "--systems",
        type=str,
        default=",".join(ALL_SYSTEMS),
        help="comma-separated subset of " + ", ".join(ALL_SYSTEMS),
    )
    p.add_argument(
        "--fanout",
        type=str,
        default="1,100,1000",
        help="subscriber counts of the fan-out cases (default 1,100,1000)",
    )
    p.add_argument(
        "--phases",
        type=str,
        default=",".join(PHASES),
        help="comma-separated subset of " + ", ".join(PHASES) + " (scaling needs catchup); "
        "for partial runs while developing",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each case, wait up to this many seconds for other jobs to go "
        "quiet (default 5, quick 2; 0: never)",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="never run apt-get; only print the command when a system is missing",
    )
    add_output_args(p)
    args = p.parse_args(argv)
    q = args.quick
    args.repeat = args.repeat or (1 if q else 3)
    args.duration = args.duration or (1.5 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 1.0)
    args.catchup_events = args.catchup_events or (100_000 if q else 1_000_000)
    scale = args.scale_events or ("100000,1000000" if q else "1000000,10000000")
    args.scale_events = [int(x) for x in scale.split(",")]
    forget = args.forget or ("1000/100000" if q else "10000/1000000")
    args.forget_subjects, args.forget_store = (int(x) for x in forget.split("/"))
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (2.0 if q else 5.0)
    args.systems = [x for x in args.systems.split(",") if x]
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if "lethedb" not in args.systems:
        p.error("every result is a ratio to LetheDB: --systems must include lethedb")
    args.phases = [x for x in args.phases.split(",") if x]
    args.fanout = [int(x) for x in args.fanout.split(",") if x]
    if args.scale_events[0] != args.catchup_events:
        args.scale_events = [
            args.catchup_events,
            *[x for x in args.scale_events if x > args.catchup_events],
        ]
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers.report import write_report

    args = parse_args(argv)
    peers = [s for s in args.systems if s != "lethedb"]
    ensure_clients(peers)
    ensure_installed(peers, install=not args.no_install)
    settings = Settings(
        duration_s=args.duration,
        warmup_s=args.warmup,
        repeat=args.repeat,
        catchup_events=args.catchup_events,
        scale_events=args.scale_events,
        forget_subjects=args.forget_subjects,
        forget_store_subjects=args.forget_store,
        payload_bytes=workload.PAYLOAD_BYTES,
        subjects=workload.subject_pool(workload.SUBJECTS),
        quiet_wait_s=args.quiet_wait,
        systems=args.systems,
        fanout=args.fanout,
        mixed_writers=64,
        mixed_subscribers=100,
    )
    results = run_all(args, settings)
    text, path = write_report(results, args)
    print()
    print(text)
    if path:
        print(f"Report written to {path}")
    bad_stops = {k: v for k, v in results.stop_codes.items() if v not in (0, -2, -15)}
    if bad_stops:
        print(f"servers stopped with {bad_stops}", file=sys.stderr)
    return 1 if results.failures or bad_stops else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
