"""Energy attribution: integer joules per attempt from per-GPU energy counters.

A GPU belongs to at most one attempt at a time (the broker binds gangs of whole
GPUs), so an attempt's energy is the sum, over its GPUs, of how far each GPU's
energy counter moved between the attempt's start and now::

    E(attempt) = Σ_gpu  counter_gpu(now) - counter_gpu(start)        [mJ → J, floor]

The counter is NVML's total-energy counter, or the simulated backend's exact
integral of its power model. A GPU without a counter (NVML_ERROR_NOT_SUPPORTED
on older boards) gets a software counter: :meth:`EnergyMeter.sample` reads its
power and integrates with the trapezoid rule; the agent calls it every
``energy_sample_interval_s``.

Readings are cumulative, so a lost ``progress`` report costs nothing: the next
one carries the whole total, and ``finished`` carries the final figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from worker_agent.gpu import GpuBackend

__all__ = ["EnergyMeter"]


@dataclass(slots=True)
class _SoftCounter:
    """Trapezoid integral of sampled power for a GPU without an energy counter."""

    millijoules: float
    last_t: float
    last_w: float


class EnergyMeter:
    """Per-GPU energy counters and the attempts currently holding each GPU.

    Thread-safe: the agent's event loop and its metrics scrapes both read it.
    """

    def __init__(self, backend: GpuBackend, clock: Callable[[], float] = time.monotonic) -> None:
        self._backend = backend
        self._clock = clock
        self._lock = threading.Lock()
        self._soft: dict[int, _SoftCounter] = {}
        for gpu in backend.gpus():
            if backend.energy_millijoules(gpu.index) is None:
                self._soft[gpu.index] = _SoftCounter(0.0, clock(), backend.power_watts(gpu.index))
        self._baselines: dict[Hashable, dict[int, int]] = {}

    @property
    def software_counted(self) -> frozenset[int]:
        """Indices of GPUs metered by sampling power (no hardware counter)."""
        return frozenset(self._soft)

    def sample(self) -> None:
        """Integrate one power sample into each software counter (no-op with hardware counters)."""
        with self._lock:
            for index in self._soft:
                self._sample_locked(index)

    def _sample_locked(self, index: int) -> None:
        c = self._soft[index]
        now = self._clock()
        watts = self._backend.power_watts(index)
        c.millijoules += 1000.0 * (now - c.last_t) * (c.last_w + watts) / 2.0
        c.last_t, c.last_w = now, watts

    def counter_millijoules(self, index: int) -> int:
        """The GPU's energy counter now, in mJ (hardware or software)."""
        with self._lock:
            return self._counter_locked(index)

    def _counter_locked(self, index: int) -> int:
        if index in self._soft:
            self._sample_locked(index)
            return int(self._soft[index].millijoules)
        value = self._backend.energy_millijoules(index)
        return int(value or 0)

    def start(self, key: Hashable, indices: Iterable[int]) -> None:
        """Begin attributing the GPUs' energy to ``key`` (an attempt) from now on."""
        with self._lock:
            self._baselines[key] = {i: self._counter_locked(i) for i in indices}

    def joules(self, key: Hashable) -> int:
        """Energy attributed to ``key`` so far, whole joules (0 for an unknown key)."""
        with self._lock:
            base = self._baselines.get(key)
            if base is None:
                return 0
            total_mj = sum(max(0, self._counter_locked(i) - b) for i, b in base.items())
            return total_mj // 1000

    def stop(self, key: Hashable) -> int:
        """Final energy of ``key`` in joules; the GPUs are no longer attributed to it."""
        joules = self.joules(key)
        with self._lock:
            self._baselines.pop(key, None)
        return joules
