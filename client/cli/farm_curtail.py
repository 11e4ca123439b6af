"""``rigshift farm curtail`` and ``rigshift farm curtailments``: curtailment windows
(grid curtailment, demand response; ``docs/operator.md``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

import click
from google.protobuf.timestamp_pb2 import Timestamp

from client import render
from client.cli.common import (
    Converted,
    broker_client,
    broker_option,
    echo_json,
    echo_listing,
    json_option,
    listing_format,
    listing_options,
)
from rigshift.units import format_usd, joules_to_kwh, milliseconds_to_hours
from rigshift.v1 import farm_pb2, farm_service_pb2

__all__ = [
    "curtailed_lines",
    "farm_curtail",
    "farm_curtailments",
    "parse_duration",
    "parse_start",
]

_PART = re.compile(r"(\d+)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90s``, ``10m``, ``3h``, ``1d``, ``2h30m`` (or plain seconds) to seconds."""
    value = text.strip().lower()
    if value.isdigit():
        return int(value)
    parts = _PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"duration: expected e.g. 10m, 3h, 2h30m or seconds, got {text!r}")
    return sum(int(n) * _SECONDS[u] for n, u in parts)


def parse_start(text: str) -> datetime | None:
    """``now`` (None) or an ISO-8601 time (UTC when it names no zone)."""
    value = text.strip()
    if value.lower() == "now":
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"start: expected now or an ISO-8601 time, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _when(ts: Timestamp) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _line(c: farm_pb2.Curtailment) -> str:
    state = farm_pb2.Curtailment.State.Name(c.state)
    extra = " include-guaranteed" if c.include_guaranteed else ""
    reason = f"  {c.reason}" if c.reason else ""
    cid = c.name.rsplit("/", 1)[-1]
    return f"{cid}  {state:<9}  {_when(c.start_time)} -> {_when(c.end_time)}{extra}{reason}"


@click.command(name="curtail")
@click.argument("farm_id", metavar="FARM")
@click.option(
    "--start", default="now", show_default=True, help="now, or an ISO-8601 time (UTC default)."
)
@click.option(
    "--duration", required=True, type=Converted("duration", parse_duration), help="e.g. 10m, 3h."
)
@click.option("--reason", default="", help="Why (e.g. the utility's event), for the record.")
@click.option(
    "--include-guaranteed",
    is_flag=True,
    help="Stop and move guaranteed attempts too (their SLA credit is paid by the farm).",
)
@json_option
@broker_option
def farm_curtail(
    farm_id: str,
    start: str,
    duration: int,
    reason: str,
    include_guaranteed: bool,
    as_json: bool,
) -> None:
    """Schedule a curtailment window on FARM: no placements and no mining while it is on;
    spot jobs are checkpointed and move elsewhere (or return after it). The farm's
    operator or an admin only."""
    try:
        when = parse_start(start)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--start") from None
    c = broker_client().create_curtailment(
        farm_id,
        duration,
        start=when,
        reason=reason,
        include_guaranteed=include_guaranteed,
    )
    if as_json:
        echo_json(c)
        return
    click.echo(f"{c.name} {farm_pb2.Curtailment.State.Name(c.state)}")
    click.echo(f"  from {_when(c.start_time)} until {_when(c.end_time)}")


@click.command(name="curtailments")
@click.argument("farm_id", metavar="FARM")
@click.option("--all", "include_past", is_flag=True, help="Ended and cancelled windows too.")
@click.option("--cancel", "cancel_id", default="", metavar="ID", help="Cancel this window.")
@listing_options
@broker_option
def farm_curtailments(farm_id: str, include_past: bool, cancel_id: str) -> None:
    """List FARM's curtailment windows (newest first), or cancel one with --cancel ID.

    -o wide adds who created each window and when.
    """
    as_json = listing_format() == "json"
    client = broker_client()
    if cancel_id:
        name = cancel_id
        if not name.startswith("farms/"):
            name = f"farms/{farm_id.removeprefix('farms/')}/curtailments/{cancel_id}"
        c = client.cancel_curtailment(name)
        if as_json:
            echo_json(c)
            return
        click.echo(f"{c.name} {farm_pb2.Curtailment.State.Name(c.state)}")
        return
    windows = client.list_curtailments(farm_id, include_past=include_past)
    if as_json:
        echo_json(farm_service_pb2.ListCurtailmentsResponse(curtailments=windows))
        return
    if not windows:
        click.echo("no curtailment windows")
        return
    echo_listing(lambda wide, style: curtailments_table(windows, wide=wide, style=style))


def curtailments_table(
    windows: Sequence[farm_pb2.Curtailment], *, wide: bool = False, style: render.Style = "plain"
) -> str:
    """The windows; in the plain style and not ``wide``, one ``_line`` each (the form
    scripts read since issue 16)."""
    if style == "plain" and not wide:
        return "\n".join(_line(c) for c in windows)
    rows = []
    for c in windows:
        row = [
            c.name.rsplit("/", 1)[-1],
            farm_pb2.Curtailment.State.Name(c.state),
            _when(c.start_time),
            _when(c.end_time),
            "yes" if c.include_guaranteed else "no",
            c.reason or "-",
        ]
        if wide:
            row += [c.created_by or "-", _when(c.create_time) if c.create_time.seconds else "-"]
        rows.append(row)
    headers = ["ID", "STATE", "START", "END", "GUARANTEED TOO", "REASON"]
    if wide:
        headers += ["CREATED BY", "CREATED"]
    return render.render_table(headers, rows, style)


def curtailed_lines(rows: Sequence[farm_service_pb2.EarningsRow]) -> list[str]:
    """``farm earnings``' curtailment lines: per row with curtailed time, the GPU-hours
    inside windows, the kWh not drawn and the demand-response income (its own line: not
    part of the revenue above)."""
    out = []
    for r in rows:
        if not r.curtailed_gpu_milliseconds:
            continue
        name = r.farm_display_name or r.farm
        key = name if r.key == r.farm else f"{r.key} ({name})"
        line = (
            f"curtailed {key}: {milliseconds_to_hours(r.curtailed_gpu_milliseconds)} GPU-hours, "
            f"{joules_to_kwh(r.curtailed_energy_joules)} kWh not drawn"
        )
        if r.demand_response_micros:
            line += f", demand response {format_usd(r.demand_response_micros)}"
        out.append(line)
    return out
