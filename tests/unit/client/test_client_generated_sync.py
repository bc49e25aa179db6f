"""The blocking SDK modules are generated from their asyncio sources and must be fresh.

``client/generate_sync.py`` turns each asyncio source (``_async_client.py``,
``_async_admin.py``, ``_async_transport.py``) into its blocking twin; an edit
of a source without regenerating (``make sync-client``), or an edit of a
generated file, fails here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "client" / "generate_sync.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_sync", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


@pytest.mark.parametrize("source", sorted(GENERATOR.FILES))
def test_the_generated_blocking_module_is_fresh(source: str):
    generated = GENERATOR.PACKAGE / GENERATOR.FILES[source]
    assert generated.read_text() == GENERATOR.generate(source), (
        f"{generated.name} is stale or was edited by hand; edit {source} and run `make sync-client`"
    )


def test_a_generated_module_says_it_is_generated():
    for source, name in GENERATOR.FILES.items():
        first = (GENERATOR.PACKAGE / name).read_text().splitlines()[0]
        assert (
            first == f"# Generated from lethedb/{source} by client/generate_sync.py: do not edit."
        )


def test_the_blocking_forms_replace_the_asyncio_ones():
    text = GENERATOR.unasync(
        "import asyncio\nasync def f(x: AsyncClient) -> AsyncIterator[int]:\n"
        "    async for item in x.call():\n        await asyncio.sleep(1)\n"
    )
    assert text == (
        "import time\ndef f(x: Client) -> Iterator[int]:\n"
        "    for item in x.call():\n        time.sleep(1)\n"
    )
