"""Appliers: how each kind of command changes the log, inside the writer's transaction.

The group committer (:mod:`writer`) owns queueing, batching, the one commit
and settlement; for each command of a batch it opens a nested transaction
and hands it to the applier registered for the command's type. An applier
writes, returns the command's result or raises a LetheError (the nested
transaction is then aborted and the neighbours are unaffected), and records
what the batch changes besides the transaction in :class:`BatchState`.

One applier per command kind, all sharing an :class:`ApplyContext` (the
stores, the idempotency table, the writer's clock). A new kind of write (a
commit received from a replication leader, say) is one more applier
registered in :func:`default_appliers`, not a change to the writer.

Appliers run only in the writer thread; they never commit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import lmdb
import msgspec

from lethedb_server.crypto.aead import new_nonces
from lethedb_server.engine.idempotency import IdempotencyTable, fingerprint
from lethedb_server.engine.model import (
    ERASURE_EVENT_TYPE,
    ERASURE_STREAM,
    STORE_SUBJECT,
    AppendCommand,
    CheckpointCommand,
    Command,
    CommitCommand,
    CommitResult,
    ExpectedState,
    ForgetCommand,
    LegalHoldCommand,
    ProposedEvent,
    SubjectReceipt,
    SubjectState,
)
from lethedb_server.engine.record_codec import RecordSealer
from lethedb_server.errors import (
    LegalHoldActive,
    PermissionDenied,
    SubjectForgotten,
    TooManyGroups,
    WrongExpectedVersion,
)
from lethedb_server.storage import codec
from lethedb_server.storage.codec import AppendResult, LegalHold, LogMeta, NodeState, Tombstone
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.log import LogStore

#: A CheckpointCommand's result is the position it stored.
Result = AppendResult | CommitResult | SubjectReceipt | int
_ERASURE_CONTENT_TYPE: Final = "application/json"


@dataclass
class BatchState:
    """What applying a batch changes besides the transaction: undone on failure."""

    meta: LogMeta
    forgotten: dict[str, Tombstone]
    commit_seconds: float = 0.0
    #: The ``subject_index`` keys of the events written, in position order.
    index_keys: list[bytes] = field(default_factory=list)
    #: The replicated side table rows written or deleted, as (table, key): the
    #: batch's journal entry names them (see engine/replication.py).
    touched: list[tuple[str, bytes]] = field(default_factory=list)
    #: The last journal entry's commit number and term, including the frames a
    #: follower applied in this batch.
    journal_head: int = 0
    journal_term: int = 0
    #: Whether the batch wrote a journal entry of its own (a leader's commit).
    own_entry: bool = False
    #: This node's record, when the batch moves its acknowledged commit.
    node: NodeState | None = None


class ApplyContext:
    """What every applier shares: the log, the key store, the idempotency table, the clock."""

    def __init__(
        self,
        log_store: LogStore,
        keys: KeyStore,
        idempotency: IdempotencyTable,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.log = log_store
        self.keys = keys
        self.idempotency = idempotency
        self.clock = clock
        self._last_now = 0

    def now(self) -> int:
        """Wall-clock time that never goes backwards within this process.

        Positions and versions never depend on time; this only keeps
        ``recorded_at`` non-decreasing in log order when the clock is set back.
        """
        now = max(self.clock(), self._last_now)
        self._last_now = now
        return now

    def is_forgotten(self, subject_id: str, batch: BatchState) -> bool:
        """Whether *subject_id* has a tombstone, committed or earlier in this batch.

        No LMDB lookup: the writer is the only writer of tombstones, the key
        store's set holds every committed one (start-up re-applies them all,
        and each forget adds its subjects right after its commit), and the
        batch's own forgets are in ``batch.forgotten``.
        """
        return self.keys.is_forgotten(subject_id) or subject_id in batch.forgotten

    def refuse_forgotten(self, subjects: Iterable[str], batch: BatchState) -> None:
        """Raise SubjectForgotten for the first forgotten subject, in request order."""
        for subject_id in subjects:
            if subject_id and self.is_forgotten(subject_id, batch):
                raise SubjectForgotten(subject_id)


class Applier(Protocol):
    """Applies one kind of command in the writer's nested transaction *txn*."""

    def apply(self, txn: lmdb.Transaction, command: Any, batch: BatchState) -> Result:
        """Write *command*; return its result, or raise a LetheError (nothing of it kept)."""
        ...


def default_appliers(ctx: ApplyContext) -> dict[type[Command], Applier]:
    """The applier of every command kind the writer applies in a batch."""
    appends = AppendApplier(ctx)
    return {
        AppendCommand: appends,
        CommitCommand: CommitApplier(ctx, appends),
        ForgetCommand: ForgetApplier(ctx, appends),
        LegalHoldCommand: LegalHoldApplier(ctx),
        CheckpointCommand: CheckpointApplier(ctx),
    }


# -- appends ----------------------------------------------------------------------


class AppendApplier:
    """Appends one stream's events: the write hot path."""

    def __init__(self, ctx: ApplyContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.keys = ctx.keys

    def apply(self, txn: lmdb.Transaction, command: AppendCommand, batch: BatchState) -> Result:
        result, batch.meta = self.append(txn, command, batch.meta, batch)
        return result

    def append(
        self,
        txn: lmdb.Transaction,
        command: AppendCommand,
        meta: LogMeta,
        batch: BatchState,
        now: int = 0,
    ) -> tuple[AppendResult, LogMeta]:
        """Append one stream's events after *meta*; their index keys go to *batch*.

        *now* lets a commit give all its parts one time.

        A forgotten subject is refused before the idempotency entry is looked
        at: a retry after a forget must not learn whether its data matches
        the first attempt's (IdempotencyConflict against deduplicated would
        confirm a guess at erased data).
        """
        ctx = self.ctx
        now = now or ctx.now()
        events = command.events
        subjects = dict.fromkeys(event.subject_id for event in events)
        ctx.refuse_forgotten(subjects, batch)
        digest = b""
        if command.idempotency_key:
            digest = fingerprint(self.keys, command.request_hash(), subjects)
            previous = ctx.idempotency.append_result(txn, command.idempotency_key, digest, now)
            if previous is not None:
                return previous, meta
        stream_id = command.stream_id
        info = self.log.stream_info(txn, stream_id)
        _check_expected(command, None if info is None else info.last_version)

        version = 0 if info is None else info.last_version + 1
        position = meta.last_position + 1
        chain = meta.chain_head
        first_position, first_version = position, version
        # Per-event costs are what this loop is about: randomness comes from
        # one urandom call per append, keys and key prefixes are looked up
        # once per subject, and names are bound once.
        seal = RecordSealer(meta.store_id, stream_id, now).seal
        put_event, u64 = self.log.put_event, codec.u64
        remember_key = batch.index_keys.append
        stream_key = codec.stream_prefix(stream_id)
        index_prefixes = {s: codec.subject_prefix(s) for s in subjects}
        ciphers = self.keys.take_each([e.subject_id or STORE_SUBJECT for e in events])
        nonces = new_nonces(len(events))
        new_ids = _new_event_ids(len(events)) if any(not e.event_id for e in events) else ()
        for i, event in enumerate(events):
            dek_version, aead = ciphers[i]
            value, chain = seal(
                chain, position, version, event, event.event_id or new_ids[i],
                dek_version, aead, nonces[i],
            )  # fmt: skip
            position_key = u64(position)
            put_event(txn, position_key, value, stream_key + u64(version))
            remember_key(index_prefixes[event.subject_id] + position_key)
            position += 1
            version += 1

        created_at = now if info is None else info.created_at
        first = first_position if info is None else info.first_position
        self.log.put_stream_info(
            txn, command.stream_id, codec.StreamInfo(version - 1, first, created_at)
        )
        touched = batch.touched
        touched.append(("streams", command.stream_id.encode()))
        result = AppendResult(first_position, position - 1, first_version, version - 1, now)
        if command.idempotency_key:
            ctx.idempotency.remember(txn, command.idempotency_key, digest, result, now)
            touched.append(("idempotency", command.idempotency_key.encode()))
        new_meta = LogMeta(
            meta.format, meta.store_id, position - 1, chain, meta.shred_epoch,
            meta.subject_indexed,
        )  # fmt: skip
        return result, new_meta


def _check_expected(command: AppendCommand, last_version: int | None) -> None:
    state = command.expected_state
    ok = (
        state is ExpectedState.ANY
        or (state is ExpectedState.NO_STREAM and last_version is None)
        or (state is ExpectedState.STREAM_EXISTS and last_version is not None)
        or (state is ExpectedState.EXACT and last_version == command.expected_version)
    )
    if not ok:
        raise WrongExpectedVersion(command.stream_id, command.describe_expected(), last_version)


def _new_event_ids(count: int) -> list[bytes]:
    """*count* random (version 4) UUIDs as bytes, from one urandom call.

    ``uuid.uuid4().bytes`` costs a system call and a UUID object per event;
    this sets the same version and variant bits on one block of randomness.
    """
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
    return [bytes(raw[i : i + 16]) for i in range(0, len(raw), 16)]


class CommitApplier:
    """Every stream's append or none: a failing part aborts the nested transaction."""

    def __init__(self, ctx: ApplyContext, appends: AppendApplier) -> None:
        self.ctx = ctx
        self.appends = appends

    def apply(self, txn: lmdb.Transaction, command: CommitCommand, batch: BatchState) -> Result:
        """A forgotten subject in any part is refused before the idempotency entry
        is looked at (see :meth:`AppendApplier.append`)."""
        ctx = self.ctx
        now = ctx.now()
        subjects = dict.fromkeys(e.subject_id for part in command.appends for e in part.events)
        ctx.refuse_forgotten(subjects, batch)
        digest = b""
        if command.idempotency_key:
            digest = fingerprint(ctx.keys, command.request_hash(), subjects)
            entry = ctx.idempotency.entry(txn, command.idempotency_key, digest, now)
            if entry is not None:
                replayed = tuple(
                    msgspec.structs.replace(r, deduplicated=True) for r in entry.commit
                )
                return CommitResult(replayed, deduplicated=True)
        meta = batch.meta
        results = []
        for part in command.appends:
            result, meta = self.appends.append(txn, part, meta, batch, now)
            results.append(result)
        batch.meta = meta
        if command.idempotency_key:
            ctx.idempotency.remember(
                txn, command.idempotency_key, digest, results[0], now, tuple(results)
            )
            batch.touched.append(("idempotency", command.idempotency_key.encode()))
        return CommitResult(tuple(results))


# -- erasure, holds, checkpoints --------------------------------------------------


class ForgetApplier:
    """Step one of a forget: the erasure event and the tombstone, in one commit.

    Step two (deleting the subject's keys) is the writer's, after the commit.
    """

    def __init__(self, ctx: ApplyContext, appends: AppendApplier) -> None:
        self.ctx = ctx
        self.appends = appends

    def apply(self, txn: lmdb.Transaction, command: ForgetCommand, batch: BatchState) -> Result:
        log_store = self.ctx.log
        subject = command.subject_id
        tombstone, hold = log_store.subject_records(txn, subject)
        now = self.ctx.now()
        if tombstone is None:
            if hold is not None and hold.active(now):
                raise LegalHoldActive(subject, hold.reason, hold.until)
            data = msgspec.json.encode(
                {"subject_id": subject, "reason": command.reason, "forgotten_by": command.by_role}
            )
            erasure = AppendCommand(
                ERASURE_STREAM,
                (ProposedEvent(b"", ERASURE_EVENT_TYPE, "", _ERASURE_CONTENT_TYPE, data, b""),),
            )
            result, batch.meta = self.appends.append(txn, erasure, batch.meta, batch)
            tombstone = Tombstone(
                result.first_position, now, command.reason, batch.meta.shred_epoch + 1
            )
            log_store.put_tombstone(txn, subject, tombstone)
            batch.touched.append(("tombstones", subject.encode()))
            batch.forgotten[subject] = tombstone
        return _pending_receipt(subject, tombstone, hold)


class LegalHoldApplier:
    """Sets or releases a subject's legal hold (which a forget must respect)."""

    def __init__(self, ctx: ApplyContext) -> None:
        self.ctx = ctx

    def apply(self, txn: lmdb.Transaction, command: LegalHoldCommand, batch: BatchState) -> Result:
        log_store = self.ctx.log
        if command.release:
            log_store.delete_legal_hold(txn, command.subject_id)
        else:
            hold = LegalHold(command.reason, self.ctx.now(), command.until)
            log_store.put_legal_hold(txn, command.subject_id, hold)
        batch.touched.append(("legal_holds", command.subject_id.encode()))
        tombstone, hold_now = log_store.subject_records(txn, command.subject_id)
        return _pending_receipt(command.subject_id, tombstone, hold_now)


class CheckpointApplier:
    """Stores a group's checkpoint: forward only unless rewound, new groups up to the limit.

    A checkpoint moved back makes a group replay; one moved forward past an
    erasure event hides it from the group's projection: so moving back is
    for admins, and each group is a row kept for ever, so their number is
    bounded.
    """

    def __init__(self, ctx: ApplyContext) -> None:
        self.log = ctx.log

    def apply(self, txn: lmdb.Transaction, command: CheckpointCommand, batch: BatchState) -> Result:
        stored = self.log.stored_checkpoint(txn, command.group)
        if stored is None:
            if command.max_groups and self.log.checkpoint_count(txn) >= command.max_groups:
                raise TooManyGroups(command.max_groups)
        elif command.position < stored and not command.rewind:
            raise PermissionDenied(
                f"the checkpoint of group {command.group!r} is {stored}; moving it back to "
                f"{command.position} needs the admin role (a group's checkpoint only moves "
                "forward otherwise)"
            )
        self.log.put_checkpoint(txn, command.group, command.position)
        batch.touched.append(("checkpoints", command.group.encode()))
        return command.position


def _pending_receipt(
    subject_id: str, tombstone: Tombstone | None, hold: LegalHold | None = None
) -> SubjectReceipt:
    """A receipt from what a write transaction can see (no counts, no epoch times)."""
    base = SubjectReceipt(subject_id, SubjectState.ACTIVE)
    if tombstone is not None:
        base = SubjectReceipt(
            subject_id,
            SubjectState.FORGOTTEN_PENDING_SHRED,
            tombstone_position=tombstone.position,
            forgotten_at=tombstone.forgotten_at,
            reason=tombstone.reason,
            shred_epoch=tombstone.shred_epoch,
        )
    if hold is None:
        return base
    return msgspec.structs.replace(
        base, hold_reason=hold.reason, hold_set_at=hold.set_at, hold_until=hold.until, on_hold=True
    )


def sealed_under(command: Command) -> Iterator[str]:
    """The subject whose key seals each event *command* writes (a forget writes one).

    The writer reserves these keys for a whole batch before applying it.
    """
    if isinstance(command, ForgetCommand):
        yield STORE_SUBJECT  # the erasure event holds no personal data
        return
    if isinstance(command, AppendCommand):
        parts: tuple[AppendCommand, ...] = (command,)
    elif isinstance(command, CommitCommand):
        parts = command.appends
    else:
        return
    for part in parts:
        for event in part.events:
            yield event.subject_id or STORE_SUBJECT
