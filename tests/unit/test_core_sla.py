"""Preemption and every SLA credit path, at the core: the exact commands each event gives.

Prices: 3,600,000 micro-dollars per GPU-hour = 1,000 a GPU-second; spot pays 60% of it
(600 a GPU-second). No farm terms, so the broker's fee is the default 10% and no floor
applies. The credit paths (``broker.settlement``):

* START_DEADLINE_MISSED -- credited when the wait was the fleet's fault, 0 when the spec was
  impossible for a while, none at all for spot;
* INTERRUPTION -- never credited by itself;
* LOST_WORK -- credited (since the last checkpoint, else the start) for a guaranteed job,
  0 for spot, absent when the attempt never started;
* HEARTBEAT_GAP -- no credit.
"""

from __future__ import annotations

import pytest

from broker.core import BrokerCore
from broker.economics import LedgerEntry
from broker.events import (
    Assign,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptStarted,
    Cancel,
    CancelRequested,
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
from broker.model import AttemptState, GpuInfo, JobSpec, JobState, SlaKind, Tier, WorkerState
from harness.broker_fixtures import healthy

P, SC, R = JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING
PRICE = 3_600_000
SPOT = JobSpec(command=("x",), tier=Tier.SPOT)
GOLD = JobSpec(command=("x",))
TTL = 10.0


def gpus(n: int, model: str = "RTX 3090") -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"u{i}", model, 24576, 350, PRICE, measurement=healthy(model, 24576))
        for i in range(n)
    )


def run(core: BrokerCore, event) -> list:
    cmds = core.handle(event)
    validate_state(core)
    return cmds


def persist(jobs=(), workers=()) -> Persist:
    return Persist(frozenset(jobs), frozenset(workers))


def settle(job: str, attempt: int, charge: int, now: float, owner: str = "c") -> list[LedgerEntry]:
    fee = charge // 10
    txn = f"settle:{job}:{attempt}"
    return [
        LedgerEntry(txn, f"client:{owner}", -charge, "charge", job, attempt, now),
        LedgerEntry(txn, "farm:f", charge - fee, "payout", job, attempt, now),
        LedgerEntry(txn, "broker:fees", fee, "fee", job, attempt, now),
    ]


def credit(job: str, attempt: int, kind: SlaKind, n: int, micros: int, now: float):
    """The transaction paying the job's ``n``-th SLA event."""
    txn = f"credit:{job}:{attempt}:{kind.value}:{n}"
    return [
        LedgerEntry(txn, "client:c", micros, "sla_credit", job, attempt, now),
        LedgerEntry(txn, "broker:sla_credits", -micros, "sla_credit", job, attempt, now),
    ]


def sla(core: BrokerCore, job: str) -> list[tuple[SlaKind, int, int]]:
    """(kind, seconds, credit) of the job's SLA events."""
    return [(e.kind, e.seconds, e.credit_micros) for e in core.jobs[job].sla_events]


@pytest.fixture
def core() -> BrokerCore:
    """w1 with two GPUs; spot job "a" scheduled at 0 and running since 1, spot job "b"
    scheduled at 2 (not started)."""
    c = BrokerCore(lease_ttl_s=TTL, start_deadline_s=60.0)
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(2)))
    run(c, JobSubmitted(0.0, "a", "c", SPOT))
    run(c, SchedulePass(0.0))
    run(c, AttemptStarted(1.0, "w1", "a", 1, 1))
    run(c, JobSubmitted(2.0, "b", "c", SPOT))
    run(c, SchedulePass(2.0))
    run(c, Heartbeat(3.0, "w1"))
    return c


# --- preemption -------------------------------------------------------------------------------


def test_preemption_takes_the_least_progress_first_and_binds_at_once(core):
    run(core, JobSubmitted(4.0, "gold", "c", GOLD))
    why = "preempted by guaranteed job gold"
    assert run(core, SchedulePass(4.0)) == [
        Transition("b", SC, P, why),  # scheduled last: the least progress lost
        Cancel("w1", "b", 1, why),
        Transition("gold", P, SC, "placed on w1 GPUs 1 (attempt 1)"),
        Assign("w1", "gold", 1, (1,), GOLD, PRICE),
        PostLedger(tuple(settle("b", 1, 0, 4.0))),  # never started: nothing to charge
        persist(jobs={"b", "gold"}, workers={"w1"}),
        RequestSchedule(),  # b is pending again
    ]
    assert core.jobs["b"].attempts[0].state == AttemptState.PREEMPTED
    assert sla(core, "b") == [(SlaKind.INTERRUPTION, 0, 0)]  # no work lost: it never ran
    assert core.jobs["a"].state == R


def test_preemption_of_a_gang_preempts_as_few_attempts_as_it_needs(core):
    gang = JobSpec(command=("x",), gpu_count=2)
    run(core, JobSubmitted(4.0, "gold", "c", gang))
    why = "preempted by guaranteed job gold"
    assert run(core, SchedulePass(4.0)) == [
        Transition("b", SC, P, why),
        Cancel("w1", "b", 1, why),
        Transition("a", R, P, why),
        Cancel("w1", "a", 1, why),
        Transition("gold", P, SC, "placed on w1 GPUs 0,1 (attempt 1)"),
        Assign("w1", "gold", 1, (0, 1), gang, PRICE),
        # a ran 1 s -> 4 s at the spot price: 3 x 600 = 1800, fee 180
        PostLedger(tuple(settle("b", 1, 0, 4.0) + settle("a", 1, 1800, 4.0))),
        persist(jobs={"a", "b", "gold"}, workers={"w1"}),
        RequestSchedule(),
    ]
    # spot: its lost work is recorded, never credited
    assert sla(core, "a") == [(SlaKind.INTERRUPTION, 0, 0), (SlaKind.LOST_WORK, 3, 0)]


def test_no_preemption_without_enough_spot_victims(core):
    run(core, JobSubmitted(4.0, "wide", "c", JobSpec(command=("x",), gpu_count=3)))
    assert run(core, SchedulePass(4.0)) == [persist(jobs={"wide"})]  # its pending reasons
    (reason,) = core.jobs["wide"].pending_reasons
    assert (reason.resource, reason.resolvable) == ("gpu_count", False)


def test_guaranteed_work_is_never_preempted():
    core = BrokerCore(lease_ttl_s=1e9)
    run(core, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(1)))
    run(core, JobSubmitted(0.0, "first", "c", GOLD))
    run(core, SchedulePass(0.0))
    run(core, JobSubmitted(1.0, "second", "c", GOLD))
    assert run(core, SchedulePass(1.0)) == [persist(jobs={"second"})]
    (reason,) = core.jobs["second"].pending_reasons
    assert (reason.resource, reason.resolvable) == ("gpu_count", True)  # it waits


def test_a_cancelled_spot_job_still_holding_its_gpu_is_no_victim(core):
    run(core, CancelRequested(3.5, "b"))  # b's GPU stays held until the agent confirms
    run(core, JobSubmitted(4.0, "gold", "c", GOLD))
    why = "preempted by guaranteed job gold"
    assert run(core, SchedulePass(4.0))[:4] == [
        Transition("a", R, P, why),
        Cancel("w1", "a", 1, why),
        Transition("gold", P, SC, "placed on w1 GPUs 0 (attempt 1)"),
        Assign("w1", "gold", 1, (0,), GOLD, PRICE),
    ]


def test_spot_jobs_never_preempt(core):
    run(core, JobSubmitted(4.0, "late", "c", SPOT))
    assert run(core, SchedulePass(4.0)) == [persist(jobs={"late"})]


# --- SLA credits --------------------------------------------------------------------------------


def late_start(spec: JobSpec, model: str = "RTX 3090") -> tuple[BrokerCore, list]:
    """A job submitted at 0 that first fits at 100 (deadline 60 s): "busy" holds the only
    GPU until then."""
    c = BrokerCore(lease_ttl_s=1e9, start_deadline_s=60.0)
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(1, model)))
    run(c, JobSubmitted(0.0, "busy", "c", GOLD))
    run(c, SchedulePass(0.0))
    run(c, JobSubmitted(0.0, "late", "c", spec))
    run(c, SchedulePass(1.0))  # late is told why it waits
    run(c, AttemptFinished(100.0, "w1", "busy", 1, 1, 0))
    return c, run(c, SchedulePass(100.0))


def test_a_start_missed_because_the_fleet_was_busy_is_credited():
    core, cmds = late_start(GOLD)
    # 40 s late x 1 GPU x 1,000 a second = 40,000
    assert cmds == [
        Transition("late", P, SC, "placed on w1 GPUs 0 (attempt 1)"),
        Assign("w1", "late", 1, (0,), GOLD, PRICE),
        PostLedger(tuple(credit("late", 1, SlaKind.START_DEADLINE_MISSED, 1, 40_000, 100.0))),
        persist(jobs={"late"}, workers={"w1"}),
    ]
    assert sla(core, "late") == [(SlaKind.START_DEADLINE_MISSED, 40, 40_000)]
    assert core.jobs["late"].credit_micros == 40_000


def test_a_start_missed_because_the_spec_was_impossible_is_not_credited():
    core = BrokerCore(lease_ttl_s=1e9, start_deadline_s=60.0)
    spec = JobSpec(command=("x",), gpu_model="A4000")
    run(core, JobSubmitted(0.0, "late", "c", spec))
    run(core, SchedulePass(1.0))
    (reason,) = core.jobs["late"].pending_reasons
    assert not reason.resolvable  # the fleet had no A4000 at all
    run(core, WorkerRegistered(100.0, "w1", "f", "rig", "1", gpus(1, "A4000")))
    assert run(core, SchedulePass(100.0)) == [
        Transition("late", P, SC, "placed on w1 GPUs 0 (attempt 1)"),
        Assign("w1", "late", 1, (0,), spec, PRICE),
        persist(jobs={"late"}, workers={"w1"}),  # an SLA event, and no credit to post
    ]
    assert sla(core, "late") == [(SlaKind.START_DEADLINE_MISSED, 40, 0)]


def test_a_spot_job_has_no_start_deadline():
    core, cmds = late_start(SPOT)
    assert not any(isinstance(c, PostLedger) for c in cmds)
    assert sla(core, "late") == []


def lost_on_expiry(spec: JobSpec, checkpoint: bool) -> tuple[BrokerCore, list]:
    """A job started at 1 (checkpoint at 5 if asked), last heartbeat at 9, lease expired."""
    c = BrokerCore(lease_ttl_s=TTL)
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(1)))
    run(c, JobSubmitted(0.0, "j", "c", spec))
    run(c, SchedulePass(0.0))
    run(c, AttemptStarted(1.0, "w1", "j", 1, 1))
    if checkpoint:
        run(c, AttemptCheckpointed(5.0, "w1", "j", 1, 2, sha256="ab" * 32))
    run(c, Heartbeat(9.0, "w1"))
    return c, run(c, Tick(9.0 + TTL))


def test_work_lost_since_the_last_checkpoint_is_credited_to_a_guaranteed_job():
    core, cmds = lost_on_expiry(GOLD, checkpoint=True)
    now = 9.0 + TTL
    # billed 1 s -> 9 s (the last heartbeat): 8,000; lost 5 s -> 9 s: 4 s x 1,000 = 4,000
    assert cmds == [
        WorkerTransition("w1", WorkerState.ONLINE, WorkerState.OFFLINE),
        Transition("j", R, P, "worker lease expired; requeued after attempt 1"),
        PostLedger(
            tuple(settle("j", 1, 8000, now) + credit("j", 1, SlaKind.LOST_WORK, 3, 4000, now))
        ),
        persist(jobs={"j"}, workers={"w1"}),
        RequestSchedule(),
    ]
    assert sla(core, "j") == [
        (SlaKind.HEARTBEAT_GAP, 10, 0),
        (SlaKind.INTERRUPTION, 0, 0),
        (SlaKind.LOST_WORK, 4, 4000),
    ]


def test_work_lost_since_the_start_when_the_agent_restarts():
    core = BrokerCore(lease_ttl_s=TTL)
    run(core, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(1)))
    run(core, JobSubmitted(0.0, "j", "c", GOLD))
    run(core, SchedulePass(0.0))
    run(core, AttemptStarted(1.0, "w1", "j", 1, 1))
    run(core, Heartbeat(7.0, "w1"))
    # lost 1 s -> 7 s (billed up to the last heartbeat): 6 s x 1,000 = 6,000
    assert run(core, WorkerRegistered(8.0, "w1", "f", "rig", "2", gpus(1))) == [
        Transition("j", R, P, "agent restarted; requeued after attempt 1"),
        PostLedger(
            tuple(settle("j", 1, 6000, 8.0) + credit("j", 1, SlaKind.LOST_WORK, 2, 6000, 8.0))
        ),
        persist(jobs={"j"}, workers={"w1"}),
        RequestSchedule(),
    ]
    assert sla(core, "j") == [(SlaKind.INTERRUPTION, 0, 0), (SlaKind.LOST_WORK, 6, 6000)]


def test_a_spot_jobs_lost_work_is_recorded_but_not_credited():
    core, cmds = lost_on_expiry(SPOT, checkpoint=False)
    # 8 s at the spot price: 8 x 600 = 4,800
    assert cmds[2] == PostLedger(tuple(settle("j", 1, 4800, 9.0 + TTL)))
    assert sla(core, "j") == [
        (SlaKind.HEARTBEAT_GAP, 10, 0),
        (SlaKind.INTERRUPTION, 0, 0),
        (SlaKind.LOST_WORK, 8, 0),
    ]


def test_an_attempt_lost_before_it_started_lost_no_work():
    core = BrokerCore(lease_ttl_s=TTL)
    run(core, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(1)))
    run(core, JobSubmitted(0.0, "j", "c", GOLD))
    run(core, SchedulePass(0.0))
    assert run(core, Tick(TTL)) == [
        WorkerTransition("w1", WorkerState.ONLINE, WorkerState.OFFLINE),
        Transition("j", SC, P, "worker lease expired; requeued after attempt 1"),
        PostLedger(tuple(settle("j", 1, 0, TTL))),
        persist(jobs={"j"}, workers={"w1"}),
        RequestSchedule(),
    ]
    assert sla(core, "j") == [(SlaKind.HEARTBEAT_GAP, 10, 0), (SlaKind.INTERRUPTION, 0, 0)]
