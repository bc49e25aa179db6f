"""Start and stop the systems under test, each on loopback in its own temporary directory.

Every peer comes from the system package manager (Debian: ``redis-server``,
``postgresql``, ``nats-server``); :func:`ensure_installed` installs what is
missing when running as root, or names the one command that does. Each
server runs as a child process of the orchestrator on a free port, with its
data in the run's temporary directory, and is stopped (and waited for) when
the run ends, whatever happened. Durability settings are chosen here and
described by :attr:`PeerServer.settings` for the report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.harness import (
    Server,
    free_port,
    log_tail,
    process_cpu_s,
    stop_process,
    tree_cpu_s,
)
from benchmarks.report import commit

APT_PACKAGES = {"redis": "redis-server", "postgres": "postgresql", "nats": "nats-server"}
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def pg_bin_dir() -> Path | None:
    """Debian keeps the server binaries out of PATH, in /usr/lib/postgresql/<major>/bin."""
    candidates = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")), key=lambda p: p.parent.name)
    for directory in reversed(candidates):
        if (directory / "postgres").exists() and (directory / "initdb").exists():
            return directory
    found = shutil.which("postgres")
    return Path(found).resolve().parent if found else None


def missing_systems(systems: list[str]) -> list[str]:
    missing = []
    for system in systems:
        if (
            (system == "redis" and not shutil.which("redis-server"))
            or (system == "nats" and not shutil.which("nats-server"))
            or (system == "postgres" and pg_bin_dir() is None)
        ):
            missing.append(system)
    return missing


#: The standard Python client the tool drives each peer through (the ``bench`` extra).
CLIENT_MODULES = {"redis": "redis", "postgres": "psycopg", "nats": "nats"}


def ensure_clients(systems: list[str]) -> None:
    """Exit naming the install command before any work if a peer's client is missing.

    Without this, a run spends minutes on the physical reference and only
    then fails with an ImportError when it reaches the peer.
    """
    missing = [
        CLIENT_MODULES[s]
        for s in systems
        if s in CLIENT_MODULES and importlib.util.find_spec(CLIENT_MODULES[s]) is None
    ]
    if missing:
        sys.exit(
            f"missing Python client(s): {', '.join(missing)}. Install with:\n"
            "    pip install -e '.[bench]'   (or run `make bench-peers`, which does)"
        )


def ensure_installed(systems: list[str], install: bool) -> None:
    """Install the missing peers with apt-get (as root), or exit naming the command."""
    missing = missing_systems(systems)
    if not missing:
        return
    packages = " ".join(APT_PACKAGES[s] for s in missing)
    command = f"apt-get update && apt-get install -y {packages}"
    if not install or os.geteuid() != 0:
        sys.exit(
            f"missing: {', '.join(missing)}. Install with:\n    sudo sh -c '{command}'\n"
            "(or run this tool as root, which installs them itself; --systems picks a subset)"
        )
    print(f"Installing {packages} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages.split()], check=True, env=env)
    still = missing_systems(systems)
    if still:
        sys.exit(f"apt-get ran, but these are still missing: {', '.join(still)}")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not listening on {port} within {timeout:.0f}s:\n{tail(log)}")
        time.sleep(0.05)


def tail(path: Path, lines: int = 20) -> str:
    return log_tail(path, lines)


def version_of(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=20)
    except OSError as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


class PeerServer:
    """One system under test: a child process, its address and its settings."""

    name = ""
    title = ""

    def __init__(self, root: Path, label: str = "") -> None:
        self.root = root / (label or self.name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = ""
        #: What the report says about this system's configuration.
        self.settings: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port}

    #: Reads the server's CPU seconds from its pid (a tree for PostgreSQL).
    cpu: Callable[[int], float] = staticmethod(process_cpu_s)

    def start(self) -> None:
        raise NotImplementedError

    def stop_signal(self) -> int:
        return signal.SIGTERM

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return 0 if self.proc is None else self.proc.returncode
        return stop_process(self.proc, self.stop_signal())

    def _popen(self, argv: list[str], user: str | None = None) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=user,
                start_new_session=True,  # a Ctrl-C of the tool reaches us, not the server
            )


class LetheServer(PeerServer):
    """``lethedb serve`` (:class:`benchmarks.harness.Server`), durable as always."""

    name = "lethedb"
    title = "LetheDB"

    def __init__(self, root: Path, label: str = "", data_dir: Path | None = None) -> None:
        super().__init__(root, label)
        self.data_dir = data_dir or self.root / "data"
        # No automatic shred epochs: the forget case runs its epoch itself.
        self.server = Server(self.data_dir, self.log_path, ["--shred-interval-s", "0"])
        self.settings = [
            "every append acknowledged after its LMDB commit with fsync (sync + metasync: "
            "two fdatasyncs per commit); concurrent appends share commits (group commit)",
            "the SDK coalesces the appends its callers have in flight at once into "
            "`AppendBatch` calls (its default; no waiting to fill a batch): each append keeps "
            "its own expected-version check, result and durable acknowledgement",
            "event data encrypted with AES-256-GCM under a per-subject key (1,000 subjects); "
            "the peers store their payloads in the clear",
            "default server configuration, automatic shred epochs off (`--shred-interval-s 0`)",
        ]

    @property
    def address(self) -> dict[str, Any]:
        return {"target": self.server.address}

    @property
    def pid(self) -> int:
        return self.server.pid

    def start(self) -> None:
        self.server.start()
        self.version = f"lethedb (this tree, commit {commit()})"

    def stop(self) -> int:
        return self.server.stop()


class RedisServer(PeerServer):
    name = "redis"
    title = "Redis Streams"

    def start(self) -> None:
        self.port = free_port()
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.root),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--auto-aof-rewrite-percentage",
            "0",
            "--maxclients",
            "4000",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]
        self.proc = self._popen(argv)
        wait_for_port(self.port, self.proc, 30, self.log_path)
        self.version = version_of(["redis-server", "--version"])
        self.settings = [
            "`appendonly yes`, `appendfsync always`: the AOF is written and fsynced before "
            "replies go out (one fsync per event-loop pass, shared by all clients in it)",
            'RDB snapshots off (`save ""`), automatic AOF rewrite off '
            "(`auto-aof-rewrite-percentage 0`) so no background fork runs during a case",
            "one stream key (`events`) holds the whole log, as LetheDB's global log; each "
            "entry has `type`, `stream` and `data` fields",
        ]


class PostgresServer(PeerServer):
    name = "postgres"
    title = "PostgreSQL"
    cpu = staticmethod(tree_cpu_s)

    CONFIG: ClassVar[dict[str, str]] = {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "wal_sync_method": "fdatasync",
        "max_connections": "1200",
        "shared_buffers": "512MB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "30min",
    }

    def start(self) -> None:
        bin_dir = pg_bin_dir()
        assert bin_dir is not None
        self.port = free_port()
        data = self.root / "data"
        sockets = self.root / "sockets"
        sockets.mkdir(exist_ok=True)
        user = None
        if os.geteuid() == 0:
            # postgres refuses to run as root: the cluster belongs to the postgres user.
            user = "postgres"
            owner = pwd.getpwnam(user)
            for path in (self.root, sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            # The temporary root must be traversable by that user.
            for parent in self.root.parents:
                if parent == Path(parent.anchor) or parent.stat().st_mode & 0o001:
                    break
                os.chmod(parent, parent.stat().st_mode | 0o711)
        with self.log_path.open("ab") as log:
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=user,
            )
        settings = dict(
            self.CONFIG,
            port=str(self.port),
            listen_addresses="127.0.0.1",
            unix_socket_directories=str(sockets),
        )
        argv = [str(bin_dir / "postgres"), "-D", str(data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self.proc = self._popen(argv, user=user)
        self._wait_ready(60)
        self.version = version_of([str(bin_dir / "postgres"), "--version"])
        shown = ", ".join(f"`{k}={v}`" for k, v in self.CONFIG.items())
        self.settings = [
            f"{shown}; everything else default (WAL level `replica`)",
            "message-db style `messages` table: `global_position bigserial` primary key, "
            "`(stream_name, position)` unique, `id uuid` unique (server default "
            "`gen_random_uuid()`), `data bytea`",
            "1-event appends are single INSERTs (an implicit transaction each, autocommit); "
            "100-event appends are one transaction of 100 INSERTs sent in one pipeline "
            "(psycopg `executemany`)",
            "subscriptions: LISTEN/NOTIFY (a statement-level `AFTER INSERT` trigger calls "
            "`pg_notify`, present only during the subscription cases, because NOTIFY "
            "serialises commits) and, on each notification, keyset queries "
            "`WHERE global_position > $last ORDER BY global_position LIMIT 1000`",
            "catch-up: the same keyset pagination, 1,000 rows per query, binary format",
        ]

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{tail(self.log_path)}")
            try:
                with psycopg.connect(**self.address, user="postgres", dbname="postgres"):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready:\n{tail(self.log_path)}") from None
                time.sleep(0.1)

    def stop_signal(self) -> int:
        return signal.SIGINT  # fast shutdown: SIGTERM waits for every client to leave


class NatsServer(PeerServer):
    name = "nats"
    title = "NATS JetStream"

    def stop_signal(self) -> int:
        return signal.SIGINT  # exits 0 (SIGTERM: 1)

    def start(self) -> None:
        self.port = free_port()
        config = self.root / "nats.conf"
        store = self.root / "jetstream"
        config.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            "max_payload: 1MB\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            "  max_memory_store: 256MB\n"
            "  max_file_store: 64GB\n"
            "}\n"
        )
        self.proc = self._popen(["nats-server", "-c", str(config)])
        wait_for_port(self.port, self.proc, 30, self.log_path)
        self.version = version_of(["nats-server", "--version"])
        probe = self.root / "probe.conf"
        probe.write_text(config.read_text().replace("}\n", "  sync_interval: always\n}\n"))
        accepts_sync = (
            subprocess.run(
                ["nats-server", "-c", str(probe), "-t"], capture_output=True, check=False
            ).returncode
            == 0
        )
        sync_note = (
            "this nats-server accepts `sync_interval: always`, but the suite keeps the "
            "default to measure what users get unless they opt in"
            if accepts_sync
            else "this nats-server (2.9) has no `sync_interval` option (it came in 2.10; "
            "the server rejects it as an unknown field): it cannot be told to fsync per "
            "message"
        )
        self.settings = [
            "JetStream file storage in the run's temporary directory, one stream `EVENTS` "
            "on subjects `ev.>` (each writer publishes to its own subject, `ev.<stream>`), "
            "no limits, one replica",
            "**not equivalent durability**: a publish is acknowledged once the message is "
            "in the stream's block file in the OS page cache; JetStream fsyncs on a "
            "periodic timer, not per message, so acknowledged messages can be lost on a "
            f"power cut or kernel crash. {sync_note}",
            "1-event appends: `js.publish` (waits for the PubAck); 100-event appends: 100 "
            "publishes awaited together (`asyncio.gather`)",
            "subscribers and catch-up: a pull consumer per reader (ephemeral, "
            "`AckPolicy.NONE`), driven like the Go client's `Consume()`: one pull request "
            "of 256 messages outstanding, renewed when half used",
        ]


SYSTEMS: dict[str, type[PeerServer]] = {
    "lethedb": LetheServer,
    "redis": RedisServer,
    "postgres": PostgresServer,
    "nats": NatsServer,
}
