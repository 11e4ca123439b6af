"""A small transfer progress display for uploads and downloads (no dependency).

:class:`ProgressBar` is the ``progress`` callback the SDK's transfer methods take
(``progress(done_bytes, total_bytes)``). On a terminal it redraws one line,
at most ten times a second::

    data  [#########...........]  45%  45.0 MiB / 100.0 MiB  12.3 MiB/s  ETA 4s

Elsewhere (a log, a pipe) it stays silent until :meth:`ProgressBar.close`, which
prints one line: ``data: 100.0 MiB in 8.1 s (12.3 MiB/s)``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressBar", "format_bytes"]

_WIDTH = 20


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``45.0 MiB``, ``10.0 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class ProgressBar:
    """Draws transfer progress on ``stream`` (default stderr); call :meth:`close` at the end.

    ``skipped`` is what the final line says when nothing had to be transferred
    (the first report was already complete, e.g. the broker had the archive).
    """

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        skipped: str = "nothing to transfer",
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 0.1,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.skipped = skipped
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.min_interval_s = min_interval_s
        self.done = 0
        self.total = 0
        self._start: float | None = None
        self._start_done = 0
        self._drawn_at = float("-inf")
        self._drawn = False
        self._closed = False

    def __call__(self, done: int, total: int) -> None:
        """Record ``done`` of ``total`` bytes; redraw on a terminal when due."""
        now = self.clock()
        if self._start is None:
            self._start, self._start_done = now, done
        self.done, self.total = done, total
        if self.tty and (now - self._drawn_at >= self.min_interval_s or done >= total):
            self._drawn_at = now
            self._drawn = True
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def _rate(self, now: float) -> float:
        elapsed = now - (self._start if self._start is not None else now)
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        """The bar as it would be drawn now."""
        total = max(self.total, 1)
        filled = min(_WIDTH, _WIDTH * self.done // total)
        rate = self._rate(now)
        parts = [
            f"{self.label}  [{'#' * filled}{'.' * (_WIDTH - filled)}]",
            f"{100 * self.done // total:3d}%",
            f"{format_bytes(self.done)} / {format_bytes(self.total)}",
        ]
        if rate > 0:
            parts.append(f"{format_bytes(rate)}/s")
            if self.done < self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def summary(self, now: float) -> str:
        """The final line."""
        sent = self.done - self._start_done
        if self._start is None or (sent == 0 and self.done >= self.total):
            return f"{self.label}: {self.skipped} ({format_bytes(self.total)})"
        elapsed = now - self._start
        text = f"{self.label}: {format_bytes(sent)} in {elapsed:.1f} s"
        if elapsed > 0:
            text += f" ({format_bytes(sent / elapsed)}/s)"
        if self._start_done:
            text += f", resumed at {format_bytes(self._start_done)}"
        return text

    def close(self) -> None:
        """End the display with the summary line; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        prefix = "\r" if self._drawn else ""
        self.stream.write(
            prefix + self.summary(self.clock()) + ("\x1b[K\n" if self._drawn else "\n")
        )
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._drawn and not self._closed:  # failed: end the bar's line, claim nothing
            self._closed = True
            self.stream.write("\n")
            self.stream.flush()
