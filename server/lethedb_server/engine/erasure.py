"""Erasure by crypto-shredding: shred epochs, their crash recovery, receipts.

Forgetting a subject (see ``appliers.ForgetApplier``) commits the erasure event
and the tombstone, then deletes the subject's wrapped keys. Deleting is not
enough on its own: LMDB does not zero freed pages, and a backup of the key
store may hold the wrapped key. A **shred epoch** closes that gap:

1. a new master key version is created (and becomes current);
2. a fresh key store is written beside the old one with only live keys,
   re-wrapped under the new version, and fsynced;
3. it replaces the old ``data.mdb`` atomically (rename);
4. the old file is overwritten and removed;
5. every older master key version is destroyed in the keyring;
6. the epoch is recorded in the log, and the receipts of the subjects it
   covered turn to ``shredded``.

After step 5 every stale copy of a forgotten key, wherever it survived, is
wrapped by a key that no longer exists. Each step is journalled in
``<data>/shred.journal``; after a crash the epoch rolls forward at start-up:
from before the swap it is run again, from after the swap it is finished.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import msgspec

from lethedb_server.crypto.keyring import KeyProvider
from lethedb_server.engine.model import ShredResult, SubjectReceipt, SubjectState
from lethedb_server.faults import fault_point
from lethedb_server.files import fsync_dir, overwrite_and_remove, write_atomically
from lethedb_server.storage.codec import EpochRecord, Tombstone
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.log import LogStore

log = logging.getLogger(__name__)

KEY_BACKUP_WARNING = (
    "a key-store backup holds wrapped keys of every subject, including subjects forgotten "
    "after it was taken; they stay unreadable only because the next shred epoch destroys the "
    "master key versions that wrap them, so never keep a copy of the master keyring with it, "
    "and know that it cannot be restored once a shred epoch has run (see docs/ERASURE.md)"
)

JOURNAL = "shred.journal"
NEXT_KEYS = "keys.next"
OLD_KEYS_FILE = "keys.old.mdb"


class _Journal(msgspec.Struct):
    epoch: int
    step: str  # "started" | "swapped"
    master_version: int = 0
    log_head: int = 0  # the log head when the epoch started


class Shredder:
    """Runs shred epochs for one data directory (in the writer thread only)."""

    def __init__(
        self,
        data_dir: Path,
        log_store: LogStore,
        keys: KeyStore,
        provider: KeyProvider,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.data_dir = data_dir
        self.log = log_store
        self.keys = keys
        self.provider = provider
        self.clock = clock

    # -- the epoch ----------------------------------------------------------------

    def run(self) -> ShredResult:
        epoch = self.log.meta.shred_epoch + 1
        head = self.log.meta.last_position
        started = time.monotonic()
        self._journal(_Journal(epoch, "started", 0, head))
        fault_point("shred.started")
        master_version = self.provider.create_version()
        self._journal(_Journal(epoch, "started", master_version, head))
        fault_point("shred.new_master_key")
        next_dir = self.data_dir / NEXT_KEYS
        shutil.rmtree(next_dir, ignore_errors=True)
        live = self.keys.write_compacted(next_dir, master_version)
        fault_point("shred.compacted_written")
        self.keys.swap_file(next_dir / "data.mdb", self.data_dir / OLD_KEYS_FILE)
        fault_point("shred.swapped_before_journal")
        self._journal(_Journal(epoch, "swapped", master_version, head))
        fault_point("shred.swapped")
        result = self._finish(epoch, master_version, live, head)
        log.info(
            "shred epoch %d done in %.2fs: master key version %d, %d live keys re-wrapped, "
            "%d subjects shredded",
            epoch,
            time.monotonic() - started,
            master_version,
            live,
            result.shredded_subjects,
        )
        return result

    def _finish(self, epoch: int, master_version: int, live: int, head: int) -> ShredResult:
        overwrite_and_remove(self.data_dir / OLD_KEYS_FILE)
        shutil.rmtree(self.data_dir / NEXT_KEYS, ignore_errors=True)
        fault_point("shred.old_keys_overwritten")
        for version in self.provider.versions():
            if version != master_version:
                self.provider.destroy_version(version)
        fault_point("shred.old_master_destroyed")
        shredded = sum(1 for _, t in self.log.all_tombstones() if t.shred_epoch == epoch)
        now = self.clock()
        record = EpochRecord(now, master_version, live, shredded, head)
        meta = self.log.meta
        new_meta = msgspec.structs.replace(meta, shred_epoch=epoch)

        def record_epoch(txn: lmdb.Transaction) -> None:
            self.log.put_epoch(txn, epoch, record)
            self.log.put_meta(txn, new_meta)

        self.log.lmdb.write(record_epoch)
        self.log.meta = new_meta
        fault_point("shred.recorded")
        (self.data_dir / JOURNAL).unlink(missing_ok=True)
        fsync_dir(self.data_dir)
        return ShredResult(epoch, master_version, live, shredded, now)

    def _journal(self, entry: _Journal) -> None:
        write_atomically(self.data_dir / JOURNAL, msgspec.json.encode(entry))

    # -- start-up -----------------------------------------------------------------

    def recover(self) -> ShredResult | None:
        """Roll an interrupted epoch forward; called before the writer starts."""
        path = self.data_dir / JOURNAL
        self._discard_stray_old_file()
        if not path.exists():
            shutil.rmtree(self.data_dir / NEXT_KEYS, ignore_errors=True)
            return None
        entry = msgspec.json.decode(path.read_bytes(), type=_Journal)
        log.warning(
            "shred epoch %d was interrupted at step %r; rolling it forward", entry.epoch, entry.step
        )
        if entry.step == "swapped":
            return self._finish(
                entry.epoch, entry.master_version, self.keys.dek_entries(), entry.log_head
            )
        shutil.rmtree(self.data_dir / NEXT_KEYS, ignore_errors=True)
        return self.run()

    def _discard_stray_old_file(self) -> None:
        """Remove ``keys.old.mdb``: unlink it if it is still the live file, else wipe it."""
        old = self.data_dir / OLD_KEYS_FILE
        if not old.exists():
            return
        live = self.keys.lmdb.path / "data.mdb"
        if live.exists() and os.path.samefile(old, live):
            old.unlink()
            fsync_dir(self.data_dir)
        else:
            overwrite_and_remove(old)

    def reapply_tombstones(self) -> int:
        """Make the key store agree with every tombstone in the log.

        A crash between a forget's commit and its key deletion, or a key store
        restored from an old backup, leaves keys of forgotten subjects behind.
        Returns how many wrapped keys had to be deleted; when it is not zero the
        caller runs a shred epoch, since stale copies may now sit in free pages.
        """
        stale: dict[str, Tombstone] = {
            subject: tombstone
            for subject, tombstone in self.log.all_tombstones()
            if not self.keys.is_forgotten(subject) or self.keys.versions_of(subject)
        }
        deleted = self.keys.forget(stale)
        if deleted:
            log.warning(
                "re-applied %d tombstones at start-up; %d keys of forgotten subjects deleted",
                len(stale),
                deleted,
            )
        return deleted


def shredded_through(log_store: LogStore) -> int:
    """The log head at the start of the last completed shred epoch (0: none, or unknown).

    Every tombstone at or before it carries an epoch at or before that one,
    so its subject's keys are destroyed on this node.
    """
    epoch = log_store.meta.shred_epoch
    record = log_store.epoch(epoch) if epoch else None
    return 0 if record is None else record.log_head


def subject_receipt(log_store: LogStore, keys: KeyStore, subject_id: str) -> SubjectReceipt:
    """What the store can show about a subject: state, counts, legal hold."""
    tombstone, hold = log_store.subject_status(subject_id)
    if tombstone is None:
        tombstone = keys.forgotten_tombstone(subject_id)
    count = log_store.count_subject_events(subject_id)
    receipt = SubjectReceipt(subject_id, SubjectState.ACTIVE, event_count=count)
    if tombstone is not None:
        shredded = log_store.meta.shred_epoch >= tombstone.shred_epoch
        epoch = log_store.epoch(tombstone.shred_epoch) if shredded else None
        receipt = msgspec.structs.replace(
            receipt,
            state=SubjectState.SHREDDED if shredded else SubjectState.FORGOTTEN_PENDING_SHRED,
            tombstone_position=tombstone.position,
            forgotten_at=tombstone.forgotten_at,
            reason=tombstone.reason,
            shred_epoch=tombstone.shred_epoch,
            shredded_at=epoch.completed_at if epoch else 0,
        )
    if hold is not None:
        receipt = msgspec.structs.replace(
            receipt,
            hold_reason=hold.reason,
            hold_set_at=hold.set_at,
            hold_until=hold.until,
            on_hold=hold.active(time.time_ns()),
        )
    return receipt
