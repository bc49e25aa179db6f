"""The subject indexer: merges newly written events into the subject index.

Appends do not write the ``subject_index`` database: that would cost a
B-tree insert per event in the commit every append waits for. The writer
merges the unindexed tail instead, between batches and in its own write
transactions, a bounded chunk at a time (each merge stalls appends), and
readers scan whatever tail is not merged yet. The keys each batch wrote are
remembered (``KnownIndexKeys``) so a merge need not decode those records
again.

Runs only in the writer thread.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import lmdb

from lethedb_server.errors import LetheError
from lethedb_server.faults import fault_point
from lethedb_server.storage.codec import LogMeta
from lethedb_server.storage.log import KnownIndexKeys, LogStore

log = logging.getLogger(__name__)

#: Seconds between attempts after a subject index merge failed.
_MERGE_RETRY_S: Final = 1.0


class SubjectIndexer:
    """Keeps the subject index complete through the log's head, a chunk at a time."""

    def __init__(self, log_store: LogStore, chunk: int) -> None:
        self.log = log_store
        self.chunk = chunk
        self._retry_at = 0.0
        self._known_keys = KnownIndexKeys(log_store.meta.last_position + 1, cap=4 * chunk)

    def unindexed(self) -> int:
        """Events after the position through which the subject index is complete."""
        meta = self.log.meta
        return meta.last_position - meta.subject_indexed

    def written(self, first_position: int, index_keys: list[bytes]) -> None:
        """A batch committed the events from *first_position* on, with these index keys."""
        self._known_keys.record(first_position, index_keys)

    def merge(self) -> bool:
        """Merge up to a chunk of unindexed events into the subject index; False if it failed.

        A failure (a full disk, a damaged record) loses nothing: readers
        scan the tail, and a merge is tried again after a pause, so a
        lasting failure costs no work per batch.
        """
        if time.monotonic() < self._retry_at:
            return False
        log_store, limit, known = self.log, self.chunk, self._known_keys

        def merge(txn: lmdb.Transaction) -> LogMeta:
            merged = log_store.merge_subject_index(txn, log_store.meta, limit, known)
            fault_point("index.merge_before_commit")
            return merged

        try:
            log_store.meta = log_store.lmdb.write(merge)
        except (LetheError, lmdb.Error) as exc:
            log.warning("subject index merge failed; readers scan the tail meanwhile: %s", exc)
        except Exception:
            log.exception("subject index merge failed; readers scan the tail meanwhile")
        else:
            known.merged_through(log_store.meta.subject_indexed)
            return True
        self._retry_at = time.monotonic() + _MERGE_RETRY_S
        return False

    def truncated(self) -> None:
        """The log's tail was discarded: the keys remembered for it are wrong now."""
        self._known_keys = KnownIndexKeys(self.log.meta.last_position + 1, cap=4 * self.chunk)

    def catch_up(self) -> None:
        """Merge while a whole chunk is waiting (after a batch): appends stall per chunk."""
        while self.unindexed() >= self.chunk:
            if not self.merge():
                break

    def merge_whole_tail(self) -> None:
        """Merge chunk after chunk until the index is complete (or a merge fails)."""
        while self.unindexed() and self.merge():
            pass
