"""Process and measurement machinery shared by the e2e, subscribe and peer benchmarks.

:mod:`benchmarks.e2e`, :mod:`benchmarks.subscribe` and :mod:`benchmarks.peers`
use these: CPU use read from ``/proc`` (of a process, a process tree and the
machine), waiting for the machine to go quiet between cases, a pool of spawned
load processes that speak the ready/go/result protocol of
:mod:`benchmarks.loadgen`, a free port, and ``lethedb serve`` (or any server)
as a child process that is stopped and waited for. Nothing here knows a
workload or writes a report (that is :mod:`benchmarks.report`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.loadgen import Result, sleep_until, worker_main

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- measuring CPU from /proc ------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its live children and its reaped children.

    For PostgreSQL: the postmaster, its backends, and (through the kernel's
    cutime/cstime) every backend or worker that has exited since it started,
    so a backend ending inside the window does not take its time with it. A
    child reaped while the children are being read would be counted in
    neither place (reports showed a negative server CPU when the clients
    disconnected), so the read is repeated until no child was reaped during it.
    """
    for _ in range(10):
        before = _own_and_reaped_cpu_s(pid)
        children = _children_cpu_s(pid)
        after = _own_and_reaped_cpu_s(pid)
        if after[1] == before[1]:
            break
    return after[0] + after[1] + children


def _own_and_reaped_cpu_s(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of *pid*, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = [int(v) for v in raw[raw.rindex(")") + 2 :].split()[11:15]]
    return (fields[0] + fields[1]) / CLK_TCK, (fields[2] + fields[3]) / CLK_TCK


def _children_cpu_s(pid: int) -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user time
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds spent over a stretch of time (see :class:`CpuMeter`)."""

    server_cpu_s: float | None  # None when no server was measured
    machine_busy_s: float  # busy CPU seconds of the whole machine, all cores
    machine_total_s: float  # all CPU seconds of the machine, busy or idle


class CpuMeter:
    """CPU use of a server (a process or a process tree) and of the machine.

    Created at the start of a stretch of time, read at its end. Every tool
    measures a case this way, so a "server CPU" or an "other CPU" figure
    means the same in each report. *server_cpu* reads a pid's CPU seconds:
    :func:`process_cpu_s`, or :func:`tree_cpu_s` for a server made of
    several processes (PostgreSQL).
    """

    def __init__(
        self, server_pid: int | None, server_cpu: Callable[[int], float] = process_cpu_s
    ) -> None:
        self._server_pid = server_pid
        self._server_cpu = server_cpu
        self._server0 = server_cpu(server_pid) if server_pid else None
        self._busy0, self._total0 = machine_cpu_s()

    def read(self) -> CpuUsage:
        """The CPU seconds spent since the meter was created."""
        server1 = self._server_cpu(self._server_pid) if self._server_pid else None
        busy1, total1 = machine_cpu_s()
        server0 = self._server0
        return CpuUsage(
            server_cpu_s=None if server0 is None or server1 is None else server1 - server0,
            machine_busy_s=busy1 - self._busy0,
            machine_total_s=total1 - self._total0,
        )


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, sample_s: float = 0.5) -> float:
    """Wait until the machine is nearly idle between cases; return the seconds waited.

    On a shared machine other jobs (a test run, a build) steal CPU from the
    server and the load; a case started under them measures them. Gives up
    after *max_wait_s* and runs anyway: the report's *Other CPU* column shows it.
    """
    waited = 0.0
    while waited < max_wait_s:
        busy0, _ = machine_cpu_s()
        time.sleep(sample_s)
        busy1, _ = machine_cpu_s()
        if (busy1 - busy0) / sample_s < threshold:
            break
        waited += sample_s
    return waited


# -- worker processes -----------------------------------------------------------------


class Workers:
    """A pool of spawned load processes, reused across cases."""

    def __init__(self, count: int, target: Callable[[Connection], None] = worker_main) -> None:
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for _ in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=target, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("exit", None))
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()

    def run(
        self,
        specs: Sequence[Any],
        duration_s: float,
        server_pid: int | None,
        server_cpu: Callable[[int], float] = lambda pid: process_cpu_s(pid),
    ) -> tuple[list[Result], dict[str, float | None]]:
        """Run one case on the first ``len(specs)`` workers; see loadgen's protocol.

        *specs* are :class:`~benchmarks.loadgen.Spec` for loadgen's workers, or
        whatever the pool's *target* understands. *server_cpu* reads the
        server's CPU seconds from its pid (:func:`tree_cpu_s` for a server
        made of several processes).
        """
        conns = self._conns[: len(specs)]
        for conn, spec in zip(conns, specs, strict=True):
            conn.send(("run", spec))
        timeout = specs[0].warmup_s + 300
        for conn in conns:
            _expect(conn, "ready", timeout)
        start = time.monotonic_ns() + 100_000_000
        end = start + int(duration_s * 1e9)
        for conn in conns:
            conn.send(("go", (start, end)))
        sleep_until(start)
        meter = CpuMeter(server_pid, server_cpu)
        sleep_until(end)
        spent = meter.read()
        results = [_expect(conn, "result", duration_s + 120) for conn in conns]
        busy = spent.machine_busy_s / duration_s if spent.machine_total_s > 0 else None
        usage: dict[str, float | None] = {"server_cpu_s": spent.server_cpu_s, "machine_busy": busy}
        return results, usage

    def call(self, job: Any, timeout: float = 3600.0, worker: int = 0) -> Any:
        """Run a one-shot job (answered with ``result`` directly, no ready/go) on one worker."""
        conn = self._conns[worker]
        conn.send(("run", job))
        return _expect(conn, "result", timeout)


def _expect(conn: Connection, what: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"a load worker sent no {what!r} within {timeout:.0f}s")
    tag, payload = conn.recv()
    if tag == "failed":
        raise RuntimeError(f"a load worker failed: {payload}")
    if tag != what:
        raise RuntimeError(f"a load worker sent {tag!r} where {what!r} was expected")
    return payload


# -- servers -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Ask a server to stop with *sig*, kill it after a minute; its exit code.

    The exit code matters: a server that did not stop cleanly on SIGTERM
    fails the run.
    """
    proc.send_signal(sig)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def log_tail(path: Path, lines: int = 20, missing: str = "") -> str:
    """The last *lines* of a server's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing or f"(no log at {path})"


class Server:
    """``lethedb serve`` as a subprocess, on a free port, in its own data directory."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout: float = 60.0) -> None:
        ready = self.data_dir.parent / "server.ready"
        ready.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lethedb_server",
                    "serve",
                    "--data",
                    str(self.data_dir),
                    "--listen",
                    "127.0.0.1:0",
                    "--ready-file",
                    str(ready),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the server was not ready within {timeout:.0f}s:\n{self.tail()}"
                )
            time.sleep(0.05)
        self.address = ready.read_text().strip()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        return 0 if self.proc is None else stop_process(self.proc)

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines, "(no server log)")

    def head(self) -> int:
        """The last global position, read back over gRPC."""
        import grpc

        from lethedb.v1 import eventstore_pb2 as pb
        from lethedb.v1 import eventstore_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            for response in stub.ReadAll(pb.ReadAllRequest(backwards=True, max_count=1)):
                return int(response.events[0].position) if response.events else 0
        return 0


@contextlib.contextmanager
def temp_root(parent: Path | None, prefix: str = "lethedb-bench-") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as name:
        yield Path(name)
