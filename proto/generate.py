"""Regenerate the committed protobuf and gRPC modules (``make proto``).

Two sets of .proto files, each compiled into the package that imports it:

* ``proto/lethedb/`` -> ``client/lethedb/v1``: LetheDB's own API, so that the
  SDK and the server import the same modules;
* ``proto/lethedb_server/coord/etcdpb/`` -> ``server/lethedb_server/coord/etcdpb``:
  the subset of etcd's v3 API that the server's coordinator (leader election)
  calls. Only the server needs it, so it is not part of the SDK.

``tests/unit/client/test_generated_code.py`` runs :func:`generate` for each
target into a temporary directory and fails when the committed files differ,
so a proto change cannot land without its generated code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


@dataclass(frozen=True)
class Target:
    """A set of .proto files under proto/ and where their Python modules are committed."""

    name: str
    package: str  # the folder under proto/ (and under the output root) that holds them
    out: Path  # the output root: the generated modules land in out / package

    def proto_files(self) -> list[Path]:
        return sorted((PROTO_ROOT / self.package).rglob("*.proto"))

    @property
    def committed(self) -> Path:
        return self.out / self.package


LETHEDB = Target("lethedb", "lethedb/v1", REPO_ROOT / "client")
ETCD = Target("etcd", "lethedb_server/coord/etcdpb", REPO_ROOT / "server")
TARGETS = (LETHEDB, ETCD)
DEFAULT_OUT = LETHEDB.out


def generate(out_dir: Path = DEFAULT_OUT, target: Target = LETHEDB) -> list[Path]:
    """Compile *target*'s .proto files into *out_dir*; return the files written."""
    files = [str(p.relative_to(PROTO_ROOT)) for p in target.proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--mypy_out={out_dir}",
        f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
        f"--mypy_grpc_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return sorted((out_dir / target.package).glob("*_pb2*.py*"))


if __name__ == "__main__":
    for target in TARGETS:
        out = Path(sys.argv[1]) if len(sys.argv) > 1 else target.out
        for path in generate(out, target):
            shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
            print(f"wrote {shown}")
