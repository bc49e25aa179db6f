"""The connection watch on real sockets in this process: counting, trimming, logging."""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Iterator

import pytest

from lethedb_server.api import connections
from lethedb_server.api.connections import ConnectionWatch, effective_max_connections


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock


def connect(
    listener: socket.socket, source: str, count: int
) -> tuple[list[socket.socket], list[socket.socket]]:
    """*count* connections from *source*: (client ends, accepted server ends)."""
    clients, accepted = [], []
    for _ in range(count):
        client = socket.socket()
        client.bind((source, 0))
        client.connect(listener.getsockname())
        clients.append(client)
        accepted.append(listener.accept()[0])
    return clients, accepted


def closed_by_server(client: socket.socket) -> bool:
    """The server end was shut down (read at once: shutdown is synchronous)."""
    client.settimeout(0.2)
    try:
        return client.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_the_servers_connections_are_counted_per_peer_address(listener):
    port = listener.getsockname()[1]
    ends = [connect(listener, "127.0.0.2", 3), connect(listener, "127.0.0.3", 2)]
    held = connections.server_sockets(port)
    peers = sorted(h.peer for h in held)
    assert peers == ["127.0.0.2"] * 3 + ["127.0.0.3"] * 2
    for clients, accepted in ends:
        for sock in clients + accepted:
            sock.close()


def test_a_peer_over_its_cap_loses_its_newest_connections_and_it_is_logged(listener, caplog):
    port = listener.getsockname()[1]
    clients, accepted = connect(listener, "127.0.0.2", 5)
    others, others_accepted = connect(listener, "127.0.0.3", 2)
    watch = ConnectionWatch(port, max_connections=100, max_per_peer=2)
    with caplog.at_level(logging.WARNING):
        watch.check()

    assert [closed_by_server(c) for c in clients] == [False, False, True, True, True]
    assert not any(closed_by_server(c) for c in others)
    assert watch.closed_total == 3
    assert "127.0.0.2 held 5, 3 closed" in caplog.text
    assert "(max_connections_per_peer)" in caplog.text
    for sock in clients + accepted + others + others_accepted:
        sock.close()


def test_reaching_the_total_cap_is_logged_once_per_interval(listener, caplog):
    port = listener.getsockname()[1]
    clients, accepted = connect(listener, "127.0.0.2", 3)
    watch = ConnectionWatch(port, max_connections=3, max_per_peer=0, log_every_s=60)
    with caplog.at_level(logging.WARNING):
        watch.check()
        watch.check()
    assert caplog.text.count("connection limit reached: 3 connections open") == 1
    assert "Busiest peers: 127.0.0.2 (3)" in caplog.text
    for sock in clients + accepted:
        sock.close()


def test_a_descriptor_that_is_no_longer_the_socket_is_left_alone(listener):
    clients, accepted = connect(listener, "127.0.0.2", 1)
    with open(__file__, "rb") as unrelated:
        assert connections.shut_down(unrelated.fileno(), inode=1) is False
        assert unrelated.read(1)  # untouched
    inode = connections.server_sockets(listener.getsockname()[1])[0].inode
    assert connections.shut_down(accepted[0].fileno(), inode) is True
    assert closed_by_server(clients[0])
    for sock in clients + accepted:
        sock.close()


def test_the_connection_cap_stays_below_the_open_files_limit(caplog):
    assert effective_max_connections(4096, 65536) == 4096
    with caplog.at_level(logging.WARNING):
        assert effective_max_connections(4096, 1024) == 1024 - connections.RESERVED_FDS
        assert effective_max_connections(0, 2048) == 2048 - connections.RESERVED_FDS
    assert "the open-files limit is 1024" in caplog.text


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert connections.raise_fd_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
