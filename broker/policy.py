"""Queue order: which pending job the scheduler offers free GPUs to first.

``broker.scheduler.place`` walks the pending jobs in the order it is given and places
every job that fits (greedy, with backfill), so that order *is* the policy. This module
holds the orders as pure functions of a frozen view of each job::

    ranked = sorted(pending_jobs, key=SHORT_FIRST.key)

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

The estimate is not the job's true run time (the broker cannot know it). The trace
replay learns one online from finished jobs (``benchmarks/replay/estimator.py``) and
declares it as the limit, since the Philly trace declares none.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FIFO",
    "QUEUE_POLICIES",
    "SHORT_FIRST",
    "Fifo",
    "QueuedJob",
    "ShortFirst",
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
