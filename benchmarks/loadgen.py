"""Worker processes of the end-to-end benchmark: gRPC load, in-process load, fsync.

The orchestrator (:mod:`benchmarks.e2e`) starts a few of these with the spawn
start method, so none of them inherits its gRPC state, and talks to each over
a pipe. For every case the protocol is the same::

    orchestrator -> ("run", spec)
    worker       -> ("ready", None)      after connecting and warming up under load
    orchestrator -> ("go", (start_ns, end_ns))
    worker       -> ("result", result)   after the window, with in-flight calls drained

The load never pauses between warm-up and the measured window; an operation
counts when it *completes* inside the window (``time.monotonic_ns`` is one
clock for every process on Linux), so throughput is completions per second
and latencies are those of the completed operations.

The gRPC load sends pre-serialised requests (no serializer, no response
deserializer) so that the client spends as little CPU as possible per call:
on a two-core machine the load generator competes with the server.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

APPEND = "/lethedb.v1.EventStore/Append"
APPEND_STREAM = "/lethedb.v1.EventStore/AppendStream"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
#: Without a local subchannel pool, channels with equal arguments share one
#: TCP connection, and "64 channels" would quietly be one.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
NEVER = 1 << 63
#: An AppendResult with its `error` field (2) set starts with this tag byte.
_STREAM_ERROR_TAG = b"\x12"


@dataclass
class Spec:
    """One worker's share of a case."""

    kind: str  # "append", "sdk-append", "stream", "health", "inprocess", "fsync"
    name: str
    warmup_s: float
    clients: int = 1
    channels: int = 1
    events: int = 1
    window: int = 1
    address: str = ""
    data_dir: str = ""
    subjects: list[str] = field(default_factory=list)
    payload_bytes: int = 256
    seed: int = 0


@dataclass
class Result:
    ops: int = 0  # completed inside the window
    events: int = 0  # events of those operations
    latencies_ns: list[int] = field(default_factory=list)
    acked_events: int = 0  # every event acknowledged, warm-up included
    errors: int = 0
    first_error: str = ""
    cpu_s: float = 0.0  # this process's CPU time inside the window
    extra: dict[str, Any] = field(default_factory=dict)


class Window:
    """The measured interval; unknown (never) until the orchestrator says go."""

    def __init__(self) -> None:
        self.start = NEVER
        self.end = NEVER


class Tally:
    """One client's counts; merged into a :class:`Result` at the end."""

    __slots__ = ("acked", "error", "errors", "events", "latencies", "ops")

    def __init__(self) -> None:
        self.ops = 0
        self.events = 0
        self.acked = 0
        self.errors = 0
        self.error = ""
        self.latencies: list[int] = []

    def done(self, window: Window, t0: int, t1: int, events: int) -> bool:
        """Record one completed operation; False once the window has closed."""
        self.acked += events
        if t1 >= window.start:
            if t1 > window.end:
                return False
            self.ops += 1
            self.events += events
            self.latencies.append(t1 - t0)
        return True

    def fail(self, exc: BaseException) -> None:
        self.errors += 1
        self.error = self.error or f"{type(exc).__name__}: {exc}"


def merge(tallies: list[Tally], cpu_s: float) -> Result:
    result = Result(cpu_s=cpu_s)
    for t in tallies:
        result.ops += t.ops
        result.events += t.events
        result.acked_events += t.acked
        result.errors += t.errors
        result.first_error = result.first_error or t.error
        result.latencies_ns.extend(t.latencies)
    return result


# -- the process ------------------------------------------------------------------


def worker_main(conn: Connection) -> None:
    """Entry point of a worker process: run cases until told to exit."""
    while True:
        command, spec = conn.recv()
        if command == "exit":
            return
        try:
            if spec.kind in ("inprocess", "fsync"):
                result = run_threaded(spec, conn)
            else:
                result = asyncio.run(run_grpc(spec, conn))
        except Exception as exc:  # report, so the orchestrator never hangs on us
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("result", result))


def _await_go(conn: Connection, window: Window) -> None:
    conn.send(("ready", None))
    command, (start, end) = conn.recv()
    assert command == "go"
    window.start, window.end = start, end


def sleep_until(deadline_ns: int) -> None:
    """Sleep to a ``time.monotonic_ns`` deadline: the one clock of every process here."""
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


# -- gRPC load ----------------------------------------------------------------------


def event_blocks(spec: Spec, count: int) -> list[bytes]:
    """Serialised ``events`` fields of an AppendRequest, *spec.events* events each.

    Protobuf fields concatenate, so ``stream_prefix + block`` is a complete
    request: each client keeps its own stream while sharing the blocks.
    """
    from lethedb.v1 import eventstore_pb2 as pb

    rng = random.Random(spec.seed)
    return [
        pb.AppendRequest(
            events=[
                pb.ProposedEvent(
                    event_type="BenchEvent",
                    subject_id=rng.choice(spec.subjects),
                    content_type="application/octet-stream",
                    data=rng.randbytes(spec.payload_bytes),
                )
                for _ in range(spec.events)
            ]
        ).SerializeToString()
        for _ in range(count)
    ]


def stream_prefix(stream_id: str) -> bytes:
    from lethedb.v1 import eventstore_pb2 as pb

    return pb.AppendRequest(stream_id=stream_id).SerializeToString()


async def run_grpc(spec: Spec, conn: Connection) -> Result:
    if spec.kind == "sdk-append":
        return await run_sdk(spec, conn)
    import grpc

    channels = [
        grpc.aio.insecure_channel(spec.address, options=CHANNEL_OPTIONS)
        for _ in range(spec.channels)
    ]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    blocks = event_blocks(spec, max(16, 4096 // spec.events)) if spec.kind != "health" else []
    window = Window()
    tallies = [Tally() for _ in range(spec.clients)]
    tasks = []
    for i, tally in enumerate(tallies):
        channel = channels[i % len(channels)]
        prefix = stream_prefix(f"{spec.name}-s{spec.seed}-c{i}")
        if spec.kind == "health":
            coro = _health_client(channel, window, tally)
        elif spec.kind == "append":
            coro = _append_client(channel, window, tally, prefix, blocks, spec.events, i)
        else:
            coro = _stream_client(channel, window, tally, prefix, blocks, spec.window, i)
        tasks.append(asyncio.create_task(coro))
    cpu_s = await timed_window(spec.warmup_s, conn, window)
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return merge(tallies, cpu_s)


async def run_sdk(spec: Spec, conn: Connection) -> Result:
    """Appends through the SDK's ``AsyncClient``, one client object per channel.

    Unlike the raw stubs this pays for building every request (an ``Event``
    per event, a random event id each) and lets the SDK coalesce the appends
    that its callers have in flight at once (``AppendBatch``), as an
    application's tasks sharing a client would.
    """
    from lethedb import AsyncClient

    clients = [
        AsyncClient(spec.address, channel_options=CHANNEL_OPTIONS, timeout=120)
        for _ in range(spec.channels)
    ]
    window = Window()
    tallies = [Tally() for _ in range(spec.clients)]
    batches = sdk_event_batches(spec, max(16, 4096 // spec.events))
    tasks = [
        asyncio.create_task(
            _sdk_append_client(
                clients[i % len(clients)],
                window,
                tally,
                f"{spec.name}-s{spec.seed}-c{i}",
                batches,
                i,
            )
        )
        for i, tally in enumerate(tallies)
    ]
    cpu_s = await timed_window(spec.warmup_s, conn, window)
    await asyncio.gather(*tasks)
    for client in clients:
        await client.close()
    return merge(tallies, cpu_s)


def sdk_event_batches(spec: Spec, count: int) -> list[list[Any]]:
    """*count* lists of *spec.events* SDK ``Event`` objects, the same bytes as the stubs'."""
    from lethedb import Event

    rng = random.Random(spec.seed)
    return [
        [
            Event(
                "BenchEvent",
                rng.randbytes(spec.payload_bytes),
                subject_id=rng.choice(spec.subjects),
                content_type="application/octet-stream",
            )
            for _ in range(spec.events)
        ]
        for _ in range(count)
    ]


async def _sdk_append_client(
    client: Any, window: Window, tally: Tally, stream_id: str, batches: list[list[Any]], offset: int
) -> None:
    now = time.monotonic_ns
    i = offset * 7
    while True:
        events = batches[i % len(batches)]
        i += 1
        t0 = now()
        try:
            await client.append(stream_id, events)
        except Exception as exc:
            tally.fail(exc)
            return
        if not tally.done(window, t0, now(), len(events)):
            return


async def timed_window(warmup_s: float, conn: Connection, window: Window) -> float:
    """Warm up, say ready, take the window from the orchestrator; CPU seconds inside it.

    The load keeps running in other tasks throughout: this only marks time.
    """
    await asyncio.sleep(warmup_s)
    await asyncio.to_thread(_await_go, conn, window)
    await sleep_until_async(window.start)
    cpu0 = time.process_time()
    await sleep_until_async(window.end)
    return time.process_time() - cpu0


async def sleep_until_async(deadline_ns: int) -> None:
    """:func:`sleep_until` for a task on an event loop that must keep serving the load."""
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def _health_client(channel: Any, window: Window, tally: Tally) -> None:
    check = channel.unary_unary(HEALTH_CHECK)
    now = time.monotonic_ns
    while True:
        t0 = now()
        try:
            await check(b"")  # an empty HealthCheckRequest: the overall status
        except Exception as exc:
            tally.fail(exc)
            return
        if not tally.done(window, t0, now(), 0):
            return


async def _append_client(
    channel: Any,
    window: Window,
    tally: Tally,
    prefix: bytes,
    blocks: list[bytes],
    events: int,
    offset: int,
) -> None:
    append = channel.unary_unary(APPEND)
    now = time.monotonic_ns
    i = offset * 7
    while True:
        request = prefix + blocks[i % len(blocks)]
        i += 1
        t0 = now()
        try:
            await append(request)
        except Exception as exc:
            tally.fail(exc)
            return
        if not tally.done(window, t0, now(), events):
            return


async def _stream_client(
    channel: Any,
    window: Window,
    tally: Tally,
    prefix: bytes,
    blocks: list[bytes],
    in_flight: int,
    offset: int,
) -> None:
    """One AppendStream call with up to *in_flight* unacknowledged appends."""
    import grpc

    eof = grpc.aio.EOF
    call = channel.stream_stream(APPEND_STREAM)()
    now = time.monotonic_ns
    sent: deque[int] = deque()
    slots = asyncio.Semaphore(in_flight)
    closing = False

    async def send() -> None:
        i = offset * 7
        while True:
            await slots.acquire()
            if closing:
                break
            sent.append(now())
            await call.write(prefix + blocks[i % len(blocks)])
            i += 1
        await call.done_writing()

    sender = asyncio.create_task(send())
    try:
        while (response := await call.read()) is not eof:
            t1 = now()
            t0 = sent.popleft()
            slots.release()
            # Responses still in flight after the window are read (and counted as
            # acknowledged) until the server ends the call after done_writing.
            if response[:1] == _STREAM_ERROR_TAG:
                tally.fail(RuntimeError(f"AppendStream answered with an error: {response!r}"))
                closing = True
            elif not tally.done(window, t0, t1, 1):
                closing = True
    except Exception as exc:
        tally.fail(exc)
        sender.cancel()
        return
    await sender


# -- in-process load and the disk probe ------------------------------------------------


def run_threaded(spec: Spec, conn: Connection) -> Result:
    if spec.kind == "fsync":
        return _fsync(spec, conn)
    return _inprocess(spec, conn)


def _inprocess(spec: Spec, conn: Connection) -> Result:
    """*spec.clients* threads, each appending *spec.events*-event commands in a loop."""
    from benchmarks import workload
    from lethedb_server.engine.store import Store, StoreOptions

    window = Window()
    tallies = [Tally() for _ in range(spec.clients)]
    rng = random.Random(spec.seed)
    commands = [
        [
            workload.command(f"{spec.name}-t{t}", spec.events, spec.subjects, rng)
            for _ in range(max(2, 256 // spec.events))
        ]
        for t in range(spec.clients)
    ]

    with Store.open(Path(spec.data_dir), StoreOptions()) as store:
        writer = store.writer
        batches0, commands0 = writer.batches, writer.commands

        def client(tally: Tally, mine: list[Any]) -> None:
            now = time.monotonic_ns
            i = 0
            while True:
                command = mine[i % len(mine)]
                i += 1
                t0 = now()
                try:
                    writer.append(command)
                except Exception as exc:
                    tally.fail(exc)
                    return
                if not tally.done(window, t0, now(), spec.events):
                    return

        threads = [
            threading.Thread(target=client, args=(tally, mine), daemon=True)
            for tally, mine in zip(tallies, commands, strict=True)
        ]
        for thread in threads:
            thread.start()
        time.sleep(spec.warmup_s)
        _await_go(conn, window)
        sleep_until(window.start)
        cpu0, b0, c0 = time.process_time(), writer.batches, writer.commands
        sleep_until(window.end)
        cpu1, b1, c1 = time.process_time(), writer.batches, writer.commands
        for thread in threads:
            thread.join()
        result = merge(tallies, cpu1 - cpu0)
        result.extra["commits"] = b1 - b0
        result.extra["commands_per_commit"] = (c1 - c0) / max(1, b1 - b0)
        result.extra["all_commits"] = writer.batches - batches0
        result.extra["all_commands"] = writer.commands - commands0
    return result


def _fsync(spec: Spec, conn: Connection) -> Result:
    """Overwrite 4 KiB and fsync, in a loop: the disk's durable-write rate."""
    path = Path(spec.data_dir) / "fsync-probe"
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4096)
    slots = 256
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for slot in range(slots):
            os.pwrite(fd, block, slot * len(block))
        os.fsync(fd)
        window = Window()
        tally = Tally()
        stop = threading.Event()

        def loop() -> None:
            now = time.monotonic_ns
            i = 0
            while not stop.is_set():
                t0 = now()
                os.pwrite(fd, block, (i % slots) * len(block))
                os.fsync(fd)
                i += 1
                if not tally.done(window, t0, now(), 0):
                    return

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(spec.warmup_s)
        _await_go(conn, window)
        sleep_until(window.start)
        cpu0 = time.process_time()
        sleep_until(window.end)
        cpu1 = time.process_time()
        thread.join()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return merge([tally], cpu1 - cpu0)
