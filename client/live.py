"""A live view for commands that follow something: lines above a status line that updates.

``rigshift job watch`` and ``rigshift demo`` print one line per change. On a
terminal, :class:`LiveView` prints those lines above a ``rich`` spinner whose
text (:meth:`LiveView.status`) says what is being waited for; the spinner is
cleared at the end. Elsewhere (a pipe, a log) only the lines are printed,
exactly as :func:`click.echo` would, and :meth:`LiveView.status` does nothing.
"""

from __future__ import annotations

import sys
from typing import TextIO

import click
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from client.render import rich_console, stdout_style

__all__ = ["LiveView"]


class LiveView:
    """Lines and a live status on ``stream`` (default stdout); use as a context manager."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = stdout_style(self.stream) == "rich" if tty is None else tty
        self._spinner = Spinner("dots", text="")
        self._live: Live | None = None
        if self.tty:
            self._live = Live(
                self._spinner,
                console=rich_console(self.stream),
                transient=True,  # the status goes when the command ends
                refresh_per_second=8,
                redirect_stdout=False,
                redirect_stderr=False,
            )

    def line(self, text: str) -> None:
        """Print a line that stays (above the status on a terminal)."""
        if self._live is None:
            click.echo(text, file=self.stream)
            return
        # Text: a line's "[...]" is not markup; soft_wrap: the terminal wraps, not rich.
        self._live.console.print(Text(text), soft_wrap=True, highlight=False)

    def status(self, text: str) -> None:
        """Set the status line (a terminal only)."""
        if self._live is not None:
            self._spinner.update(text=Text(text, style="dim"))
            self._live.refresh()

    def __enter__(self) -> LiveView:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
