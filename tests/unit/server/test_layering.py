"""The server's layers import only downwards, and only api and ops know gRPC.

docs/ARCHITECTURE.md draws the packages as layers: ops -> api -> engine ->
storage -> crypto, with errors, files and faults at the package root shared
by all; coord (the etcd coordinator) sits beside api, on the gRPC side. This
test reads every module's imports (all of them: top level, inside functions
and under ``if TYPE_CHECKING:``) and fails on an arrow that
points up, or on grpc or the generated protobuf modules below api: the engine
must stay usable without a network (the CLI's offline commands, a future
replication link) and its errors must reach gRPC codes only in api/status.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lethedb_server

PACKAGE = Path(lethedb_server.__file__).resolve().parent

# Higher imports lower (or its own level), never the other way round.
# coord talks gRPC to etcd: it ranks with api, above the engine, which never sees it.
RANK = {"root": 0, "crypto": 1, "storage": 2, "engine": 3, "api": 4, "coord": 4, "ops": 5}
# The entry points (the console script, `python -m lethedb_server`) start the CLI: on top.
ROOT_MODULES_ON_TOP = {"__main__": "ops", "_entry": "ops"}
WITHOUT_GRPC = {"root", "crypto", "storage", "engine"}
# "lethedb" is the SDK: importing it loads grpc and its generated modules (lethedb.v1).
# The wire contract, lethedb_contract, is plain Python and allowed everywhere.
GRPC_MODULES = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "lethedb")


def layer_of(path: Path) -> str:
    """The layer of a module file: its subpackage, or "root" for the package's own modules."""
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) == 1:
        return ROOT_MODULES_ON_TOP.get(relative.stem, "root")
    return relative.parts[0]


def imported_names(source: str) -> Iterator[tuple[int, str]]:
    """Every module an import statement names, with its line (``from a import b`` gives a, a.b)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: use absolute imports"
            assert node.module is not None
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def target_layer(name: str) -> str | None:
    """The layer an imported lethedb_server name belongs to; None outside the server."""
    parts = name.split(".")
    if parts[0] != "lethedb_server":
        return None
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return "root"


def is_grpc(name: str) -> bool:
    return any(name == module or name.startswith(module + ".") for module in GRPC_MODULES)


def violations(layer: str, source: str) -> list[str]:
    """What a module of *layer* with this *source* imports that its layer may not."""
    found = []
    for line, name in imported_names(source):
        if layer in WITHOUT_GRPC and is_grpc(name):
            found.append(f"line {line}: {layer} imports {name} (gRPC stays in api and ops)")
        target = target_layer(name)
        if target is not None and RANK[target] > RANK[layer]:
            found.append(f"line {line}: {layer} imports {name}, a layer above it ({target})")
    return sorted(set(found))


def server_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_known_layer() -> None:
    """A new subpackage must be given its place in the layers before it can be used."""
    unknown = [str(p.relative_to(PACKAGE)) for p in server_modules() if layer_of(p) not in RANK]
    assert unknown == [], f"add these packages to RANK in {__name__}: {unknown}"


@pytest.mark.parametrize("path", server_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    problems = violations(layer_of(path), path.read_text())
    assert problems == [], f"{path.relative_to(PACKAGE)}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("layer", "source"),
    [
        ("engine", "import grpc\n"),
        ("storage", "from google.protobuf import message\n"),
        ("crypto", "from lethedb import v1\n"),
        ("engine", "def f() -> None:\n    from lethedb.v1 import lethedb_pb2\n"),
        ("engine", "import lethedb\n"),
        ("storage", "from lethedb_server.engine.store import Store\n"),
        ("engine", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from lethedb_server.api import status\n"),
        ("api", "from lethedb_server.ops.config import Config\n"),
        ("root", "from lethedb_server.crypto import aead\n"),
        ("engine", "from lethedb_server.coord.election import Election\n"),
        ("storage", "from lethedb_server.coord.etcdpb import rpc_pb2\n"),
    ],
)  # fmt: skip
def test_the_check_sees_a_wrong_arrow(layer: str, source: str) -> None:
    """The checker itself: each of these would break the layering and must be reported."""
    assert violations(layer, source) != []


def test_the_check_allows_arrows_down() -> None:
    source = (
        "import grpc\nfrom lethedb.v1 import lethedb_pb2\n"
        "from lethedb_server.engine.store import Store\nfrom lethedb_server import errors\n"
    )
    assert violations("api", source) == []
    assert violations("storage", "from lethedb_server.crypto import aead\n") == []
    assert violations("engine", "from lethedb_contract import ERASURE_STREAM\n") == []
    assert violations("coord", "import grpc\nfrom lethedb_server import errors\n") == []
    assert violations("ops", "from lethedb_server.coord.election import Election\n") == []


def test_the_cli_configures_grpc_logging_before_anything_imports_grpc() -> None:
    """gRPC reads GRPC_VERBOSITY once, when it is first imported; the CLI sets it
    in main(), so nothing its module imports may load grpc (or the C core's
    own log lines reach an operator's terminal beside ours)."""
    probe = "import sys, lethedb_server.ops.cli; print('grpc' in sys.modules)"
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert answer.stdout.strip() == "False", "importing the CLI module loads grpc"
