"""Who may call what: bearer tokens, roles, and the one interceptor that checks them.

**Tokens** are checked against the tokens file by
:class:`lethedb_server.api.tokens.TokenStore` (format, hashing and why SHA-256
suffices are described there).

**Roles.** ``reader`` < ``consumer`` < ``writer`` < ``admin``; each role may
do what the roles below it may. ``replica`` stands outside that ladder: it is
the role of a follower node's token, which may call the
``lethedb.v1.Replication`` methods and nothing else, and no other role may
call those (an admin token cannot pull a copy of the log with its keys).
:data:`METHOD_ROLES` names the least role of every ``lethedb.v1.EventStore``
and ``lethedb.v1.Replication`` method; every ``lethedb.v1.Admin`` method needs
admin; the standard health and reflection services are open to all. Any
other method is refused to every token (a new RPC must be added to the table
before anybody can call it: a secure default, and a unit test compares the
table with the protos). A few requests need more than their method's role
because of what they ask (joining a consumer group needs ``consumer``, moving
a group's checkpoint back needs ``admin``): handlers check those with
:func:`require_role`.

**Revocation.** Every streaming call in progress is registered under its
token's digest. When the tokens file is reloaded (the
:class:`~lethedb_server.api.tokens.TokenStore` watches it), each of them is
checked again: a call whose token is gone ends with UNAUTHENTICATED, one whose
token's role became too low with PERMISSION_DENIED, and nothing more is sent
on it (or, for an append stream, taken from it). A unary call in progress
finishes: it was allowed when it started and ends by itself.

**The interceptor.** :class:`AccessInterceptor` sees every call, unary and
streaming alike, before its handler. With a tokens file it authenticates
(missing, malformed, unknown or revoked token: UNAUTHENTICATED) and
authorises (role too low: PERMISSION_DENIED); both refusals are logged with
the method, the peer and the token's *name*, never the token, at most
``burst`` lines per window and a summary per peer and reason of what was left
out. Allowed calls run with the caller's identity in a context variable
(:func:`caller_role`), which the handlers read, for example to record who
forgot a subject. Without a tokens file authentication is off (the local
development default) and every caller acts as ``admin``. The interceptor also
holds each connection to its streaming-call limit (:mod:`lethedb_server.api.limits`)
and each client (a token, or a peer host when authentication is off) to its
quotas of streaming calls and subscriptions (:class:`ClientQuotas`).

**Never** log or echo a token, a digest or the ``authorization`` metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
import grpc.aio

from lethedb_contract import is_loopback_address
from lethedb_server.api import status
from lethedb_server.api.limits import ConnectionStreams
from lethedb_server.api.tokens import LADDER, Identity, Role, TokenStore
from lethedb_server.errors import PermissionDenied, TooManySubscribers, ValidationError

log = logging.getLogger(__name__)

_RANK: Final[dict[str, int]] = {role: rank for rank, role in enumerate(LADDER)}

#: The least role each method needs. Every method of ADMIN_SERVICE needs admin.
METHOD_ROLES: Final[dict[str, Role]] = {
    "/lethedb.v1.EventStore/ReadStream": "reader",
    "/lethedb.v1.EventStore/ReadAll": "reader",
    "/lethedb.v1.EventStore/Subscribe": "reader",
    "/lethedb.v1.EventStore/GetSubject": "reader",
    "/lethedb.v1.EventStore/CommitCheckpoint": "consumer",
    "/lethedb.v1.EventStore/GetCheckpoint": "reader",
    "/lethedb.v1.EventStore/Append": "writer",
    "/lethedb.v1.EventStore/AppendStream": "writer",
    "/lethedb.v1.EventStore/AppendBatch": "writer",
    "/lethedb.v1.EventStore/Commit": "writer",
    "/lethedb.v1.EventStore/ForgetSubject": "admin",
    "/lethedb.v1.EventStore/ExportSubject": "admin",
    "/lethedb.v1.Replication/Follow": "replica",
    "/lethedb.v1.Replication/ForwardCheckpoint": "replica",
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
    """Whether *role* may do what *needed* may: up the ladder, or exactly ``replica``."""
    if needed not in _RANK:
        return role == needed
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


def caller_may(role: Role) -> bool:
    """Whether the current call's token has *role* (always, when authentication is off)."""
    return role_allows(_CALLER.get().role, role)


def require_role(needed: Role, what: str) -> None:
    """Refuse a request whose content needs more than its method's role.

    Raises :class:`PermissionDenied`. For a streaming call the higher role is
    also remembered, so that the call ends if its token is later downgraded
    below it (a consumer-group subscription of a token that became a reader).
    """
    identity = _CALLER.get()
    if not role_allows(identity.role, needed):
        raise PermissionDenied(
            f"{what} needs the {needed} role; token {identity.name!r} has the {identity.role} role"
        )
    call = _LIVE_CALL.get()
    if call is not None and _RANK[needed] > _RANK.get(call.needed, -1):
        call.needed, call.needed_for = needed, what


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


class _LiveCall:
    """A streaming call in progress under a token, re-checked when the tokens change.

    ``inside`` is true while the call's task runs (or waits in) the handler,
    false while it waits for the transport to take a message. In the first
    case the task is cancelled: the handler's ``finally`` blocks release what
    it holds, and the interceptor ends the call with the refusal's status. In
    the second a cancellation would land in gRPC's own send, which then drops
    the call without any status (the client would wait for ever), so the
    status is sent from another task instead: it follows the message in
    flight, and the handler stops at the check after that message.
    """

    __slots__ = (
        "aborting",
        "context",
        "identity",
        "inside",
        "method",
        "needed",
        "needed_for",
        "peer",
        "refusal",
        "task",
    )

    def __init__(
        self,
        method: str,
        identity: Identity,
        context: grpc.aio.ServicerContext[Any, Any],
        task: asyncio.Task[Any],
    ) -> None:
        self.method = method
        self.identity = identity
        self.context = context
        self.peer = context.peer()
        self.task = task
        self.aborting: asyncio.Task[None] | None = None
        self.needed: Role = required_role(method) or "admin"
        self.needed_for = method
        self.inside = True
        self.refusal: Refusal | None = None

    def recheck(self, current: Identity | None) -> Refusal | None:
        """Why this call may not go on under the current tokens, or None."""
        name = self.identity.name
        if current is None:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "revoked_token",
                f"the bearer token {name!r} was revoked; this call has ended",
                name,
            )
        if not role_allows(current.role, self.needed):
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "downgraded_token",
                f"{self.needed_for} needs the {self.needed} role; token {name!r} now has the "
                f"{current.role} role, so this call has ended",
                name,
            )
        return None

    def end(self, refusal: Refusal) -> None:
        """End the call with *refusal* as soon as its task can be reached."""
        if self.refusal is not None or self.task.done():
            return
        self.refusal = refusal
        if self.inside:
            self.task.cancel()
        else:
            self.aborting = asyncio.get_running_loop().create_task(self._abort(refusal))

    async def _abort(self, refusal: Refusal) -> None:
        # abort() raises once the status is sent (or was already set): that
        # is its way to stop a handler, and this task is none.
        with contextlib.suppress(Exception):
            await self.context.abort(refusal.code, refusal.message)

    async def end_in_handler(self) -> None:
        """In the call's own task: end it with its refusal unless already sent from outside."""
        if self.refusal is not None and self.aborting is None:
            await self.context.abort(self.refusal.code, self.refusal.message)


_LIVE_CALL: contextvars.ContextVar[_LiveCall | None] = contextvars.ContextVar(
    "lethedb_live_call", default=None
)


async def _guarded(requests: AsyncIterator[Any], call: _LiveCall) -> AsyncIterator[Any]:
    """A request stream that stops handing on requests once its call is refused."""
    async for request in requests:
        if call.refusal is not None:
            return
        yield request


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


class _RateLimitedLog:
    """Log refusals, at most ``burst`` lines per ``window_s``, and summarise the rest.

    A client hammering the server with a bad token must not flood the log,
    but the attack must stay visible: at the end of a window in which lines
    were left out, one line per peer host and reason says how many (the
    biggest first, at most ``max_summaries`` lines; the rest as one total).
    The summary is written by a timer on the event loop, so it appears even
    if the refusals stop; outside a loop it waits for the next refusal.
    """

    def __init__(
        self,
        burst: int = 20,
        window_s: float = 10.0,
        *,
        max_summaries: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self.max_summaries = max_summaries
        self._clock = clock
        self._window_start = -window_s
        self._logged = 0
        self._suppressed: dict[tuple[str, str], int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, method: str, peer: str, refusal: Refusal) -> None:
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged >= self.burst:
            self._suppress(peer_host(peer), refusal.reason, now)
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

    def _suppress(self, host: str, reason: str, now: float) -> None:
        key = (host, reason)
        # Bounded memory under an attack from many addresses: at most this many
        # keys per window; the others are counted under one.
        if key not in self._suppressed and len(self._suppressed) >= 10 * self.max_summaries:
            key = ("other peers", reason)
        self._suppressed[key] = self._suppressed.get(key, 0) + 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            delay = max(0.0, self._window_start + self.window_s - now)
            self._timer = loop.call_later(delay, self._end_window)

    def _end_window(self) -> None:
        self._timer = None
        self.flush()
        self._window_start, self._logged = self._clock(), 0

    def flush(self) -> None:
        """Write the summary of the refusals left out so far, and forget them."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        suppressed, self._suppressed = self._suppressed, {}
        ranked = sorted(suppressed.items(), key=lambda item: item[1], reverse=True)
        for (host, reason), count in ranked[: self.max_summaries]:
            log.warning(
                "refused calls not logged in the last %.0fs: %d from %s (%s)",
                self.window_s,
                count,
                host,
                reason,
                extra={"peer": host, "reason": reason, "suppressed": count},
            )
        rest = sum(count for _, count in ranked[self.max_summaries :])
        if rest:
            log.warning(
                "refused calls not logged in the last %.0fs: %d more from other peers or reasons",
                self.window_s,
                rest,
                extra={"suppressed": rest},
            )


SUBSCRIBE_METHOD: Final = "/lethedb.v1.EventStore/Subscribe"


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:10.0.0.5:51234`` -> ``ipv4:10.0.0.5``)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class ClientQuotas:
    """Streaming calls and subscriptions in progress per client.

    A client is a token (by name) when authentication is on, else a peer
    host. Per-connection limits alone let one client open connection after
    connection until it holds every subscription slot of the server
    (``max_subscribers``) and any number of streams; these quotas bound what
    one client holds, whatever the number of its connections. Used from the
    event loop only, so it needs no lock; a limit of 0 means no limit.
    """

    def __init__(self, max_streams: int = 0, max_subscriptions: int = 0) -> None:
        self.max_streams = max_streams
        self.max_subscriptions = max_subscriptions
        self._streams: dict[str, int] = {}
        self._subscriptions: dict[str, int] = {}

    def acquire(self, client: str, subscription: bool) -> Callable[[], None] | str:
        """Count one more call of *client*: its release, or the option whose limit is reached."""
        if not _take(self._streams, client, self.max_streams):
            return "max_streams_per_client"
        if subscription and not _take(self._subscriptions, client, self.max_subscriptions):
            _give(self._streams, client)
            return "max_subscriptions_per_client"
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                _give(self._streams, client)
                if subscription:
                    _give(self._subscriptions, client)

        return release

    def open_calls(self, client: str) -> tuple[int, int]:
        """(streaming calls, subscriptions) *client* has in progress."""
        return self._streams.get(client, 0), self._subscriptions.get(client, 0)


def _take(counts: dict[str, int], key: str, limit: int) -> bool:
    count = counts.get(key, 0)
    if limit and count >= limit:
        return False
    counts[key] = count + 1
    return True


def _give(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def _client_of(identity: Identity, peer: str) -> tuple[str, str]:
    """The quota key of a caller and how a message names it."""
    if identity.digest:
        return "token:" + identity.name, f"token {identity.name!r}"
    host = peer_host(peer)
    return "peer:" + host, f"client {host}"


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authentication, authorisation, revocation and stream limits for every call."""

    def __init__(
        self,
        tokens: TokenStore | None,
        *,
        max_streams_per_connection: int = 0,
        quotas: ClientQuotas | None = None,
        observer: AccessObserver | None = None,
    ) -> None:
        self.tokens = tokens
        self.streams = ConnectionStreams(max_streams_per_connection)
        self.quotas = quotas or ClientQuotas()
        self.observer = observer
        self._log_refusal = _RateLimitedLog()
        #: Streaming calls in progress by token digest (authentication on only).
        self._live: dict[bytes, set[_LiveCall]] = {}
        if tokens is not None:
            tokens.add_listener(self.recheck_live_calls)

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

    def live_calls(self) -> int:
        """Streaming calls in progress under a token."""
        return sum(len(calls) for calls in self._live.values())

    def recheck_live_calls(self) -> None:
        """After a reload of the tokens: end every streaming call its token no longer allows."""
        assert self.tokens is not None
        for token_digest, calls in list(self._live.items()):
            current = self.tokens.identity(token_digest)
            for call in list(calls):
                refusal = call.recheck(current)
                if refusal is not None:
                    self._end(call, refusal)

    def _end(self, call: _LiveCall, refusal: Refusal) -> None:
        if call.refusal is not None:
            return
        self._log_refusal(call.method, call.peer, refusal)
        if self.observer is not None:
            self.observer.call_refused(refusal.reason)
        call.end(refusal)

    def _register(
        self, method: str, identity: Identity, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _LiveCall:
        task = asyncio.current_task()
        assert task is not None, "a gRPC handler always runs in a task"
        call = _LiveCall(method, identity, context, task)
        self._live.setdefault(identity.digest, set()).add(call)
        _LIVE_CALL.set(call)
        # The tokens may have changed since the call was authenticated.
        assert self.tokens is not None
        refusal = call.recheck(self.tokens.identity(identity.digest))
        if refusal is not None:
            self._end(call, refusal)
        return call

    def _unregister(self, call: _LiveCall) -> None:
        calls = self._live.get(call.identity.digest)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._live[call.identity.digest]

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
        return self._wrap(handler, method, identity, streaming)

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

    async def _admit(
        self,
        method: str,
        identity: Identity,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Callable[[], None]:
        """Count a streaming call against its connection's limit and its client's quotas."""
        peer = context.peer()
        release_connection = self.streams.acquire(peer)
        if release_connection is None:
            self._refused("streams_per_connection")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.streams.refusal(peer))
            raise AssertionError("unreachable: abort raises")
        client, described = _client_of(identity, peer)
        subscription = method == SUBSCRIBE_METHOD
        release_client = self.quotas.acquire(client, subscription)
        if isinstance(release_client, str):
            release_connection()
            self._refused(release_client.removeprefix("max_"))
            if release_client == "max_subscriptions_per_client":
                limit = self.quotas.max_subscriptions
                error = TooManySubscribers(limit, release_client, described)
                await status.abort(context, error)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{described} already has {self.quotas.max_streams} streaming calls in "
                f"progress, its limit (max_streams_per_client): finish or cancel one, or ask "
                "the operator to raise the limit",
            )
            raise AssertionError("unreachable: abort raises")

        def release() -> None:
            release_client()
            release_connection()

        return release

    def _refused(self, reason: str) -> None:
        if self.observer is not None:
            self.observer.call_refused(reason)

    def _wrap(
        self,
        handler: grpc.RpcMethodHandler,  # type: ignore[type-arg]
        method: str,
        identity: Identity,
        streaming: bool,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        behavior = _behavior(handler)
        request_streaming = bool(handler.request_streaming)
        revocable = streaming and bool(identity.digest)

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Callable[[], None]:
            _CALLER.set(identity)
            if not streaming:
                return _nothing
            return await self._admit(method, identity, context)

        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                release = await admit(context)
                call = self._register(method, identity, context) if revocable else None
                try:
                    if call is not None and request_streaming:
                        request = _guarded(request, call)
                    try:
                        async with contextlib.aclosing(behavior(request, context)) as responses:
                            async for response in responses:
                                if call is None:
                                    yield response
                                    continue
                                call.inside = False
                                yield response
                                call.inside = True
                                if call.refusal is not None:
                                    break
                    except asyncio.CancelledError:
                        if call is None or call.refusal is None:
                            raise
                        _uncancel()  # cancelled by revocation: end with its status instead
                    if call is not None:
                        await call.end_in_handler()
                finally:
                    release()
                    if call is not None:
                        self._unregister(call)

            wrapped = wrapped_stream
        else:

            async def wrapped_call(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                release = await admit(context)
                call = self._register(method, identity, context) if revocable else None
                try:
                    if call is not None and request_streaming:
                        request = _guarded(request, call)
                    try:
                        result = await behavior(request, context)
                    except asyncio.CancelledError:
                        if call is None or call.refusal is None:
                            raise
                        _uncancel()
                    if call is not None:
                        await call.end_in_handler()
                    return result
                finally:
                    release()
                    if call is not None:
                        self._unregister(call)

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
