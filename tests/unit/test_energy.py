"""Energy attribution: joules per attempt equal the integral of the power model within 1 %."""

from __future__ import annotations

import math

from harness.agent_fixtures import CounterlessBackend, FakeClock, numeric_integral_j
from worker_agent.energy import EnergyMeter
from worker_agent.gpu import Load, SimulatedBackend


def test_attempt_energy_is_the_integral_of_its_gpus_power() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x4", clock=clock)
    meter = EnergyMeter(backend, clock=clock)
    clock.advance(5.0)  # idle draw before the attempt is not the attempt's
    key = ("jobs/a", 1)
    backend.set_load([1, 2], Load.TRAINING)
    meter.start(key, [1, 2])
    t0 = clock()
    progress = []
    for _ in range(30):
        clock.advance(0.9)
        progress.append(meter.joules(key))
    assert progress == sorted(progress)  # cumulative
    expected = sum(numeric_integral_j(backend, i, Load.TRAINING, t0, clock()) for i in (1, 2))
    final = meter.stop(key)
    assert isinstance(final, int)
    assert math.isclose(final, expected, rel_tol=0.01)
    assert abs(final - expected) <= 1.0 + 1e-9  # floor of whole joules: within one joule here
    assert meter.joules(key) == 0  # no longer attributed


def test_two_attempts_do_not_share_energy() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3060x2", clock=clock)
    meter = EnergyMeter(backend, clock=clock)
    backend.set_load([0], Load.TRAINING)
    meter.start(("jobs/a", 1), [0])
    meter.start(("jobs/b", 1), [1])  # GPU 1 idles at 13 W
    clock.advance(100.0)
    assert meter.joules(("jobs/b", 1)) == 1300
    assert meter.joules(("jobs/a", 1)) > 10 * meter.joules(("jobs/b", 1))


def test_sampled_power_without_a_counter_is_within_one_percent() -> None:
    clock = FakeClock()
    sim = SimulatedBackend("RTX3080x2", clock=clock)
    backend = CounterlessBackend(sim)
    meter = EnergyMeter(backend, clock=clock)
    assert meter.software_counted == {0, 1}
    key = ("jobs/c", 2)
    backend.set_load([0, 1], Load.TRAINING)
    meter.start(key, [0, 1])
    t0 = clock()
    for _ in range(60):  # the agent samples every energy_sample_interval_s (1 s)
        clock.advance(1.0)
        meter.sample()
    expected = sum(numeric_integral_j(sim, i, Load.TRAINING, t0, clock()) for i in (0, 1))
    assert math.isclose(meter.stop(key), expected, rel_tol=0.01)
