"""Kill the one-time upgrade of unkeyed idempotency entries half-way; start again; check.

A store written before keyed fingerprints holds unkeyed ones; the first
start-up re-keys them in chunks of one transaction each. A process killed
between two chunks (the ``idempotency.upgrade_chunk_committed`` fault point,
like SIGKILL) leaves upgraded and old entries side by side; the next start
must finish the job: every live subject's retry still deduplicates, the
forgotten subject's entries are gone, and no unkeyed entry is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lmdb
import msgspec
import pytest

from lethedb_server.engine.idempotency import FORMAT_KEY
from lethedb_server.engine.model import AppendCommand, ForgetCommand, ProposedEvent
from lethedb_server.engine.store import Store
from lethedb_server.errors import SubjectForgotten
from lethedb_server.faults import ENV_VAR, EXIT_CODE
from lethedb_server.storage import codec

#: More than one upgrade chunk (2,048 entries).
ENTRIES = 2_300
LIVE, GONE = "subj-live", "subj-gone"


def _command(i: int) -> AppendCommand:
    subject = GONE if i % 10 == 0 else LIVE
    event = ProposedEvent(b"", "Noted", subject, "text/plain", f"secret-{i}".encode(), b"")
    return AppendCommand(f"stream-{i % 7}", (event,), idempotency_key=f"key-{i:05d}")


def _formats(store: Store) -> list[int]:
    with store.log.lmdb.read() as txn:
        return [
            codec.decode_idempotency(v).digest_format
            for v in txn.cursor(db=store.log.idempotency).iternext(keys=False)
        ]


def _formats_on_disk(data: Path) -> list[int]:
    """The digest formats in the log, read without opening (and so upgrading) the store."""
    env = lmdb.open(str(data / "log"), readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin() as txn:
            table = env.open_db(b"idempotency", txn=txn)
            return [
                codec.decode_idempotency(v).digest_format
                for v in txn.cursor(db=table).iternext(keys=False)
            ]
    finally:
        env.close()


def _old_store(data: Path) -> list[AppendCommand]:
    """A store whose entries are as versions before keyed fingerprints wrote them."""
    commands = [_command(i) for i in range(ENTRIES)]
    with Store.open(data) as store:
        futures = [store.writer.submit(c) for c in commands]
        for future in futures:
            future.result(timeout=60)
        with store.log.lmdb.begin_write() as txn:
            for command in commands:
                key = command.idempotency_key.encode()
                entry = codec.decode_idempotency(txn.get(key, db=store.log.idempotency))
                old = (command.request_hash(), entry.result, entry.created_at, entry.commit)
                txn.put(key, msgspec.msgpack.encode(old), db=store.log.idempotency)
            txn.delete(FORMAT_KEY, db=store.log.meta_db)
        store.writer.execute(ForgetCommand(GONE, "gdpr-art17", "admin"))
    return commands


def test_an_upgrade_killed_between_chunks_is_finished_at_the_next_start(tmp_path):
    data = tmp_path / "data"
    commands = _old_store(data)

    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pathlib, sys\nfrom lethedb_server.engine.store import Store\n"
            "Store.open(pathlib.Path(sys.argv[1]))",
            str(data),
        ],
        env={**os.environ, ENV_VAR: "idempotency.upgrade_chunk_committed"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert crashed.returncode == EXIT_CODE, crashed.stderr
    assert "fault point idempotency.upgrade_chunk_committed reached" in crashed.stderr
    # The kill landed half-way: the first chunk is upgraded, the rest is not.
    assert {codec.KEYED_DIGEST, codec.UNKEYED_DIGEST} <= set(_formats_on_disk(data))

    with Store.open(data) as store:
        assert set(_formats(store)) == {codec.KEYED_DIGEST}
        assert len(_formats(store)) == sum(1 for i in range(ENTRIES) if i % 10)
        for command in commands[1::97]:  # a sample across both chunks
            if command.events[0].subject_id == LIVE:
                assert store.writer.append(command).deduplicated
            else:
                with pytest.raises(SubjectForgotten):
                    store.writer.append(command)
