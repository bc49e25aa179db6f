# Generated from lethedb/_async_transport.py by client/generate_sync.py: do not edit.
# Edit the asyncio source and run `make sync-client`.
"""One client's channels, stubs, deadlines and retry loops: what its parts call through.

The client, its admin client, its append sender and its subscriptions each
receive the same transport in their constructor and use only what it offers
here, instead of reaching into one another. A client of a cluster holds one
channel per node it has talked to (the hosts of its connection string and any
leader a server named), all with the same credentials and options, and closes
them all with the client; :class:`~lethedb._cluster.NodeRouter` says which
node each attempt goes to. ``_async_transport.py`` is the source;
``_transport.py`` is generated from it (``make sync-client``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from lethedb._cluster import LEADER, NodeRouter, Prefer
from lethedb._cursors import ReadCursor
from lethedb._exceptions import LetheError, error_from_rpc_error
from lethedb._models import RecordedEvent
from lethedb._retry import Retrying
from lethedb._settings import ClientSettings
from lethedb.v1 import admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb

__all__ = ["Transport"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class Node:
    """One node's channel and the stubs of the two services on it."""

    def __init__(self, address: str, channel: grpc.Channel) -> None:
        self.address = address
        self.channel = channel
        self.events = eventstore_pb2_grpc.EventStoreStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)

    def __repr__(self) -> str:
        return f"Node({self.address!r})"


class Transport:
    """The channels of one client and the calls made on them, with deadlines and retries.

    :meth:`unary` and :meth:`read` wrap a call in the retry policy and send
    each attempt to the node the router names; a failure teaches the router
    (a NotLeader names the leader, UNAVAILABLE passes the node over) before
    the retry. ``events`` and ``admin`` are the stubs on the node writes go to.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.retry = settings.retry
        self.router = NodeRouter(settings.hosts, settings.prefer)
        self._lock = threading.Lock()
        self._closed = False
        self._nodes: dict[str, Node] = {}
        self._first = self.node(settings.target)

    def node(self, address: str) -> Node:
        """The node at ``address``, its channel opened on first use and kept until close."""
        with self._lock:
            node = self._nodes.get(address)
            if node is None:
                if self._closed:  # calls fail as on any closed channel
                    return self._first
                node = self._nodes[address] = Node(address, self._open(address))
            return node

    def _open(self, address: str) -> grpc.Channel:
        options = self.settings.channel_options
        credentials = self.settings.credentials_for(address)
        if credentials is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, credentials, options=options)

    def reader(self, prefer: Prefer | None = None) -> Node:
        """The node for the next attempt of a read with this preference (a write: leader)."""
        return self.node(self.router.for_read(prefer))

    def writer(self) -> Node:
        """The node for the next attempt of a write: the last known leader."""
        return self.reader(LEADER)

    @property
    def events(self) -> eventstore_pb2_grpc.EventStoreStub:
        """The EventStore stub on the node writes go to now."""
        return self.writer().events

    @events.setter
    def events(self, stub: eventstore_pb2_grpc.EventStoreStub) -> None:
        self.writer().events = stub

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        """The Admin stub on the node writes go to now."""
        return self.writer().admin

    @admin.setter
    def admin(self, stub: admin_pb2_grpc.AdminStub) -> None:
        self.writer().admin = stub

    def deadline(self, timeout: float | None) -> float:
        """The per-attempt deadline of a call given ``timeout`` (None: the client's)."""
        return self.settings.deadline(timeout)

    def retrying(self, deadline: float, *, no_retry: str | None = None) -> Retrying:
        """The retry budget of one call; in a cluster, also ``deadline`` seconds from now."""
        return self.retry.start(no_retry=no_retry, budget=deadline, cluster=self.router)

    def observe(self, address: str, failure: BaseException) -> None:
        """Teach the router what an attempt sent to ``address`` met."""
        if isinstance(failure, grpc.RpcError):
            self.router.observe(address, error_from_rpc_error(failure))
        elif isinstance(failure, LetheError):
            self.router.observe(address, failure)

    def delay_or_raise(self, node: Node, exc: grpc.RpcError, retrying: Retrying) -> float:
        """Learn from a failed attempt; the wait before the next, or raise its error."""
        error = error_from_rpc_error(exc)
        self.router.observe(node.address, error)
        delay = retrying.next_delay(error)
        if delay is None:
            raise error from exc
        return delay

    def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        with self._lock:
            self._closed = True
            nodes = list(self._nodes.values())
        for node in nodes:
            node.channel.close()

    def unary(
        self,
        method: Callable[[Node], grpc.UnaryUnaryMultiCallable[_Request, _Response]],
        request: _Request,
        deadline: float,
        *,
        prefer: Prefer | None = LEADER,
        write: bool = False,
        at: Callable[[], str | None] | None = None,
        no_retry: str | None = None,
    ) -> _Response:
        """One unary call, resending the same request on retryable failures.

        ``method`` picks the call from a node's stubs; each attempt goes to the
        node ``prefer`` names (the leader by default; None: the client's
        preference). A ``write`` that succeeds tells the router where the leader is.
        ``at`` names the node of each attempt instead, when it returns an address
        (a subscription's commit goes to the node serving the subscription).
        """
        retrying = self.retrying(deadline, no_retry=no_retry)
        while True:
            address = at() if at is not None else None
            if address is not None:
                node = self.node(address)
            else:
                node = self.writer() if write else self.reader(prefer)
            try:
                response = method(node)(request, timeout=deadline)
            except grpc.RpcError as exc:
                time.sleep(self.delay_or_raise(node, exc, retrying))
            else:
                if write:
                    self.router.wrote(node.address)
                return response

    def read(
        self,
        method: Callable[[Node], grpc.UnaryStreamMultiCallable[Any, pb.ReadResponse]],
        cursor: ReadCursor,
        deadline: float,
        prefer: Prefer | None = None,
    ) -> Iterator[RecordedEvent]:
        """The events of a streamed read; a broken call resumes where ``cursor`` says.

        A retry may go to another node (its log is the same, position for
        position), so the caller still sees no gap and no duplicate.
        """
        retrying = self.retrying(deadline)
        while cursor.request is not None:
            node = self.reader(prefer)
            call = method(node)(cursor.request, timeout=deadline)
            try:
                for response in call:
                    yield from cursor.track(response.events)
                return
            except grpc.RpcError as exc:
                self.observe(node.address, exc)
                time.sleep(cursor.retry_delay(exc, retrying))
            finally:
                # Also runs when the caller stops iterating early (the generator
                # is closed): free the server's read instead of waiting for the deadline.
                call.cancel()  # type: ignore[no-untyped-call]
