"""The random sequences of ``test_core_stateful`` with the shell's ``JobsStored`` after every
event: the invariants hold while the core forgets finished jobs, a forgotten job was final
(terminal, no live attempt), and a late report of one is answered with a Cancel only."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from test_core_stateful import CoreMachine

from broker.events import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptLog,
    AttemptStarted,
    Cancel,
    JobsStored,
    Writes,
)
from broker.model import TERMINAL_JOB_STATES
from broker.records import Job


class ForgettingMachine(CoreMachine):
    def _apply(self, event):
        cmds = super()._apply(event)
        stored = Writes.of(cmds).job_ids
        # What the forget may drop: remember it as it was, to check it was final.
        self.kept: dict[str, Job] = getattr(self, "kept", {})
        self.kept.update({j: self.core.jobs[j] for j in stored if j in self.core.jobs})
        assert self.core.handle(JobsStored(event.now, stored)) == []
        return cmds

    @precondition(lambda self: self.assigned)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["started", "log", "checkpoint", "finished"]),
        exit_code=st.sampled_from([0, 0, 1]),
    )
    def report(self, data, kind: str, exit_code: int) -> None:
        worker, job, attempt = data.draw(st.sampled_from(self.assigned))
        key = (job, attempt)
        self.seq[key] = self.seq.get(key, 0) + 1
        base = (self.now, worker, job, attempt, self.seq[key])
        event = {
            "started": AttemptStarted(*base),
            "log": AttemptLog(*base, data="x"),
            "checkpoint": AttemptCheckpointed(*base, sha256="ab" * 32),
            "finished": AttemptFinished(*base, exit_code=exit_code),
        }[kind]
        forgotten = job not in self.core.jobs
        cmds = self._apply(event)
        if forgotten:
            assert cmds == [Cancel(worker, job, attempt, "unknown attempt")]

    @invariant()
    def forgotten_jobs_were_final(self) -> None:
        if not hasattr(self, "core"):
            return
        for job_id, job in getattr(self, "kept", {}).items():
            if job_id not in self.core.jobs:
                assert job.state in TERMINAL_JOB_STATES
                assert not any(a.live for a in job.attempts)
                assert (
                    job.request_id == ""
                    or self.core.requests.get((job.owner, job.request_id)) != job_id
                )

    @invariant()
    def final_states_are_final(self) -> None:
        if not hasattr(self, "core"):
            return
        for job_id, state in self.terminal.items():
            if job_id in self.core.jobs:
                assert self.core.jobs[job_id].state == state
        for job in self.core.jobs.values():
            if job.state in TERMINAL_JOB_STATES:
                self.terminal[job.job_id] = job.state


ForgettingMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestForgettingMachine = ForgettingMachine.TestCase
