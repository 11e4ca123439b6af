"""Pure-core tests of ``JobsStored``: the core forgets a stored job once it is finished and
holds no live attempt, and nothing else (docs/scale.md section 1)."""

from __future__ import annotations

import pytest

from broker.core import BrokerCore
from broker.events import (
    AttemptFinished,
    AttemptLog,
    AttemptProgress,
    AttemptStarted,
    Cancel,
    CancelRequested,
    JobsStored,
    JobSubmitted,
    Persist,
    SchedulePass,
    Tick,
    WorkerRegistered,
    Writes,
)
from broker.forget import forgettable
from broker.invariants import validate_state
from broker.model import GpuInfo, JobSpec, JobState
from harness.broker_fixtures import healthy

TTL = 15.0


def gpus(n: int) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"SIM-{i}", "RTX 3090", 24576, 350, 300_000, measurement=healthy())
        for i in range(n)
    )


def spec(**kw) -> JobSpec:
    return JobSpec(command=("python", "train.py"), **kw)


@pytest.fixture
def core() -> BrokerCore:
    c = BrokerCore(lease_ttl_s=TTL)
    c.handle(WorkerRegistered(0.0, "w1", "f1", "rig-1", "1.0", gpus(2)))
    return c


def stored(core: BrokerCore, cmds: list, now: float) -> list:
    """What the shell does after a committed save: JobsStored for the batch's jobs."""
    return core.handle(JobsStored(now, Writes.of(cmds).job_ids))


def running(core: BrokerCore, job_id: str = "j1", request_id: str = "") -> None:
    core.handle(JobSubmitted(1.0, job_id, "alice", spec(), request_id))
    core.handle(SchedulePass(1.0))
    core.handle(AttemptStarted(2.0, "w1", job_id, 1, 1))


def test_a_finished_job_is_forgotten_once_stored_and_its_request_id_with_it(core):
    running(core, request_id="r1")
    cmds = core.handle(AttemptFinished(5.0, "w1", "j1", 1, 2, 0))
    assert core.jobs["j1"].state == JobState.SUCCEEDED  # kept until the store has it
    assert stored(core, cmds, 5.0) == []
    assert "j1" not in core.jobs
    assert ("alice", "r1") not in core.requests
    assert core.live_attempts("w1") == []
    validate_state(core)


@pytest.mark.parametrize(
    ("state", "events"),
    [
        ("PENDING", []),
        ("SCHEDULED", [SchedulePass(1.0)]),
        ("RUNNING", [SchedulePass(1.0), AttemptStarted(2.0, "w1", "j1", 1, 1)]),
    ],
)
def test_a_job_that_has_not_finished_stays(core, state, events):
    core.handle(JobSubmitted(1.0, "j1", "alice", spec(), "r1"))
    for ev in events:
        core.handle(ev)
    assert core.handle(JobsStored(3.0, frozenset({"j1"}))) == []
    assert core.jobs["j1"].state == state
    assert core.requests[("alice", "r1")] == "j1"
    validate_state(core)


def test_a_cancelled_job_is_kept_until_the_agent_confirms_then_forgotten(core):
    running(core)
    cmds = core.handle(CancelRequested(3.0, "j1"))
    assert Cancel("w1", "j1", 1, "cancelled") in cmds
    stored(core, cmds, 3.0)
    job = core.jobs["j1"]  # CANCELLED, but its GPUs stay held until the agent confirms
    assert job.state == JobState.CANCELLED and job.current is not None and job.current.live
    assert not forgettable(job)
    assert core.workers["w1"].gpus[0].holder == ("j1", 1)
    finished = core.handle(AttemptFinished(4.0, "w1", "j1", 1, 2, -15))
    # The finished report's batch names the job, so the shell's JobsStored after it does too.
    persisted = [c for c in finished if isinstance(c, Persist)]
    assert persisted and "j1" in persisted[0].job_ids
    stored(core, finished, 4.0)
    assert "j1" not in core.jobs
    assert core.workers["w1"].gpus[0].holder is None
    validate_state(core)


def test_a_cancelled_job_on_an_offline_worker_is_forgotten_at_once(core):
    running(core)
    core.handle(Tick(2.0 + TTL + 1))  # the lease expired: the attempt is lost, the job requeued
    cmds = core.handle(CancelRequested(20.0, "j1"))
    stored(core, cmds, 20.0)
    assert "j1" not in core.jobs
    validate_state(core)


@pytest.mark.parametrize(
    "late",
    [
        AttemptFinished(9.0, "w1", "j1", 1, 3, 0),
        AttemptLog(9.0, "w1", "j1", 1, 3, "late line\n"),
        AttemptProgress(9.0, "w1", "j1", 1, 3, 99),
        AttemptStarted(9.0, "w1", "j1", 1, 3),
    ],
    ids=["finished", "log", "progress", "started"],
)
def test_a_late_report_of_a_forgotten_job_gets_a_cancel_and_no_error(core, late):
    running(core)
    stored(core, core.handle(AttemptFinished(5.0, "w1", "j1", 1, 2, 0)), 5.0)
    assert not core.is_duplicate(late)
    assert core.handle(late) == [Cancel("w1", "j1", 1, "unknown attempt")]
    assert "j1" not in core.jobs
    validate_state(core)


def test_jobs_stored_names_unknown_and_forgotten_jobs_harmlessly(core):
    running(core)
    cmds = core.handle(AttemptFinished(5.0, "w1", "j1", 1, 2, 0))
    stored(core, cmds, 5.0)
    assert core.handle(JobsStored(6.0, frozenset({"j1", "nope"}))) == []
    assert core.jobs == {}


def test_the_freed_gpus_are_placed_again_after_a_forget(core):
    running(core)
    stored(core, core.handle(AttemptFinished(5.0, "w1", "j1", 1, 2, 0)), 5.0)
    core.handle(JobSubmitted(6.0, "j2", "alice", spec(gpu_count=2)))
    cmds = core.handle(SchedulePass(6.0))
    assert core.jobs["j2"].state == JobState.SCHEDULED, cmds
    validate_state(core)


def test_a_forgotten_request_id_no_longer_makes_a_submit_idempotent_in_the_core(core):
    """The shell looks such a request id up in the store before it submits (CreateJob)."""
    running(core, request_id="r1")
    stored(core, core.handle(AttemptFinished(5.0, "w1", "j1", 1, 2, 0)), 5.0)
    assert core.handle(JobSubmitted(6.0, "j2", "alice", spec(), "r1"))
    assert core.requests[("alice", "r1")] == "j2"
