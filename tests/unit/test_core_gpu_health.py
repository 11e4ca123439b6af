"""GPU health and verification at the core: the exact commands each event gives.

Prices: 3,600,000 micro-dollars per GPU-hour = 1,000 a GPU-second; no farm terms, so the
broker's fee is the default 10%. Reference of an RTX 3090 (``rigshift.scoring``): fp16
49,700 GFLOP/s, fp32 24,920 GFLOP/s; VERIFIED from 70 % of each and 90 % of the VRAM.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.core import BrokerCore
from broker.economics import LedgerEntry
from broker.errors import FailedPrecondition, NotFound
from broker.events import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptStarted,
    Cancel,
    GpuHealth,
    GpuHealthReported,
    Heartbeat,
    JobSubmitted,
    Persist,
    PostLedger,
    ReinstateRequested,
    RequestSchedule,
    SchedulePass,
    SendReinstate,
    Tick,
    Transition,
    WorkerRegistered,
)
from broker.invariants import validate_state
from broker.model import AttemptState, GpuInfo, JobSpec, JobState, SlaKind
from rigshift.scoring import Measurement, Verification

P, SC, R = JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING
PRICE = 3_600_000
GOLD = JobSpec(command=("x",))
TTL = 10.0
HEALTHY = Measurement(49_700, 24_920, usable_vram_mb=24_000, h2d_mbps=12_000, d2h_mbps=12_500)
IMPOSTOR = Measurement(16_566, 8_306, usable_vram_mb=24_000)  # a third of an RTX 3090
XID79 = "XID 79: GPU has fallen off the bus"


def gpus(n: int, model: str = "RTX 3090", m: Measurement | None = HEALTHY) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"u{i}", model, 24576, 350, PRICE, pcie_generation=4, measurement=m)
        for i in range(n)
    )


def run(core: BrokerCore, event) -> list:
    cmds = core.handle(event)
    validate_state(core)
    return cmds


def persist(jobs=(), workers=()) -> Persist:
    return Persist(frozenset(jobs), frozenset(workers))


def settle(job: str, attempt: int, charge: int, now: float) -> list[LedgerEntry]:
    fee = charge // 10
    txn = f"settle:{job}:{attempt}"
    return [
        LedgerEntry(txn, "client:c", -charge, "charge", job, attempt, now),
        LedgerEntry(txn, "farm:f", charge - fee, "payout", job, attempt, now),
        LedgerEntry(txn, "broker:fees", fee, "fee", job, attempt, now),
    ]


def credit(job: str, attempt: int, kind: SlaKind, n: int, micros: int, now: float):
    txn = f"credit:{job}:{attempt}:{kind.value}:{n}"
    return [
        LedgerEntry(txn, "client:c", micros, "sla_credit", job, attempt, now),
        LedgerEntry(txn, "broker:sla_credits", -micros, "sla_credit", job, attempt, now),
    ]


def quarantined(index: int, reason: str = XID79, since: float = 9.5, **kw) -> GpuHealth:
    return GpuHealth(index, quarantined=True, reason=reason, since=since, **kw)


@pytest.fixture
def core() -> BrokerCore:
    """w1 with two GPUs: job "a" on GPU 0 (started at 1, checkpoint at 5) and job "b" on
    GPU 1 (started at 1); last heartbeat at 9."""
    c = BrokerCore(lease_ttl_s=TTL)
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(2), host_ram_mb=65536, cpu_cores=8))
    for job in ("a", "b"):
        run(c, JobSubmitted(0.0, job, "c", GOLD))
        run(c, SchedulePass(0.0))
        run(c, AttemptStarted(1.0, "w1", job, 1, 1))
    run(c, AttemptCheckpointed(5.0, "w1", "a", 1, 2, sha256="ab" * 32))
    run(c, Heartbeat(9.0, "w1"))
    assert c.workers["w1"].gpus[0].holder == ("a", 1)
    return c


# --- verification at registration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "measurement", "verification", "score", "reason"),
    [
        # 100 x (0.6 x 49,700/49,700 + 0.4 x 24,920/24,920) = 100
        ("RTX 3090", HEALTHY, Verification.VERIFIED, 100, ""),
        # the claimed model alone is never trusted: a third of the figures is 33% of each
        ("RTX 3090", IMPOSTOR, Verification.UNVERIFIED, 33, "fp16 16.6 TFLOPS is 33%"),
        ("RTX 3090", None, Verification.PENDING, 0, "not measured yet"),
        (
            "RTX 3090",
            replace(HEALTHY, error="CUDA out of memory"),
            Verification.UNVERIFIED,
            100,
            "self-test failed: CUDA out of memory",
        ),
        ("RTX 3090", replace(HEALTHY, usable_vram_mb=8000), Verification.UNVERIFIED, 100, "8000"),
        ("GTX 9999", HEALTHY, Verification.UNVERIFIED, 100, "no reference figures"),
    ],
)
def test_registration_judges_each_gpu_from_its_figures(
    model, measurement, verification, score, reason
):
    c = BrokerCore()
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(2, model, measurement)))
    for gpu in c.workers["w1"].gpus.values():
        assert gpu.verdict.verification == verification
        assert gpu.verdict.score == score
        assert reason in gpu.verdict.reason
        assert gpu.measurement == measurement
        assert not gpu.quarantine_reason


def test_registration_keeps_the_host_figures_and_a_gpu_the_agent_holds_in_quarantine():
    c = BrokerCore()
    health = (quarantined(1, since=-5.0, reinstate_required=True),)
    run(
        c,
        WorkerRegistered(
            0.0, "w1", "f", "rig", "1", gpus(2), host_ram_mb=65536, cpu_cores=8,
            disk_write_mbps=900, health=health,
        ),
    )  # fmt: skip
    w = c.workers["w1"]
    assert (w.host_ram_mb, w.cpu_cores, w.disk_write_mbps) == (65536, 8, 900)
    assert not w.gpus[0].quarantine_reason
    out = w.gpus[1]
    assert (out.quarantine_reason, out.quarantined_at) == (XID79, -5.0)
    assert out.reinstate_required


# --- quarantine ---------------------------------------------------------------------------


def test_a_newly_quarantined_gpu_loses_only_the_attempt_holding_it(core):
    why = f"GPU 0 of w1 quarantined: {XID79}"
    cmds = run(core, GpuHealthReported(10.0, "w1", (quarantined(0),)))
    # billed 1 s -> 9 s (the last heartbeat): 8,000; lost 5 s -> 9 s since the checkpoint:
    # 4 s x 1,000 = 4,000, the job's second SLA event (after the INTERRUPTION)
    assert cmds == [
        Transition("a", R, P, f"{why}; requeued after attempt 1"),
        Cancel("w1", "a", 1, why),
        PostLedger(
            tuple(settle("a", 1, 8000, 10.0) + credit("a", 1, SlaKind.LOST_WORK, 2, 4000, 10.0))
        ),
        persist(jobs={"a"}, workers={"w1"}),
        RequestSchedule(),
    ]
    a = core.jobs["a"]
    assert a.attempts[0].state == AttemptState.LOST
    assert [e.kind for e in a.sla_events] == [SlaKind.INTERRUPTION, SlaKind.LOST_WORK]
    assert a.checkpoint_sha256 == "ab" * 32  # the next attempt resumes from it
    gpu0, gpu1 = core.workers["w1"].gpus[0], core.workers["w1"].gpus[1]
    assert (gpu0.holder, gpu0.quarantine_reason, gpu0.quarantined_at) == (None, XID79, 9.5)
    # the neighbour is untouched: its attempt runs on
    assert gpu1.holder == ("b", 1) and not gpu1.quarantine_reason
    assert core.jobs["b"].state == R and core.jobs["b"].attempts[0].state == AttemptState.RUNNING


def test_the_same_report_again_changes_nothing(core):
    report = GpuHealthReported(10.0, "w1", (quarantined(0),))
    run(core, report)
    assert run(core, replace(report, now=11.0)) == []
    assert core.workers["w1"].gpus[0].quarantined_at == 9.5


def test_a_gpu_back_in_service_is_cleared_and_a_pass_is_asked_for(core):
    run(core, GpuHealthReported(10.0, "w1", (quarantined(0),)))
    assert run(core, GpuHealthReported(20.0, "w1", ())) == [
        persist(workers={"w1"}),
        RequestSchedule(),
    ]
    gpu = core.workers["w1"].gpus[0]
    assert (gpu.quarantine_reason, gpu.quarantined_at, gpu.reinstate_required) == ("", None, False)


def test_a_quarantine_without_attempt_left_fails_the_job():
    c = BrokerCore(lease_ttl_s=TTL)
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(1)))
    run(c, JobSubmitted(0.0, "j", "c", replace(GOLD, max_attempts=1)))
    run(c, SchedulePass(0.0))
    cmds = run(c, GpuHealthReported(1.0, "w1", (quarantined(0, since=None),)))
    why = f"GPU 0 of w1 quarantined: {XID79}"
    assert cmds[:2] == [
        Transition("j", SC, JobState.FAILED, f"{why}; no attempts left (1/1)"),
        Cancel("w1", "j", 1, why),
    ]
    assert c.workers["w1"].gpus[0].quarantined_at == 1.0  # no time given: when it was taken


def test_a_report_for_the_lost_attempt_afterwards_is_stale(core):
    run(core, GpuHealthReported(10.0, "w1", (quarantined(0),)))
    # the agent stopped it without a report; should one still come, it changes nothing
    assert run(core, AttemptFinished(11.0, "w1", "a", 1, 3, exit_code=-9)) == [persist(jobs={"a"})]
    assert core.jobs["a"].state == P


@pytest.mark.parametrize(
    ("before", "after", "verification", "schedule"),
    [
        (IMPOSTOR, HEALTHY, Verification.VERIFIED, True),  # a re-test that passes
        (HEALTHY, IMPOSTOR, Verification.UNVERIFIED, True),
        (HEALTHY, replace(HEALTHY, duration_ms=5), Verification.VERIFIED, False),  # same verdict
    ],
)
def test_a_measurement_in_a_report_judges_the_gpu_again(before, after, verification, schedule):
    c = BrokerCore()
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(1, m=before)))
    cmds = run(c, GpuHealthReported(1.0, "w1", (GpuHealth(0, measurement=after),)))
    assert cmds == [persist(workers={"w1"})] + ([RequestSchedule()] if schedule else [])
    gpu = c.workers["w1"].gpus[0]
    assert (gpu.verdict.verification, gpu.measurement) == (verification, after)


def test_a_report_naming_a_gpu_the_rig_lacks_is_refused(core):
    with pytest.raises(NotFound) as err:
        run(core, GpuHealthReported(10.0, "w1", (quarantined(7),)))
    assert err.value.violations[0].field == "gpus.index"
    assert core.workers["w1"].gpus[0].holder == ("a", 1)


# --- reinstating ----------------------------------------------------------------------------


def held_out() -> BrokerCore:
    c = BrokerCore(lease_ttl_s=TTL)
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(2)))
    run(c, GpuHealthReported(1.0, "w1", (quarantined(0, reinstate_required=True),)))
    return c


def test_reinstating_a_gpu_held_out_sends_the_agent_the_instruction():
    c = held_out()
    assert run(c, ReinstateRequested(2.0, "w1", 0, "op")) == [SendReinstate("w1", 0, "op")]
    assert c.workers["w1"].gpus[0].reinstate_required  # until the agent says it is back


@pytest.mark.parametrize(
    ("setup", "index", "error", "reason"),
    [
        (None, 5, NotFound, "GPU_NOT_FOUND"),
        (None, 1, FailedPrecondition, "GPU_NOT_HELD_OUT"),  # in service
        (quarantined(1), 1, FailedPrecondition, "GPU_NOT_HELD_OUT"),  # on probation
        ("offline", 0, FailedPrecondition, "WORKER_OFFLINE"),
    ],
)
def test_reinstate_preconditions(setup, index, error, reason):
    c = held_out()
    if setup == "offline":
        run(c, Tick(100.0))
    elif setup is not None:
        gpu0 = quarantined(0, reinstate_required=True)
        run(c, GpuHealthReported(1.5, "w1", (gpu0, setup)))
    with pytest.raises(error) as err:
        run(c, ReinstateRequested(200.0, "w1", index, "op"))
    assert err.value.reason == reason


def test_reinstating_on_an_unknown_worker_is_not_found():
    with pytest.raises(NotFound):
        run(held_out(), ReinstateRequested(2.0, "nope", 0, "op"))


@pytest.mark.parametrize("fp16", [[49_700, 48_300, 50_900, 47_100], [49_700] * 4])
def test_a_gang_spans_gpus_whose_scores_differ_by_the_self_tests_noise(fp16: list[int]) -> None:
    """Four RTX 3090s measured at scores 97-102 (the self-test's ±3 %) are one group: a
    4-GPU job is placed on them, and the rig is offered at its weakest GPU's score."""
    c = BrokerCore(lease_ttl_s=TTL)
    infos = tuple(
        GpuInfo(
            i,
            f"u{i}",
            "RTX 3090",
            24576,
            350,
            PRICE,
            pcie_generation=4,
            measurement=replace(HEALTHY, fp16_gflops=f),
        )
        for i, f in enumerate(fp16)
    )
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", infos))
    scores = sorted(g.verdict.score for g in c.workers["w1"].gpus.values())
    run(c, JobSubmitted(0.0, "gang", "c", replace(GOLD, gpu_count=4, min_score=scores[0] // 5 * 5)))
    cmds = run(c, SchedulePass(0.0))
    assert c.jobs["gang"].state == SC, c.jobs["gang"].pending_reasons
    assert c.jobs["gang"].current.gpu_indices == (0, 1, 2, 3), cmds
