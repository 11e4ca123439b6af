"""Per-GPU quarantine in the agent's state machine (``state_machine.py``, ``quarantine.py``):
events in, the exact instructions out. Pure: times are on the events."""

from __future__ import annotations

import pytest

from harness.agent_fixtures import make_assignment
from rigshift.scoring import Measurement
from worker_agent.lease import Lease
from worker_agent.quarantine import QuarantineBook
from worker_agent.state_machine import (
    AgentState,
    Assigned,
    AttemptEnded,
    AttemptStarted,
    GpuFaulted,
    MinersStopped,
    ProbationDue,
    Reconcile,
    RefuseAttempt,
    ReinstateAsked,
    ReportGpuHealth,
    RunSelfTest,
    SelfTestDone,
    StartAttempt,
    StopAttempt,
    StopMiners,
)

NO_MINERS: frozenset[int] = frozenset()
PROBATION = 600.0
XID79 = "XID 79: GPU has fallen off the bus"


def state() -> AgentState:
    lease = Lease(ttl_s=1e9, grace_s=5.0, stop_lead_s=2.0, renewed_at=0.0)
    return AgentState(lease, QuarantineBook(probation_s=PROBATION))


def start(s: AgentState, job: str, gpus: list[int]) -> tuple[str, int]:
    a = make_assignment(job, gpus=gpus)
    assert s.handle(Assigned(a, NO_MINERS, 1.0)) == [StartAttempt(a)]
    s.handle(AttemptStarted((job, 1)))
    return (job, 1)


def test_a_fault_stops_only_the_attempt_on_that_gpu() -> None:
    s = state()
    a0 = start(s, "jobs/a", [0])
    a1 = start(s, "jobs/b", [1])
    out = s.handle(GpuFaulted(1, XID79, 10.0, wall=1_700_000_000.0))
    assert out == [StopAttempt(a1, f"GPU 1 quarantined: {XID79}", False), ReportGpuHealth()]
    assert s.running[a0].stopping is False
    assert s.quarantine.quarantined() == {1}
    (view,) = s.quarantine.report(10.0)
    assert (view.index, view.quarantined, view.reason, view.strikes) == (1, True, XID79, 1)
    assert view.since_wall == 1_700_000_000.0 and not view.reinstate_required


def test_a_gang_attempt_holding_the_gpu_is_stopped() -> None:
    s = state()
    key = start(s, "jobs/gang", [0, 1])
    out = s.handle(GpuFaulted(0, XID79, 10.0))
    assert out == [StopAttempt(key, f"GPU 0 quarantined: {XID79}", False), ReportGpuHealth()]


def test_a_second_fault_on_a_quarantined_gpu_changes_nothing() -> None:
    s = state()
    s.handle(GpuFaulted(1, XID79, 10.0))
    assert s.handle(GpuFaulted(1, "GPU is lost", 11.0)) == []
    assert s.quarantine.reason(1) == XID79
    assert s.quarantine.report(11.0)[0].strikes == 1


@pytest.mark.parametrize("via", ["assigned", "reconcile", "miners-stopped"])
def test_work_on_a_quarantined_gpu_is_refused(via: str) -> None:
    s = state()
    s.handle(GpuFaulted(1, XID79, 10.0))
    a = make_assignment("jobs/c", gpus=[0, 1])
    refused = [RefuseAttempt(("jobs/c", 1), f"GPU 1 quarantined: {XID79}")]
    if via == "assigned":
        assert s.handle(Assigned(a, NO_MINERS, 11.0)) == refused
    elif via == "reconcile":
        assert s.handle(Reconcile((a,), NO_MINERS, 11.0)) == refused
    else:  # waiting for the miner on GPU 0 when GPU 1 is quarantined
        s2 = state()
        assert s2.handle(Assigned(a, frozenset({0}), 11.0)) == [StopMiners(a)]
        s2.handle(GpuFaulted(1, XID79, 12.0))
        assert s2.handle(MinersStopped(("jobs/c", 1))) == refused
        return
    assert ("jobs/c", 1) not in s.running
    # the healthy GPU still takes work
    b = make_assignment("jobs/d", gpus=[0])
    assert s.handle(Assigned(b, NO_MINERS, 11.0)) == [StartAttempt(b)]


def test_quarantined_gpus_count_as_busy_for_the_miners_not_as_ai() -> None:
    s = state()
    start(s, "jobs/a", [0])
    s.handle(GpuFaulted(2, XID79, 10.0))
    assert s.busy_gpus() == {0, 2}
    assert s.busy_gpus(started=True) == {0}


def test_probation_then_a_passing_selftest_brings_the_gpu_back() -> None:
    s = state()
    s.handle(GpuFaulted(1, XID79, 10.0))
    assert s.handle(ProbationDue(10.0 + PROBATION - 1)) == []
    assert s.handle(ProbationDue(10.0 + PROBATION)) == [RunSelfTest(1)]
    assert s.handle(ProbationDue(10.0 + PROBATION + 5)) == []  # one test at a time
    m = Measurement(fp16_gflops=50_000, fp32_gflops=25_000, usable_vram_mb=23_000)
    out = s.handle(SelfTestDone(1, True, "", m, 700.0))
    assert out == [ReportGpuHealth()]
    assert s.quarantine.quarantined() == frozenset()
    (view,) = s.quarantine.report(700.0)
    assert not view.quarantined and view.measurement == m and view.strikes == 1


def test_a_failing_selftest_means_another_probation() -> None:
    s = state()
    s.handle(GpuFaulted(1, "GPU is lost", 10.0))
    assert s.handle(ProbationDue(610.0)) == [RunSelfTest(1)]
    out = s.handle(SelfTestDone(1, False, "no CUDA device", Measurement(error="x"), 620.0))
    assert out == [ReportGpuHealth()]
    assert s.quarantine.reason(1) == "GPU is lost (probation self-test failed: no CUDA device)"
    assert s.handle(ProbationDue(620.0 + PROBATION - 1)) == []
    assert s.handle(ProbationDue(620.0 + PROBATION)) == [RunSelfTest(1)]


def test_no_selftest_while_an_attempt_still_holds_the_gpu() -> None:
    s = state()
    key = start(s, "jobs/a", [1])
    s.handle(GpuFaulted(1, XID79, 10.0))
    assert s.handle(ProbationDue(1000.0)) == []  # still stopping
    s.handle(AttemptEnded(key))
    assert s.handle(ProbationDue(1001.0)) == [RunSelfTest(1)]


def test_a_selftest_result_nobody_asked_for_is_ignored() -> None:
    s = state()
    assert s.handle(SelfTestDone(0, True, "", None, 5.0)) == []
    s.handle(GpuFaulted(0, XID79, 10.0))
    assert s.handle(SelfTestDone(0, True, "", None, 11.0)) == []  # not under test
    assert s.quarantine.quarantined() == {0}


def quarantine_and_pass(s: AgentState, index: int, at: float) -> list[object]:
    """Quarantine at ``at``, pass the probation re-test; the fault's instructions."""
    out = s.handle(GpuFaulted(index, XID79, at))
    if s.quarantine.out[index].reinstate_required:
        return out
    assert s.handle(ProbationDue(at + PROBATION)) == [RunSelfTest(index)]
    s.handle(SelfTestDone(index, True, "", None, at + PROBATION + 1))
    return out


# (times of the quarantines in hours, whether the last one needs the operator)
@pytest.mark.parametrize(
    ("hours", "locked"),
    [
        ([0, 1], False),
        ([0, 1, 2], True),  # three within 24 h
        ([0, 1, 23.9], True),
        ([0, 1, 24.5], False),  # the first has aged out of the window
        ([0, 30, 31], False),
        ([0, 30, 31, 32], True),
    ],
)
def test_three_strikes(hours: list[float], locked: bool) -> None:
    s = state()
    for h in hours:
        quarantine_and_pass(s, 0, h * 3600)
    last = hours[-1] * 3600
    assert (0 in s.quarantine.quarantined()) is locked
    if locked:
        (view,) = s.quarantine.report(last)
        assert view.reinstate_required and view.strikes == 3
        assert s.handle(ProbationDue(last + 10 * PROBATION)) == []  # no automatic re-test


def test_reinstate_clears_the_strikes_and_retests_at_once() -> None:
    s = state()
    for h in (0, 1, 2):
        quarantine_and_pass(s, 0, h * 3600)
    assert s.quarantine.out[0].reinstate_required
    out = s.handle(ReinstateAsked(0, "users/op", 7300.0))
    assert out == [ReportGpuHealth(), RunSelfTest(0)]
    (view,) = s.quarantine.report(7300.0)
    assert view.quarantined and not view.reinstate_required and view.strikes == 0
    assert s.handle(SelfTestDone(0, True, "", None, 7310.0)) == [ReportGpuHealth()]
    # a fresh fault is strike one again: an automatic probation
    s.handle(GpuFaulted(0, XID79, 7400.0))
    assert not s.quarantine.out[0].reinstate_required


def test_reinstating_a_healthy_gpu_without_strikes_does_nothing() -> None:
    s = state()
    assert s.handle(ReinstateAsked(3, "users/op", 1.0)) == []
