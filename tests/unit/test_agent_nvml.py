"""The NVML backend against a fake driver module (no GPU machine was available)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker_agent.energy import EnergyMeter
from worker_agent.gpu import NvmlBackend, open_backend


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class FakeNvml:
    """The part of pynvml the backend calls, with two GPUs; GPU 1 has no energy counter."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.initialised = False
        self.energy_mj = [5_000_000, None]
        self.power_mw = [250_000, 180_000]

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes | str:
        return [b"NVIDIA GeForce RTX 3090", "NVIDIA RTX A4000"][h]

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-0000-{h}"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=[24 << 30, 16 << 30][h])

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        return [350_000, 140_000][h]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return [1, 16][h]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        if h == 1:
            raise NVMLError(3)
        return 3

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if self.energy_mj[h] is None:
            raise NVMLError(3)
        return self.energy_mj[h]

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self.power_mw[h]

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return [61, 48][h]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=[97, 0][h], memory=40)


def test_discovery_and_telemetry() -> None:
    fake = FakeNvml()
    backend = NvmlBackend(nvml=fake)
    gpus = backend.gpus()
    assert [(g.model, g.vram_mb, g.power_limit_watts, g.pcie_link_width) for g in gpus] == [
        ("RTX 3090", 24_576, 350, 1),
        ("A4000", 16_384, 140, 16),
    ]
    assert gpus[0].uuid == "GPU-0000-0"
    assert gpus[0].default_price_micros_per_gpu_hour > 0  # known model: table default
    t0 = backend.telemetry(0)
    assert (t0.power_watts, t0.energy_millijoules, t0.temperature_celsius) == (250.0, 5_000_000, 61)
    assert (t0.utilization_ratio, t0.pcie_generation, t0.pcie_link_width) == (0.97, 3, 1)
    t1 = backend.telemetry(1)
    assert t1.energy_millijoules is None and t1.pcie_generation is None  # NOT_SUPPORTED → None
    backend.close()
    assert not fake.initialised


def test_energy_meter_uses_the_counter_or_samples_power() -> None:
    fake = FakeNvml()
    t = [0.0]
    backend = NvmlBackend(nvml=fake)
    meter = EnergyMeter(backend, clock=lambda: t[0])
    assert meter.software_counted == {1}
    meter.start(("jobs/a", 1), [0, 1])
    fake.energy_mj[0] += 2_500_000  # 2500 J on the hardware counter
    for _ in range(10):
        t[0] += 1.0
        meter.sample()  # 180 W for 10 s = 1800 J integrated
    assert meter.stop(("jobs/a", 1)) == 2500 + 1800


def test_other_nvml_errors_are_raised() -> None:
    fake = FakeNvml()
    backend = NvmlBackend(nvml=fake)

    def broken(h: int) -> int:
        raise NVMLError(999)  # e.g. GPU_IS_LOST: not something to hide

    fake.nvmlDeviceGetPowerUsage = broken  # type: ignore[method-assign]
    with pytest.raises(NVMLError):
        backend.power_watts(0)


def test_no_driver_falls_back_to_simulation(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoDriver:
        def __init__(self) -> None:
            raise NVMLError(9)  # NVML_ERROR_DRIVER_NOT_LOADED

    monkeypatch.setattr("worker_agent.gpu.NvmlBackend", NoDriver)
    caplog.set_level("INFO")
    backend = open_backend("", seed="x")
    assert backend.name == "simulated"
    assert "no NVIDIA driver found" in caplog.text and "RTX3060x2" in caplog.text


def test_simulate_spec_wins(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    backend = open_backend("RTX3090x4", seed="x")
    assert backend.name == "simulated" and len(backend.gpus()) == 4
    assert "simulating GPUs RTX3090x4" in caplog.text
