"""The subject index is completed in chunks; every reader still sees every event.

Appends write no ``subject_index`` entry: the writer merges the unindexed tail
``(LogMeta.subject_indexed, head]`` in sorted chunks, and readers combine the
index with a scan of that tail. These tests pin the state of the index
(unindexed, partly indexed, fully indexed) with the writer's limits and check
that exports, receipts, erasure and the audit give the same complete answers
in every state, across crashes, backups and stores written before the change.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import lmdb
import pytest

from lethedb_server.engine.appliers import _new_event_ids
from lethedb_server.engine.audit import _dek_versions
from lethedb_server.engine.model import AppendCommand, ExpectedState, ForgetCommand, ProposedEvent
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.engine.writer import WriterLimits
from lethedb_server.faults import ENV_VAR, EXIT_CODE
from lethedb_server.storage import codec
from lethedb_server.storage import log as storage
from tests.conftest import StoreFactory

ALICE, BOB = "subj-alice", "subj-bob"
#: Subjects of the events appended by ``_fill``, in log order ("" = no subject).
PATTERN = [ALICE, BOB, ALICE, "", BOB, ALICE, ALICE, BOB, ALICE, ""]


def _options(chunk: int, idle_s: float = 3600.0, **kwargs: Any) -> StoreOptions:
    """A store whose writer merges every *chunk* events and (by default) never when idle."""
    return StoreOptions(writer=WriterLimits(index_chunk=chunk, index_idle_s=idle_s), **kwargs)


def _fill(store: Store, subjects: list[str] = PATTERN) -> None:
    """One single-event append per subject, so each batch may trigger a merge."""
    for i, subject in enumerate(subjects):
        event = ProposedEvent(b"", "Noted", subject, "text/plain", f"text-{i}".encode(), b"")
        store.writer.append(AppendCommand(f"stream-{i % 3}", (event,)), timeout=30)


def _expected(subject: str, subjects: list[str] = PATTERN) -> list[int]:
    return [i + 1 for i, s in enumerate(subjects) if s == subject]


def _index_entries(store: Store) -> list[bytes]:
    with store.log.lmdb.read() as txn:
        return [bytes(k) for k in txn.cursor(db=store.log.subject_index).iternext(values=False)]


def _all_subject_keys(store: Store) -> list[bytes]:
    """The index the old per-event inserts would have written for the whole log."""
    with store.log.lmdb.read() as txn:
        return sorted(
            codec.subject_position_key(codec.record_subject(v), codec.position_from_key(k))
            for k, v in txn.cursor(db=store.log.events)
        )


def _wait_indexed(store: Store, through: int) -> None:
    """Merges run after the batch's futures are settled: wait for the one expected."""
    deadline = time.monotonic() + 10
    while store.log.meta.subject_indexed < through:
        assert time.monotonic() < deadline, f"the index never reached position {through}"
        time.sleep(0.01)
    assert store.log.meta.subject_indexed == through


@pytest.mark.parametrize(
    ("chunk", "indexed"),
    [(1000, 0), (4, 8), (1, 10)],
    ids=["tail-unindexed", "partly-indexed", "fully-indexed"],
)
def test_export_and_counts_are_complete_and_ordered_in_every_index_state(
    open_store: StoreFactory, chunk: int, indexed: int
):
    store = open_store(_options(chunk))
    _fill(store)
    _wait_indexed(store, indexed)

    for subject in (ALICE, BOB):
        expected = _expected(subject)
        assert store.log.subject_positions(subject, 0, 100) == expected
        assert [e.position for e in store.reader.read_subject(subject, 0, 100)] == expected
        assert store.receipt(subject).event_count == len(expected)


@pytest.mark.parametrize("chunk", [1000, 4, 1])
def test_subject_positions_pages_cross_from_the_index_into_the_tail(
    open_store: StoreFactory, chunk: int
):
    store = open_store(_options(chunk))
    _fill(store)
    _wait_indexed(store, len(PATTERN) // chunk * chunk)

    pages, after = [], 0
    while page := store.log.subject_positions(ALICE, after, 2):
        pages.append(page)
        after = page[-1]

    assert pages == [[1, 3], [6, 7], [9]]


def test_merged_index_holds_exactly_the_entries_per_event_inserts_would_have(
    open_store: StoreFactory,
):
    store = open_store(_options(4))
    _fill(store)
    store.writer.execute(ForgetCommand(BOB, "gdpr-art17", "admin"))  # a subject-less event
    store.close()

    store = open_store(_options(4))

    assert store.log.meta.subject_indexed == store.log.head == 11
    assert _index_entries(store) == _all_subject_keys(store)


def test_a_resting_writer_completes_the_index(open_store: StoreFactory):
    store = open_store(_options(1000, idle_s=0.01))
    _fill(store)

    _wait_indexed(store, store.log.head)

    assert _index_entries(store) == _all_subject_keys(store)
    assert store.log.subject_positions(ALICE, 0, 100) == _expected(ALICE)


def test_a_hot_backup_with_an_unindexed_tail_opens_complete_and_finishes_the_index(
    open_store: StoreFactory, tmp_path: Path, data_dir: Path
):
    store = open_store(_options(4))
    _fill(store)
    _wait_indexed(store, 8)
    store.backup(tmp_path / "copy", include_keys=True)

    # A backup never holds the keyring: open the copy beside the original's.
    options = _options(1000, keyring_path=data_dir / "master.keyring")
    copy = open_store(options, path=tmp_path / "copy")
    assert copy.log.meta.subject_indexed == 8
    assert copy.log.subject_positions(ALICE, 0, 100) == _expected(ALICE)
    assert [e.data for e in copy.reader.read_subject(ALICE, 0, 100)] == [
        f"text-{p - 1}".encode() for p in _expected(ALICE)
    ]
    copy.close()

    reopened = open_store(options, path=tmp_path / "copy")
    assert reopened.log.meta.subject_indexed == reopened.log.head  # closing merged the tail
    assert _index_entries(reopened) == _all_subject_keys(reopened)


_CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lethedb_server.engine.model import AppendCommand, ProposedEvent
    from lethedb_server.engine.store import Store, StoreOptions
    from lethedb_server.engine.writer import WriterLimits

    options = StoreOptions(writer=WriterLimits(index_chunk=4, index_idle_s=3600.0))
    store = Store.open(Path(sys.argv[1]), options)
    for i in range(10):
        event = ProposedEvent(b"", "Noted", "subj-alice", "text/plain", b"x", b"")
        store.writer.append(AppendCommand("s", (event,)), timeout=30)
    """
)


def _crash_in_first_merge(data_dir: Path) -> None:
    """Run ``_CRASHING_WRITER`` on *data_dir*: it dies inside its first merge (events 1..4)."""
    env = {**os.environ, ENV_VAR: "index.merge_before_commit"}
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(data_dir)],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == EXIT_CODE, crashed.stderr


def test_a_crash_inside_a_merge_leaves_the_index_as_it_was_and_nothing_missing(
    open_store: StoreFactory, data_dir: Path
):
    _crash_in_first_merge(data_dir)

    store = open_store(_options(1000))

    # The first merge died before its commit: no entry and no advance survived it.
    assert store.log.meta.subject_indexed == 0
    assert _index_entries(store) == []
    assert store.log.subject_positions("subj-alice", 0, 100) == list(range(1, 5))
    store.close()
    store = open_store(_options(1000))
    assert _index_entries(store) == _all_subject_keys(store)


def test_a_store_written_before_subject_indexed_existed_opens_fully_indexed(
    open_store: StoreFactory, data_dir: Path
):
    store = open_store(_options(1))
    _fill(store)  # with chunk 1 every event is indexed, as the old writer did
    store.close()
    meta = store.log.meta
    old_layout = (meta.format, meta.store_id, meta.last_position, meta.chain_head, 0)
    env = lmdb.open(str(data_dir / "log"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"log", codec.encode(old_layout), db=env.open_db(b"meta", txn=txn))
    env.close()

    store = open_store(_options(1000))

    assert store.log.meta.subject_indexed == store.log.head == len(PATTERN)
    assert store.log.subject_positions(ALICE, 0, 100) == _expected(ALICE)
    assert store.receipt(BOB).event_count == len(_expected(BOB))


def test_forgetting_a_partly_indexed_subject_redacts_its_whole_export(
    open_store: StoreFactory,
):
    store = open_store(_options(4))
    _fill(store)
    _wait_indexed(store, 8)  # ALICE's last event (9) is in the tail

    store.writer.execute(ForgetCommand(ALICE, "gdpr-art17", "admin"))

    exported = store.reader.read_subject(ALICE, 0, 100)
    assert [e.position for e in exported] == _expected(ALICE)
    assert all(e.redacted and e.data == b"" for e in exported)
    assert store.receipt(ALICE).event_count == len(_expected(ALICE))
    assert [e.data for e in store.reader.read_subject(BOB, 0, 100)] == [
        f"text-{p - 1}".encode() for p in _expected(BOB)
    ]


def test_audit_finds_every_dek_version_of_events_only_in_the_tail(open_store: StoreFactory):
    # A use cap of 2 gives ALICE's five events three DEK versions.
    store = open_store(_options(1000, dek_max_uses=2))
    _fill(store)
    assert store.log.meta.subject_indexed == 0

    with store.log.lmdb.read() as txn:
        meta = codec.decode_meta(txn.get(b"log", db=store.log.meta_db))
        versions = _dek_versions(store.log.lmdb.env, txn, meta, ALICE)

    assert versions == {1, 2, 3}


def test_generated_event_ids_are_random_version_4_uuids():
    ids = _new_event_ids(64)

    assert len(set(ids)) == 64
    assert all(uuid.UUID(bytes=i).version == 4 for i in ids)
    assert all(uuid.UUID(bytes=i).variant == uuid.RFC_4122 for i in ids)


def test_a_forget_indexes_the_tail_first_so_its_receipt_scans_only_its_own_batch(
    open_store: StoreFactory,
):
    store = open_store(_options(1000))  # never merges on its own here
    _fill(store)
    assert store.log.meta.subject_indexed == 0

    store.writer.execute(ForgetCommand(ALICE, "gdpr-art17", "admin"))

    # Everything before the forget's own erasure event is indexed.
    assert store.log.meta.subject_indexed == len(PATTERN)
    assert store.receipt(ALICE).event_count == len(_expected(ALICE))


def test_counting_a_subject_s_events_scans_the_tail_once(
    open_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
):
    store = open_store(_options(1000))
    _fill(store)
    scans: list[int] = []
    real = storage.tail_subject_positions

    def counting(*args: Any) -> list[int]:
        scans.append(1)
        return real(*args)

    monkeypatch.setattr(storage, "tail_subject_positions", counting)
    assert store.log.count_subject_events(ALICE) == len(_expected(ALICE))
    assert len(scans) == 1


def test_merging_what_this_writer_wrote_reads_no_record_back(
    open_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
):
    def unreadable(position: int, value: bytes) -> str:
        raise AssertionError(f"the merge read record {position} back")

    monkeypatch.setattr(storage, "_subject_of", unreadable)
    store = open_store(_options(4))
    _fill(store)
    # A rejected append inside a batch must leave no key behind for its positions.
    event = ProposedEvent(b"", "Noted", ALICE, "text/plain", b"late", b"")
    futures = [
        store.writer.submit(AppendCommand("stream-x", (event,))),
        store.writer.submit(
            AppendCommand("stream-0", (event,), expected_state=ExpectedState.NO_STREAM)
        ),
        store.writer.submit(AppendCommand("stream-y", (event, event))),
    ]
    assert [f.exception(timeout=30) is None for f in futures] == [True, False, True]
    store.writer.execute(ForgetCommand(BOB, "gdpr-art17", "admin"))  # a subject-less event
    store.close()  # merges the rest of the tail
    monkeypatch.undo()

    store = open_store(_options(1000))
    assert store.log.meta.subject_indexed == store.log.head == len(PATTERN) + 4
    assert _index_entries(store) == _all_subject_keys(store)


def test_a_reopened_writer_reads_back_only_the_tail_it_did_not_write(
    open_store: StoreFactory, data_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    _crash_in_first_merge(data_dir)
    read_back: list[int] = []
    real = storage._subject_of

    def recording(position: int, value: bytes) -> str:
        read_back.append(position)
        return real(position, value)

    monkeypatch.setattr(storage, "_subject_of", recording)
    store = open_store(_options(4))
    _fill(store)  # positions 5..14, written by this writer
    store.close()

    # The crash came at the first merge, leaving events 1..4 only in the log.
    assert read_back == [1, 2, 3, 4]
    store = open_store(_options(1000))
    assert _index_entries(store) == _all_subject_keys(store)


def test_known_index_keys_cover_one_run_of_positions_and_start_over_at_a_gap():
    known = storage.KnownIndexKeys(first=5, cap=4)
    known.record(5, [b"k5", b"k6"])
    known.record(7, [b"k7"])
    assert known.between(5, 7) == [b"k5", b"k6", b"k7"]
    assert known.between(4, 6) is None  # position 4 is not in the run
    assert known.between(6, 8) is None  # nor is 8

    known.merged_through(5)
    assert known.between(6, 7) == [b"k6", b"k7"]
    known.record(9, [b"k9"])  # 8 is missing: a new run
    assert known.between(7, 7) is None
    assert known.between(9, 9) == [b"k9"]
    known.record(10, [b"k10", b"k11", b"k12", b"k13"])  # over the cap: a new run
    assert known.between(9, 9) is None
    assert known.between(10, 13) == [b"k10", b"k11", b"k12", b"k13"]
