"""Power caps at the core (issue 16): the AI limit per GPU, the score at it, the limit an
attempt is assigned, and the energy it saved in earnings.

The curve is the simulated RTX 3090 of ``test_power.py``: at 280 W it keeps 963/1000 of
its throughput and draws 823/1000 of its uncapped draw; at 245 W 918 and 720.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.convert import power_curve_from_pb, power_curve_pb
from broker.core import BrokerCore
from broker.earnings import earnings
from broker.economics import FarmTerms, PowerPolicy
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptStarted,
    FarmConfigured,
    JobSubmitted,
    SchedulePass,
    WorkerRegistered,
)
from broker.gpu_health import ai_limit
from broker.invariants import validate_state
from broker.model import GpuInfo, JobSpec
from rigshift.power import PowerPoint
from rigshift.scoring import Measurement
from rigshift.v1 import farm_pb2

CURVE = tuple(
    PowerPoint(w, f, d)
    for w, f, d in (
        (175, 38_517, 175),
        (210, 42_543, 210),
        (245, 45_674, 245),
        (280, 47_910, 280),
        (315, 49_252, 315),
        (350, 49_700, 340),
    )
)

HEALTHY = Measurement(49_700, 24_920, usable_vram_mb=24_000, h2d_mbps=12_000, d2h_mbps=12_500)
PRICE = 3_600_000
# 0.10 USD per kWh, PUE 1.0
EFFICIENT5 = FarmTerms("f", 100_000, power_policy=PowerPolicy.EFFICIENT, max_slowdown_percent=5)


def gpus(n: int = 2, settable: bool = True, curve=CURVE) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(
            i, f"u{i}", "RTX 3090", 24576, 350, PRICE, measurement=HEALTHY,
            power_curve=curve, power_limit_settable=settable,
        )
        for i in range(n)
    )  # fmt: skip


def run(core: BrokerCore, event) -> list:
    cmds = core.handle(event)
    validate_state(core)
    return cmds


def registered(terms: FarmTerms | None, infos=None) -> BrokerCore:
    c = BrokerCore()
    if terms is not None:
        run(c, FarmConfigured(0.0, terms))
    run(c, WorkerRegistered(0.0, "w1", "f", "rig", "1", infos or gpus()))
    return c


@pytest.mark.parametrize(
    ("terms", "settable", "curve", "limit"),
    [
        (None, True, CURVE, 0),  # no terms: MAX
        (FarmTerms("f"), True, CURVE, 0),  # MAX
        (EFFICIENT5, True, CURVE, 280),
        (replace(EFFICIENT5, max_slowdown_percent=10), True, CURVE, 245),
        (replace(EFFICIENT5, max_slowdown_percent=20), True, CURVE, 210),
        (replace(EFFICIENT5, max_slowdown_percent=0), True, CURVE, 0),  # the top: no cap
        (EFFICIENT5, False, CURVE, 0),  # the agent may not set it
        (EFFICIENT5, True, (), 0),  # not swept
    ],
)
def test_ai_limit(terms, settable, curve, limit):
    (info,) = gpus(1, settable, curve)
    assert ai_limit(info, terms) == limit


def test_the_board_limit_bounds_the_cap():
    (info,) = gpus(1)
    # the operator runs it at 250 W already: a 280 W cap would raise it, so none
    assert ai_limit(replace(info, power_limit_watts=250), EFFICIENT5) == 0


def test_registration_sets_the_ai_limit_and_the_score_at_it():
    c = registered(EFFICIENT5)
    for gpu in c.workers["w1"].gpus.values():
        assert gpu.ai_power_limit_watts == 280
        assert gpu.verdict.score == 96  # 100 x 963 // 1000
        assert gpu.verdict.verification.value == "VERIFIED"  # judged uncapped
    assert registered(FarmTerms("f")).workers["w1"].gpus[0].verdict.score == 100


def test_a_new_policy_recomputes_every_gpu_and_a_running_attempt_keeps_its_limit():
    c = registered(EFFICIENT5)
    run(c, JobSubmitted(0.0, "a", "c", JobSpec(command=("x",))))
    run(c, SchedulePass(0.0))
    run(c, FarmConfigured(1.0, replace(EFFICIENT5, max_slowdown_percent=10)))
    gpus_ = c.workers["w1"].gpus
    assert [g.ai_power_limit_watts for g in gpus_.values()] == [245, 245]
    assert gpus_[0].verdict.score == 91  # 100 x 918 // 1000
    assert c.jobs["a"].attempts[0].power_limit_watts == 280
    run(c, FarmConfigured(2.0, FarmTerms("f", 100_000)))
    assert [(g.ai_power_limit_watts, g.verdict.score) for g in gpus_.values()] == [(0, 100)] * 2


def test_a_min_score_job_is_not_placed_on_gpus_capped_below_it():
    c = registered(replace(EFFICIENT5, max_slowdown_percent=20))  # 210 W: 856 -> score 85
    run(c, JobSubmitted(0.0, "a", "c", JobSpec(command=("x",), min_score=90)))
    run(c, SchedulePass(0.0))
    assert not c.jobs["a"].attempts
    assert c.jobs["a"].pending_reasons[0].resource == "min_score"


def test_the_assignment_carries_the_first_gpus_ai_limit():
    c = registered(EFFICIENT5)
    run(c, JobSubmitted(0.0, "a", "c", JobSpec(command=("x",), gpu_count=2)))
    assigns = [cmd for cmd in run(c, SchedulePass(0.0)) if isinstance(cmd, Assign)]
    assert [(a.gpu_indices, a.power_limit_watts) for a in assigns] == [((0, 1), 280)]
    assert c.jobs["a"].attempts[0].power_limit_watts == 280
    # a Reconcile re-sends it
    assert [a.power_limit_watts for a in c.assignments("w1")] == [280]


def test_uncapped_farms_assign_no_limit():
    c = registered(FarmTerms("f", 100_000))
    run(c, JobSubmitted(0.0, "a", "c", JobSpec(command=("x",))))
    (assign,) = [cmd for cmd in run(c, SchedulePass(0.0)) if isinstance(cmd, Assign)]
    assert assign.power_limit_watts == 0


def finished(terms: FarmTerms, joules: int) -> BrokerCore:
    c = registered(terms)
    run(c, JobSubmitted(0.0, "a", "c", JobSpec(command=("x",), gpu_count=2)))
    run(c, SchedulePass(0.0))
    run(c, AttemptStarted(0.0, "w1", "a", 1, 1))
    run(c, AttemptFinished(3600.0, "w1", "a", 1, 2, exit_code=0, energy_joules=joules))
    return c


def test_earnings_show_the_energy_a_capped_attempt_saved():
    c = finished(EFFICIENT5, 1_646_000)
    (row,) = earnings(c)
    # per GPU 823,000 J at 280 W (draw 823/1000): uncapped 1,000,000 J, saved
    # (823,000 x 177 + 411) // 823 = 177,000 J; x 2 GPUs
    assert row.energy_saved_joules == 354_000
    # 177,000 J = 0.04917 kWh x 0.10 USD = 4,916.7 -> 4,917 micro-dollars per GPU
    assert row.energy_cost_saved_micros == 2 * 4_917
    by_gpu = earnings(c, group_by="gpu")
    assert [r.energy_saved_joules for r in by_gpu] == [177_000, 177_000]


def test_an_uncapped_attempt_saved_nothing():
    (row,) = earnings(finished(FarmTerms("f", 100_000), 2_000_000))
    assert (row.energy_saved_joules, row.energy_cost_saved_micros) == (0, 0)


def test_an_agents_curve_is_cleaned_up():
    msgs = [
        farm_pb2.PowerPoint(limit_watts=300, fp16_gflops=900, draw_watts=290),
        farm_pb2.PowerPoint(limit_watts=0, fp16_gflops=5, draw_watts=5),  # no limit: dropped
        farm_pb2.PowerPoint(limit_watts=200, fp16_gflops=-1, draw_watts=-7),  # figures floored
        farm_pb2.PowerPoint(limit_watts=300, fp16_gflops=950, draw_watts=295),  # the last wins
        farm_pb2.PowerPoint(limit_watts=9000, fp16_gflops=1, draw_watts=1),  # over 5 kW
    ]
    curve = power_curve_from_pb(msgs)
    assert curve == (PowerPoint(200, 0, 0), PowerPoint(300, 950, 295))
    assert [p.limit_watts for p in power_curve_pb(tuple(reversed(curve)))] == [200, 300]
    many = [farm_pb2.PowerPoint(limit_watts=w, fp16_gflops=1, draw_watts=1) for w in range(1, 99)]
    assert len(power_curve_from_pb(many)) == 32
