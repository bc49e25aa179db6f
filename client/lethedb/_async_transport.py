"""One client's channel, stubs, deadlines and retry loops: what its parts call through.

The client, its admin client, its append sender and its subscriptions each
receive the same transport in their constructor and use only what it offers
here, instead of reaching into one another. ``_async_transport.py`` is the
source; ``_transport.py`` is generated from it (``make sync-client``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
import grpc.aio

from lethedb._cursors import ReadCursor
from lethedb._models import RecordedEvent
from lethedb._settings import ClientSettings
from lethedb.v1 import admin_pb2_grpc, eventstore_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb

__all__ = ["AsyncTransport"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncTransport:
    """The channel of one client and the calls made on it, with deadlines and retries.

    ``events`` and ``admin`` are the generated stubs of the two services;
    :meth:`unary` and :meth:`read` wrap a call of theirs in the retry policy.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.retry = settings.retry
        if settings.channel_credentials is None:
            self.channel = grpc.aio.insecure_channel(
                settings.target, options=settings.channel_options
            )
        else:
            self.channel = grpc.aio.secure_channel(
                settings.target, settings.channel_credentials, options=settings.channel_options
            )
        self.events = eventstore_pb2_grpc.EventStoreStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def deadline(self, timeout: float | None) -> float:
        """The per-attempt deadline of a call given ``timeout`` (None: the client's)."""
        return self.settings.deadline(timeout)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self.channel.close(None)

    async def unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        deadline: float,
        *,
        no_retry: str | None = None,
    ) -> _Response:
        """One unary call, resending the same request on retryable failures."""
        retrying = self.retry.start(no_retry=no_retry)
        while True:
            try:
                return await method(request, timeout=deadline)
            except grpc.RpcError as exc:
                await asyncio.sleep(retrying.delay_or_raise(exc))

    async def read(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Any, pb.ReadResponse],
        cursor: ReadCursor,
        deadline: float,
    ) -> AsyncIterator[RecordedEvent]:
        """The events of a streamed read; a broken call resumes where ``cursor`` says."""
        retrying = self.retry.start()
        while cursor.request is not None:
            call = method(cursor.request, timeout=deadline)
            try:
                async for response in call:
                    for event in cursor.track(response.events):
                        yield event
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(cursor.retry_delay(exc, retrying))
            finally:
                # Also runs when the caller stops iterating early (the generator
                # is closed): free the server's read instead of waiting for the deadline.
                call.cancel()
