"""Reading an LMDB data file page by page, without LMDB, to find damage exactly.

LMDB has no page checksums and trusts every byte it reads: a flipped bit in
a page header or a node makes it fail an internal assertion (``abort()``),
read past the map (SIGBUS) or quietly return a wrong record. None of that can
be caught from Python, so ``lethedb verify --data`` does not let LMDB walk a
file it has not checked: this module parses the file itself, from the newest
meta page down every B-tree (LMDB's format for 64-bit builds, version 1),
and checks every structural invariant LMDB relies on:

* each page's header names its own page number and the type its place in
  the tree requires (branch, leaf or overflow), with sane bounds;
* each node lies inside its page, does not overlap its neighbours, and has
  flags the table allows; keys are strictly ordered within the page and lie
  within the bounds the parent's separator keys give;
* overflow pages of large values are where the leaf says, and as long;
* each table's recorded depth and page and entry counts match what is there;
* every page up to the last one in use belongs to exactly one tree or to the
  free list, so no page is shared, lost or free while in use.

A damaged page is reported by number, with the table it belongs to and the
range of keys it should hold; the records of every intact page are returned
so that the caller can check their contents (see :mod:`lethedb_server.engine.verify`).
Nothing here writes to the file.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

MAGIC: Final = 0xBEEFC0DE
DATA_VERSION: Final = 1
PAGE_HEADER: Final = 16
NODE_HEADER: Final = 8
P_INVALID: Final = 2**64 - 1

P_BRANCH: Final = 0x01
P_LEAF: Final = 0x02
P_OVERFLOW: Final = 0x04
P_META: Final = 0x08
F_BIGDATA: Final = 0x01
F_SUBDATA: Final = 0x02
MDB_INTEGERKEY: Final = 0x08

FREE_TABLE: Final = "(free list)"
#: A larger depth is damage: a 64-bit file holds under 2**52 pages, and each
#: branch page has two children at least, so no tree is deeper than 52.
MAX_DEPTH: Final = 64
#: The page number of a problem with the whole file (missing, no meta page).
FILE: Final = -1
MAIN_TABLE: Final = "(table of tables)"

_HEADER = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper
_OVERFLOW_HEADER = struct.Struct("<QHHI")  # pgno, pad, flags, page count
_NODE = struct.Struct("<HHHH")  # lo, hi, flags, key size
_DB = struct.Struct("<IHHQQQQQ")  # pad, flags, depth, branch, leaf, overflow, entries, root
_META = struct.Struct("<IIQQ")  # magic, version, address, map size
_META_TAIL = struct.Struct("<QQ")  # last page, transaction id
_U64 = struct.Struct("<Q")
_META_DBS = PAGE_HEADER + _META.size
_META_TAIL_AT = _META_DBS + 2 * _DB.size
_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)


@dataclass(frozen=True)
class TableRecord:
    """A table's entry in LMDB's table of tables (``MDB_db``)."""

    pad: int
    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int

    @classmethod
    def parse(cls, raw: bytes | memoryview, at: int = 0) -> TableRecord:
        return cls(*_DB.unpack_from(raw, at))


@dataclass(frozen=True)
class PageProblem:
    """Damage to LMDB's own structure: where it is and which table it hurts."""

    page: int
    table: str
    what: str
    #: The keys the damaged page (or subtree) should hold: (low, high), either
    #: None when unbounded. The caller turns them into positions or names.
    low: bytes | None = None
    high: bytes | None = None
    #: Whether the page's records were left out (False: read despite the damage).
    records_lost: bool = True


@dataclass
class Table:
    """One table's records, in key order, as found on its intact pages."""

    name: str
    record: TableRecord
    records: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Whether some of its pages could not be read (records are then missing).
    damaged: bool = False


@dataclass
class FileCheck:
    """What :func:`check_file` found."""

    path: Path
    page_size: int = 4096
    last_page: int = 0
    tables: dict[str, Table] = field(default_factory=dict)
    problems: list[PageProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Walk:
    """The state of one walk over a file: its bytes and which page holds what."""

    def __init__(self, data: bytes, page_size: int, last_page: int, result: FileCheck) -> None:
        self.data = data
        self.view = memoryview(data)
        self.psize = page_size
        self.last = last_page
        self.owner: dict[int, str] = {}
        self.result = result

    def problem(
        self, page: int, table: str, what: str, low: bytes | None = None, high: bytes | None = None
    ) -> None:
        self.result.problems.append(PageProblem(page, table, what, low, high))

    def claim(
        self, page: int, table: str, low: bytes | None, high: bytes | None, referrer: int = 0
    ) -> bool:
        """Mark *page* as *table*'s; report a page out of range or already in use.

        An out-of-range reference is damage on the page that holds it,
        *referrer* (0: a table's root, referred to from its record), so that
        is the page named.
        """
        if not 2 <= page <= self.last:
            self.problem(
                referrer or page,
                table,
                f"a reference to page {page}, outside the file's pages 2 to {self.last}",
                low,
                high,
            )
            return False
        other = self.owner.get(page)
        if other is not None:
            self.problem(page, table, f"the page is also used by table {other}", low, high)
            return False
        self.owner[page] = table
        return True

    def tree(
        self, name: str, record: TableRecord, integer_keys: bool, leaf_flags: frozenset[int]
    ) -> Table:
        """Walk one table's B-tree; return its records, reporting what is damaged."""
        table = Table(name, record)
        counts = [0, 0, 0]  # branch, leaf, overflow pages
        problems_before = len(self.result.problems)
        if record.root == P_INVALID:
            if record.depth or record.entries:
                self.problem(0, name, "the table has no root page but records depth or entries")
            return table
        if not 1 <= record.depth <= MAX_DEPTH:
            self.problem(
                record.root, name, f"the table's record says its tree is {record.depth} levels deep"
            )
            table.damaged = True
            return table
        self._page(
            table, record.root, 1, record.depth, None, None, integer_keys, leaf_flags, counts
        )
        table.damaged = len(self.result.problems) > problems_before
        if not table.damaged:
            found = (counts[0], counts[1], counts[2], len(table.records))
            recorded = (
                record.branch_pages,
                record.leaf_pages,
                record.overflow_pages,
                record.entries,
            )
            if found != recorded:
                table.damaged = True
                self.problem(
                    record.root,
                    name,
                    f"the table's record in LMDB says {recorded[0]} branch, {recorded[1]} leaf "
                    f"and {recorded[2]} overflow pages and {recorded[3]} entries; the tree has "
                    f"{found[0]}, {found[1]}, {found[2]} and {found[3]}",
                )
        return table

    def _page(
        self,
        table: Table,
        pgno: int,
        level: int,
        depth: int,
        low: bytes | None,
        high: bytes | None,
        integer_keys: bool,
        leaf_flags: frozenset[int],
        counts: list[int],
        referrer: int = 0,
    ) -> None:
        name = table.name
        if not self.claim(pgno, name, low, high, referrer):
            return
        base = pgno * self.psize
        page_no, _pad, flags, lower, upper = _HEADER.unpack_from(self.data, base)
        leaf = level == depth
        want = P_LEAF if leaf else P_BRANCH
        if page_no != pgno:
            return self.problem(pgno, name, f"its header names page {page_no}", low, high)
        if flags != want:
            kind = "leaf" if leaf else "branch"
            return self.problem(
                pgno,
                name,
                f"a {kind} page expected at tree level {level}, flags are {flags:#x}",
                low,
                high,
            )
        if not (PAGE_HEADER <= lower <= upper <= self.psize) or (lower - PAGE_HEADER) % 2:
            return self.problem(
                pgno, name, f"its free-space bounds ({lower}, {upper}) are impossible", low, high
            )
        count = (lower - PAGE_HEADER) // 2
        if count == 0:
            return self.problem(pgno, name, "the page holds no entries", low, high)
        nodes = self._nodes(table, pgno, base, count, upper, leaf, leaf_flags, low, high)
        if nodes is None:
            return None
        if not self._ordered(nodes, integer_keys, leaf, pgno, name, low, high):
            return None
        if leaf:
            counts[1] += 1
            self._leaf(table, pgno, nodes, counts)
            return None
        counts[0] += 1
        for index, (_, key, _, child) in enumerate(nodes):
            child_low = low if index == 0 else key
            child_high = nodes[index + 1][1] if index + 1 < len(nodes) else high
            self._page(
                table,
                child,
                level + 1,
                depth,
                child_low,
                child_high,
                integer_keys,
                leaf_flags,
                counts,
                pgno,
            )
        return None

    def _nodes(
        self,
        table: Table,
        pgno: int,
        base: int,
        count: int,
        upper: int,
        leaf: bool,
        leaf_flags: frozenset[int],
        low: bytes | None,
        high: bytes | None,
    ) -> list[tuple[int, bytes, int, int]] | None:
        """The page's nodes in key order as (offset, key, flags, size or child page).

        None (reported) if damaged. LMDB packs nodes without gaps from the end
        of the page down to ``upper``, each rounded to an even size, so their
        sizes must add up to that area exactly: a node that overlaps another
        or a size that was altered breaks the sum.
        """
        data, psize, name = self.data, self.psize, table.name
        offsets = struct.unpack_from(f"<{count}H", data, base + PAGE_HEADER)
        unpack = _NODE.unpack_from
        nodes: list[tuple[int, bytes, int, int]] = []
        append = nodes.append
        total = 0
        for index, offset in enumerate(offsets):
            if offset < upper or offset & 1 or offset + NODE_HEADER > psize:
                self.problem(
                    pgno,
                    name,
                    f"entry {index} starts at {offset}, outside the page's "
                    f"entry area ({upper} to {psize})",
                    low,
                    high,
                )
                return None
            lo, hi, flags, ksize = unpack(data, base + offset)
            if leaf:
                if flags not in leaf_flags:
                    self.problem(pgno, name, f"entry {index} has flags {flags:#x}", low, high)
                    return None
                value = lo | hi << 16
                size = NODE_HEADER + ksize + (8 if flags & F_BIGDATA else value)
            else:
                value = lo | hi << 16 | flags << 32
                size = NODE_HEADER + ksize
            if offset + size > psize:
                self.problem(
                    pgno,
                    name,
                    f"entry {index} ({ksize}-byte key) runs past the end of the page",
                    low,
                    high,
                )
                return None
            total += size + (size & 1)
            start = base + offset + NODE_HEADER
            append((offset, data[start : start + ksize], flags, value))
        if total != psize - upper:
            self.problem(
                pgno,
                name,
                f"its entries take {total} bytes of the {psize - upper} "
                "their area holds (an entry's size or place was altered)",
                low,
                high,
            )
            return None
        return nodes

    def _ordered(
        self,
        nodes: list[tuple[int, bytes, int, int]],
        integer_keys: bool,
        leaf: bool,
        pgno: int,
        name: str,
        low: bytes | None,
        high: bytes | None,
    ) -> bool:
        """Keys strictly ascending, within the parent's bounds (a branch's first key is unused)."""
        keys = [key for _, key, _, _ in nodes]
        if not leaf:
            keys = keys[1:]
        if integer_keys:
            if any(len(k) != 8 for k in keys):
                self.problem(pgno, name, "an integer key is not 8 bytes long", low, high)
                return False
            # Little-endian integers: reversed, their bytes sort as the numbers do.
            ordered = [k[::-1] for k in keys]
            bounds = [None if b is None else b[::-1] for b in (low, high)]
        else:
            ordered = keys
            bounds = [low, high]
        if _in_order(ordered, bounds[0], bounds[1]):
            return True
        bad = _one_out_of_order(ordered, bounds[0], bounds[1]) if leaf else None
        if bad is None:
            self.problem(
                pgno,
                name,
                "its keys are out of order or outside the range its parent gives it",
                low,
                high,
            )
            return False
        # One damaged key: its record is still read, so that the caller can
        # name it (the events table by the position it should have).
        what = f"the key of entry {bad} is out of order (damaged)"
        self.result.problems.append(PageProblem(pgno, name, what, low, high, records_lost=False))
        return True

    def _leaf(
        self, table: Table, pgno: int, nodes: list[tuple[int, bytes, int, int]], counts: list[int]
    ) -> None:
        """Add the leaf's records to the table, in key order (the order of its nodes)."""
        base = pgno * self.psize + NODE_HEADER
        data = self.data
        records = table.records
        if not any(flags & F_BIGDATA for _, _, flags, _ in nodes):  # the common case, fast
            records += [
                (key, data[base + offset + len(key) : base + offset + len(key) + size])
                for offset, key, _, size in nodes
            ]
            return
        base -= NODE_HEADER
        for offset, key, flags, size in nodes:
            start = base + offset + NODE_HEADER + len(key)
            if flags & F_BIGDATA:
                value = self._overflow(
                    table.name, _U64.unpack_from(data, start)[0], size, key, counts, pgno
                )
                if value is None:
                    continue
            else:
                value = data[start : start + size]
            records.append((key, value))

    def _overflow(
        self, name: str, pgno: int, size: int, key: bytes, counts: list[int], leaf: int
    ) -> bytes | None:
        """A large value from its run of overflow pages (referred to from page *leaf*),
        or None (reported) if damaged."""
        if not self.claim(pgno, name, key, key, leaf):
            return None
        page_no, _pad, flags, pages = _OVERFLOW_HEADER.unpack_from(self.data, pgno * self.psize)
        needed = -(-(PAGE_HEADER + size) // self.psize)
        if page_no != pgno or flags != P_OVERFLOW or pages != needed:
            self.problem(
                pgno,
                name,
                f"the overflow page of a {size}-byte value is damaged (header names "
                f"page {page_no}, flags {flags:#x}, {pages} pages; {needed} expected)",
                key,
                key,
            )
            return None
        for extra in range(pgno + 1, pgno + pages):
            if not self.claim(extra, name, key, key):
                return None
        counts[2] += pages
        start = pgno * self.psize + PAGE_HEADER
        return bytes(self.view[start : start + size])


def _in_order(keys: list[bytes], low: bytes | None, high: bytes | None) -> bool:
    """Strictly ascending, the first at or above *low*, the last below *high*."""
    return (
        all(a < b for a, b in itertools.pairwise(keys))
        and (low is None or not keys or keys[0] >= low)
        and (high is None or not keys or keys[-1] < high)
    )


def _one_out_of_order(keys: list[bytes], low: bytes | None, high: bytes | None) -> int | None:
    """The index of the one key whose removal leaves the rest in order and in bounds, if any."""
    for index in range(len(keys)):
        if _in_order(keys[:index] + keys[index + 1 :], low, high):
            return index
    return None


def page_size_of(head: bytes) -> int:
    """The page size, from the free list's record in a meta page (0 if none is readable)."""
    for guess in _PAGE_SIZES:
        for index in (0, 1):
            at = index * guess + PAGE_HEADER
            if at + _META.size + 4 > len(head):
                continue
            if _U64.unpack_from(head, at)[0] & 0xFFFFFFFF == MAGIC:
                size = struct.unpack_from("<I", head, at + _META.size)[0]
                if size in _PAGE_SIZES:
                    return int(size)
    return 0


def check_file(path: Path, tables: Iterable[str]) -> FileCheck:
    """Check an LMDB data file's structure; return its named tables' records and any damage.

    *tables* are the named databases the file must hold, and no others.
    """
    result = FileCheck(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        result.problems.append(PageProblem(FILE, "", "the file is missing"))
        return result
    psize = page_size_of(data[: 2 * 65536])
    if not psize:
        result.problems.append(PageProblem(FILE, "", "no readable LMDB meta page"))
        return result
    result.page_size = psize
    metas = [_meta(data, psize, index, result) for index in (0, 1)]
    good = [m for m in metas if m is not None]
    if len(good) < 2:
        return result
    newest = max(good, key=lambda m: m[0])
    txnid, last_page, free, main = newest
    older = min(good, key=lambda m: m[0])
    if txnid - older[0] != 1:
        what = f"the meta pages' transaction ids ({older[0]}, {txnid}) are not consecutive"
        result.problems.append(PageProblem(txnid & 1, "(meta)", what))
        return result
    if (last_page + 1) * psize > len(data):
        result.problems.append(
            PageProblem(
                txnid & 1,
                "(meta)",
                f"the meta page says the file holds {last_page + 1} pages; "
                f"it has {len(data) // psize}",
            )
        )
        return result
    result.last_page = last_page
    walk = _Walk(data, psize, last_page, result)
    free_table = walk.tree(FREE_TABLE, free, True, frozenset((0, F_BIGDATA)))
    main_table = walk.tree(MAIN_TABLE, main, False, frozenset((F_SUBDATA,)))
    _named_tables(walk, main_table, tables, main)
    if not free_table.damaged:
        _check_free_pages(walk, free_table)
    return result


def _meta(
    data: bytes, psize: int, index: int, result: FileCheck
) -> tuple[int, int, TableRecord, TableRecord] | None:
    """(transaction id, last page, free list record, table-of-tables record) of a meta page."""
    base = index * psize
    page_no, _pad, flags, _lower, _upper = _HEADER.unpack_from(data, base)
    magic, version, _address, _map_size = _META.unpack_from(data, base + PAGE_HEADER)
    last_page, txnid = _META_TAIL.unpack_from(data, base + _META_TAIL_AT)
    free = TableRecord.parse(data, base + _META_DBS)
    main = TableRecord.parse(data, base + _META_DBS + _DB.size)
    what = ""
    if magic != MAGIC or version != DATA_VERSION:
        what = f"magic {magic:#x} and version {version} are not LMDB's"
    elif page_no != index or flags != P_META:
        what = f"its header names page {page_no} with flags {flags:#x}"
    elif txnid & 1 != index:
        what = f"transaction id {txnid} cannot be stored in meta page {index}"
    elif free.pad != psize or free.flags != MDB_INTEGERKEY or main.flags:
        what = "the records of the free list or of the table of tables are damaged"
    if what:
        result.problems.append(PageProblem(index, "(meta)", f"meta page {index}: {what}"))
        return None
    return txnid, last_page, free, main


def _named_tables(
    walk: _Walk, main_table: Table, expected: Iterable[str], main: TableRecord
) -> None:
    """Walk every named table the table of tables lists; report unknown or missing names."""
    wanted = set(expected)
    for key, value in main_table.records:
        name = key.decode(errors="replace")
        if name not in wanted or len(value) != _DB.size:
            walk.problem(
                main.root,
                MAIN_TABLE,
                f"it lists a table {name!r} this file should not hold (a damaged name?)",
            )
            continue
        record = TableRecord.parse(value)
        if record.flags or record.pad:
            walk.problem(main.root, MAIN_TABLE, f"the record of table {name} is damaged")
            continue
        walk.result.tables[name] = walk.tree(name, record, False, frozenset((0, F_BIGDATA)))
    missing = wanted - set(walk.result.tables)
    if missing and not main_table.damaged:
        walk.problem(main.root, MAIN_TABLE, f"table(s) {', '.join(sorted(missing))} are missing")


def _check_free_pages(walk: _Walk, free_table: Table) -> None:
    """Every page is in exactly one tree or on the free list; none is both, none is lost."""
    free: set[int] = set()
    for key, value in free_table.records:
        count = _U64.unpack_from(value)[0] if len(value) >= 8 else -1
        if len(value) != 8 * (count + 1):
            walk.problem(
                0, FREE_TABLE, f"the free-list record of transaction {key.hex()} is damaged"
            )
            return
        for (page,) in _U64.iter_unpack(value[8:]):
            owner = walk.owner.get(page)
            if page in free or owner is not None or not 2 <= page <= walk.last:
                what = (
                    "listed twice"
                    if page in free
                    else (f"in use by table {owner}" if owner else "outside the file")
                )
                walk.problem(page, FREE_TABLE, f"the free list names page {page}, which is {what}")
                return
            free.add(page)
    lost = walk.last - 1 - len(walk.owner) - len(free)
    if lost:
        first = next(p for p in range(2, walk.last + 1) if p not in walk.owner and p not in free)
        walk.problem(
            first,
            FREE_TABLE,
            f"{lost} page(s), from page {first}, belong to no table and are not free",
        )
