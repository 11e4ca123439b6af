"""The core's handling of agent reports about one attempt (part of ``BrokerCore``).

An agent reports, each with a per-attempt sequence number that makes a retried
report a no-op: preparing, started, output archived, log lines, progress (energy),
checkpoints and finished. A report about an attempt the broker does not know (or
that another worker holds) is answered with a ``Cancel``; one about an attempt the
broker gave up on (its lease was lost) too, unless it is the attempt's end.

A setup that failed before the process started is charged nothing: the client's
fault (``SETUP_CLIENT``) fails the job at once, the rig's (``SETUP_RIG``) requeues it
while attempts are left and counts against the rig's reliability.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.events import (
    AppendLog,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptLog,
    AttemptOutputReported,
    AttemptPreparing,
    AttemptProgress,
    AttemptReport,
    AttemptStarted,
    Cancel,
    Command,
    Transition,
)
from broker.model import AttemptState, JobState, SetupCause
from broker.records import Attempt, AttemptOutput, Effects, Job

__all__ = ["Reports"]

S = JobState


class Reports:
    """``BrokerCore``'s report handlers (a mixin: the state is the core's)."""

    if TYPE_CHECKING:
        jobs: dict[str, Job]
        _out: Effects

        def _transition(self, job: Job, to: JobState, now: float, reason: str) -> Transition: ...

        def _end_attempt(
            self,
            attempt: Attempt,
            state: AttemptState,
            now: float,
            msg: str,
            rig_fault: bool = False,
        ) -> None: ...

    def _report(self, ev: AttemptReport) -> list[Command]:
        job = self.jobs.get(ev.job_id)
        attempt = None
        if job is not None and 1 <= ev.attempt <= len(job.attempts):
            attempt = job.attempts[ev.attempt - 1]
        if job is None or attempt is None or attempt.worker_id != ev.worker_id:
            return [Cancel(ev.worker_id, ev.job_id, ev.attempt, "unknown attempt")]
        if ev.sequence <= attempt.last_sequence:
            return []
        attempt.last_sequence = ev.sequence
        self._out.jobs.add(job.job_id)
        if not attempt.live:
            # The broker gave up on this attempt (lease lost); a finished report is fine.
            if isinstance(ev, AttemptFinished):
                return []
            return [Cancel(ev.worker_id, ev.job_id, ev.attempt, f"attempt {attempt.state}")]
        match ev:
            case AttemptPreparing():
                if attempt.state == AttemptState.SCHEDULED:
                    attempt.state = AttemptState.PREPARING
                return []
            case AttemptStarted():
                attempt.setup_ms = max(0, ev.setup_ms)
                return self._started(job, attempt, ev.now, ev.rig_lead_s)
            case AttemptOutputReported():
                attempt.output = AttemptOutput(
                    ev.sha256, max(0, ev.size_bytes), ev.now, ev.over_limit, ev.message
                )
                return []
            case AttemptLog():
                return [AppendLog(job.job_id, attempt.number, ev.sequence, ev.data)]
            case AttemptProgress():
                attempt.energy_joules = max(attempt.energy_joules, ev.energy_joules)
                return []
            case AttemptCheckpointed():
                job.checkpoint_sha256 = ev.sha256
                job.checkpoint_time = ev.now
                attempt.last_checkpoint_time = ev.now
                return []
            case AttemptFinished():
                return self._finished(job, attempt, ev)
        raise TypeError(f"unknown report {ev!r}")

    def _started(
        self, job: Job, attempt: Attempt, now: float, lead_s: float = 0.0
    ) -> list[Command]:
        if attempt.state not in (AttemptState.SCHEDULED, AttemptState.PREPARING):
            return []
        attempt.state = AttemptState.RUNNING
        # The start is when the broker heard of it, less how long before the report's last
        # event the rig says it came (a report holding both the start and the finish of a
        # short job); never before the assignment, so a rig's clock cannot bill the client
        # for more than the time the attempt held its GPUs.
        attempt.start_time = max(attempt.schedule_time, now - max(0.0, lead_s))
        if job.state == S.SCHEDULED:
            return [self._transition(job, S.RUNNING, now, f"started on {attempt.worker_id}")]
        return []

    def _finished(self, job: Job, attempt: Attempt, ev: AttemptFinished) -> list[Command]:
        cmds: list[Command] = []
        if ev.setup_ms:
            attempt.setup_ms = ev.setup_ms
        if ev.cause is None and attempt.start_time is None:
            attempt.start_time = ev.now
        attempt.exit_code = ev.exit_code
        attempt.energy_joules = max(attempt.energy_joules, ev.energy_joules)
        if job.state == S.CANCELLED:
            self._end_attempt(attempt, AttemptState.CANCELLED, ev.now, ev.message or "cancelled")
            return cmds
        if ev.cause is not None and attempt.start_time is None:
            return self._setup_failed(job, attempt, ev)
        if job.state == S.SCHEDULED:
            cmds.append(self._transition(job, S.RUNNING, ev.now, "finished before start report"))
        ok = ev.exit_code == 0
        state = AttemptState.SUCCEEDED if ok else AttemptState.FAILED
        self._end_attempt(attempt, state, ev.now, ev.message)
        job.exit_code = ev.exit_code
        if ok:
            cmds.append(self._transition(job, S.SUCCEEDED, ev.now, "exited with status 0"))
        else:
            why = ev.message or f"exited with status {ev.exit_code}"
            cmds.append(self._transition(job, S.FAILED, ev.now, why))
        return cmds

    def _setup_failed(self, job: Job, attempt: Attempt, ev: AttemptFinished) -> list[Command]:
        """Setup failed before the process started (no GPU time to charge). The client's
        fault fails the job at once; the rig's requeues it while attempts are left."""
        why = f"setup failed: {ev.message}" if ev.message else "setup failed"
        rig = ev.cause == SetupCause.SETUP_RIG
        self._end_attempt(attempt, AttemptState.FAILED, ev.now, why, rig_fault=rig)
        job.exit_code = ev.exit_code
        n = job.counted_attempts
        if rig and n < job.spec.max_attempts:
            reason = f"{why} (the rig's fault); requeued after attempt {n}"
            return [self._transition(job, S.PENDING, ev.now, reason)]
        if rig:
            why += f" (the rig's fault); no attempts left ({n}/{job.spec.max_attempts})"
        return [self._transition(job, S.FAILED, ev.now, why)]
