"""The simulated GPU backend: SPEC parsing, the power model (its table: test_shared_catalogue)."""

from __future__ import annotations

import math

import pytest

from harness.agent_fixtures import FakeClock, numeric_integral_j
from worker_agent.gpu import GpuBackend, Load, SimulatedBackend, parse_spec


@pytest.mark.parametrize(
    ("spec", "models"),
    [
        ("RTX3090x4", ["RTX 3090"] * 4),
        ("RTX3080x6,RTX3060x2", ["RTX 3080"] * 6 + ["RTX 3060"] * 2),
        ("rtx3060tix1, RX6800XTx2", ["RTX 3060 Ti", "RX 6800 XT", "RX 6800 XT"]),
        ("A4000", ["A4000"]),
        ("CMP90HXx3", ["CMP 90HX"] * 3),
    ],
)
def test_parse_spec(spec: str, models: list[str]) -> None:
    assert [m.name for m in parse_spec(spec)] == models


@pytest.mark.parametrize("spec", ["", "GTX1080x2", "RTX3090x0", "RTX3090x65", ","])
def test_parse_spec_refuses(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_discovery() -> None:
    backend = SimulatedBackend("RTX3080x2,RTX3060", seed="rig-a")
    assert isinstance(backend, GpuBackend)
    gpus = backend.gpus()
    assert [g.index for g in gpus] == [0, 1, 2]
    assert [g.model for g in gpus] == ["RTX 3080", "RTX 3080", "RTX 3060"]
    assert gpus[0].vram_mb == 10_240 and gpus[0].power_limit_watts == 320
    assert len({g.uuid for g in gpus}) == 3 and all(g.uuid.startswith("SIM-") for g in gpus)
    other = SimulatedBackend("RTX3080x2,RTX3060", seed="rig-b")
    assert {g.uuid for g in gpus}.isdisjoint(g.uuid for g in other.gpus())
    again = SimulatedBackend("RTX3080x2,RTX3060", seed="rig-a")
    assert [g.uuid for g in again.gpus()] == [g.uuid for g in gpus]  # stable per rig


def test_power_follows_load() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x2", clock=clock)
    assert backend.power_watts(0) == 25.0  # idle watts of an RTX 3090
    backend.set_load([0], Load.TRAINING)
    for _ in range(50):
        clock.advance(0.37)
        watts = backend.power_watts(0)
        # 25 + 325 * (0.90 ± 0.06): between 298.0 and 337.0 W
        assert 298.0 - 1e-9 <= watts <= 337.0 + 1e-9
        assert backend.power_watts(1) == 25.0  # the other GPU stays idle
    telemetry = backend.telemetry(0)
    assert telemetry.utilization_ratio is not None and telemetry.utilization_ratio > 0.8
    assert telemetry.pcie_link_width == 1
    backend.set_load([0], Load.IDLE)
    assert backend.power_watts(0) == 25.0


def test_energy_counter_is_the_integral_of_the_power_model() -> None:
    clock = FakeClock(50.0)
    backend = SimulatedBackend("RTX3080", clock=clock)
    start_mj = backend.energy_millijoules(0)
    clock.advance(10.0)  # idle 10 s at 20 W = 200 J
    idle_mj = backend.energy_millijoules(0) - start_mj
    assert idle_mj == 200_000
    backend.set_load([0], Load.TRAINING)
    t0 = clock()
    for _ in range(13):  # read it at odd moments: reading must not change the total
        clock.advance(1.7)
        backend.energy_millijoules(0)
    expected_j = numeric_integral_j(backend, 0, Load.TRAINING, t0, clock())
    got_j = (backend.energy_millijoules(0) - start_mj - idle_mj) / 1000
    assert math.isclose(got_j, expected_j, rel_tol=1e-4)
    # 22.1 s at about 20 + 300 * 0.9 = 290 W is about 6.4 kJ
    assert 5_900 < got_j < 6_900
