"""gRPC plumbing shared by the services: decoding, error mapping, registration.

Requests are decoded by :func:`decoder`, which turns a message protobuf cannot
parse (invalid UTF-8 in a string, a truncated field) into INVALID_ARGUMENT
instead of gRPC's generic INTERNAL. The :func:`unary` and
:func:`server_streaming` wrappers turn domain errors into statuses through
:mod:`lethedb_server.api.status`, so no handler maps an error by hand.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from lethedb_server.api import status
from lethedb_server.errors import LetheError, ValidationError

Context = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M", bound=Message)


class Undecodable:
    """Stands in for a request protobuf could not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


#: A check of a request's raw bytes before it is parsed; raises ValidationError.
Precheck = Callable[[bytes], None]


def decoder(
    message_type: type[M], precheck: Precheck | None = None
) -> Callable[[bytes], M | Undecodable]:
    """The request deserializer; *precheck* sees the bytes first (cheap limits)."""
    name = message_type.DESCRIPTOR.full_name

    def decode(raw: bytes) -> M | Undecodable:
        try:
            if precheck is not None:
                precheck(raw)
            return message_type.FromString(raw)
        except DecodeError as exc:
            return Undecodable(f"the request is not a valid {name}: {exc}")
        except ValidationError as exc:
            return Undecodable(str(exc))

    return decode


def decoded(request: M | Undecodable) -> M:
    if isinstance(request, Undecodable):
        raise ValidationError(request.reason)
    return request


def unary(
    handler: Callable[[Any, Any, Context], Awaitable[Any]],
) -> Callable[[Any, Any, Context], Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            return await handler(self, decoded(request), context)
        except LetheError as exc:
            await status.abort(context, exc)

    return wrapper


def server_streaming(
    handler: Callable[[Any, Any, Context], AsyncIterator[Any]],
) -> Callable[[Any, Any, Context], AsyncIterator[Any]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        messages: AsyncIterator[Any] | None = None
        try:
            messages = handler(self, decoded(request), context)
            async for message in messages:
                yield message
        except LetheError as exc:
            await status.abort(context, exc)
        finally:
            # Close the handler's generator now (a cancelled call ends here),
            # not whenever it is collected: its finally blocks release what the
            # call holds, such as a subscription slot or a group membership.
            close = getattr(messages, "aclose", None)
            if close is not None:
                await close()

    return wrapper


Kind = Literal["unary", "server_streaming", "stream_stream"]
Method = tuple[Kind, Callable[..., Any], type[Message], type[Message]]


def register(
    server: grpc.aio.Server,
    service_name: str,
    methods: dict[str, Method],
    prechecks: dict[str, Precheck] | None = None,
) -> None:
    """Add a service whose requests go through :func:`decoder` (and *prechecks*, by method)."""
    prechecks = prechecks or {}
    factories = {
        "unary": grpc.unary_unary_rpc_method_handler,
        "server_streaming": grpc.unary_stream_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        name: factories[kind](
            handler,
            request_deserializer=decoder(request_type, prechecks.get(name)),
            response_serializer=response_type.SerializeToString,
        )
        for name, (kind, handler, request_type, response_type) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
