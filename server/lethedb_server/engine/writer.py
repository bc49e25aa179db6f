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

This module is the group committer: admission, the queue, batching, the one
commit and settlement. What each kind of command writes is its applier's
(:mod:`appliers`); the idempotency table is :mod:`idempotency`'s, the
subject index merge :mod:`subject_indexer`'s, and the record format
:mod:`record_codec`'s. Maintenance tasks and the observer are given to the
constructor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeAlias

import lmdb

from lethedb_server.engine import appliers
from lethedb_server.engine.appliers import ApplyContext, BatchState, sealed_under
from lethedb_server.engine.idempotency import IdempotencyTable
from lethedb_server.engine.model import (
    MAINTENANCE,
    AppendCommand,
    Command,
    CommitCommand,
    ExclusiveTask,
    ForgetCommand,
    ReplicatedCommitCommand,
    human_size,
)
from lethedb_server.engine.replication import ReplicatedCommitApplier, SyncGate, is_success
from lethedb_server.engine.subject_indexer import SubjectIndexer
from lethedb_server.errors import (
    ForkedProcess,
    LetheError,
    NotLeader,
    Overloaded,
    ReplicationRefused,
    ShuttingDown,
    StorageFull,
)
from lethedb_server.faults import fault_point
from lethedb_server.storage import codec
from lethedb_server.storage.codec import AppendResult, JournalEntry, NodeState, Tombstone
from lethedb_server.storage.keys import KeyStore
from lethedb_server.storage.lmdbenv import is_disk_full
from lethedb_server.storage.log import LogStore

log = logging.getLogger(__name__)

HeadListener = Callable[[int], None]
#: Runs one maintenance command (a shred epoch, a master key rotation) in the
#: writer thread, between batches, so it is ordered against every write.
MaintenanceTask = Callable[[], Any]
#: What a command applied in a batch answers (see :mod:`appliers`).
Result: TypeAlias = appliers.Result
_STOP: Final = object()


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


class Writer:
    """Owns the log's write transactions; see the module docstring."""

    def __init__(
        self,
        log_store: LogStore,
        keys: KeyStore,
        limits: WriterLimits | None = None,
        clock: Callable[[], int] = time.time_ns,
        *,
        maintenance: Mapping[type[Command], MaintenanceTask] | None = None,
        observer: WriterObserver | None = None,
    ) -> None:
        """*maintenance* runs each maintenance command kind (a shred, a rotation)
        alone between batches; one without a task is answered "not configured".
        *observer* is told of every batch and refusal (None: nobody is)."""
        self.log = log_store
        self.keys = keys
        self.limits = limits or WriterLimits()
        self.maintenance: dict[type[Command], MaintenanceTask] = dict(maintenance or {})
        self.observer = observer
        self._idempotency = IdempotencyTable(
            log_store, self.limits.idempotency_window_ns, self.limits.sweep_chunk
        )
        self._context = ApplyContext(log_store, keys, self._idempotency, clock)
        self._appliers = appliers.default_appliers(self._context)
        self._appliers[ReplicatedCommitCommand] = ReplicatedCommitApplier(self._context)
        #: The term each journal entry of its own carries (see Store.promote).
        self.term = max(1, log_store.journal_term, log_store.node.term)
        #: Whether it applies client writes (a leader or a single node) or only
        #: a leader's commits (a follower; client writes fail with NotLeader).
        self.leading = True
        #: The leader a follower names in NotLeader.
        self.leader = ""
        #: The highest commit whose answers were released as acknowledged.
        self.acknowledged = log_store.node.acknowledged_commit
        self._acknowledged_lock = threading.Lock()
        #: Holds successful answers until enough followers have the commit (None: never).
        self.gate: SyncGate | None = None
        #: Whether this node may acknowledge a write now (an elected leader's lease, checked
        #: on its own clock); None: always. A success settled while it says no is answered
        #: NotLeader (leader unknown) instead: committed here, never acknowledged.
        self.fence: Callable[[], bool] | None = None
        self._journal_listeners: list[HeadListener] = []
        self._indexer = SubjectIndexer(log_store, self.limits.index_chunk)
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._listeners: list[HeadListener] = []
        self._thread = threading.Thread(target=self._run, name="lethedb-writer", daemon=True)
        self._accepting = True
        self._pid = os.getpid()
        self.batches = 0
        self.commands = 0
        self._inflight = 0
        self._inflight_events = 0
        self._inflight_bytes = 0
        self._inflight_lock = threading.Lock()

    # -- public API -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def add_head_listener(self, listener: HeadListener) -> None:
        """Call *listener(head)* from the writer thread after every commit."""
        self._listeners.append(listener)

    def notify_head(self, position: int) -> None:
        """Tell the head listeners of *position* (the visible head moved; any thread)."""
        for listener in self._listeners:
            listener(position)

    def add_journal_listener(self, listener: HeadListener) -> None:
        """Call *listener(commit)* from the writer thread after each commit that wrote
        journal entries, with the last one's commit number."""
        self._journal_listeners.append(listener)

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

    @property
    def clock(self) -> Callable[[], int]:
        """The wall clock every command's time is read from (the appliers' clock)."""
        return self._context.clock

    @clock.setter
    def clock(self, clock: Callable[[], int]) -> None:
        self._context.clock = clock

    def _now(self) -> int:
        """Wall-clock time that never goes backwards (see ``ApplyContext.now``)."""
        return self._context.now()

    # -- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        indexer = self._indexer
        while not stopping:
            unindexed = indexer.unindexed()
            idle = self.limits.index_idle_s if unindexed else self.limits.sweep_interval_s
            try:
                first = self._queue.get(timeout=idle)
            except queue.Empty:
                if unindexed:  # at rest: complete the index, so readers scan no tail
                    indexer.merge()
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
                indexer.merge_whole_tail()
            self._process(batch)
            indexer.catch_up()
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
        indexer.merge_whole_tail()  # a store closed cleanly is fully indexed

    def _sweep_due(self) -> bool:
        return self._idempotency.sweep_due(self.limits.sweep_interval_s)

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
        command = pending.command
        if isinstance(command, ExclusiveTask):
            self._run_exclusive(pending, command)
            return
        task = self.maintenance.get(type(command))
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

    def _run_exclusive(self, pending: _Pending, command: ExclusiveTask) -> None:
        """Run an exclusive task; whatever it raises goes to its caller (logged if unexpected)."""
        try:
            result = command.run()
        except LetheError as exc:
            self._settle([(pending, exc)])
        except Exception as exc:
            log.exception("a writer task failed")
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
        self._indexer.written(self.log.meta.last_position + 1, state.index_keys)
        self.log.meta = state.meta
        journaled = state.journal_head != self.log.journal_head
        self.log.journal_head, self.log.journal_term = state.journal_head, state.journal_term
        if state.node is not None:
            self.log.node = state.node
        self.batches += 1
        self.commands += len(live)
        self._erase_keys(state.forgotten)
        gate = self.gate
        if journaled and gate is not None:  # a leader with sync_replicas: not visible yet
            gate.committed(state.journal_head, state.meta.last_position)
        self._answer(list(zip(live, outcomes, strict=True)))
        if self.observer is not None:
            now = time.monotonic()
            self.observer.batch_committed(
                [(p.command, o, now - p.submitted) for p, o in zip(live, outcomes, strict=True)],
                state.commit_seconds,
            )
        for listener in self._listeners:
            listener(state.meta.last_position)
        if journaled:
            for journal_listener in self._journal_listeners:
                journal_listener(state.journal_head)

    def _answer(self, settled: list[tuple[_Pending, Any]]) -> None:
        """Settle a committed batch's outcomes; the sync gate may hold the successes.

        A deduplicated answer is held too, against the journal head now: the
        original may not have reached the followers yet.
        """
        settled = self._fenced(settled)
        gate = self.gate
        head = self.log.journal_head
        if gate is not None and gate.required:
            held = [(p, o) for p, o in settled if is_success(o)]
            if held and gate.hold(head, held, self._release_held(head)):
                settled = [(p, o) for p, o in settled if not is_success(o)]
        if any(is_success(o) and _is_client_write(p.command) for p, o in settled):
            self._acknowledge(head)
        self._settle(settled)

    def _release_held(self, commit: int) -> Callable[[list[tuple[Any, Any]]], None]:
        """How the sync gate settles what it held for *commit* (from any thread)."""

        def settle(items: list[tuple[Any, Any]]) -> None:
            items = self._fenced(items)  # the lease may have lapsed while they were held
            if any(is_success(outcome) for _, outcome in items):
                self._acknowledge(commit)
            self._settle(items)

        return settle

    def _acknowledge(self, commit: int) -> None:
        """Answers of *commit* go out as acknowledged: raise the high-water mark.

        In memory at once; on disk with the next batch (or at once, in the
        batch itself, without a sync gate: see :meth:`_node_state`).
        """
        with self._acknowledged_lock:
            self.acknowledged = max(self.acknowledged, commit)

    def _node_state(self, state: BatchState) -> NodeState | None:
        """The node record this batch must write, if its acknowledged commit moves.

        Without a sync gate every commit of a leader is acknowledged as soon
        as it is durable, so the batch records its own journal head (before
        any answer goes out, whatever crashes next). With one, answers are
        released later by followers' acks: the mark is written with the next
        batch, so after a crash it may lag the last answers (those commits are
        on ``sync_replicas`` followers: the election keeps them).
        """
        mark = self.acknowledged
        gate = self.gate
        fence = self.fence
        if state.own_entry and (gate is None or not gate.required) and (fence is None or fence()):
            mark = max(mark, state.journal_head)  # (a lapsed lease: answered NotLeader)
        node = self.log.node
        if mark <= node.acknowledged_commit:
            return None
        return NodeState(node.term, mark)

    def truncated(self) -> None:
        """The log's tail was discarded (``Store.truncate_after``, in this thread):
        forget the subject index keys of the positions that went."""
        self._indexer.truncated()

    def _fenced(self, settled: list[tuple[_Pending, Any]]) -> list[tuple[_Pending, Any]]:
        """*settled* with each success answered NotLeader if the fence says no now.

        Checked as late as possible, when an answer is released (again after the
        sync gate), so a leader whose lease could not be renewed in time
        acknowledges nothing more, whatever was queued or held.
        """
        fence = self.fence
        if fence is None or fence():
            return settled
        refused = NotLeader("")
        return [
            (p, refused if is_success(o) and not isinstance(p.command, ReplicatedCommitCommand)
             else o)
            for p, o in settled
        ]  # fmt: skip

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

    def _try_batch(self, batch: list[_Pending]) -> tuple[list[Result | LetheError], BatchState]:
        """Apply the batch in one transaction and commit it; raise LMDB errors as-is."""
        log_store = self.log
        state = BatchState(
            log_store.meta, {}, journal_head=log_store.journal_head,
            journal_term=log_store.journal_term,
        )  # fmt: skip
        txn = log_store.lmdb.begin_write()
        try:
            self.keys.reserve(self._key_demand(batch))
            outcomes: list[Result | LetheError] = []
            for pending in batch:
                child = log_store.lmdb.env.begin(write=True, parent=txn)
                saved, saved_keys, saved_touched = (
                    state.meta,
                    len(state.index_keys),
                    len(state.touched),
                )
                saved_journal = state.journal_head, state.journal_term
                try:
                    result = self._apply(child, pending.command, state)
                except LetheError as exc:
                    child.abort()
                    state.meta = saved
                    del state.index_keys[saved_keys:]
                    del state.touched[saved_touched:]
                    state.journal_head, state.journal_term = saved_journal
                    outcomes.append(exc)
                except BaseException:
                    child.abort()
                    raise
                else:
                    child.commit()
                    outcomes.append(result)
            self._journal(txn, state)
            if state.meta is not log_store.meta:
                log_store.put_meta(txn, state.meta)
            node = self._node_state(state)
            if node is not None:
                log_store.put_node(txn, node)
                state.node = node
            started = time.perf_counter()
            txn.commit()
            state.commit_seconds = time.perf_counter() - started
        except BaseException:
            txn.abort()
            raise
        return outcomes, state

    def _journal(self, txn: lmdb.Transaction, state: BatchState) -> None:
        """Write the batch's journal entry, if it changed replicated state.

        One entry per commit: records written or side table rows touched. A
        follower's batch holds the leader's entries instead (its frames wrote
        them), and never writes one of its own.
        """
        log_store = self.log
        if state.journal_head != log_store.journal_head:
            return
        first = log_store.meta.last_position + 1
        if not state.touched and state.meta.last_position < first:
            return
        entry = JournalEntry(
            self.term, first, state.meta.last_position, self._now(),
            tuple(dict.fromkeys(state.touched)),
        )  # fmt: skip
        state.journal_head += 1
        state.journal_term = self.term
        state.own_entry = True
        log_store.put_journal(txn, state.journal_head, codec.encode_journal(entry))

    def _key_demand(self, batch: list[_Pending]) -> dict[str, int]:
        """How many encryptions each subject needs, skipping forgotten subjects."""
        demand = Counter(s for pending in batch for s in sealed_under(pending.command))
        is_forgotten = self.keys.is_forgotten
        return {s: n for s, n in demand.items() if not is_forgotten(s)}

    def _apply(self, txn: lmdb.Transaction, command: Command, state: BatchState) -> Result:
        replicated = isinstance(command, ReplicatedCommitCommand)
        if replicated and self.leading:
            raise ReplicationRefused(f"this node leads term {self.term}: it applies no other "
                                     "node's commits")  # fmt: skip
        if not replicated and not self.leading:
            raise NotLeader(self.leader)  # demoted after the write was queued
        applier = self._appliers.get(type(command))
        if applier is None:
            raise TypeError(f"the writer cannot apply {type(command).__name__} in a batch")
        return applier.apply(txn, command, state)

    def _sweep_idempotency(self) -> int:
        """Delete idempotency entries older than the window, a bounded chunk at a time."""
        return self._idempotency.sweep(self._now())


def _is_client_write(command: Command) -> bool:
    """A command whose success is an answer to a client (not a leader's commit applied)."""
    return not isinstance(command, ReplicatedCommitCommand)


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
