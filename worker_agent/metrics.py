"""The agent's Prometheus metrics (the names and labels of ``docs/metrics.md``, "Agent metrics").

Per-GPU series come from a custom collector (STYLE.md 8), like NVIDIA's DCGM exporter;
only the heartbeat round-trip histogram is fed as heartbeats happen. The registry is
injected so tests read values with ``registry.get_sample_value(...)``.

Prometheus scrapes from a thread of its own, so the collector never reads the agent's
live objects: the agent's event loop publishes an immutable :class:`AgentSnapshot`
(one attribute, swapped whole) after every event, mining tick and sensor reading
(every ``energy_sample_interval_s``), and the collector reads whatever snapshot is
current. This module does not import the agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from worker_agent.energy import EnergyMeter
from worker_agent.gpu import GpuBackend, GpuInfo

__all__ = [
    "GPU_STATES",
    "AgentCollector",
    "AgentMetrics",
    "AgentSnapshot",
    "GpuReading",
    "GpuSnapshot",
    "read_sensors",
    "serve_metrics",
]

log = logging.getLogger("rigshift.agent.metrics")

#: The values of the ``state`` label of ``rigshift_gpu_state``.
GPU_STATES = ("ai", "mining", "idle", "quarantined")


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU's sensors, read on the event loop."""

    power_watts: float
    energy_joules: float
    temperature_celsius: float | None = None
    utilization_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU as the metrics show it."""

    index: int
    model: str
    state: str
    """One of :data:`GPU_STATES`."""
    ask_micros_per_gpu_hour: int
    reading: GpuReading
    power_limit_watts: int = 0
    """The power limit the agent set (an attempt's cap, else the operator's); 0: unknown."""


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """Everything the collector shows, published whole by the agent's event loop."""

    jobs_running: int = 0
    gpus: tuple[GpuSnapshot, ...] = ()
    curtailed: bool = False
    """A curtailment window is on (no miner runs)."""

    @classmethod
    def build(
        cls,
        gpus: list[GpuInfo],
        readings: Mapping[int, GpuReading],
        *,
        ai: Set[int],
        mining: Set[int],
        asks: Mapping[int, int],
        jobs_running: int,
        quarantined: Set[int] = frozenset(),
        power_limits: Mapping[int, int] | None = None,
        curtailed: bool = False,
    ) -> AgentSnapshot:
        """The snapshot of the GPUs whose sensors could be read. A GPU's state is
        ``quarantined`` when it is out of service (``quarantined``), else ``ai`` when a
        started attempt holds it (``ai``), else ``mining`` when a miner runs there
        (``mining``), else ``idle``."""
        out = []
        for gpu in gpus:
            reading = readings.get(gpu.index)
            if reading is None:
                continue
            if gpu.index in quarantined:
                state = "quarantined"
            elif gpu.index in ai:
                state = "ai"
            else:
                state = "mining" if gpu.index in mining else "idle"
            ask = asks.get(gpu.index, 0)
            limit = (power_limits or {}).get(gpu.index, 0)
            out.append(GpuSnapshot(gpu.index, gpu.model, state, ask, reading, limit))
        return cls(jobs_running, tuple(out), curtailed)


def read_sensors(backend: GpuBackend, meter: EnergyMeter) -> dict[int, GpuReading]:
    """Every GPU's sensors now; a GPU whose telemetry fails is left out."""
    readings = {}
    for gpu in backend.gpus():
        try:
            t = backend.telemetry(gpu.index)
        except Exception as err:  # a sensor failing must not break the metrics
            log.debug("telemetry of GPU %d failed: %s", gpu.index, err)
            continue
        readings[gpu.index] = GpuReading(
            t.power_watts,
            meter.counter_millijoules(gpu.index) / 1000.0,
            t.temperature_celsius,
            t.utilization_ratio,
        )
    return readings


class AgentCollector(Collector):
    """Shows the agent's current snapshot when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Every agent series, from the snapshot current now (called on each scrape)."""
        snap = self._snapshot()
        labels = ["gpu", "gpu_model"]
        power = GaugeMetricFamily(
            "rigshift_gpu_power_watts", "Power the GPU draws now.", labels=labels
        )
        energy = CounterMetricFamily(
            "rigshift_gpu_energy_joules",
            "Energy the GPU used since the agent started (all work: AI, mining, idle).",
            labels=labels,
        )
        temp = GaugeMetricFamily(
            "rigshift_gpu_temperature_celsius", "GPU core temperature.", labels=labels
        )
        util = GaugeMetricFamily(
            "rigshift_gpu_utilization_ratio", "GPU utilisation, 0 to 1.", labels=labels
        )
        state = GaugeMetricFamily(
            "rigshift_gpu_state",
            "1 for the GPU's current state (ai, mining, idle, quarantined), 0 for the others.",
            labels=[*labels, "state"],
        )
        price = GaugeMetricFamily(
            "rigshift_gpu_ask_price_usd_per_gpu_hour", "The GPU's current ask price.", labels=labels
        )
        running = GaugeMetricFamily(
            "rigshift_agent_jobs_running", "Attempts the agent is running now."
        )
        running.add_metric([], snap.jobs_running)
        limit = GaugeMetricFamily(
            "rigshift_gpu_power_limit_watts",
            "The power limit the agent set: an attempt's cap, else the operator's.",
            labels=labels,
        )
        curtailed = GaugeMetricFamily(
            "rigshift_agent_curtailed", "1 while a curtailment window is on (no mining), else 0."
        )
        curtailed.add_metric([], 1.0 if snap.curtailed else 0.0)
        for gpu in snap.gpus:
            lv = [str(gpu.index), gpu.model]
            r = gpu.reading
            power.add_metric(lv, r.power_watts)
            energy.add_metric(lv, r.energy_joules)
            if r.temperature_celsius is not None:
                temp.add_metric(lv, r.temperature_celsius)
            if r.utilization_ratio is not None:
                util.add_metric(lv, r.utilization_ratio)
            for s in GPU_STATES:
                state.add_metric([*lv, s], 1.0 if s == gpu.state else 0.0)
            price.add_metric(lv, gpu.ask_micros_per_gpu_hour / 1_000_000)
            if gpu.power_limit_watts:
                limit.add_metric(lv, gpu.power_limit_watts)
        yield from (power, energy, temp, util, state, price, running, limit, curtailed)


class AgentMetrics:
    """The agent's registry: the snapshot collector plus the heartbeat histogram.

    ``snapshot`` returns the snapshot current now (called from the scrape thread: it
    must only read one attribute).
    """

    def __init__(
        self, snapshot: Callable[[], AgentSnapshot], registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(AgentCollector(snapshot))
        self.heartbeat_rtt = Histogram(
            "rigshift_agent_heartbeat_rtt_seconds",
            "Round-trip time of the agent's Heartbeat RPCs to the broker.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )


def serve_metrics(metrics: AgentMetrics, listen: str) -> Any:
    """Serve ``/metrics`` on ``host:port`` (port 0 picks one) from a thread; returns the server.

    ``server.server_address`` is the bound address; ``server.shutdown()`` stops it.
    """
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(
        int(port), addr=host or "127.0.0.1", registry=metrics.registry
    )
    return server
