"""Who may call what: bearer tokens, roles, and the one interceptor that checks them.

**Tokens** are checked against the tokens file by
:class:`lethedb_server.tokens.TokenStore` (format, hashing and why SHA-256
suffices are described there).

**Roles.** ``reader`` < ``writer`` < ``admin``; each role may do what the
roles below it may. :data:`METHOD_ROLES` names the least role of every
``lethedb.v1.EventStore`` method; every ``lethedb.v1.Admin`` method needs
admin; the standard health and reflection services are open to all. Any
other method is refused to every token (a new RPC must be added to the table
before anybody can call it: a secure default, and a unit test compares the
table with the protos).

**The interceptor.** :class:`AccessInterceptor` sees every call, unary and
streaming alike, before its handler. With a tokens file it authenticates
(missing, malformed, unknown or revoked token: UNAUTHENTICATED) and
authorises (role too low: PERMISSION_DENIED); both refusals are logged with
the method, the peer and the token's *name*, never the token. Allowed calls
run with the caller's identity in a context variable (:func:`caller_role`),
which the handlers read, for example to record who forgot a subject. Without
a tokens file authentication is off (the local development default) and every
caller acts as ``admin``. The interceptor also holds each connection to its
streaming-call limit (:mod:`lethedb_server.limits`).

**Never** log or echo a token, a digest or the ``authorization`` metadata.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
import grpc.aio

from lethedb_server.errors import ValidationError
from lethedb_server.limits import ConnectionStreams
from lethedb_server.tokens import ROLES, Identity, Role, TokenStore

log = logging.getLogger(__name__)

_RANK: Final[dict[str, int]] = {role: rank for rank, role in enumerate(ROLES)}

#: The least role each method needs. Every method of ADMIN_SERVICE needs admin.
METHOD_ROLES: Final[dict[str, Role]] = {
    "/lethedb.v1.EventStore/ReadStream": "reader",
    "/lethedb.v1.EventStore/ReadAll": "reader",
    "/lethedb.v1.EventStore/Subscribe": "reader",
    "/lethedb.v1.EventStore/GetSubject": "reader",
    "/lethedb.v1.EventStore/CommitCheckpoint": "reader",
    "/lethedb.v1.EventStore/GetCheckpoint": "reader",
    "/lethedb.v1.EventStore/Append": "writer",
    "/lethedb.v1.EventStore/AppendStream": "writer",
    "/lethedb.v1.EventStore/AppendBatch": "writer",
    "/lethedb.v1.EventStore/Commit": "writer",
    "/lethedb.v1.EventStore/ForgetSubject": "admin",
    "/lethedb.v1.EventStore/ExportSubject": "admin",
}
ADMIN_SERVICE: Final = "lethedb.v1.Admin"
#: Services any caller may use, with or without a token.
OPEN_SERVICES: Final = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
#: The role callers act with when authentication is off (no tokens file).
AUTH_OFF_ROLE: Final[Role] = "admin"


def _service(method: str) -> str:
    return method.lstrip("/").split("/", 1)[0]


def is_open(method: str) -> bool:
    return _service(method) in OPEN_SERVICES


def required_role(method: str) -> Role | None:
    """The least role *method* needs, or None when no token may call it."""
    role = METHOD_ROLES.get(method)
    if role is None and _service(method) == ADMIN_SERVICE:
        return "admin"
    return role


def role_allows(role: str, needed: Role) -> bool:
    return _RANK.get(role, -1) >= _RANK[needed]


# --- the caller's identity ---------------------------------------------------------


AUTH_OFF: Final = Identity("", AUTH_OFF_ROLE)
ANONYMOUS: Final = Identity("", "anonymous")
_CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar(
    "lethedb_caller", default=AUTH_OFF
)


def caller_role() -> str:
    """The role of the current call's token; ``admin`` when authentication is off."""
    return _CALLER.get().role


def caller_name() -> str:
    """The name of the current call's token; empty when authentication is off."""
    return _CALLER.get().name


# --- the interceptor -------------------------------------------------------------------


class AccessObserver(Protocol):
    """Told about every refused call (implemented by the metrics)."""

    def call_refused(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str  # a short label for metrics and logs
    message: str  # what the client is told
    token_name: str = ""  # the name of a valid token that lacks the role


_MISSING = Refusal(
    grpc.StatusCode.UNAUTHENTICATED,
    "missing_token",
    "this server requires a bearer token: send the metadata 'authorization: Bearer <token>'",
)
_MALFORMED = Refusal(
    grpc.StatusCode.UNAUTHENTICATED,
    "malformed_token",
    "the authorization metadata must be 'Bearer <token>'",
)
_UNKNOWN = Refusal(
    grpc.StatusCode.UNAUTHENTICATED,
    "invalid_token",
    "the bearer token is not valid (unknown or revoked)",
)


def bearer_token(metadata: Iterable[Any] | None) -> str | Refusal:
    """The token of the ``authorization: Bearer <token>`` metadata, or why there is none."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if not isinstance(value, str):
            return _MALFORMED
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _MALFORMED
        return token
    return _MISSING


class _RateLimitedLog:
    """Log refusals, but at most ``burst`` lines per ``window_s``: a client hammering
    the server with a bad token must not flood the log."""

    def __init__(self, burst: int = 20, window_s: float = 10.0) -> None:
        self.burst = burst
        self.window_s = window_s
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def __call__(self, method: str, peer: str, refusal: Refusal) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            if self._suppressed:
                log.warning("%d more refused calls were not logged", self._suppressed)
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self.burst:
            self._suppressed += 1
            return
        self._logged += 1
        log.warning(
            "refused %s from %s: %s (%s)",
            method,
            peer,
            refusal.code.name,
            refusal.reason,
            extra={"method": method, "peer": peer, "token_name": refusal.token_name},
        )


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authentication, authorisation and per-connection stream limits for every call."""

    def __init__(
        self,
        tokens: TokenStore | None,
        *,
        max_streams_per_connection: int = 0,
        observer: AccessObserver | None = None,
    ) -> None:
        self.tokens = tokens
        self.streams = ConnectionStreams(max_streams_per_connection)
        self.observer = observer
        self._log_refusal = _RateLimitedLog()

    def check(self, method: str, metadata: Iterable[Any] | None) -> Identity | Refusal:
        """Who the caller is, or why the call is refused (authentication on)."""
        assert self.tokens is not None
        token = bearer_token(metadata)
        if isinstance(token, Refusal):
            return token
        identity = self.tokens.authenticate(token)
        if identity is None:
            return _UNKNOWN
        needed = required_role(method)
        if needed is None:
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "unlisted_method",
                f"{method} is not in the server's role table, so no token may call it",
            )
        if not role_allows(identity.role, needed):
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "role",
                f"{method} needs the {needed} role; token {identity.name!r} has the "
                f"{identity.role} role",
                identity.name,
            )
        return identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        identity = AUTH_OFF
        if self.tokens is not None:
            if is_open(method):
                identity = ANONYMOUS
            else:
                checked = self.check(method, handler_call_details.invocation_metadata)
                if isinstance(checked, Refusal):
                    return self._refuse(handler, method, checked)
                identity = checked
        streaming = handler.request_streaming or handler.response_streaming
        if not streaming and identity is AUTH_OFF:
            return handler  # nothing to add: the default identity is already right
        return self._wrap(handler, identity, streaming)

    def _refuse(
        self,
        handler: grpc.RpcMethodHandler,  # type: ignore[type-arg]
        method: str,
        refusal: Refusal,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._log_refusal(method, context.peer(), refusal)
            if self.observer is not None:
                self.observer.call_refused(refusal.reason)
            await context.abort(refusal.code, refusal.message)

        # No request deserializer: an unauthenticated caller's bytes never
        # reach the protobuf parser.
        return _same_kind(handler, refuse, None, None)

    def _wrap(
        self,
        handler: grpc.RpcMethodHandler,  # type: ignore[type-arg]
        identity: Identity,
        streaming: bool,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        behavior = _behavior(handler)
        streams = self.streams if streaming else None
        observer = self.observer

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Callable[[], None]:
            _CALLER.set(identity)
            if streams is None:
                return _nothing
            peer = context.peer()
            release = streams.acquire(peer)
            if release is None:
                if observer is not None:
                    observer.call_refused("streams_per_connection")
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, streams.refusal(peer))
                raise AssertionError("unreachable: abort raises")
            return release

        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                release = await admit(context)
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    release()

            wrapped = wrapped_stream
        else:

            async def wrapped_call(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                release = await admit(context)
                try:
                    return await behavior(request, context)
                finally:
                    release()

            wrapped = wrapped_call
        return _same_kind(
            handler, wrapped, handler.request_deserializer, handler.response_serializer
        )


def _nothing() -> None:
    return None


def _behavior(handler: Any) -> Callable[..., Any]:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return behavior  # type: ignore[no-any-return]
    raise TypeError(f"a method handler without a behavior: {handler!r}")


def _same_kind(
    handler: Any,
    behavior: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None,
    response_serializer: Callable[[Any], bytes] | None,
) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    if handler.request_streaming and handler.response_streaming:
        factory: Callable[..., Any] = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    result: grpc.RpcMethodHandler = factory(  # type: ignore[type-arg]
        behavior,
        request_deserializer=request_deserializer,
        response_serializer=response_serializer,
    )
    return result


# --- exposure -------------------------------------------------------------------------


def is_loopback_address(listen: str) -> bool:
    """True when *listen* (host:port, [v6]:port or unix:path) is reachable only locally."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or empty (every interface): assume reachable


def check_exposure(listen: str, *, tls: bool, tokens: bool, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without TLS and tokens, unless told to."""
    if is_loopback_address(listen) or (tls and tokens):
        return
    missing = " and ".join(
        what for what, present in (("TLS", tls), ("authentication tokens", tokens)) if not present
    )
    if not insecure:
        raise ValidationError(
            f"refusing to listen on {listen} without {missing}: anyone who can reach the "
            "address could read or write the store. Configure tls_cert/tls_key and "
            "tokens_file, listen on 127.0.0.1, or pass --insecure if a trusted network "
            "layer provides this protection"
        )
    log.warning(
        "INSECURE: serving %s without %s because --insecure was given; anyone who can reach "
        "this address may read, write and erase data",
        listen,
        missing,
    )


def log_startup(tokens: TokenStore | None) -> None:
    if tokens is None:
        log.info("authentication is off (no tokens_file): every caller acts as admin")
    else:
        log.info("authentication on: %d tokens from %s", len(tokens), tokens.path)
