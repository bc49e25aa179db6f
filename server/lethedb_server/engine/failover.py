"""Failover in the engine: where two logs part, and a deposed node's truncation.

The election (``coord/``) decides who leads; these are the rules that make a
change of leader lose nothing acknowledged (docs/ARCHITECTURE.md, "Failover").
``Store.promote``, ``Store.demote`` and ``Store.truncate_after`` run them in
the writer thread, between batches, so every write is ordered against them.
No grpc: the api layer carries a follower's last entry to
:func:`divergence_point` and the answer back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from lethedb_server.engine.model import ForgetCommand
from lethedb_server.engine.writer import Writer
from lethedb_server.errors import ReplicationRefused
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.log import LogStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TruncationReport:
    """What ``Store.truncate_after`` discarded (nothing when ``discarded_commits`` is 0)."""

    #: The journal head and the log head after the truncation.
    commit: int
    position: int
    #: How many commits were discarded: ``commit + 1`` .. ``commit + discarded_commits``.
    discarded_commits: int
    #: The positions whose records were discarded (last < first: none).
    first_position: int
    last_position: int
    #: Subjects forgotten by a discarded commit: their tombstones went with it,
    #: and they stay forgotten on this node (their keys are already destroyed).
    forgotten_kept: tuple[str, ...]
    #: ``legal_holds`` and ``checkpoints`` rows a discarded commit wrote: deleted
    #: here (the journal keeps no old value) until the leader's refresh
    #: (``frames_after(refresh=True)``) sends them again.
    unrestored: tuple[tuple[str, bytes], ...]


def divergence_point(log_store: LogStore, follower_commit: int, follower_term: int) -> int:
    """The highest commit a follower's log can share with this one (see
    ``Store.divergence_point``)."""
    if follower_commit <= 0:
        return 0
    with log_store.lmdb.read() as txn:
        entry = log_store.journal_entry(txn, follower_commit)
        if entry is not None and entry.term == follower_term:
            return follower_commit
        commit = min(follower_commit - 1, log_store.journal_head)
        while commit > 0:  # terms only grow along a log: the first one at most the
            earlier = log_store.journal_entry(txn, commit)  # follower's is the answer
            if earlier is not None and earlier.term <= follower_term:
                return commit
            commit -= 1
    return 0


def truncate(
    log_store: LogStore, keys: KeyStore, writer: Writer, commit: int, sync_replicas: int
) -> TruncationReport:
    """Discard the commits after *commit* (in the writer thread; the caller checked the role).

    Refuses (ReplicationRefused, nothing changed) to discard a commit at or
    below the writer's acknowledged commit. The key store's high-water mark
    goes down first, then the log's one transaction (see
    ``LogStore.truncate_after``); the writer forgets the index keys it kept.
    """
    head = log_store.journal_head
    if commit >= head:
        position = log_store.head
        return TruncationReport(head, position, 0, position + 1, position, (), ())
    acknowledged = writer.acknowledged
    if commit < acknowledged:
        raise ReplicationRefused(
            f"truncating after commit {commit} would discard commits {commit + 1}.."
            f"{acknowledged}, which this node acknowledged to clients as durable"
            + _acknowledged_why(sync_replicas)
            + "; nothing was discarded: an operator must decide (restore this node from "
            "the new leader, or make it lead again)"
        )
    keys.lower_log_position(log_store.head_after_commit(commit))
    done = log_store.truncate_after(commit)
    writer.truncated()
    report = TruncationReport(
        commit, log_store.head, done.commits, done.first_position, done.last_position,
        done.tombstones_removed, done.unrestored,
    )  # fmt: skip
    _log_truncation(report, max(log_store.node.term, log_store.journal_term))
    return report


def _acknowledged_why(sync_replicas: int) -> str:
    if sync_replicas:
        return f" (held by the {sync_replicas} followers sync_replicas asks for)"
    return " (without sync_replicas every commit of a leader is acknowledged once it is durable)"


def _log_truncation(report: TruncationReport, term: int) -> None:
    log.warning(
        "TRUNCATED the unacknowledged tail to follow term %d: discarded commits %d..%d "
        "(positions %d..%d); the log now ends at commit %d, position %d",
        term, report.commit + 1, report.commit + report.discarded_commits,
        report.first_position, report.last_position, report.commit, report.position,
    )  # fmt: skip
    if report.forgotten_kept:
        log.warning(
            "%d subjects forgotten by the discarded commits stay forgotten on this node "
            "(their keys are destroyed); a retried forget records it again cluster-wide",
            len(report.forgotten_kept),
        )
    if report.unrestored:
        log.warning(
            "%d legal hold and checkpoint rows written by the discarded commits are deleted "
            "here until the leader's refresh sends them", len(report.unrestored),
        )  # fmt: skip


def forget_again(log_store: LogStore, keys: KeyStore, writer: Writer) -> int:
    """Forget, in the log, each subject only the key store remembers forgotten; how many.

    A new leader whose discarded tail held a forget: its keys are gone here,
    so the erasure must reach the log and every node. Queued, not awaited: a
    legal hold is logged, and the subject stays forgotten here either way.
    """
    in_log = {subject for subject, _ in log_store.all_tombstones()}
    missing = sorted(keys.forgotten_subjects() - in_log)
    for subject in missing:
        tombstone = keys.forgotten_tombstone(subject)
        reason = tombstone.reason if tombstone is not None else "forgotten before failover"
        future = writer.submit(ForgetCommand(subject, reason, "failover"))
        future.add_done_callback(_log_forget_again(subject))
    return len(missing)


def _log_forget_again(subject: str) -> Callable[[Future[object]], None]:
    def done(future: Future[object]) -> None:
        error = future.exception()
        if error is None:
            log.info("recorded the erasure of a subject forgotten before the failover")
        else:
            log.error("could not record the erasure of %r, forgotten here before the failover "
                      "(it stays forgotten on this node): %s", subject, error)  # fmt: skip

    return done
