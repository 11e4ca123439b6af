"""The live view of ``job watch`` and the demo: lines above a status on a terminal."""

from __future__ import annotations

import io
import re

from client.live import LiveView


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_elsewhere_only_the_lines() -> None:
    out = io.StringIO()
    with LiveView(out) as view:
        view.status("waiting …")
        view.line("2025-01-31 12:00:00 UTC jobs/a PENDING attempt=0 [x]")
        view.status("still waiting …")
    assert out.getvalue() == "2025-01-31 12:00:00 UTC jobs/a PENDING attempt=0 [x]\n"


def test_on_a_terminal_the_status_is_drawn_and_cleared() -> None:
    out = _Terminal()
    with LiveView(out) as view:
        view.status("waiting for jobs/a")
        view.line("jobs/a RUNNING [x]")
    text = out.getvalue()
    assert "waiting for jobs/a" in text  # the live status was drawn
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "jobs/a RUNNING [x]\n" in plain  # the line stays, "[x]" not read as markup
    assert text.endswith("\x1b[1A\x1b[2K")  # transient: the status line erased at the end
