"""Opening LMDB environments safely, growing their maps, checking their files.

Every environment LetheDB opens goes through :class:`LmdbEnv` so that only the
safe modes are ever used: sync and metasync on (a commit is durable when it
returns), no writemap (a full disk with writemap kills the process with
SIGBUS), no map_async, locking on, and meminit on: LMDB writes whole pages,
and without meminit the unused part of a fresh page is whatever the process
heap held before, which can be plaintext personal data or a raw key on its
way to being encrypted. Nothing of that may ever reach a file.

LMDB may only change its map size while no transaction of this process is
open. Readers therefore enter through :meth:`LmdbEnv.read`, which holds a
shared gate that :meth:`LmdbEnv.grow` takes exclusively; read transactions
are short (one page), so growth waits at most for one page read.
"""

from __future__ import annotations

import errno
import os
import resource
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from lethedb_server.errors import DataDirDamaged, DataLoss, StorageFull
from lethedb_server.files import (
    PRIVATE_DIR_MODE,
    fsync_dir,
    make_private_dir,
    open_private,
)

T = TypeVar("T")

_MDB_MAGIC = 0xBEEFC0DE
_META_LAYOUT = struct.Struct("<IIQQ")  # magic, version, address, mapsize
_PAGE_HEADER = 16
_DB_RECORD = 48
_LAST_PG_OFFSET = _PAGE_HEADER + _META_LAYOUT.size + 2 * _DB_RECORD


class _ResizeGate:
    """Many readers or one resizer: LMDB's rule for mdb_env_set_mapsize."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class LmdbEnv:
    """One LMDB environment with its named databases."""

    def __init__(
        self,
        path: Path,
        db_names: Sequence[str],
        *,
        map_size: int,
        max_map_size: int,
        max_readers: int = 1024,
    ) -> None:
        make_private_dir(path)
        self.path = path
        self.max_map_size = max_map_size
        self._db_names = tuple(db_names)
        self._max_readers = max_readers
        self._gate = _ResizeGate()
        self._open(map_size)

    def _open(self, map_size: int) -> None:
        check_data_file(self.path / "data.mdb")
        self.env = lmdb.open(
            str(self.path),
            map_size=max(map_size, _current_file_size(self.path / "data.mdb")),
            max_dbs=len(self._db_names) + 4,
            max_readers=self._max_readers,
            subdir=True,
            sync=True,
            metasync=True,
            writemap=False,
            map_async=False,
            lock=True,
            readahead=False,
            meminit=True,
            # py-lmdb creates data.mdb and lock.mdb with this mode minus the
            # execute bits: 0600 (its default, 0755, makes them 0644).
            mode=PRIVATE_DIR_MODE,
        )
        self.env.reader_check()
        self.dbs: dict[str, Any] = {
            name: self.env.open_db(name.encode()) for name in self._db_names
        }

    def replace_data_file(self, new_data_file: Path, old_copy: Path) -> None:
        """Swap in another ``data.mdb`` atomically, keeping the old one as *old_copy*.

        Only the writer thread may call this (no write transaction can be
        open); readers wait at the gate while the environment is closed.
        """
        data_file = self.path / "data.mdb"
        with self._gate.exclusive():
            map_size = self.map_size()
            self.env.close()
            old_copy.unlink(missing_ok=True)
            os.link(data_file, old_copy)
            os.replace(new_data_file, data_file)
            fsync_dir(self.path)
            fsync_dir(old_copy.parent)
            (self.path / "lock.mdb").unlink(missing_ok=True)
            self._open(map_size)

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction; never hold it across a wait."""
        with self._gate.shared(), self.env.begin(buffers=False) as txn:
            try:
                yield txn
            except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
                # A damaged page of LMDB's own structure (it has no checksums).
                raise DataLoss(
                    f"{self.path}/data.mdb is damaged ({exc}); restore it from a backup"
                ) from exc

    def begin_write(self) -> lmdb.Transaction:
        """Only the writer thread (or start-up code before it runs) calls this."""
        return self.env.begin(write=True)

    def grow(self) -> None:
        """Double the map size; raise :class:`StorageFull` past the configured ceiling."""
        current = self.env.info()["map_size"]
        if current >= self.max_map_size:
            raise StorageFull(
                f"{self.path} reached its maximum map size of {self.max_map_size} bytes; "
                "raise max_map_size or free space"
            )
        with self._gate.exclusive():
            self.env.set_mapsize(min(current * 2, self.max_map_size))

    def write(self, apply: Callable[[lmdb.Transaction], T]) -> T:
        """Run *apply* in a write transaction and commit, growing the map when full.

        *apply* may run more than once (after a MapFullError nothing of the
        failed attempt is kept), so it must only write through the transaction.
        Only the writer thread (or start-up code) may call this.
        """
        while True:
            try:
                with self.begin_write() as txn:
                    return apply(txn)
            except lmdb.MapFullError:
                self.grow()

    def copy_to(self, destination: Path) -> int:
        """A consistent, compacted copy of the environment; returns its size in bytes.

        ``compact=True`` writes only live pages: free pages, where LMDB leaves
        deleted values in place, are not carried into the copy.
        """
        make_private_dir(destination)
        if any(destination.iterdir()):
            raise ValueError(f"backup destination {destination} is not empty")
        target = destination / "data.mdb"
        # copyfd into a file created 0600 here: env.copy would create it 0644.
        fd = open_private(target, os.O_WRONLY | os.O_EXCL)
        try:
            with self._gate.shared():
                self.env.copyfd(fd, compact=True)
            os.fsync(fd)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        fsync_dir(destination)
        return target.stat().st_size

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def usage(self) -> tuple[int, int]:
        """(map size, bytes of the pages in use), for metrics.

        Read through the read gate: the map may be growing, or the file being
        swapped (a shred epoch replaces the key store's), right now.
        """
        with self.read():
            info = self.env.info()
            page = self.env.stat()["psize"]
        return int(info["map_size"]), (int(info["last_pgno"]) + 1) * int(page)

    def reader_check(self) -> int:
        """Clear reader slots left by dead processes; return how many were cleared."""
        return int(self.env.reader_check())

    def close(self) -> None:
        self.env.close()


#: Free bytes below which a file system counts as full when LMDB reports a short write.
_NEARLY_FULL = 1 << 20


def is_disk_full(exc: lmdb.Error, *directories: Path) -> bool:
    """Whether an LMDB error means the disk holding *directories* is full.

    LMDB reports ENOSPC/EDQUOT/EFBIG as plain errors with the errno's text.
    A write that fits only in part (the usual first failure on a filling
    disk, or at RLIMIT_FSIZE) is a *short write*, which LMDB reports as EIO
    ("short write, filesystem full?"); it counts as a full disk when an
    environment's file system has (almost) no space left or its data file
    has reached this process's file-size limit.
    """
    text = str(exc)
    if any(os.strerror(code) in text for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)):
        return True
    return os.strerror(errno.EIO) in text and any(_out_of_space(d) for d in directories)


def _out_of_space(directory: Path) -> bool:
    try:
        fs = os.statvfs(directory)
    except OSError:
        return False
    if fs.f_bavail * fs.f_frsize < _NEARLY_FULL:
        return True
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = _current_file_size(directory / "data.mdb")
    return limit != resource.RLIM_INFINITY and size + _NEARLY_FULL > limit


def _current_file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def check_data_file(path: Path) -> None:
    """Refuse a ``data.mdb`` whose meta pages are bad or whose size is short.

    LMDB has no page checksums, and a truncated file opens fine and then dies
    with SIGBUS on the first read of a missing page. Both meta pages name the
    last page in use; the file must reach past it.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    with path.open("rb") as f:
        head = f.read(2 * 65536)
    if len(head) < 2 * 4096:
        raise DataDirDamaged(
            f"{path} is {size} bytes, too short to hold LMDB's two meta pages; "
            "restore it from a backup"
        )
    page_size = _page_size(head)
    best: tuple[int, int] | None = None  # (txnid, last_pgno)
    damaged: list[int] = []
    for index in (0, 1):
        meta = head[index * page_size : (index + 1) * page_size]
        magic = struct.unpack_from("<I", meta, _PAGE_HEADER)[0]
        if magic != _MDB_MAGIC:
            damaged.append(index)
            continue
        last_pgno, txnid = struct.unpack_from("<QQ", meta, _LAST_PG_OFFSET)
        if best is None or txnid > best[0]:
            best = (txnid, last_pgno)
    if best is None:
        raise DataDirDamaged(
            f"{path} has no valid LMDB meta page (both are damaged); restore it from a backup"
        )
    if damaged:
        # LMDB writes both meta pages when it creates a file, so a bad one is
        # damage, not youth. LMDB would silently fall back to the other, older
        # state; an event store must not quietly lose committed transactions.
        raise DataDirDamaged(
            f"{path}: LMDB meta page {damaged[0]} is damaged (the other is intact); "
            "refusing to open a directory that may have lost committed data; "
            "restore it from a backup"
        )
    needed = (best[1] + 1) * page_size
    if size < needed:
        raise DataDirDamaged(
            f"{path} is truncated: it is {size} bytes but its meta page says it holds "
            f"{needed} bytes; restore it from a backup"
        )


def _page_size(head: bytes) -> int:
    """The page size is stored in the free-list database record of the meta page."""
    for index_page in (0, 1):
        for guess in (4096, 8192, 16384, 32768, 65536):
            offset = index_page * guess + _PAGE_HEADER
            if offset + _META_LAYOUT.size + 4 > len(head):
                continue
            magic = struct.unpack_from("<I", head, offset)[0]
            if magic == _MDB_MAGIC:
                (psize,) = struct.unpack_from("<I", head, offset + _META_LAYOUT.size)
                if psize in (4096, 8192, 16384, 32768, 65536):
                    return int(psize)
    return 4096
