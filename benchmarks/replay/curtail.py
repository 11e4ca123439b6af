"""Curtailment windows in the replay (issue 16): the ``--curtail`` schedule and the
windows it gives over a trace's span.

``--curtail FARM:DAYS:START-END`` (repeatable): the farm (``busiest``: the one with the
most GPUs) curtails every day of ``DAYS`` (``weekdays`` or ``all``) from ``START`` to
``END`` o'clock UTC (hours 0-24, ``START < END``; the trace's timestamps are read as
UTC). Each window is created a day ahead of its start (a utility's day-ahead
demand-response call), or at the trace's first submit when that is later, so the core's
placement rules around a coming window (``broker.windows``: no work placed that would
overlap it) apply as they would live.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass

from broker.windows import Window

from .workload import Fleet

__all__ = ["DAY_AHEAD_S", "CurtailSpec", "busiest_farm", "parse_curtail", "windows_for"]

DAY_AHEAD_S = 86400.0
"""How long before its start a window is created (scheduled) in the replay."""

DAYS = ("weekdays", "all")


@dataclass(frozen=True, slots=True)
class CurtailSpec:
    """One ``--curtail`` schedule: a farm's daily window on some days."""

    farm: str
    days: str
    start_hour: int
    end_hour: int
    include_guaranteed: bool = False

    @property
    def label(self) -> str:
        """``busiest:weekdays:16-19`` (the flag's own spelling)."""
        return f"{self.farm}:{self.days}:{self.start_hour}-{self.end_hour}"


def parse_curtail(text: str) -> CurtailSpec:
    """The schedule of a ``--curtail`` value ``FARM:DAYS:START-END``; ValueError when it
    is not one (unknown DAYS, hours outside 0-24, START not before END)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"--curtail {text!r}: expected FARM:DAYS:START-END")
    farm, days, hours = parts
    if days not in DAYS:
        raise ValueError(f"--curtail {text!r}: DAYS must be one of {', '.join(DAYS)}")
    start, sep, end = hours.partition("-")
    if not sep or not start.isdigit() or not end.isdigit():
        raise ValueError(f"--curtail {text!r}: hours must be START-END, e.g. 16-19")
    s, e = int(start), int(end)
    if not 0 <= s < e <= 24:
        raise ValueError(f"--curtail {text!r}: need 0 <= START < END <= 24")
    return CurtailSpec(farm, days, s, e)


def busiest_farm(fleet: Fleet) -> str:
    """The farm with the most GPUs (the first in the fleet file on a tie)."""
    gpus: dict[str, int] = {t.farm_id: 0 for t in fleet.farms}
    for r in fleet.rigs:
        gpus[r.farm_id] = gpus.get(r.farm_id, 0) + r.gpus
    if not gpus:
        raise ValueError("the fleet has no farm")
    return max(gpus, key=lambda f: gpus[f])


def windows_for(
    specs: Iterable[CurtailSpec], fleet: Fleet, first_s: float, last_s: float
) -> list[tuple[float, Window]]:
    """(creation time, window) of every window of ``specs`` that ends after ``first_s``
    and starts before ``last_s``, by start; ids ``w1``, ``w2``, ... in that order."""
    farms = {t.farm_id for t in fleet.farms}
    found: list[tuple[float, float, str, bool]] = []  # (start, end, farm, guaranteed)
    for spec in specs:
        farm = busiest_farm(fleet) if spec.farm == "busiest" else spec.farm
        if farm not in farms:
            raise ValueError(f"--curtail {spec.label}: no farm {farm!r} in the fleet")
        day = dt.datetime.fromtimestamp(math.floor(first_s), dt.UTC).replace(
            hour=0, minute=0, second=0
        )
        while day.timestamp() < last_s:
            if spec.days == "all" or day.weekday() < 5:
                start = day.timestamp() + spec.start_hour * 3600
                end = day.timestamp() + spec.end_hour * 3600
                if end > first_s and start < last_s:
                    found.append((start, end, farm, spec.include_guaranteed))
            day += dt.timedelta(days=1)
    out = []
    for n, (start, end, farm, guaranteed) in enumerate(sorted(found), 1):
        w = Window(
            f"w{n}",
            farm,
            start,
            end,
            reason="replay --curtail",
            include_guaranteed=guaranteed,
            create_time=max(first_s, start - DAY_AHEAD_S),
            created_by="replay",
        )
        out.append((w.create_time, w))
    return out
