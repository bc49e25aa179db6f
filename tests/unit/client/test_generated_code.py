"""The committed protobuf and gRPC modules are exactly what the .proto files generate.

A proto change that lands without its regenerated code (or generated code
edited by hand) fails here, with the command that fixes it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
COMMITTED = REPO_ROOT / "client" / "lethedb" / "v1"
FIX = "run `make proto` and commit the result"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "proto_generate", REPO_ROOT / "proto" / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("generated")
    files = load_generator().generate(out)
    assert files, "proto/generate.py produced no files"
    return {path.name: path.read_bytes() for path in files}


def committed_files() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(COMMITTED.glob("*_pb2*.py*"))}


def test_every_generated_module_is_committed_and_nothing_else(generated: dict[str, bytes]):
    committed = committed_files()

    missing = sorted(set(generated) - set(committed))
    stale = sorted(set(committed) - set(generated))
    assert not missing, f"generated modules not in client/lethedb/v1: {missing}; {FIX}"
    assert not stale, f"client/lethedb/v1 has modules no .proto generates: {stale}; {FIX}"


def test_committed_generated_code_is_byte_identical_to_a_fresh_generation(
    generated: dict[str, bytes],
):
    committed = committed_files()

    differing = sorted(
        name for name, content in generated.items() if committed.get(name) != content
    )
    assert not differing, f"client/lethedb/v1 is stale ({', '.join(differing)}); {FIX}"
