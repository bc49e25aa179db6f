# Generated from lethedb/_async_transport.py by client/generate_sync.py: do not edit.
# Edit the asyncio source and run `make sync-client`.
"""One client's channel, stubs, deadlines and retry loops: what its parts call through.

The client, its admin client, its append sender and its subscriptions each
receive the same transport in their constructor and use only what it offers
here, instead of reaching into one another. ``_async_transport.py`` is the
source; ``_transport.py`` is generated from it (``make sync-client``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

import grpc

from lethedb._cursors import ReadCursor
from lethedb._models import RecordedEvent
from lethedb._settings import ClientSettings
from lethedb.v1 import admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb

__all__ = ["Transport"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class Transport:
    """The channel of one client and the calls made on it, with deadlines and retries.

    ``events`` and ``admin`` are the generated stubs of the two services;
    :meth:`unary` and :meth:`read` wrap a call of theirs in the retry policy.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.retry = settings.retry
        if settings.channel_credentials is None:
            self.channel = grpc.insecure_channel(settings.target, options=settings.channel_options)
        else:
            self.channel = grpc.secure_channel(
                settings.target, settings.channel_credentials, options=settings.channel_options
            )
        self.events = eventstore_pb2_grpc.EventStoreStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def deadline(self, timeout: float | None) -> float:
        """The per-attempt deadline of a call given ``timeout`` (None: the client's)."""
        return self.settings.deadline(timeout)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()

    def unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        deadline: float,
        *,
        no_retry: str | None = None,
    ) -> _Response:
        """One unary call, resending the same request on retryable failures."""
        retrying = self.retry.start(no_retry=no_retry)
        while True:
            try:
                return method(request, timeout=deadline)
            except grpc.RpcError as exc:
                time.sleep(retrying.delay_or_raise(exc))

    def read(
        self,
        method: grpc.UnaryStreamMultiCallable[Any, pb.ReadResponse],
        cursor: ReadCursor,
        deadline: float,
    ) -> Iterator[RecordedEvent]:
        """The events of a streamed read; a broken call resumes where ``cursor`` says."""
        retrying = self.retry.start()
        while cursor.request is not None:
            call = method(cursor.request, timeout=deadline)
            try:
                for response in call:
                    yield from cursor.track(response.events)
                return
            except grpc.RpcError as exc:
                time.sleep(cursor.retry_delay(exc, retrying))
            finally:
                # Also runs when the caller stops iterating early (the generator
                # is closed): free the server's read instead of waiting for the deadline.
                call.cancel()  # type: ignore[no-untyped-call]
