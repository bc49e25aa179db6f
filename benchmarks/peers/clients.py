"""One adapter per system: the same five operations through each system's own Python client.

* ``append(writer, payloads)``: a durable append of 1 or 100 events to the
  writer's own stream, returning once the system acknowledged it;
* ``follow(index, from_start, on_ready, on_events)``: a subscriber that
  delivers every event after the point it started from, until ``on_events``
  returns False;
* ``catch_up(count)``: read the first *count* events of the log in order;
* ``fill(count)``: bulk-load the log up to *count* events (not measured);
* ``setup()`` / ``notify(on)``: schema and triggers.

Each adapter uses its client the way that client's documentation recommends
for the job, and nothing is pre-serialised: per-event client work is part of
what is measured, for every system alike. The first 8 bytes of every payload
are the sender's ``time.monotonic_ns()`` (little-endian), so a subscriber can
compute the end-to-end latency of each event it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

EVENT_TYPE = "BenchEvent"
OCTET_STREAM = "application/octet-stream"
#: Subscribers per connection (gRPC channel, NATS connection). LetheDB refuses
#: more than 128 streaming calls per connection by default.
SUBSCRIBERS_PER_CONNECTION = 100
#: SDK clients (each its own channel and TCP connection) the LetheDB writers
#: share. One, as an application would use the SDK: a client coalesces the
#: appends in flight at once into one ``AppendBatch`` call, so the fewer
#: clients, the fewer and fuller the calls. 64 one-event writers measured
#: about 13,000 appends/s on one client against 10,000 on four (README).
LETHE_CHANNELS = 1
#: Rows, entries or events per page of a catch-up read.
PAGE = 1000
NATS_PULL_BATCH = 256

OnEvents = Callable[[list[bytes]], bool]
OnReady = Callable[[], None]
STAMP = struct.Struct("<q")


def stamp_of(payload: bytes) -> int:
    return int(STAMP.unpack_from(payload)[0])


class Adapter:
    name = ""

    def __init__(self, address: dict[str, Any], prefix: str, subjects: list[str]) -> None:
        self.address = address
        self.prefix = prefix  # makes stream names unique per case and run
        self.subjects = subjects

    def stream(self, writer: int) -> str:
        return f"{self.prefix}-w{writer}"

    async def open(self, writers: int, subscribers: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def setup(self) -> None:
        """Create what the workloads need (idempotent)."""

    async def notify(self, on: bool) -> None:
        """Switch push notifications for subscribers on or off (PostgreSQL only)."""

    async def version(self) -> str:
        return ""

    async def append(self, writer: int, payloads: list[bytes]) -> None:
        raise NotImplementedError

    async def follow(
        self, index: int, from_start: bool, on_ready: OnReady, on_events: OnEvents
    ) -> None:
        raise NotImplementedError

    async def catch_up(self, count: int) -> int:
        """Read the first *count* events in log order with one subscriber; return the count."""
        done = asyncio.get_running_loop().create_future()
        seen = 0

        def on_events(payloads: list[bytes]) -> bool:
            nonlocal seen
            seen += len(payloads)
            if seen >= count:
                if not done.done():
                    done.set_result(None)
                return False
            return True

        task = asyncio.create_task(self.follow(0, True, lambda: None, on_events))
        await asyncio.wait([task, done], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raise what ended it early
        else:
            await task
        return seen

    async def fill(self, count: int, payload: bytes) -> int:
        """Bulk-load until the log holds at least *count* events; return how many it holds."""
        raise NotImplementedError


# -- LetheDB, through the SDK ------------------------------------------------------------


class LetheAdapter(Adapter):
    """``lethedb.AsyncClient``: append, ``read_all`` and ``subscribe(...).batches()``."""

    name = "lethedb"

    async def open(self, writers: int, subscribers: int) -> None:
        from lethedb import AsyncClient

        # Without a local subchannel pool, channels with equal arguments share one
        # TCP connection, and the server's per-connection stream limit would apply.
        options = [("grpc.use_local_subchannel_pool", 1)]
        target = self.address["target"]
        self.clients = [
            AsyncClient(target, channel_options=options, timeout=120)
            for _ in range(max(1, min(writers, LETHE_CHANNELS)))
        ]
        self.sub_clients = [
            AsyncClient(target, channel_options=options, timeout=120)
            for _ in range(math.ceil(subscribers / SUBSCRIBERS_PER_CONNECTION))
        ]

    async def close(self) -> None:
        for client in self.clients + self.sub_clients:
            await client.close()

    async def append(self, writer: int, payloads: list[bytes]) -> None:
        from lethedb import Event

        subjects = self.subjects
        base = writer * 7919
        events = [
            Event(
                EVENT_TYPE,
                data,
                subject_id=subjects[(base + i) % len(subjects)],
                content_type=OCTET_STREAM,
            )
            for i, data in enumerate(payloads)
        ]
        await self.clients[writer % len(self.clients)].append(self.stream(writer), events)

    async def follow(
        self, index: int, from_start: bool, on_ready: OnReady, on_events: OnEvents
    ) -> None:
        from lethedb import CaughtUp

        client = (self.sub_clients or self.clients)[index // SUBSCRIBERS_PER_CONNECTION]
        subscription = client.subscribe(from_start=from_start, from_end=not from_start)
        ready = False
        try:
            async for item in subscription.batches():
                if isinstance(item, list):
                    if not ready:
                        ready = True
                        on_ready()
                    if not on_events([event.data for event in item]):
                        return
                elif isinstance(item, CaughtUp) and not ready:
                    ready = True
                    on_ready()
        finally:
            await subscription.close()

    async def catch_up(self, count: int) -> int:
        """``read_all``: the SDK pages through the log, one RecordedEvent per event."""
        seen = 0
        async for _event in self.clients[0].read_all(max_count=count):
            seen += 1
        return seen


# -- Redis Streams, through redis.asyncio --------------------------------------------------


class RedisAdapter(Adapter):
    """One stream key for the whole log; XADD, MULTI/EXEC pipelines, XREAD, XRANGE."""

    name = "redis"
    KEY = "events"

    async def open(self, writers: int, subscribers: int) -> None:
        import redis.asyncio as redis

        self.redis = redis.Redis(
            host=self.address["host"],
            port=self.address["port"],
            max_connections=max(writers, 1) + 4,
        )
        self.subscribers = subscribers

    async def close(self) -> None:
        await self.redis.aclose()

    async def version(self) -> str:
        info = await self.redis.info("server")
        return f"Redis {info['redis_version']}"

    def _fields(self, writer: int, data: bytes) -> dict[str, Any]:
        return {"type": EVENT_TYPE, "stream": self.stream(writer), "data": data}

    async def append(self, writer: int, payloads: list[bytes]) -> None:
        if len(payloads) == 1:
            await self.redis.xadd(self.KEY, self._fields(writer, payloads[0]))
            return
        async with self.redis.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
            for data in payloads:
                pipe.xadd(self.KEY, self._fields(writer, data))
            await pipe.execute()

    async def follow(
        self, index: int, from_start: bool, on_ready: OnReady, on_events: OnEvents
    ) -> None:
        import redis.asyncio as redis

        # XREAD BLOCK holds its connection: one per subscriber.
        conn = redis.Redis(
            host=self.address["host"], port=self.address["port"], single_connection_client=True
        )
        try:
            last: bytes | str = "0-0"
            if not from_start:
                newest = await conn.xrevrange(self.KEY, count=1)
                last = newest[0][0] if newest else "0-0"
            on_ready()
            while True:
                reply = await conn.xread({self.KEY: last}, count=PAGE, block=500)
                if not reply:
                    if not on_events([]):
                        return
                    continue
                entries = reply[0][1]
                last = entries[-1][0]
                if not on_events([fields[b"data"] for _id, fields in entries]):
                    return
        finally:
            await conn.aclose()

    async def catch_up(self, count: int) -> int:
        """XRANGE pages of 1,000 entries, each starting after the last id read."""
        seen = 0
        start: bytes | str = "-"
        while seen < count:
            entries = await self.redis.xrange(self.KEY, min=start, count=min(PAGE, count - seen))
            if not entries:
                break
            seen += len(entries)
            start = b"(" + entries[-1][0]
        return seen

    async def catch_up_group(self, count: int) -> int:
        """The same through a consumer group: XREADGROUP ... > pages, each XACKed."""
        group = f"{self.prefix}-g"
        await self.redis.xgroup_create(self.KEY, group, id="0")
        seen = 0
        try:
            while seen < count:
                reply = await self.redis.xreadgroup(
                    group, "c1", {self.KEY: ">"}, count=min(PAGE, count - seen)
                )
                if not reply or not reply[0][1]:
                    break
                entries = reply[0][1]
                await self.redis.xack(self.KEY, group, *[entry_id for entry_id, _ in entries])
                seen += len(entries)
        finally:
            await self.redis.xgroup_destroy(self.KEY, group)
        return seen

    async def fill(self, count: int, payload: bytes) -> int:
        have = int(await self.redis.xlen(self.KEY))
        chunk = 0
        while have < count:
            n = min(PAGE, count - have)
            async with self.redis.pipeline(transaction=False) as pipe:
                fields = {"type": EVENT_TYPE, "stream": f"fill-{chunk}", "data": payload}
                for _ in range(n):
                    pipe.xadd(self.KEY, fields)
                await pipe.execute()
            have += n
            chunk += 1
        return int(await self.redis.xlen(self.KEY))


# -- PostgreSQL, through psycopg 3 ---------------------------------------------------------

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    global_position bigserial PRIMARY KEY,
    position bigint NOT NULL,
    time timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    stream_name text NOT NULL,
    type text NOT NULL,
    data bytea NOT NULL,
    metadata jsonb,
    id uuid NOT NULL DEFAULT gen_random_uuid()
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_stream ON messages (stream_name, position);
CREATE OR REPLACE FUNCTION notify_messages() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('messages', '');
    RETURN NULL;
END $$;
"""
PG_INSERT = "INSERT INTO messages (stream_name, position, type, data) VALUES (%s, %s, %s, %s)"
PG_PAGE = (
    "SELECT global_position, stream_name, position, type, data, metadata, id, time "
    "FROM messages WHERE global_position > %s ORDER BY global_position LIMIT %s"
)


class PostgresAdapter(Adapter):
    """A message-db style table; INSERT transactions, LISTEN/NOTIFY, keyset pagination."""

    name = "postgres"

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(
            host=self.address["host"],
            port=self.address["port"],
            user="postgres",
            dbname="postgres",
            autocommit=True,
        )

    async def open(self, writers: int, subscribers: int) -> None:
        # A connection runs one transaction at a time: one per concurrent writer.
        self.conns = list(await asyncio.gather(*(self._connect() for _ in range(max(1, writers)))))
        self.next_position = [0] * max(1, writers)

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()

    async def setup(self) -> None:
        await self.conns[0].execute(PG_SCHEMA)

    async def notify(self, on: bool) -> None:
        await self.conns[0].execute("DROP TRIGGER IF EXISTS messages_notify ON messages")
        if on:
            await self.conns[0].execute(
                "CREATE TRIGGER messages_notify AFTER INSERT ON messages "
                "FOR EACH STATEMENT EXECUTE FUNCTION notify_messages()"
            )

    async def version(self) -> str:
        cur = await self.conns[0].execute("SELECT version()")
        row = await cur.fetchone()
        return str(row[0]).split(" on ")[0] if row else ""

    async def append(self, writer: int, payloads: list[bytes]) -> None:
        conn = self.conns[writer]
        stream = self.stream(writer)
        first = self.next_position[writer]
        if len(payloads) == 1:
            await conn.execute(PG_INSERT, (stream, first, EVENT_TYPE, payloads[0]))
        else:
            rows = [(stream, first + i, EVENT_TYPE, data) for i, data in enumerate(payloads)]
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(PG_INSERT, rows)
        self.next_position[writer] = first + len(payloads)

    async def follow(
        self, index: int, from_start: bool, on_ready: OnReady, on_events: OnEvents
    ) -> None:
        conn = await self._connect()
        try:
            await conn.execute("LISTEN messages")
            last = 0
            if not from_start:
                cur = await conn.execute("SELECT coalesce(max(global_position), 0) FROM messages")
                row = await cur.fetchone()
                last = int(row[0]) if row else 0
            on_ready()
            cur = conn.cursor(binary=True)
            while True:
                # Drain everything after `last`, then wait for the next notification
                # (ones that arrive while querying are kept by psycopg and seen next).
                while True:
                    await cur.execute(PG_PAGE, (last, PAGE), prepare=True)
                    rows = await cur.fetchall()
                    if rows:
                        last = rows[-1][0]
                        if not on_events([row[4] for row in rows]):
                            return
                    if len(rows) < PAGE:
                        break
                async for _ in conn.notifies(timeout=0.5, stop_after=1):
                    pass
                if not on_events([]):
                    return
        finally:
            await conn.close()

    async def catch_up(self, count: int) -> int:
        """Keyset pagination: 1,000 rows per query after the last global position read."""
        seen = 0
        last = 0
        async with self.conns[0].cursor(binary=True) as cur:
            while seen < count:
                await cur.execute(PG_PAGE, (last, min(PAGE, count - seen)), prepare=True)
                rows = await cur.fetchall()
                if not rows:
                    break
                seen += len(rows)
                last = rows[-1][0]
        return seen

    async def fill(self, count: int, payload: bytes) -> int:
        conn = self.conns[0]
        cur = await conn.execute("SELECT count(*) FROM messages")
        row = await cur.fetchone()
        have = int(row[0]) if row else 0
        chunk = 0
        while have < count:
            n = min(50_000, count - have)
            async with conn.transaction(), conn.cursor() as c:
                copy_sql = "COPY messages (stream_name, position, type, data) FROM STDIN"
                async with c.copy(copy_sql) as copy:
                    for i in range(n):
                        await copy.write_row(
                            (f"fill-{chunk}-{i // 1000}", i % 1000, EVENT_TYPE, payload)
                        )
            have += n
            chunk += 1
        await conn.execute("VACUUM ANALYZE messages")
        return have


# -- NATS JetStream, through nats-py ---------------------------------------------------------


class NatsAdapter(Adapter):
    """Stream ``EVENTS`` on ``ev.>``; publish with ack; pull consumers."""

    name = "nats"
    STREAM = "EVENTS"

    async def _connect(self) -> Any:
        import nats

        return await nats.connect(
            f"nats://{self.address['host']}:{self.address['port']}",
            max_reconnect_attempts=0,
            pending_size=64 * 1024 * 1024,
        )

    async def open(self, writers: int, subscribers: int) -> None:
        self.nc = await self._connect()
        self.js = self.nc.jetstream(timeout=60)
        self.sub_conns = list(
            await asyncio.gather(
                *(
                    self._connect()
                    for _ in range(math.ceil(subscribers / SUBSCRIBERS_PER_CONNECTION))
                )
            )
        )
        self.consumers: list[str] = []

    async def close(self) -> None:
        for name in self.consumers:
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.STREAM, name)
        for nc in [*self.sub_conns, self.nc]:
            await nc.close()

    async def setup(self) -> None:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        config = StreamConfig(
            name=self.STREAM,
            subjects=["ev.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            num_replicas=1,
        )
        await self.js.add_stream(config)

    async def version(self) -> str:
        return f"nats-server {self.nc.connected_server_version}"

    async def append(self, writer: int, payloads: list[bytes]) -> None:
        subject = f"ev.{self.stream(writer)}"
        if len(payloads) == 1:
            await self.js.publish(subject, payloads[0])
        else:
            await asyncio.gather(*(self.js.publish(subject, data) for data in payloads))

    async def follow(
        self, index: int, from_start: bool, on_ready: OnReady, on_events: OnEvents
    ) -> None:
        """A pull consumer kept fed like the Go client's ``Consume()``.

        nats-py's ``fetch(n)`` holds the first messages back until *n* arrived or
        its timeout passed, which would measure the timeout, not the server.
        """
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        nc = (self.sub_conns or [self.nc])[index // SUBSCRIBERS_PER_CONNECTION]
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
            inactive_threshold=60.0,
        )
        info = await self.js.add_consumer(self.STREAM, config)
        self.consumers.append(info.name)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.STREAM}.{info.name}"
        request = json.dumps({"batch": NATS_PULL_BATCH, "expires": 5_000_000_000}).encode()
        inbox = nc.new_inbox()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sub = await nc.subscribe(inbox, cb=queue.put)
        outstanding = 0

        async def pull() -> None:
            nonlocal outstanding
            outstanding += NATS_PULL_BATCH
            await nc.publish(next_subject, request, reply=inbox)

        try:
            await pull()
            on_ready()
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), 0.5)
                except TimeoutError:
                    if not on_events([]):
                        return
                    continue
                payloads = []
                while True:
                    headers = msg.headers
                    if headers and headers.get("Status"):
                        outstanding = 0  # a pull request expired or ended: ask again
                    else:
                        payloads.append(msg.data)
                        outstanding -= 1
                    if queue.empty():
                        break
                    msg = queue.get_nowait()
                if outstanding <= NATS_PULL_BATCH // 2:
                    await pull()
                if payloads and not on_events(payloads):
                    return
        finally:
            await sub.unsubscribe()

    async def fill(self, count: int, payload: bytes) -> int:
        """Core publishes into the stream's subjects (no per-message ack), then wait."""
        info = await self.js.stream_info(self.STREAM)
        have = info.state.messages
        for i in range(count - have):
            await self.nc.publish(f"ev.fill-{i // 1000}", payload)
            if i % 10_000 == 9_999:
                await self.nc.flush()
        await self.nc.flush()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            info = await self.js.stream_info(self.STREAM)
            if info.state.messages >= count:
                break
            await asyncio.sleep(0.2)
        return int(info.state.messages)


ADAPTERS: dict[str, type[Adapter]] = {
    "lethedb": LetheAdapter,
    "redis": RedisAdapter,
    "postgres": PostgresAdapter,
    "nats": NatsAdapter,
}


async def gather_limited(coros: list[Awaitable[Any]], limit: int) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Any]) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))
