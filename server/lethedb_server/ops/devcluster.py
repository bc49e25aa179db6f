"""``make cluster``: etcd and three LetheDB nodes on this machine, to watch a failover.

Everything listens on loopback on fixed ports (etcd on 23790, the nodes on
50061-50063) and keeps its files under one directory (``./lethedb-cluster`` by
default): each node's data directory, its keyring beside it (outside the data
directory, as in production) and its log file. The nodes run with
``--sync-replicas 1`` (a majority of three) and a 3 s lease. It prints the
commands to watch the cluster, kill the leader and start a node again, then
waits; Ctrl-C stops everything (the files stay, so the next run resumes).

Needs the ``etcd`` binary (Debian's ``etcd-server`` package). A development
tool: no TLS, no tokens, nothing but loopback.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ETCD_CLIENT_PORT = 23790
ETCD_PEER_PORT = 23800
NODE_PORTS = (50061, 50062, 50063)
CLUSTER = "dev"
LEASE_TTL_S = 3
START_TIMEOUT_S = 30.0


@dataclass
class Member:
    """One process of the development cluster."""

    name: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log: IO[bytes] = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


def etcd_member(root: Path, etcd: str) -> Member:
    client = f"http://127.0.0.1:{ETCD_CLIENT_PORT}"
    peer = f"http://127.0.0.1:{ETCD_PEER_PORT}"
    command = [
        etcd,
        "--name", "dev",
        "--data-dir", str(root / "etcd"),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"dev={peer}",
    ]  # fmt: skip
    return Member("etcd", command, root / "etcd.log")


def node_member(root: Path, index: int) -> Member:
    name = f"node{index + 1}"
    home = root / name
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    address = f"127.0.0.1:{NODE_PORTS[index]}"
    command = [
        sys.executable, "-m", "lethedb_server", "serve",
        "--data", str(home / "data"),
        "--keyring", str(home / "master.keyring"),
        "--listen", address,
        "--advertise", address,
        "--node-id", name,
        "--cluster", CLUSTER,
        "--etcd", f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
        "--lease-ttl", str(LEASE_TTL_S),
        "--sync-replicas", "1",
    ]  # fmt: skip
    return Member(name, command, home / "server.log")


def wait_for_etcd() -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"http://127.0.0.1:{ETCD_CLIENT_PORT}/health"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if b"true" in answer.read():
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"etcd did not answer on {url} within {START_TIMEOUT_S:.0f}s")


def instructions(root: Path, etcd: Member, nodes: list[Member]) -> str:
    servers = ",".join(f"127.0.0.1:{port}" for port in NODE_PORTS)
    lines = [
        f"etcd          http://127.0.0.1:{ETCD_CLIENT_PORT}  pid {etcd.pid}  log {etcd.log_path}",
        *(
            f"{n.name:<13} 127.0.0.1:{port}  pid {n.pid}  log {n.log_path}"
            for n, port in zip(nodes, NODE_PORTS, strict=True)
        ),
        "",
        f"Files under {root}. In another shell (with the virtual environment active):",
        "",
        "  # who leads, in which term, and how far each node is",
        f"  lethedb cluster status --server 127.0.0.1:{NODE_PORTS[0]}",
        "  # append through a client that knows every node (it finds the leader)",
        f"  lethedb append --server lethedb://{servers} orders OrderPlaced '{{\"n\": 1}}'",
        "  # kill the leader (its pid is above), then ask the others who leads now:",
        "  kill -9 PID",
        f"  lethedb cluster status --server 127.0.0.1:{NODE_PORTS[1]}",
        "  # start a killed node again: it rejoins as a follower",
    ]
    lines += [f"  {shlex.join(n.command)} 2>>{n.log_path} &" for n in nodes]
    lines += ["", "Ctrl-C stops etcd and every node this command started."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("lethedb-cluster"))
    args = parser.parse_args(argv)
    etcd_binary = shutil.which("etcd")
    if etcd_binary is None:
        print("make cluster needs etcd: apt-get install etcd-server", file=sys.stderr)
        return 2
    root: Path = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    etcd = etcd_member(root, etcd_binary)
    nodes = [node_member(root, index) for index in range(len(NODE_PORTS))]
    stop = False

    def interrupted(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        etcd.start()
        wait_for_etcd()
        for node in nodes:
            node.start()
        print(instructions(root, etcd, nodes), flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        for member in [*nodes, etcd]:
            member.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
