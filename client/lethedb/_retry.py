"""The retry policy: which failures are retried, and how long to wait before each retry.

One :class:`RetryPolicy` is given to a client (``retry=``), as httpx takes
``timeout=``; each logical call draws a :class:`Retrying` budget from it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

import grpc

from lethedb._checks import check_positive
from lethedb._exceptions import (
    DeadlineExceeded,
    LetheError,
    NotLeader,
    Overloaded,
    Unavailable,
    ValidationError,
    error_from_rpc_error,
)

if TYPE_CHECKING:
    from lethedb._cluster import NodeRouter

#: The retries of a client that is given no policy: 5 retries, 50 ms doubling to 2 s.
DEFAULT_MAX_RETRIES: Final = 5
DEFAULT_INITIAL_BACKOFF: Final = 0.05
DEFAULT_MAX_BACKOFF: Final = 2.0


class RetryPolicy:
    """Which failures are retried and how long to wait before each retry.

    Only UNAVAILABLE and DEADLINE_EXCEEDED are retried: they say nothing about
    the request itself, and almost every request is safe to resend (appends
    carry an idempotency key, forgets, legal holds and shreds are idempotent or
    harmless to repeat, reads resume after the last event delivered). The
    exceptions make their single attempt with ``start(no_retry=...)``: a
    backup, which could meet its own half-written destination, and an export
    that has already delivered events, as it cannot resume. Delays grow
    exponentially with "equal jitter" (half fixed, half random), so clients
    that lost the same server do not come back in lockstep, yet each retry
    still waits at least half its step.

    Pass one to a client as ``retry=``, for example
    ``Client(target, retry=RetryPolicy(max_retries=10, max_backoff=5.0))``:
    ``max_retries`` retries at most per call (0: a single attempt), the first
    after about ``initial_backoff`` seconds, doubling up to ``max_backoff``.
    """

    def __init__(
        self,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        initial_backoff: float = DEFAULT_INITIAL_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        random: Callable[[], float] = random.random,
    ) -> None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValidationError(f"max_retries is {max_retries!r}; it must be an int >= 0")
        check_positive("initial_backoff", initial_backoff)
        check_positive("max_backoff", max_backoff)
        if max_backoff < initial_backoff:
            raise ValidationError(
                f"max_backoff is {max_backoff}; it must be >= initial_backoff ({initial_backoff})"
            )
        self.max_retries = max_retries
        self.initial_backoff = float(initial_backoff)
        self.max_backoff = float(max_backoff)
        self._random = random

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_retries={self.max_retries}, initial_backoff={self.initial_backoff}, "
            f"max_backoff={self.max_backoff})"
        )

    @staticmethod
    def is_retryable(error: LetheError) -> bool:
        return isinstance(error, Unavailable | DeadlineExceeded | Overloaded)

    def delays(self) -> Iterator[float]:
        """The waits before retry 1, 2, ... max_retries."""
        for attempt in range(self.max_retries):
            step = min(self.max_backoff, self.initial_backoff * 2**attempt)
            yield step / 2 + self._random() * step / 2

    def reconnect_delays(self) -> Iterator[float]:
        """The waits before reconnect 1, 2, ... of a subscription: endless, capped at max_backoff.

        A subscription is a long-lived follower (a projection daemon): it keeps
        trying until the server is back or the caller closes it.
        """
        attempt = 0
        while True:
            step = min(self.max_backoff, self.initial_backoff * 2 ** min(attempt, 32))
            attempt += 1
            yield step / 2 + self._random() * step / 2

    def start(
        self,
        *,
        no_retry: str | None = None,
        budget: float | None = None,
        cluster: NodeRouter | None = None,
    ) -> Retrying:
        """The budget of one call; with ``no_retry`` (why not), a single attempt.

        ``budget`` (seconds from now) and ``cluster``: see :class:`Retrying`.
        """
        return Retrying(self, no_retry=no_retry, budget=budget, cluster=cluster)


class Retrying:
    """The retry budget of one logical call (which may span several gRPC calls).

    Within a cluster the budget is time as well as a count: a failover takes
    as long as it takes (a leader lease to expire, an election), so once the
    policy's retries are spent, a call keeps looking for a node that answers
    (with backoff capped at ``max_backoff``) until ``budget`` seconds after it
    started: the caller sees latency, not errors, when the failover finishes
    within that time. That applies to a NotLeader on any client, and to
    UNAVAILABLE when ``cluster`` knows another node to turn to. The first
    NotLeader that names a leader is followed at once (it is a redirect, not
    a failure); later ones wait, so that nodes that disagree about the
    leader cannot keep a call spinning.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        no_retry: str | None = None,
        budget: float | None = None,
        cluster: NodeRouter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._no_retry = no_retry
        self._delays = policy.delays()
        self._clock = clock
        self._until = None if budget is None else clock() + budget
        self._cluster = cluster
        self._endless: Iterator[float] | None = None
        self._redirected = False
        self.attempts = 1

    def reset(self) -> None:
        """Restore the full budget: the call made progress, so the last failure is history."""
        self._delays = self._policy.delays()
        self._endless = None
        self.attempts = 1

    def next_delay(self, error: LetheError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with ``error``."""
        redirect = isinstance(error, NotLeader)
        if not redirect and not self._policy.is_retryable(error):
            return None
        if self._no_retry is not None:
            error.add_note(f"lethedb: not retried: {self._no_retry}")
            return None
        stretched = (
            self._until is not None
            and self._policy.max_retries > 0
            and (redirect or (self._cluster is not None and self._cluster.clustered))
        )
        delay: float | None
        if isinstance(error, NotLeader) and error.leader and not self._redirected:
            self._redirected = True
            delay = 0.0
        else:
            delay = next(self._delays, None)
            if delay is None and stretched:
                if self._endless is None:
                    self._endless = self._policy.reconnect_delays()
                delay = next(self._endless)
        if delay is None:
            error.add_note(f"lethedb: gave up after {self.attempts} attempts")
            return None
        if stretched and self._until is not None and self._clock() + delay >= self._until:
            error.add_note(
                f"lethedb: gave up after {self.attempts} attempts: no node could take the "
                "call within its deadline"
            )
            return None
        self.attempts += 1
        return delay

    def delay_or_raise(self, exc: grpc.RpcError) -> float:
        """Map a failed call; return the wait before retrying, or raise the mapped error."""
        error = error_from_rpc_error(exc)
        delay = self.next_delay(error)
        if delay is None:
            raise error from exc
        return delay
