"""TCP proxies on loopback that a test can cut and heal: a network partition in one process.

A failover test must cut a leader off from its followers (and from etcd)
while clients still reach it, so the nodes' replication links and their etcd
links each go through a proxy of their own. A cut is a partition, not a
refusal: bytes stop flowing both ways on the connections already open, and a
connection opened during the cut is accepted but not forwarded, exactly as a
peer behind a dead link looks (no RST, no FIN). Healing lets the held bytes
and connections through; what the endpoints gave up on meanwhile they have
closed themselves. :meth:`ProxyLoop.reset` closes everything instead (used
when the upstream itself restarted).

Every proxy runs on one asyncio loop in a daemon thread; its methods are safe
to call from the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")

CHUNK = 64 * 1024


class Proxy:
    """One listening port on 127.0.0.1 forwarding to *upstream* (host:port), cuttable."""

    def __init__(self, name: str, upstream: str) -> None:
        self.name = name
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cut_off(self) -> bool:
        return not self._open.is_set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.reset()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def reset(self) -> None:
        """Close every proxied connection now (both sides see the connection end)."""
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pump(reader, upstream_writer), self._pump(upstream_reader, writer)
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for end in (writer, upstream_writer):
                if end is not None:
                    self._writers.discard(end)
                    end.close()
            self._tasks.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy bytes one way; while cut, hold them (read nothing, send nothing)."""
        try:
            while True:
                await self._open.wait()
                data = await source.read(CHUNK)
                if not data:
                    break
                await self._open.wait()
                sink.write(data)
                await sink.drain()
        finally:
            with contextlib.suppress(OSError):
                sink.close()


class ProxyLoop:
    """An asyncio loop in a daemon thread that hosts proxies; close it when done."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._thread.start()
        self.proxies: list[Proxy] = []

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def proxy(self, name: str, upstream: str) -> Proxy:
        """A new proxy to *upstream*, listening on a free loopback port."""
        proxy = Proxy(name, upstream)
        self._run(self._create(proxy))
        self.proxies.append(proxy)
        return proxy

    async def _create(self, proxy: Proxy) -> None:
        # Its asyncio.Event must belong to this loop: create and start it here.
        proxy._open = asyncio.Event()
        proxy._open.set()
        await proxy.start()

    def cut(self, *proxies: Proxy) -> None:
        for proxy in proxies:
            self._loop.call_soon_threadsafe(proxy.cut)

    def heal(self, *proxies: Proxy) -> None:
        for proxy in proxies:
            self._loop.call_soon_threadsafe(proxy.heal)

    def reset(self, *proxies: Proxy) -> None:
        for proxy in proxies:
            self._run(proxy.reset())

    def close(self) -> None:
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                self._run(proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
