"""Invariants of the broker core as code (STYLE.md 3, dask's ``validate_state``).

Tests call :func:`validate_state` after every step; a violation is a bug in the
core, never a user mistake, so it raises ``AssertionError`` with every problem found.
The ledger part is ``broker.ledger.ledger_problems``, the same checker
``rigshift admin verify-ledger`` runs on a database.
"""

from __future__ import annotations

from broker.core import BrokerCore
from broker.ledger import charges_of, ledger_problems
from broker.model import LIVE_ATTEMPT_STATES, AttemptState, JobState, WorkerState

__all__ = ["validate_state"]


def validate_state(core: BrokerCore) -> None:
    """Check every invariant; raise AssertionError listing the violations."""
    problems: list[str] = []
    held: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for worker in core.workers.values():
        for gpu in worker.gpus.values():
            if gpu.holder is not None:
                held.setdefault(gpu.holder, set()).add((worker.worker_id, gpu.info.index))

    # The legs of the jobs the core let go of (finished, stored) are the store's to check
    # (``rigshift admin verify-ledger``, SQL); a core fed no JobsStored holds every job.
    # A core without a ledger (the broker's) leaves it all to the store.
    if core.keep_ledger:
        legs = [e for e in core.ledger if e.job_id in core.jobs]
        problems += ledger_problems(legs, charges_of(core.jobs.values()))

    for job in core.jobs.values():
        live = [a for a in job.attempts if a.state in LIVE_ATTEMPT_STATES]
        if len(live) > 1:
            problems.append(f"{job.job_id}: {len(live)} live attempts")
        if job.counted_attempts > job.spec.max_attempts:
            problems.append(f"{job.job_id}: {job.counted_attempts} attempts > max")
        for number, attempt in enumerate(job.attempts, start=1):
            if attempt.number != number:
                problems.append(f"{job.job_id}: attempt numbering broken at {number}")
            gpus = {(attempt.worker_id, i) for i in attempt.gpu_indices}
            key = (job.job_id, attempt.number)
            if attempt.live:
                if held.get(key, set()) != gpus:
                    problems.append(f"{job.job_id}#{number}: live but GPUs not held exactly")
                worker = core.workers[attempt.worker_id]
                if worker.state == WorkerState.OFFLINE:
                    problems.append(f"{job.job_id}#{number}: live on an OFFLINE worker")
                if job.spec.image and not worker.runtime_name:
                    problems.append(f"{job.job_id}#{number}: image job on a worker without runtime")
            elif key in held:
                problems.append(f"{job.job_id}#{number}: ended but still holds GPUs")
            if attempt.live == attempt.settled:
                problems.append(
                    f"{job.job_id}#{number}: live={attempt.live} settled={attempt.settled}"
                )
        in_pending = job.job_id in core.pending
        if in_pending != (job.state == JobState.PENDING):
            problems.append(f"{job.job_id}: state {job.state} but in pending set={in_pending}")
        if job.state in (JobState.SCHEDULED, JobState.RUNNING):
            current = job.current
            if current is None or not current.live:
                problems.append(f"{job.job_id}: {job.state} without a live attempt")
            elif job.state == JobState.RUNNING and current.state != AttemptState.RUNNING:
                problems.append(f"{job.job_id}: RUNNING but attempt is {current.state}")
        if job.state == JobState.PENDING and live:
            problems.append(f"{job.job_id}: PENDING with a live attempt")
        if job.state in (JobState.SUCCEEDED, JobState.FAILED) and live:
            problems.append(f"{job.job_id}: {job.state} with a live attempt")
        if job.history and job.history[-1].to_state != job.state:
            problems.append(f"{job.job_id}: history ends in {job.history[-1].to_state}")

    for (job_id, number), gpus in held.items():
        owner = core.jobs.get(job_id)
        if owner is None or number > len(owner.attempts) or not owner.attempts[number - 1].live:
            problems.append(f"GPUs {sorted(gpus)} held by dead attempt {job_id}#{number}")
        elif len({w for w, _ in gpus}) != 1:
            problems.append(f"{job_id}#{number}: gang spans workers")

    if problems:
        raise AssertionError("broker invariants violated:\n  " + "\n  ".join(problems))
