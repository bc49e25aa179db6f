"""``Store`` is the engine's one façade: nothing in the server reaches through it.

Handlers, subscriptions, metrics and the server wiring call the store's domain
operations (append, commit, read, forget, shred, ...), never the log, key
store, writer or reader it holds. This walks every server module's syntax tree
so a new reach-through fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lethedb_server

#: The parts a Store holds; only the store module itself may touch them.
PARTS = frozenset({"log", "keys", "writer", "reader", "provider"})
#: Names under which the server holds a Store.
STORE_NAMES = frozenset({"store", "_store"})
#: Wiring that is not an operation, (file, expression): none; the metrics
#: observer is a constructor argument (``Store.open(..., observer=)``).
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def _holds_store(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in STORE_NAMES
    return isinstance(node, ast.Attribute) and node.attr in STORE_NAMES


def _reach_throughs(path: Path) -> list[str]:
    """Each ``<store>.<part>`` in *path*, as "file:line expression"."""
    source = path.read_text()
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in PARTS):
            continue
        if not _holds_store(node.value):
            continue
        whole: ast.AST = parents.get(node, node)
        text = ast.get_source_segment(source, whole) or node.attr
        if (path.name, text) in ALLOWED:
            continue
        found.append(f"{path.name}:{node.lineno} {text}")
    return found


def test_no_server_module_reaches_through_the_store_into_its_parts():
    package = Path(lethedb_server.__file__).parent
    modules = [p for p in sorted(package.rglob("*.py")) if p.name != "store.py"]
    assert len(modules) > 20  # the walk found the package
    offenders = [hit for module in modules for hit in _reach_throughs(module)]
    # Call a Store operation (add one named for the domain operation) instead.
    assert offenders == []


def test_the_check_sees_a_reach_through(tmp_path):
    """The walk is not blind: the shapes the api layer used to have are caught."""
    module = tmp_path / "service.py"
    module.write_text(
        "async def f(self, engine, store):\n"
        "    await self.store.writer.submit_async(1)\n"
        "    engine.store.log.head\n"
        "    store.keys.cache_hits\n"
        "    self._store.reader.open(1, b'')\n"
    )
    assert len(_reach_throughs(module)) == 4
