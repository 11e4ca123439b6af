"""Queue order in the core (``BrokerCore(queue_policy=...)``), the caches that keep a
scheduling pass cheap, and what ``restore`` rebuilds of them; each cache is checked
against what the core computes without it."""

from __future__ import annotations

import copy

import pytest

from broker.core import BrokerCore, Job
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptStarted,
    Cancel,
    JobSubmitted,
    Persist,
    SchedulePass,
    Tick,
    Transition,
    WorkerRegistered,
)
from broker.invariants import validate_state
from broker.model import AttemptState, GpuInfo, JobSpec, JobState, Tier
from broker.policy import FIFO, SHORT_FIRST, ShortFirst
from broker.queue import priority
from broker.records import OUTCOME_BUCKETS, StoredState, record_outcome
from broker.scheduler import GpuSlot, WorkerCapacity
from harness.broker_fixtures import healthy

P, SC = JobState.PENDING, JobState.SCHEDULED
HOUR = 3600.0


def gpus(n: int) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"SIM-{i}", "RTX 3090", 24576, 350, 300_000, measurement=healthy())
        for i in range(n)
    )


def spec(max_duration_seconds: int = 0, gpu_count: int = 1, **kw) -> JobSpec:
    return JobSpec(
        command=("x",), gpu_count=gpu_count, max_duration_seconds=max_duration_seconds, **kw
    )


def one_busy_gpu(policy) -> BrokerCore:
    """A core with one worker whose only GPU runs job "blocker" (started at t=1)."""
    core = BrokerCore(lease_ttl_s=1e9, queue_policy=policy)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(1)))
    core.handle(JobSubmitted(0.0, "blocker", "c", spec(60)))
    core.handle(SchedulePass(0.0))
    core.handle(AttemptStarted(1.0, "w1", "blocker", 1, 1))
    return core


def pending_order(core: BrokerCore, now: float) -> list[str]:
    return [r.job_id for r in core.snapshot(now).pending]


def test_short_first_places_the_shorter_declared_job_when_the_gpu_frees() -> None:
    specs = {"long": spec(10 * 3600), "short": spec(600)}
    for policy, first in ((FIFO, "long"), (SHORT_FIRST, "short")):
        core = one_busy_gpu(policy)
        core.handle(JobSubmitted(2.0, "long", "c", specs["long"]))
        core.handle(JobSubmitted(3.0, "short", "c", specs["short"]))
        assert core.handle(SchedulePass(3.0)) == [  # the GPU is busy: reasons only
            Persist(frozenset({"long", "short"}))
        ]
        core.handle(AttemptFinished(50.0, "w1", "blocker", 1, 2, 0))
        assert core.handle(SchedulePass(50.0)) == [
            Transition(first, P, SC, "placed on w1 GPUs 0 (attempt 1)"),
            Assign("w1", first, 1, (0,), specs[first], 300_000),
            Persist(frozenset({first}), frozenset({"w1"})),
        ]
        validate_state(core)


def test_short_first_keys_are_the_declared_gpu_time_capped_at_48_hours() -> None:
    core = BrokerCore(queue_policy=SHORT_FIRST)
    # virtual submit = submit + min(2 x max_duration x GPUs, 48 h); no limit counts as 1 h
    core.handle(JobSubmitted(0.0, "big", "c", spec(3600, gpu_count=4)))  # 0 + 28800
    core.handle(JobSubmitted(10.0, "unknown", "c", spec(0)))  # 10 + 7200
    core.handle(JobSubmitted(20.0, "tiny", "c", spec(30, gpu_count=2)))  # 20 + 120
    core.handle(JobSubmitted(30.0, "month", "c", spec(30 * 86400)))  # 30 + 172800
    core.handle(JobSubmitted(40.0, "spot", "c", spec(1, tier=Tier.SPOT)))  # spot goes last
    assert pending_order(core, 50.0) == ["tiny", "unknown", "big", "month", "spot"]
    assert priority(core.jobs["tiny"], SHORT_FIRST) == (False, 140.0, 20.0, "tiny")


def test_a_long_job_is_overtaken_only_by_jobs_submitted_within_48_hours_of_it() -> None:
    """One GPU; a month-long job at t=0 and a short one-hour job every 30 minutes for
    four days. Strict shortest-first would never run the long job; with the 48 h cap it
    starts once the short jobs submitted in its first 48 h are done, before any later one."""
    core = one_busy_gpu(SHORT_FIRST)
    core.handle(JobSubmitted(2.0, "long", "c", spec(30 * 86400)))
    running: tuple[str, float] | None = ("blocker", 1.0)
    started: dict[str, float] = {"blocker": 1.0}
    now, n = 2.0, 0
    while "long" not in started and now < 10 * 86400:
        now += 60.0
        if now >= 1800.0 * (n + 1) and now < 4 * 86400:
            n += 1
            core.handle(JobSubmitted(now, f"s{n:03d}", "c", spec(3600)))
        if running is not None and now - running[1] >= 3600.0:
            job = core.jobs[running[0]]
            core.handle(AttemptFinished(now, "w1", job.job_id, len(job.attempts), 9, 0))
            running = None
        for cmd in core.handle(SchedulePass(now)):
            if isinstance(cmd, Assign):
                core.handle(AttemptStarted(now, "w1", cmd.job_id, cmd.attempt, 1))
                running = (cmd.job_id, now)
                started[cmd.job_id] = now
    validate_state(core)
    assert "long" in started
    before = {j for j in started if j.startswith("s") and started[j] < started["long"]}
    assert max(core.jobs[j].create_time for j in before) <= 2.0 + 48 * HOUR
    # exactly the short jobs whose virtual submit time (submit + 2 h) is before the long
    # job's (2 s + 48 h) overtook it: those submitted in its first 46 hours
    key = priority(core.jobs["long"], SHORT_FIRST)
    ahead = {
        j.job_id
        for j in core.jobs.values()
        if j.job_id[0] == "s" and priority(j, SHORT_FIRST) < key
    }
    assert before == ahead and len(ahead) == 91  # submitted at 1802 s, 3602 s, ... 163802 s
    assert started["long"] < 4 * 86400  # while short jobs are still arriving


def test_a_requeued_job_keeps_its_place() -> None:
    core = BrokerCore(lease_ttl_s=10.0, queue_policy=SHORT_FIRST)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(1)))
    core.handle(JobSubmitted(0.0, "a", "c", spec(60)))
    core.handle(SchedulePass(0.0))
    core.handle(JobSubmitted(1.0, "b", "c", spec(60)))
    core.handle(Tick(20.0))  # w1's lease expired: "a" is requeued
    assert core.jobs["a"].state == P
    assert pending_order(core, 20.0) == ["a", "b"]
    validate_state(core)


def restored(core: BrokerCore, now: float) -> BrokerCore:
    """A fresh core restored from (copies of) ``core``'s records, as after a restart."""
    state = StoredState(
        tuple(core.farms.values()),
        tuple(copy.deepcopy(list(core.workers.values()))),
        tuple(copy.deepcopy(list(core.jobs.values()))),
        tuple(core.ledger),
    )
    again = BrokerCore(
        lease_ttl_s=core.lease_ttl_s,
        queue_policy=core.queue_policy,
        reliability_window_s=core.reliability_window_s,
    )
    again.restore(state, now)
    validate_state(again)
    return again


def test_restore_queues_pending_jobs_in_policy_order() -> None:
    jobs = tuple(
        Job(job_id, "c", spec(limit), t, update_time=t)
        for job_id, t, limit in (("x", 0.0, 7200), ("y", 5.0, 60), ("z", 9.0, 0))
    )
    core = BrokerCore(queue_policy=ShortFirst())
    core.restore(StoredState(jobs=jobs), 10.0)
    assert pending_order(core, 10.0) == ["y", "z", "x"]  # 125, 7209, 14400
    core.handle(JobSubmitted(11.0, "w", "c", spec(1)))
    assert pending_order(core, 12.0) == ["w", "y", "z", "x"]
    core.handle(WorkerRegistered(12.0, "w1", "f1", "rig", "1", gpus(1)))
    assert core.handle(SchedulePass(12.0))[0] == Transition(
        "w", P, SC, "placed on w1 GPUs 0 (attempt 1)"
    )


def test_restore_gives_every_worker_a_fresh_lease_and_refuses_a_used_core() -> None:
    core = BrokerCore(lease_ttl_s=10.0)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(1)))
    again = restored(core, 500.0)
    assert again.workers["w1"].lease_expires_at == 510.0
    assert again.handle(Tick(509.0)) == []
    with pytest.raises(ValueError, match="restore"):
        again.restore(StoredState(), 0.0)


def test_preemption_finds_spot_attempts_of_a_restored_core() -> None:
    """The live-spot index is rebuilt by restore() from the GPU holders."""
    core = BrokerCore(lease_ttl_s=1e9)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(1)))
    core.handle(JobSubmitted(0.0, "spot", "c", spec(tier=Tier.SPOT)))
    core.handle(SchedulePass(0.0))
    again = restored(core, 1.0)
    again.handle(JobSubmitted(1.0, "gold", "c", spec()))
    cmds = again.handle(SchedulePass(1.0))
    why = "preempted by guaranteed job gold"
    assert cmds[:4] == [
        Transition("spot", SC, P, why),
        Cancel("w1", "spot", 1, why),
        Transition("gold", P, SC, "placed on w1 GPUs 0 (attempt 1)"),
        Assign("w1", "gold", 1, (0,), spec(), 300_000),
    ]
    assert again.jobs["spot"].attempts[0].state == AttemptState.PREEMPTED
    validate_state(again)


def test_reliability_is_a_pure_read_and_tick_forgets_what_left_the_window() -> None:
    core = BrokerCore(lease_ttl_s=1e9, reliability_window_s=100.0)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(1)))
    worker = core.workers["w1"]
    worker.outcomes[:] = [(10.0, 0, 1), (50.0, 1, 0), (120.0, 0, 1), (150.0, 1, 0)]
    worker.offline_log[:] = [(5.0, 20.0), (60.0, 70.0), (140.0, 145.0)]
    kept = (list(worker.outcomes), list(worker.offline_log))
    # window 60-160: 15 s offline of 100 (60-70, 140-145); 1 ok, 1 lost
    # (85/100) x ((1+1)/(1+1+1)) = 0.85 x 0.667 = 567
    assert core.reliability(worker, 160.0) == 567
    assert (worker.outcomes, worker.offline_log) == kept  # reading changed nothing
    assert core.handle(Tick(160.0)) == [Persist(frozenset(), frozenset({"w1"}))]
    assert worker.outcomes == [(120.0, 0, 1), (150.0, 1, 0)]
    assert worker.offline_log == [(60.0, 70.0), (140.0, 145.0)]  # 60-70 overlaps 60-160
    assert core.reliability(worker, 160.0) == 567
    assert core.handle(Tick(161.0)) == []  # nothing more left the window


def test_capacity_reuses_equal_gpu_slots() -> None:
    core = BrokerCore(lease_ttl_s=1e9)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(2)))
    core.handle(WorkerRegistered(0.0, "w2", "f1", "rig", "1", gpus(2)))
    core.handle(JobSubmitted(0.0, "j", "c", spec()))
    core.handle(SchedulePass(0.0))
    caps = {c.worker_id: c for c in core.snapshot(1.0).workers}
    # verified (healthy figures), score 100, link estimated at x16 gen 3
    slot = GpuSlot(1, "RTX 3090", 24576, 300_000, True, True, 100, 12_800)
    busy = GpuSlot(0, "RTX 3090", 24576, 300_000, False, True, 100, 12_800)
    assert caps["w1"] == WorkerCapacity("w1", (busy, slot))
    assert caps["w1"].gpus[1] is caps["w2"].gpus[1]  # one interned value


def test_a_rig_running_short_jobs_holds_one_entry_per_bucket_not_per_attempt() -> None:
    core = BrokerCore(lease_ttl_s=1e9, reliability_window_s=960.0)  # 10 s buckets
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus(1)))
    worker = core.workers["w1"]
    for i in range(3000):  # one attempt every 0.32 s for 960 s, every 10th lost
        record_outcome(worker, i * 0.32, i % 10 != 0, core.reliability_window_s)
    assert len(worker.outcomes) == OUTCOME_BUCKETS
    assert sum(ok for _, ok, _ in worker.outcomes) == 2700
    assert sum(lost for _, _, lost in worker.outcomes) == 300
    assert [start for start, _, _ in worker.outcomes[:2]] == [0.0, 10.0]
    # at 970 s the window starts at 10 s: the bucket of 0-10 s (32 attempts, 4 lost) left
    # it, 2,672 ok and 296 lost remain: (2672+1)/(2672+296+1) = 0.9003
    assert core.reliability(worker, 970.0) == 900
    for _ in range(100):
        record_outcome(worker, 965.0, False, core.reliability_window_s)
    assert worker.outcomes[-1] == (960.0, 0, 100)  # a new bucket, counted at once
    assert core.reliability(worker, 970.0) == 871  # (2672+1)/(2672+396+1)
