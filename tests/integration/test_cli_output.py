"""Listings and transfers on a terminal and off it, against a real broker.

``-o json`` prints the same bytes as ``--json`` for every listing; ``-o table``
the same bytes as no option (the plain columns scripts read when stdout is not
a terminal); through a pseudo-terminal (pexpect) a listing is a rich table and
an upload draws a progress bar with its rate on stderr.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner, Result

from rigshift_cli import main

pytestmark = pytest.mark.timeout(60)

RIGSHIFT = str(Path(sys.executable).parent / "rigshift")


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def _setup(address: str) -> dict[str, str]:
    farm = json.loads(run("farm", "create", "f1", "--broker", address, "--json").stdout)
    job = json.loads(
        run("job", "submit", "--broker", address, "--json", "--", "python", "t.py").stdout
    )
    run("admin", "create-key", "--client", "alice", "--broker", address)
    return {"FARM": farm["name"], "JOB": job["name"]}


#: Every listing of the client CLI (FARM and JOB are filled in from _setup).
LISTINGS = [
    ["job", "list"],
    ["job", "outputs", "JOB"],
    ["farm", "workers"],
    ["farm", "earnings"],
    ["farm", "earnings", "--by", "gpu"],
    ["farm", "curtailments", "FARM", "--all"],
    ["admin", "list-keys"],
]


def _command(listing: list[str], names: dict[str, str], address: str) -> list[str]:
    return [names.get(a, a) for a in listing] + ["--broker", address]


@pytest.mark.parametrize("listing", LISTINGS, ids=" ".join)
def test_output_json_is_the_json_alias(broker_address: str, listing: list[str]) -> None:
    cmd = _command(listing, _setup(broker_address), broker_address)
    by_flag = run(*cmd, "--json").stdout
    assert run(*cmd, "-o", "json").stdout == by_flag
    assert run(*cmd, "--output", "json").stdout == by_flag
    json.loads(by_flag)  # and it is JSON


@pytest.mark.parametrize("listing", LISTINGS, ids=" ".join)
def test_output_table_is_the_default_plain_form(broker_address: str, listing: list[str]) -> None:
    cmd = _command(listing, _setup(broker_address), broker_address)
    default = run(*cmd).stdout
    assert run(*cmd, "-o", "table").stdout == default
    assert "\x1b" not in default  # not a terminal: no escape codes
    assert run(*cmd, "-o", "wide").stdout  # wide works on every listing


def test_plain_job_list_is_unchanged(broker_address: str) -> None:
    names = _setup(broker_address)
    lines = run("job", "list", "--broker", broker_address).stdout.splitlines()
    assert lines[0].split("  ")[0] == "JOB"
    assert lines[0] == (
        "JOB" + " " * (len(names["JOB"]) - 1) + "STATE    GPUS    MAX PRICE  ATTEMPTS  "
        "CREATED                  NAME/COMMAND"
    )
    assert lines[1].startswith(names["JOB"] + "  PENDING  1x any  no cap     0         ")
    assert lines[1].endswith("  python t.py")
    wide = run("job", "list", "--broker", broker_address, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-4:] == ["TIER", "COST", "OWNER", "NAME/COMMAND"]


def test_json_with_wide_is_a_usage_error(broker_address: str) -> None:
    result = CliRunner().invoke(
        main, ["job", "list", "--broker", broker_address, "--json", "-o", "wide"]
    )
    assert result.exit_code == 2
    assert "--json is -o json; it does not go with -o wide" in result.stderr


def _spawn(*args: str) -> str:
    """Run ``rigshift ARGS`` on a pseudo-terminal (80x24); everything it wrote."""
    child = pexpect.spawn(
        RIGSHIFT, list(args), env=dict(os.environ), encoding="utf-8", dimensions=(24, 100)
    )
    child.expect(pexpect.EOF, timeout=45)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def test_listing_on_a_terminal_is_a_rich_table(broker_address: str) -> None:
    names = _setup(broker_address)
    text = _spawn("job", "list", "--broker", broker_address)
    assert "\x1b[1m" in text  # bold headers
    assert "─" in text  # the rule under them
    assert names["JOB"] in text and "PENDING" in text


def test_upload_progress_bar_on_a_terminal(broker_address: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.bin").write_bytes(os.urandom(6 << 20))  # incompressible: 6 MiB on the wire
    (work / "train.py").write_text("print('hi')\n")
    text = _spawn(
        "job", "submit", "--broker", broker_address, "--working-dir", str(work), "--", "true"
    )
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    bar = [f for f in plain.split("\r") if "100%" in f]
    assert bar, text
    assert "6.0/6.0 MiB" in bar[-1] and "MiB/s" in bar[-1]  # size and transfer rate
    assert "━" in bar[-1]  # the bar itself
    assert f"{work}: 6.0 MiB in " in plain  # the summary line that replaces it
    assert "uploaded " in plain and "submitted jobs/" in plain


def test_upload_off_a_terminal_prints_no_bar(broker_address: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.bin").write_bytes(os.urandom(1 << 20))
    result = run(
        "job", "submit", "--broker", broker_address, "--working-dir", str(work), "--", "true"
    )
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{work}: 1.0 MiB in ")  # the one summary line
    assert lines[1].startswith(f"uploaded {work} (sha256:")


def test_watch_on_a_terminal_keeps_its_lines(broker_address: str) -> None:
    names = _setup(broker_address)
    run("job", "cancel", names["JOB"], "--broker", broker_address)
    # A watch ends when the job is final; the first may also show the way there (a job
    # cancelled mid-attempt), so compare a terminal watch with one that starts final too.
    run("job", "watch", names["JOB"], "--broker", broker_address)
    piped = run("job", "watch", names["JOB"], "--broker", broker_address).stdout
    text = _spawn("job", "watch", names["JOB"], "--broker", broker_address)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")
    for line in piped.splitlines():  # the same state lines, above the live status
        assert line in plain
    assert "CANCELLED" in plain
