"""A real LetheDB server in a child process, on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT = 30.0


class ServerProcess:
    """Starts ``lethedb serve`` on a data directory and knows its address."""

    def __init__(
        self,
        data_dir: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """*credentials*: how to reach a TLS server for the start-up health check."""
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.credentials = credentials
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.log_path = data_dir.parent / f"{data_dir.name}.server.log"

    def start(self, listen: str = "127.0.0.1:0") -> ServerProcess:
        ready = self.data_dir.parent / f"{self.data_dir.name}.ready"
        ready.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "lethedb_server", "serve",
                "--data", str(self.data_dir),
                "--listen", listen,
                "--ready-file", str(ready),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )  # fmt: skip
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start in {STARTUP_TIMEOUT}s:\n{self.logs()}")
            time.sleep(0.02)
        self.address = ready.read_text().strip()
        self._wait_serving()
        return self

    @property
    def pid(self) -> int:
        """The running server's process id."""
        if self.proc is None:
            raise RuntimeError(f"the server on {self.data_dir} is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def channel(self) -> grpc.Channel:
        """A channel to the server, secured like the start-up health check."""
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def _wait_serving(self) -> None:
        with self.channel() as channel:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=STARTUP_TIMEOUT, wait_for_ready=True
            )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> ServerProcess:
        """Stop gracefully and start again on the same port."""
        listen = self.address
        self.stop()
        return self.start(listen)

    def start_again(self) -> ServerProcess:
        """Start a stopped or killed server on the port it had (others know it by it)."""
        if not self.address:
            raise RuntimeError("start_again needs a server that was started once")
        return self.start(self.address)
