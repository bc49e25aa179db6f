"""A progress line for long operator commands: ``verify`` now, projection rebuilds later.

It is fed counts (``update(done, total)``) and draws them on a text stream,
stderr by default, so that stdout keeps only the command's result. On a
terminal it is one line rewritten in place, a few times a second; anywhere
else (a file, a CI log, a pipe) it prints a whole line every couple of
seconds, so logs stay readable and small. It shows how far the work is, the
rate and the time left.

It knows nothing of gRPC, storage or what is being counted, and it never
raises because its stream went away: a progress line must not break the work
it reports on. Work cut short (Ctrl-C, or any exception leaving the ``with``
block) still ends the line, marked ``(interrupted)``, so that what follows
(the shell prompt, an error message) starts on a line of its own and the last
figures read as where the work stopped, not as a result.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self, TextIO

TTY_INTERVAL_S: Final = 0.1
LOG_INTERVAL_S: Final = 2.0
BAR_WIDTH: Final = 24


class ProgressBar:
    """Draws ``label [###---] done / total pct rate unit/s ETA``; use as a context manager."""

    def __init__(
        self,
        label: str,
        *,
        unit: str = "events",
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float | None = None,
        initial: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start timing now; ``initial`` is work done before (a resumed rebuild's checkpoint)."""
        self.label = label
        self.unit = unit
        self._stream = stream if stream is not None else sys.stderr
        self._tty = _isatty(self._stream) if tty is None else tty
        self._interval = (
            interval if interval is not None else (TTY_INTERVAL_S if self._tty else LOG_INTERVAL_S)
        )
        self._clock = clock
        self._started = clock()
        self._initial = initial
        self._last_draw: float | None = None
        self._done = initial
        self._total = 0
        self._drawn: tuple[int, int] | None = None  # (done, total) last drawn
        self._drawn_width = 0
        self._updated = False
        self._closed = False

    def update(self, done: int, total: int) -> None:
        """Record progress; draw it if the last drawing is old enough."""
        now = self._clock()
        self._done, self._total, self._updated = done, total, True
        if self._last_draw is None or now - self._last_draw >= self._interval:
            self._draw(now)

    def close(self, *, interrupted: bool = False) -> None:
        """Draw the final state unless it is already shown, and end the line (idempotent).

        *interrupted*: the work stopped early; the state is drawn again, marked so.
        """
        if self._closed:
            return
        self._closed = True
        if not self._updated:
            return
        if interrupted or self._drawn != (self._done, self._total):
            self._draw(self._clock(), final=True, interrupted=interrupted)
        elif self._tty:
            self._write("\n")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(interrupted=exc_type is not None)

    def render(self, now: float) -> str:
        """The text of one progress line at time *now* (without line ending)."""
        done, total = self._done, self._total
        fraction = min(1.0, done / total) if total > 0 else 1.0
        parts = [self.label if not self._tty else f"{self.label}  {_bar(fraction)}"]
        parts.append(f"{done:,} / {total:,}  {fraction:4.0%}")
        rate = self.rate(now)
        if rate is not None:
            parts.append(f"{rate:,.0f} {self.unit}/s")
            if 0 < done < total and rate > 0:
                parts.append(f"ETA {_duration((total - done) / rate)}")
        return "  ".join(parts)

    def rate(self, now: float) -> float | None:
        """Units per second since the bar was made, or None before any time has passed."""
        if now <= self._started:
            return None
        return (self._done - self._initial) / (now - self._started)

    def _draw(self, now: float, *, final: bool = False, interrupted: bool = False) -> None:
        self._last_draw = now
        self._drawn = (self._done, self._total)
        line = self.render(now) + ("  (interrupted)" if interrupted else "")
        if self._tty:
            # Pad over the rest of a longer previous line; \r goes back to its start.
            padding = " " * max(0, self._drawn_width - len(line))
            self._drawn_width = len(line)
            self._write(f"\r{line}{padding}" + ("\n" if final else ""))
        else:
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: the work goes on without its progress line


def _bar(fraction: float) -> str:
    filled = int(fraction * BAR_WIDTH)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "<1s"
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
