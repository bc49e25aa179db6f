"""LetheDB Python SDK: the whole public API, re-exported from private modules.

```python
from lethedb import NO_STREAM, Client, Event

with Client("localhost:50051") as db:
    placed = Event("OrderPlaced", {"total": 42}, subject_id=customer_id)
    db.append("order-1", placed, expected_version=NO_STREAM)
    for event in db.read_stream("order-1"):
        print(event.stream_version, event.json())
```
"""

from lethedb._async_client import AsyncClient
from lethedb._client import Client
from lethedb._exceptions import (
    DataLoss,
    DeadlineExceeded,
    IdempotencyConflict,
    LegalHoldActive,
    LetheError,
    NotGroupMember,
    NotLeader,
    Overloaded,
    PermissionDenied,
    PositionBeyondHead,
    RequestTooLarge,
    ServerError,
    StorageFull,
    StreamNotFound,
    SubjectForgotten,
    SubscriptionReplaced,
    TooManySubscribers,
    Unauthenticated,
    Unavailable,
    ValidationError,
    WrongExpectedVersion,
)
from lethedb._models import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    Append,
    AppendResult,
    BackupResult,
    CaughtUp,
    Checkpoint,
    ClusterStatus,
    CommitResult,
    Event,
    FollowerStatus,
    GroupAssignment,
    LegalHold,
    NodeErasure,
    RecordedEvent,
    RotateResult,
    ShredResult,
    StoreStats,
    StreamState,
    SubjectReceipt,
    SubjectState,
    SubscriptionFilter,
    VerifyProgress,
)
from lethedb._retry import RetryPolicy
from lethedb._subscriptions import AsyncSubscription, Subscription

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Append",
    "AppendResult",
    "AsyncClient",
    "AsyncSubscription",
    "BackupResult",
    "CaughtUp",
    "Checkpoint",
    "Client",
    "ClusterStatus",
    "CommitResult",
    "DataLoss",
    "DeadlineExceeded",
    "Event",
    "FollowerStatus",
    "GroupAssignment",
    "IdempotencyConflict",
    "LegalHold",
    "LegalHoldActive",
    "LetheError",
    "NodeErasure",
    "NotGroupMember",
    "NotLeader",
    "Overloaded",
    "PermissionDenied",
    "PositionBeyondHead",
    "RecordedEvent",
    "RequestTooLarge",
    "RetryPolicy",
    "RotateResult",
    "ServerError",
    "ShredResult",
    "StorageFull",
    "StoreStats",
    "StreamNotFound",
    "StreamState",
    "SubjectForgotten",
    "SubjectReceipt",
    "SubjectState",
    "Subscription",
    "SubscriptionFilter",
    "SubscriptionReplaced",
    "TooManySubscribers",
    "Unauthenticated",
    "Unavailable",
    "ValidationError",
    "VerifyProgress",
    "WrongExpectedVersion",
]
