"""Queue order: which pending job the scheduler offers free GPUs to first.

``broker.scheduler.place`` walks the pending jobs in the order it is given and places
every job that fits (greedy, with backfill), so that order *is* the policy. This module
holds the orders as pure functions of a frozen view of each job::

    keys = order(pending_jobs, now)              # sort keys, one per job, in input order
    ranked = sorted(pending_jobs, key=lambda j: SHORT_FIRST.key(j))

Policies (each a frozen dataclass with ``key(job) -> tuple``; smaller runs first):

* :data:`FIFO` — guaranteed before spot, then submission time, then job id (the
  broker's default, ``rigshift broker serve --queue-policy fifo``).
* :data:`SHORT_FIRST` — guaranteed before spot, then a *virtual submit time*
  ``submit_time + min(stretch x estimate_s x gpu_count, max_delay_s)``: a job expected to
  use G GPU-seconds ranks as if it had been submitted ``stretch x G`` seconds later. Jobs
  that need little GPU time overtake big ones (smallest job first, which cuts the mean
  completion time on heavy-tailed workloads such as Philly's), but only by a bounded
  amount: no job is overtaken by a job submitted more than ``max_delay_s`` after it, so
  nothing starves. A job without an estimate counts as ``unknown_estimate_s``.

**Aging rule (no starvation).** A job's virtual submit time is at most ``max_delay_s``
(48 h) after its real one, and a job submitted later than that has a later virtual
submit time still. So a guaranteed job can be overtaken only by jobs submitted less than
48 h after it; once those are placed (or if GPUs keep freeing), it reaches the head of the
queue however many short jobs keep arriving. The rule bounds the *order*; like FIFO with
backfill, a wide gang at the head may still wait while narrower jobs fit on the GPUs that
free up one by one (no reservations).

**In the broker** (``BrokerCore(queue_policy=...)``, ``rigshift broker serve
--queue-policy fifo|short-first``) the estimate is the job's declared
``max_duration_seconds`` (0: unknown), the limit the agent enforces, so it is fixed at
submission and persisted with the spec: a pending job's key never changes, the queue is
kept sorted between passes, and the order survives a restart. Declaring a tight limit
buys an earlier place but the job is killed when it runs past it (EASY backfilling's
user estimates work the same way).

The estimate is not the job's true run time (the broker cannot know it). A
:class:`DurationEstimator` learns it online from jobs that have *finished*: the median
run time of the owner's last ``window`` jobs of the same gang size, falling back to the
owner's jobs of any size, then to every job. This is the user-history predictor HPC
batch schedulers use for backfilling (Tsafrir, Etsion and Feitelson, "Backfilling Using
System-Generated Predictions Rather than User Runtime Estimates", TPDS 2007). The broker
does not use it yet (the estimate would have to be frozen onto the job and persisted);
``benchmarks/trace_replay.py`` feeds it to the core as the declared limit, since the
Philly trace declares none, and measures the effect (``benchmarks/README.md``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median

__all__ = [
    "FIFO",
    "QUEUE_POLICIES",
    "SHORT_FIRST",
    "DurationEstimator",
    "Fifo",
    "QueuedJob",
    "ShortFirst",
    "order",
]


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What an ordering policy may know about a pending job."""

    job_id: str
    submit_time: float  # seconds since the epoch, when the job was first submitted
    gpu_count: int = 1
    estimate_s: float = 0.0  # expected run time in seconds; 0 means unknown
    spot: bool = False  # SPOT tier (guaranteed jobs always go first)


@dataclass(frozen=True, slots=True)
class Fifo:
    """Guaranteed before spot, then oldest first (the broker's default order)."""

    def key(self, job: QueuedJob) -> tuple[bool, float, float, str]:
        """Sort key; the smallest runs first."""
        return (job.spot, job.submit_time, job.submit_time, job.job_id)


@dataclass(frozen=True, slots=True)
class ShortFirst:
    """Smallest expected GPU time first, aged by a virtual submit time (module docstring)."""

    stretch: float = 2.0  # seconds of queue position given up per expected GPU-second
    max_delay_s: float = 48 * 3600.0  # most a job's virtual submit time lags its real one
    unknown_estimate_s: float = 3600.0  # run time assumed for a job without an estimate

    def key(self, job: QueuedJob) -> tuple[bool, float, float, str]:
        """Sort key ``(spot, virtual submit time, submit time, job_id)``; smallest first."""
        estimate = job.estimate_s if job.estimate_s > 0 else self.unknown_estimate_s
        delay = min(self.stretch * estimate * job.gpu_count, self.max_delay_s)
        return (job.spot, job.submit_time + delay, job.submit_time, job.job_id)


FIFO = Fifo()
SHORT_FIRST = ShortFirst()

#: The broker's ``--queue-policy`` choices.
QUEUE_POLICIES: dict[str, Fifo | ShortFirst] = {"fifo": FIFO, "short-first": SHORT_FIRST}


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
    """Online run-time estimates from finished jobs (mutable state the broker keeps).

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
