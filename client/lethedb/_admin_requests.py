"""Admin requests and results: legal holds, backups, shreds, stats, verify, key rotation."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import msgspec

from lethedb._checks import UINT64_LIMIT, check_name, type_name
from lethedb._exceptions import ValidationError
from lethedb._models import (
    BackupResult,
    ClusterStatus,
    FollowerStatus,
    RotateResult,
    ShredResult,
    StoreStats,
    VerifyProgress,
)
from lethedb.v1 import admin_pb2 as apb

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

BACKUP_NOT_RETRIED: Final = (
    "a repeated backup could meet the partly written destination of the first attempt; "
    "check the destination on the server (it must be missing or empty) before calling again"
)


def build_set_legal_hold_request(
    subject_id: str, reason: str, until: datetime | int | None
) -> apb.SetLegalHoldRequest:
    check_name("subject_id", subject_id)
    check_name("reason", reason)
    return apb.SetLegalHoldRequest(
        subject_id=subject_id, reason=reason, until=legal_hold_until(until)
    )


def build_release_legal_hold_request(subject_id: str) -> apb.ReleaseLegalHoldRequest:
    check_name("subject_id", subject_id)
    return apb.ReleaseLegalHoldRequest(subject_id=subject_id)


def build_backup_request(destination: str, include_keys: bool) -> apb.BackupRequest:
    check_name("destination", destination)
    if not isinstance(include_keys, bool):
        raise ValidationError(f"include_keys is {type_name(include_keys)}; expected a bool")
    return apb.BackupRequest(destination=destination, include_keys=include_keys)


def legal_hold_until(until: datetime | int | None) -> int:
    """A hold's end as the wire has it: nanoseconds since the Unix epoch, 0 for "until released".

    An int is taken as nanoseconds already. An explicit 0 is refused: as a
    time it would be 1970, a hold long over, yet the wire reads it as a hold
    without end; ``None`` says that unambiguously. A naive datetime is refused
    too, as its time zone would be a guess. Whether the time is still ahead
    is the server's call, by its clock.
    """
    if until is None:
        return 0
    if isinstance(until, datetime):
        if until.utcoffset() is None:
            raise ValidationError(
                f"until is the naive datetime {until.isoformat()}; give a timezone-aware "
                "datetime (for example with tzinfo=datetime.UTC)"
            )
        delta = until - _EPOCH
        nanos = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
        shown = until.isoformat()
    elif isinstance(until, bool) or not isinstance(until, int):
        raise ValidationError(
            f"until is {type_name(until)}; expected an aware datetime, "
            "an int (nanoseconds since the Unix epoch) or None"
        )
    elif until == 0:
        raise ValidationError("until is 0; pass None for a hold that lasts until it is released")
    else:
        nanos = until
        shown = str(until)
    if not 0 < nanos < UINT64_LIMIT:
        raise ValidationError(
            f"until is {shown}; it must be after the Unix epoch and less than "
            "2**64 nanoseconds after it (before 2554)"
        )
    return nanos


_S = TypeVar("_S", bound=msgspec.Struct)


def _struct_from(cls: type[_S], message: Any) -> _S:
    """A result struct from a response message whose fields bear the same names."""
    return cls(**{name: getattr(message, name) for name in cls.__struct_fields__})


def to_shred_result(response: apb.ShredResponse) -> ShredResult:
    return _struct_from(ShredResult, response)


def to_backup_result(response: apb.BackupResponse) -> BackupResult:
    return _struct_from(BackupResult, response)


def to_store_stats(response: apb.StatsResponse) -> StoreStats:
    return _struct_from(StoreStats, response)


def to_cluster_status(response: apb.ClusterStatusResponse) -> ClusterStatus:
    fields = {name: getattr(response, name) for name in ClusterStatus.__struct_fields__}
    fields["followers"] = tuple(
        _struct_from(FollowerStatus, follower) for follower in response.followers
    )
    return ClusterStatus(**fields)


def to_verify_progress(message: apb.VerifyProgress) -> VerifyProgress:
    """Position 0 never holds a record, so on the wire it means "nothing bad found"."""
    return VerifyProgress(
        checked=message.checked,
        last_position=message.last_position,
        done=message.done,
        first_bad_position=message.first_bad_position or None,
        problem=message.problem,
        redacted=message.redacted,
    )


def to_rotate_result(response: apb.RotateMasterKeyResponse) -> RotateResult:
    return _struct_from(RotateResult, response)
