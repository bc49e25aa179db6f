"""The wire contract between the SDK (``lethedb``) and the server (``lethedb_server``).

What both sides must agree on beyond the messages in ``proto/``, written once
and imported by both: the trailing-metadata keys that carry a domain error
across a gRPC status, the error class names the server sends in them, the
limits the SDK must respect when it builds requests, the reserved names, and
which addresses count as local. tests/unit/client/test_wire_contract.py checks each
side against it (the server's error tree, the SDK's exception map).

A package of its own, importing only the standard library, so the server's
engine can use it without loading the SDK or grpc (importing anything under
``lethedb`` runs ``lethedb/__init__``, which imports grpc). Not part of the
SDK's public API: applications use the names ``lethedb`` re-exports.
"""

from __future__ import annotations

import ipaddress
from typing import Final

__all__ = [
    "ACTUAL_VERSION_KEY",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_REQUEST_EVENTS",
    "ERASURE_EVENT_TYPE",
    "ERASURE_STREAM",
    "ERROR_KEY",
    "ERROR_NAMES",
    "LEADER_KEY",
    "MAX_APPENDS_PER_BATCH",
    "RESERVED_PREFIX",
    "is_loopback_address",
]

# --- errors ---------------------------------------------------------------------------

#: Trailing metadata of a failed call: the server's exception class name ...
ERROR_KEY: Final = "lethedb-error"
#: ... and, for WrongExpectedVersion, the stream's last version (``-1``: the
#: stream does not exist). A pipelined append's AppendError carries the same
#: two values in its ``error`` and ``actual_version`` fields.
ACTUAL_VERSION_KEY: Final = "lethedb-actual-version"
#: ... and, for NotLeader (a write sent to a follower), the leader's client
#: address (host:port), empty when the follower does not know it. The SDK
#: retries the write there with the same idempotency key.
LEADER_KEY: Final = "lethedb-leader"

#: Every name the server may send under ERROR_KEY (or in AppendError.error):
#: the class name of each of its domain errors. The SDK maps every one to an
#: exception, of the same name where it has one; the rest are errors the
#: server mostly raises at start-up or in-process, which a client can only
#: handle like one of its own types. A name the SDK does not know (a newer
#: server) falls back to the status code.
ERROR_NAMES: Final = frozenset(
    {
        "ValidationError",
        "WrongExpectedVersion",
        "StreamNotFound",
        "SubjectForgotten",
        "IdempotencyConflict",
        "LegalHoldActive",
        "StorageFull",
        "Overloaded",
        "DataLoss",
        "DataDirDamaged",
        "DataDirLocked",
        "KeyringMismatch",
        "MasterKeyUnavailable",
        "RestoredLog",
        "ListenFailed",
        "ShuttingDown",
        "ForkedProcess",
        "TooManySubscribers",
        "TooManyGroups",
        "PermissionDenied",
        "PositionBeyondHead",
        "NotGroupMember",
        "SubscriptionReplaced",
        "NotLeader",
        "NotEnoughReplicas",
        "CatchingUp",
        "ReplicationRefused",
    }
)

# --- limits the SDK must know ---------------------------------------------------------

#: Most appends in one AppendBatch call. Each append is validated and answered
#: on its own, so the bound is on per-call work and response size, not on
#: data: the message-size limit bounds the bytes. The SDK never coalesces more.
MAX_APPENDS_PER_BATCH: Final = 1000
#: The server's default for ``max_request_events`` (events in one call); the
#: SDK coalesces no more events than this into one AppendBatch.
DEFAULT_MAX_REQUEST_EVENTS: Final = 10_000
#: The server's default for ``max_message_bytes`` (largest gRPC message).
DEFAULT_MAX_MESSAGE_BYTES: Final = 32 << 20

# --- reserved names -------------------------------------------------------------------

#: Stream ids, event types, subject ids and group names starting with this are
#: the server's own: a client's are refused.
RESERVED_PREFIX: Final = "$"
#: Where the server writes erasure events, and their type.
ERASURE_STREAM: Final = "$erasures"
ERASURE_EVENT_TYPE: Final = "$subject.forgotten"

# --- addresses ------------------------------------------------------------------------


def is_loopback_address(address: str) -> bool:
    """True when *address* (host:port, [v6]:port or unix:path) is reachable only locally.

    The server serves such an address without TLS and tokens; the SDK sends a
    bearer token to it without TLS. A host name other than ``localhost``, or
    an empty host (every interface), is assumed reachable from elsewhere.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
