"""Stand-ins for grpc's call objects and errors, shared by the SDK's unit tests.

They replace the transport, never the code under test: the SDK's retry,
resume and error-mapping logic runs for real against scripted outcomes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc


class FakeRpcError(grpc.RpcError):
    """A failed call as grpc raises it: code, details, trailing metadata.

    ``name`` sets the server's ``lethedb-error`` trailer, as a LetheDB server would.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str = "",
        metadata: tuple[tuple[str, str | bytes], ...] = (),
        name: str | None = None,
    ) -> None:
        super().__init__()
        self._code, self._details = code, details
        self._metadata = (*metadata, ("lethedb-error", name)) if name else metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._metadata


def unavailable(details: str = "connection reset") -> FakeRpcError:
    return FakeRpcError(grpc.StatusCode.UNAVAILABLE, details)


class SyncCall:
    """A server-streaming or bidi call: yields messages, raises the scripted error."""

    def __init__(self, outcomes: Iterable[Any]) -> None:
        self._outcomes = outcomes
        self.cancelled = False

    def __iter__(self) -> Iterator[Any]:
        for outcome in self._outcomes:
            if isinstance(outcome, Exception):
                raise outcome
            yield outcome

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class AsyncCall(SyncCall):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        for outcome in self:
            await asyncio.sleep(0)
            yield outcome
