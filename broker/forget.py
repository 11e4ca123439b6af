"""What the core lets go of once the store holds it (docs/scale.md section 1).

The core never drops a job on its own decision: after ``Store.save`` committed a batch,
the shell sends ``JobsStored`` naming that batch's jobs, and :func:`forget_finished`
removes each one that is finished and holds no live attempt from the core's ``jobs`` and
``requests``. Such a job can change no more (a late agent report of it is answered with
a ``Cancel`` of an unknown attempt); reads of it go to the store
(``BrokerService.read_job``). A finished job is in no other index of the core: it left
the queue when it left PENDING, and its attempts' GPUs and spot counts when they ended.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.errors import FailedPrecondition
from broker.events import Command
from broker.model import TERMINAL_JOB_STATES
from broker.records import Job

__all__ = ["finished", "forget_finished", "forgettable"]


def forgettable(job: Job) -> bool:
    """True when the job is finished and no attempt of it holds GPUs (a cancelled job's
    GPUs stay held until the agent confirms the process is gone)."""
    return job.state in TERMINAL_JOB_STATES and not any(a.live for a in job.attempts)


def forget_finished(
    jobs: dict[str, Job], requests: dict[tuple[str, str], str], job_ids: Iterable[str]
) -> list[Command]:
    """Drop the forgettable jobs among ``job_ids`` (stored already); returns no commands."""
    for job_id in job_ids:
        job = jobs.get(job_id)
        if job is None or not forgettable(job):
            continue
        del jobs[job_id]
        key = (job.owner, job.request_id)
        if job.request_id and requests.get(key) == job_id:
            del requests[key]
    return []


def finished(job: Job) -> FailedPrecondition:
    """The refusal of CancelJob for a job that finished otherwise than cancelled."""
    return FailedPrecondition(
        f"job {job.job_id} already finished as {job.state}",
        reason="JOB_FINISHED",
        metadata={"job": job.job_id, "state": job.state},
    )
