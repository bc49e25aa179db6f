"""Connection floods from one process while authenticated clients keep working.

The attack (issue 18, item 3): nothing capped connections, and a connection
that never completed its handshake was held for minutes, so ~20,000 idle
connections from one client exhausted the server's file descriptors and
authenticated clients got DEADLINE_EXCEEDED. The attacker here is
``tests.faults.flood`` in a process of its own, on loopback from source
address 127.0.0.2, bounded in connections and seconds; the probes are
authenticated clients in this process, from 127.0.0.1.

The server starts with the open-files soft limit at 1,024 (a common default;
the hard limit stays as it is): it must raise it, cap its connections below
it, close connections that do not finish their handshake in time and keep
each peer address under its own cap.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lethedb
from lethedb_server.api.tokens import create_token
from tests.integration.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
HANDSHAKE_TIMEOUT_S = 1.0
#: Probe latency bound, generous for a loaded 2-core CI machine: an append on
#: an idle loopback server takes a few ms; the flood adds the server's work of
#: accepting, trimming and closing thousands of connections.
PROBE_P99_S = 1.0
#: A new authenticated client must connect and append within this, every time.
NEW_CLIENT_TIMEOUT_S = 5.0


@contextlib.contextmanager
def soft_fd_limit(limit: int) -> Iterator[None]:
    """Children started inside inherit this soft limit; the hard limit is untouched."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def writer_token(tmp_path: Path) -> tuple[Path, str]:
    token, _ = create_token(tmp_path / "tokens.json", "writer", "probe")
    return tmp_path / "tokens.json", token


def start_server(tmp_path: Path, tokens: Path, *args: str) -> ServerProcess:
    with soft_fd_limit(1024):
        return ServerProcess(
            tmp_path / "data",
            "--tokens-file", str(tokens),
            "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S),
            *args,
        ).start()  # fmt: skip


def attack(address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.flood", address, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(flood: subprocess.Popen[str]) -> dict[str, float]:
    out, err = flood.communicate(timeout=120)
    assert flood.returncode == 0, err
    result: dict[str, float] = json.loads(out)
    return result


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Probe(threading.Thread):
    """An authenticated client appending every 20 ms on the connection it already has."""

    def __init__(self, address: str, token: str) -> None:
        super().__init__(daemon=True)
        self.client = lethedb.Client(address, token=token, timeout=10.0, max_retries=0)
        self.client.append("probe", [lethedb.Event("Probed", data=b"{}")])  # connected
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.perf_counter()
            try:
                self.client.append("probe", [lethedb.Event("Probed", data=b"{}")])
                self.latencies.append(time.perf_counter() - started)
            except lethedb.LetheError as exc:
                self.errors.append(repr(exc))
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        self.client.close()

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def new_client_appends(address: str, token: str) -> None:
    """Connect afresh (a connection of its own) and append once."""
    with lethedb.Client(address, token=token, timeout=NEW_CLIENT_TIMEOUT_S, max_retries=0) as db:
        db.append("newcomer", [lethedb.Event("Arrived", data=b"{}")])


@pytest.mark.slow
@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 8192,
    reason="needs a hard open-files limit above the flood's 3,000 connections",
)
def test_a_flood_of_silent_and_half_handshaken_connections_leaves_clients_served(
    tmp_path, writer_token
):
    tokens, token = writer_token
    server = start_server(tmp_path, tokens)  # default caps: 4,096 in all, 256 per peer
    assert server.proc is not None
    try:
        probe = Probe(server.address, token)
        probe.start()
        flood = attack(server.address, "--held", "3000", "--seconds", "8")
        time.sleep(1.0)  # the flood is at full strength
        most_fds = 0
        newcomers: list[str] = []
        while flood.poll() is None:
            most_fds = max(most_fds, open_fds(server.proc.pid))
            try:
                new_client_appends(server.address, token)
                newcomers.append("ok")
            except lethedb.LetheError as exc:
                newcomers.append(repr(exc))
            time.sleep(0.3)
        result = finished(flood)
        probe.stop()

        assert result["opened"] >= 3000
        # Connections that never finish their handshake are closed in time.
        assert result["closed_by_server"] >= 1000, result
        # (Measured up to 3 s under load: a connection may wait in the accept
        # queue before gRPC takes it and starts its handshake clock.)
        assert result["longest_hold_s"] < HANDSHAKE_TIMEOUT_S + 5, result
        # The server raised its open-files limit: the old one stopped accepting at
        # 1,024 descriptors, and every new client failed until the flood ended.
        assert most_fds > 1024, most_fds
        assert probe.errors == []
        assert len(probe.latencies) > 100
        assert probe.p99() < PROBE_P99_S, f"probe p99 {probe.p99():.3f}s"
        assert newcomers, "the flood ended before any new client tried"
        assert set(newcomers) == {"ok"}, newcomers
        assert "max_connections_per_peer" in server.logs()
    finally:
        server.kill()


@pytest.mark.slow
def test_handshaken_connections_beyond_the_per_peer_cap_are_closed(tmp_path, writer_token):
    tokens, token = writer_token
    server = start_server(tmp_path, tokens, "--max-connections-per-peer", "100")
    try:
        flood = attack(server.address, "--mode", "handshaken", "--held", "300", "--seconds", "4")
        time.sleep(1.0)
        new_client_appends(server.address, token)  # another address is not affected
        result = finished(flood)

        # 200 over the cap were closed; the 100 oldest stay (idle, handshake done).
        assert result["closed_by_server"] == 200, result
        assert result["still_open"] == 100, result
        assert "over the limit of 100 per peer address (max_connections_per_peer)" in (
            server.logs()
        )
    finally:
        server.kill()


@pytest.mark.slow
def test_connections_beyond_the_total_cap_are_closed_at_once_and_logged(tmp_path, writer_token):
    tokens, token = writer_token
    server = start_server(
        tmp_path, tokens, "--max-connections", "200", "--max-connections-per-peer", "0"
    )
    assert server.proc is not None
    try:
        probe = Probe(server.address, token)  # holds one of the 200
        probe.start()
        flood = attack(server.address, "--mode", "handshaken", "--held", "600", "--seconds", "3")
        time.sleep(1.5)
        fds_during = open_fds(server.proc.pid)
        result = finished(flood)
        probe.stop()

        assert result["still_open"] <= 199, result
        assert result["closed_by_server"] >= 401, result
        assert fds_during < 200 + 100, fds_during
        assert probe.errors == []
        assert "connection limit reached" in server.logs()
        assert "(max_connections)" in server.logs()
    finally:
        server.kill()
