"""Durable file operations outside LMDB: atomic replacement, directory fsync, wiping.

Every small file LetheDB rewrites (the master keyring, the tokens file, the
shred journal) goes through :func:`write_atomically`, so a crash leaves the old
or the new content, never a torn file, and never a file others can read.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, content: bytes) -> None:
    """Replace *path* with *content*: never torn, mode 0600, durable on return."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in *directory* durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def overwrite_and_remove(path: Path, chunk: int = 1 << 20) -> None:
    """Overwrite a file's bytes with zeros, fsync, then unlink it.

    On a journaling or copy-on-write file system the old blocks may survive
    elsewhere; what this guarantees is that the file's own extent no longer
    holds them, and the erasure guarantee never rests on it alone: every key
    copy it held is wrapped by a master key version destroyed afterwards.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    zeros = bytes(chunk)
    with path.open("r+b") as f:
        written = 0
        while written < size:
            written += f.write(zeros[: min(chunk, size - written)])
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    fsync_dir(path.parent)
