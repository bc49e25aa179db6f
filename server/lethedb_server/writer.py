"""The single writer: every write of the log goes through one thread, in batches.

LMDB allows one write transaction at a time, so one thread owns them all. RPC
handlers queue commands and wait on a future. The writer takes everything
queued (bounded by count and bytes), applies each command in its own nested
transaction, so a rejected command never affects its neighbours, commits once
with fsync, and only then resolves the futures and announces the new head.
Many concurrent single-event appends therefore share one fsync (group commit).

What the writer must never do: resolve a future before the commit that holds
its result has returned, or let a failed batch leave in-memory state (head,
chain hash) ahead of what is on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import lmdb
import msgspec

from lethedb_server import codec
from lethedb_server.codec import (
    AppendResult,
    IdempotencyEntry,
    LegalHold,
    LogMeta,
    RecordBody,
    Tombstone,
)
from lethedb_server.crypto import event_aad, new_nonces
from lethedb_server.errors import (
    ForkedProcess,
    IdempotencyConflict,
    LegalHoldActive,
    LetheError,
    Overloaded,
    PermissionDenied,
    ShuttingDown,
    StorageFull,
    SubjectForgotten,
    TooManyGroups,
    WrongExpectedVersion,
)
from lethedb_server.faults import fault_point
from lethedb_server.idempotency import fingerprint
from lethedb_server.keys import KeyStore
from lethedb_server.lmdbenv import is_disk_full
from lethedb_server.model import (
    ERASURE_EVENT_TYPE,
    ERASURE_STREAM,
    MAINTENANCE,
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
    human_size,
)
from lethedb_server.storage import KnownIndexKeys, LogStore

log = logging.getLogger(__name__)

HeadListener = Callable[[int], None]
#: Runs one maintenance command (a shred epoch, a master key rotation) in the
#: writer thread, between batches, so it is ordered against every write.
MaintenanceTask = Callable[[], Any]
#: A CheckpointCommand's result is the position it stored.
Result = AppendResult | CommitResult | SubjectReceipt | int
_STOP: Final = object()
_ERASURE_CONTENT_TYPE = "application/json"
#: Seconds between attempts after a subject index merge failed.
_MERGE_RETRY_S: Final = 1.0


@dataclass(frozen=True)
class WriterLimits:
    max_batch_commands: int = 1024
    max_batch_bytes: int = 16 << 20
    idempotency_window_ns: int = 24 * 3600 * 10**9
    sweep_interval_s: float = 60.0
    sweep_chunk: int = 10_000
    #: Appends and commits queued or being written at once; beyond it submit
    #: refuses them with Overloaded (0: no limit). Forgets, legal holds and
    #: maintenance are never refused: operators must get through an overload.
    max_inflight_appends: int = 10_000
    #: ... and the events they carry, and their size (``Command.size``: every
    #: field plus EVENT_OVERHEAD per event). Appends are counted in flight from
    #: submit to their answer, so these bound what the writer's queue holds.
    #: A command alone is always admitted (the per-request limits bound it).
    max_inflight_events: int = 100_000
    max_inflight_bytes: int = 128 << 20
    #: The subject index is merged once this many events are unindexed, at
    #: most this many per merge transaction (each merge stalls appends).
    index_chunk: int = 8192
    #: ... and once the writer has had nothing to do for this long.
    index_idle_s: float = 0.05


class WriterObserver(Protocol):
    """What the writer reports as it works (the metrics implement it).

    Called from the writer thread (``refused`` from the submitting thread):
    it must be quick and must not raise. The writer knows nothing of what is
    done with it; without an observer (``Writer.observer`` None) it reports
    nothing and pays nothing.
    """

    def batch_committed(
        self,
        outcomes: Sequence[tuple[Command, Result | LetheError, float]],
        commit_seconds: float,
    ) -> None:
        """A batch committed: each command, its outcome and the seconds from
        submit to answer; and how long the LMDB commit (with fsync) took."""

    def refused(self, command: Command, error: LetheError) -> None:
        """A command was refused at submit (too many in flight, shutting down)."""


@dataclass(slots=True)
class _Pending:
    """A queued command and whoever waits for it: a thread or an event loop.

    Event-loop waiters are settled in one ``call_soon_threadsafe`` per loop
    per batch (see :meth:`Writer._settle`), not one wake-up per command: on
    the append hot path that per-command cost is what the loop thread pays.
    """

    command: Command
    future: Future[Any] | None = None
    waiter: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    submitted: float = field(default_factory=time.monotonic)
    settled: bool = False
    #: (appends, events, bytes) it holds of the in-flight budget; None: not counted.
    cost: tuple[int, int, int] | None = None

    def start(self) -> bool:
        """False when the waiter gave up before the writer got to the command."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return True  # an async waiter's cancellation is checked when settling


def _settle_waiters(items: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """Runs on the waiters' event loop: hand each its result or error."""
    for waiter, outcome in items:
        if waiter.done():
            continue
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


@dataclass
class _BatchState:
    """What applying a batch changes besides the transaction: undone on failure."""

    meta: LogMeta
    forgotten: dict[str, Tombstone]
    commit_seconds: float = 0.0
    #: The ``subject_index`` keys of the events written, in position order.
    index_keys: list[bytes] = field(default_factory=list)


class Writer:
    """Owns the log's write transactions; see the module docstring."""

    def __init__(
        self,
        log_store: LogStore,
        keys: KeyStore,
        limits: WriterLimits | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.log = log_store
        self.keys = keys
        self.limits = limits or WriterLimits()
        self.clock = clock
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._listeners: list[HeadListener] = []
        self._thread = threading.Thread(target=self._run, name="lethedb-writer", daemon=True)
        self._accepting = True
        self._last_sweep = 0.0
        self.maintenance: dict[type[Command], MaintenanceTask] = {}
        self._last_now = 0
        self._pid = os.getpid()
        self.batches = 0
        self.commands = 0
        self.observer: WriterObserver | None = None
        self._inflight = 0
        self._inflight_events = 0
        self._inflight_bytes = 0
        self._inflight_lock = threading.Lock()
        self._merge_retry_at = 0.0
        self._known_keys = KnownIndexKeys(
            log_store.meta.last_position + 1, cap=4 * self.limits.index_chunk
        )

    # -- public API -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def add_head_listener(self, listener: HeadListener) -> None:
        """Call *listener(head)* from the writer thread after every commit."""
        self._listeners.append(listener)

    def submit(self, command: Command) -> Future[Any]:
        """Queue *command*; the future resolves after the commit that holds it."""
        future: Future[Any] = Future()
        admitted = self._admit(command)
        if isinstance(admitted, LetheError):
            future.set_exception(admitted)
        else:
            self._queue.put(_Pending(command, future=future, cost=admitted))
        return future

    def submit_async(self, command: Command) -> asyncio.Future[Any]:
        """Queue *command* for a caller on the running event loop; await the result."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        admitted = self._admit(command)
        if isinstance(admitted, LetheError):
            waiter.set_exception(admitted)
        else:
            self._queue.put(_Pending(command, waiter=waiter, loop=loop, cost=admitted))
        return waiter

    def check_room(self, events: int, size: int, appends: int = 1) -> None:
        """Raise Overloaded if *appends* carrying *events* and *size* would not fit in flight now.

        A pre-check for a call that submits many appends (AppendBatch): it is
        refused whole, before any of it is converted or queued. Nothing is
        reserved; each append is still admitted by :meth:`submit`.
        """
        with self._inflight_lock:
            error = self._over_budget(appends, events, size)
        if error is not None:
            raise error

    def _admit(self, command: Command) -> LetheError | tuple[int, int, int] | None:
        """Take *command* into flight (its cost, None if it is not counted), or
        say why it is refused (nothing written)."""
        if os.getpid() != self._pid:
            # The writer thread does not survive fork(), and LMDB environments
            # must not be used across it: a child would wait forever or corrupt.
            raise ForkedProcess(self._pid)
        error: LetheError | None = None
        cost: tuple[int, int, int] | None = None
        if not self._accepting:
            error = ShuttingDown()
        elif _counts_in_flight(command):
            cost = (1, _event_count(command), command.size())
            with self._inflight_lock:
                error = self._over_budget(*cost)
                if error is None:
                    self._inflight += 1
                    self._inflight_events += cost[1]
                    self._inflight_bytes += cost[2]
        if error is not None:
            if self.observer is not None:
                self.observer.refused(command, error)
            return error
        return cost

    def _over_budget(self, appends: int, events: int, size: int) -> Overloaded | None:
        """Why *appends*, *events* and *size* more would not fit (lock held), or None.

        A lone command always fits: with nothing in flight it is bounded by
        the per-request limits alone, and refusing it would refuse it forever.
        """
        limits = self.limits
        if not self._inflight:
            return None
        checks = (
            ("appends", self._inflight, appends, limits.max_inflight_appends),
            ("events", self._inflight_events, events, limits.max_inflight_events),
            ("bytes", self._inflight_bytes, size, limits.max_inflight_bytes),
        )
        for unit, held, more, limit in checks:
            if limit and held + more > limit:
                if unit == "bytes":
                    has, cap, adds = human_size(held), human_size(limit), human_size(more)
                else:
                    has, cap, adds = f"{held} {unit}", str(limit), str(more)
                return Overloaded(
                    f"the server already has {has} in flight (the limit is {cap}, "
                    f"max_inflight_{unit}) and this call would add {adds} more; "
                    "nothing was written, retry with backoff"
                )
        return None

    def _release(self, pendings: Iterable[_Pending]) -> None:
        """Give back the in-flight budget of answered (or abandoned) commands."""
        appends = events = size = 0
        for pending in pendings:
            cost = pending.cost
            if cost is not None:
                pending.cost = None
                appends += cost[0]
                events += cost[1]
                size += cost[2]
        if appends:
            with self._inflight_lock:
                self._inflight -= appends
                self._inflight_events -= events
                self._inflight_bytes -= size

    def _settle(self, settled: list[tuple[_Pending, Any]]) -> None:
        """Resolve futures now and wake each waiting event loop once."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        self._release(pending for pending, _ in settled)
        for pending, outcome in settled:
            if pending.settled:
                continue
            pending.settled = True
            if pending.future is not None:
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
            elif pending.waiter is not None and pending.loop is not None:
                by_loop.setdefault(pending.loop, []).append((pending.waiter, outcome))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_waiters, items)
            except RuntimeError:  # the loop closed: nobody is waiting any more
                log.debug("dropped %d results for a closed event loop", len(items))

    def append(self, command: AppendCommand, timeout: float | None = None) -> AppendResult:
        """Submit and wait: for in-process callers (tests, benchmarks, tools)."""
        result: AppendResult = self.submit(command).result(timeout)
        return result

    def execute(self, command: Command, timeout: float | None = None) -> Any:
        """Submit any command and wait for its result."""
        return self.submit(command).result(timeout)

    def stop(self) -> None:
        """Refuse new work, finish everything queued, then end the thread."""
        self._accepting = False
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _now(self) -> int:
        """Wall-clock time that never goes backwards within this process.

        Positions and versions never depend on time; this only keeps
        ``recorded_at`` non-decreasing in log order when the clock is set back.
        """
        now = max(self.clock(), self._last_now)
        self._last_now = now
        return now

    # -- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            unindexed = self._unindexed()
            idle = self.limits.index_idle_s if unindexed else self.limits.sweep_interval_s
            try:
                first = self._queue.get(timeout=idle)
            except queue.Empty:
                if unindexed:  # at rest: complete the index, so readers scan no tail
                    self._merge_subject_index(self.limits.index_chunk)
                if not unindexed or self._sweep_due():
                    self._sweep_idempotency()
                continue
            if first is _STOP:
                break
            batch, stopping = self._collect(first)
            if any(isinstance(pending.command, ForgetCommand) for pending in batch):
                # Each forget's receipt counts the subject's events, and a count
                # scans the unindexed tail, which a stream of forgets only grows:
                # index it first, so the receipts scan only this batch's events.
                self._index_whole_tail()
            self._process(batch)
            while self._unindexed() >= self.limits.index_chunk:
                if not self._merge_subject_index(self.limits.index_chunk):
                    break
            if self._sweep_due():
                self._sweep_idempotency()
        # Drain what raced with stop(): it was queued before _accepting fell.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Pending):
                self._process([item])
        self._index_whole_tail()  # a store closed cleanly is fully indexed

    def _index_whole_tail(self) -> None:
        """Merge chunk after chunk until the index is complete (or a merge fails)."""
        while self._unindexed() and self._merge_subject_index(self.limits.index_chunk):
            pass

    def _sweep_due(self) -> bool:
        return time.monotonic() - self._last_sweep > self.limits.sweep_interval_s

    def _unindexed(self) -> int:
        """Events after the position through which the subject index is complete."""
        meta = self.log.meta
        return meta.last_position - meta.subject_indexed

    def _merge_subject_index(self, limit: int) -> bool:
        """Merge up to *limit* unindexed events into the subject index; False if it failed.

        Runs in its own write transaction between batches. A failure (a full
        disk, a damaged record) loses nothing: readers scan the tail, and a
        merge is tried again after a pause, so a lasting failure costs no
        work per batch.
        """
        if time.monotonic() < self._merge_retry_at:
            return False
        log_store = self.log

        def merge(txn: lmdb.Transaction) -> LogMeta:
            merged = log_store.merge_subject_index(txn, log_store.meta, limit, self._known_keys)
            fault_point("index.merge_before_commit")
            return merged

        try:
            self.log.meta = self.log.lmdb.write(merge)
        except (LetheError, lmdb.Error) as exc:
            log.warning("subject index merge failed; readers scan the tail meanwhile: %s", exc)
        except Exception:
            log.exception("subject index merge failed; readers scan the tail meanwhile")
        else:
            self._known_keys.merged_through(self.log.meta.subject_indexed)
            return True
        self._merge_retry_at = time.monotonic() + _MERGE_RETRY_S
        return False

    def _collect(self, first: object) -> tuple[list[_Pending], bool]:
        """Everything queued, up to the limits; a maintenance command is taken alone."""
        assert isinstance(first, _Pending)
        batch = [first]
        if isinstance(first.command, MAINTENANCE):
            return batch, False
        size = _size(first)
        while len(batch) < self.limits.max_batch_commands and size < self.limits.max_batch_bytes:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Pending)
            if isinstance(item.command, MAINTENANCE):
                self._process(batch)
                return [item], False
            batch.append(item)
            size += _size(item)
        return batch, False

    def _process(self, batch: list[_Pending]) -> None:
        """Run a batch (or a lone maintenance command); never let an error kill the thread."""
        try:
            if len(batch) == 1 and isinstance(batch[0].command, MAINTENANCE):
                self._maintain(batch[0])
            else:
                self._write_batch(batch)
        except Exception as exc:
            log.exception("writer failed on a batch of %d commands", len(batch))
            self._fail_all(
                batch, LetheError(f"internal error; nothing of this batch was written: {exc}")
            )

    def _maintain(self, pending: _Pending) -> None:
        if not pending.start():
            self._release([pending])
            return
        task = self.maintenance.get(type(pending.command))
        if task is None:
            name = type(pending.command).__name__
            self._settle([(pending, LetheError(f"{name} is not configured on this store"))])
            return
        try:
            result = task()
        except LetheError as exc:
            self._settle([(pending, exc)])
        else:
            self._settle([(pending, result)])

    def _write_batch(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.start()]
        if len(live) < len(batch):  # callers that gave up: their budget returns now
            self._release(p for p in batch if p.future is not None and p.future.cancelled())
        if not live:
            return
        while True:
            try:
                outcomes, state = self._try_batch(live)
                break
            except lmdb.MapFullError:
                try:
                    self.log.lmdb.grow()
                except StorageFull as exc:
                    self._fail_all(live, exc)
                    return
                log.info("log map grown to %d bytes", self.log.lmdb.map_size())
            except StorageFull as exc:  # the key store reached its map ceiling
                self._fail_all(live, exc)
                return
            except lmdb.Error as exc:
                error: LetheError = (
                    StorageFull(f"the disk holding the data directory is full: {exc}")
                    if is_disk_full(exc, self.log.lmdb.path, self.keys.lmdb.path)
                    else LetheError(f"storage error; nothing of this batch was written: {exc}")
                )
                log.error("batch of %d commands failed: %s", len(live), exc)
                self._fail_all(live, error)
                return
        self._known_keys.record(self.log.meta.last_position + 1, state.index_keys)
        self.log.meta = state.meta
        self.batches += 1
        self.commands += len(live)
        self._erase_keys(state.forgotten)
        self._settle(list(zip(live, outcomes, strict=True)))
        if self.observer is not None:
            now = time.monotonic()
            self.observer.batch_committed(
                [(p.command, o, now - p.submitted) for p, o in zip(live, outcomes, strict=True)],
                state.commit_seconds,
            )
        for listener in self._listeners:
            listener(state.meta.last_position)

    def _erase_keys(self, forgotten: dict[str, Tombstone]) -> None:
        """Step two of a forget, after its tombstone committed: delete the keys.

        If this fails the tombstone still stands; start-up re-applies every
        tombstone to the key store, and the subject is already refused and
        redacted in memory.
        """
        if not forgotten:
            return
        fault_point("forget.tombstone_committed")
        try:
            deleted = self.keys.forget(forgotten)
        except lmdb.Error as exc:
            log.error("deleting keys of %d forgotten subjects failed: %s", len(forgotten), exc)
            return
        log.info("forgot %d subjects; %d wrapped keys deleted", len(forgotten), deleted)
        fault_point("forget.keys_deleted")

    def _fail_all(self, batch: list[_Pending], error: LetheError) -> None:
        self._settle([(pending, error) for pending in batch])

    def _try_batch(self, batch: list[_Pending]) -> tuple[list[Result | LetheError], _BatchState]:
        """Apply the batch in one transaction and commit it; raise LMDB errors as-is."""
        state = _BatchState(self.log.meta, {})
        txn = self.log.lmdb.begin_write()
        try:
            self.keys.reserve(self._key_demand(batch))
            outcomes: list[Result | LetheError] = []
            for pending in batch:
                child = self.log.lmdb.env.begin(write=True, parent=txn)
                saved, saved_keys = state.meta, len(state.index_keys)
                try:
                    result = self._apply(child, pending.command, state)
                except LetheError as exc:
                    child.abort()
                    state.meta = saved
                    del state.index_keys[saved_keys:]
                    outcomes.append(exc)
                except BaseException:
                    child.abort()
                    raise
                else:
                    child.commit()
                    outcomes.append(result)
            if state.meta is not self.log.meta:
                self.log.put_meta(txn, state.meta)
            started = time.perf_counter()
            txn.commit()
            state.commit_seconds = time.perf_counter() - started
        except BaseException:
            txn.abort()
            raise
        return outcomes, state

    def _key_demand(self, batch: list[_Pending]) -> dict[str, int]:
        """How many encryptions each subject needs, skipping forgotten subjects."""
        demand = Counter(s for pending in batch for s in _sealed_under(pending.command))
        is_forgotten = self.keys.is_forgotten
        return {s: n for s, n in demand.items() if not is_forgotten(s)}

    def _is_forgotten(self, subject_id: str, batch: _BatchState) -> bool:
        """Whether *subject_id* has a tombstone, committed or earlier in this batch.

        No LMDB lookup: the writer is the only writer of tombstones, the key
        store's set holds every committed one (start-up re-applies them all,
        and each forget adds its subjects right after its commit), and the
        batch's own forgets are in ``batch.forgotten``.
        """
        return self.keys.is_forgotten(subject_id) or subject_id in batch.forgotten

    def _apply(self, txn: lmdb.Transaction, command: Command, state: _BatchState) -> Result:
        if isinstance(command, AppendCommand):
            result, state.meta = self._apply_append(txn, command, state.meta, state)
            return result
        if isinstance(command, CommitCommand):
            return self._apply_commit(txn, command, state)
        if isinstance(command, ForgetCommand):
            return self._apply_forget(txn, command, state)
        if isinstance(command, LegalHoldCommand):
            return self._apply_legal_hold(txn, command)
        if isinstance(command, CheckpointCommand):
            return self._apply_checkpoint(txn, command)
        raise TypeError(f"the writer cannot apply {type(command).__name__} in a batch")

    def _apply_checkpoint(self, txn: lmdb.Transaction, command: CheckpointCommand) -> int:
        """Store a group's checkpoint: forward only unless rewound, new groups up to the limit.

        A checkpoint moved back makes a group replay; one moved forward past
        an erasure event hides it from the group's projection: so moving back
        is for admins, and each group is a row kept for ever, so their number
        is bounded.
        """
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
        return command.position

    def _apply_commit(
        self, txn: lmdb.Transaction, command: CommitCommand, state: _BatchState
    ) -> CommitResult:
        """Every stream's append or none: a failing part aborts the nested transaction.

        A forgotten subject in any part is refused before the idempotency
        entry is looked at (see :meth:`_apply_append`).
        """
        now = self._now()
        subjects = dict.fromkeys(e.subject_id for part in command.appends for e in part.events)
        self._refuse_forgotten(subjects, state)
        digest = b""
        if command.idempotency_key:
            digest = fingerprint(self.keys, command.request_hash(), subjects)
            entry = self._idempotency_entry(txn, command.idempotency_key, digest, now)
            if entry is not None:
                replayed = tuple(
                    msgspec.structs.replace(r, deduplicated=True) for r in entry.commit
                )
                return CommitResult(replayed, deduplicated=True)
        meta = state.meta
        results = []
        for part in command.appends:
            result, meta = self._apply_append(txn, part, meta, state, now)
            results.append(result)
        state.meta = meta
        if command.idempotency_key:
            self._remember(txn, command.idempotency_key, digest, results[0], now, tuple(results))
        return CommitResult(tuple(results))

    # -- erasure ------------------------------------------------------------------

    def _apply_forget(
        self, txn: lmdb.Transaction, command: ForgetCommand, state: _BatchState
    ) -> SubjectReceipt:
        """Step one of a forget: the erasure event and the tombstone, in one commit."""
        subject = command.subject_id
        tombstone, hold = self.log.subject_records(txn, subject)
        now = self._now()
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
            result, state.meta = self._apply_append(txn, erasure, state.meta, state)
            tombstone = Tombstone(
                result.first_position, now, command.reason, state.meta.shred_epoch + 1
            )
            txn.put(subject.encode(), codec.encode(tombstone), db=self.log.tombstones)
            state.forgotten[subject] = tombstone
        return _pending_receipt(subject, tombstone, hold)

    def _apply_legal_hold(self, txn: lmdb.Transaction, command: LegalHoldCommand) -> SubjectReceipt:
        key = command.subject_id.encode()
        if command.release:
            txn.delete(key, db=self.log.legal_holds)
        else:
            hold = LegalHold(command.reason, self._now(), command.until)
            txn.put(key, codec.encode(hold), db=self.log.legal_holds)
        tombstone, hold_now = self.log.subject_records(txn, command.subject_id)
        return _pending_receipt(command.subject_id, tombstone, hold_now)

    # -- one append -------------------------------------------------------------

    def _apply_append(
        self,
        txn: lmdb.Transaction,
        command: AppendCommand,
        meta: LogMeta,
        batch: _BatchState,
        now: int = 0,
    ) -> tuple[AppendResult, LogMeta]:
        """Append one stream's events after *meta*; their index keys go to *batch*.

        *now* lets a commit give all its parts one time.

        A forgotten subject is refused before the idempotency entry is looked
        at: a retry after a forget must not learn whether its data matches
        the first attempt's (IdempotencyConflict against deduplicated would
        confirm a guess at erased data).
        """
        now = now or self._now()
        events = command.events
        subjects = dict.fromkeys(event.subject_id for event in events)
        self._refuse_forgotten(subjects, batch)
        digest = b""
        if command.idempotency_key:
            digest = fingerprint(self.keys, command.request_hash(), subjects)
            previous = self._idempotent_result(txn, command.idempotency_key, digest, now)
            if previous is not None:
                return previous, meta
        stream_id = command.stream_id
        info = self.log.stream_info(txn, stream_id)
        self._check_expected(command, None if info is None else info.last_version)

        version = 0 if info is None else info.last_version + 1
        position = meta.last_position + 1
        chain = meta.chain_head
        first_position, first_version = position, version
        # Per-event costs are what this loop is about: randomness comes from
        # one urandom call per append, keys and key prefixes are looked up
        # once per subject, and names are bound once.
        store_id, put_event, u64 = meta.store_id, self.log.put_event, codec.u64
        remember_key = batch.index_keys.append
        stream_key = codec.stream_prefix(stream_id)
        index_prefixes = {s: codec.subject_prefix(s) for s in subjects}
        ciphers = self.keys.take_each([e.subject_id or STORE_SUBJECT for e in events])
        nonces = new_nonces(len(events))
        new_ids = _new_event_ids(len(events)) if any(not e.event_id for e in events) else ()
        for i, event in enumerate(events):
            dek_version, aead = ciphers[i]
            event_id = event.event_id or new_ids[i]
            nonce = nonces[i]
            aad = event_aad(
                store_id, position, stream_id, version, event.event_type,
                event.subject_id, event_id, dek_version, event.content_type, now,
            )  # fmt: skip
            plaintext = codec.encode(codec.Payload(event.data, event.metadata))
            body = RecordBody(
                codec.RECORD_FORMAT, stream_id, version, event_id, event.event_type,
                event.subject_id, event.content_type, now, dek_version, nonce,
                aead.encrypt(nonce, plaintext, aad),
            )  # fmt: skip
            value, chain = codec.seal_record(chain, body)
            position_key = u64(position)
            put_event(txn, position_key, value, stream_key + u64(version))
            remember_key(index_prefixes[event.subject_id] + position_key)
            position += 1
            version += 1

        created_at = now if info is None else info.created_at
        first = first_position if info is None else info.first_position
        txn.put(
            command.stream_id.encode(),
            codec.encode(codec.StreamInfo(version - 1, first, created_at)),
            db=self.log.streams,
        )
        result = AppendResult(first_position, position - 1, first_version, version - 1, now)
        if command.idempotency_key:
            self._remember(txn, command.idempotency_key, digest, result, now)
        new_meta = LogMeta(
            meta.format, meta.store_id, position - 1, chain, meta.shred_epoch,
            meta.subject_indexed,
        )  # fmt: skip
        return result, new_meta

    def _refuse_forgotten(self, subjects: Iterable[str], batch: _BatchState) -> None:
        """Raise SubjectForgotten for the first forgotten subject, in request order."""
        for subject_id in subjects:
            if subject_id and self._is_forgotten(subject_id, batch):
                raise SubjectForgotten(subject_id)

    @staticmethod
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

    # -- idempotency --------------------------------------------------------------

    def _idempotency_entry(
        self, txn: lmdb.Transaction, key: str, digest: bytes, now: int
    ) -> IdempotencyEntry | None:
        """The live entry stored under *key*; raise if it belongs to another request."""
        raw = txn.get(key.encode(), db=self.log.idempotency)
        if raw is None:
            return None
        entry = codec.decode_idempotency(raw)
        if entry.created_at + self.limits.idempotency_window_ns < now:
            return None  # expired: the sweeper has not reached it yet
        if entry.digest_format != codec.KEYED_DIGEST:
            return None  # never compared: start-up re-keys or drops unkeyed entries
        if entry.digest != digest:
            raise IdempotencyConflict(key)
        return entry

    def _idempotent_result(
        self, txn: lmdb.Transaction, key: str, digest: bytes, now: int
    ) -> AppendResult | None:
        entry = self._idempotency_entry(txn, key, digest, now)
        if entry is None:
            return None
        r = entry.result
        return AppendResult(
            r.first_position, r.last_position, r.first_version, r.last_version,
            r.recorded_at, deduplicated=True,
        )  # fmt: skip

    def _remember(
        self,
        txn: lmdb.Transaction,
        key: str,
        digest: bytes,
        result: AppendResult,
        now: int,
        commit: tuple[AppendResult, ...] = (),
    ) -> None:
        raw_key = key.encode()
        old = txn.get(raw_key, db=self.log.idempotency)
        if old is not None:  # an expired entry being replaced
            txn.delete(
                codec.u64(codec.decode_idempotency(old).created_at) + raw_key,
                db=self.log.idempotency_expiry,
            )
        entry = IdempotencyEntry(digest, result, now, commit, codec.KEYED_DIGEST)
        txn.put(raw_key, codec.encode(entry), db=self.log.idempotency)
        txn.put(codec.u64(now) + raw_key, b"", db=self.log.idempotency_expiry)

    def _sweep_idempotency(self) -> int:
        """Delete idempotency entries older than the window, a bounded chunk at a time."""
        self._last_sweep = time.monotonic()
        cutoff = codec.u64(max(0, self._now() - self.limits.idempotency_window_ns))
        removed = 0
        try:
            with self.log.lmdb.begin_write() as txn:
                cursor = txn.cursor(db=self.log.idempotency_expiry)
                cursor.first()
                while removed < self.limits.sweep_chunk:
                    key = bytes(cursor.key())
                    if not key or key[:8] >= cutoff:
                        break
                    txn.delete(key[8:], db=self.log.idempotency)
                    cursor.delete()
                    removed += 1
        except lmdb.Error as exc:
            log.warning("idempotency sweep skipped: %s", exc)
            return 0
        if removed:
            log.debug("expired %d idempotency keys", removed)
        return removed


def _sealed_under(command: Command) -> Iterator[str]:
    """The subject whose key seals each event *command* writes (a forget writes one)."""
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


def _new_event_ids(count: int) -> list[bytes]:
    """*count* random (version 4) UUIDs as bytes, from one urandom call.

    ``uuid.uuid4().bytes`` costs a system call and a UUID object per event;
    this sets the same version and variant bits on one block of randomness.
    """
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
    return [bytes(raw[i : i + 16]) for i in range(0, len(raw), 16)]


def _counts_in_flight(command: Command) -> bool:
    """Appends and commits are bounded by the in-flight limits; erasure never is."""
    return isinstance(command, AppendCommand | CommitCommand)


def _size(pending: _Pending) -> int:
    """A queued command's size, as counted at admission when it was (no second walk)."""
    return pending.cost[2] if pending.cost is not None else pending.command.size()


def _event_count(command: Command) -> int:
    if isinstance(command, AppendCommand):
        return len(command.events)
    if isinstance(command, CommitCommand):
        return command.event_count()
    return 0


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
