"""One eventsourcing application on three persistence modules: LetheDB, the library's
PostgreSQL module with its AESCipher, and its SQLite module.

    python -m benchmarks.eventsourcing [--quick] [--only lethedb,postgres,sqlite]
    python -m benchmarks.eventsourcing --stages [--quick]

The same application (``Account`` aggregates) runs the same workload on each:

* ``create`` from 1 and from 16 threads: create an account and save it (one event);
* ``update`` from 1 and from 16 threads: get an account, trigger an event, save it
  (a read of the aggregate and a one-event write);
* ``read``: read the whole notification log, pages of 500 notifications;
* ``read+decode``: the same, each notification also turned into its domain event
  (on PostgreSQL that is where ``AESCipher`` decrypts; LetheDB decrypted on the server);
* ``project``: a projection (the library's ``ProjectionRunner``, view in memory)
  catching up with the whole log from the start (not on SQLite, whose recorder
  cannot be subscribed to).

It prints events (or operations) per second and the p99 latency of one operation
(a page for ``read``), then the ratios of LetheDB to PostgreSQL+cipher. LetheDB
runs as `make run` does (durable appends, per-subject encryption); PostgreSQL is
started as in the peer benchmark (``benchmarks/peers/servers.py``: fsync on,
synchronous commit); SQLite writes a file in the run's temporary directory.
One run on whatever machine runs it: treat the numbers as ratios, not absolutes.

``--stages`` profiles LetheDB's raw notification read instead: the same pages read
end to end, by a bounded ``ReadAll`` and by a filtered subscription through the SDK,
the cost of one call for a small page each way, then (the server stopped, its data
directory opened in this process) the ceiling of each stage alone: the LMDB read,
decode + decryption, building and serialising the protobuf messages, parsing them,
the SDK's ``RecordedEvent`` and the module's ``Notification``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from functools import partial, singledispatchmethod
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.cipher import AESCipher
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Tracking
from eventsourcing.popo import POPOTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner

from benchmarks.peers.servers import LetheServer, PostgresServer
from lethedb import CaughtUp, Checkpoint
from lethedb._requests import to_recorded_event
from lethedb.eventsourcing import LetheDBApplicationRecorder
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.api import messages
from lethedb_server.engine.store import Store

SYSTEMS = ("lethedb", "postgres", "sqlite")
PAGE = 500


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = Decimal("0.00")

    @event("Credited")
    def credit(self, amount: Decimal) -> None:
        self.balance += amount


class Accounts(Application[UUID]):
    def open(self, owner: str) -> UUID:
        account = Account(owner)
        self.save(account)
        return account.id

    def credit(self, account_id: UUID) -> None:
        account: Account = self.repository.get(account_id)
        account.credit(Decimal("1.00"))
        self.save(account)


class CountingView(POPOTrackingRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def counted(self, tracking: Tracking) -> None:
        with self._database_lock:
            self._assert_tracking_uniqueness(tracking)
            self.count += 1
            self._insert_tracking(tracking)


class Counting(Projection[CountingView]):
    name = "counting"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.counted(tracking)


@contextmanager
def system_env(system: str, root: Path) -> Iterator[dict[str, str]]:
    """The environment that puts the application on ``system`` (started here)."""
    view = {"COUNTING_PERSISTENCE_MODULE": "eventsourcing.popo"}
    if system == "lethedb":
        server = LetheServer(root)
        server.start()
        try:
            yield {
                "PERSISTENCE_MODULE": "lethedb.eventsourcing",
                "LETHEDB_URI": server.address["target"],
                **view,
            }
        finally:
            server.stop()
    elif system == "postgres":
        pg = PostgresServer(root)
        pg.start()
        try:
            yield {
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": "postgres",
                "POSTGRES_HOST": "127.0.0.1",
                "POSTGRES_PORT": str(pg.port),
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
                "POSTGRES_POOL_SIZE": "16",
                "CIPHER_TOPIC": "eventsourcing.cipher:AESCipher",
                "CIPHER_KEY": AESCipher.create_key(32),
                **view,
            }
        finally:
            pg.stop()
    else:
        root.mkdir(parents=True, exist_ok=True)
        yield {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(root / "sqlite.db"),
            **view,
        }


def p99(latencies: list[float]) -> float:
    if len(latencies) < 2:
        return latencies[0] if latencies else 0.0
    return statistics.quantiles(latencies, n=100)[98]


def timed_ops(threads: int, count: int, op: Callable[[int], None]) -> tuple[float, list[float]]:
    """Run ``op(i)`` for i in range(count) on ``threads`` threads; (seconds, latencies)."""
    latencies: list[float] = []

    def one(i: int) -> None:
        started = time.perf_counter()
        op(i)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    if threads == 1:
        for i in range(count):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(count)))
    return time.perf_counter() - started, latencies


def run_system(system: str, root: Path, ops: int) -> dict[str, tuple[float, float]]:
    """{case: (per second, p99 seconds)} for one system."""
    results: dict[str, tuple[float, float]] = {}
    with system_env(system, root) as env:
        with Accounts(env=env) as app:
            for i in range(20):  # warm up: connections, caches (not counted)
                app.credit(app.open(f"warm-up-{i}"))
            for threads in (1, 16):
                results.update(write_cases(app, threads, ops if threads == 1 else ops * 4))
            results["read"] = read_log(app)
            results["read+decode"] = read_log(app, decode=True)
        if system != "sqlite":  # its recorder has no subscribe(): no projection runner
            results["project"] = catch_up(env)
    return results


def write_cases(app: Accounts, threads: int, count: int) -> dict[str, tuple[float, float]]:
    """Create ``count`` accounts, then update each once, from ``threads`` threads."""
    ids: list[UUID] = []
    seconds, lat = timed_ops(threads, count, lambda i: ids.append(app.open(f"owner-{i}")))
    results = {f"create x{threads}": (count / seconds, p99(lat))}
    seconds, lat = timed_ops(threads, count, lambda i: app.credit(ids[i]))
    results[f"update x{threads}"] = (count / seconds, p99(lat))
    return results


def read_log(app: Accounts, *, decode: bool = False) -> tuple[float, float]:
    """Read the notification log in pages; with ``decode``, also turn each notification
    into its domain event (where the library's cipher decrypts, on PostgreSQL)."""
    latencies: list[float] = []
    total = 0
    start: int | None = None
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        page = app.recorder.select_notifications(start, PAGE, inclusive_of_start=False)
        if decode:
            for notification in page:
                app.mapper.to_domain_event(notification)
        latencies.append(time.perf_counter() - t0)
        if not page:
            break
        total += len(page)
        start = page[-1].id
    return total / (time.perf_counter() - started), p99(latencies)


def catch_up(env: dict[str, str]) -> tuple[float, float]:
    with Accounts(env=env) as app:
        head = app.recorder.max_notification_id()
        count = len_log(app)
    started = time.perf_counter()
    with ProjectionRunner(
        application_class=Accounts, projection_class=Counting, view_class=CountingView, env=env
    ) as runner:
        runner.projection.view.wait(runner.app.name, head, timeout=600)
        seconds = time.perf_counter() - started
        assert runner.projection.view.count == count
    return count / seconds, 0.0


def len_log(app: Accounts) -> int:
    total, start = 0, None
    while page := app.recorder.select_notifications(start, PAGE, inclusive_of_start=False):
        total += len(page)
        start = page[-1].id
    return total


def best_of(reps: int, fn: Callable[[], object]) -> float:
    """The fastest of ``reps`` runs of ``fn``, in seconds (the least disturbed one)."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def stage_line(label: str, seconds: float, count: int) -> None:
    print(f"{label:52} {seconds * 1e6 / count:7.2f} us/event {count / seconds:10.0f}/s", flush=True)


def pages(read: Callable[[int], list[int]]) -> int:
    """Read the log in pages of PAGE with ``read(after) -> positions``; the count."""
    total, after = 0, 0
    while page := read(after):
        total += len(page)
        after = page[-1]
    return total


def subscribed_page(recorder: LetheDBApplicationRecorder, after: int, limit: int) -> list[int]:
    """One page as a short filtered subscription reads it (what select_notifications did)."""
    positions: list[int] = []
    subscription = recorder.client.subscribe(
        after=after or None, filter=recorder.filter(()), reconnect=False, batch_size=limit
    )
    with subscription:
        for item in subscription:
            if isinstance(item, CaughtUp):
                break
            if not isinstance(item, Checkpoint):
                positions.append(item.position)
                if len(positions) >= limit:
                    break
    return positions


def run_stages(root: Path, events: int) -> None:
    """Where the time of a raw notification read goes (see the module docstring)."""
    server = LetheServer(root)
    server.start()
    try:
        env = {
            "PERSISTENCE_MODULE": "lethedb.eventsourcing",
            "LETHEDB_URI": server.address["target"],
        }
        with Accounts(env=env) as app:
            with ThreadPoolExecutor(16) as pool:
                ids = list(pool.map(lambda i: app.open(f"owner-{i}"), range(events // 2)))
                list(pool.map(app.credit, ids))
            recorder = app.recorder
            assert isinstance(recorder, LetheDBApplicationRecorder)
            client = recorder.client
            recorded = list(client.read_all())
            count = len(recorded)
            print(f"== end to end, pages of {PAGE} ({count} events; best of 3)")

            def select(after: int) -> list[int]:
                page = recorder.select_notifications(after, PAGE, inclusive_of_start=False)
                return [n.id for n in page]

            def read_all(after: int) -> list[int]:
                return [e.position for e in client.read_all(after=after or None, max_count=PAGE)]

            readers: list[tuple[str, Callable[[int], list[int]]]] = [
                ("select_notifications (module)", select),
                ("ReadAll -> RecordedEvent (SDK)", read_all),
                (
                    "filtered subscription -> RecordedEvent (SDK)",
                    lambda a: subscribed_page(recorder, a, PAGE),
                ),
            ]
            for label, read in readers:
                stage_line(label, best_of(3, partial(pages, read)), count)
            print("== one call for a page of 10 (best of 3 x 50 calls)")
            smalls: list[tuple[str, Callable[[int], list[int]]]] = [
                ("ReadAll", lambda a: read_all_small(client, a)),
                ("filtered subscription", lambda a: subscribed_page(recorder, a, 10)),
            ]
            for label, small in smalls:
                seconds = best_of(3, partial(calls, small, 50))
                print(f"{label:52} {seconds * 1000 / 50:7.2f} ms/call", flush=True)
    finally:
        server.stop()
    stage_ceilings(server.data_dir, recorder, recorded)


def calls(read: Callable[[int], list[int]], count: int) -> None:
    """``count`` small pages, one call each."""
    for i in range(count):
        read(i * 10)


def read_all_small(client: Any, after: int) -> list[int]:
    return [e.position for e in client.read_all(after=after or None, max_count=10)]


def open_pages(store: Store, starts: range) -> list[Any]:
    return [store.reader.read_all(s, backwards=False, limit=PAGE) for s in starts]


def stage_ceilings(
    data_dir: Path, recorder: LetheDBApplicationRecorder, recorded: list[Any]
) -> None:
    """Each stage alone, in this process, on the data the server wrote (best of 5)."""
    count = len(recorded)
    print(f"== each stage alone, pages of {PAGE} (best of 5)")
    store = Store.open(data_dir)
    try:
        starts = range(1, count + 1, PAGE)
        read = store.log.read_all_page
        stage_line(
            "server: LMDB read",
            best_of(5, lambda: [read(s, backwards=False, limit=PAGE) for s in starts]),
            count,
        )
        opened: list[Any] = []
        cold = best_of(1, lambda: opened.extend(open_pages(store, starts)))
        stage_line("server: LMDB read + decode + decrypt, keys unwrapped", cold, count)
        stage_line(
            "server: LMDB read + decode + decrypt, keys cached",
            best_of(5, partial(open_pages, store, starts)),
            count,
        )
    finally:
        store.close()
    stage_line(
        "server: build protobuf",
        best_of(5, lambda: [list(messages.read_responses(p)) for p in opened]),
        count,
    )
    responses = [r for p in opened for r in messages.read_responses(p)]
    stage_line(
        "server: serialise protobuf",
        best_of(5, lambda: [r.SerializeToString() for r in responses]),
        count,
    )
    wire = [r.SerializeToString() for r in responses]
    stage_line(
        "client: parse protobuf",
        best_of(5, lambda: [pb.ReadResponse.FromString(b) for b in wire]),
        count,
    )
    parsed = [m for b in wire for m in pb.ReadResponse.FromString(b).events]
    stage_line(
        "client: SDK RecordedEvent",
        best_of(5, lambda: [to_recorded_event(m) for m in parsed]),
        count,
    )
    stage_line(
        "client: module Notification",
        best_of(5, lambda: [recorder.notification(e) for e in recorded]),
        count,
    )
    print(f"bytes per event on the wire: {sum(map(len, wire)) / count:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred operations per case")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated systems")
    parser.add_argument("--stages", action="store_true", help="profile LetheDB's raw read")
    parser.add_argument(
        "--events",
        type=int,
        help="with --stages: events written (two per account, one subject each)",
    )
    args = parser.parse_args()
    ops = 300 if args.quick else 2000
    if args.stages:
        with tempfile.TemporaryDirectory(prefix="es-stages-") as tmp:
            run_stages(Path(tmp), args.events or (6000 if args.quick else 20000))
        return
    systems = [name for name in args.only.split(",") if name]
    all_results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="es-bench-") as tmp:
        os.chmod(tmp, 0o755)  # the postgres user must reach its cluster
        for system in systems:
            print(f"== {system}", flush=True)
            all_results[system] = run_system(system, Path(tmp) / system, ops)
            for case, (rate, tail) in all_results[system].items():
                print(f"{case:12} {rate:10.0f}/s   p99 {tail * 1000:8.2f} ms", flush=True)
    if "lethedb" in all_results and "postgres" in all_results:
        print("== LetheDB / PostgreSQL+AESCipher (throughput ratio; >1 is LetheDB faster)")
        for case, (rate, tail) in all_results["lethedb"].items():
            pg_rate, pg_tail = all_results["postgres"][case]
            ratio_tail = f"   p99 {tail / pg_tail:5.2f}x" if pg_tail else ""
            print(f"{case:12} {rate / pg_rate:6.2f}x{ratio_tail}")


if __name__ == "__main__":
    main()
