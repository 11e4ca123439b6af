"""The transfer progress display: a rich bar on a terminal, one line elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from client.progress import ProgressBar, format_bytes

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (45 * MiB, "45.0 MiB"),
        (10 << 30, "10.0 GiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_terminal_bar_redraws_at_most_ten_times_a_second() -> None:
    out, clock = _Terminal(), Clock()
    bar = ProgressBar("data", out, tty=True, clock=clock)
    bar(0, 100 * MiB)
    clock.t = 0.05
    bar(MiB, 100 * MiB)  # too soon: not drawn
    clock.t = 2.5
    bar(25 * MiB, 100 * MiB)  # 25 MiB in 2.5 s: 10 MiB/s, 75 MiB left: 8 s
    drawn = _plain(out.getvalue())
    assert "1.0/100.0 MiB" not in drawn
    last = drawn.strip().splitlines()[-1]
    assert "data" in last and "25%" in last and "25.0/100.0 MiB" in last
    assert "10.0 MiB/s" in last and "ETA 8s" in last  # rate and ETA
    bar.close()
    # the bar is erased (cursor up, erase line) and the summary line takes its place
    assert out.getvalue().endswith("\x1b[1A\x1b[2Kdata: 25.0 MiB in 2.5 s (10.0 MiB/s)\n")


def test_elsewhere_only_one_final_line() -> None:
    out, clock = io.StringIO(), Clock()
    with ProgressBar("input data", out, tty=False, clock=clock) as bar:
        bar(40 * MiB, 100 * MiB)  # a resumed upload
        clock.t = 3.0
        bar(100 * MiB, 100 * MiB)
    assert out.getvalue() == "input data: 60.0 MiB in 3.0 s (20.0 MiB/s), resumed at 40.0 MiB\n"


def test_nothing_to_send_says_so() -> None:
    out = io.StringIO()
    with ProgressBar("wd", out, tty=False, skipped="already on the broker") as bar:
        bar(5 * MiB, 5 * MiB)
    assert out.getvalue() == "wd: already on the broker (5.0 MiB)\n"


def test_a_failed_transfer_ends_the_line_without_a_summary() -> None:
    out = io.StringIO()
    with pytest.raises(OSError), ProgressBar("wd", out, tty=True) as bar:
        bar(1, 10)
        raise OSError("connection reset")
    drawn = _plain(out.getvalue())
    assert drawn.endswith("\n") and "0%" in drawn  # the bar stays, its line ended
    assert " in " not in drawn  # no summary claims it finished
