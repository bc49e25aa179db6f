"""Waiting, on the event loop, for this node's log to move: reads with ``min_position``,
a follower's catch-up, the Replication service's streams.

The writer thread tells the store's listeners after every commit (its head)
and every journal entry (its commit number); :class:`HeadWatch` turns those
into an :class:`asyncio.Event` per change, so a waiter sleeps until
something it may care about happened and then checks its own condition
again. Nothing polls: a quiet store costs no wake-up at all.

:class:`ReadGate` is what the EventStore handlers ask before they read: on a
follower, nothing is served until it has caught up with its leader once (so
that a subject forgotten while it was away is erased before anything of it
is served), and a read with ``min_position`` waits, up to its deadline, for
that position.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Final

from lethedb_server.engine.store import Store
from lethedb_server.errors import CatchingUp

#: How long a read with min_position waits when its call has no deadline.
DEFAULT_MIN_POSITION_WAIT_S: Final = 10.0
#: Part of the remaining deadline kept to answer CatchingUp before the client
#: gives up with DEADLINE_EXCEEDED (which would not say which positions).
_ANSWER_MARGIN_S: Final = 0.25


class HeadWatch:
    """An event per change of the store's head or journal, for waiters on one event loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._wake_pending = False
        store.on_commit(self._changed_in_writer)
        store.on_journal(self._changed_in_writer)

    def attach(self) -> None:
        """Bind to the running event loop (the first waiter does it; the server does it early)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """An event set at the next change; take it *before* checking a condition."""
        self.attach()
        assert self._event is not None
        return self._event

    def poke(self) -> None:
        """Wake every waiter (on the loop): state outside the store changed (caught up)."""
        event, self._event = self._event, asyncio.Event()
        if event is not None:
            event.set()

    def _changed_in_writer(self, _value: int) -> None:
        """Writer thread: one wake-up scheduled at a time, however many commits come."""
        loop = self._loop
        if loop is None:
            return
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to wake
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self.poke()

    async def wait_until(self, reached: Callable[[], bool], timeout: float) -> bool:
        """Wait until *reached()* holds, up to *timeout* seconds; whether it does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self.changed()
            if reached():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return reached()


class ReadGate:
    """Whether this node may answer a read now, and the ``min_position`` wait."""

    def __init__(self, store: Store, watch: HeadWatch, *, follower: bool) -> None:
        self.store = store
        self.watch = watch
        #: A follower serves reads only once it has caught up with its leader.
        self.caught_up = not follower

    def mark_caught_up(self) -> None:
        if not self.caught_up:
            self.caught_up = True
            self.watch.poke()

    def reset(self) -> None:
        """Answer CatchingUp again until the next catch-up (a deposed leader turned follower
        may hold a tail its new leader discards)."""
        self.caught_up = False

    def check(self) -> None:
        """CatchingUp now, before a read, if this follower has never caught up."""
        if not self.caught_up:
            raise CatchingUp(
                "this follower has not caught up with its leader since it started; it serves "
                f"reads once it has (it holds positions up to {self.store.head}); retry, or "
                "read from the leader"
            )

    async def admit(self, min_position: int, time_remaining: float | None) -> None:
        """Let a read through, or raise CatchingUp.

        Without *min_position*: at once (CatchingUp before the first catch-up).
        With it: wait, up to the call's deadline (*time_remaining* seconds;
        :data:`DEFAULT_MIN_POSITION_WAIT_S` without a deadline), until this
        node has caught up and holds that position.
        """
        if not min_position:
            self.check()
            return
        store = self.store

        def reached() -> bool:
            return self.caught_up and store.head >= min_position

        if reached():
            return
        if store.role != "follower" and min_position > store.log_head:
            # Only this node writes its log: nothing will bring the position
            # but a write of its own, so the read is not made to wait for one.
            raise CatchingUp(
                f"this node's log ends at position {store.log_head}, before the read's "
                f"min_position {min_position}: it never held that position (written on "
                "another leader?); read from the current leader"
            )
        if time_remaining is None:
            budget = DEFAULT_MIN_POSITION_WAIT_S
        else:
            budget = time_remaining - min(_ANSWER_MARGIN_S, time_remaining / 10)
        if await self.watch.wait_until(reached, max(0.0, budget)):
            return
        self.check()
        raise CatchingUp(
            f"this node holds positions up to {store.head}; the read asked for min_position "
            f"{min_position}, which did not arrive within the call's deadline; retry later, "
            "or read from the leader"
        )
