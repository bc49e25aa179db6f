"""The SDK's exception hierarchy and the one place that builds it from a gRPC status.

Every failure the SDK reports is a :class:`LetheError`. The server sends a gRPC
status code plus trailing metadata naming its own exception class
(``lethedb-error``) and, for version conflicts, the stream's actual version
(``lethedb-actual-version``). :func:`error_from_status` turns those into the
exception below, preferring the server's class name and falling back to the
status code, so an error from a proxy or an older server still lands on a
sensible type. Nothing else in the SDK decides which exception a status becomes.

Errors that gRPC itself raises, before any LetheDB code runs, are rewritten
into one line that names the cause: no server at the address, a TLS or
plaintext mismatch, a certificate that does not verify, a message over a
size limit. The raw gRPC text stays in ``.details``.

    LetheError                   .code (grpc.StatusCode | None), .details (str)
    ├── ValidationError          the request is malformed; nothing was changed
    ├── WrongExpectedVersion     the stream was not in the expected state (.actual_version)
    ├── StreamNotFound           a read named a stream that does not exist
    ├── SubjectForgotten         the subject was erased; its id is never reused
    ├── IdempotencyConflict      an idempotency key was reused for a different request
    ├── LegalHoldActive          the subject is under legal hold and cannot be forgotten
    ├── StorageFull              the server is out of space or over a limit; nothing written
    ├── RequestTooLarge          a message over a gRPC size limit (.size, .limit); nothing written
    ├── Overloaded               too many appends in flight on the server; nothing written
    ├── DataLoss                 a stored record failed its integrity checks
    ├── Unavailable              the server could not be reached (after every retry)
    ├── DeadlineExceeded         the call's deadline passed (after every retry)
    ├── Unauthenticated          the call carried no valid credentials
    ├── PermissionDenied         the credentials lack the role the call needs
    ├── TooManySubscribers       the server serves its maximum of subscriptions
    ├── PositionBeyondHead       a subscription's start (or checkpoint) is beyond the log's head
    ├── NotGroupMember           a group checkpoint commit the group's membership does not allow
    ├── SubscriptionReplaced     another subscription took over this group member's id
    ├── NotLeader                a write reached a follower (.leader: the leader's address)
    └── ServerError              anything else the server reported

This module must not import the generated protobuf modules: it knows statuses,
not messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

import grpc

from lethedb_contract import ACTUAL_VERSION_KEY, ERROR_KEY, LEADER_KEY

__all__ = [
    "DataLoss",
    "DeadlineExceeded",
    "IdempotencyConflict",
    "LegalHoldActive",
    "LetheError",
    "NotGroupMember",
    "NotLeader",
    "Overloaded",
    "PermissionDenied",
    "PositionBeyondHead",
    "RequestTooLarge",
    "ServerError",
    "StorageFull",
    "StreamNotFound",
    "SubjectForgotten",
    "SubscriptionReplaced",
    "TooManySubscribers",
    "Unauthenticated",
    "Unavailable",
    "ValidationError",
    "WrongExpectedVersion",
    "error_from_rpc_error",
    "error_from_status",
]


class LetheError(Exception):
    """Base of every error the SDK raises or returns.

    ``code`` is the gRPC status the server answered with, or ``None`` when the
    SDK detected the problem itself before any I/O. ``details`` is the server's
    message (or the SDK's own), kept separately so that callers can log it
    without parsing ``str(error)``.
    """

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, details: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = message if details is None else details


class ValidationError(LetheError):
    """The request was malformed; the server (or the SDK, before sending) changed nothing."""


class WrongExpectedVersion(LetheError):
    """The stream's version did not match ``expected_version``; nothing was written.

    ``actual_version`` is the stream's last version, or ``None`` when the
    stream does not exist (or the server did not say).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: str | None = None,
        actual_version: int | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.actual_version = actual_version


class StreamNotFound(LetheError):
    """A read named a stream that holds no events."""


class SubjectForgotten(LetheError):
    """The data subject was erased: its id cannot be written to again and its data is gone."""


class IdempotencyConflict(LetheError):
    """An idempotency key was reused for a request with different content."""


class LegalHoldActive(LetheError):
    """The subject is under legal hold, so it cannot be forgotten until the hold is released."""


class StorageFull(LetheError):
    """The server ran out of space or hit a size limit; nothing was written."""


class RequestTooLarge(LetheError):
    """A message is larger than gRPC's limit on one side; nothing was written.

    ``size`` and ``limit`` are in bytes (``None`` when gRPC did not say).
    Usually the request exceeded the server's ``max_message_bytes``: send
    fewer or smaller events per call. Not retried: the same request would
    meet the same limit.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: str | None = None,
        size: int | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.size = size
        self.limit = limit


class Overloaded(LetheError):
    """The server already had its maximum of appends in flight; nothing was written.

    Transient by nature, so the SDK retries it with backoff like UNAVAILABLE
    (with the same idempotency key); it reaches the caller only when every
    retry met the same answer.
    """


class DataLoss(LetheError):
    """The server found a stored record (or its data directory) damaged."""


class Unavailable(LetheError):
    """The server could not be reached or is shutting down, and retrying did not help."""


class DeadlineExceeded(LetheError):
    """The call did not finish within its timeout, and retrying did not help.

    For an append this does not mean nothing was written: the write may have
    committed after the deadline. Retrying with the same idempotency key is safe.
    """


class Unauthenticated(LetheError):
    """The server requires credentials the call did not carry (or they were invalid)."""


class PermissionDenied(LetheError):
    """The call's credentials do not hold the role the operation needs."""


class TooManySubscribers(LetheError):
    """The server already serves its maximum of subscriptions (``max_subscribers``)."""


class PositionBeyondHead(LetheError):
    """A subscription would start beyond the head of the log.

    The position (a consumer's saved checkpoint, or a group's stored one)
    belongs to another store or to a newer copy of this one, for example a log
    restored from an older backup. Following it would silently skip events
    once the log reaches it, so the server refuses; rebuild the consumer.
    """


class NotGroupMember(LetheError):
    """A group checkpoint commit that the group's live membership does not allow.

    A member's commit after it left the group (its share has moved to the
    live members), or a commit without a member while the group has live members.
    """


class SubscriptionReplaced(LetheError):
    """A newer subscription with the same group and member id took over this one."""


class NotLeader(LetheError):
    """A write reached a follower; ``leader`` is the leader's address ("" if unknown).

    The SDK follows it itself (the same request, with the same idempotency
    key, sent to the leader); it reaches the caller only when no leader could
    be found within the call's deadline.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: str | None = None,
        leader: str = "",
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.leader = leader


class ServerError(LetheError):
    """The server reported an error the SDK has no more specific type for."""


# The server's class names (lethedb_contract.ERROR_NAMES), including
# server-only ones that a client can only handle like one of its own types (a
# damaged data directory is data loss to the reader; a draining server is
# simply unavailable; a start-up or in-process failure is just a server error).
_BY_NAME: Final[dict[str, type[LetheError]]] = {
    "ValidationError": ValidationError,
    "WrongExpectedVersion": WrongExpectedVersion,
    "StreamNotFound": StreamNotFound,
    "SubjectForgotten": SubjectForgotten,
    "IdempotencyConflict": IdempotencyConflict,
    "LegalHoldActive": LegalHoldActive,
    "StorageFull": StorageFull,
    "Overloaded": Overloaded,
    "DataLoss": DataLoss,
    "DataDirDamaged": DataLoss,
    "DataDirLocked": ServerError,
    "KeyringMismatch": DataLoss,  # a DataDirDamaged
    "MasterKeyUnavailable": ServerError,
    "RestoredLog": DataLoss,  # a DataDirDamaged
    "ListenFailed": ServerError,
    "ForkedProcess": ServerError,
    "ShuttingDown": Unavailable,
    "TooManySubscribers": TooManySubscribers,
    "TooManyGroups": StorageFull,  # over max_consumer_groups: nothing written
    "PermissionDenied": PermissionDenied,  # a request's content needs a higher role
    "PositionBeyondHead": PositionBeyondHead,
    "NotGroupMember": NotGroupMember,
    "SubscriptionReplaced": SubscriptionReplaced,
    "NotLeader": NotLeader,
    "NotEnoughReplicas": Unavailable,  # not acknowledged; retry with the same key
    "CatchingUp": Unavailable,  # a follower not caught up yet; retry or read elsewhere
    "ReplicationRefused": ServerError,
}

# FAILED_PRECONDITION is deliberately absent: it means several different
# things (forgotten subject, idempotency conflict, legal hold), so without the
# server's class name only ServerError is honest.
_BY_CODE: Final[dict[grpc.StatusCode, type[LetheError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ValidationError,
    grpc.StatusCode.ABORTED: WrongExpectedVersion,
    grpc.StatusCode.NOT_FOUND: StreamNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: StorageFull,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.OUT_OF_RANGE: PositionBeyondHead,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def error_from_status(
    code: grpc.StatusCode | None,
    details: str,
    *,
    error_name: str | None = None,
    actual_version: int | None = None,
    leader: str | None = None,
) -> LetheError:
    """Build the exception for one failed call or one failed pipelined append.

    ``actual_version`` follows the wire convention: ``-1`` (or ``None``) means
    the stream does not exist. ``leader`` is a NotLeader's ``lethedb-leader``
    trailer; without one (a pipelined append's error has no trailer) it is
    read from the server's message, which names the leader the same way.
    """
    if error_name is None and code is not None:
        rewritten = _from_grpc_core(code, details)
        if rewritten is not None:
            return rewritten
    cls = _BY_NAME.get(error_name or "") or _BY_CODE.get(code or grpc.StatusCode.UNKNOWN)
    if cls is None:
        cls = ServerError
    message = details or (code.name if code is not None else "unknown error")
    if cls is WrongExpectedVersion:
        actual = None if actual_version is None or actual_version < 0 else actual_version
        return WrongExpectedVersion(message, code=code, details=details, actual_version=actual)
    if cls is NotLeader:
        if leader is None:
            named = _LEADER_IN_MESSAGE.search(details)
            leader = named.group(1) if named else ""
        return NotLeader(message, code=code, details=details, leader=leader)
    return cls(message, code=code, details=details)


# How the server's NotLeader message names the leader (lethedb_server.errors.NotLeader).
_LEADER_IN_MESSAGE: Final = re.compile(r"the leader is (\S+)$")


# What gRPC's C core says, in the statuses it makes up itself (these carry no
# lethedb-error trailer). Matched loosely: the wording has changed between
# gRPC releases, and an unmatched text simply keeps gRPC's own message.
_TOO_LARGE: Final = re.compile(r"(Sent|Received) message larger than max \((\d+) vs\. (\d+)\)")
_PEER: Final = re.compile(r"(?:ipv4|ipv6|unix):(\S+?): ")
_REFUSED: Final = re.compile(r"Connection refused", re.IGNORECASE)
_VERIFY_FAILED: Final = re.compile(r"CERTIFICATE_VERIFY_FAILED(?::\s*([^:]+))?")
_NOT_TLS: Final = re.compile(r"WRONG_VERSION_NUMBER")
_CLOSED_IN_SETUP: Final = re.compile(r"failed to connect to all addresses.*Socket closed", re.S)


def _from_grpc_core(code: grpc.StatusCode, details: str) -> LetheError | None:
    """A clear error for a status gRPC made up itself, or None to map it as usual."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        match = _TOO_LARGE.search(details)
        if match is None:
            return None
        size, limit = int(match.group(2)), int(match.group(3))
        received_by_server = details.startswith("SERVER:") or match.group(1) == "Sent"
        if received_by_server and match.group(1) == "Received":
            message = (
                f"the request is {size} bytes; the server accepts messages of at most "
                f"{limit} bytes (its max_message_bytes): send fewer or smaller events per call"
            )
        elif match.group(1) == "Sent":
            message = (
                f"the request is {size} bytes; this client sends messages of at most {limit} "
                "bytes (channel option grpc.max_send_message_length)"
            )
        else:
            message = (
                f"a response is {size} bytes; this client accepts messages of at most {limit} "
                "bytes (channel option grpc.max_receive_message_length): ask for fewer "
                "events per call"
            )
        return RequestTooLarge(message, code=code, details=details, size=size, limit=limit)
    if code != grpc.StatusCode.UNAVAILABLE:
        return None
    peer = _PEER.search(details)
    where = f" at {_unquote_peer(peer.group(1))}" if peer else ""
    if _REFUSED.search(details):
        message = (
            f"no LetheDB server{where} (connection refused): start one "
            "(lethedb serve), or check the address and port"
        )
    elif (verify := _VERIFY_FAILED.search(details)) is not None:
        reason = f" ({verify.group(1).strip()})" if verify.group(1) else ""
        message = (
            f"TLS certificate verify failed for the server{where}{reason}: trust the CA that "
            "signed its certificate (ca=PATH, or ?ca=PATH in the connection string)"
        )
    elif _NOT_TLS.search(details):
        message = (
            f"the server{where} does not speak TLS (TLS handshake failed): connect "
            "without tls and ca, or configure TLS on the server"
        )
    elif _CLOSED_IN_SETUP.search(details):
        message = (
            f"the server{where} closed the connection during set-up: TLS expected "
            "(a plaintext client: connect with tls=true and ca=PATH), or, over TLS, a "
            "client certificate (mTLS: cert=PATH and key=PATH)"
        )
    else:
        return None
    return Unavailable(message, code=code, details=details)


def _unquote_peer(peer: str) -> str:
    """``%5B::1%5D:50051`` (gRPC's spelling of an IPv6 peer) as ``[::1]:50051``."""
    return peer.replace("%5B", "[").replace("%5D", "]")


def error_from_rpc_error(error: grpc.RpcError) -> LetheError:
    """Map a failed sync or asyncio call to its :class:`LetheError`.

    Both ``grpc.RpcError`` flavours expose ``code()``, ``details()`` and
    ``trailing_metadata()`` as plain methods; the base class declares none of
    them, so a bare ``RpcError`` (raised by some channel failures) becomes a
    ServerError rather than an AttributeError.
    """
    code = _call(error, "code")
    details = _call(error, "details")
    metadata = _call(error, "trailing_metadata")
    name = _metadata_value(metadata, ERROR_KEY)
    actual_text = _metadata_value(metadata, ACTUAL_VERSION_KEY)
    actual: int | None = None
    if actual_text is not None:
        try:
            actual = int(actual_text)
        except ValueError:
            actual = None
    return error_from_status(
        code if isinstance(code, grpc.StatusCode) else None,
        details if isinstance(details, str) else "",
        error_name=name,
        actual_version=actual,
        leader=_metadata_value(metadata, LEADER_KEY),
    )


def _call(error: grpc.RpcError, method: str) -> Any:
    function = getattr(error, method, None)
    return function() if callable(function) else None


def _metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    """Find one key in sync metadata (tuple of pairs) or aio ``Metadata`` (iterates pairs)."""
    if not metadata:
        return None
    for item in metadata:
        item_key, value = item
        if item_key == key:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None
