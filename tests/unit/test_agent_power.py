"""Power limits on the rig (issue 16): the simulated model under a cap, the sweep's curve,
NVML's set_power_limit against a fake driver, the PowerLimits shell, curtailment of the
miners, the gauges."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
from test_agent_nvml import FakeNvml, NVMLError

from harness.agent_fixtures import FakeClock
from rigshift.power import SWEEP_SHARES_PERCENT, PowerPoint, choose_limit
from rigshift.scoring import Measurement
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent import selftest
from worker_agent.config import MiningConfig
from worker_agent.energy import EnergyMeter
from worker_agent.gpu import GpuInfo, Load, NvmlBackend, SimulatedBackend
from worker_agent.metrics import AgentMetrics, AgentSnapshot, GpuReading
from worker_agent.mining import GpuState, MiningSupervisor
from worker_agent.power import PowerLimits, simulated_curve, sweep_limits
from worker_agent.power_draw import capped_wave
from worker_agent.selftest_torch import parse_limits

# RTX 3090: board 350 W, idle 25 W; training mean 25 + 325 * 0.90 = 317.5 W, swing ±19.5 W.
MEAN, AMP = 317.5, 19.5


# --- the simulated model under a cap --------------------------------------------------


@pytest.mark.parametrize(
    ("cap", "mean", "amp"),
    [
        (0, MEAN, AMP),  # no cap
        (350, MEAN, AMP),  # the board limit: the curve peaks at 337 W, under it
        (337, MEAN, AMP),  # exactly the peak: unchanged
        (320, MEAN, 2.5),  # between mean and peak: the swing squeezed under the cap
        (317.5, 317.5, 0.0),  # at the mean: flat
        (200, 200.0, 0.0),  # under the trough (298 W): flat at the cap
    ],
)
def test_capped_wave(cap: float, mean: float, amp: float) -> None:
    got = capped_wave(MEAN, AMP, cap)
    assert got == pytest.approx((mean, amp))
    assert got[0] + got[1] <= (cap or math.inf) + 1e-9  # never above the cap


@pytest.mark.parametrize(("cap", "watts"), [(0, MEAN), (350, MEAN), (320, MEAN), (200, 200.0)])
def test_simulated_training_energy_under_a_cap_is_exact(cap: int, watts: float) -> None:
    """Over whole periods of the 7 s wave the energy is the mean draw times the time,
    min(317.5 W, cap): exactly, and the draw never exceeds the cap."""
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090", clock=clock)
    assert backend.set_power_limit(0, cap)
    backend.set_load([0], Load.TRAINING)
    e0 = backend.energy_millijoules(0)
    peak = 0.0
    for _ in range(70):  # 10 periods, sampled every 1 s
        clock.advance(1.0)
        peak = max(peak, backend.power_watts(0))
    assert backend.energy_millijoules(0) - e0 == pytest.approx(watts * 70 * 1000, abs=2)
    if cap:
        assert peak <= cap + 1e-9
    assert backend.power_limit(0) == (cap if 0 < cap < 350 else 350)


def test_a_cap_set_mid_run_books_the_energy_before_it_first() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090", clock=clock)
    backend.set_load([0], Load.TRAINING)
    clock.advance(7.0)
    backend.set_power_limit(0, 200)
    clock.advance(7.0)
    backend.set_power_limit(0, 0)  # lifted: the uncapped wave again
    clock.advance(7.0)
    expected = (MEAN * 7 + 200 * 7 + MEAN * 7) * 1000
    assert backend.energy_millijoules(0) == pytest.approx(expected, abs=2)


# --- the sweep ------------------------------------------------------------------------


def test_sweep_limits_are_shares_of_the_board_within_the_constraints() -> None:
    assert sweep_limits(350) == [175, 210, 245, 280, 315, 350]
    assert len(SWEEP_SHARES_PERCENT) == 6
    # a card whose floor is 200 W and ceiling 300 W: clamped, duplicates dropped
    assert sweep_limits(350, 200, 300) == [200, 210, 245, 280, 300]


def test_simulated_sweep_is_monotone_and_the_3090_is_capped_at_245_w_for_10_percent() -> None:
    figures = asyncio.run(
        selftest.measure_rig(SimulatedBackend("RTX3090x2", seed="s"), Path("/nonexistent/x"))
    )
    assert figures.power_settable == {0: True, 1: True}
    for index in (0, 1):
        curve = figures.power_curves[index]
        assert [p.limit_watts for p in curve] == [175, 210, 245, 280, 315, 350]
        gflops = [p.fp16_gflops for p in curve]
        draws = [p.draw_watts for p in curve]
        assert gflops == sorted(gflops) and len(set(gflops)) == 6  # strictly rising
        assert draws == [175, 210, 245, 280, 315, 317]  # min(317.5 W uncapped, limit)
        assert curve[-1].fp16_gflops == figures.gpus[index].fp16_gflops
        # f = 0.7: 1 - 0.9 * 0.09 = 91.9 % >= 90 %; f = 0.6: 85.6 % < 90 %
        assert choose_limit(curve, 10) == 245
        assert choose_limit(curve, 5) == 280  # 96.4 %
        assert choose_limit(curve, 0) == 350


def test_fill_gpu_infos_puts_the_curve_on_the_registration() -> None:
    curve = simulated_curve(350, 25, 70_000)
    figures = selftest.RigFigures(
        {0: Measurement(fp16_gflops=70_000)},
        {0: 4},
        selftest.HostFigures(1, 1, 1),
        power_curves={0: curve},
        power_settable={0: True},
    )
    (info,) = selftest.fill_gpu_infos([ws.GpuInfo(index=0)], figures)
    assert info.power_limit_settable
    assert [(p.limit_watts, p.draw_watts) for p in info.power_curve] == [
        (p.limit_watts, p.draw_watts) for p in curve
    ]


def test_torch_line_carries_the_curve_and_limits_parse() -> None:
    assert parse_limits(["0:210,175,175", "3:85"]) == {0: [175, 210], 3: [85]}
    with pytest.raises(ValueError):
        parse_limits(["175,210"])
    curves: dict[int, list[PowerPoint]] = {}
    line = '{"gpu": 0, "fp16_gflops": 70000, "power_curve": [[175, 50000, 170], [350, 70000, 320]]}'
    parsed = selftest.parse_torch_line(line, now=1.0, expected_uuid={}, curves=curves)
    assert parsed is not None and parsed[1].fp16_gflops == 70000
    assert curves == {0: [PowerPoint(175, 50000, 170), PowerPoint(350, 70000, 320)]}


# --- NVML: set_power_limit against a fake driver --------------------------------------


class LimitNvml(FakeNvml):
    """The fake driver, with power limits: GPU 0 settable within [100, 400] W; GPU 1's
    limit needs root (NO_PERMISSION)."""

    NVML_ERROR_NO_PERMISSION = 4

    def __init__(self) -> None:
        super().__init__()
        self.limit_mw = [350_000, 140_000]
        self.sets: list[tuple[int, int]] = []

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        return self.limit_mw[h]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: int) -> tuple[int, int]:
        return [(100_000, 400_000), (70_000, 140_000)][h]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: int) -> int:
        return [350_000, 140_000][h]

    def nvmlDeviceSetPowerManagementLimit(self, h: int, mw: int) -> None:
        if h == 1:
            raise NVMLError(self.NVML_ERROR_NO_PERMISSION)
        self.sets.append((h, mw))
        self.limit_mw[h] = mw


def test_nvml_set_power_limit_clamps_and_refuses_without_permission() -> None:
    fake = LimitNvml()
    backend = NvmlBackend(nvml=fake)
    assert backend.set_power_limit(0, 245)
    assert backend.set_power_limit(0, 50)  # under the card's floor: clamped to 100 W
    assert fake.sets == [(0, 245_000), (0, 100_000)]
    assert backend.set_power_limit(1, 100) is False  # not root
    assert backend.power_limit_range(0) == (100, 400, 350)


def test_nvml_other_errors_are_raised() -> None:
    fake = LimitNvml()
    backend = NvmlBackend(nvml=fake)

    def lost(h: int, mw: int) -> None:
        raise NVMLError(15)  # GPU_IS_LOST: not a permission question

    fake.nvmlDeviceSetPowerManagementLimit = lost  # type: ignore[method-assign]
    with pytest.raises(NVMLError):
        backend.set_power_limit(0, 200)


def test_power_limits_apply_and_restore_and_say_a_refusal_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = LimitNvml()
    power = PowerLimits(NvmlBackend(nvml=fake))
    assert power.operator == {0: 350, 1: 140}
    caplog.set_level(logging.WARNING, "rigshift.agent.power")
    assert power.probe() == {0: True, 1: False}
    power.attempt_started(("jobs/a", 1), [0, 1], 245)
    assert fake.limit_mw[0] == 245_000 and power.current == {0: 245, 1: 140}
    power.attempt_ended(("jobs/a", 1))
    assert fake.limit_mw[0] == 350_000 and power.current[0] == 350
    power.attempt_started(("jobs/b", 1), [1], 100)  # refused before: not tried again
    refusals = [r for r in caplog.records if "may not set its power limit" in r.message]
    assert len(refusals) == 1 and "GPU 1" in refusals[0].message
    assert not power.settable(1) and power.settable(0)
    power.apply([0], 0)  # 0: leave the operator's limit
    assert fake.limit_mw[0] == 350_000


def test_the_sweep_restores_the_operators_limit_when_the_benchmark_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The NVML sweep runs in selftest_torch.py; whatever happens to it (here it raises
    after setting 175 W), the agent puts the operator's limit back (finally)."""
    fake = LimitNvml()
    backend = NvmlBackend(nvml=fake)
    seen: dict[str, Any] = {}

    async def failing(backend: Any, indices: Any, **kw: Any) -> dict[int, Measurement]:
        seen["limits"] = kw["limits"]
        backend.set_power_limit(0, 175)
        raise RuntimeError("killed at the budget")

    monkeypatch.setattr(selftest, "measure_gpus", failing)
    monkeypatch.setattr(selftest, "measure_host", lambda d: selftest.HostFigures(1, 1, 1))
    with pytest.raises(RuntimeError):
        asyncio.run(selftest.measure_rig(backend, Path("/nonexistent/x")))
    assert seen["limits"] == {0: [175, 210, 245, 280, 315, 350]}  # GPU 1 is not settable
    assert fake.limit_mw[0] == 350_000


# --- curtailment: no miner ------------------------------------------------------------


def test_curtailment_keeps_idle_gpus_from_mining_until_it_ends(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3060", clock=clock)
    sup = MiningSupervisor(
        MiningConfig(command=("miner",), revenue_micros_per_kwh=900_000, min_dwell_s=1),
        backend,
        EnergyMeter(backend, clock=clock),
        asks_micros_per_gpu_hour={0: 90_000},
        state_dir=tmp_path,
        clock=clock,
    )
    sup.curtail(True, 0.0, "grid event")
    assert sup.curtailed()
    for _ in range(3):  # mining pays more, but no miner starts (none would: no process)
        clock.advance(10.0)
        sup.tick(set())
        assert sup.state(0) == GpuState.IDLE and not sup.held_by_miners()
    sup.curtail(False)
    assert not sup.curtailed()
    # a window with an end time: over once the clock passes it
    sup.curtail(True, time.time() + 30.0)
    assert sup.curtailed()
    clock.advance(31.0)
    assert not sup.curtailed()
    sup.curtail(True, time.time() - 1.0)  # already over when it arrives
    assert not sup.curtailed()


def test_gauges_show_the_power_limit_and_curtailment() -> None:
    info = GpuInfo(0, "SIM-0", "RTX 3090", 24576, 350, 1)
    snap = AgentSnapshot.build(
        [info],
        {0: GpuReading(200.0, 1.0)},
        ai={0},
        mining=set(),
        asks={},
        jobs_running=1,
        power_limits={0: 245},
        curtailed=True,
    )
    metrics = AgentMetrics(lambda: snap)
    labels = {"gpu": "0", "gpu_model": "RTX 3090"}
    assert metrics.registry.get_sample_value("rigshift_gpu_power_limit_watts", labels) == 245
    assert metrics.registry.get_sample_value("rigshift_agent_curtailed") == 1.0


def test_an_agent_that_died_capped_puts_the_operators_limit_back_at_its_next_start(
    tmp_path: Path,
) -> None:
    fake = LimitNvml()
    power = PowerLimits(NvmlBackend(nvml=fake), tmp_path)
    power.attempt_started(("jobs/a", 1), [0], 245)
    assert (tmp_path / "power-limits.json").exists()
    # the agent dies here: the card keeps 245 W, which the next start reads as its limit
    again = LimitNvml()
    again.limit_mw[0] = 245_000
    restarted = PowerLimits(NvmlBackend(nvml=again), tmp_path)
    assert restarted.operator[0] == 350
    restarted.probe()
    assert again.limit_mw[0] == 350_000
    assert not (tmp_path / "power-limits.json").exists()  # nothing capped any more


def test_the_torch_sweep_sets_each_limit_and_reads_the_draw() -> None:
    """selftest_torch._sweep with a fake torch and a fake NVML without an energy counter
    (the draw is then the mean of the power readings)."""
    from worker_agent import selftest_torch

    class Tensor:
        def to(self, dtype: object) -> Tensor:
            return self

    class Torch:
        float32, float16 = "f32", "f16"

        def randn(self, *a: object, **k: object) -> Tensor:
            return Tensor()

        def matmul(self, a: Tensor, b: Tensor) -> Tensor:
            return a

    class Power:
        def __init__(self) -> None:
            self.limits: list[int] = []

        def set(self, watts: int) -> None:
            self.limits.append(watts)

        def energy_mj(self) -> None:
            return None

        def power_w(self) -> float:
            return self.limits[-1] * 0.9

    power = Power()
    curve = selftest_torch._sweep(
        Torch(),
        "cpu",
        8,
        [100, 200],
        0.02,
        lambda: None,
        power,  # type: ignore[arg-type]
    )
    assert power.limits == [100, 200]
    assert [(w, d) for w, _, d in curve] == [(100, 90), (200, 180)]
    assert all(g > 0 for _, g, _ in curve)
