"""The one way tests pick a TCP port for a listener they start themselves.

The server under test is not started this way: it listens on port 0 and
reports the port it got in its ready file (tests/integration/serverproc.py),
which no other process can take in between. This is for what cannot do that:
a redis-server, a metrics endpoint, a port a test keeps busy on purpose.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it; bind it soon after)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
