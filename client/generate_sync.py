"""Generate the blocking SDK modules from their asyncio sources (as httpcore does with unasync).

The asyncio client is the source; each blocking module is the same code with
``await``, ``async for`` and the ``Async`` names replaced by their blocking
forms, then import-sorted and formatted by ruff. Run it after editing a
source (``make sync-client``); ``--check`` exits 1 when a generated file is
stale, and tests/unit/client/test_client_generated_sync.py fails then too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent / "lethedb"

#: asyncio source -> generated blocking module, both in the lethedb package.
FILES = {
    "_async_transport.py": "_transport.py",
    "_async_admin.py": "_admin.py",
    "_async_client.py": "_client.py",
}

#: Whole phrases first (they hold tokens replaced below), then tokens, in order.
PHRASES = [
    (
        "An asyncio LetheDB client; create and use it inside the one event loop it serves.",
        "A blocking LetheDB client; safe to share between threads.",
    ),
    ("(from several tasks)", "(from several threads)"),
    ("import grpc.aio\n", ""),
    ("call.cancel()", "call.cancel()  # type: ignore[no-untyped-call]"),
    ("await node.channel.close(None)", "node.channel.close()"),
]
TOKENS = [
    (r"\basync def\b", "def"),
    (r"\basync for\b", "for"),
    (r"\basync with\b", "with"),
    (r"\bfor (\w+) in (.+):\n\s+yield \1$", r"yield from \2"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"^import asyncio$", "import time"),
    (r"\bgrpc\.aio\.", "grpc."),
    (r"\b(EventStore|Admin)AsyncStub\b", r"\1Stub"),
    (r"\blethedb\._async_(\w+)", r"lethedb._\1"),
    (r"\bAsync(Client|AdminClient|Transport|Subscription|AppendSender|ClosingContext)\b", r"\1"),
    (r"\bThe asyncio client, on ``grpc\.aio``", "The blocking client, on ``grpc``"),
]


def header(source: str) -> str:
    return (
        f"# Generated from lethedb/{source} by client/generate_sync.py: do not edit.\n"
        "# Edit the asyncio source and run `make sync-client`.\n"
    )


def unasync(text: str) -> str:
    """The blocking form of one asyncio source text, before formatting."""
    for old, new in PHRASES:
        text = text.replace(old, new)
    for pattern, replacement in TOKENS:
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
    return text


def _ruff(args: list[str], text: str, filename: str) -> str:
    command = [sys.executable, "-m", "ruff", *args, "--stdin-filename", filename, "-"]
    done = subprocess.run(command, input=text, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ruff {' '.join(args)} failed on {filename}:\n{done.stderr}")
    return done.stdout


def generate(source: str) -> str:
    """The generated text of the blocking twin of ``source`` (a name from :data:`FILES`)."""
    target = PACKAGE / FILES[source]
    text = header(source) + unasync((PACKAGE / source).read_text())
    text = _ruff(["check", "--fix", "--select", "I,F401", "--quiet"], text, str(target))
    return _ruff(["format", "--quiet"], text, str(target))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for source, name in FILES.items():
        target = PACKAGE / name
        text = generate(source)
        if target.exists() and target.read_text() == text:
            continue
        stale.append(name)
        if not check:
            target.write_text(text)
    if stale:
        verb = "stale" if check else "written"
        print(f"{verb}: {', '.join(stale)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
