"""Setup is a phase of the attempt: PREPARING, its time, who is to blame when it fails,
the output an attempt reports, and the environments a rig holds (pure core, exact commands:
decisions, then ``PostLedger``, ``Persist`` and ``RequestSchedule``)."""

from __future__ import annotations

import pytest

from broker.core import AttemptOutput, BrokerCore
from broker.economics import settlement_entries
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptOutputReported,
    AttemptPreparing,
    AttemptStarted,
    Heartbeat,
    JobSubmitted,
    Persist,
    PostLedger,
    RequestSchedule,
    SchedulePass,
    Transition,
    WorkerRegistered,
)
from broker.invariants import validate_state
from broker.model import AttemptState, GpuInfo, JobSpec, JobState, SetupCause
from harness.broker_fixtures import healthy

P, SC, R = JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING
FAIL, OK = JobState.FAILED, JobState.SUCCEEDED
ENV = "e" * 64


def gpus(n: int) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"SIM-{i}", "RTX 3090", 24576, 350, 360_000, measurement=healthy())
        for i in range(n)
    )


@pytest.fixture
def core() -> BrokerCore:
    c = BrokerCore(lease_ttl_s=15.0)
    c.handle(WorkerRegistered(0.0, "w1", "f1", "rig-1", "1.0", gpus(2)))
    return c


def run(core: BrokerCore, event) -> list:
    cmds = core.handle(event)
    validate_state(core)
    return cmds


def persist(jobs=(), workers=()) -> Persist:
    return Persist(frozenset(jobs), frozenset(workers))


def unpaid(job_id: str, attempt: int, now: float) -> PostLedger:
    """The settlement of an attempt that ran no process: every leg 0."""
    legs = settlement_entries(
        owner="alice",
        farm_id="f1",
        job_id=job_id,
        attempt=attempt,
        charge=0,
        fee_permille=100,
        now=now,
    )
    assert all(leg.amount_micros == 0 for leg in legs)
    return PostLedger(tuple(legs))


def submit(core: BrokerCore, job_id: str = "j1", **kw) -> None:
    spec = JobSpec(command=("sh", "run.sh"), requirements_sha256=ENV, **kw)
    run(core, JobSubmitted(1.0, job_id, "alice", spec))
    assert run(core, SchedulePass(1.0)) == [
        Transition(job_id, P, SC, "placed on w1 GPUs 0 (attempt 1)"),
        Assign("w1", job_id, 1, (0,), spec, 360_000),
        persist(jobs={job_id}, workers={"w1"}),
    ]


def test_preparing_then_started_records_setup_time_and_bills_only_the_process(core):
    submit(core)
    assert run(core, AttemptPreparing(2.0, "w1", "j1", 1, 1)) == [persist(jobs={"j1"})]
    attempt = core.jobs["j1"].attempts[0]
    assert attempt.state == AttemptState.PREPARING
    assert core.jobs["j1"].state == SC  # the job stays SCHEDULED while its rig prepares
    assert run(core, AttemptStarted(12.0, "w1", "j1", 1, 2, setup_ms=10_000)) == [
        Transition("j1", SC, R, "started on w1"),
        persist(jobs={"j1"}),
    ]
    assert (attempt.state, attempt.setup_ms, attempt.start_time) == (
        AttemptState.RUNNING,
        10_000,
        12.0,
    )
    run(core, AttemptFinished(22.0, "w1", "j1", 1, 3, exit_code=0))
    # 10 s of process at $0.36/GPU-hour = 1000 micro-dollars; the 10 s of setup cost nothing.
    assert attempt.gpu_milliseconds(22.0) == 10_000
    assert attempt.charge_micros == 1_000


def test_a_setup_the_client_caused_fails_the_job_at_once_without_charging(core):
    submit(core, max_attempts=3)
    run(core, AttemptPreparing(2.0, "w1", "j1", 1, 1))
    cmds = run(
        core,
        AttemptFinished(
            5.0,
            "w1",
            "j1",
            1,
            2,
            exit_code=1,
            message="no version of `torch==9.9` in the package index",
            cause=SetupCause.SETUP_CLIENT,
            setup_ms=3_000,
        ),
    )
    why = "setup failed: no version of `torch==9.9` in the package index"
    assert cmds == [
        Transition("j1", SC, FAIL, why),
        unpaid("j1", 1, 5.0),
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),
    ]
    job = core.jobs["j1"]
    assert len(job.attempts) == 1 and job.status_message == why
    a = job.attempts[0]
    assert (a.state, a.setup_ms, a.charge_micros, a.start_time) == (
        AttemptState.FAILED,
        3_000,
        0,
        None,
    )
    assert core.workers["w1"].gpus[0].holder is None


def test_a_setup_the_rig_caused_requeues_until_attempts_run_out(core):
    submit(core, max_attempts=2)
    rig = dict(exit_code=1, message="package index unreachable", cause=SetupCause.SETUP_RIG)
    assert run(core, AttemptFinished(5.0, "w1", "j1", 1, 1, **rig)) == [
        Transition(
            "j1",
            SC,
            P,
            "setup failed: package index unreachable (the rig's fault); requeued after attempt 1",
        ),
        unpaid("j1", 1, 5.0),
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),
    ]
    assert core.workers["w1"].outcomes[-1][1:] == (0, 1)  # counts against the rig
    run(core, SchedulePass(6.0))
    assert run(core, AttemptFinished(7.0, "w1", "j1", 2, 1, **rig)) == [
        Transition(
            "j1",
            SC,
            FAIL,
            "setup failed: package index unreachable (the rig's fault); no attempts left (2/2)",
        ),
        unpaid("j1", 2, 7.0),
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),
    ]


def test_output_report_is_kept_on_the_attempt(core):
    submit(core)
    run(core, AttemptStarted(2.0, "w1", "j1", 1, 1))
    out = AttemptOutputReported(9.0, "w1", "j1", 1, 2, sha256="a" * 64, size_bytes=1234)
    assert run(core, out) == [persist(jobs={"j1"})]
    assert core.jobs["j1"].attempts[0].output == AttemptOutput("a" * 64, 1234, 9.0)
    # A retried report (same sequence) changes nothing, and writes nothing.
    retry = AttemptOutputReported(10.0, "w1", "j1", 1, 2, sha256="b" * 64, size_bytes=1)
    assert run(core, retry) == []
    assert core.jobs["j1"].attempts[0].output.sha256 == "a" * 64


def test_heartbeat_status_sets_the_environments_the_scheduler_sees(core):
    assert core.workers["w1"].environments is None  # unknown: the broker asks for them
    run(core, Heartbeat(2.0, "w1"))
    assert core.workers["w1"].environments is None
    assert run(core, Heartbeat(3.0, "w1", (ENV,))) == [persist(workers={"w1"})]
    assert core.workers["w1"].environments == frozenset({ENV})
    assert core.snapshot(3.0).workers[0].environments == frozenset({ENV})
    run(core, Heartbeat(4.0, "w1", ()))
    assert core.snapshot(4.0).workers[0].environments == frozenset()


def test_a_job_is_placed_where_its_environment_is(core):
    run(core, WorkerRegistered(0.0, "w0", "f1", "rig-0", "1.0", gpus(2)))
    run(core, Heartbeat(1.0, "w1", (ENV,)))
    spec = JobSpec(command=("x",), requirements_sha256=ENV)
    run(core, JobSubmitted(1.0, "j1", "alice", spec))
    assert run(core, SchedulePass(1.0)) == [  # w0 sorts first but holds nothing
        Transition("j1", P, SC, "placed on w1 GPUs 0 (attempt 1)"),
        Assign("w1", "j1", 1, (0,), spec, 360_000),
        persist(jobs={"j1"}, workers={"w1"}),
    ]
