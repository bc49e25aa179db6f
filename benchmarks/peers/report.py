"""The peer report: Markdown tables, every figure as a ratio to LetheDB, and PNG charts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks.peers.clients import LETHE_CHANNELS
from benchmarks.peers.run import (
    FANOUT_DELIVERIES_PER_S,
    RAW_STUB_CHANNELS,
    Results,
    fanout_rate,
)
from benchmarks.report import (
    NOISY_OTHER_CPU,
    dist_version,
    environment_section,
    fmt,
    median,
    results_stem,
)

PEERS = ["redis", "postgres", "nats"]


def nan(value: float | None) -> bool:
    return value is None or value != value


def ratio(value: float | None, base: float | None) -> float:
    if nan(value) or nan(base) or not base:
        return float("nan")
    return float(value) / float(base)  # type: ignore[arg-type]


def cell(value: float | None, base: float | None, digits: int = 0) -> str:
    if nan(value):
        return "-"
    r = ratio(value, base)
    return f"{fmt(value, digits)} ({r:.2f}x)" if not nan(r) else fmt(value, digits)


class Report:
    def __init__(self, results: Results, args: argparse.Namespace) -> None:
        self.r = results
        self.s = results.settings
        self.args = args
        self.peers = [p for p in PEERS if p in self.s.systems]
        self.charts: list[tuple[str, str]] = []  # (file name, caption)

    def m(self, case: str, system: str, metric: str) -> float:
        medians = self.r.median(case, system)
        return medians.get(metric, float("nan")) if medians else float("nan")

    def title(self, system: str) -> str:
        return self.r.titles.get(system, system)

    # -- tables ---------------------------------------------------------------------

    def append_rows(self) -> list[str]:
        cases = [
            ("append-1x1", "1-event appends, 1 client"),
            ("append-1x64", "1-event appends, 64 clients"),
            ("append-100x1", "100-event appends, 1 client"),
        ]
        systems = ["lethedb", *self.peers]
        head = "| Workload | " + " | ".join(self.title(x) for x in systems) + " |"
        rows = [head, "|---|" + "--:|" * len(systems)]
        for case, label in cases:
            base = self.m(case, "lethedb", "events_per_s")
            cells = [cell(self.m(case, x, "events_per_s"), base) for x in systems]
            rows.append(f"| {label}: events/s | " + " | ".join(cells) + " |")
        for case, label in cases:
            base = self.m(case, "lethedb", "call_p50_ms")
            cells = [cell(self.m(case, x, "call_p50_ms"), base, 2) for x in systems]
            rows.append(f"| {label}: p50 call ms | " + " | ".join(cells) + " |")
        for case, label in cases:
            base = self.m(case, "lethedb", "call_p99_ms")
            cells = [cell(self.m(case, x, "call_p99_ms"), base, 2) for x in systems]
            rows.append(f"| {label}: p99 call ms | " + " | ".join(cells) + " |")
        return rows

    def follow_cases(self) -> list[tuple[str, str]]:
        cases = [
            (
                f"fanout-{n}",
                f"fan-out to {n:,} subscriber{'s' if n > 1 else ''} ({fanout_rate(n):g} appends/s)",
            )
            for n in self.s.fanout
        ]
        cases.append(
            (
                "mixed",
                f"mixed: {self.s.mixed_writers} writers flat out + "
                f"{self.s.mixed_subscribers} subscribers",
            )
        )
        return cases

    def follow_rows(self) -> list[str]:
        systems = ["lethedb", *self.peers]
        head = "| Workload | Figure | " + " | ".join(self.title(x) for x in systems) + " |"
        rows = [head, "|---|---|" + "--:|" * len(systems)]
        for case, label in self.follow_cases():
            figures = [
                ("e2e_p50_ms", "p50 ms", 2),
                ("e2e_p99_ms", "p99 ms", 2),
                ("e2e_p999_ms", "p99.9 ms", 2),
                ("deliveries_per_s", "deliveries/s", 0),
                ("delivered_fraction", "delivered / expected", 2),
            ]
            if case == "mixed":
                figures.insert(0, ("events_per_s", "appends/s", 0))
            for metric, name, digits in figures:
                base = self.m(case, "lethedb", metric)
                if metric == "delivered_fraction":
                    cells = [fmt(self.m(case, x, metric), 2) for x in systems]
                else:
                    cells = [cell(self.m(case, x, metric), base, digits) for x in systems]
                rows.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
        return rows

    def catchup_rows(self) -> list[str]:
        case = f"catchup-{self.s.catchup_events}"
        systems = ["lethedb", *self.peers]
        if "redis" in self.peers:
            systems.insert(systems.index("redis") + 1, "redis+group")
        rows = [
            "| System | Events/s | Ratio to LetheDB | Seconds | Server CPU | Client CPU |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        base = self.m(case, "lethedb", "events_per_s")
        for x in systems:
            eps = self.m(case, x, "events_per_s")
            rows.append(
                f"| {self.title(x)} | {fmt(eps)} | {fmt(ratio(eps, base), 2, 'x')} | "
                f"{fmt(self.s.catchup_events / eps if eps == eps and eps else None, 1)} | "
                f"{fmt(self.m(case, x, 'server_cpu_pct'), 0, '%')} | "
                f"{fmt(self.m(case, x, 'client_cpu_pct'), 0, '%')} |"
            )
        return rows

    def catchup_ceiling(self) -> list[str]:
        """How far decryption alone, in-process, is from the fastest peer's catch-up."""
        cases = self.r.reference.get("ref-catchup")
        if not cases:
            return []
        scan = median([c.events_per_s for c in cases])
        case = f"catchup-{self.s.catchup_events}"
        lines = [
            "",
            f"Reading and decrypting the same log in-process, on one thread with no gRPC and "
            f"no protobuf, runs at {fmt(scan)} events/s (median; the *Physical reference* "
            f"below); LetheDB's served catch-up is "
            f"{fmt(ratio(self.m(case, 'lethedb', 'events_per_s'), scan), 2, 'x')} of that.",
        ]
        if "postgres" in self.peers:
            pg = self.m(case, "postgres", "events_per_s")
            lines[-1] += (
                f" PostgreSQL returns its rows in the clear at {fmt(pg)} rows/s, "
                f"{fmt(ratio(pg, scan), 2, 'x')} the in-process decrypt rate: per-event AES-GCM "
                "in this process bounds LetheDB's catch-up before any network or client cost."
            )
        return lines

    def targets(self) -> list[str]:
        catch = f"catchup-{self.s.catchup_events}"
        wanted = [
            (
                "append-100x1",
                "redis",
                "100-event durable appends vs Redis Streams (appendfsync always, MULTI + 100 XADD)",
            ),
            (
                "append-100x1",
                "postgres",
                "100-event durable appends vs PostgreSQL (100-row insert transaction)",
            ),
            ("append-1x64", "postgres", "64 concurrent 1-event durable appends vs PostgreSQL"),
            (
                catch,
                "postgres",
                f"catch-up read of {self.s.catchup_events:,} events vs "
                "PostgreSQL keyset pagination",
            ),
        ]
        rows = [
            "| Target | LetheDB events/s | Peer events/s | LetheDB ÷ peer | Target | Met |",
            "|---|--:|--:|--:|--:|:-:|",
        ]
        for case, peer, label in wanted:
            if peer not in self.peers:
                continue
            ours, theirs = (
                self.m(case, "lethedb", "events_per_s"),
                self.m(case, peer, "events_per_s"),
            )
            r = ratio(ours, theirs)
            met = "-" if nan(r) else ("yes" if r >= 1.0 else "**no**")
            rows.append(
                f"| {label} | {fmt(ours)} | {fmt(theirs)} | {fmt(r, 2, 'x')} | >= 1.0x | {met} |"
            )
        return rows

    def sdk_rows(self) -> list[str]:
        rows = [
            "| Workload | SDK (AsyncClient) events/s | Raw stubs events/s | SDK ÷ raw "
            "| SDK client CPU | Raw client CPU |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for case, label in (
            ("append-1x1", "1-event appends, 1 client"),
            ("append-1x64", "1-event appends, 64 clients"),
            ("append-100x1", "100-event appends, 1 client"),
        ):
            sdk, raw = (
                self.m(case, "lethedb", "events_per_s"),
                self.m(case, "lethedb-raw", "events_per_s"),
            )
            rows.append(
                f"| {label} | {fmt(sdk)} | {fmt(raw)} | {fmt(ratio(sdk, raw), 2, 'x')} | "
                f"{fmt(self.m(case, 'lethedb', 'client_cpu_pct'), 0, '%')} | "
                f"{fmt(self.m(case, 'lethedb-raw', 'client_cpu_pct'), 0, '%')} |"
            )
        return rows

    def reference_rows(self) -> list[str]:
        rows = [
            "| Reference | Ops/s | Events/s | p50 ms | Ratio to LetheDB's served figure |",
            "|---|--:|--:|--:|--:|",
        ]
        served = {
            "ref-1x1": ("append-1x1", "1-event appends, 1 client"),
            "ref-1x64": ("append-1x64", "1-event appends, 64 clients"),
            "ref-100x1": ("append-100x1", "100-event appends, 1 client"),
            "ref-catchup": (f"catchup-{self.s.catchup_events}", "catch-up"),
        }
        for key, cases in self.r.reference.items():
            ops = median([c.ops_per_s for c in cases])
            eps = median([c.events_per_s for c in cases])
            p50 = median([c.percentile_ms(0.5) for c in cases])
            title = cases[0].title + (
                f", {cases[0].clients} thread{'s' if cases[0].clients > 1 else ''}"
                if key != "fsync"
                else ""
            )
            extra = "-"
            if key in served:
                case, label = served[key]
                lethe = self.m(case, "lethedb", "events_per_s")
                extra = f"LetheDB {label} = {fmt(ratio(lethe, eps), 2, 'x')} of this"
            rows.append(
                f"| {title} | {fmt(ops)} | {fmt(eps) if key != 'fsync' else '-'} | "
                f"{fmt(p50, 2)} | {extra} |"
            )
        return rows

    def scaling_rows(self) -> list[str]:
        sizes = self.s.scale_events
        rows = [
            "| Events in the log | 100-event appends, 1 client (events/s) | "
            "1-event appends, 64 clients (events/s) | Catch-up (events/s) |",
            "|--:|--:|--:|--:|",
        ]
        base = {
            k: self.m(f"scale-{sizes[0]}-{k}", "lethedb-log", "events_per_s")
            for k in ("append-100x1", "append-1x64", "catchup")
        }
        fresh = {k: self.m(k, "lethedb", "events_per_s") for k in ("append-100x1", "append-1x64")}
        rows.append(
            f"| fresh log (the append cases above) | {fmt(fresh['append-100x1'])} | "
            f"{fmt(fresh['append-1x64'])} | - |"
        )
        for size in sizes:
            cells = []
            for k in ("append-100x1", "append-1x64", "catchup"):
                v = self.m(f"scale-{size}-{k}", "lethedb-log", "events_per_s")
                cells.append(cell(v, base[k]))
            rows.append(f"| {size:,} | " + " | ".join(cells) + " |")
        return rows

    def forget_rows(self) -> list[str]:
        medians = self.r.median("forget", "lethedb")
        if not medians:
            return ["(not run)"]
        n = self.s.forget_subjects
        forget_s = medians.get("forget_s")
        return [
            "| Figure | Value |",
            "|---|--:|",
            f"| Subjects in the store (one event each) | {self.s.forget_store_subjects:,} |",
            f"| Subjects forgotten (64 concurrent `forget_subject` calls) | {n:,} |",
            f"| Forget: wall time | {fmt(medians.get('forget_s'), 2)} s |",
            f"| Forget: subjects/s | {fmt(n / forget_s if forget_s else None)} |",
            f"| Shred epoch (`admin.shred()`): wall time | {fmt(medians.get('shred_s'), 2)} s |",
            f"| Live keys re-wrapped by the epoch | {fmt(medians.get('live_keys'))} |",
            f"| Subjects the epoch shredded | {fmt(medians.get('shredded_subjects'))} |",
            f"| Server CPU over forget + shred | {fmt(medians.get('server_cpu_pct'), 0, '%')} |",
        ]

    # -- charts ---------------------------------------------------------------------

    def charts_png(self, out_dir: Path, stem: str) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(
                "matplotlib is not installed: no charts (pip install -e '.[bench]')",
                file=sys.stderr,
            )
            return
        systems = ["lethedb", "lethedb-raw", *self.peers]
        colours = {
            "lethedb": "#1f5fa8",
            "lethedb-raw": "#8fb3dd",
            "redis": "#c0392b",
            "postgres": "#336791",
            "nats": "#27aa6a",
            "redis+group": "#e8918a",
        }
        colours["postgres"] = "#7a7a7a"

        def bars(ax: Any, groups: list[tuple[str, str]], names: list[str], metric: str) -> None:
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                values = [self.m(case, name, metric) for case, _ in groups]
                xs = [g + i * width for g in range(len(groups))]
                ax.bar(
                    xs,
                    [0 if nan(v) else v for v in values],
                    width,
                    label=self.title(name),
                    color=colours.get(name),
                )
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
            ax.set_xticklabels([label for _, label in groups])
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)

        def measured(cases: list[str], names: list[str], metric: str) -> bool:
            """Whether a chart has anything to draw: a partial run (--phases) may not."""
            return any(not nan(self.m(c, n, metric)) for c in cases for n in names)

        # Appends
        append_groups = [
            ("append-1x1", "1-event, 1 client"),
            ("append-1x64", "1-event, 64 clients"),
            ("append-100x1", "100-event, 1 client"),
        ]
        if measured([c for c, _ in append_groups], systems, "events_per_s"):
            self._appends_chart(plt, bars, append_groups, systems, out_dir, stem)

        # Fan-out latency
        groups = [
            (case, "mixed" if case == "mixed" else case.replace("fanout-", "") + " subs")
            for case, _ in self.follow_cases()
        ]
        followers = ["lethedb", *self.peers]
        if measured([c for c, _ in groups], followers, "e2e_p50_ms"):
            self._fanout_chart(plt, bars, groups, followers, out_dir, stem)

        # Catch-up
        case = f"catchup-{self.s.catchup_events}"
        names = ["lethedb", *self.peers]
        if "redis" in self.peers:
            names.insert(names.index("redis") + 1, "redis+group")
        if measured([case], names, "events_per_s"):
            self._catchup_chart(plt, case, names, colours, out_dir, stem)

        # Scaling
        sizes = self.s.scale_events
        scale_cases = [f"scale-{n}-append-100x1" for n in sizes]
        if measured(scale_cases, ["lethedb-log"], "events_per_s"):
            self._scaling_chart(plt, sizes, out_dir, stem)

    def _appends_chart(
        self,
        plt: Any,
        bars: Any,
        groups: list[tuple[str, str]],
        systems: list[str],
        out_dir: Path,
        stem: str,
    ) -> None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        bars(ax, groups, systems, "events_per_s")
        ax.set_yscale("log")
        ax.set_ylabel("durable events/s (log scale)")
        ax.set_title("Durable appends (median of runs)")
        self._save(fig, out_dir, stem, "appends", "Durable append throughput, events/s")

    def _fanout_chart(
        self,
        plt: Any,
        bars: Any,
        groups: list[tuple[str, str]],
        followers: list[str],
        out_dir: Path,
        stem: str,
    ) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, metric, name in ((axes[0], "e2e_p50_ms", "p50"), (axes[1], "e2e_p99_ms", "p99")):
            bars(ax, groups, followers, metric)
            ax.set_yscale("log")
            ax.set_ylabel(f"append -> subscriber receive, {name} ms (log)")
            ax.set_title(f"End-to-end latency, {name}")
            ax.tick_params(axis="x", labelsize=8)
        self._save(fig, out_dir, stem, "fanout", "End-to-end latency of live subscribers")

    def _catchup_chart(
        self,
        plt: Any,
        case: str,
        names: list[str],
        colours: dict[str, str],
        out_dir: Path,
        stem: str,
    ) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        values = [self.m(case, x, "events_per_s") for x in names]
        ax.barh(
            [self.title(x) for x in names],
            [0 if nan(v) else v for v in values],
            color=[colours.get(x) for x in names],
        )
        ax.set_xlabel("events/s")
        ax.set_title(f"Catch-up read of {self.s.catchup_events:,} events (median)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        self._save(fig, out_dir, stem, "catchup", "Catch-up read rate")

    def _scaling_chart(self, plt: Any, sizes: list[int], out_dir: Path, stem: str) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        for key, label in (
            ("append-100x1", "100-event appends, 1 client"),
            ("append-1x64", "1-event appends, 64 clients"),
            ("catchup", "catch-up read"),
        ):
            ys = [self.m(f"scale-{n}-{key}", "lethedb-log", "events_per_s") for n in sizes]
            ax.plot(sizes, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events in the log")
        ax.set_ylabel("events/s")
        ax.set_title("LetheDB: throughput against log size")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        self._save(fig, out_dir, stem, "scaling", "LetheDB throughput against log size")

    def _save(self, fig: Any, out_dir: Path, stem: str, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        fig.tight_layout()
        file = f"{stem}-{name}.png"
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
        self.charts.append((file, caption))

    # -- the document -----------------------------------------------------------------

    def text(self) -> str:
        s, r = self.s, self.r
        lines = [
            f"# LetheDB against its peers, {r.started:%Y-%m-%d %H:%M} UTC"
            + (" (quick)" if self.args.quick else ""),
            "",
            f"One run of `python -m benchmarks.peers {' '.join(sys.argv[1:])}`".rstrip()
            + f" on this machine, {r.elapsed_s / 60:.1f} minutes. Every system ran on loopback "
            "on the same machine in the same run, started by the tool; every figure is the "
            f"**median of {s.repeat} run{'s' if s.repeat > 1 else ''}** "
            f"({s.duration_s:g} s per timed case after {s.warmup_s:g} s of warm-up under the "
            "same load), and every peer figure is followed by its ratio to LetheDB's "
            "(peer ÷ LetheDB: for throughput above 1.00x the peer is faster, for latency "
            "above 1.00x it is slower). Events carry "
            f"{s.payload_bytes} bytes of data (encrypted in LetheDB, in the clear elsewhere).",
            "",
            "## Targets",
            "",
            *self.targets(),
            "",
            "LetheDB ÷ peer here is the inverse of the ratios in the tables below.",
            "",
            "## Durable appends",
            "",
            *self.append_rows(),
            "",
            "Throughput counts appends acknowledged inside the window; call latencies are "
            "the client's, from sending an append to its acknowledgement. 64 clients are 64 "
            "asyncio tasks in one load process, each with one append in flight, each "
            "appending to its own stream.",
            "",
            "### LetheDB's SDK against raw stubs",
            "",
            *self.sdk_rows(),
            "",
            "The LetheDB column above goes through the SDK's `AsyncClient` (an `Event` per "
            "event, a random event id per event, the request built per call; appends in "
            "flight at once on one client share an `AppendBatch` call). *Raw stubs* are the "
            "end-to-end tool's load (`benchmarks.e2e`): generated gRPC stubs with "
            "pre-serialised requests, one unary `Append` per append, no response parsing, "
            f"{RAW_STUB_CHANNELS} channels (unary calls do not coalesce, so more connections "
            f"serve them better than the SDK's {LETHE_CHANNELS}).",
            "",
            "## Live subscribers",
            "",
            *self.follow_rows(),
            "",
            "Latency is end to end: from the moment the writer sent the append (a timestamp "
            "in the first 8 bytes of the payload) to the moment a subscriber's handler "
            "received the event. Subscribers start at the live end. The fan-out writer "
            "appends 1-event batches at a fixed rate chosen so that the subscribers' load "
            f"process gets at most {FANOUT_DELIVERIES_PER_S:,} deliveries per second "
            "(a Python client process, not the server, would otherwise set the figures): "
            + ", ".join(f"{n:,} subscribers at {fanout_rate(n):g}/s" for n in s.fanout)
            + ". *Delivered / expected* is deliveries in the window ÷ (events appended in "
            "the window x subscribers); below 1 means subscribers fell behind. The writer "
            "and the subscribers run in two separate load processes.",
            "",
            f"## Catch-up read of {s.catchup_events:,} events",
            "",
            *self.catchup_rows(),
            "",
            "One reader reads the first events of the log in order, through each system's "
            "client: LetheDB `read_all` (the SDK pages through the log, the server decrypts "
            "every event), Redis `XRANGE` pages of 1,000 (and, as a second row, a consumer "
            "group: `XREADGROUP` pages of 1,000, each `XACK`ed), PostgreSQL keyset "
            "pagination (1,000 rows per query, binary), NATS a pull consumer.",
            *self.catchup_ceiling(),
            "",
            "## Scaling with the log's size (LetheDB)",
            "",
            *self.scaling_rows(),
            "",
            "Ratios are to the first size. Appends ran on the grown log; the catch-up read "
            f"reads the first {s.catchup_events:,} events of it. The peers were not grown "
            "beyond the catch-up size (time budget).",
            "",
            "## Forget + shred (LetheDB only)",
            "",
            *self.forget_rows(),
            "",
            "The peers have no equivalent: none of them can make one data subject's events "
            "unreadable in place in an immutable log (Redis and NATS can only delete "
            "messages, PostgreSQL only delete or rewrite rows, and none proves the erasure "
            "with a receipt), so there is no ratio.",
            "",
            "## Physical reference (same run)",
            "",
            *self.reference_rows(),
            "",
            "The disk probe overwrites 4 KiB and fsyncs, in a loop; the in-process writer is "
            "`Store.writer` driven directly (seal with AES-256-GCM, LMDB puts, one commit with "
            "fsync), as in `benchmarks.e2e`.",
            "",
        ]
        if self.charts:
            lines += ["## Charts", ""]
            lines += [f"![{caption}]({file})" for file, caption in self.charts]
            lines.append("")
        lines += ["## Settings", ""]
        for system in ["lethedb", *self.peers]:
            lines.append(f"**{self.title(system)}** ({r.versions.get(system, '?')})")
            lines.append("")
            lines += [f"* {item}" for item in r.server_settings.get(system, [])]
            lines.append("")
        lines += [
            "**Clients** (all in spawned load processes, asyncio): LetheDB "
            f"{version('lethedb')} SDK `AsyncClient` (grpcio {version('grpcio')}), "
            f"{LETHE_CHANNELS} client(s) of one connection each shared by the 64 writers, "
            "one per 100 subscribers; "
            f"redis-py {version('redis')} "
            "(`redis.asyncio`, a connection per concurrent writer and per subscriber); "
            f"psycopg {version('psycopg')} (async, a connection per concurrent writer and per "
            f"subscriber); nats-py {version('nats-py')} (one connection for the writers, one "
            "per 100 subscribers).",
            "",
            "## Notes",
            "",
        ]
        lines += [f"* {note}" for note in r.notes]
        noisy = sorted(
            {
                f"{case} ({system})"
                for (case, system), runs in r.runs.items()
                for run in runs
                if (run.other_cpu_pct or 0) > NOISY_OTHER_CPU
            }
        )
        if noisy:
            lines.append(
                f"* Other jobs used more than {NOISY_OTHER_CPU:.0f}% of a core during "
                f"{len(noisy)} case(s): "
                + ", ".join(noisy)
                + ". Figures taken then are less trustworthy."
            )
        for failure in r.failures:
            lines.append(f"* **{failure}**")
        codes = ", ".join(f"{k} {v}" for k, v in r.stop_codes.items())
        lines.append(f"* Every server was stopped at the end (exit codes: {codes}).")
        lines += environment_section(r.env)
        for system in self.peers:
            lines.append(f"| {self.title(system)} | {r.versions.get(system, '?')} |")
        lines += [
            "",
            "Reproduce: `make bench-peers` (or `"
            + " ".join(["python -m benchmarks.peers", *sys.argv[1:]])
            + "`).",
            "",
        ]
        return "\n".join(lines)


def version(dist: str) -> str:
    return dist_version(dist, missing="?")


def write_report(results: Results, args: argparse.Namespace) -> tuple[str, Path | None]:
    suffix = "-quick" if args.quick else ""
    stem = results_stem(args.output_dir, "peers", results.started, suffix)
    report = Report(results, args)
    path = None
    if not args.no_write:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        report.charts_png(args.output_dir, stem)
        path = args.output_dir / f"{stem}.md"
    text = report.text()
    if path is not None:
        path.write_text(text)
    return text, path
