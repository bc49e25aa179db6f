"""A child process for tests/faults/test_corruption.py: runs checks on damaged files.

Damaged LMDB files can make LMDB abort (an assertion) or the process die of
SIGBUS, so nothing that may touch one runs in the test process. Starting a
fresh interpreter per check would cost more than the check, so this process
serves many: one JSON request per stdin line, one JSON answer per stdout
line. If it dies, the test sees the end of its stdout, counts the request it
was serving as a crash, and starts another.

Requests:

* ``{"verify": DATA_DIR}``: ``lethedb verify --data DATA_DIR`` through the CLI's
  own entry point; answers ``{"rc": ..., "out": ..., "err": ...}``.
* ``{"dump": LOG_DIR}``: every record of every named table of the log, read
  through LMDB (read-only); answers ``{"tables": {name: digest}}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import lmdb

from lethedb_server.ops import cli
from lethedb_server.storage.log import LOG_DBS


def verify(data_dir: str) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(["verify", "--data", data_dir])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:  # a traceback reaching the user: the test fails on it
            rc, err = 99, io.StringIO(f"Traceback: {type(exc).__name__}: {exc}")
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def table_digests(log_dir: str | Path) -> dict[str, str]:
    """A digest of each named table's records in key order: equal digests, equal records."""
    env = lmdb.open(str(log_dir), readonly=True, lock=False, max_dbs=len(LOG_DBS) + 4)
    try:
        digests: dict[str, str] = {}
        for name in LOG_DBS:
            db = env.open_db(name.encode(), create=False)
            h = hashlib.blake2b(digest_size=16)
            with env.begin(db=db) as txn:
                for key, value in txn.cursor():
                    h.update(len(key).to_bytes(4, "big") + key)
                    h.update(len(value).to_bytes(4, "big") + value)
            digests[name] = h.hexdigest()
        return digests
    finally:
        env.close()


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "verify" in request:
            answer: dict[str, object] = verify(request["verify"])
        else:
            try:
                answer = {"tables": table_digests(request["dump"])}
            except lmdb.Error as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
