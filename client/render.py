"""The one table renderer of the CLI: plain kubectl-like columns, or a ``rich`` table.

Every listing goes through :func:`render_table`. ``style="plain"`` is the
contract scripts and ``grep`` rely on (left-aligned columns, two spaces apart,
no trailing whitespace, no escape codes) and is what a listing prints when
stdout is not a terminal; ``style="rich"`` draws the same headers and cells as
a ``rich`` table, for a terminal. :func:`stdout_style` picks between them.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import Literal, TextIO

from google.protobuf import timestamp_pb2
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Style", "format_time", "render_table", "rich_console", "stdout_style"]


def format_time(ts: timestamp_pb2.Timestamp) -> str:
    """``2025-01-31 12:00:00 UTC``, or ``-`` for an unset timestamp."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


#: ``plain``: the scriptable columns; ``rich``: a table for a terminal.
Style = Literal["plain", "rich"]


def stdout_style(stream: TextIO | None = None) -> Style:
    """``rich`` when ``stream`` (default stdout) is a terminal, else ``plain``."""
    stream = stream if stream is not None else sys.stdout
    try:
        return "rich" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or odd stream: be scriptable
        return "plain"


def rich_console(file: TextIO, *, width: int | None = None) -> Console:
    """A console that draws for a terminal on ``file`` (colour as the terminal allows;
    rich honours ``NO_COLOR``)."""
    return Console(
        file=file,
        force_terminal=True,
        width=width or shutil.get_terminal_size().columns,
        highlight=False,
        soft_wrap=False,
    )


def render_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    style: Style = "plain",
    *,
    width: int | None = None,
) -> str:
    """The table as text: left-aligned columns separated by two spaces with no trailing
    whitespace (``plain``), or a ``rich`` table ``width`` columns wide (default: the
    terminal's) without a final newline (``rich``)."""
    if style == "rich":
        return _rich_table(headers, rows, width)
    all_rows = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in all_rows]
    return "\n".join(line.rstrip() for line in lines)


def _rich_table(headers: Sequence[str], rows: Iterable[Sequence[str]], width: int | None) -> str:
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
    for h in headers:
        table.add_column(Text(h), overflow="fold")
    for r in rows:
        table.add_row(*(Text(c) for c in r))  # Text: a cell's "[...]" is not markup
    buf = io.StringIO()
    rich_console(buf, width=width).print(table)
    return buf.getvalue().rstrip("\n")
