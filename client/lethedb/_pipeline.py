"""Bookkeeping of pipelined appends (``append_many``) on one AppendStream call."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import grpc

from lethedb._checks import type_name
from lethedb._exceptions import (
    LetheError,
    NotLeader,
    ServerError,
    ValidationError,
    error_from_rpc_error,
)
from lethedb._models import Append, AppendResult
from lethedb._requests import build_append_request, error_from_append_error, to_append_result
from lethedb._retry import Retrying
from lethedb.v1 import eventstore_pb2 as pb


class AppendPipeline:
    """Bookkeeping for ``append_many``: which items are answered, what to resend.

    Relies on the AppendStream contract: exactly one response per request, in
    request order. So the k-th response of a call answers the k-th request
    still pending when the call started, and after a broken connection only
    the unanswered requests are resent, with the idempotency keys they had.
    Items that fail client-side checks take their slot as a ValidationError
    and are never sent, as the server would have refused them the same way.
    """

    def __init__(self, items: Iterable[Append]) -> None:
        self._results: list[AppendResult | LetheError | None] = []
        self._pending: deque[tuple[int, pb.AppendRequest]] = deque()
        self._answered_since_attempt = 0
        for index, item in enumerate(items):
            if not isinstance(item, Append):
                raise ValidationError(
                    f"items[{index}] is {type_name(item)}; expected lethedb.Append"
                )
            try:
                request = build_append_request(
                    item.stream_id,
                    item.events,
                    item.expected_version,
                    item.idempotency_key,
                    where=f"items[{index}].",
                )
            except ValidationError as error:
                self._results.append(error)
                continue
            self._results.append(None)
            self._pending.append((index, request))

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def requests(self) -> list[pb.AppendRequest]:
        """The requests to send on the next call: every unanswered one, in order."""
        self._answered_since_attempt = 0
        return [request for _, request in self._pending]

    def acknowledge(self, response: pb.AppendResult) -> NotLeader | None:
        """Take the answer of the oldest pending request.

        A NotLeader answer is not a result: the item stays pending, to be
        resent (with its key) to the leader; it is returned, and the caller
        ends this call, as the node will refuse every later item too.
        """
        if not self._pending:
            raise ServerError("the server sent more append responses than there were requests")
        if response.WhichOneof("result") != "ok":
            error = error_from_append_error(response.error)
            if isinstance(error, NotLeader):
                return error
        index, _ = self._pending.popleft()
        self._answered_since_attempt += 1
        if response.WhichOneof("result") == "ok":
            self._results[index] = to_append_result(response.ok)
        else:
            self._results[index] = error_from_append_error(response.error)
        return None

    def stream_ended(self) -> None:
        """The server closed the call cleanly; any request still unanswered broke the contract."""
        count = len(self._pending)
        while self._pending:
            index, _ = self._pending.popleft()
            self._results[index] = ServerError(
                f"the server ended the append stream with {count} request(s) unanswered; "
                "they may or may not have been written (retrying with the same "
                "idempotency key is safe)"
            )

    def retry_delay(self, exc: grpc.RpcError, retrying: Retrying) -> float | None:
        """Wait before resending, or None after giving every unanswered item the error."""
        return self._delay_or_settle(lambda: error_from_rpc_error(exc), exc, retrying)

    def redirect_delay(self, error: NotLeader, retrying: Retrying) -> float | None:
        """An item was answered NotLeader: wait before resending (to the leader), or give up."""

        def copy() -> LetheError:
            leader = error.leader
            return NotLeader(str(error), code=error.code, details=error.details, leader=leader)

        return self._delay_or_settle(copy, None, retrying)

    def _delay_or_settle(
        self, make_error: Callable[[], LetheError], cause: BaseException | None, retrying: Retrying
    ) -> float | None:
        if self._answered_since_attempt:
            retrying.reset()
        error = make_error()
        delay = retrying.next_delay(error)
        if delay is not None:
            return delay
        notes = getattr(error, "__notes__", [])
        while self._pending:
            index, _ = self._pending.popleft()
            # One instance per slot: a caller may raise any of them, and a
            # shared instance would collect the tracebacks of all raises.
            slot_error = make_error()
            slot_error.__cause__ = cause
            for note in notes:
                slot_error.add_note(note)
            self._results[index] = slot_error
        return None

    def results(self) -> list[AppendResult | LetheError]:
        results: list[AppendResult | LetheError] = []
        for result in self._results:
            assert result is not None, "append_many finished with an unanswered item"
            results.append(result)
        return results
