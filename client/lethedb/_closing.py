"""``with`` and ``async with`` for the SDK's closeable objects: leaving the block closes them."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class ClosingContext:
    """A blocking object (a client, a subscription) that ``with`` closes."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosingContext:
    """An asyncio object (a client, a subscription) that ``async with`` closes."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
