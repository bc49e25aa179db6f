"""End-to-end load benchmark: a real server process, durable appends, one report.

Run ``python -m benchmarks.e2e`` (``make bench``) or ``--quick`` for a run of
about a minute. In one run it measures, each case for ``--duration`` seconds
after a warm-up under the same load:

* the disk's raw fsync rate (overwrite 4 KiB + ``os.fsync``), for context;
* the in-process reference: the store's writer driven directly, 100-event
  commands and 1-event commands, one thread and ``--clients`` threads;
* against a ``lethedb serve`` subprocess on a free port: unary ``Append`` of 1
  and 100 events with 1 and ``--clients`` concurrent clients, one pipelined
  ``AppendStream`` with ``--window`` appends in flight, and the bare gRPC
  ceiling, ``grpc.health.v1.Health/Check`` with 1 and ``--clients`` clients;
* optionally (``--sweep``) the client topology: processes x channels.

It prints a Markdown report with the ratios the design's targets ask for and
writes it to ``benchmarks/results/e2e-<date>.md``. Load comes from separate
worker processes (:mod:`benchmarks.loadgen`); the orchestrator only
coordinates and measures CPU use from ``/proc``. After the run it checks that
the server's head position equals the number of events the clients saw
acknowledged, so a benchmark that lost or invented writes cannot pass quietly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import workload
from benchmarks.harness import Server, Workers, temp_root, wait_for_quiet
from benchmarks.loadgen import Spec
from benchmarks.report import (
    NOISY_OTHER_CPU,
    add_output_args,
    command_line,
    environment,
    environment_section,
    fmt,
    noisy_notes,
    other_cpu_pct,
    percentile_ms,
    publish,
    waited_notes,
)

# -- cases and their figures ----------------------------------------------------------


@dataclass
class Case:
    key: str
    title: str
    kind: str  # as in loadgen.Spec.kind
    clients: int = 1
    events: int = 1
    procs: int = 1
    channels: int = 1
    window: int = 1
    # Filled in by the run:
    duration_s: float = 0.0
    ops: int = 0
    events_done: int = 0
    latencies_ns: list[int] = field(default_factory=list, repr=False)
    acked_events: int = 0
    errors: int = 0
    first_error: str = ""
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None
    machine_busy: float | None = None  # cores busy, machine-wide
    waited_s: float = 0.0  # waiting for other jobs to finish before the case
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.duration_s if self.duration_s else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events_done / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return percentile_ms(self.latencies_ns, q)

    @property
    def other_cpu(self) -> float | None:
        """Percent of a core used by anything else: the orchestrator, other jobs."""
        ours = (self.server_cpu_s or 0.0) + (self.client_cpu_s or 0.0)
        return other_cpu_pct(self.machine_busy, self.duration_s, ours)

    @property
    def topology(self) -> str:
        if self.kind in ("inprocess", "fsync"):
            return f"{self.clients} thread{'s' if self.clients > 1 else ''}"
        return f"{self.clients} ({self.procs}p x {self.channels}ch)"


# -- running the cases --------------------------------------------------------------------


@dataclass
class Settings:
    duration_s: float
    warmup_s: float
    clients: int
    procs: int
    channels: int
    window: int
    subjects: list[str]
    payload_bytes: int
    quiet_wait_s: float


def run_case(
    case: Case,
    workers: Workers,
    settings: Settings,
    *,
    address: str = "",
    data_dir: Path | None = None,
    server_pid: int | None = None,
) -> Case:
    procs = 1 if is_local(case) else case.procs
    specs = []
    for p in range(procs):
        clients = case.clients // procs + (1 if p < case.clients % procs else 0)
        specs.append(
            Spec(
                kind=case.kind,
                name=case.key,
                warmup_s=settings.warmup_s,
                clients=clients,
                channels=max(1, case.channels // procs),
                events=case.events,
                window=case.window,
                address=address,
                data_dir=str(data_dir or ""),
                subjects=settings.subjects,
                payload_bytes=settings.payload_bytes,
                seed=p,
            )
        )
    case.waited_s = wait_for_quiet(settings.quiet_wait_s) if settings.quiet_wait_s else 0.0
    results, usage = workers.run(specs, settings.duration_s, None if is_local(case) else server_pid)
    case.duration_s = settings.duration_s
    for result in results:
        case.ops += result.ops
        case.events_done += result.events
        case.latencies_ns.extend(result.latencies_ns)
        case.acked_events += result.acked_events
        case.errors += result.errors
        case.first_error = case.first_error or result.first_error
        case.extra.update(result.extra)
    worker_cpu = sum(r.cpu_s for r in results)
    if is_local(case):
        case.server_cpu_s = worker_cpu  # the store lives in the worker
    else:
        case.server_cpu_s = usage["server_cpu_s"]
        case.client_cpu_s = worker_cpu
    case.machine_busy = usage["machine_busy"]
    print(f"  {summary_line(case)}", flush=True)
    return case


def summary_line(case: Case) -> str:
    events = "" if case.kind in ("health", "fsync") else f"{case.events_per_s:,.0f} ev/s"
    line = (
        f"{case.title:<44} {case.ops_per_s:>9,.0f} ops/s {events:>14} "
        f"p50 {case.percentile_ms(0.5):7.2f} ms p99 {case.percentile_ms(0.99):7.2f} ms"
    )
    if case.errors:
        line += f"  ERRORS {case.errors}: {case.first_error}"
    return line


def plan(settings: Settings) -> list[Case]:
    """Every case of a run, each ratio's two sides next to each other.

    Running a ratio's numerator and denominator back to back keeps slow drift
    (the disk's fsync latency, other jobs) out of the ratio as far as possible.
    """
    n, p, c = settings.clients, settings.procs, settings.channels
    hundred, one = "In-process writer, 100-event commands", "In-process writer, 1-event commands"
    return [
        Case("fsync", "Disk: write 4 KiB + fsync", "fsync"),
        Case("health-1", "gRPC ceiling: Health.Check", "health", 1),
        Case(f"health-{n}", "gRPC ceiling: Health.Check", "health", n, procs=p, channels=c),
        Case("ref-1x1", one, "inprocess", 1, 1),
        Case("append-1x1", "Append, 1 event", "append", 1, 1),
        Case(f"append-1x{n}", "Append, 1 event", "append", n, 1, procs=p, channels=c),
        Case(f"ref-1x{n}", one, "inprocess", n, 1),
        Case(
            f"stream-w{settings.window}",
            f"AppendStream, 1 event, {settings.window} in flight",
            "stream",
            1,
            1,
            window=settings.window,
        ),
        Case("ref-100x1", hundred, "inprocess", 1, 100),
        Case("append-100x1", "Append, 100 events", "append", 1, 100),
        Case(f"append-100x{n}", "Append, 100 events", "append", n, 100, procs=p, channels=c),
        Case(f"ref-100x{n}", hundred, "inprocess", n, 100),
    ]


def is_local(case: Case) -> bool:
    """Whether the case runs without the server (in-process reference, disk probe)."""
    return case.kind in ("inprocess", "fsync")


def sweep_cases(settings: Settings) -> list[Case]:
    n = settings.clients
    shapes = [(1, 1), (1, 4), (1, n), (2, 2), (2, 8), (2, n)]
    cases = []
    for procs, channels in shapes:
        for kind, title in (("health", "Health.Check"), ("append", "Append, 1 event")):
            cases.append(
                Case(
                    f"sweep-{kind}-{procs}p{channels}c",
                    f"{title} ({procs} proc x {channels} ch)",
                    kind,
                    n,
                    procs=procs,
                    channels=channels,
                )
            )
    return cases


# -- the report ------------------------------------------------------------------------------


def table(cases: list[Case]) -> list[str]:
    rows = [
        "| Case | Clients | Events/op | Ops/s | Events/s | p50 ms | p99 ms "
        "| Server CPU | Client CPU | Other CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cases:
        events = "-" if c.kind in ("health", "fsync") else str(c.events)
        cpu = fmt(None if c.server_cpu_s is None else c.server_cpu_s / c.duration_s * 100, 0, "%")
        ccpu = fmt(None if c.client_cpu_s is None else c.client_cpu_s / c.duration_s * 100, 0, "%")
        other = fmt(c.other_cpu, 0, "%")
        title = c.title + (f" **({c.errors} errors)**" if c.errors else "")
        rows.append(
            f"| {title} | {c.topology} | {events} | {fmt(c.ops_per_s)} | "
            f"{fmt(c.events_per_s) if c.kind not in ('health', 'fsync') else '-'} | "
            f"{fmt(c.percentile_ms(0.5), 2)} | {fmt(c.percentile_ms(0.99), 2)} | "
            f"{cpu} | {ccpu} | {other} |"
        )
    return rows


def ratio_rows(by_key: dict[str, Case], clients: int, window: int) -> list[str]:
    def r(num: str, den: str, per_event: bool) -> float:
        a, b = by_key[num], by_key[den]
        top = a.events_per_s if per_event else a.ops_per_s
        bottom = b.events_per_s if per_event else b.ops_per_s
        return top / bottom if bottom else float("nan")

    n = clients
    targets = [
        (
            "gRPC Append 100 events, 1 client / in-process 100-event commands, 1 thread (events/s)",
            r("append-100x1", "ref-100x1", True),
            0.6,
        ),
        (
            f"gRPC Append 100 events, {n} clients / in-process 100-event commands, "
            f"{n} threads (events/s)",
            r(f"append-100x{n}", f"ref-100x{n}", True),
            0.6,
        ),
        (
            f"gRPC Append 1 event: {n} clients / 1 client (appends/s)",
            r(f"append-1x{n}", "append-1x1", False),
            2.0,
        ),
        (
            f"gRPC Append 1 event, {n} clients / Health.Check, {n} clients (calls/s)",
            r(f"append-1x{n}", f"health-{n}", False),
            0.8,
        ),
    ]
    context = [
        (
            f"gRPC Append 100 events, {n} clients / in-process 100-event commands, 1 thread",
            r(f"append-100x{n}", "ref-100x1", True),
        ),
        (
            "gRPC Append 1 event, 1 client / in-process 1-event commands, 1 thread",
            r("append-1x1", "ref-1x1", False),
        ),
        (
            f"gRPC Append 1 event, {n} clients / in-process 1-event commands, {n} threads",
            r(f"append-1x{n}", f"ref-1x{n}", False),
        ),
        (
            f"AppendStream ({window} in flight), 1 client / unary Append, {n} clients",
            r(f"stream-w{window}", f"append-1x{n}", False),
        ),
        (
            "gRPC Append 1 event, 1 client / Health.Check, 1 client",
            r("append-1x1", "health-1", False),
        ),
        (
            "In-process 1-event commands, 1 thread / raw fsync rate",
            r("ref-1x1", "fsync", False),
        ),
    ]
    rows = ["| Ratio | Measured | Target | Met |", "|---|--:|--:|:-:|"]
    for label, value, target in targets:
        met = "yes" if value >= target else "**no**"
        rows.append(f"| {label} | {value:.2f} | >= {target:g} | {met} |")
    rows += ["", "| Context ratio | Measured |", "|---|--:|"]
    rows += [f"| {label} | {value:.2f} |" for label, value in context]
    return rows


def report(
    args: argparse.Namespace,
    settings: Settings,
    env: dict[str, str],
    reference: list[Case],
    served: list[Case],
    sweep: list[Case],
    attempts: list[Case],
    integrity: str,
    started: dt.datetime,
    elapsed_s: float,
) -> str:
    by_key = {c.key: c for c in reference + served}
    n = settings.clients
    ref_batch = by_key[f"ref-1x{n}"].extra.get("commands_per_commit")
    lines = [
        f"# LetheDB end-to-end benchmark, {started:%Y-%m-%d %H:%M} UTC"
        + (" (quick)" if args.quick else ""),
        "",
        f"Each case ran {settings.duration_s:g} s after {settings.warmup_s:g} s of warm-up "
        "under the same load"
        + (f", best of {args.repeat} runs" if args.repeat > 1 else "")
        + f"; whole run {elapsed_s:.0f} s. Events carry "
        f"{settings.payload_bytes} random bytes and a subject drawn from "
        f"{len(settings.subjects)} subjects. Every append is durable (acknowledged after "
        "an LMDB commit with fsync).",
        "",
        "## Ratios against the targets",
        "",
        *ratio_rows(by_key, n, settings.window),
        "",
        "## Measurements",
        "",
        *table(reference + served),
        "",
        "Ops are appends (or Health checks, or fsyncs). Throughput counts operations that "
        "completed inside the window; latencies are those operations' call times, client "
        "side. CPU columns are percent of one core over the window: *Server CPU* is the "
        "`lethedb serve` process (for in-process rows, the process holding the store and "
        "its threads), *Client CPU* is the load processes together, *Other CPU* is the rest of the "
        "machine's busy time (the orchestrator, the kernel's I/O threads, and anything "
        "else running: figures taken while it is high are not trustworthy). The machine "
        f"has {os.cpu_count()} cores, {100 * (os.cpu_count() or 1)}% in all.",
        "",
    ]
    if sweep:
        lines += [
            f"## Client topology sweep ({n} clients)",
            "",
            *table(sweep),
            "",
        ]
    lines += [
        "## Notes",
        "",
        f"* Client topology for the {n}-client gRPC cases: {settings.procs} load "
        f"process(es), {settings.channels} channel(s) in all, clients spread round-robin "
        "over the channels (`--client-procs`, `--channels`); each channel is its own TCP "
        "connection (`grpc.use_local_subchannel_pool`). One-client cases use one process "
        "and one channel. Why this default: one asyncio load process already drives the "
        "server past one core (see *Server CPU*) while staying below one core itself, so "
        "on a small machine a second load process only takes CPU from the server; 1, 4 "
        "and 64 channels measured within noise of each other, 4 marginally best (README)"
        + ("; this run's own comparison is the sweep above." if sweep else "."),
        "* The load processes are separate from the server and from this orchestrator "
        "(spawned, asyncio + grpc.aio, no SDK). They send pre-serialised requests and do "
        "not parse responses (AppendStream responses are checked for the error tag), to "
        "leave the server as much of the machine as possible; the same shortcut applies "
        "to the Health ceiling, so the ratio against it is fair.",
        "* The in-process reference drives `Store.writer` directly in its own process "
        "and data directory: the same seal, LMDB puts and commit, without gRPC, protobuf "
        "conversion, validation or asyncio. Average commands per commit with "
        f"{n} in-process threads: {fmt(ref_batch, 1)}.",
        "* An LMDB commit with sync and metasync on costs two fdatasyncs (pages, then the "
        "meta page), so a strictly sequential 1-event writer cannot exceed about half the "
        "raw fsync rate; group commit is what lets concurrent clients go beyond it.",
        f"* Integrity: {integrity}",
    ]
    noisy = [c for c in reference + served + sweep if (c.other_cpu or 0) > NOISY_OTHER_CPU]
    lines += noisy_notes([c.key for c in noisy])
    lines += waited_notes(sum(c.waited_s for c in attempts))
    errors = [c for c in reference + served + sweep if c.errors]
    for c in errors:
        lines.append(f"* **{c.title} ({c.topology}) had {c.errors} errors**: {c.first_error}")
    lines += environment_section(env)
    lines += ["", command_line("benchmarks.e2e"), ""]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e",
        description="End-to-end LetheDB load benchmark (see benchmarks/README.md).",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per case (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per case")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a run of about a minute: 1.5 s per case, at most 3 s of --quiet-wait",
    )
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="load processes for the many-client cases (default 1)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=4,
        help="channels (TCP connections) in all for the many-client cases (default 4)",
    )
    p.add_argument("--window", type=int, default=256, help="AppendStream appends in flight")
    p.add_argument("--subjects", type=int, default=workload.SUBJECTS)
    p.add_argument("--payload-bytes", type=int, default=workload.PAYLOAD_BYTES)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every case this many times and report the fastest run (default 1)",
    )
    p.add_argument("--sweep", action="store_true", help="also compare client topologies")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each case, wait up to this many seconds for other jobs to go quiet "
        "(0: never wait; default 15)",
    )
    add_output_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = min(args.duration, 1.5), min(args.warmup, 0.5)
        args.quiet_wait = min(args.quiet_wait, 3.0)
    if args.channels < args.client_procs:
        p.error("--channels must be at least --client-procs (each process needs a channel)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    settings = Settings(
        duration_s=args.duration,
        warmup_s=args.warmup,
        clients=args.clients,
        procs=args.client_procs,
        channels=args.channels,
        window=args.window,
        subjects=workload.subject_pool(args.subjects),
        payload_bytes=args.payload_bytes,
        quiet_wait_s=args.quiet_wait,
    )
    sweep_shapes = sweep_cases(settings) if args.sweep else []
    max_procs = max([settings.procs] + [c.procs for c in sweep_shapes])
    with temp_root(args.tmp_dir) as root:
        env = environment(root)
        workers = Workers(max_procs)
        server = Server(root / "server-data", root / "server.log")
        try:
            server.start()
            print(
                f"Server {server.address} (pid {server.pid}), load from pids {workers.pids}:",
                flush=True,
            )
            before = server.head()
            attempts: list[Case] = []

            def best_of(template: Case, runs: int, case_settings: Settings) -> Case:
                """Run a case *runs* times and keep the fastest: noise only slows a run."""
                tries = [
                    run_case(
                        replace(template, latencies_ns=[], extra={}),
                        workers,
                        case_settings,
                        address=server.address,
                        server_pid=server.pid,
                        data_dir=root / "reference",
                    )
                    for _ in range(runs)
                ]
                attempts.extend(tries)
                return max(tries, key=lambda c: c.ops_per_s)

            cases = [best_of(c, args.repeat, settings) for c in plan(settings)]
            if sweep_shapes:
                print("Client topology sweep:", flush=True)
            sweep_settings = replace(settings, duration_s=min(settings.duration_s, 3.0))
            sweep = [best_of(c, 1, sweep_settings) for c in sweep_shapes]
            head = server.head()
        finally:
            code = server.stop()
            workers.close()
        if code != 0:
            print(f"The server exited with {code}; its log ends:\n{server.tail()}", file=sys.stderr)
    acked = sum(c.acked_events for c in attempts if not is_local(c))
    integrity = (
        f"the server's head moved by {head - before:,} positions and the clients saw "
        f"{acked:,} events acknowledged: "
        + ("they match." if head - before == acked else "**MISMATCH**.")
        + f" The server stopped on SIGTERM with exit code {code}."
    )
    reference = [c for c in cases if is_local(c)]
    served = [c for c in cases if not is_local(c)]
    text = report(
        args,
        settings,
        env,
        reference,
        served,
        sweep,
        attempts,
        integrity,
        started,
        time.monotonic() - t0,
    )
    publish(text, "e2e", started, args)
    ok = head - before == acked and code == 0 and not any(c.errors for c in cases + sweep)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
