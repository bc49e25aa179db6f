"""How far readers of this node may see: the visible head (Raft's commit index).

With ``sync_replicas = K > 0`` a leader's commit is only safe once K
followers hold it durably: until then a failover may discard it (a deposed
leader truncates its unacknowledged tail). A reader that saw it would have
seen a record that never existed. So reads, subscriptions and
``min_position`` waits stop at the *visible head*, not at the log's head:

* a leader with K > 0: the last position of the highest commit K connected
  followers have acked (advanced by the sync gate, before it releases the
  answers of that commit, so a write is visible by the time it is
  acknowledged); a leader whose lease lapsed (the fence says no) stops
  advancing it;
* a follower: the leader's visible head as its frames and heartbeats say,
  never beyond its own log;
* a single node, or a leader with K = 0: the whole log (:attr:`cap` None,
  nothing to compute on the hot path);
* a node just promoted: its whole log at promotion (it is the truth now: the
  followers truncate to it), then as a leader.

The cap only grows while the node keeps its role; what it exposes is
``min(log head, cap)``, so a truncated log is never read beyond its end.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

#: Told of each new visible head (the store's head listeners: subscriptions, waits).
HeadNotifier = Callable[[int], None]


class VisibleHead:
    """The visible head's cap and, on a leader with K > 0, the commits not yet visible."""

    def __init__(self, notify: HeadNotifier) -> None:
        #: The last visible position; None: the whole log is visible.
        self.cap: int | None = None
        #: Whether this node may make more visible now (an elected leader's lease); None: yes.
        self.fence: Callable[[], bool] | None = None
        self._notify = notify
        self._lock = threading.Lock()
        #: A leader's own commits not yet visible: (commit, its last position), in order.
        self._pending: deque[tuple[int, int]] = deque()
        self._tracking = False

    def of(self, log_head: int) -> int:
        """What readers may see of a log that ends at *log_head*."""
        cap = self.cap
        return log_head if cap is None or log_head <= cap else cap

    def show_all(self) -> None:
        """The whole log is visible from now on (a single node, a leader with K = 0)."""
        with self._lock:
            self._tracking = False
            self._pending.clear()
            self.cap = None

    def lead_from(self, log_head: int) -> None:
        """A leader with K > 0: everything up to *log_head* is visible (its log is the
        truth), each later commit once K followers hold it (:meth:`held`)."""
        with self._lock:
            self._tracking = True
            self._pending.clear()
            self.cap = max(self.cap or 0, log_head)

    def follow(self) -> None:
        """A follower: keep what was shown, then follow the leader's visible head."""
        with self._lock:
            self._tracking = False
            self._pending.clear()
            if self.cap is None:
                self.cap = 0

    def truncated(self, log_head: int) -> None:
        """The log's tail was discarded: what comes again at those positions is the new
        leader's, visible only once it says so (a promoted node showed its whole log,
        which was not all kept)."""
        with self._lock:
            if self.cap is not None and self.cap > log_head:
                self.cap = log_head

    def committed(self, commit: int, last_position: int) -> None:
        """Writer thread: a leader's commit is durable here, not yet visible."""
        if self._tracking:
            with self._lock:
                self._pending.append((commit, last_position))

    def held(self, commit: int) -> None:
        """Enough followers hold *commit* (the sync gate): it and those before are visible.

        Nothing moves while the fence says no: a leader whose lease lapsed may
        have been replaced already, and the new leader may discard its tail.
        """
        fence = self.fence
        if fence is not None and not fence():
            return
        with self._lock:
            position = None
            while self._pending and self._pending[0][0] <= commit:
                position = self._pending.popleft()[1]
            if position is None or self.cap is None or position <= self.cap:
                return
            self.cap = position
        self._notify(position)

    def leader_says(self, position: int) -> None:
        """A follower: its leader's visible head is *position* (a frame or a heartbeat)."""
        with self._lock:
            if self._tracking or self.cap is None or position <= self.cap:
                return
            self.cap = position
        self._notify(position)
