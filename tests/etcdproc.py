"""A real etcd in a child process, on free loopback ports, with its own data directory.

Failover tests (and ``make cluster``'s developers) need the real coordinator:
its leases, revisions and watches are what the election's safety rests on,
so no fake stands in for it. ``.ci/run`` installs ``etcd-server`` from the
system packages; :func:`etcd_binary` fails a CI run (``CI`` set) when it is
missing, so a broken install is never mistaken for a pass, and skips the test
on a developer machine without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ports import free_port

STARTUP_TIMEOUT = 20.0


def etcd_binary() -> str:
    """The etcd executable; fails in CI and skips elsewhere when it is not installed."""
    binary = shutil.which("etcd")
    if binary is None:
        message = "etcd is not installed (.ci/run installs the etcd-server package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


class EtcdProcess:
    """One single-member etcd cluster. Restarts keep its ports and its data."""

    def __init__(self, data_dir: Path, binary: str) -> None:
        self.data_dir = data_dir
        self.binary = binary
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.etcd.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdProcess:
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--name", "test",
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"test={peer}",
                # A short raft election timeout: a single member elects itself at once,
                # and etcd's smallest lease TTL (1.5 election timeouts) drops to 1 s.
                "--heartbeat-interval", "10",
                "--election-timeout", "100",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"etcd did not start in {STARTUP_TIMEOUT}s:\n{self.logs()}")
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self) -> None:
        """A clean stop (SIGTERM): etcd keeps its data, leases included."""
        if self.proc is not None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> EtcdProcess:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: etcd holds its connections open and answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
