"""Bookkeeping of pipelined appends (``append_many``) on one AppendStream call."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import grpc

from lethedb._checks import type_name
from lethedb._exceptions import LetheError, ServerError, ValidationError, error_from_rpc_error
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

    def acknowledge(self, response: pb.AppendResult) -> None:
        if not self._pending:
            raise ServerError("the server sent more append responses than there were requests")
        index, _ = self._pending.popleft()
        self._answered_since_attempt += 1
        if response.WhichOneof("result") == "ok":
            self._results[index] = to_append_result(response.ok)
        else:
            self._results[index] = error_from_append_error(response.error)

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
        if self._answered_since_attempt:
            retrying.reset()
        error = error_from_rpc_error(exc)
        delay = retrying.next_delay(error)
        if delay is not None:
            return delay
        notes = getattr(error, "__notes__", [])
        while self._pending:
            index, _ = self._pending.popleft()
            # One instance per slot: a caller may raise any of them, and a
            # shared instance would collect the tracebacks of all raises.
            slot_error = error_from_rpc_error(exc)
            slot_error.__cause__ = exc
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
