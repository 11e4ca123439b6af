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


class HealthNvml(FakeNvml):
    """FakeNvml with the health calls: XID events, ECC, retired pages, thresholds."""

    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    nvmlEventTypeXidCriticalError = 8

    def __init__(self) -> None:
        super().__init__()
        self.events: list[SimpleNamespace] = []
        self.registered: list[int] = []
        self.dbe = [0, None]  # GPU 1: ECC not supported
        self.pending = [0, 0]
        self.lost: set[int] = set()
        self.waits: list[int] = []

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlDeviceRegisterEvents(self, h: int, types: int, event_set: str) -> None:
        assert types == self.nvmlEventTypeXidCriticalError and event_set == "set"
        self.registered.append(h)

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        self.waits.append(timeout_ms)
        if not self.events:
            raise NVMLError(self.NVML_ERROR_TIMEOUT)
        return self.events.pop(0)

    def nvmlDeviceGetIndex(self, h: int) -> int:
        return h

    def _check(self, h: int) -> None:
        if h in self.lost:
            raise NVMLError(self.NVML_ERROR_GPU_IS_LOST)

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        assert (kind, counter) == (1, 0)
        self._check(h)
        if self.dbe[h] is None:
            raise NVMLError(3)
        return self.dbe[h]  # type: ignore[return-value]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int:
        return self.pending[h]

    def nvmlDeviceGetTemperatureThreshold(self, h: int, which: int) -> int:
        assert which == self.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        if h == 1:
            raise NVMLError(3)
        return 83


def readings(backend: NvmlBackend, index: int) -> list[tuple[str, float, object]]:
    out = []
    for o in backend.health(index):
        extra = o.threshold if o.kind == "temperature" else o.present
        out.append((str(o.kind), o.value, extra))
    return out


def test_health_reads_events_ecc_pages_temperature_and_power() -> None:
    fake = HealthNvml()
    backend = NvmlBackend(nvml=fake)
    assert readings(backend, 0) == [("temperature", 61.0, 83.0), ("power", 0.0, True)]
    assert fake.registered == [0, 1] and set(fake.waits) == {0}  # timeout 0: never blocks
    # an XID on GPU 1 waits in the shared set until GPU 1 is read
    fake.events += [
        SimpleNamespace(device=1, eventData=79),
        SimpleNamespace(device=0, eventData=13),
    ]
    fake.dbe[0] = 2
    fake.pending[0] = 1
    assert readings(backend, 0) == [
        ("xid", 13.0, True),
        ("ecc-dbe", 2.0, True),
        ("retired-pages-pending", 0.0, True),
        ("temperature", 61.0, 83.0),
        ("power", 0.0, True),
    ]
    # no threshold reported (NOT_SUPPORTED) and no ECC: not reported, not an error
    assert readings(backend, 1) == [
        ("xid", 79.0, True),
        ("temperature", 48.0, None),
        ("power", 0.0, True),
    ]
    fake.pending[0] = 0
    assert [k for k, _, _ in readings(backend, 0)] == ["temperature", "power"]  # ECC: new only
    fake.dbe[0] = 3
    assert readings(backend, 0)[0] == ("ecc-dbe", 1.0, True)


def test_a_lost_gpu_reads_as_lost_and_power_silence_is_seen() -> None:
    fake = HealthNvml()
    backend = NvmlBackend(nvml=fake)
    fake.lost.add(0)
    assert [str(o.kind) for o in backend.health(0)] == ["lost"]

    def no_power(h: int) -> int:
        raise NVMLError(999)

    fake.nvmlDeviceGetPowerUsage = no_power  # type: ignore[method-assign]
    assert [(str(o.kind), o.present) for o in backend.health(1)][-1] == ("power", False)


def test_a_driver_without_events_still_reads_the_rest() -> None:
    fake = HealthNvml()

    def unsupported(*args: object) -> None:
        raise NVMLError(3)

    fake.nvmlDeviceRegisterEvents = unsupported  # type: ignore[method-assign]
    fake.nvmlEventSetCreate = unsupported  # type: ignore[method-assign,assignment]
    backend = NvmlBackend(nvml=fake)
    assert [str(o.kind) for o in backend.health(0)] == ["temperature", "power"]
    assert backend.gpus()[0].pcie_generation == 3 and backend.gpus()[1].pcie_generation == 0
