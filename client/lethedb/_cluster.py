"""Which node of a cluster each call goes to, learned from the answers (no I/O).

A client knows the hosts of its connection string and learns the rest from
the servers: the node that takes a write is the leader, a follower that
refuses one (NotLeader) names the leader,
and a node that cannot answer (UNAVAILABLE: down, draining, or a follower
still catching up) is passed over for the next host. Writes go to the last
known leader; reads go where their preference says. The transport asks
:class:`NodeRouter` for an address before each attempt and reports each
failure to it, so every retry is sent where it now has the best chance.
"""

from __future__ import annotations

import threading
from typing import Final, Literal, TypeAlias, get_args

from lethedb._checks import type_name
from lethedb._exceptions import (
    DeadlineExceeded,
    LetheError,
    NotLeader,
    Unavailable,
    ValidationError,
)

Prefer: TypeAlias = Literal["leader", "follower", "any"]
"""Where a read goes: the leader, a follower (the leader only when no other
host is known), or any node (the one the client is using; another one when it
cannot answer)."""

PREFERENCES: Final[tuple[str, ...]] = get_args(Prefer)

#: Where writes go (and reads that ask for the leader).
LEADER: Final[Prefer] = "leader"


def check_prefer(prefer: object, name: str = "prefer") -> Prefer:
    """``prefer`` if it is one of :data:`PREFERENCES`; ValidationError otherwise."""
    if not isinstance(prefer, str):
        raise ValidationError(f"{name} is {type_name(prefer)}; expected one of {PREFERENCES}")
    if prefer not in PREFERENCES:
        raise ValidationError(f"{name} is {prefer!r}; expected one of {', '.join(PREFERENCES)}")
    return prefer  # type: ignore[return-value]  # checked against the Literal's values above


class NodeRouter:
    """The hosts a client knows, the leader it last heard of, and the host it is using.

    Thread-safe: the blocking client's callers and gRPC's callback threads
    report to it at once. A failure moves the client off a host only if that
    host is still the one in use, so a burst of failures from one broken call
    (every append of a batch reports it) moves it one host, not several.
    """

    def __init__(self, hosts: tuple[str, ...], prefer: Prefer = LEADER) -> None:
        if not hosts:
            raise ValidationError("a client needs at least one host")
        self._lock = threading.Lock()
        self._hosts = list(dict.fromkeys(hosts))
        self._current = 0
        #: The leader as a server last named it; None when unknown.
        self.leader: str | None = None
        #: The client's default read preference.
        self.prefer = prefer

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host known: the connection string's, then each leader a server named."""
        with self._lock:
            return tuple(self._hosts)

    @property
    def clustered(self) -> bool:
        """Whether there is another node to turn to (several hosts, or a leader was named)."""
        with self._lock:
            return len(self._hosts) > 1

    def for_write(self) -> str:
        """The address of the next write: the last known leader, else the host in use."""
        with self._lock:
            return self.leader or self._hosts[self._current]

    def for_read(self, prefer: Prefer | None = None) -> str:
        """The address of the next read with this preference (None: the client's)."""
        prefer = prefer or self.prefer
        if prefer == "leader":
            return self.for_write()
        with self._lock:
            current = self._hosts[self._current]
            if prefer == "any" or self.leader is None or current != self.leader:
                return current
            count = len(self._hosts)
            for step in range(1, count):
                index = (self._current + step) % count
                if self._hosts[index] != self.leader:
                    # It becomes the host in use, so that a failure passes it over.
                    self._current = index
                    return self._hosts[index]
            return current

    def wrote(self, address: str) -> None:
        """A write succeeded at ``address``: that node is the leader (a follower refuses writes)."""
        with self._lock:
            self.leader = address
            if address not in self._hosts:
                self._hosts.append(address)

    def observe(self, address: str, error: LetheError) -> None:
        """Learn from a failed attempt sent to ``address``."""
        with self._lock:
            if isinstance(error, NotLeader):
                if error.leader and error.leader != address:
                    self.leader = error.leader
                    if error.leader not in self._hosts:
                        self._hosts.append(error.leader)
                    return
                self._pass_over(address)
            elif isinstance(error, Unavailable | DeadlineExceeded):
                self._pass_over(address)

    def _pass_over(self, address: str) -> None:
        """``address`` cannot serve now: forget it as leader, and use the next host."""
        if self.leader == address:
            self.leader = None
        if self._hosts[self._current] == address:
            self._current = (self._current + 1) % len(self._hosts)

    def __repr__(self) -> str:
        return f"NodeRouter(hosts={self.hosts!r}, leader={self.leader!r})"
