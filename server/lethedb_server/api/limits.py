"""Resource limits of the gRPC server: what one client may hold, and how it is told.

Every limit here protects the server from one client (buggy or hostile) and
refuses the excess with a status that says which limit was hit, so that the
server stays healthy for everybody else:

* **message size** (``max_message_bytes``): gRPC itself refuses a larger
  message with RESOURCE_EXHAUSTED before any handler sees it;
* **HTTP/2 streams per connection** (``max_concurrent_streams``): advertised
  in the connection's SETTINGS frame, so a client that opens more calls waits
  for a free stream on its own side (flow control, no memory on the server);
* **streaming calls per connection** (``max_streams_per_connection``): reads,
  exports, subscriptions and append streams are long-lived, so they are
  counted by :class:`ConnectionStreams` and the one too many is refused with
  RESOURCE_EXHAUSTED (it is meant to be lower than the HTTP/2 limit, which
  would otherwise make the client wait instead of hearing why). A connection
  is known by its peer address; over a unix socket all clients share one;
* **appends in flight** (``max_inflight_appends``, ``max_inflight_events``,
  ``max_inflight_bytes``): counted by the writer, the excess refused with
  :class:`~lethedb_server.errors.Overloaded`; one call's events and bytes
  (``max_request_events``, ``max_request_bytes``) are checked on the wire
  before it is parsed (:mod:`lethedb_server.api.wire`);
* **keepalive and ping abuse**: the server pings idle connections to find
  dead peers, and answers a client that pings more often than
  ``keepalive_min_ping_interval_s`` without sending data with strikes, then
  GOAWAY (ENHANCE_YOUR_CALM) after ``max_ping_strikes``;
* **connections** (``max_connections``, ``handshake_timeout_s``,
  ``connection_idle_timeout_s``): gRPC closes a connection beyond the total
  at accept, one that has not finished its handshake (TLS, HTTP/2 preface and
  settings) in time, and one without calls for too long. The cap per peer
  address and the log lines are :mod:`lethedb_server.api.connections`'s.

The gRPC channel options above are built from the configuration by
:func:`lethedb_server.ops.server.server_options` (the configuration lives in
``ops``, above this layer). This module must never block or do I/O: it runs
on the event loop, per call.
"""

from __future__ import annotations

from collections.abc import Callable

Release = Callable[[], None]


class ConnectionStreams:
    """Streaming calls in progress per connection (the peer address names it).

    Used from the event loop only, so it needs no lock. ``limit`` 0 means
    no limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, peer: str) -> Release | None:
        """Count one more call on *peer*'s connection; None when it has no room left."""
        count = self._open.get(peer, 0)
        if self.limit and count >= self.limit:
            return None
        self._open[peer] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open[peer] - 1
            if left:
                self._open[peer] = left
            else:
                del self._open[peer]

        return release

    def refusal(self, peer: str) -> str:
        return (
            f"this connection already has {self._open.get(peer, 0)} streaming calls in "
            f"progress; the limit is {self.limit} (max_streams_per_connection): finish or "
            "cancel one, or open another connection"
        )

    def open_calls(self, peer: str) -> int:
        return self._open.get(peer, 0)
