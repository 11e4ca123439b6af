"""Pure-core tests: each asserts the exact commands an event produces (STYLE.md 1).

Decisions come first, then what the shell must write and do: ``PostLedger`` (settlements,
SLA credits), ``Persist`` (the ids of the jobs and workers that changed) and
``RequestSchedule``.
"""

from __future__ import annotations

import pytest

from broker.core import TRANSITIONS, BrokerCore
from broker.economics import LedgerEntry
from broker.errors import FailedPrecondition, InvalidTransition, NotFound
from broker.events import (
    AppendLog,
    Assign,
    AttemptFinished,
    AttemptLog,
    AttemptProgress,
    AttemptStarted,
    Cancel,
    CancelRequested,
    DrainRequested,
    Heartbeat,
    JobSubmitted,
    Persist,
    PostLedger,
    RequestSchedule,
    SchedulePass,
    Tick,
    Transition,
    WorkerRegistered,
    WorkerTransition,
)
from broker.invariants import validate_state
from broker.model import AttemptState, GpuInfo, JobSpec, JobState, WorkerState
from harness.broker_fixtures import healthy

P, SC, R = JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING
OK, FAIL, CXL = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED
TTL = 15.0


def gpus(n: int, model: str = "RTX 3090", price: int = 300_000) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"SIM-{i}", model, 24576, 350, price, measurement=healthy(model, 24576))
        for i in range(n)
    )


def spec(gpu_count: int = 1, **kw) -> JobSpec:
    return JobSpec(command=("python", "train.py"), gpu_count=gpu_count, **kw)


@pytest.fixture
def core() -> BrokerCore:
    c = BrokerCore(lease_ttl_s=TTL)
    c.handle(WorkerRegistered(0.0, "w1", "f1", "rig-1", "1.0", gpus(4)))
    return c


def persist(jobs=(), workers=()) -> Persist:
    return Persist(frozenset(jobs), frozenset(workers))


def settle(job: str, attempt: int, charge: int, now: float, owner: str = "alice") -> PostLedger:
    """The three legs settling an attempt on farm f1 (no terms: the 10% default fee)."""
    fee = charge * 100 // 1000
    txn = f"settle:{job}:{attempt}"
    return PostLedger(
        (
            LedgerEntry(txn, f"client:{owner}", -charge, "charge", job, attempt, now),
            LedgerEntry(txn, "farm:f1", charge - fee, "payout", job, attempt, now),
            LedgerEntry(txn, "broker:fees", fee, "fee", job, attempt, now),
        )
    )


def run(core: BrokerCore, event) -> list:
    cmds = core.handle(event)
    validate_state(core)
    return cmds


def placed(core: BrokerCore, job_id: str = "j1", gpu_count: int = 1, now: float = 1.0) -> None:
    run(core, JobSubmitted(now, job_id, "alice", spec(gpu_count)))
    run(core, SchedulePass(now))


def test_transition_table_is_the_documented_lifecycle():
    assert TRANSITIONS[P] == {SC, CXL}
    assert TRANSITIONS[SC] == {R, P, FAIL, CXL}
    assert TRANSITIONS[R] == {OK, FAIL, P, CXL}
    assert all(not TRANSITIONS[s] for s in (OK, FAIL, CXL))


def test_register_brings_a_worker_online_and_asks_for_scheduling():
    core = BrokerCore(lease_ttl_s=TTL)
    assert run(core, WorkerRegistered(0.0, "w1", "f1", "rig-1", "1.0", gpus(1))) == [
        WorkerTransition("w1", None, WorkerState.ONLINE),
        persist(workers={"w1"}),
        RequestSchedule(),
    ]


def test_submit_makes_a_pending_job_and_asks_for_scheduling(core):
    assert run(core, JobSubmitted(1.0, "j1", "alice", spec())) == [
        Transition("j1", None, P, "submitted"),
        persist(jobs={"j1"}),
        RequestSchedule(),
    ]


def test_submit_with_a_known_request_id_is_a_no_op(core):
    run(core, JobSubmitted(1.0, "j1", "alice", spec(), request_id="r"))
    assert run(core, JobSubmitted(2.0, "j2", "alice", spec(), request_id="r")) == []  # no write
    assert list(core.jobs) == ["j1"]
    # Another owner may use the same key.
    assert run(core, JobSubmitted(2.0, "j3", "bob", spec(), request_id="r")) != []


def test_schedule_pass_binds_lowest_gpus_and_assigns_what_the_agent_needs(core):
    run(core, JobSubmitted(1.0, "j1", "alice", spec(2)))
    assert run(core, SchedulePass(2.0)) == [
        Transition("j1", P, SC, "placed on w1 GPUs 0,1 (attempt 1)"),
        Assign("w1", "j1", 1, (0, 1), spec(2), 300_000),
        persist(jobs={"j1"}, workers={"w1"}),
    ]
    assert core.workers["w1"].gpus[0].holder == ("j1", 1)
    assert core.jobs["j1"].current.price_micros_per_gpu_hour == 300_000


def test_unplaceable_job_keeps_its_reasons(core):
    run(core, JobSubmitted(1.0, "j1", "alice", spec(8)))
    assert run(core, SchedulePass(2.0)) == [persist(jobs={"j1"})]  # its reasons changed
    (reason,) = core.jobs["j1"].pending_reasons
    assert (reason.resource, reason.requested, reason.available) == ("gpu_count", "8 x GPU", "4")
    assert run(core, SchedulePass(3.0)) == []  # the same reasons: nothing to write


def test_started_then_finished_ok(core):
    placed(core)
    assert run(core, AttemptStarted(3.0, "w1", "j1", 1, 1)) == [
        Transition("j1", SC, R, "started on w1"),
        persist(jobs={"j1"}),
    ]
    assert run(core, AttemptProgress(4.0, "w1", "j1", 1, 2, energy_joules=500)) == [
        persist(jobs={"j1"})
    ]
    assert run(core, AttemptLog(4.5, "w1", "j1", 1, 3, data="hi\n")) == [
        AppendLog("j1", 1, 3, "hi\n"),
        persist(jobs={"j1"}),  # its sequence number
    ]
    # 10 s x $0.30/h = 10000 x 300000 / 3.6e6 = 833.3 -> 833; fee 10% = 83
    assert run(core, AttemptFinished(13.0, "w1", "j1", 1, 4, 0, energy_joules=900)) == [
        Transition("j1", R, OK, "exited with status 0"),
        PostLedger(
            (
                LedgerEntry("settle:j1:1", "client:alice", -833, "charge", "j1", 1, 13.0),
                LedgerEntry("settle:j1:1", "farm:f1", 750, "payout", "j1", 1, 13.0),
                LedgerEntry("settle:j1:1", "broker:fees", 83, "fee", "j1", 1, 13.0),
            )
        ),
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),  # GPUs freed
    ]
    attempt = core.jobs["j1"].current
    assert (attempt.state, attempt.energy_joules, attempt.exit_code) == ("SUCCEEDED", 900, 0)
    # 10 s on 1 GPU
    assert attempt.gpu_milliseconds(now=99.0) == 10_000
    assert core.workers["w1"].gpus[0].holder is None


def test_non_zero_exit_fails_the_job_with_the_agents_message(core):
    placed(core)
    run(core, AttemptStarted(3.0, "w1", "j1", 1, 1))
    cmds = run(core, AttemptFinished(4.0, "w1", "j1", 1, 2, exit_code=3, message="boom"))
    assert cmds == [
        Transition("j1", R, FAIL, "boom"),
        settle("j1", 1, 83, 4.0),  # 1 s x $0.30/h
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),
    ]
    assert core.jobs["j1"].exit_code == 3


def test_a_start_reported_with_its_finish_is_dated_by_the_rigs_interval(core):
    """A report holding both ends of a short job: the start is the broker's time less the
    rig's lead, so the job is charged its run, not nothing; never before the assignment."""
    placed(core)  # scheduled at t=1.0
    run(core, AttemptStarted(10.0, "w1", "j1", 1, 1, rig_lead_s=2.5))
    run(core, AttemptFinished(10.0, "w1", "j1", 1, 2, 0))
    assert core.jobs["j1"].current.gpu_milliseconds(now=99.0) == 2_500
    placed(core, "j2", now=20.0)
    run(core, AttemptStarted(30.0, "w1", "j2", 1, 1, rig_lead_s=3600.0))  # a rig's clock lies
    assert core.jobs["j2"].current.start_time == 20.0  # bounded by the assignment
    run(core, AttemptFinished(30.0, "w1", "j2", 1, 2, 0))
    assert core.jobs["j2"].current.gpu_milliseconds(now=99.0) == 10_000


def test_finished_without_start_report_passes_through_running(core):
    placed(core)
    assert run(core, AttemptFinished(3.0, "w1", "j1", 1, 1, 0)) == [
        Transition("j1", SC, R, "finished before start report"),
        Transition("j1", R, OK, "exited with status 0"),
        settle("j1", 1, 0, 3.0),  # started and ended at 3.0: nothing to charge
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),
    ]


def test_duplicate_sequence_is_ignored(core):
    placed(core)
    ev = AttemptStarted(3.0, "w1", "j1", 1, 1)
    run(core, ev)
    assert core.is_duplicate(ev)
    assert run(core, ev) == []


def test_report_from_the_wrong_worker_is_told_to_stop(core):
    placed(core)
    run(core, WorkerRegistered(2.0, "w2", "f1", "rig-2", "1.0", gpus(1)))
    assert run(core, AttemptStarted(3.0, "w2", "j1", 1, 1)) == [
        Cancel("w2", "j1", 1, "unknown attempt")
    ]  # and nothing to write
    assert core.jobs["j1"].state == SC


def test_cancel_pending_job(core):
    run(core, JobSubmitted(1.0, "j1", "alice", spec(8)))
    assert run(core, CancelRequested(2.0, "j1")) == [
        Transition("j1", P, CXL, "cancelled by client"),
        persist(jobs={"j1"}),
    ]
    assert run(core, CancelRequested(3.0, "j1")) == []  # idempotent


def test_cancel_running_job_holds_gpus_until_agent_confirms(core):
    placed(core, gpu_count=4)
    run(core, AttemptStarted(2.0, "w1", "j1", 1, 1))
    assert run(core, CancelRequested(3.0, "j1")) == [
        Transition("j1", R, CXL, "cancelled by client"),
        Cancel("w1", "j1", 1, "cancelled"),
        persist(jobs={"j1"}),
    ]
    assert core.workers["w1"].gpus[3].holder == ("j1", 1)
    # 2 s on 4 GPUs x $0.30/h = 8000 x 300000 / 3.6e6 = 666.7 -> 667
    assert run(core, AttemptFinished(4.0, "w1", "j1", 1, 2, exit_code=-15)) == [
        settle("j1", 1, 667, 4.0),
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),
    ]
    assert core.jobs["j1"].current.state == AttemptState.CANCELLED
    assert core.workers["w1"].gpus[3].holder is None


def test_cancel_finished_job_is_a_failed_precondition(core):
    placed(core)
    run(core, AttemptFinished(2.0, "w1", "j1", 1, 1, 0))
    with pytest.raises(FailedPrecondition) as exc:
        core.handle(CancelRequested(3.0, "j1"))
    assert exc.value.reason == "JOB_FINISHED"


def test_unknown_ids_are_not_found(core):
    with pytest.raises(NotFound):
        core.handle(CancelRequested(1.0, "nope"))
    with pytest.raises(NotFound):
        core.handle(Heartbeat(1.0, "nope"))
    with pytest.raises(NotFound):
        core.handle(DrainRequested(1.0, "nope"))


def test_lease_expiry_requeues_then_fails_when_attempts_run_out():
    core = BrokerCore(lease_ttl_s=TTL)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(1)))
    core.handle(JobSubmitted(0.0, "j1", "alice", spec(max_attempts=2)))
    run(core, SchedulePass(0.0))
    assert run(core, Tick(TTL - 0.1)) == []  # lease still live
    assert run(core, Tick(TTL)) == [
        WorkerTransition("w1", WorkerState.ONLINE, WorkerState.OFFLINE),
        Transition("j1", SC, P, "worker lease expired; requeued after attempt 1"),
        settle("j1", 1, 0, TTL),  # never started
        persist(jobs={"j1"}, workers={"w1"}),
        RequestSchedule(),
    ]
    assert core.jobs["j1"].attempts[0].state == AttemptState.LOST
    assert run(core, Heartbeat(20.0, "w1")) == [
        WorkerTransition("w1", WorkerState.OFFLINE, WorkerState.ONLINE),
        persist(workers={"w1"}),
        RequestSchedule(),
    ]
    assert run(core, SchedulePass(20.0))[1] == Assign(
        "w1", "j1", 2, (0,), spec(max_attempts=2), 300_000
    )
    assert run(core, Tick(20.0 + TTL))[1] == Transition(
        "j1", SC, FAIL, "worker lease expired; no attempts left (2/2)"
    )


def test_heartbeat_extends_the_lease(core):
    assert run(core, Heartbeat(10.0, "w1")) == []  # leases live in memory: nothing to write
    assert core.workers["w1"].lease_expires_at == 10.0 + TTL
    assert run(core, Tick(TTL + 1)) == []


def test_reregistration_means_a_new_agent_process(core):
    placed(core)
    run(core, AttemptStarted(2.0, "w1", "j1", 1, 1))
    cmds = run(core, WorkerRegistered(3.0, "w1", "f1", "rig-1", "1.1", gpus(4)))
    assert cmds[0] == Transition("j1", R, P, "agent restarted; requeued after attempt 1")
    assert cmds[2:] == [persist(jobs={"j1"}, workers={"w1"}), RequestSchedule()]
    assert core.workers["w1"].agent_version == "1.1"


def test_drain_stops_new_placements(core):
    assert run(core, DrainRequested(1.0, "w1")) == [
        WorkerTransition("w1", WorkerState.ONLINE, WorkerState.DRAINING),
        persist(workers={"w1"}),
    ]
    run(core, JobSubmitted(2.0, "j1", "alice", spec()))
    assert run(core, SchedulePass(2.0)) == [persist(jobs={"j1"})]  # only its pending reasons
    assert core.jobs["j1"].pending_reasons


def test_fifo_order_across_requeues(core):
    run(core, JobSubmitted(1.0, "j-late", "a", spec(4)))
    run(core, JobSubmitted(0.5, "j-early", "a", spec(4)))
    cmds = run(core, SchedulePass(2.0))
    assert cmds[1] == Assign("w1", "j-early", 1, (0, 1, 2, 3), spec(4), 300_000)


def test_invalid_transition_carries_history(core):
    placed(core)
    run(core, AttemptFinished(2.0, "w1", "j1", 1, 1, 0))
    job = core.jobs["j1"]
    with pytest.raises(InvalidTransition) as exc:
        core._transition(job, R, 3.0, "bogus")
    assert exc.value.history[0] == "None->PENDING (submitted)"
    assert (exc.value.from_state, exc.value.to_state) == (OK, R)


def test_validate_state_catches_a_double_lease(core):
    placed(core, "j1")
    placed(core, "j2")
    core.workers["w1"].gpus[1].holder = ("j1", 1)  # corrupt on purpose
    with pytest.raises(AssertionError, match=r"not held exactly|dead attempt"):
        validate_state(core)
