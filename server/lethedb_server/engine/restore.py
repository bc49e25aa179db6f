"""``lethedb restore``: put a backup back into a data directory without losing an erasure.

A backup (``lethedb backup``) holds the log and, with ``--include-keys``, a
copy of the key store; never the keyring. What makes a restore keep every
erasure is the choice of key store:

* the data directory's **current key store** is kept whenever it exists: it
  remembers every subject forgotten since the backup (start-up redacts and
  refuses them, and writes their erasures back into the restored log), and
  its keys are wrapped by the current master key versions;
* the backup's key store is used only when the directory has none left. It
  does not know subjects forgotten after the backup, and once a shred epoch
  has run since the backup it is useless (its keys are wrapped by destroyed
  master versions; start-up then refuses the keyring, which says so).

The directory's old log is never deleted: it is moved aside, since it may be
the only copy of the newest events. Nothing here starts a server or accepts
a restored log; the command ends by saying what ``lethedb serve`` will say.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from lethedb_server.engine import custody
from lethedb_server.engine.store import lock_data_dir
from lethedb_server.errors import DataDirDamaged, LetheError, RestoredLog, ValidationError
from lethedb_server.files import fsync_dir


def restore(
    backup: Path, data_dir: Path, keyring_path: Path | None = None
) -> tuple[int, list[str]]:
    """Restore *backup* into *data_dir*; return (exit status, lines for the operator).

    Exit status 0: restored, and ``lethedb serve`` will start (perhaps only
    with ``--accept-restored-log``, which the lines say); 2: restored, but
    the directory will not start as it is (the lines say why).
    """
    keyring_path = keyring_path or data_dir / "master.keyring"
    if not (backup / "log" / "data.mdb").is_file():
        raise ValidationError(f"{backup} is not a LetheDB backup: it has no log/data.mdb")
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(data_dir)
    try:
        lines = _put_back(backup, data_dir)
        return _outlook(data_dir, keyring_path, lines)
    finally:
        lock.close()


def _put_back(backup: Path, data_dir: Path) -> list[str]:
    backup_state = custody.read_state(backup)
    current = custody.read_state(data_dir)
    keys_here = (data_dir / "keys" / "data.mdb").is_file()
    keys_in_backup = (backup / "keys" / "data.mdb").is_file()
    bound_to = current.key_meta.store_id if keys_here and current.key_meta else None
    if bound_to is not None and bound_to != backup_state.log_store_id:
        backup_id = (backup_state.log_store_id or b"").hex()
        raise DataDirDamaged(
            f"{backup} is a backup of store {backup_id}, but the key store "
            f"{data_dir / 'keys'} belongs to store {bound_to.hex()}; nothing was changed"
        )
    if not keys_here and current.log_head > backup_state.log_head:
        raise DataDirDamaged(
            f"{data_dir / 'log'} is intact up to position {current.log_head:,}, newer than the "
            f"backup's {backup_state.log_head:,}, and only the key store is missing: copy the "
            'backup\'s keys/ in by hand (docs/OPERATIONS.md, "Losing only the key store"), '
            "or move log/ away first to restore both; nothing was changed"
        )
    if not keys_here and not keys_in_backup:
        raise DataDirDamaged(
            f"no key store to restore with: {data_dir / 'keys'} does not exist and {backup} has "
            "none (lethedb backup --include-keys); a log cannot be read without its key store; "
            "nothing was changed"
        )
    lines = []
    if (data_dir / "log").exists():
        aside = data_dir / f"log.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        (data_dir / "log").rename(aside)
        fsync_dir(data_dir)
        lines.append(f"moved the old log aside to {aside} (delete it once the restore is verified)")
    _copy_env(backup / "log", data_dir / "log")
    lines.append(f"restored the log from {backup} (up to position {backup_state.log_head:,})")
    if keys_here:
        lines.append(
            f"kept the current key store {data_dir / 'keys'}: it remembers every subject "
            "forgotten since the backup, so their erasures hold"
        )
    else:
        _copy_env(backup / "keys", data_dir / "keys")
        lines.append(
            f"restored the key store from {backup}: subjects forgotten after the backup are "
            "unknown to it; forget them again (lethedb forget ID) and run lethedb shred before "
            "clients connect (see docs/OPERATIONS.md)"
        )
    return lines


def _outlook(data_dir: Path, keyring_path: Path, lines: list[str]) -> tuple[int, list[str]]:
    """What ``lethedb serve`` will say about the restored directory (read-only)."""
    try:
        custody.preflight(data_dir, keyring_path, None, accept_restored_log=False)
    except RestoredLog as exc:
        lines.append(f"{exc}")
        lines.append(
            f"next: lethedb serve --data {data_dir} --accept-restored-log (once), then "
            "lethedb verify; rebuild projections that read past the restored head"
        )
        return 0, lines
    except LetheError as exc:
        lines.append(f"the restored directory will not start as it is: {exc}")
        return 2, lines
    lines.append(f"next: lethedb serve --data {data_dir}, then lethedb verify")
    return 0, lines


def _copy_env(source: Path, target: Path) -> None:
    """Copy an environment's ``data.mdb`` durably: beside the target, fsync, rename."""
    staging = target.with_name(target.name + ".restoring")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    fd = os.open(staging / "data.mdb", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, (source / "data.mdb").open("rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(staging)
    staging.rename(target)
    fsync_dir(target.parent)
