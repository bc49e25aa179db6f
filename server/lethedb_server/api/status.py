"""The one place where domain errors become gRPC status codes.

Besides the code and message, every error carries trailing metadata the SDK
reads back into the same exception type (the keys and the names are the
wire contract, :mod:`lethedb_contract`):

* ``lethedb-error``: the domain exception's class name;
* ``lethedb-actual-version``: for WrongExpectedVersion, the stream's last
  version, or ``-1`` when the stream does not exist;
* ``lethedb-leader``: for NotLeader, the leader's address (may be empty).
"""

from __future__ import annotations

from typing import Final

import grpc

from lethedb_contract import ACTUAL_VERSION_KEY, ERROR_KEY, LEADER_KEY
from lethedb_server import errors

_CODES: Final[dict[type[errors.LetheError], grpc.StatusCode]] = {
    errors.ValidationError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.WrongExpectedVersion: grpc.StatusCode.ABORTED,
    errors.StreamNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SubjectForgotten: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LegalHoldActive: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.DataDirLocked: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DataDirDamaged: grpc.StatusCode.DATA_LOSS,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManySubscribers: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManyGroups: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.PositionBeyondHead: grpc.StatusCode.OUT_OF_RANGE,
    errors.NotGroupMember: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SubscriptionReplaced: grpc.StatusCode.ABORTED,
    errors.NotLeader: grpc.StatusCode.UNAVAILABLE,
    errors.NotEnoughReplicas: grpc.StatusCode.UNAVAILABLE,
    errors.CatchingUp: grpc.StatusCode.UNAVAILABLE,
    errors.ReplicationRefused: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code(error: errors.LetheError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def trailing_metadata(error: errors.LetheError) -> tuple[tuple[str, str], ...]:
    items: list[tuple[str, str]] = [(ERROR_KEY, type(error).__name__)]
    if isinstance(error, errors.WrongExpectedVersion):
        actual = -1 if error.actual_version is None else error.actual_version
        items.append((ACTUAL_VERSION_KEY, str(actual)))
    elif isinstance(error, errors.NotLeader):
        items.append((LEADER_KEY, error.leader))
    return tuple(items)


def append_error_fields(error: errors.LetheError) -> tuple[int, str, int, str]:
    """(numeric code, message, actual version or -1, error name) for an AppendError."""
    actual = -1
    if isinstance(error, errors.WrongExpectedVersion) and error.actual_version is not None:
        actual = error.actual_version
    return status_code(error).value[0], str(error), actual, type(error).__name__


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: errors.LetheError
) -> None:
    """End the call with the error's status; raises, as grpc.aio's abort does."""
    await context.abort(status_code(error), str(error), trailing_metadata(error))
