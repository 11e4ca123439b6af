"""The one table renderer (plain columns vs a rich table) and -o/--json parsing."""

from __future__ import annotations

import io

import click
import pytest
from click.testing import CliRunner

from client import output
from client.cli.common import echo_listing, listing_format, listing_options
from client.render import render_table, stdout_style
from rigshift.v1 import job_pb2

HEADERS = ["JOB", "STATE", "NAME/COMMAND"]
ROWS = [["jobs/a1", "PENDING", "python train.py [x]"], ["jobs/b22", "-", "echo"]]


def test_plain_is_the_kubectl_like_columns() -> None:
    assert render_table(HEADERS, ROWS) == (
        "JOB       STATE    NAME/COMMAND\n"
        "jobs/a1   PENDING  python train.py [x]\n"
        "jobs/b22  -        echo"
    )


def test_rich_draws_the_same_cells_for_a_terminal() -> None:
    text = render_table(HEADERS, ROWS, "rich", width=80)
    assert "\x1b[" in text  # styled for a terminal (bold headers)
    assert "─" in text  # the rule under the headers
    plain = _strip_ansi(text)
    for cell in [*HEADERS, *ROWS[0], *ROWS[1]]:
        assert cell in plain  # "[x]" is a cell, not rich markup
    assert plain != render_table(HEADERS, ROWS)


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "style"), [(_Tty(), "rich"), (io.StringIO(), "plain")])
def test_style_follows_whether_stdout_is_a_terminal(stream: io.StringIO, style: str) -> None:
    assert stdout_style(stream) == style


def _job(name: str, command: str) -> job_pb2.Job:
    job = job_pb2.Job(name=name, state=job_pb2.Job.PENDING, owner="alice", cost_micros=1_500)
    job.spec.command.extend(command.split())
    return job


def test_wide_job_table_adds_columns_and_keeps_the_command_whole() -> None:
    long = "python " + "x" * 60
    jobs = [_job("jobs/a", long)]
    table = output.job_table(jobs)
    wide = output.job_table(jobs, wide=True)
    assert "TIER" not in table and long not in table
    header = wide.splitlines()[0].split()
    assert header[-4:] == ["TIER", "COST", "OWNER", "NAME/COMMAND"]
    assert wide.splitlines()[1].endswith(long)
    assert "alice" in wide and "GUARANTEED" in wide


@click.command()
@listing_options
def _listing() -> None:
    click.echo(f"format={listing_format()}")
    echo_listing(lambda wide, style: f"wide={wide} style={style}")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "format=table\nwide=False style=plain\n"),
        (["-o", "table"], "format=table\nwide=False style=plain\n"),
        (["-o", "wide"], "format=wide\nwide=True style=plain\n"),
        (["--output", "WIDE"], "format=wide\nwide=True style=plain\n"),
        (["-o", "json"], "format=json\nwide=False style=plain\n"),
        (["--json"], "format=json\nwide=False style=plain\n"),
        (["--json", "-o", "json"], "format=json\nwide=False style=plain\n"),
    ],
)
def test_listing_format(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(_listing, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected


@pytest.mark.parametrize("other", ["table", "wide"])
def test_json_with_another_output_is_a_usage_error(other: str) -> None:
    result = CliRunner().invoke(_listing, ["--json", "-o", other])
    assert result.exit_code == 2
    assert f"--json is -o json; it does not go with -o {other}" in result.stderr
