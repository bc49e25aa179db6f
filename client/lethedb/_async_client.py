"""The asyncio client: the same API as :class:`lethedb.Client`, on ``grpc.aio``.

Like the blocking client, this module only performs I/O and waits; request
building, retry decisions and resume bookkeeping come from :mod:`lethedb._base`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, cast

import grpc
import grpc.aio

from lethedb._base import (
    AllReadCursor,
    AppendPipeline,
    BaseClient,
    ReadCursor,
    StreamReadCursor,
    build_append_request,
    build_read_all_request,
    build_read_stream_request,
    to_append_result,
)
from lethedb._exceptions import LetheError
from lethedb._models import ANY, Append, AppendResult, Event, ExpectedVersion, RecordedEvent
from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc

__all__ = ["AsyncClient"]


class _EventStoreStub(Protocol):
    """The typed face of the generated (untyped) stub on an aio channel."""

    Append: grpc.aio.UnaryUnaryMultiCallable[pb.AppendRequest, pb.AppendResponse]
    AppendStream: grpc.aio.StreamStreamMultiCallable[pb.AppendRequest, pb.AppendStreamResponse]
    ReadStream: grpc.aio.UnaryStreamMultiCallable[pb.ReadStreamRequest, pb.ReadResponse]
    ReadAll: grpc.aio.UnaryStreamMultiCallable[pb.ReadAllRequest, pb.ReadResponse]


class AsyncClient(BaseClient):
    """An asyncio LetheDB client; create and use it inside the one event loop it serves.

    Deadlines, retries and idempotency work exactly as in :class:`lethedb.Client`.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 10.0,
        max_retries: int = 5,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            max_retries=max_retries,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            channel_options=channel_options,
            channel_credentials=channel_credentials,
        )
        if channel_credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                target, channel_credentials, options=self._channel_options
            )
        # The generated gRPC module has no type stubs; the Protocol above is its typed face.
        stub = eventstore_pb2_grpc.EventStoreStub(self._channel)  # type: ignore[no-untyped-call]
        self._stub = cast(_EventStoreStub, stub)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def append(
        self,
        stream_id: str,
        events: Event | Sequence[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> AppendResult:
        """Append events to one stream, atomically; see :meth:`lethedb.Client.append`."""
        request = build_append_request(stream_id, events, expected_version, idempotency_key)
        deadline = self._timeout_for(timeout)
        retrying = self._retry_policy.start()
        while True:
            try:
                response = await self._stub.Append(request, timeout=deadline)
            except grpc.RpcError as exc:
                await asyncio.sleep(retrying.delay_or_raise(exc))
            else:
                return to_append_result(response)

    async def append_many(
        self, items: Iterable[Append], *, timeout: float | None = None
    ) -> list[AppendResult | LetheError]:
        """Pipeline many appends on one call; see :meth:`lethedb.Client.append_many`."""
        pipeline = AppendPipeline(items)
        deadline = self._timeout_for(timeout)
        retrying = self._retry_policy.start()
        while pipeline.pending:
            call = self._stub.AppendStream(iter(pipeline.requests()), timeout=deadline)
            try:
                async for response in call:
                    pipeline.acknowledge(response)
                pipeline.stream_ended()
            except grpc.RpcError as exc:
                delay = pipeline.retry_delay(exc, retrying)
                if delay is not None:
                    await asyncio.sleep(delay)
            finally:
                call.cancel()
        return pipeline.results()

    def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        max_count: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate (``async for``) over one stream; see :meth:`lethedb.Client.read_stream`."""
        cursor = StreamReadCursor(
            build_read_stream_request(stream_id, from_version, backwards, max_count)
        )
        return self._read(self._stub.ReadStream, cursor, self._timeout_for(timeout))

    def read_all(
        self,
        *,
        after: int | None = None,
        from_position: int | None = None,
        backwards: bool = False,
        max_count: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Iterate (``async for``) over the whole log; see :meth:`lethedb.Client.read_all`."""
        cursor = AllReadCursor(build_read_all_request(after, from_position, backwards, max_count))
        return self._read(self._stub.ReadAll, cursor, self._timeout_for(timeout))

    async def _read(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Any, pb.ReadResponse],
        cursor: ReadCursor,
        deadline: float,
    ) -> AsyncIterator[RecordedEvent]:
        retrying = self._retry_policy.start()
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
                # Also runs when the caller stops early and the generator is
                # closed: free the server's read instead of waiting for the deadline.
                call.cancel()
