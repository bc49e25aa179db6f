"""Durable, private file operations outside LMDB: atomic replacement, directory
fsync, wiping, and the modes every file and directory LetheDB creates gets.

Every small file LetheDB rewrites (the master keyring, the tokens file, the
shred journal) goes through :func:`write_atomically`, so a crash leaves the old
or the new content, never a torn file, and never a file others can read.

Everything LetheDB writes holds personal data (encrypted or not) or keys, so
directories are created 0700 and files 0600 whatever the process's umask: the
mode is passed to the call that creates the file (a umask can only narrow it,
so there is no moment at which the file is wider), never set by changing the
umask, which is process-wide and would race with other threads.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dir(path: Path) -> None:
    """Create directory *path* (and missing parents) mode 0700, unless it exists.

    An existing directory keeps its mode: what an operator set is reported
    (:func:`wide_modes`), not silently changed. The mode is set again after
    ``mkdir`` because a umask that clears owner bits would narrow it too far.
    """
    if path.is_dir():
        return
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that creates *path* mode 0600 (an existing file keeps its mode)."""
    return os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)


def wide_modes(roots: Iterable[Path]) -> list[str]:
    """One line for each path under *roots* (the roots too) that group or others may open.

    Each line names the path, its mode and the command that makes it private.
    A root may be a symbolic link; links below it are not followed.
    """
    lines: list[str] = []
    for root in roots:
        if not root.exists():
            continue
        found = [(root, root.stat())]
        for parent, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = Path(parent, name)
                try:
                    found.append((path, path.lstat()))
                except FileNotFoundError:
                    continue
        for path, info in found:
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode) or not mode & 0o077:
                continue
            fix = "700" if stat.S_ISDIR(info.st_mode) else "600"
            lines.append(
                f"{path} is mode {mode:04o}: other local users can open it; run: chmod {fix} {path}"
            )
    return lines


def write_atomically(path: Path, content: bytes) -> None:
    """Replace *path* with *content*: never torn, mode 0600, durable on return."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
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
