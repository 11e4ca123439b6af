"""The transfer progress display for uploads and downloads.

:class:`ProgressBar` is the ``progress`` callback the SDK's transfer methods take
(``progress(done_bytes, total_bytes)``). On a terminal it draws a ``rich``
progress bar, at most ten times a second, and clears it at the end::

    data ━━━━━━━━━╸━━━━━━━━━━  45% 45.0/100.0 MiB 12.3 MiB/s ETA 4s

Elsewhere (a log, a pipe) it stays silent until :meth:`ProgressBar.close`. On
both it ends with one line: ``data: 100.0 MiB in 8.1 s (12.3 MiB/s)``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
)
from rich.table import Column

__all__ = ["ProgressBar", "format_bytes"]

_WIDTH = 20
_LABEL = 32


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
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        """Record ``done`` of ``total`` bytes; redraw on a terminal when due."""
        now = self.clock()
        if self._start is None:
            self._start, self._start_done = now, done
        self.done, self.total = done, total
        if self.tty and (now - self._drawn_at >= self.min_interval_s or done >= total):
            self._drawn_at = now
            self._drawn = True
            self._draw(done, total)

    def _draw(self, done: int, total: int) -> None:
        if self._progress is None:
            from client.render import rich_console  # render imports this module

            self._progress = Progress(
                # The label gives way (…) before the numbers do on a narrow terminal.
                TextColumn(
                    "{task.description}",
                    table_column=Column(no_wrap=True, overflow="ellipsis", max_width=_LABEL),
                ),
                BarColumn(bar_width=_WIDTH),
                TaskProgressColumn(),
                DownloadColumn(binary_units=True, table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[rate]}", style="progress.data.speed"),
                TextColumn("{task.fields[eta]}", style="progress.remaining"),
                console=rich_console(self.stream),
                auto_refresh=False,  # drawn from __call__ only: no thread
                transient=True,  # the summary line replaces it
                get_time=self.clock,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._progress.start()
            # Start at ``done``: a resumed transfer's first jump is not counted as speed.
            self._task = self._progress.add_task(
                self.label, total=total, completed=done, rate="", eta=""
            )
        assert self._task is not None
        # The rate since the first report and the ETA from it: the summary's numbers.
        rate = self._rate(self.clock())
        speed = f"{format_bytes(rate)}/s" if rate > 0 else ""
        eta = f"ETA {_duration((total - done) / rate)}" if rate > 0 and done < total else ""
        self._progress.update(self._task, completed=done, total=total, rate=speed, eta=eta)
        self._progress.refresh()

    def _stop(self, *, keep: bool) -> None:
        if self._progress is not None:
            self._progress.live.transient = not keep
            self._progress.stop()
            self._progress = None

    def _rate(self, now: float) -> float:
        elapsed = now - (self._start if self._start is not None else now)
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

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
        self._stop(keep=False)
        self.stream.write(self.summary(self.clock()) + "\n")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._drawn and not self._closed:  # failed: leave the bar as it was, claim nothing
            self._closed = True
            self._stop(keep=True)
            self.stream.flush()
