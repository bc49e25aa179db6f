"""Start-up checks of LMDB files, and map growth.

LMDB has no page checksums: a truncated ``data.mdb`` opens fine and the first
read of a missing page kills the process with SIGBUS. So the files are checked
before LMDB ever maps them, and a damaged one is refused with a clear message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.store import Store
from lethedb_server.errors import DataDirDamaged, StorageFull
from lethedb_server.storage.lmdbenv import LmdbEnv, check_data_file

PAGE = 4096


@pytest.fixture
def env_dir(tmp_path: Path) -> Path:
    """A closed, healthy environment a few hundred pages long."""
    path = tmp_path / "env"
    env = LmdbEnv(path, ("things",), map_size=8 << 20, max_map_size=1 << 30)
    try:
        with env.begin_write() as txn:
            for i in range(300):
                txn.put(i.to_bytes(4, "big"), bytes([i % 256]) * 3000, db=env.dbs["things"])
    finally:
        env.close()
    return path


def data_file(env_dir: Path) -> Path:
    return env_dir / "data.mdb"


def zero(path: Path, start: int, length: int) -> None:
    with path.open("r+b") as f:
        f.seek(start)
        f.write(bytes(length))


def test_healthy_data_file_is_accepted(env_dir: Path):
    check_data_file(data_file(env_dir))

    env = LmdbEnv(env_dir, ("things",), map_size=1 << 20, max_map_size=1 << 30)
    try:
        with env.read() as txn:
            assert txn.get((299).to_bytes(4, "big"), db=env.dbs["things"]) == bytes([43]) * 3000
    finally:
        env.close()


def test_missing_data_file_is_accepted_as_a_new_environment(tmp_path: Path):
    check_data_file(tmp_path / "data.mdb")


def test_truncated_data_file_is_refused(env_dir: Path):
    path = data_file(env_dir)
    size = path.stat().st_size
    assert size > 100 * PAGE
    with path.open("r+b") as f:
        f.truncate(size // 2)

    with pytest.raises(DataDirDamaged, match="truncated") as refused:
        check_data_file(path)

    message = str(refused.value)
    assert str(path) in message
    assert f"it is {size // 2} bytes" in message
    assert "restore it from a backup" in message


def test_data_file_short_by_one_page_is_refused(env_dir: Path):
    path = data_file(env_dir)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - PAGE)

    with pytest.raises(DataDirDamaged, match="truncated"):
        check_data_file(path)


def test_data_file_too_short_for_its_meta_pages_is_refused(env_dir: Path):
    path = data_file(env_dir)
    with path.open("r+b") as f:
        f.truncate(PAGE + 100)

    with pytest.raises(DataDirDamaged, match="too short to hold LMDB's two meta pages"):
        check_data_file(path)


def test_data_file_with_both_meta_pages_zeroed_is_refused(env_dir: Path):
    path = data_file(env_dir)
    zero(path, 0, 2 * PAGE)

    with pytest.raises(DataDirDamaged, match="no valid LMDB meta page"):
        check_data_file(path)


@pytest.mark.parametrize("page", [0, 1])
def test_data_file_with_one_meta_page_zeroed_is_refused(env_dir: Path, page: int):
    """LMDB would fall back to the other, older meta page and lose a commit quietly."""
    path = data_file(env_dir)
    zero(path, page * PAGE, PAGE)

    with pytest.raises(DataDirDamaged, match=f"meta page {page} is damaged"):
        check_data_file(path)


def test_damaged_environment_is_refused_before_lmdb_maps_it(env_dir: Path):
    path = data_file(env_dir)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)

    # Without the check this would open and then die with SIGBUS on a read.
    with pytest.raises(DataDirDamaged, match="truncated"):
        LmdbEnv(env_dir, ("things",), map_size=1 << 20, max_map_size=1 << 30)


def test_store_with_a_truncated_log_is_refused_and_leaves_the_directory_unlocked(
    data_dir: Path,
):
    with Store.open(data_dir) as store:
        store.writer.append(AppendCommand("s", (ProposedEvent(b"", "T", "", "", b"x", b""),)))
    log_file = data_dir / "log" / "data.mdb"
    with log_file.open("r+b") as f:
        f.truncate(log_file.stat().st_size - PAGE)

    for _ in range(2):  # a second attempt finds the same damage, not a stale lock
        with pytest.raises(DataDirDamaged, match="truncated"):
            Store.open(data_dir)


def test_grow_doubles_the_map_up_to_its_ceiling(tmp_path: Path):
    env = LmdbEnv(tmp_path / "env", ("things",), map_size=1 << 20, max_map_size=4 << 20)
    try:
        env.grow()
        assert env.map_size() == 2 << 20
        env.grow()
        assert env.map_size() == 4 << 20

        with pytest.raises(StorageFull, match="maximum map size of 4194304 bytes"):
            env.grow()
        assert env.map_size() == 4 << 20
    finally:
        env.close()


def test_a_write_that_fills_the_map_grows_it_and_is_retried_whole(tmp_path: Path):
    """Every key-store and epoch write goes through LmdbEnv.write: a forget that
    meets a full map (LMDB copies the pages it changes, so even deleting needs
    room) must grow the map and succeed, not fail and leave keys behind."""
    env = LmdbEnv(tmp_path / "env", ("things",), map_size=64 * 1024, max_map_size=1 << 30)
    attempts = []

    def fill(txn) -> int:
        attempts.append(1)
        for i in range(2000):
            txn.put(f"key-{i:05d}".encode(), b"v" * 200, db=env.dbs["things"])
        return 2000

    try:
        assert env.write(fill) == 2000
        assert len(attempts) > 1  # the first attempts hit MapFullError and were retried
        assert env.map_size() > 64 * 1024
        with env.read() as txn:
            assert txn.stat(env.dbs["things"])["entries"] == 2000
    finally:
        env.close()
