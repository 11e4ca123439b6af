"""Curtailment windows, pure (issue 16, ``docs/energy.md``): what a window is, where it is
in its life, which placements it forbids and which running attempts it stops.

A farm in a **window** draws as little as it can: nothing is placed on it, its miners
stop, its spot attempts (and guaranteed ones when the window says so) are checkpointed
and moved. **Before** a window, work that would still run when it starts is not placed
there: a job with a declared ``max_duration_seconds`` when that duration reaches the
start, a job without one when the start is within the lead time
(``--curtailment-lead-s``). ``broker.curtailment`` is the core's part that applies these.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from broker.model import JobSpec, Tier

__all__ = [
    "DEFAULT_LEAD_S",
    "MAX_DURATION_S",
    "Window",
    "fits_before",
    "need_seconds",
    "stops",
    "when",
]

DEFAULT_LEAD_S = 3600.0
"""How long before a window a job without a declared duration stops being placed there."""

MAX_DURATION_S = 7 * 86400
"""The longest window (CreateCurtailment takes 1 s to 7 days)."""


@dataclass(frozen=True, slots=True)
class Window:
    """A farm's curtailment window as the broker stores it (``rigshift.v1.Curtailment``)."""

    curtailment_id: str
    farm_id: str
    start_time: float
    end_time: float
    reason: str = ""
    include_guaranteed: bool = False
    create_time: float = 0.0
    created_by: str = ""
    cancel_time: float | None = None

    def state(self, now: float) -> str:
        """SCHEDULED, ACTIVE, ENDED or CANCELLED at ``now``."""
        if self.cancel_time is not None:
            return "CANCELLED"
        if now >= self.end_time:
            return "ENDED"
        return "ACTIVE" if now >= self.start_time else "SCHEDULED"

    def open(self, now: float) -> bool:
        """Not ended and not cancelled: it still shapes placement."""
        return self.state(now) in ("SCHEDULED", "ACTIVE")

    @property
    def name(self) -> str:
        """``farms/{farm_id}/curtailments/{curtailment_id}``."""
        return f"farms/{self.farm_id}/curtailments/{self.curtailment_id}"


def need_seconds(spec: JobSpec, lead_s: float) -> float:
    """How long a job may still run once placed: its declared ``max_duration_seconds``,
    or the lead time when it declares none."""
    return float(spec.max_duration_seconds) if spec.max_duration_seconds > 0 else lead_s


def fits_before(window: Window, need_s: float, now: float) -> bool:
    """True when work placed now that may run ``need_s`` ends by the window's start."""
    return now + need_s <= window.start_time


def stops(window: Window, tier: Tier) -> bool:
    """True when the window stops running attempts of ``tier`` (spot always; guaranteed
    only with ``include_guaranteed``)."""
    return tier == Tier.SPOT or window.include_guaranteed


def when(t: float) -> str:
    """A time for people: ``2026-12-06 16:00:00 UTC``."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
