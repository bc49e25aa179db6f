"""Nothing the server writes holds personal data in the clear or a usable data key.

The data directory is scanned byte by byte, every file of it, after the store is
closed: the log, the key store, their lock files, the keyring and the lock file.
"""

from __future__ import annotations

import ctypes
import uuid
from pathlib import Path

import lmdb
import msgspec
import pytest

from lethedb_server.crypto.aead import KEY_SIZE, wrap_aad
from lethedb_server.crypto.keyring import FileKeyring, WrappedKey
from lethedb_server.engine.model import AppendCommand, ExpectedState, ProposedEvent
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.errors import WrongExpectedVersion
from lethedb_server.storage import codec
from lethedb_server.storage.lmdbenv import LmdbEnv

CANARY_PREFIX = b"CANARY-"
#: A clear field the scanner must find, to prove it reads the files it should.
CLEAR_MARKER = "stream-in-the-clear-0f1e2d"


def canary(label: str) -> bytes:
    return CANARY_PREFIX + uuid.uuid5(uuid.NAMESPACE_OID, label).hex.encode()


def files_under(root: Path) -> dict[Path, bytes]:
    files = {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
    assert files, f"no files under {root}"
    return files


def files_containing(files: dict[Path, bytes], needle: bytes) -> list[Path]:
    return [path for path, content in files.items() if needle in content]


def event(data: bytes, subject: str, metadata: bytes = b"") -> ProposedEvent:
    return ProposedEvent(b"", "PersonalDataRecorded", subject, "text/plain", data, metadata)


@pytest.fixture
def closed_data_dir(data_dir: Path) -> tuple[Path, list[bytes]]:
    """A closed data directory whose events carry canaries in data and metadata.

    A small DEK use cap makes subjects roll over to several key versions, a
    rejected append carries a canary too, and one event is bigger than a page.
    """
    canaries: list[bytes] = []
    store = Store.open(data_dir, StoreOptions(dek_max_uses=2))
    try:
        for i in range(12):
            subject = ("alice", "bob", "")[i % 3]
            data, metadata = canary(f"data-{i}"), canary(f"metadata-{i}")
            canaries += [data, metadata]
            store.writer.append(
                AppendCommand(CLEAR_MARKER, (event(b"name=" + data, subject, metadata),))
            )
        big = canary("big") * 2000  # spans overflow pages
        canaries.append(canary("big"))
        store.writer.append(AppendCommand("big", (event(big, "carol"),)))
        rejected = canary("rejected")
        canaries.append(rejected)
        with pytest.raises(WrongExpectedVersion):
            store.writer.append(
                AppendCommand("big", (event(rejected, "carol"),), ExpectedState.NO_STREAM)
            )
    finally:
        store.close()
    return data_dir, canaries


def raw_deks(data_dir: Path) -> dict[tuple[str, int], tuple[bytes, bytes]]:
    """Every DEK in the key store: (subject, version) -> (raw key, wrapped bytes).

    Read from the closed key store's files and unwrapped with the keyring, as an
    attacker holding both would.
    """
    keyring = FileKeyring(data_dir / "master.keyring")
    env = lmdb.open(str(data_dir / "keys"), readonly=True, lock=False, max_dbs=8)
    try:
        deks = env.open_db(b"deks", create=False)
        found: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        with env.begin(buffers=False) as txn:
            for key, value in txn.cursor(db=deks):
                length = int.from_bytes(key[:4], "big")
                subject = key[4 : 4 + length].decode()
                version = codec.dek_version_from_key(key)
                wrapped = msgspec.msgpack.decode(value, type=WrappedKey)
                raw = keyring.unwrap(wrapped, wrap_aad(subject, version, wrapped.master_version))
                found[subject, version] = (raw, wrapped.ciphertext)
        return found
    finally:
        env.close()


def test_no_file_in_the_data_directory_holds_event_data_in_the_clear(
    closed_data_dir: tuple[Path, list[bytes]],
):
    data_dir, canaries = closed_data_dir
    files = files_under(data_dir)

    assert files_containing(files, CLEAR_MARKER.encode()), "the scan must see clear fields"
    for needle in canaries:
        assert files_containing(files, needle) == [], f"{needle!r} is on disk in the clear"
    assert files_containing(files, CANARY_PREFIX) == []


def test_no_file_in_the_data_directory_holds_an_unwrapped_data_key(
    closed_data_dir: tuple[Path, list[bytes]],
):
    data_dir, _ = closed_data_dir
    files = files_under(data_dir)
    deks = raw_deks(data_dir)

    # Every subject, the store key included, and the roll-overs forced by the use cap.
    assert {subject for subject, _ in deks} == {"alice", "bob", "carol", "$store"}
    assert len(deks) > 4
    for (subject, version), (raw, wrapped) in deks.items():
        assert len(raw) == KEY_SIZE
        assert files_containing(files, wrapped) == [data_dir / "keys" / "data.mdb"], (
            "the scan must find the wrapped key where it is stored"
        )
        assert files_containing(files, raw) == [], (
            f"the raw DEK of {subject!r} version {version} is on disk"
        )


def _leave_on_the_heap(needle: bytes, chunks: int = 64, size: int = 4096) -> None:
    """Fill and free page-sized heap blocks, as decrypting or encrypting events does.

    The next page-sized ``malloc`` (LMDB's page buffers) gets one of them back
    with *needle* still in it.
    """
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    filler = (needle * (size // len(needle) + 1))[:size]
    blocks = [libc.malloc(size) for _ in range(chunks)]
    for block in blocks:
        ctypes.memmove(block, filler, size)
    for block in blocks:
        libc.free(block)


def test_unused_page_space_never_carries_the_process_heap_to_disk(tmp_path: Path):
    """LMDB writes whole pages; what a small record leaves unused must be zeros.

    Without meminit, LMDB leaves its page buffers as malloc returned them, and
    the heap had just held plaintext on its way to encryption.
    """
    secret = canary("heap")
    env = LmdbEnv(tmp_path / "env", ("things",), map_size=1 << 20, max_map_size=1 << 30)
    try:
        for i in range(3):
            _leave_on_the_heap(secret)
            with env.begin_write() as txn:
                txn.put(b"k%d" % i, b"v", db=env.dbs["things"])
    finally:
        env.close()
    assert files_containing(files_under(tmp_path), secret) == []
