"""Listings of ``farm earnings`` and ``job outputs`` (re-exported by :mod:`client.output`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from client.progress import format_bytes
from client.render import Style, format_time, render_table
from rigshift.units import format_usd, joules_to_kwh, milliseconds_to_hours
from rigshift.v1 import farm_service_pb2, job_pb2

__all__ = ["MINING_PAID_MORE", "earnings_table", "outputs_json", "outputs_table"]


def _usd_per_kwh(value: float) -> str:
    return f"${value:.4f}"


#: What the NOTE column says when AI work paid less per kWh than mining would have.
MINING_PAID_MORE = "AI < mining"


def earnings_table(
    rows: Sequence[farm_service_pb2.EarningsRow],
    group_by: str = "farm",
    *,
    wide: bool = False,
    style: Style = "plain",
) -> str:
    """``farm earnings``: one row per farm, worker or GPU; AI $/kWh next to mining $/kWh;
    the kWh and energy cost the farm's power caps saved against the same GPU time uncapped.

    Money columns come from the integer micro-dollar fields; the two $/kWh
    columns are the broker's display ratios. A row where AI work paid less per
    kWh than mining would have is marked in the NOTE column. ``wide`` adds the
    attempts, the GPU-hours inside curtailment windows and the demand-response income
    before the NOTE.
    """
    table = []
    for r in rows:
        ai_below = r.energy_joules > 0 and r.revenue_usd_per_kwh < r.mining_usd_per_kwh
        name = r.farm_display_name or r.farm
        cells = [name if group_by == "farm" else r.key]
        if group_by != "farm":
            cells.append(name)
        cells += [
            r.gpu_model or "-",
            str(milliseconds_to_hours(r.gpu_milliseconds)),
            str(joules_to_kwh(r.energy_joules)),
            format_usd(r.revenue_micros),
            format_usd(r.energy_cost_micros),
            format_usd(r.margin_micros),
            str(joules_to_kwh(r.energy_saved_joules)) if r.energy_saved_joules else "-",
            format_usd(r.energy_cost_saved_micros) if r.energy_saved_joules else "-",
            _usd_per_kwh(r.revenue_usd_per_kwh) if r.energy_joules else "-",
            _usd_per_kwh(r.mining_usd_per_kwh),
        ]
        if wide:
            cells += [
                str(r.attempts),
                str(milliseconds_to_hours(r.curtailed_gpu_milliseconds)),
                format_usd(r.demand_response_micros),
            ]
        cells.append(MINING_PAID_MORE if ai_below else "")
        table.append(cells)
    headers = [group_by.upper()]
    if group_by != "farm":
        headers.append("FARM")
    headers += ["MODEL", "GPU-HOURS", "KWH", "REVENUE", "ENERGY COST", "MARGIN"]
    headers += ["KWH SAVED", "COST SAVED"]  # by the farm's power caps
    headers += ["AI $/KWH", "MINING $/KWH"]
    if wide:
        headers += ["ATTEMPTS", "CURTAILED GPU-H", "DEMAND RESP."]
    return render_table([*headers, "NOTE"], table, style)


def _output_note(out: job_pb2.JobOutput) -> str:
    if out.over_limit:
        return "over limit, not kept" + (f": {out.message}" if out.message else "")
    if not out.sha256:
        return out.message or "nothing kept"
    return out.message


def outputs_table(
    outputs: Iterable[job_pb2.JobOutput], *, wide: bool = False, style: Style = "plain"
) -> str:
    """``job outputs``: one row per attempt that reported its output directory; ``wide``
    prints the whole SHA-256 and the size in bytes."""

    rows = [
        [
            str(out.attempt),
            f"{out.size_bytes} B" if wide else format_bytes(out.size_bytes),
            (out.sha256 if wide else out.sha256[:12]) or "-",
            format_time(out.create_time),
            _output_note(out) or "-",
        ]
        for out in outputs
    ]
    return render_table(["ATTEMPT", "SIZE", "SHA256", "CREATED", "NOTE"], rows, style)


def outputs_json(outputs: Iterable[job_pb2.JobOutput]) -> list[dict[str, object]]:
    """``job outputs --json``: one object per attempt (times as RFC 3339, sizes as integers)."""
    return [
        {
            "attempt": out.attempt,
            "sha256": out.sha256,
            "size_bytes": out.size_bytes,
            "create_time": out.create_time.ToJsonString() if out.HasField("create_time") else None,
            "over_limit": out.over_limit,
            "message": out.message,
        }
        for out in outputs
    ]
