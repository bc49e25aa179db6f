"""The gRPC services: thin adapters from protobuf calls to the store.

No storage logic lives here. A handler converts and validates the request,
hands it to the writer or the reader, and converts the answer. Domain errors
are turned into statuses by :mod:`lethedb_server.status` (the one place that
knows the mapping). Requests are decoded by :func:`_decoder`, which turns a
message protobuf cannot parse (invalid UTF-8 in a string, a truncated field)
into INVALID_ARGUMENT instead of gRPC's generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server import messages, status
from lethedb_server.errors import LetheError, ValidationError
from lethedb_server.model import StoredEvent
from lethedb_server.reader import DEFAULT_PAGE
from lethedb_server.store import Store
from lethedb_server.validation import Validator

log = logging.getLogger(__name__)

SERVICE_NAME = "lethedb.v1.EventStore"
_END = 2**64 - 1
#: Appends one AppendStream call may have queued at the writer at once.
STREAM_IN_FLIGHT = 256

Context = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M", bound=Message)


class _Undecodable:
    """Stands in for a request protobuf could not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoder(message_type: type[M]) -> Callable[[bytes], M | _Undecodable]:
    name = message_type.DESCRIPTOR.full_name

    def decode(raw: bytes) -> M | _Undecodable:
        try:
            return message_type.FromString(raw)
        except DecodeError as exc:
            return _Undecodable(f"the request is not a valid {name}: {exc}")

    return decode


def _decoded(request: M | _Undecodable) -> M:
    if isinstance(request, _Undecodable):
        raise ValidationError(request.reason)
    return request


def unary(
    handler: Callable[[Any, Any, Context], Awaitable[Any]],
) -> Callable[[Any, Any, Context], Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            return await handler(self, _decoded(request), context)
        except LetheError as exc:
            await status.abort(context, exc)

    return wrapper


def server_streaming(
    handler: Callable[[Any, Any, Context], AsyncIterator[Any]],
) -> Callable[[Any, Any, Context], AsyncIterator[Any]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for message in handler(self, _decoded(request), context):
                yield message
        except LetheError as exc:
            await status.abort(context, exc)

    return wrapper


class EventStoreService:
    """``lethedb.v1.EventStore``."""

    def __init__(self, store: Store, validator: Validator) -> None:
        self.store = store
        self.validator = validator

    async def _append(self, request: pb.AppendRequest | _Undecodable) -> pb.AppendResponse:
        command = messages.append_command(_decoded(request))
        self.validator.check_append(command)
        result = await asyncio.wrap_future(self.store.writer.submit(command))
        return messages.append_response(result)

    @unary
    async def Append(self, request: pb.AppendRequest, context: Context) -> pb.AppendResponse:  # noqa: N802
        return await self._append(request)

    async def AppendStream(  # noqa: N802
        self, requests: AsyncIterator[pb.AppendRequest | _Undecodable], context: Context
    ) -> AsyncIterator[pb.AppendStreamResponse]:
        """Pipelined appends: a reader task submits, this generator answers in order."""
        answers: asyncio.Queue[asyncio.Task[pb.AppendResponse] | None] = asyncio.Queue(
            STREAM_IN_FLIGHT
        )

        async def submit_all() -> None:
            try:
                async for request in requests:
                    await answers.put(asyncio.ensure_future(self._append(request)))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(submit_all())
        try:
            while (task := await answers.get()) is not None:
                try:
                    yield pb.AppendStreamResponse(ok=await task)
                except LetheError as exc:
                    code, message, actual = status.append_error_fields(exc)
                    yield pb.AppendStreamResponse(
                        error=pb.AppendError(code=code, message=message, actual_version=actual)
                    )
            await reader
        finally:
            reader.cancel()

    @server_streaming
    async def ReadStream(  # noqa: N802
        self, request: pb.ReadStreamRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        self.validator.check_stream_id(request.stream_id)
        backwards = request.backwards
        if request.HasField("from_version"):
            start = request.from_version
        else:
            start = _END if backwards else 0
        reader = self.store.reader

        def page(start: int, limit: int) -> list[StoredEvent]:
            return reader.read_stream(request.stream_id, start, backwards=backwards, limit=limit)

        async for message in _paged(page, start, backwards, request.max_count, _next_version):
            yield message

    @server_streaming
    async def ReadAll(  # noqa: N802
        self, request: pb.ReadAllRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        backwards = request.backwards
        which = request.WhichOneof("start")
        if which == "from_position":
            start = request.from_position
        elif which == "after_position":
            start = request.after_position + (-1 if backwards else 1)
        else:
            start = _END if backwards else 1
        reader = self.store.reader

        def page(start: int, limit: int) -> list[StoredEvent]:
            return reader.read_all(start, backwards=backwards, limit=limit)

        async for message in _paged(page, start, backwards, request.max_count, _next_position):
            yield message


def _next_version(event: StoredEvent, backwards: bool) -> int:
    return event.stream_version - 1 if backwards else event.stream_version + 1


def _next_position(event: StoredEvent, backwards: bool) -> int:
    return event.position - 1 if backwards else event.position + 1


async def _paged(
    read_page: Callable[[int, int], list[StoredEvent]],
    start: int,
    backwards: bool,
    max_count: int,
    next_start: Callable[[StoredEvent, bool], int],
) -> AsyncIterator[pb.ReadResponse]:
    """Read page after page off the event loop until the end or *max_count*."""
    remaining = max_count or _END
    while remaining > 0 and start >= 0:
        limit = min(DEFAULT_PAGE, remaining)
        events = await asyncio.to_thread(read_page, start, limit)
        for message in messages.read_responses(events):
            yield message
        if len(events) < limit:
            return
        remaining -= len(events)
        start = next_start(events[-1], backwards)


def add_event_store(server: grpc.aio.Server, service: EventStoreService) -> None:
    """Register the service with request decoders that never fail with INTERNAL."""
    handlers = {
        "Append": grpc.unary_unary_rpc_method_handler(
            service.Append,
            request_deserializer=_decoder(pb.AppendRequest),
            response_serializer=pb.AppendResponse.SerializeToString,
        ),
        "AppendStream": grpc.stream_stream_rpc_method_handler(
            service.AppendStream,
            request_deserializer=_decoder(pb.AppendRequest),
            response_serializer=pb.AppendStreamResponse.SerializeToString,
        ),
        "ReadStream": grpc.unary_stream_rpc_method_handler(
            service.ReadStream,
            request_deserializer=_decoder(pb.ReadStreamRequest),
            response_serializer=pb.ReadResponse.SerializeToString,
        ),
        "ReadAll": grpc.unary_stream_rpc_method_handler(
            service.ReadAll,
            request_deserializer=_decoder(pb.ReadAllRequest),
            response_serializer=pb.ReadResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
