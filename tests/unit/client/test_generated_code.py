"""The committed protobuf and gRPC modules are exactly what the .proto files generate.

Both sets: LetheDB's API (client/lethedb/v1) and the subset of etcd's API the
server's coordinator calls (server/lethedb_server/coord/etcdpb). A proto change
that lands without its regenerated code (or generated code edited by hand)
fails here, with the command that fixes it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
FIX = "run `make proto` and commit the result"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "proto_generate", REPO_ROOT / "proto" / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


GENERATOR = load_generator()


@pytest.fixture(scope="module", params=GENERATOR.TARGETS, ids=lambda target: target.name)
def target(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(scope="module")
def generated(target: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp(f"generated-{target.name}")
    files = GENERATOR.generate(out, target)
    assert files, f"proto/generate.py produced no files for {target.name}"
    return {path.name: path.read_bytes() for path in files}


def committed_files(target: Any) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(target.committed.glob("*_pb2*.py*"))}


def shown(target: Any) -> str:
    return str(target.committed.relative_to(REPO_ROOT))


def test_every_generated_module_is_committed_and_nothing_else(
    target: Any, generated: dict[str, bytes]
):
    committed = committed_files(target)

    missing = sorted(set(generated) - set(committed))
    stale = sorted(set(committed) - set(generated))
    assert not missing, f"generated modules not in {shown(target)}: {missing}; {FIX}"
    assert not stale, f"{shown(target)} has modules no .proto generates: {stale}; {FIX}"


def test_committed_generated_code_is_byte_identical_to_a_fresh_generation(
    target: Any, generated: dict[str, bytes]
):
    committed = committed_files(target)

    differing = sorted(
        name for name, content in generated.items() if committed.get(name) != content
    )
    assert not differing, f"{shown(target)} is stale ({', '.join(differing)}); {FIX}"
