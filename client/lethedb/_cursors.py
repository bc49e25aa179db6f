"""Where a streamed read stands, so that a retried call resumes without gap or duplicate.

Read cursors for ``read_stream``, ``read_all`` and ``export_subject``, and the
walk of ``admin.verify``: each says what to send next and whether a broken
call may be retried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

import grpc

from lethedb._admin_requests import to_verify_progress
from lethedb._checks import type_name
from lethedb._exceptions import ServerError, ValidationError, error_from_rpc_error
from lethedb._models import RecordedEvent, VerifyProgress
from lethedb._requests import to_recorded_event
from lethedb._retry import Retrying, RetryPolicy
from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import eventstore_pb2 as pb

ReadRequest: TypeAlias = pb.ReadStreamRequest | pb.ReadAllRequest | pb.ExportSubjectRequest
"""A request answered by a stream of :class:`pb.ReadResponse` batches."""


class ReadCursor:
    """Where a read stands, so that a retried call resumes after the last event delivered.

    The caller sees neither a gap nor a duplicate across reconnects: the first
    attempt sends the request as built, and each retry asks for what comes
    after the last event actually yielded, with ``max_count`` reduced by the
    events already yielded. Subclasses know how to say "after" for their request.
    A retry may reach another node of a cluster: it asks that node to hold
    at least the last position delivered (``min_position``) before it answers.
    """

    def __init__(self, request: ReadRequest, max_count: int = 0) -> None:
        self.request: ReadRequest | None = request
        self._max_count = max_count
        self._last: RecordedEvent | None = None
        self._yielded = 0
        self._yielded_since_attempt = 0

    def track(self, events: Iterable[pb.RecordedEvent]) -> Iterator[RecordedEvent]:
        """Convert a batch, noting each event as delivered just before it is handed out."""
        for message in events:
            event = to_recorded_event(message)
            self._last = event
            self._yielded += 1
            self._yielded_since_attempt += 1
            yield event

    def retry_delay(self, exc: grpc.RpcError, retrying: Retrying) -> float:
        """Wait before resuming; raises the mapped error when the read must give up."""
        if self._yielded_since_attempt:
            retrying.reset()
        delay = retrying.delay_or_raise(exc)
        self._yielded_since_attempt = 0
        self.request = self._resume_request()
        return delay

    def _resume_request(self) -> ReadRequest | None:
        assert self.request is not None
        if self._last is None:
            return self.request
        if self._max_count:
            remaining = self._max_count - self._yielded
            if remaining <= 0:
                return None
        else:
            remaining = 0
        return self._after(self._last, remaining)

    def _after(self, last: RecordedEvent, max_count: int) -> ReadRequest | None:
        raise NotImplementedError


class StreamReadCursor(ReadCursor):
    def __init__(self, request: pb.ReadStreamRequest) -> None:
        super().__init__(request, request.max_count)
        self._original = request

    def _after(self, last: RecordedEvent, max_count: int) -> pb.ReadStreamRequest | None:
        if self._original.backwards:
            if last.stream_version == 0:
                return None
            from_version = last.stream_version - 1
        else:
            from_version = last.stream_version + 1
        return pb.ReadStreamRequest(
            stream_id=self._original.stream_id,
            from_version=from_version,
            backwards=self._original.backwards,
            max_count=max_count,
            min_position=max(self._original.min_position, last.position),
        )


class AllReadCursor(ReadCursor):
    def __init__(self, request: pb.ReadAllRequest) -> None:
        super().__init__(request, request.max_count)
        self._original = request

    def _after(self, last: RecordedEvent, max_count: int) -> pb.ReadAllRequest | None:
        if self._original.backwards and last.position <= 1:
            return None
        return pb.ReadAllRequest(
            after_position=last.position,
            backwards=self._original.backwards,
            max_count=max_count,
            min_position=max(self._original.min_position, last.position),
        )


class ExportCursor(ReadCursor):
    """An export, retried only until its first event arrives.

    ``ExportSubjectRequest`` has no start position, so a call that broke after
    delivering events cannot ask for the rest: starting over would hand the
    caller every event again. Such a failure is raised, with a note saying so.
    """

    def __init__(self, request: pb.ExportSubjectRequest) -> None:
        super().__init__(request)
        self._subject_id = request.subject_id

    def retry_delay(self, exc: grpc.RpcError, retrying: Retrying) -> float:
        if not self._yielded:
            return super().retry_delay(exc, retrying)
        error = error_from_rpc_error(exc)
        if RetryPolicy.is_retryable(error):
            error.add_note(
                f"lethedb: not retried: the export of subject {self._subject_id!r} broke after "
                f"{self._yielded} event(s) and cannot resume where it stopped; "
                "call export_subject again to start over"
            )
        raise error from exc

    def _after(self, last: RecordedEvent, max_count: int) -> ReadRequest | None:
        raise AssertionError("an export that delivered events is never resumed")


class VerifyWalk:
    """Bookkeeping for ``verify``: report each message, keep the final one.

    ``VerifyRequest`` has no start position, so a walk that broke cannot go
    on where it stopped, and a new call would report progress from zero
    again. Like an export, it is therefore retried only until its first
    message arrives; a later failure is raised, with a note saying so.
    """

    def __init__(self, progress: Callable[[VerifyProgress], None] | None) -> None:
        if progress is not None and not callable(progress):
            raise ValidationError(f"progress is {type_name(progress)}; expected a callable or None")
        self._progress = progress
        self._received = 0
        self.result: VerifyProgress | None = None

    def track(self, message: apb.VerifyProgress) -> bool:
        """Report one message; return whether it was the final one."""
        update = to_verify_progress(message)
        self._received += 1
        if update.done:
            self.result = update
        if self._progress is not None:
            self._progress(update)
        return update.done

    def retry_delay(self, exc: grpc.RpcError, retrying: Retrying) -> float:
        """Wait before calling again; raises the mapped error once a message has arrived."""
        error = error_from_rpc_error(exc)
        if self._received:
            if RetryPolicy.is_retryable(error):
                error.add_note(
                    f"lethedb: not retried: the verification broke after {self._received} "
                    "progress message(s) and cannot resume where it stopped; "
                    "call verify again to start over"
                )
            raise error from exc
        delay = retrying.next_delay(error)
        if delay is None:
            raise error from exc
        return delay

    def finished(self) -> VerifyProgress:
        """The final message; the server closing the call without one broke the contract."""
        if self.result is None:
            raise ServerError(
                f"the server ended the verify stream after {self._received} progress "
                "message(s) without a final one"
            )
        return self.result
