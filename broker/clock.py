"""The broker's clock: Unix seconds that never jump.

Every decision of the core takes ``now`` from the event, and the shell stamps events
with :class:`BrokerClock`: the wall time read once when the broker starts, plus the
monotonic time elapsed since. A step of the host's wall clock (an NTP correction of an
hour, an operator's ``date -s``) therefore neither expires nor extends a lease, a
deadline or a rate-limit window. Times stay Unix seconds, so what is stored remains
comparable across restarts; a step shows up in the broker's times only at its next
start (when the clock is read again), and the load then grants every live worker a
fresh lease. Gradual NTP corrections (slewing) reach the monotonic clock too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["BrokerClock"]


class BrokerClock:
    """``wall()`` at construction plus ``monotonic()`` elapsed since; call it for now."""

    __slots__ = ("_monotonic", "_start_mono", "_start_wall")

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._start_mono = monotonic()
        self._start_wall = wall()

    def __call__(self) -> float:
        return self._start_wall + (self._monotonic() - self._start_mono)
