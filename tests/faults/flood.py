"""A connection flood from one process: ``python -m tests.faults.flood TARGET [options]``.

Opens TCP connections to TARGET from one source address and holds them,
bounded in number (``--held`` at once, ``--total`` over the run) and in time
(``--seconds``). Loopback only: the target must be a loopback address.

Modes:

* ``silent-or-partial``: every other connection sends nothing; the rest
  send the first 16 bytes of the 24-byte HTTP/2 client preface and stall.
  A connection the server closes is replaced at once, as an attacker would.
* ``handshaken``: each connection sends the whole preface and an empty
  SETTINGS frame (a completed HTTP/2 handshake) and then nothing; closed
  ones are not replaced.

Prints one JSON line: connections opened, closed by the server, still open
at the end, and the longest time the server held a connection it closed.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import selectors
import socket
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--source", default="127.0.0.2")
    parser.add_argument("--held", type=int, default=2000)
    parser.add_argument("--total", type=int, default=30_000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument(
        "--mode", choices=["silent-or-partial", "handshaken"], default="silent-or-partial"
    )
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    if not (
        ipaddress.ip_address(host).is_loopback and ipaddress.ip_address(args.source).is_loopback
    ):
        raise SystemExit("loopback only")
    print(json.dumps(flood(host, int(port), args)), flush=True)


def flood(host: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    selector = selectors.DefaultSelector()
    opened = closed = refused = 0
    longest = 0.0
    started: dict[socket.socket, float] = {}
    replace = args.mode == "silent-or-partial"
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        while len(started) < args.held and opened < args.total and (replace or opened < args.held):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((args.source, 0))
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                refused += 1
                break
            opened += 1
            started[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_WRITE, opened)
        for key, events in selector.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                selector.modify(sock, selectors.EVENT_READ, key.data)
                try:
                    if args.mode == "handshaken":
                        sock.send(PREFACE + EMPTY_SETTINGS)
                    elif key.data % 2:
                        sock.send(PREFACE[:16])
                except OSError:
                    pass
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:  # the server's SETTINGS and the like: keep holding
                continue
            closed += 1
            longest = max(longest, time.monotonic() - started.pop(sock))
            selector.unregister(sock)
            sock.close()
    still_open = len(started)
    for sock in started:
        sock.close()
    return {
        "opened": opened,
        "closed_by_server": closed,
        "still_open": still_open,
        "refused_locally": refused,
        "longest_hold_s": round(longest, 3),
    }


if __name__ == "__main__":
    main()
