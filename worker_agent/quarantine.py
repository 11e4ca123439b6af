"""The quarantine book: which GPUs of the rig are out, why, and when they are re-tested (pure).

The agent's state machine (``state_machine.py``) keeps one :class:`QuarantineBook`; it
reads no clock (the time comes with each call, monotonic seconds) and does no I/O::

    fault(index, reason, now)    quarantine the GPU (not again while it is out); a
                                 strike; the STRIKES-th strike within STRIKE_WINDOW_S
                                 -> reinstate_required: no automatic re-test
    due(now, busy)               GPUs whose probation is over, not testing, holding no
                                 attempt: they are re-tested now (marked testing)
    tested(index, passed, ...)   passed -> back in service; failed -> another probation
    reinstate(index, now)        the operator's word: strikes cleared, re-tested at once
    report()                     the whole health, as ReportGpuHealth sends it
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from rigshift.scoring import Measurement

__all__ = ["STRIKES", "STRIKE_WINDOW_S", "GpuHealthView", "QuarantineBook"]

#: Quarantines within :data:`STRIKE_WINDOW_S` after which only the operator brings a GPU back.
STRIKES = 3
STRIKE_WINDOW_S = 24 * 3600.0


@dataclass(slots=True)
class _Out:
    reason: str
    since: float
    since_wall: float
    retest_at: float
    reinstate_required: bool = False
    testing: bool = False


@dataclass(frozen=True, slots=True)
class GpuHealthView:
    """One GPU's health as reported (``rigshift.v1.GpuHealth``)."""

    index: int
    quarantined: bool
    reason: str = ""
    since_wall: float = 0.0
    strikes: int = 0
    reinstate_required: bool = False
    measurement: Measurement | None = None


@dataclass(slots=True)
class QuarantineBook:
    """See the module docstring. ``probation_s``: time out before a re-test."""

    probation_s: float = 600.0
    strikes_limit: int = STRIKES
    window_s: float = STRIKE_WINDOW_S
    out: dict[int, _Out] = field(default_factory=dict)
    strikes: dict[int, list[float]] = field(default_factory=dict)
    measured: dict[int, Measurement] = field(default_factory=dict)

    def quarantined(self) -> frozenset[int]:
        """The GPUs out of service now."""
        return frozenset(self.out)

    def reason(self, index: int) -> str:
        """Why GPU ``index`` is out ("" when it is not)."""
        entry = self.out.get(index)
        return entry.reason if entry else ""

    def fault(self, index: int, reason: str, now: float, wall: float = 0.0) -> bool:
        """Quarantine GPU ``index``; False when it is out already (no new strike)."""
        if index in self.out:
            return False
        recent = [t for t in self.strikes.get(index, []) if now - t < self.window_s]
        recent.append(now)
        self.strikes[index] = recent
        locked = len(recent) >= self.strikes_limit
        self.out[index] = _Out(
            reason,
            now,
            wall,
            math.inf if locked else now + self.probation_s,
            reinstate_required=locked,
        )
        return True

    def due(self, now: float, busy: Iterable[int] = ()) -> list[int]:
        """The GPUs to re-test now (marked testing), never one in ``busy``."""
        held = set(busy)
        out = []
        for index, entry in sorted(self.out.items()):
            if entry.testing or entry.reinstate_required or index in held:
                continue
            if now >= entry.retest_at:
                entry.testing = True
                out.append(index)
        return out

    def tested(
        self,
        index: int,
        passed: bool,
        reason: str,
        measurement: Measurement | None,
        now: float,
    ) -> bool:
        """Record a re-test; whether the health changed (a report is due)."""
        entry = self.out.get(index)
        if entry is None or not entry.testing:
            return False
        if measurement is not None:
            self.measured[index] = measurement
        entry.testing = False
        if passed:
            del self.out[index]
            return True
        first = entry.reason.split(" (probation self-test failed")[0]
        entry.reason = f"{first} (probation self-test failed: {reason})"
        if not entry.reinstate_required:
            entry.retest_at = now + self.probation_s
        return True

    def reinstate(self, index: int, now: float) -> bool:
        """The operator's reinstate: strikes cleared; a quarantined GPU is due for a
        re-test at once. Whether the health changed."""
        had = bool(self.strikes.pop(index, None))
        entry = self.out.get(index)
        if entry is None:
            return had
        entry.reinstate_required = False
        entry.retest_at = now
        return True

    def report(self, now: float) -> list[GpuHealthView]:
        """Every GPU whose health is not plain "healthy, never measured again"."""
        indices = sorted(set(self.out) | set(self.measured) | set(self.strikes))
        views = []
        for index in indices:
            entry = self.out.get(index)
            strikes = sum(1 for t in self.strikes.get(index, []) if now - t < self.window_s)
            views.append(
                GpuHealthView(
                    index,
                    entry is not None,
                    entry.reason if entry else "",
                    entry.since_wall if entry else 0.0,
                    strikes,
                    entry.reinstate_required if entry else False,
                    self.measured.get(index),
                )
            )
        return views
