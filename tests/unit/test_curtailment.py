"""Curtailment windows (issue 16): the pure rules (``broker.windows``) and the core's part
(``broker.curtailment``): placement around a coming window, what a window stops, its SLA
event and credit, the agents' instructions, a restart."""

from __future__ import annotations

import pytest

from broker.core import BrokerCore
from broker.errors import FailedPrecondition, NotFound
from broker.events import (
    AttemptCheckpointed,
    AttemptStarted,
    Cancel,
    CurtailmentCancelled,
    CurtailmentScheduled,
    JobSubmitted,
    SchedulePass,
    SendCurtail,
    Tick,
    WorkerRegistered,
)
from broker.invariants import validate_state
from broker.ledger import charges_of, ledger_problems
from broker.model import AttemptState, GpuInfo, JobSpec, JobState, SlaKind, Tier
from broker.records import StoredState
from broker.windows import Window, fits_before, need_seconds, stops
from harness.broker_fixtures import healthy

PRICE = 3_600_000  # 1,000 micro-dollars a GPU-second
H = 3600.0
T0 = 1_800_000_000.0


def gpus(n: int) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"u{i}", "RTX 3090", 24576, 350, PRICE, measurement=healthy("RTX 3090", 24576))
        for i in range(n)
    )


def run(core: BrokerCore, event) -> list:
    cmds = core.handle(event)
    validate_state(core)
    return cmds


def window(start: float, end: float, farm: str = "fa", guaranteed: bool = False, cid: str = "c1"):
    return Window(cid, farm, start, end, "grid", guaranteed, T0, "op")


def spec(tier: Tier = Tier.GUARANTEED, duration: int = 0) -> JobSpec:
    return JobSpec(command=("x",), tier=tier, max_duration_seconds=duration)


# --- the pure rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "lead", "start_in", "fits"),
    [
        (600, 3600.0, 601.0, True),  # declared: ends before the start
        (600, 3600.0, 600.0, True),  # ends exactly at the start
        (600, 3600.0, 599.0, False),  # would overlap by a second
        (7200, 60.0, 3600.0, False),  # a long declared duration overlaps, whatever the lead
        (0, 3600.0, 3601.0, True),  # undeclared: outside the lead time
        (0, 3600.0, 1800.0, False),  # undeclared: within the lead time
        (0, 60.0, 1800.0, True),  # a shorter lead time
        (600, 3600.0, -1.0, False),  # the window is on
    ],
)
def test_work_fits_before_a_window_only_when_it_ends_by_its_start(duration, lead, start_in, fits):
    w = window(T0 + start_in, T0 + start_in + H)
    assert fits_before(w, need_seconds(spec(duration=duration), lead), T0) is fits


@pytest.mark.parametrize(
    ("tier", "include_guaranteed", "stopped"),
    [
        (Tier.SPOT, False, True),
        (Tier.SPOT, True, True),
        (Tier.GUARANTEED, False, False),
        (Tier.GUARANTEED, True, True),
    ],
)
def test_which_attempts_a_window_stops(tier, include_guaranteed, stopped):
    assert stops(window(T0, T0 + H, guaranteed=include_guaranteed), tier) is stopped


@pytest.mark.parametrize(
    ("now", "cancelled", "state"),
    [
        (T0 - 1, False, "SCHEDULED"),
        (T0, False, "ACTIVE"),
        (T0 + H - 1, False, "ACTIVE"),
        (T0 + H, False, "ENDED"),
        (T0 - 1, True, "CANCELLED"),
    ],
)
def test_window_states(now, cancelled, state):
    w = window(T0, T0 + H)
    if cancelled:
        w = Window(w.curtailment_id, w.farm_id, w.start_time, w.end_time, cancel_time=T0 - 2)
    assert w.state(now) == state


# --- the core: placement ----------------------------------------------------------------------


def fleet(lead_s: float = 3600.0, b_gpus: int = 1) -> BrokerCore:
    """Farm fa has worker wa (1 GPU); farm fb has worker wb."""
    core = BrokerCore(lease_ttl_s=1e9, curtailment_lead_s=lead_s)
    run(core, WorkerRegistered(T0, "wa", "fa", "rig-a", "1", gpus(1)))
    run(core, WorkerRegistered(T0, "wb", "fb", "rig-b", "1", gpus(b_gpus)))
    return core


def placed_on(core: BrokerCore, job: str) -> str | None:
    current = core.jobs[job].current
    return current.worker_id if current is not None and current.live else None


@pytest.mark.parametrize(
    ("duration", "start_in", "where"),
    [
        (600, 1200.0, {"wa", "wb"}),  # fits before the window: either farm
        (1800, 1200.0, {"wb"}),  # would overlap: elsewhere
        (0, 1200.0, {"wb"}),  # undeclared, within the lead time
        (0, 7200.0, {"wa", "wb"}),  # undeclared, outside it
        (600, 0.0, {"wb"}),  # the window is on
    ],
)
def test_two_jobs_around_a_coming_window(duration, start_in, where):
    """Two jobs, two single-GPU farms, fa with a window: each job lands where it may."""
    core = fleet()
    run(core, CurtailmentScheduled(T0, window(T0 + start_in, T0 + start_in + H)))
    for j in ("j1", "j2"):
        run(core, JobSubmitted(T0, j, "c", spec(duration=duration)))
    run(core, SchedulePass(T0 + 1))
    got = {placed_on(core, "j1"), placed_on(core, "j2")} - {None}
    assert got == where
    if where == {"wb"}:
        left = next(j for j in ("j1", "j2") if placed_on(core, j) is None)
        reasons = core.jobs[left].pending_reasons
        curtail = [r for r in reasons if r.resource == "curtailment"]
        assert len(curtail) == 1 and "farm fa" in curtail[0].message
        assert "2027" in curtail[0].message or "UTC" in curtail[0].message


def test_a_farm_with_a_window_is_placed_on_only_after_the_others():
    core = fleet()
    run(core, CurtailmentScheduled(T0, window(T0 + 2 * H, T0 + 3 * H)))
    run(core, JobSubmitted(T0, "j", "c", spec(duration=60)))
    run(core, SchedulePass(T0))
    assert placed_on(core, "j") == "wb"  # the farm keeps its GPUs free for the window


def test_the_window_end_brings_the_farm_back():
    core = fleet(b_gpus=0)
    run(core, CurtailmentScheduled(T0, window(T0, T0 + H)))
    run(core, JobSubmitted(T0, "j", "c", spec()))
    run(core, SchedulePass(T0))
    assert placed_on(core, "j") is None
    cmds = run(core, Tick(T0 + H))
    assert SendCurtail("wa", False) in cmds
    run(core, SchedulePass(T0 + H))
    assert placed_on(core, "j") == "wa"


def test_no_preemption_onto_a_curtailed_farm():
    core = fleet(b_gpus=0)
    run(core, JobSubmitted(T0, "s", "c", spec(Tier.SPOT)))
    run(core, SchedulePass(T0))
    assert placed_on(core, "s") == "wa"
    run(core, CurtailmentScheduled(T0 + 1, window(T0 + 100, T0 + H)))
    run(core, JobSubmitted(T0 + 2, "g", "c", spec()))  # undeclared: within the lead time
    run(core, SchedulePass(T0 + 2))
    assert placed_on(core, "g") is None and placed_on(core, "s") == "wa"


# --- the core: the window's start ---------------------------------------------------------------


def running(core: BrokerCore, job: str, tier: Tier, now: float) -> None:
    run(core, JobSubmitted(now, job, "c", spec(tier)))
    run(core, SchedulePass(now))
    a = core.jobs[job].current
    run(core, AttemptStarted(now + 1, a.worker_id, job, a.number, 1))


@pytest.mark.parametrize(
    ("include_guaranteed", "stopped"),
    [(False, {"spot"}), (True, {"spot", "gold"})],
)
def test_the_start_stops_spot_attempts_and_guaranteed_ones_when_asked(include_guaranteed, stopped):
    core = BrokerCore(lease_ttl_s=1e9)
    run(core, WorkerRegistered(T0, "wa", "fa", "rig-a", "1", gpus(2)))
    running(core, "spot", Tier.SPOT, T0)
    running(core, "gold", Tier.GUARANTEED, T0)
    run(core, AttemptCheckpointed(T0 + 5, "wa", "gold", 1, 2, "sha"))
    reliability = core.reliability(core.workers["wa"], T0 + 10)
    w = window(T0 + 10, T0 + H, guaranteed=include_guaranteed)
    assert not [c for c in run(core, CurtailmentScheduled(T0, w)) if isinstance(c, Cancel)]
    cmds = run(core, Tick(T0 + 10))
    assert {c.job_id for c in cmds if isinstance(c, Cancel)} == stopped
    assert SendCurtail("wa", True, T0 + H, "grid") in cmds
    for job in stopped:
        j = core.jobs[job]
        assert j.state == JobState.PENDING
        assert j.attempts[0].state == AttemptState.PREEMPTED
        assert j.counted_attempts == 0  # not against max_attempts
        (event,) = j.sla_events
        assert event.kind == SlaKind.CURTAILED
    if include_guaranteed:  # 5 s since its checkpoint, 1,000 a second: paid by the farm
        (event,) = core.jobs["gold"].sla_events
        assert (event.seconds, event.credit_micros) == (5, 5000)
        legs = [e for e in core.ledger if e.kind == "sla_credit"]
        assert {(e.account, e.amount_micros) for e in legs} == {
            ("client:c", 5000),
            ("farm:fa", -5000),
        }
    else:
        assert core.jobs["gold"].state == JobState.RUNNING
    assert core.reliability(core.workers["wa"], T0 + 10) == reliability
    assert ledger_problems(core.ledger, charges_of(core.jobs.values())) == []
    run(core, SchedulePass(T0 + 11))
    assert placed_on(core, "spot") is None  # nowhere else to go, and not here


def test_cancel_ends_a_window_and_a_second_cancel_fails():
    core = fleet()
    run(core, CurtailmentScheduled(T0, window(T0, T0 + H)))
    assert core.active_curtailment("fa", T0 + 1) is not None
    cmds = run(core, CurtailmentCancelled(T0 + 5, "c1"))
    assert SendCurtail("wa", False) in cmds
    assert core.curtailment("c1").state(T0 + 5) == "CANCELLED"
    assert core.active_curtailment("fa", T0 + 6) is None
    with pytest.raises(FailedPrecondition):
        core.handle(CurtailmentCancelled(T0 + 6, "c1"))
    with pytest.raises(NotFound):
        core.handle(CurtailmentCancelled(T0 + 6, "nope"))
    assert [w.curtailment_id for w in core.curtailments("fa", T0 + 6)] == []
    assert [w.curtailment_id for w in core.curtailments("fa", T0 + 6, True)] == ["c1"]


def test_a_restored_core_keeps_its_windows_and_stops_what_still_runs():
    core = BrokerCore(lease_ttl_s=1e9)
    run(core, WorkerRegistered(T0, "wa", "fa", "rig-a", "1", gpus(1)))
    running(core, "spot", Tier.SPOT, T0)
    state = StoredState(
        farms=(),
        workers=tuple(core.workers.values()),
        jobs=tuple(core.jobs.values()),
        ledger=tuple(core.ledger),
        curtailments=(window(T0 + 5, T0 + H),),  # began while the broker was down
    )
    again = BrokerCore(lease_ttl_s=1e9)
    again.restore(state, T0 + 10)
    assert again.active_curtailment("fa", T0 + 10) is not None
    cmds = run(again, Tick(T0 + 10))
    assert Cancel in {type(c) for c in cmds}
    assert SendCurtail("wa", True, T0 + H, "grid") in cmds
    assert again.jobs["spot"].state == JobState.PENDING


# --- earnings ---------------------------------------------------------------------------------


def test_earnings_show_curtailed_time_energy_not_drawn_and_demand_response():
    from broker.earnings import earnings
    from broker.economics import FarmTerms
    from broker.events import AttemptFinished, FarmConfigured

    core = BrokerCore(lease_ttl_s=1e9)
    run(core, FarmConfigured(T0, FarmTerms("fa", demand_response_micros_per_mwh=50_000_000)))
    run(core, WorkerRegistered(T0, "wa", "fa", "rig-a", "1", gpus(2)))
    run(core, JobSubmitted(T0, "j", "c", spec()))
    run(core, SchedulePass(T0))
    run(core, AttemptStarted(T0, "wa", "j", 1, 1))
    # 100 s at 300 W metered: the RTX 3090's average AI draw here; it idles at 25 W.
    run(core, AttemptFinished(T0 + 100, "wa", "j", 1, 2, 0, energy_joules=30_000))
    run(core, CurtailmentScheduled(T0 + 100, window(T0 + 200, T0 + 200 + H)))
    run(core, Tick(T0 + 200))
    (row,) = earnings(core, farm_id="fa", now=T0 + 200 + 1800)  # half the window so far
    assert row.curtailed.gpu_milliseconds == 2 * 1800 * 1000
    assert row.curtailed.energy_joules == 2 * (300 - 25) * 1800  # 990,000 J
    # 990,000 J = 0.000275 MWh at $50/MWh = 13,750 micro-dollars
    assert row.curtailed.demand_response_micros == 13_750
    assert row.revenue_micros > 0  # the client ledger holds no demand-response line
    assert not [e for e in core.ledger if "demand" in e.kind]


def test_the_pass_index_leaves_out_farms_with_a_window_on_or_coming():
    """A pass's index holds only farms without a window: a farm with one coming sits in
    an index of its own, one with a window on in none (no per-pass cost for them)."""
    core = fleet()
    assert "wa" in core._caps.fleet and "wb" in core._caps.fleet
    run(core, CurtailmentScheduled(T0, window(T0 + H, T0 + 2 * H)))
    assert "wa" not in core._caps.fleet and "wb" in core._caps.fleet
    assert "wa" in core._side["fa"]
    run(core, Tick(T0 + H))
    assert "wa" not in core._caps.fleet and "fa" not in core._side
    assert "wa" not in core._caps.of
    run(core, Tick(T0 + 2 * H))
    assert "wa" in core._caps.fleet and not core._side


def test_farm_earnings_print_curtailment_as_its_own_lines():
    from client.cli.farm_curtail import curtailed_lines, parse_duration
    from rigshift.v1 import farm_service_pb2 as fs

    rows = [
        fs.EarningsRow(key="farms/a", farm="farms/a", farm_display_name="alpha",
                       curtailed_gpu_milliseconds=7_200_000, curtailed_energy_joules=1_980_000,
                       demand_response_micros=27_500),
        fs.EarningsRow(key="farms/b", farm="farms/b", farm_display_name="beta"),
    ]  # fmt: skip
    assert curtailed_lines(rows) == [
        "curtailed alpha: 2.000 GPU-hours, 0.550000 kWh not drawn, demand response $0.027500"
    ]
    assert [parse_duration(t) for t in ("10m", "3h", "2h30m", "90", "1d")] == [
        600,
        10800,
        9000,
        90,
        86400,
    ]
    with pytest.raises(ValueError):
        parse_duration("soon")
