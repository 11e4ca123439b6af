"""GPU discovery and telemetry: an NVML backend for real rigs and a simulated one for the rest.

Both backends answer the same :class:`GpuBackend` protocol::

    GpuBackend
    ├── NvmlBackend        nvidia-ml-py: model, VRAM, UUID, power limit and draw, the
    │                      total-energy counter, temperature, utilisation, PCIe link
    └── SimulatedBackend   GPUs of the catalogue (``rigshift.catalogue``); power follows
                           the load the agent sets: idle watts when free, near the
                           board power while a job trains or the operator's miner runs

:func:`open_backend` picks one: ``--simulate SPEC`` always simulates; without a
SPEC it tries NVML and falls back to :data:`~worker_agent.config.DEFAULT_SIMULATE_SPEC`
with a log line saying that no NVIDIA driver was found.

The simulated power model, per GPU, in watts, with ``t`` in seconds::

    idle:      P(t) = idle_w
    training:  P(t) = idle_w + (board_w - idle_w) * (0.90 + 0.06 * sin(2π t / 7 s + φ))
    mining:    P(t) = idle_w + (board_w - idle_w) * 0.95       (a miner is a flat, steady load)

Under a power cap C (``set_power_limit``) every load is ``mean + amp * sin(...)``
squeezed under C (``worker_agent.power_draw.capped_wave``): the mean becomes min(mean, C)
and the swing at most C minus that mean, so the draw never exceeds C, a cap at or
below the mean is a flat draw at C, and the curve stays a sine: its energy counter
is still the exact integral (closed form), so the simulated rig is metered the same
way a real one is: by differencing a counter.

Health (``GpuBackend.health``, classified by ``health.py``). NVML: critical XID events
(an event set polled with timeout 0, never blocking), new double-bit ECC errors
(volatile uncorrected count; a count already there when the agent starts is reported
once), pending retired pages, NVML_ERROR_GPU_IS_LOST on any read, the temperature
against the slowdown threshold, and whether a power reading comes; NOT_SUPPORTED
reads as "not reported". The simulated backend takes injected faults
(``SimulatedBackend(spec, faults=[Fault(gpu, kind, after_s)])``, the CLI's
``--simulate-fault GPU:KIND:AFTER_S``), striking ``after_s`` seconds after the backend
was created, on its clock::

    xid79, xid48   one XID event (79: fallen off the bus; 48: double-bit ECC); then
                   healthy again: a later probation self-test passes
    ecc-dbe        one new double-bit ECC error; one-off like the XIDs
    overheat       the temperature stays over the slowdown threshold (90 °C simulated)
                   for OVERHEAT_HOLD_S (60 s), then the card cools
    lost           the GPU reads as lost from then on; its self-test fails
                   (``selftest_factor`` 0.0)
    impostor       no health reading changes, but the card measures a third as fast
                   (``selftest_factor`` 1/3): the broker's verification catches it

A SPEC may give the mounting: ``RTX3090x4@x16`` (link width 16, PCIe gen 4) or
``RTX3060x8@x1`` (a riser, gen 1); without it, the catalogue's usual mounting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from rigshift.catalogue import BY_KEY, GpuModel, lookup
from worker_agent.health import Fault, HealthObservation, Observed
from worker_agent.nvml_health import NvmlHealth
from worker_agent.power_draw import capped_wave, nvml_power_range, nvml_set_power_limit

__all__ = [
    "OVERHEAT_HOLD_S",
    "SIM_SLOWDOWN_C",
    "GpuBackend",
    "GpuInfo",
    "GpuTelemetry",
    "Load",
    "NvmlBackend",
    "SimulatedBackend",
    "open_backend",
    "parse_spec",
]

log = logging.getLogger("rigshift.agent.gpu")


class Load:
    """What a GPU is doing, as the agent knows it (the simulated power model follows it)."""

    IDLE = "idle"
    TRAINING = "training"
    MINING = "mining"


_TRAIN_BASE = 0.90
_MINING_RATIO = 0.95
_TRAIN_SWING = 0.06
_TRAIN_PERIOD_S = 7.0

SIM_SLOWDOWN_C = 90.0
"""The simulated GPUs' slowdown temperature threshold."""
OVERHEAT_HOLD_S = 60.0
"""How long a simulated ``overheat`` holds the temperature over the threshold."""
_ONE_OFF = {"xid79": (Observed.XID, 79.0), "xid48": (Observed.XID, 48.0)}
_ONE_OFF["ecc-dbe"] = (Observed.ECC_DBE, 1.0)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """A discovered GPU: what the agent registers with the broker."""

    index: int
    uuid: str
    model: str
    vram_mb: int
    power_limit_watts: int
    pcie_link_width: int
    default_price_micros_per_gpu_hour: int = 0
    pcie_generation: int = 0
    """The PCIe link generation (0: not reported)."""


@dataclass(frozen=True, slots=True)
class GpuTelemetry:
    """One reading of a GPU's sensors; None where the GPU does not report it."""

    index: int
    power_watts: float
    energy_millijoules: int | None
    temperature_celsius: float | None
    utilization_ratio: float | None
    pcie_generation: int | None
    pcie_link_width: int | None


@runtime_checkable
class GpuBackend(Protocol):
    """What the agent needs from a GPU source."""

    name: str
    """``nvml`` or ``simulated``: for logs and metrics."""

    def gpus(self) -> list[GpuInfo]:
        """The rig's GPUs, ordered by index."""
        ...

    def energy_millijoules(self, index: int) -> int | None:
        """The GPU's total-energy counter in mJ, or None when it has none."""
        ...

    def power_watts(self, index: int) -> float:
        """Current draw in watts."""
        ...

    def telemetry(self, index: int) -> GpuTelemetry:
        """All sensors at once."""
        ...

    def set_load(self, indices: list[int], load: str) -> None:
        """Tell the backend what the GPUs do now (drives the simulated power model)."""
        ...

    def health(self, index: int) -> list[HealthObservation]:
        """What the GPU shows now: events since the last call and current readings."""
        ...

    def set_power_limit(self, index: int, watts: int) -> bool:
        """Set the GPU's power limit (clamped to what the card allows); False when the
        agent may not (not root) or the card cannot (the caller runs uncapped)."""
        ...

    def close(self) -> None:
        """Release the driver."""
        ...


def parse_spec(spec: str) -> list[GpuModel]:
    """Expand ``RTX3080x6,RTX3060x2`` into one :class:`GpuModel` per GPU, in order.

    Model names are matched without spaces and case (``rtx3060ti``, ``RX6800XT``,
    ``CMP90HX``); ``xN`` is the count and may be left out for one GPU; ``@xW`` sets
    the PCIe link width (``RTX3090x4@x16``, ``RTX3060x8@x1``), else the catalogue's.
    """
    out: list[GpuModel] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        compact = part.replace(" ", "").upper()
        width = 0
        if "@" in compact:
            compact, _, mount = compact.partition("@")
            w = re.fullmatch(r"X?(\d+)", mount)
            if w is None or int(w.group(1)) not in (1, 2, 4, 8, 16):
                raise ValueError(f"mounting must be @x1, @x2, @x4, @x8 or @x16 in {part!r}")
            width = int(w.group(1))
        m = re.fullmatch(r"(.+)X(\d+)", compact)
        if compact in BY_KEY or m is None:  # "RTX3080" is one GPU, not "RT" x 3080
            name, count = compact, 1
        else:
            name, count = m.group(1), int(m.group(2))
        if name not in BY_KEY:
            known = ", ".join(sorted(BY_KEY))
            raise ValueError(f"unknown GPU model {name!r} in {spec!r}; known: {known}")
        if not 1 <= count <= 64:
            raise ValueError(f"GPU count must be 1-64 in {part!r}")
        model = BY_KEY[name]
        if width:
            model = dataclasses.replace(model, pcie_link_width=width)
        out.extend([model] * count)
    if not out:
        raise ValueError(f"empty GPU spec {spec!r}; e.g. RTX3090x4 or RTX3080x6,RTX3060x2")
    if len(out) > 64:
        raise ValueError(f"at most 64 GPUs per rig, {spec!r} has {len(out)}")
    return out


class SimulatedBackend:
    """GPUs from the catalogue whose power follows the load the agent sets.

    ``clock`` is injectable (monotonic seconds) so tests can integrate exactly;
    ``faults`` strike on that clock (see the module docstring).
    """

    name = "simulated"

    def __init__(
        self,
        spec: str,
        *,
        seed: str = "",
        clock: Callable[[], float] = time.monotonic,
        faults: list[Fault] | tuple[Fault, ...] = (),
    ) -> None:
        self._clock = clock
        self._models = parse_spec(spec)
        for fault in faults:
            if fault.gpu >= len(self._models):
                raise ValueError(
                    f"fault on GPU {fault.gpu}, but the rig has {len(self._models)} GPU(s)"
                )
        self._faults = tuple(faults)
        self._fired: set[int] = set()  # the one-off faults already observed
        self._infos = [
            GpuInfo(
                index=i,
                uuid=_sim_uuid(seed or spec, i),
                model=m.name,
                vram_mb=m.vram_mb,
                power_limit_watts=m.board_power_w,
                pcie_link_width=m.pcie_link_width,
                default_price_micros_per_gpu_hour=m.default_price_micros_per_gpu_hour,
                pcie_generation=_sim_generation(m.pcie_link_width),
            )
            for i, m in enumerate(self._models)
        ]
        now = clock()
        self._started = now
        self._load = [Load.IDLE] * len(self._models)
        self._since = [now] * len(self._models)
        self._energy_mj = [0.0] * len(self._models)
        self._phase = [2 * math.pi * i / 5 for i in range(len(self._models))]
        self._cap = [0] * len(self._models)  # 0: the board limit (no cap)

    def gpus(self) -> list[GpuInfo]:
        """The simulated GPUs."""
        return list(self._infos)

    def _wave(self, index: int, load: str) -> tuple[float, float]:
        """(mean, amplitude) of the load's sine in watts, squeezed under the GPU's cap."""
        m = self._models[index]
        span = m.board_power_w - m.idle_w
        if load == Load.IDLE:
            mean, amp = float(m.idle_w), 0.0
        elif load == Load.MINING:
            mean, amp = m.idle_w + span * _MINING_RATIO, 0.0
        else:
            mean, amp = m.idle_w + span * _TRAIN_BASE, span * _TRAIN_SWING
        return capped_wave(mean, amp, self._cap[index])

    def model_power_watts(self, index: int, load: str, t: float) -> float:
        """The power model itself: watts drawn at time ``t`` under ``load`` (and the cap)."""
        mean, amp = self._wave(index, load)
        return mean + amp * math.sin(_omega() * t + self._phase[index])

    def _integral_j(self, index: int, load: str, t0: float, t1: float) -> float:
        """Closed-form ∫ P dt over [t0, t1] in joules."""
        mean, amp = self._wave(index, load)
        w, phi = _omega(), self._phase[index]
        return mean * (t1 - t0) + amp * (math.cos(w * t0 + phi) - math.cos(w * t1 + phi)) / w

    def set_power_limit(self, index: int, watts: int) -> bool:
        """Cap the simulated GPU at ``watts`` (at least 1 W; the board power or more, or
        0, lifts the cap); energy up to now is booked first. Always permitted."""
        self._advance(index)
        board = self._models[index].board_power_w
        self._cap[index] = 0 if watts <= 0 or watts >= board else max(1, watts)
        return True

    def power_limit(self, index: int) -> int:
        """The limit in force now, watts (the board power when uncapped)."""
        return self._cap[index] or self._models[index].board_power_w

    def _advance(self, index: int) -> None:
        now = self._clock()
        t0 = self._since[index]
        if now > t0:
            self._energy_mj[index] += 1000.0 * self._integral_j(index, self._load[index], t0, now)
            self._since[index] = now

    def energy_millijoules(self, index: int) -> int:
        """Total energy since the backend was created, mJ (the simulated counter)."""
        self._advance(index)
        return int(self._energy_mj[index])

    def power_watts(self, index: int) -> float:
        """Draw now under the current load."""
        return self.model_power_watts(index, self._load[index], self._clock())

    def telemetry(self, index: int) -> GpuTelemetry:
        """Simulated sensors: temperature and utilisation follow the power draw."""
        m = self._models[index]
        watts = self.power_watts(index)
        busy = (watts - m.idle_w) / max(1, m.board_power_w - m.idle_w)
        return GpuTelemetry(
            index=index,
            power_watts=watts,
            energy_millijoules=self.energy_millijoules(index),
            temperature_celsius=self._temperature(index, busy),
            utilization_ratio=round(min(1.0, busy * 1.05), 3),
            pcie_generation=_sim_generation(m.pcie_link_width),
            pcie_link_width=m.pcie_link_width,
        )

    def _struck(self, index: int, kind: str) -> list[tuple[int, Fault]]:
        """The faults of ``kind`` on GPU ``index`` that have struck by now."""
        t = self._clock() - self._started
        return [
            (n, f)
            for n, f in enumerate(self._faults)
            if f.gpu == index and f.kind == kind and t >= f.after_s
        ]

    def _overheating(self, index: int) -> bool:
        t = self._clock() - self._started
        return any(t < f.after_s + OVERHEAT_HOLD_S for _, f in self._struck(index, "overheat"))

    def _temperature(self, index: int, busy: float) -> float:
        if self._overheating(index):
            return SIM_SLOWDOWN_C + 5.0
        return round(32.0 + 38.0 * busy, 1)

    def health(self, index: int) -> list[HealthObservation]:
        """The injected faults that have struck, and the simulated readings."""
        now = self._clock()
        out: list[HealthObservation] = []
        for kind, (observed, value) in _ONE_OFF.items():
            for n, _ in self._struck(index, kind):
                if n not in self._fired:
                    self._fired.add(n)
                    out.append(HealthObservation(index, observed, now, value=value))
        if self._struck(index, "lost"):
            out.append(HealthObservation(index, Observed.LOST, now))
            return out
        m = self._models[index]
        busy = (self.power_watts(index) - m.idle_w) / max(1, m.board_power_w - m.idle_w)
        temp = self._temperature(index, busy)
        out.append(
            HealthObservation(index, Observed.TEMPERATURE, now, temp, threshold=SIM_SLOWDOWN_C)
        )
        out.append(HealthObservation(index, Observed.POWER, now, present=True))
        return out

    def selftest_factor(self, index: int) -> float:
        """What the card measures against a healthy one of its model: 1.0; 1/3 for an
        ``impostor``; 0.0 once ``lost`` (the self-test multiplies the reference by it)."""
        if self._struck(index, "lost"):
            return 0.0
        if self._struck(index, "impostor"):
            return 1.0 / 3.0
        return 1.0

    def set_load(self, indices: list[int], load: str) -> None:
        """Switch GPUs between idle, training and mining; energy up to now is booked first."""
        for i in indices:
            self._advance(i)
            self._load[i] = load

    def load(self, index: int) -> str:
        """The load a GPU is under now."""
        return self._load[index]

    def close(self) -> None:
        """Nothing to release."""


def _sim_generation(width: int) -> int:
    """A riser (x4 or narrower) runs at gen 1 in the simulation; a slot at gen 4."""
    return 1 if width <= 4 else 4


def _omega() -> float:
    return 2 * math.pi / _TRAIN_PERIOD_S


def _sim_uuid(seed: str, index: int) -> str:
    digest = hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()
    return f"SIM-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


class NvmlBackend:
    """Real NVIDIA GPUs through NVML (``pynvml`` from nvidia-ml-py).

    ``nvml`` is the module to use, injectable so tests can pass a fake driver.
    Fields a GPU does not support (NVML_ERROR_NOT_SUPPORTED) read as None; the
    energy meter then integrates power samples instead of the energy counter.
    """

    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        nvml.nvmlInit()
        try:
            count = nvml.nvmlDeviceGetCount()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._infos = [self._info(i, h) for i, h in enumerate(self._handles)]
        except Exception:
            nvml.nvmlShutdown()
            raise
        if not self._infos:
            nvml.nvmlShutdown()
            raise RuntimeError("NVML found no GPUs")
        self._has_counter = [
            self._optional(nvml.nvmlDeviceGetTotalEnergyConsumption, h) is not None
            for h in self._handles
        ]
        self._health = NvmlHealth(nvml, self._handles, self._optional)

    def _info(self, index: int, handle: Any) -> GpuInfo:
        nvml = self._nvml
        name = _text(nvml.nvmlDeviceGetName(handle))
        model = _short_model(name)
        table = lookup(model)
        limit_mw = self._optional(nvml.nvmlDeviceGetPowerManagementLimit, handle)
        width = self._optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
        gen = self._optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
        return GpuInfo(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            model=model,
            vram_mb=int(nvml.nvmlDeviceGetMemoryInfo(handle).total // (1 << 20)),
            power_limit_watts=int((limit_mw or 0) // 1000),
            pcie_link_width=int(width or 0),
            default_price_micros_per_gpu_hour=table.default_price_micros_per_gpu_hour
            if table
            else 0,
            pcie_generation=int(gen or 0),
        )

    def _optional(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nvml.NVMLError as err:
            if _is_not_supported(self._nvml, err):
                return None
            raise

    def gpus(self) -> list[GpuInfo]:
        """The GPUs NVML enumerates, in NVML (PCI bus) order."""
        return list(self._infos)

    def energy_millijoules(self, index: int) -> int | None:
        """nvmlDeviceGetTotalEnergyConsumption (mJ since the driver loaded), or None."""
        if not self._has_counter[index]:
            return None
        value = self._optional(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handles[index])
        return None if value is None else int(value)

    def power_watts(self, index: int) -> float:
        """nvmlDeviceGetPowerUsage in watts (0.0 when unsupported)."""
        mw = self._optional(self._nvml.nvmlDeviceGetPowerUsage, self._handles[index])
        return (mw or 0) / 1000.0

    def telemetry(self, index: int) -> GpuTelemetry:
        """Power, energy, temperature, utilisation and PCIe link of one GPU."""
        nvml, h = self._nvml, self._handles[index]
        temp = self._optional(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
        util = self._optional(nvml.nvmlDeviceGetUtilizationRates, h)
        gen = self._optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h)
        width = self._optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, h)
        return GpuTelemetry(
            index=index,
            power_watts=self.power_watts(index),
            energy_millijoules=self.energy_millijoules(index),
            temperature_celsius=None if temp is None else float(temp),
            utilization_ratio=None if util is None else util.gpu / 100.0,
            pcie_generation=None if gen is None else int(gen),
            pcie_link_width=None if width is None else int(width),
        )

    def set_load(self, indices: list[int], load: str) -> None:
        """Real GPUs draw what they draw: nothing to do."""

    def set_power_limit(self, index: int, watts: int) -> bool:
        """nvmlDeviceSetPowerManagementLimit (mW, clamped to the card's constraints);
        False on NVML_ERROR_NO_PERMISSION (not root) or NOT_SUPPORTED."""
        return nvml_set_power_limit(self._nvml, self._handles[index], watts)

    def power_limit_range(self, index: int) -> tuple[int, int, int] | None:
        """(min, max, default) power limit in watts, or None when NVML does not say."""
        return nvml_power_range(self._nvml, self._handles[index])

    def health(self, index: int) -> list[HealthObservation]:
        """XID events since the last call, new double-bit ECC errors, pending retired
        pages, the temperature and its slowdown threshold, whether power reads; a GPU
        whose reads fail with NVML_ERROR_GPU_IS_LOST reads as lost (``nvml_health.py``)."""
        return self._health.read(index)

    def close(self) -> None:
        """nvmlShutdown."""
        self._nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _short_model(name: str) -> str:
    """``NVIDIA GeForce RTX 3090`` → ``RTX 3090``; ``NVIDIA RTX A4000`` → ``A4000``."""
    for prefix in ("NVIDIA GeForce ", "NVIDIA RTX ", "NVIDIA ", "GeForce "):
        if name.startswith(prefix):
            return name[len(prefix) :].strip()
    return name.strip()


def _is_not_supported(nvml: Any, err: Exception) -> bool:
    not_supported = getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3)
    return getattr(err, "value", None) == not_supported


def open_backend(
    simulate: str,
    *,
    seed: str = "",
    fallback_spec: str = "",
    faults: list[Fault] | tuple[Fault, ...] = (),
) -> GpuBackend:
    """The backend for this rig: simulated when ``simulate`` is set, else NVML.

    Without a driver (or without GPUs) NVML cannot start; the agent then
    simulates ``fallback_spec`` and says so in the log. ``faults`` are injected into
    a simulated rig only (refused with a real one).
    """
    from worker_agent.config import DEFAULT_SIMULATE_SPEC

    if simulate:
        log.info("simulating GPUs %s", simulate)
        return SimulatedBackend(simulate, seed=seed, faults=faults)
    if faults:
        raise ValueError("--simulate-fault needs --simulate SPEC (faults are simulated)")
    try:
        backend = NvmlBackend()
    except Exception as err:  # pynvml raises NVMLError_LibraryNotFound, DriverNotLoaded, …
        spec = fallback_spec or DEFAULT_SIMULATE_SPEC
        log.warning("no NVIDIA driver found (%s); simulating GPUs %s instead", err, spec)
        return SimulatedBackend(spec, seed=seed)
    log.info("NVML: %d GPU(s): %s", len(backend.gpus()), ", ".join(g.model for g in backend.gpus()))
    return backend
