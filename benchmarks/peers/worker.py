"""Load processes of the peer benchmark.

A pool of these (spawned, see :class:`benchmarks.harness.Workers`) runs every
case. Timed jobs follow :mod:`benchmarks.loadgen`'s protocol (``run`` ->
``ready`` after warm-up -> ``go`` with the window -> ``result``), and
operations count when they complete inside the window. One-shot jobs
(catch-up reads, bulk loads, building a LetheDB log in-process, forgetting
subjects) answer ``run`` with ``result`` directly. A loadgen
:class:`~benchmarks.loadgen.Spec` is run by loadgen itself, so the same pool
also measures the disk, the in-process writer and LetheDB through raw stubs.
"""

from __future__ import annotations

import asyncio
import random
import resource
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.loadgen import Result, Tally, Window, merge, sleep_until_async, timed_window
from benchmarks.peers.clients import ADAPTERS, STAMP, RedisAdapter, stamp_of


@dataclass
class Job:
    """One process's share of a case."""

    role: str  # append | subscribe | catchup | catchup-group | fill | setup | build | scan | forget
    system: str = ""
    address: dict[str, Any] = field(default_factory=dict)
    prefix: str = "bench"
    warmup_s: float = 1.0
    clients: int = 1  # writers (append) or subscribers (subscribe)
    events: int = 1  # per append
    rate: float = 0.0  # offered appends/s in all (0: as fast as they complete)
    count: int = 0  # events to read, load or build; subjects to forget
    payload_bytes: int = 256
    subjects: list[str] = field(default_factory=list)
    seed: int = 0
    data_dir: str = ""
    notify: bool | None = None  # setup: switch PostgreSQL's NOTIFY trigger
    distinct_subjects: int = 0  # build: this many subjects, one event each (0: use subjects)


def worker_main(conn: Connection) -> None:
    """Entry point of a load process: run jobs until told to exit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 subscribers' sockets
    while True:
        command, job = conn.recv()
        if command == "exit":
            return
        try:
            if isinstance(job, loadgen.Spec):
                if job.kind in ("inprocess", "fsync"):
                    result = loadgen.run_threaded(job, conn)
                else:
                    result = asyncio.run(loadgen.run_grpc(job, conn))
            elif job.role in ("append", "subscribe"):
                result = asyncio.run(timed(job, conn))
            elif job.role == "build":
                result = build_lethe_log(job)
            elif job.role == "scan":
                result = scan_lethe_log(job)
            else:
                result = asyncio.run(one_shot(job))
        except Exception as exc:  # report, so the orchestrator never hangs on us
            conn.send(("failed", f"{job.system} {job.role}: {type(exc).__name__}: {exc}"))
        else:
            conn.send(("result", result))


def payload_source(job: Job) -> tuple[bytes, int]:
    """Random filler for the payloads; the first 8 bytes are replaced by a timestamp."""
    rng = random.Random(job.seed)
    return rng.randbytes(job.payload_bytes + 4096), job.payload_bytes - STAMP.size


# -- timed jobs ----------------------------------------------------------------------------


async def timed(job: Job, conn: Connection) -> Result:
    adapter = ADAPTERS[job.system](job.address, job.prefix, job.subjects)
    writers = job.clients if job.role == "append" else 0
    subscribers = job.clients if job.role == "subscribe" else 0
    await adapter.open(writers, subscribers)
    try:
        if job.role == "append":
            return await _appenders(job, adapter, conn)
        return await _subscribers(job, adapter, conn)
    finally:
        await adapter.close()


async def _appenders(job: Job, adapter: Any, conn: Connection) -> Result:
    """*job.clients* writers, each appending *job.events*-event batches to its own stream.

    With *job.rate*, appends are started on a fixed schedule shared by the writers
    (a new one as soon as one is due and a writer is free), so subscribers see
    a steady offered load; without, each writer appends again as soon as its
    previous append was acknowledged.
    """
    window = Window()
    tallies = [Tally() for _ in range(job.clients)]
    filler, body = payload_source(job)
    interval_ns = int(1e9 / job.rate) if job.rate else 0
    next_due = [time.monotonic_ns()]

    async def writer(index: int, tally: Tally) -> None:
        now = time.monotonic_ns
        offset = (index * 131) % 4096
        while True:
            if interval_ns:
                due = next_due[0]
                next_due[0] = due + interval_ns
                await sleep_until_async(due)
            t0 = now()
            stamp = STAMP.pack(t0)
            payloads = [
                stamp + filler[(offset + i) % 4096 : (offset + i) % 4096 + body]
                for i in range(job.events)
            ]
            offset += 1
            try:
                await adapter.append(index, payloads)
            except Exception as exc:
                tally.fail(exc)
                return
            if not tally.done(window, t0, now(), job.events):
                return

    tasks = [asyncio.create_task(writer(i, t)) for i, t in enumerate(tallies)]
    cpu_s = await timed_window(job.warmup_s, conn, window)
    await asyncio.gather(*tasks)
    return merge(tallies, cpu_s)


async def _subscribers(job: Job, adapter: Any, conn: Connection) -> Result:
    """*job.clients* subscribers from the live end; latency = receive time - send stamp."""
    window = Window()
    tallies = [Tally() for _ in range(job.clients)]
    ready = asyncio.Semaphore(0)
    stopped = False

    def follower(tally: Tally) -> Any:
        def on_events(payloads: list[bytes]) -> bool:
            if stopped:
                return False
            t1 = time.monotonic_ns()
            for data in payloads:
                if not tally.done(window, stamp_of(data), t1, 1):
                    return False
            return not (t1 > window.end)

        return on_events

    async def one(index: int, tally: Tally) -> None:
        try:
            await adapter.follow(index, False, ready.release, follower(tally))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            tally.fail(exc)
            ready.release()

    # Connect in waves: a thousand simultaneous connection attempts only time out.
    tasks = []
    for i, tally in enumerate(tallies):
        tasks.append(asyncio.create_task(one(i, tally)))
        if i % 50 == 49:
            for _ in range(50):
                await ready.acquire()
    for _ in range(len(tallies) - (len(tallies) // 50) * 50):
        await ready.acquire()
    cpu_s = await timed_window(job.warmup_s, conn, window)
    # Deliveries still in flight at the window's end do not count; followers that
    # are idle (nothing more to receive) would never notice the end: cancel them.
    await asyncio.sleep(0.5)
    stopped = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    result = merge(tallies, cpu_s)
    result.extra["subscribers"] = job.clients
    result.extra["stalled_subscribers"] = sum(1 for t in tallies if t.ops == 0)
    return result


# -- one-shot jobs -------------------------------------------------------------------------


async def one_shot(job: Job) -> Result:
    if job.role == "forget":
        return await forget_subjects(job)
    adapter = ADAPTERS[job.system](job.address, job.prefix, job.subjects)
    await adapter.open(1, 0)
    result = Result()
    try:
        if job.role == "setup":
            await adapter.setup()
            if job.notify is not None:
                await adapter.notify(job.notify)
            result.extra["version"] = await adapter.version()
        elif job.role == "fill":
            filler, body = payload_source(job)
            payload = STAMP.pack(0) + filler[:body]
            result.extra["count"] = await adapter.fill(job.count, payload)
        elif job.role in ("catchup", "catchup-group"):
            cpu0, t0 = time.process_time(), time.monotonic_ns()
            if job.role == "catchup":
                seen = await adapter.catch_up(job.count)
            else:
                assert isinstance(adapter, RedisAdapter)
                seen = await adapter.catch_up_group(job.count)
            t1, cpu1 = time.monotonic_ns(), time.process_time()
            result.ops = result.events = seen
            result.cpu_s = cpu1 - cpu0
            result.extra["elapsed_s"] = (t1 - t0) / 1e9
            result.extra["start_ns"], result.extra["end_ns"] = t0, t1
        else:
            raise ValueError(f"unknown job role {job.role!r}")
    finally:
        await adapter.close()
    return result


def subject_ids(count: int, seed: int = 7) -> list[str]:
    """*count* distinct UUID-like subject ids (the forget store's subjects)."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def build_lethe_log(job: Job) -> Result:
    """Append until the data directory's log holds *job.count* events, in-process.

    ``Store.writer`` with 1,000-event commands from two threads: the server's
    own seal, LMDB puts and fsynced commits, without gRPC. With
    *job.distinct_subjects*, event k belongs to subject k (one key each).
    """
    from lethedb_server.engine.model import AppendCommand, ProposedEvent
    from lethedb_server.engine.store import Store, StoreOptions

    per_command = 1000
    filler, body = payload_source(job)
    payloads = [STAMP.pack(0) + filler[i : i + body] for i in range(256)]
    subjects = subject_ids(job.distinct_subjects) if job.distinct_subjects else job.subjects
    t0, cpu0 = time.monotonic(), time.process_time()
    with Store.open(Path(job.data_dir), StoreOptions()) as store:
        start = store.log.head
        total = job.count - start
        chunks = (max(0, total) + per_command - 1) // per_command
        lock = threading.Lock()
        next_chunk = [0]
        errors: list[BaseException] = []

        def command(chunk: int) -> AppendCommand:
            first = start + chunk * per_command
            n = min(per_command, job.count - first)
            if job.distinct_subjects:
                picks = [subjects[(first + i) % len(subjects)] for i in range(n)]
            else:
                picks = [subjects[(first + i) * 7 % len(subjects)] for i in range(n)]
            events = tuple(
                ProposedEvent(b"", "BenchEvent", subject, "application/octet-stream", data, b"")
                for subject, data in zip(
                    picks, (payloads[(first + i) % 256] for i in range(n)), strict=True
                )
            )
            return AppendCommand(f"{job.prefix}-{first // per_command}", events)

        def loop() -> None:
            while not errors:
                with lock:
                    chunk = next_chunk[0]
                    next_chunk[0] += 1
                if chunk >= chunks:
                    return
                try:
                    store.writer.append(command(chunk), timeout=600)
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        head = store.log.head
    result = Result(ops=chunks, events=head - start, cpu_s=time.process_time() - cpu0)
    result.extra["head"] = head
    result.extra["elapsed_s"] = time.monotonic() - t0
    return result


def scan_lethe_log(job: Job) -> Result:
    """Read and decrypt the first *job.count* events in-process, in Subscribe's pages.

    The catch-up's physical reference: ``EventReader.read_all`` (one short
    LMDB read transaction per page, AES-GCM open of every event) on one
    thread, with no gRPC and no protobuf.
    """
    from lethedb_server.engine.store import Store, StoreOptions
    from lethedb_server.engine.subscriptions import SubscriptionLimits

    page_size = SubscriptionLimits().page_size
    with Store.open(Path(job.data_dir), StoreOptions()) as store:
        t0, cpu0 = time.monotonic(), time.process_time()
        start, count = 1, 0
        while count < job.count:
            events = store.reader.read_all(
                start, backwards=False, limit=min(page_size, job.count - count)
            )
            if not events or events[0].redacted or len(events[0].data) != job.payload_bytes:
                raise RuntimeError(f"scan stopped at position {start}: missing or unreadable")
            count += len(events)
            start = events[-1].position + 1
        elapsed = time.monotonic() - t0
    result = Result(ops=1, events=count, cpu_s=time.process_time() - cpu0)
    result.extra["elapsed_s"] = elapsed
    return result


async def forget_subjects(job: Job) -> Result:
    """Forget *job.count* of the store's subjects (64 at a time), then run a shred epoch."""
    from lethedb import AsyncClient, SubjectState

    subjects = subject_ids(job.distinct_subjects)
    step = max(1, len(subjects) // max(1, job.count))
    chosen = subjects[::step][: job.count]
    result = Result()
    async with AsyncClient(job.address["target"], timeout=1800) as client:
        semaphore = asyncio.Semaphore(64)

        async def forget(subject: str) -> None:
            async with semaphore:
                await client.forget_subject(subject, reason="benchmark")

        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(forget(s) for s in chosen))
        t1 = time.monotonic()
        shred = await client.admin.shred(timeout=1800)
        t2, cpu1 = time.monotonic(), time.process_time()
        receipts = [await client.get_subject(s) for s in chosen[:: max(1, len(chosen) // 20)]]
        stats = await client.admin.stats()
    result.ops = len(chosen)
    result.cpu_s = cpu1 - cpu0
    result.extra.update(
        forget_s=t1 - t0,
        shred_s=t2 - t1,
        live_keys=shred.live_keys,
        shredded_subjects=shred.shredded_subjects,
        receipts_shredded=all(r.state == SubjectState.SHREDDED for r in receipts),
        subjects=stats.subjects + stats.forgotten_subjects,
        last_position=stats.last_position,
    )
    return result
