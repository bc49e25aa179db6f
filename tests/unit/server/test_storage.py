"""The storage layer as a whole: a real data directory, real LMDB files, real fsync.

Each test drives a :class:`Store` through the writer and the reader the way the
service does, and where the behaviour concerns the bytes on disk, it inspects
or damages those bytes directly.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest

from lethedb_server.crypto.keyring import FileKeyring
from lethedb_server.engine.model import (
    AppendCommand,
    ExpectedState,
    ForgetCommand,
    ProposedEvent,
    StoredEvent,
)
from lethedb_server.engine.reader import EventReader
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.engine.writer import Writer, WriterLimits
from lethedb_server.errors import (
    DataDirLocked,
    DataLoss,
    IdempotencyConflict,
    StorageFull,
    StreamNotFound,
    SubjectForgotten,
    WrongExpectedVersion,
)
from lethedb_server.storage import codec
from lethedb_server.storage.codec import AppendResult, Tombstone
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.log import LogStore

StoreFactory = Callable[..., Store]

ANY = ExpectedState.ANY
NO_STREAM = ExpectedState.NO_STREAM
STREAM_EXISTS = ExpectedState.STREAM_EXISTS
EXACT = ExpectedState.EXACT


# -- helpers ---------------------------------------------------------------------


def event(
    data: bytes = b"{}",
    *,
    subject: str = "subject-1",
    event_type: str = "Happened",
    metadata: bytes = b"",
    event_id: bytes = b"",
) -> ProposedEvent:
    return ProposedEvent(event_id, event_type, subject, "application/json", data, metadata)


def command(
    stream: str,
    *events: ProposedEvent,
    expected: ExpectedState = ANY,
    version: int = 0,
    key: str = "",
) -> AppendCommand:
    return AppendCommand(stream, events or (event(),), expected, version, key)


def append(
    store: Store,
    stream: str,
    *events: ProposedEvent,
    expected: ExpectedState = ANY,
    version: int = 0,
    key: str = "",
) -> AppendResult:
    cmd = command(stream, *events, expected=expected, version=version, key=key)
    return store.writer.append(cmd, timeout=30)


def read_everything(store: Store) -> list[StoredEvent]:
    return store.reader.read_all(1, backwards=False, limit=1_000_000)


def read_stream(
    store: Store, stream: str, start: int = 0, *, backwards: bool = False, limit: int = 1_000_000
) -> list[StoredEvent]:
    return store.reader.read_stream(stream, start, backwards=backwards, limit=limit)


def raw_records(store: Store) -> list[tuple[int, bytes]]:
    return store.log.read_all_page(1, backwards=False, limit=1_000_000)


def first_broken_link(store: Store) -> int | None:
    """Walk the log from genesis recomputing every chain hash, as ``lethedb verify`` does.

    Returns the first position whose stored hash does not match the recomputed
    one, or None when the whole chain verifies and ends at the log's chain head.
    """
    previous = codec.GENESIS_HASH
    expected_position = 1
    for position, value in raw_records(store):
        assert position == expected_position, f"gap in the log before position {position}"
        body, stored_hash = codec.split_record(value)
        if codec.chain_hash(previous, bytes(body)) != stored_hash:
            return position
        previous = stored_hash
        expected_position += 1
    assert previous == store.log.meta.chain_head
    return None


def rewrite_record(store: Store, position: int, value: bytes) -> None:
    """Overwrite one stored event behind the writer's back (as an attacker or bit rot would)."""
    with store.log.lmdb.begin_write() as txn:
        assert txn.replace(codec.position_key(position), value, db=store.log.events) is not None


@contextmanager
def writer_parked(store: Store) -> Iterator[None]:
    """Hold the writer thread after a commit, so that commands submitted meanwhile
    queue up and are then taken as one batch."""
    release = threading.Event()
    parked = threading.Event()

    def park(head: int) -> None:
        if not release.is_set():
            parked.set()
            release.wait(timeout=30)

    store.writer.add_head_listener(park)
    append(store, "parking", event())
    assert parked.wait(timeout=30)
    try:
        yield
    finally:
        release.set()


def outcome(future: Future[AppendResult]) -> AppendResult | BaseException:
    exception = future.exception(timeout=30)
    return exception if exception is not None else future.result()


# -- append and read ---------------------------------------------------------------


def test_appended_event_reads_back_with_its_data_and_clear_fields(store: Store):
    event_id = uuid.UUID(int=7).bytes
    append(
        store,
        "order-1",
        event(b'{"total": 42}', subject="customer-9", metadata=b'{"trace": 1}', event_id=event_id),
    )

    [stored] = read_everything(store)

    assert stored.position == 1
    assert stored.stream_id == "order-1"
    assert stored.stream_version == 0
    assert stored.event_id == event_id
    assert stored.event_type == "Happened"
    assert stored.subject_id == "customer-9"
    assert stored.content_type == "application/json"
    assert stored.data == b'{"total": 42}'
    assert stored.metadata == b'{"trace": 1}'
    assert not stored.redacted
    assert read_stream(store, "order-1") == [stored]


def test_event_without_an_id_gets_a_generated_uuid(store: Store):
    append(store, "s", event(event_id=b""))

    [stored] = read_everything(store)

    assert len(stored.event_id) == 16
    assert uuid.UUID(bytes=stored.event_id).version == 4


def test_subjectless_event_is_stored_and_read_back(store: Store):
    append(store, "settings", event(b"theme=dark", subject=""))

    [stored] = read_everything(store)

    assert stored.subject_id == ""
    assert stored.data == b"theme=dark"


def test_global_positions_start_at_one_and_are_contiguous(store: Store):
    for i in range(5):
        append(store, f"stream-{i % 3}", *[event(bytes([i, j])) for j in range(i % 2 + 1)])

    positions = [e.position for e in read_everything(store)]

    assert positions == list(range(1, len(positions) + 1))
    assert store.log.head == len(positions) == 7


def test_stream_versions_start_at_zero_and_are_contiguous(store: Store):
    for i in range(6):
        append(store, "a" if i % 2 else "b", event(), event())

    for stream in ("a", "b"):
        assert [e.stream_version for e in read_stream(store, stream)] == list(range(6))
        assert store.log.last_version(stream) == 5


def test_append_result_names_the_positions_and_versions_written(store: Store):
    append(store, "other", event())
    append(store, "s", event())

    result = append(store, "s", event(), event(), event())

    assert (result.first_position, result.last_position) == (3, 5)
    assert (result.first_version, result.last_version) == (1, 3)
    assert not result.deduplicated


def test_multi_event_append_is_contiguous_in_the_log_even_in_a_shared_batch(store: Store):
    with writer_parked(store):
        futures = [
            store.writer.submit(command(f"s{i}", *[event(bytes([i, j])) for j in range(4)]))
            for i in range(5)
        ]
    results = [f.result(timeout=30) for f in futures]

    for i, result in enumerate(results):
        assert result.last_position - result.first_position == 3
        positions = [e.position for e in read_stream(store, f"s{i}")]
        assert positions == list(range(result.first_position, result.last_position + 1))


def test_multi_event_append_is_all_or_nothing(store: Store):
    append(store, "s", event())
    forget(store, "erased-subject")

    with pytest.raises(SubjectForgotten):
        append(store, "s", event(b"1"), event(b"2", subject="erased-subject"), event(b"3"))

    assert store.log.head == 1
    assert [e.data for e in read_stream(store, "s")] == [b"{}"]


# -- read_stream and read_all --------------------------------------------------------


@pytest.fixture
def ten_versions(store: Store) -> Store:
    """Stream ``order-1`` with versions 0..9, interleaved with ``order-10`` (whose id
    it prefixes) and ``a`` (which sorts before both)."""
    for version in range(10):
        append(store, "order-1", event(f"v{version}".encode()))
        append(store, "order-10", event(b"not mine"))
        append(store, "a", event(b"not mine either"))
    return store


def versions(events: list[StoredEvent]) -> list[int]:
    return [e.stream_version for e in events]


def test_read_stream_forwards_returns_every_version_in_order(ten_versions: Store):
    events = read_stream(ten_versions, "order-1")

    assert versions(events) == list(range(10))
    assert [e.data for e in events] == [f"v{v}".encode() for v in range(10)]
    assert {e.stream_id for e in events} == {"order-1"}


@pytest.mark.parametrize(
    ("start", "backwards", "limit", "expected"),
    [
        pytest.param(4, False, 3, [4, 5, 6], id="forwards-from-version-with-limit"),
        pytest.param(8, False, 100, [8, 9], id="forwards-to-the-end"),
        pytest.param(10, False, 100, [], id="forwards-past-the-end"),
        pytest.param(9, True, 100, list(range(9, -1, -1)), id="backwards-from-the-last"),
        pytest.param(5, True, 2, [5, 4], id="backwards-from-version-with-limit"),
        pytest.param(1000, True, 3, [9, 8, 7], id="backwards-from-past-the-end"),
        pytest.param(0, True, 100, [0], id="backwards-from-the-first"),
    ],
)
def test_read_stream_pages(
    ten_versions: Store, start: int, backwards: bool, limit: int, expected: list[int]
):
    events = read_stream(ten_versions, "order-1", start, backwards=backwards, limit=limit)

    assert versions(events) == expected


@pytest.mark.parametrize("backwards", [False, True])
def test_read_stream_never_returns_events_of_a_stream_whose_id_it_prefixes(
    ten_versions: Store, backwards: bool
):
    start = 1000 if backwards else 0

    assert {
        e.stream_id for e in read_stream(ten_versions, "order-1", start, backwards=backwards)
    } == {"order-1"}
    assert {
        e.stream_id for e in read_stream(ten_versions, "order-10", start, backwards=backwards)
    } == {"order-10"}


def test_read_stream_of_a_missing_stream_raises_stream_not_found(store: Store):
    append(store, "exists", event())

    with pytest.raises(StreamNotFound, match="'missing' does not exist"):
        read_stream(store, "missing")


@pytest.mark.parametrize(
    ("start", "backwards", "limit", "expected"),
    [
        pytest.param(1, False, 1000, list(range(1, 31)), id="everything"),
        pytest.param(0, False, 2, [1, 2], id="forwards-from-zero-starts-at-one"),
        pytest.param(25, False, 1000, list(range(25, 31)), id="forwards-from-position"),
        pytest.param(31, False, 1000, [], id="forwards-past-the-head"),
        pytest.param(30, True, 3, [30, 29, 28], id="backwards-from-the-head"),
        pytest.param(1000, True, 2, [30, 29], id="backwards-from-past-the-head"),
        pytest.param(3, True, 1000, [3, 2, 1], id="backwards-from-position"),
        pytest.param(0, True, 1000, [], id="backwards-from-zero"),
    ],
)
def test_read_all_pages(
    ten_versions: Store, start: int, backwards: bool, limit: int, expected: list[int]
):
    events = ten_versions.reader.read_all(start, backwards=backwards, limit=limit)

    assert [e.position for e in events] == expected


# -- expected versions and nested transactions ------------------------------------


@pytest.mark.parametrize(
    ("expected", "version", "accepted"),
    [
        (ANY, 0, True),
        (STREAM_EXISTS, 0, True),
        (EXACT, 1, True),
        (NO_STREAM, 0, False),
        (EXACT, 0, False),
        (EXACT, 2, False),
    ],
)
def test_expected_version_against_an_existing_stream_at_version_one(
    store: Store, expected: ExpectedState, version: int, accepted: bool
):
    append(store, "s", event(), event())

    if accepted:
        append(store, "s", event(), expected=expected, version=version)
        assert store.log.last_version("s") == 2
    else:
        with pytest.raises(WrongExpectedVersion, match="found version 1") as raised:
            append(store, "s", event(), expected=expected, version=version)
        assert raised.value.actual_version == 1
        assert store.log.last_version("s") == 1
        assert store.log.head == 2


@pytest.mark.parametrize(
    ("expected", "accepted"),
    [(ANY, True), (NO_STREAM, True), (STREAM_EXISTS, False), (EXACT, False)],
)
def test_expected_version_against_a_missing_stream(
    store: Store, expected: ExpectedState, accepted: bool
):
    if accepted:
        append(store, "new", event(), expected=expected)
        assert store.log.last_version("new") == 0
    else:
        with pytest.raises(WrongExpectedVersion, match="found no stream"):
            append(store, "new", event(), expected=expected)
        assert store.log.last_version("new") is None
        assert store.log.head == 0


def test_rejected_command_in_a_batch_leaves_its_neighbours_committed(store: Store):
    append(store, "s1", event())
    with writer_parked(store):
        batches_before = store.writer.batches
        futures = [
            store.writer.submit(command("s1", event(b"a"), expected=EXACT, version=0)),
            store.writer.submit(command("s2", event(b"b"), event(b"b"), expected=EXACT, version=5)),
            store.writer.submit(command("s3", event(b"c"), expected=NO_STREAM)),
            # Sees the first command's write: nested transactions build on each other.
            store.writer.submit(command("s1", event(b"d"), expected=EXACT, version=1)),
        ]
    outcomes = [outcome(f) for f in futures]

    assert store.writer.batches == batches_before + 1, "the four commands shared one batch"
    assert isinstance(outcomes[1], WrongExpectedVersion)
    committed = [o for i, o in enumerate(outcomes) if i != 1]
    assert all(isinstance(o, AppendResult) for o in committed)
    assert [e.data for e in read_stream(store, "s1")] == [b"{}", b"a", b"d"]
    assert [e.data for e in read_stream(store, "s3")] == [b"c"]
    assert store.log.last_version("s2") is None
    positions = [e.position for e in read_everything(store)]
    assert positions == list(range(1, store.log.head + 1))
    assert first_broken_link(store) is None


def test_concurrent_appends_expecting_the_same_version_let_exactly_one_win(store: Store):
    append(store, "account", event())
    with writer_parked(store):
        futures = [
            store.writer.submit(command("account", event(bytes([i])), expected=EXACT, version=0))
            for i in range(4)
        ]
    outcomes = [outcome(f) for f in futures]

    assert isinstance(outcomes[0], AppendResult)
    assert all(isinstance(o, WrongExpectedVersion) for o in outcomes[1:])
    assert [e.data for e in read_stream(store, "account")] == [b"{}", b"\x00"]


# -- the hash chain and tampering ---------------------------------------------------------


def test_chain_hash_over_the_whole_log_verifies(store: Store):
    for i in range(12):
        append(
            store, f"s{i % 4}", *[event(bytes([i, j]), subject=f"p{j}") for j in range(i % 3 + 1)]
        )

    assert first_broken_link(store) is None


def test_flipped_ciphertext_byte_on_disk_is_data_loss_at_its_position(
    open_store: StoreFactory, data_dir: Path
):
    store = open_store()
    for i in range(5):
        append(store, "s", event(f"payload number {i}".encode() * 4))
    victim = 3
    ciphertext = codec.decode_record(dict(raw_records(store))[victim]).ciphertext
    store.close()

    data_file = data_dir / "log" / "data.mdb"
    content = bytearray(data_file.read_bytes())
    # Copy-on-write leaves older copies of the page in the file; damage them all.
    offset = content.find(ciphertext)
    assert offset >= 0
    while offset >= 0:
        content[offset + len(ciphertext) // 2] ^= 0x01
        offset = content.find(ciphertext, offset + 1)
    data_file.write_bytes(bytes(content))

    store = open_store()
    with pytest.raises(DataLoss, match=f"position {victim} fails its authentication check"):
        read_everything(store)
    with pytest.raises(DataLoss, match=f"position {victim}"):
        read_stream(store, "s")
    assert first_broken_link(store) == victim
    untouched = store.reader.read_all(1, backwards=False, limit=victim - 1)
    assert [e.position for e in untouched] == [1, 2]


def test_undecodable_record_is_data_loss_at_its_position(store: Store):
    append(store, "s", event())
    append(store, "s", event())
    rewrite_record(store, 2, b"\xc1" + bytes(codec.HASH_SIZE))

    with pytest.raises(DataLoss, match="position 2 cannot be decoded"):
        read_everything(store)


@pytest.mark.parametrize("reseal_chain", [False, True], ids=["chain-broken", "chain-resealed"])
def test_ciphertext_moved_to_another_record_fails_to_decrypt(store: Store, reseal_chain: bool):
    # Same stream, same subject, same DEK version: only the slot differs.
    append(store, "s", event(b"secret of record one"))
    append(store, "s", event(b"secret of record two"))
    records = dict(raw_records(store))
    source = codec.decode_record(records[1])
    target = codec.decode_record(records[2])
    assert source.dek_version == target.dek_version

    moved = codec.RecordBody(
        **{
            **{f: getattr(target, f) for f in target.__struct_fields__},
            "nonce": source.nonce,
            "ciphertext": source.ciphertext,
        }
    )
    if reseal_chain:
        _, previous_hash = codec.split_record(records[1])
        value, _ = codec.seal_record(previous_hash, moved)
    else:
        value = codec.encode(moved) + codec.split_record(records[2])[1]
    rewrite_record(store, 2, value)

    with pytest.raises(DataLoss, match="position 2 fails its authentication check"):
        store.reader.read_all(2, backwards=False, limit=1)
    assert store.reader.read_all(1, backwards=False, limit=1)[0].data == b"secret of record one"


# -- growth, keys, restart, locking ----------------------------------------------------------


def test_log_map_grows_when_full_and_everything_stays_readable(open_store: StoreFactory):
    small = 1 << 20
    store = open_store(StoreOptions(log_map_size=small))
    chunk = 128 << 10
    payloads = [bytes([i]) * chunk for i in range(40)]  # 5 MiB in all

    # One command bigger than the whole initial map, then many smaller ones.
    append(store, "big", *[event(p) for p in payloads[:16]])
    for i in range(16, 40, 2):
        append(store, "big", event(payloads[i]), event(payloads[i + 1]))

    assert store.log.lmdb.map_size() > small
    assert [e.data for e in read_stream(store, "big")] == payloads
    assert [e.position for e in read_everything(store)] == list(range(1, 41))
    assert first_broken_link(store) is None


@contextmanager
def components(data_dir: Path, *, key_map_size: int, key_max_map_size: int) -> Iterator[Writer]:
    """The store's parts wired by hand, to give the key store a tiny map."""
    provider, _ = FileKeyring.open_or_create(data_dir / "master.keyring")
    log_store = LogStore(data_dir / "log")
    keys = KeyStore(
        data_dir / "keys", provider, map_size=key_map_size, max_map_size=key_max_map_size
    )
    writer = Writer(log_store, keys)
    writer.start()
    try:
        yield writer
    finally:
        writer.stop()
        log_store.close()
        keys.close()


def events_readable_after_restart(data_dir: Path) -> list[bytes]:
    """Every event's data, read with a freshly opened key store: nothing cached in memory."""
    provider = FileKeyring(data_dir / "master.keyring")
    log_store = LogStore(data_dir / "log")
    keys = KeyStore(data_dir / "keys", provider)
    try:
        reader = EventReader(log_store, keys)
        return [e.data for e in reader.read_all(1, backwards=False, limit=1_000_000)]
    finally:
        log_store.close()
        keys.close()


def new_subjects_command(batch: int) -> AppendCommand:
    return command(
        "people",
        *[event(f"{batch}-{i}".encode(), subject=f"person-{batch}-{i}") for i in range(10)],
    )


def test_full_key_store_grows_and_every_event_stays_decryptable(data_dir: Path):
    small = 64 << 10
    with components(data_dir, key_map_size=small, key_max_map_size=1 << 30) as writer:
        for batch in range(100):  # 1000 subjects, each with its own DEK
            writer.append(new_subjects_command(batch), timeout=30)
        assert writer.keys.lmdb.map_size() > small

    assert len(events_readable_after_restart(data_dir)) == 1000


def test_key_store_at_its_map_ceiling_refuses_appends_without_losing_data(data_dir: Path):
    small = 64 << 10
    with components(data_dir, key_map_size=small, key_max_map_size=small) as writer:
        refusal, refused_batch = None, 0
        for refused_batch in range(100):
            try:
                writer.append(new_subjects_command(refused_batch), timeout=30)
            except StorageFull as exc:
                refusal = exc
                break
        assert refusal is not None, "a 64 KiB key store cannot hold 1000 keys"
        assert "keys reached its maximum map size" in str(refusal)
        head = writer.log.head
        # A retry of the refused append (as the SDK makes) must not find the keys
        # planned for it in memory and use them: they were never saved.
        for _ in range(3):
            with pytest.raises(StorageFull):
                writer.append(new_subjects_command(refused_batch), timeout=30)
        assert writer.log.head == head
        assert writer.log.lmdb.map_size() == 64 << 20, "the log's map was not the one to grow"

    assert len(events_readable_after_restart(data_dir)) == head


def dek_versions_used(store: Store, subject: str) -> list[int]:
    return [
        body.dek_version
        for body in (codec.decode_record(value) for _, value in raw_records(store))
        if body.subject_id == subject
    ]


def test_dek_rolls_to_a_new_version_at_its_use_cap_and_old_events_stay_readable(
    open_store: StoreFactory,
):
    store = open_store(StoreOptions(dek_max_uses=3))
    append(store, "s", event(b"0", subject="alice"))
    append(store, "s", event(b"1", subject="alice"), event(b"2", subject="alice"))
    append(store, "s", *[event(str(i).encode(), subject="alice") for i in range(3, 8)])

    used = dek_versions_used(store, "alice")
    assert store.keys.versions_of("alice") == [1, 2, 3]
    assert used == [1, 1, 1, 2, 2, 2, 3, 3]
    assert [e.data for e in read_stream(store, "s")] == [str(i).encode() for i in range(8)]


def test_subjects_interleaved_in_one_append_each_roll_their_own_dek_versions(
    open_store: StoreFactory,
):
    store = open_store(StoreOptions(dek_max_uses=2))
    subjects = ["alice", "bob", "alice", "alice", "bob", "alice", "bob"]
    append(store, "s", *[event(str(i).encode(), subject=s) for i, s in enumerate(subjects)])

    assert dek_versions_used(store, "alice") == [1, 1, 2, 2]
    assert dek_versions_used(store, "bob") == [1, 1, 2]
    assert [e.data for e in read_stream(store, "s")] == [str(i).encode() for i in range(7)]


def test_dek_use_cap_holds_across_a_restart(open_store: StoreFactory):
    options = StoreOptions(dek_max_uses=3)
    store = open_store(options)
    append(store, "s", event(b"before", subject="alice"))
    store.close()

    store = open_store(options)
    for i in range(4):
        append(store, "s", event(f"after {i}".encode(), subject="alice"))

    used = dek_versions_used(store, "alice")
    assert max(used.count(v) for v in set(used)) <= 3
    assert len(store.keys.versions_of("alice")) > 1
    assert read_stream(store, "s")[0].data == b"before"


def test_reopened_store_keeps_head_chain_streams_and_idempotency(open_store: StoreFactory):
    store = open_store()
    append(store, "a", event(b"1"), event(b"2"), key="k-1")
    append(store, "b", event(b"3", subject="bob"))
    retried = command("c", event(b"4", event_id=uuid.UUID(int=4).bytes), key="k-2")
    first_result = store.writer.append(retried)
    before = read_everything(store)
    meta_before = store.log.meta
    store.close()

    store = open_store()

    assert store.log.head == 4
    # Closing completed the subject index; nothing else in the meta moved.
    assert store.log.meta == msgspec.structs.replace(meta_before, subject_indexed=4)
    assert read_everything(store) == before
    assert store.log.last_version("a") == 1
    assert [e.data for e in read_stream(store, "b")] == [b"3"]
    deduplicated = store.writer.append(retried)
    assert deduplicated.deduplicated
    assert deduplicated.first_position == first_result.first_position
    assert store.log.head == 4
    append(store, "a", event(b"5"), expected=EXACT, version=1)
    assert store.log.head == 5
    assert first_broken_link(store) is None


def test_second_open_of_an_open_data_directory_is_refused(store: Store, data_dir: Path):
    with pytest.raises(DataDirLocked) as refused:
        Store.open(data_dir)

    message = str(refused.value)
    assert str(data_dir) in message
    assert "in use by another LetheDB process" in message
    assert f"pid {os.getpid()}" in message
    # The refused attempt touched nothing: the first store still works.
    append(store, "s", event())
    assert store.log.head == 1


def test_data_directory_can_be_opened_again_after_close(open_store: StoreFactory):
    open_store().close()

    store = open_store()

    append(store, "s", event())
    assert store.log.head == 1


# -- idempotency -----------------------------------------------------------------------------


def test_retry_with_same_idempotency_key_writes_nothing(store: Store):
    retried = command("s", event(b"once", event_id=uuid.UUID(int=1).bytes), key="k")
    first = store.writer.append(retried)

    second = store.writer.append(retried)

    assert second.deduplicated
    assert (second.first_position, second.last_position) == (
        first.first_position,
        first.last_position,
    )
    assert (second.first_version, second.last_version) == (first.first_version, first.last_version)
    assert second.recorded_at == first.recorded_at
    assert [e.data for e in read_everything(store)] == [b"once"]


def test_same_idempotency_key_with_a_different_request_is_a_conflict(store: Store):
    append(store, "s", event(b"first"), key="k")

    with pytest.raises(IdempotencyConflict, match="'k' was already used"):
        append(store, "s", event(b"second"), key="k")

    assert [e.data for e in read_everything(store)] == [b"first"]


def test_rejected_append_does_not_consume_its_idempotency_key(store: Store):
    with pytest.raises(WrongExpectedVersion):
        append(store, "s", event(b"x"), expected=EXACT, version=3, key="k")

    result = append(store, "s", event(b"x"), key="k")

    assert not result.deduplicated
    assert store.log.head == 1


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clocked_store(open_store: StoreFactory) -> tuple[Store, ManualClock]:
    """A store with a one-second idempotency window, on a clock the test moves."""
    limits = WriterLimits(idempotency_window_ns=10**9, sweep_interval_s=3600)
    store = open_store(StoreOptions(writer=limits))
    clock = ManualClock()
    # The store builds its writer with the wall clock; the writer reads its clock
    # attribute on every command, so replacing it here is enough.
    store.writer.clock = clock
    return store, clock


def db_keys(store: Store, db_name: str) -> list[bytes]:
    with store.log.lmdb.read() as txn:
        return list(txn.cursor(db=store.log.lmdb.dbs[db_name]).iternext(values=False))


def test_sweeper_removes_idempotency_entries_older_than_the_window(
    clocked_store: tuple[Store, ManualClock],
):
    store, clock = clocked_store
    append(store, "s", event(b"old"), key="old")
    clock.now += 2 * 10**9
    append(store, "s", event(b"new"), key="new")

    removed = store.writer._sweep_idempotency()

    assert removed == 1
    assert db_keys(store, "idempotency") == [b"new"]
    assert len(db_keys(store, "idempotency_expiry")) == 1
    # The expired key is free again; the live one still deduplicates.
    assert not append(store, "s", event(b"reused"), key="old").deduplicated
    assert append(store, "s", event(b"new"), key="new").deduplicated


def test_expired_idempotency_key_not_yet_swept_is_treated_as_new(
    clocked_store: tuple[Store, ManualClock],
):
    store, clock = clocked_store
    append(store, "s", event(b"first"), key="k")
    clock.now += 2 * 10**9

    result = append(store, "s", event(b"different"), key="k")

    assert not result.deduplicated
    assert [e.data for e in read_everything(store)] == [b"first", b"different"]
    # The old expiry entry was replaced, not left behind for the sweeper.
    assert db_keys(store, "idempotency") == [b"k"]
    assert len(db_keys(store, "idempotency_expiry")) == 1


def test_sweep_of_an_empty_idempotency_table_removes_nothing(
    clocked_store: tuple[Store, ManualClock],
):
    store, _ = clocked_store

    assert store.writer._sweep_idempotency() == 0


# -- forgotten subjects -------------------------------------------------------------------


def forget(store: Store, subject: str) -> None:
    """Write a tombstone and tell the key store, as Forget does, without its erasure event."""
    tombstone = Tombstone(position=0, forgotten_at=1, reason="test", shred_epoch=0)
    with store.log.lmdb.begin_write() as txn:
        txn.put(subject.encode(), codec.encode(tombstone), db=store.log.tombstones)
    store.keys.forget({subject: tombstone})


def test_append_for_a_forgotten_subject_is_refused_and_writes_nothing(store: Store):
    append(store, "s", event(subject="erased"))
    forget(store, "erased")

    with pytest.raises(SubjectForgotten, match="'erased' has been forgotten"):
        append(store, "new-stream", event(subject="erased"))

    assert store.log.head == 1
    assert store.log.last_version("new-stream") is None


def test_forgotten_subject_in_a_batch_does_not_affect_other_subjects(store: Store):
    forget(store, "erased")
    with writer_parked(store):
        futures = [
            store.writer.submit(command("a", event(subject="alive"))),
            store.writer.submit(command("b", event(subject="erased"))),
            store.writer.submit(command("c", event(subject=""))),
        ]
    outcomes = [outcome(f) for f in futures]

    assert isinstance(outcomes[0], AppendResult)
    assert isinstance(outcomes[1], SubjectForgotten)
    assert isinstance(outcomes[2], AppendResult)
    assert store.keys.versions_of("erased") == []


def test_an_append_after_a_forget_in_the_same_batch_is_refused(store: Store):
    append(store, "s", event(subject="alice"))
    with writer_parked(store):
        batches_before = store.writer.batches
        futures = [
            store.writer.submit(ForgetCommand("alice", "gdpr-art17", "admin")),
            store.writer.submit(command("s", event(b"late", subject="alice"))),
            store.writer.submit(command("s", event(b"other", subject="bob"))),
        ]
    outcomes = [outcome(f) for f in futures]

    assert store.writer.batches == batches_before + 1, "the three commands shared one batch"
    assert isinstance(outcomes[1], SubjectForgotten)
    assert isinstance(outcomes[2], AppendResult)
    assert [e.subject_id for e in read_stream(store, "s")] == ["alice", "bob"]
