"""Only storage/log.py touches the log's LMDB tables; everyone else calls LogStore.

``LogStore`` owns every read and write of the log's tables (issue 20): the
key layout, the encoding and the invariants between tables (an idempotency
entry and its expiry key, an event and its stream index key) live in one
module. This test reads every other module of the server and fails where one
reaches past ``LogStore`` into a table: names one of its table attributes
on a LogStore (``db=log_store.idempotency``, ``db=self.log.epochs``,
``txn.stat(log_store.events)``) or anything ``.meta_db``. The offline
tools that open the environment raw, without a ``LogStore`` (engine/audit.py,
custody.read_state), name tables by string and are not affected.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import lethedb_server

PACKAGE = Path(lethedb_server.__file__).resolve().parent
OWNER = PACKAGE / "storage" / "log.py"
# Names a LogStore is held under: log_store, log, self.log, self.ctx.log, ctx.log ...
STORE_NAMES = {"log_store", "log"}


def table_attributes() -> set[str]:
    """The attributes LogStore.__init__ binds to its named databases (``db["..."]``)."""
    tree = ast.parse(OWNER.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == "LogStore"):
            continue
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Assign)
                and isinstance(sub.value, ast.Subscript)
                and isinstance(sub.value.value, ast.Name)
                and sub.value.value.id == "db"
            ):
                for target in sub.targets:
                    if isinstance(target, ast.Attribute):
                        found.add(target.attr)
    return found


def held_store(node: ast.expr) -> bool:
    """Whether *node* is a name a LogStore is held under (``log_store``, ``x.log``)."""
    if isinstance(node, ast.Name):
        return node.id in STORE_NAMES
    return isinstance(node, ast.Attribute) and node.attr in STORE_NAMES


def violations(path: Path, tables: set[str]) -> Iterator[str]:
    """Each place in *path* that touches a LogStore table directly."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and (
            node.attr == "meta_db" or (node.attr in tables and held_store(node.value))
        ):
            yield f"{where}: {ast.unparse(node)}"


def test_table_attributes_are_found() -> None:
    """The walk reads LogStore's tables (a rename there must not blind this test)."""
    assert {"events", "streams", "epochs", "idempotency", "idempotency_expiry", "meta_db"} <= (
        table_attributes()
    )


def test_only_log_store_touches_the_log_tables() -> None:
    tables = table_attributes()
    found = [
        v
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != OWNER
        for v in violations(path, tables)
    ]
    assert not found, "tables of the log reached past LogStore (add a LogStore method):\n" + (
        "\n".join(found)
    )
