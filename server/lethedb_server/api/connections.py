"""Connections from the network: the file-descriptor limit and a cap per peer address.

gRPC accepts connections itself and offers two limits for them, both set in
:func:`lethedb_server.ops.server.server_options`: a total
(``grpc.max_allowed_incoming_connections``; one more is closed at accept) and
a handshake deadline (``grpc.server_handshake_timeout_ms``; a connection that
has not completed its handshake and sent its HTTP/2 settings by then is
closed). It has no limit per peer address, and it says nothing when a limit
is hit. This module adds both, without touching the fast path:

* :func:`raise_fd_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard limit at
  start-up, and :func:`effective_max_connections` keeps the total below what
  the descriptors allow, so a flood meets the connection cap, never EMFILE;
* :class:`ConnectionWatch` looks at the server's sockets every
  ``interval_s`` (its own descriptors, in ``/proc/self/fd``), counts them per
  peer address, shuts down the newest connections of a peer over
  ``max_connections_per_peer``, and logs (rate-limited) when a cap is hit.

Why not an accept loop of our own in front of gRPC (see docs/ARCHITECTURE.md,
"Connection limits"): grpcio offers no way to hand an accepted socket to the
server, so a front would have to relay every byte of every call through
Python and would hide the peer's address from gRPC. The watch costs nothing
per call; its price is that a peer can exceed its cap for up to one interval,
bounded by the total cap meanwhile.

It only ever acts on sockets that are this process's own (found in
``/proc/self/fd`` and checked again on a duplicate of the descriptor), and
only shuts them down: gRPC sees the connection end and closes it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

#: Descriptors kept for everything that is not a client connection: LMDB
#: files, the lock file, the metrics listener, log files, gRPC's own pipes.
RESERVED_FDS: Final = 256
_IP_FAMILIES: Final = (socket.AF_INET, socket.AF_INET6)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit now.

    A server that runs out of descriptors cannot accept, open files or even
    log reliably; the hard limit is what the operator granted.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. hard is unlimited on some systems
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return soft
        soft = hard
    return soft


def effective_max_connections(configured: int, fd_limit: int) -> int:
    """The connection cap to give gRPC: *configured*, but below the descriptor limit."""
    room = max(1, fd_limit - RESERVED_FDS)
    if configured == 0 or configured > room:
        log.warning(
            "max_connections is %s but the open-files limit is %d; the server accepts at "
            "most %d connections (raise `ulimit -n` or LimitNOFILE= to allow more)",
            configured or "unlimited",
            fd_limit,
            room,
        )
        return room
    return configured


@dataclass(frozen=True, slots=True)
class HeldSocket:
    """A connection this process holds on the server's port."""

    inode: int
    fd: int
    peer: str


def _peer_address(sockaddr: object) -> str:
    host = str(sockaddr[0]) if isinstance(sockaddr, tuple) else str(sockaddr)
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return host


def server_sockets(port: int) -> list[HeldSocket]:
    """The connections this process holds whose local port is *port*.

    Read from this process's own descriptors (``/proc/self/fd``), each looked
    at through a duplicate, so the cost grows with the server's connections
    only. (The kernel's socket tables, ``/proc/net/tcp`` or sock_diag, list
    the whole network namespace, TIME_WAIT included: under a flood of 3,000
    connections a read took 0.2-0.9 s.)
    """
    held: list[HeldSocket] = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            if not target.startswith("socket:["):
                continue
            dup = os.dup(int(name))
        except (OSError, ValueError):
            continue
        try:
            with socket.socket(fileno=dup) as sock:
                dup = -1
                if sock.type != socket.SOCK_STREAM or sock.family not in _IP_FAMILIES:
                    continue
                if sock.getsockname()[1] != port:
                    continue
                peer = _peer_address(sock.getpeername())  # OSError: a listening socket
            held.append(HeldSocket(int(target[8:-1]), int(name), peer))
        except OSError:
            continue
        finally:
            if dup != -1:
                os.close(dup)
    return held


def shut_down(fd: int, inode: int) -> bool:
    """Shut down the connection on *fd* if it is still socket *inode*; gRPC then closes it.

    The descriptor is duplicated first and the duplicate's inode checked, so
    a number gRPC closed and reused meanwhile is never touched; only the
    duplicate is ever closed here.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        if os.fstat(dup).st_ino != inode:
            return False
        with socket.socket(fileno=dup) as sock:
            dup = -1  # the socket object owns (and closes) the duplicate now
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return True
    finally:
        if dup != -1:
            os.close(dup)


@dataclass
class _Throttle:
    """At most one line per *every_s* seconds; the rest counted into the next line."""

    every_s: float
    last: float = -1e9
    suppressed: int = 0

    def allow(self) -> tuple[bool, int]:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return False, 0
        self.last, missed, self.suppressed = now, self.suppressed, 0
        return True, missed


@dataclass
class ConnectionWatch:
    """Counts the server's connections per peer, trims peers over their cap, logs caps hit."""

    port: int
    max_connections: int
    max_per_peer: int
    interval_s: float = 0.5
    log_every_s: float = 10.0
    closed_total: int = 0
    _total_log: _Throttle = field(init=False)
    _peer_log: _Throttle = field(init=False)

    def __post_init__(self) -> None:
        self._total_log = _Throttle(self.log_every_s)
        self._peer_log = _Throttle(self.log_every_s)

    @staticmethod
    def supported() -> bool:
        """A /proc/self/fd to list the server's sockets (Linux)."""
        return Path("/proc/self/fd").is_dir()

    async def run(self) -> None:
        """Check every interval until cancelled; a failed check is logged, never fatal.

        A check costs time in proportion to the connections held (50-75 ms
        for 3,000, measured under a flood): the pause after one is at least
        ten times its duration, so the watch never takes more than a tenth of
        the server's time.
        """
        pause = self.interval_s
        while True:
            await asyncio.sleep(pause)
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.check)
            except Exception:
                log.exception("connection check failed; trying again")
            pause = max(self.interval_s, 10 * (time.monotonic() - started))

    def check(self) -> None:
        """One look: count, trim peers over their cap, log what was hit."""
        held = server_sockets(self.port)
        per_peer = Counter(s.peer for s in held)
        if self.max_connections and len(held) >= self.max_connections:
            self._log_total(len(held), per_peer)
        over = {p: n for p, n in per_peer.items() if self.max_per_peer and n > self.max_per_peer}
        if over:
            self._trim(held, over)

    def _trim(self, held: list[HeldSocket], over: dict[str, int]) -> None:
        closed: Counter[str] = Counter()
        for peer in over:
            # Its oldest connections stay (inodes grow as sockets are made):
            # a peer's long-lived connections are the last to go.
            theirs = sorted((s for s in held if s.peer == peer), key=lambda s: s.inode)
            for extra in theirs[self.max_per_peer :]:
                if shut_down(extra.fd, extra.inode):
                    closed[peer] += 1
        self.closed_total += sum(closed.values())
        if not closed:
            return
        allowed, missed = self._peer_log.allow()
        if allowed:
            peers = ", ".join(f"{p} held {over[p]}, {n} closed" for p, n in closed.most_common(5))
            log.warning(
                "connections over the limit of %d per peer address (max_connections_per_peer) "
                "closed: %s%s",
                self.max_per_peer,
                peers,
                f" ({missed} earlier checks also closed some, not logged)" if missed else "",
            )

    def _log_total(self, total: int, per_peer: Counter[str]) -> None:
        allowed, missed = self._total_log.allow()
        if not allowed:
            return
        busiest = ", ".join(f"{p} ({n})" for p, n in per_peer.most_common(5))
        log.warning(
            "connection limit reached: %d connections open, the limit is %d (max_connections); "
            "new connections are closed at once until some end. Busiest peers: %s%s",
            total,
            self.max_connections,
            busiest,
            f" (reached in {missed} more checks since the last report)" if missed else "",
        )
