"""Argument checks shared by every request builder: one wording for every field."""

from __future__ import annotations

from typing import Final

from lethedb._exceptions import ValidationError

UINT64_LIMIT: Final = 2**64


def check_name(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValidationError(f"{field} is {type_name(value)}; expected a non-empty str")
    if not value:
        raise ValidationError(f"{field} is empty")


def check_position(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field} is {type_name(value)}; expected an int >= 0")
    if not 0 <= value < UINT64_LIMIT:
        raise ValidationError(f"{field} is {value}; it must be >= 0 and < 2**64")
    return value


def check_max_count(value: object) -> int:
    """0 means "no limit" on the wire, so an explicit 0 is refused rather than inverted."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"max_count is {type_name(value)}; expected an int >= 1 or None")
    if not 1 <= value < UINT64_LIMIT:
        raise ValidationError(f"max_count is {value}; it must be >= 1, or None for no limit")
    return value


def check_positive(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValidationError(f"{field} is {value!r}; it must be a number > 0")


def type_name(value: object) -> str:
    if value is None:
        return "None"
    name = type(value).__name__
    return f"an {name}" if name[0].lower() in "aeiou" else f"a {name}"
