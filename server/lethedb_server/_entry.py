"""The ``lethedb`` console script: the CLI, or one line on what to install.

``pip install lethedb`` installs the SDK alone: this package's code ships in
the same distribution, but its dependencies (LMDB, cryptography, ...) come with
the ``server`` extra. Without them the command says so in one line and exits 2
(a refused command) instead of a traceback. Only a missing server dependency is
caught: any other import failure is a real bug and is raised as such.

Imports nothing but the standard library before the CLI: the CLI configures
gRPC's logging before grpc is first imported, and ``import lethedb`` (the SDK)
would import it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

#: Top-level modules of the ``server`` extra's distributions (pyproject.toml).
SERVER_MODULES: Final = frozenset(
    {"cryptography", "grpc_health", "grpc_reflection", "lmdb", "prometheus_client"}
)
MISSING_SERVER: Final = (
    "lethedb: the server commands need the server extra: pip install 'lethedb[server]'"
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from lethedb_server.ops.cli import main as server_main
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in SERVER_MODULES:
            raise
        print(MISSING_SERVER, file=sys.stderr)
        return 2
    return server_main(argv)


if __name__ == "__main__":
    sys.exit(main())
