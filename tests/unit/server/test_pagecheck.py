"""The page-by-page reader of LMDB files behind ``lethedb verify --data``.

It must read an intact file exactly as LMDB does (every record of every
table, in key order) and find nothing wrong with it, whether the file was
written by the writer with deletes, overwrites and free pages, or compacted
by a backup; and it must name the page of damage LMDB would trip over.
"""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from lethedb_server.storage import pagecheck
from lethedb_server.storage.lmdbenv import LmdbEnv
from lethedb_server.storage.log import LOG_DBS

PAGE = 4096
TABLES = ("small", "large", "gone")


def _lmdb_records(path: Path, name: str) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8)
    try:
        db = env.open_db(name.encode(), create=False)
        with env.begin(db=db) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


@pytest.fixture
def env_dir(tmp_path: Path) -> Path:
    """Small and overflow-sized values, overwrites and deletes over several commits."""
    path = tmp_path / "env"
    env = LmdbEnv(path, TABLES, map_size=16 << 20, max_map_size=1 << 30)
    try:
        for round_ in range(5):
            with env.begin_write() as txn:
                for i in range(400):
                    key = f"key-{i:05}-{round_ % 2}".encode()
                    txn.put(key, bytes([i % 251]) * (i % 90 + round_), db=env.dbs["small"])
                    if i % 7 == 0:
                        txn.put(i.to_bytes(8, "big"), bytes(2500 + 97 * i), db=env.dbs["large"])
                    txn.put(key, b"x", db=env.dbs["gone"])
                for i in range(0, 400, 3):
                    txn.delete(f"key-{i:05}-0".encode(), db=env.dbs["small"])
                    txn.delete(f"key-{i:05}-{round_ % 2}".encode(), db=env.dbs["gone"])
    finally:
        env.close()
    return path


def _compacted(env_dir: Path, tmp_path: Path) -> Path:
    env = LmdbEnv(env_dir, TABLES, map_size=16 << 20, max_map_size=1 << 30)
    try:
        env.copy_to(tmp_path / "copy")
    finally:
        env.close()
    return tmp_path / "copy"


@pytest.mark.parametrize("compacted", [False, True], ids=["as written", "compacted backup"])
def test_an_intact_file_reads_exactly_as_lmdb_reads_it(
    env_dir: Path, tmp_path: Path, compacted: bool
):
    path = _compacted(env_dir, tmp_path) if compacted else env_dir

    checked = pagecheck.check_file(path / "data.mdb", TABLES)

    assert checked.problems == []
    assert set(checked.tables) == set(TABLES)
    for name in TABLES:
        assert checked.tables[name].records == _lmdb_records(path, name), name
    assert any(len(v) > PAGE for _, v in checked.tables["large"].records)  # overflow pages


def test_a_table_lmdb_does_not_list_is_reported(env_dir: Path):
    checked = pagecheck.check_file(env_dir / "data.mdb", LOG_DBS)

    assert not checked.ok
    assert any("should not hold" in p.what for p in checked.problems)
    assert any("are missing" in p.what for p in checked.problems)


def _flip(path: Path, offset: int, bit: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))


def _leaf_of(path: Path, name: str) -> int:
    """A leaf page of table *name*: where its first record's key is."""
    content = path.read_bytes()
    first = _lmdb_records(path.parent, name)[0][0]
    return content.index(first) // PAGE


# (where in the page, bit, what the report says)
PAGE_DAMAGE = {
    "page number in the header": (0, 0x01, "its header names page"),
    "page type": (10, 0x04, "flags are"),
    "free-space bound": (12, 0x40, "entries take"),
    "entry offset": (16, 0x10, "entry"),
}


@pytest.mark.parametrize(("at", "bit", "says"), PAGE_DAMAGE.values(), ids=PAGE_DAMAGE.keys())
def test_a_damaged_page_is_named_with_its_table(env_dir: Path, at: int, bit: int, says: str):
    path = env_dir / "data.mdb"
    page = _leaf_of(path, "small")
    _flip(path, page * PAGE + at, bit)

    checked = pagecheck.check_file(path, TABLES)

    assert [(p.page, p.table) for p in checked.problems][:1] == [(page, "small")]
    assert says in checked.problems[0].what
    assert checked.tables["small"].damaged
    assert not checked.tables["large"].damaged


def test_a_meta_page_from_another_time_is_refused(env_dir: Path):
    path = env_dir / "data.mdb"
    _flip(path, 16 + 24 + 96 + 8 + 1, 0x01)  # meta page 0's transaction id, second byte

    checked = pagecheck.check_file(path, TABLES)

    assert not checked.ok
    assert "meta page" in checked.problems[0].what
