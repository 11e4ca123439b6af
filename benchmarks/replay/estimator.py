"""Run-time estimates for the trace replay (not part of the broker).

``BrokerCore(queue_policy=SHORT_FIRST)`` orders jobs by their declared
``max_duration_seconds``. The Philly trace declares none, so the replay's
``short-first`` policy declares what :class:`DurationEstimator` predicts, learnt online
from jobs that have *finished*: the median run time of the owner's last ``window`` jobs
of the same gang size, falling back to the owner's jobs of any size, then to every job.
This is the user-history predictor HPC batch schedulers use for backfilling (Tsafrir,
Etsion and Feitelson, "Backfilling Using System-Generated Predictions Rather than User
Runtime Estimates", TPDS 2007). The broker does not use it (the estimate would have to
be frozen onto the job and persisted); ``benchmarks/README.md`` measures the effect.

:func:`order` gives the sort keys of a list of jobs under a policy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from statistics import median

from broker.policy import SHORT_FIRST, Fifo, QueuedJob, ShortFirst

__all__ = ["DurationEstimator", "order"]


def order(
    pending_jobs: Iterable[QueuedJob], now: float, policy: Fifo | ShortFirst = SHORT_FIRST
) -> tuple[tuple[bool, float, float, str], ...]:
    """Sort keys of ``pending_jobs`` under ``policy``, in input order; sort by them.

    ``now`` is accepted so that a policy may age jobs by the clock; the two policies here
    do not need it (a virtual submit time ages a job without reading the clock), so their
    order between two passes only changes when jobs arrive or leave.
    """
    del now
    return tuple(policy.key(job) for job in pending_jobs)


class DurationEstimator:
    """Online run-time estimates from finished jobs (mutable state the replay keeps).

    ``estimate(owner, gpu_count)`` is the median of the owner's last ``window`` finished
    runs with that gang size, else of the owner's last ``window`` runs of any size, else
    of the last ``window`` runs of anyone, else 0 (unknown).
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._by_shape: dict[tuple[str, int], deque[float]] = {}
        self._by_owner: dict[str, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=window)

    def observe(self, owner: str, gpu_count: int, duration_s: float) -> None:
        """Record the run time of a job that finished."""
        shape = self._by_shape.get((owner, gpu_count))
        if shape is None:
            shape = self._by_shape[(owner, gpu_count)] = deque(maxlen=self.window)
        shape.append(duration_s)
        mine = self._by_owner.get(owner)
        if mine is None:
            mine = self._by_owner[owner] = deque(maxlen=self.window)
        mine.append(duration_s)
        self._all.append(duration_s)

    def estimate(self, owner: str, gpu_count: int) -> float:
        """Expected run time in seconds of the owner's next job of this size (0 = unknown)."""
        for history in (self._by_shape.get((owner, gpu_count)), self._by_owner.get(owner)):
            if history:
                return float(median(history))
        return float(median(self._all)) if self._all else 0.0
