"""Hypothesis drives random event sequences into the core; the invariants hold after every step."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.core import BrokerCore
from broker.errors import FailedPrecondition
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptLog,
    AttemptStarted,
    CancelRequested,
    DrainRequested,
    Heartbeat,
    JobSubmitted,
    SchedulePass,
    Tick,
    WorkerRegistered,
)
from broker.invariants import validate_state
from broker.model import TERMINAL_JOB_STATES, GpuInfo, JobSpec, JobState

MODELS = ("RTX 3060", "RTX 3090")
TTL = 10.0


class CoreMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.core = BrokerCore(lease_ttl_s=TTL)
        self.now = 0.0
        self.n_jobs = 0
        self.assigned: list[tuple[str, str, int]] = []  # (worker, job, attempt) ever assigned
        self.seq: dict[tuple[str, int], int] = {}
        self.terminal: dict[str, JobState] = {}

    def _apply(self, event):
        cmds = self.core.handle(event)
        for c in cmds:
            if isinstance(c, Assign):
                self.assigned.append((c.worker_id, c.job_id, c.attempt))
        return cmds

    @rule(dt=st.floats(0.0, 6.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._apply(Tick(self.now))

    @rule(
        n=st.integers(1, 4),
        model=st.sampled_from(MODELS),
        worker=st.sampled_from(["w1", "w2", "w3"]),
    )
    def register(self, n: int, model: str, worker: str) -> None:
        infos = tuple(GpuInfo(i, f"u{i}", model, 12288, 200, 100_000 + i) for i in range(n))
        self._apply(WorkerRegistered(self.now, worker, "f", worker, "1", infos))

    @precondition(lambda self: self.core.workers)
    @rule(data=st.data())
    def heartbeat(self, data) -> None:
        worker = data.draw(st.sampled_from(sorted(self.core.workers)))
        self._apply(Heartbeat(self.now, worker))

    @precondition(lambda self: self.core.workers)
    @rule(data=st.data())
    def drain(self, data) -> None:
        worker = data.draw(st.sampled_from(sorted(self.core.workers)))
        self._apply(DrainRequested(self.now, worker))

    @rule(
        gpus=st.integers(1, 4),
        model=st.sampled_from(("", *MODELS)),
        attempts=st.integers(1, 3),
    )
    def submit(self, gpus: int, model: str, attempts: int) -> None:
        self.n_jobs += 1
        spec = JobSpec(command=("x",), gpu_count=gpus, gpu_model=model, max_attempts=attempts)
        self._apply(JobSubmitted(self.now, f"j{self.n_jobs}", "c", spec))

    @rule()
    def schedule(self) -> None:
        self._apply(SchedulePass(self.now))

    @precondition(lambda self: self.core.jobs)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.core.jobs)))
        try:
            self._apply(CancelRequested(self.now, job_id))
        except FailedPrecondition:
            assert self.core.jobs[job_id].state in (JobState.SUCCEEDED, JobState.FAILED)

    @precondition(lambda self: self.assigned)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["started", "log", "finished"]),
        exit_code=st.sampled_from([0, 0, 1]),
        replay=st.booleans(),
    )
    def report(self, data, kind: str, exit_code: int, replay: bool) -> None:
        worker, job, attempt = data.draw(st.sampled_from(self.assigned))
        key = (job, attempt)
        if not replay or key not in self.seq:
            self.seq[key] = self.seq.get(key, 0) + 1
        base = (self.now, worker, job, attempt, self.seq[key])
        event = {
            "started": AttemptStarted(*base),
            "log": AttemptLog(*base, data="x"),
            "finished": AttemptFinished(*base, exit_code=exit_code),
        }[kind]
        before = self.core.jobs[job].state
        dup = self.core.is_duplicate(event)
        cmds = self._apply(event)
        if dup:
            assert cmds == []
            assert self.core.jobs[job].state == before

    @invariant()
    def invariants_hold(self) -> None:
        if hasattr(self, "core"):
            validate_state(self.core)

    @invariant()
    def final_states_are_final(self) -> None:
        if not hasattr(self, "core"):
            return
        for job_id, state in self.terminal.items():
            assert self.core.jobs[job_id].state == state
        for job in self.core.jobs.values():
            if job.state in TERMINAL_JOB_STATES:
                self.terminal[job.job_id] = job.state


CoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreMachine = CoreMachine.TestCase
