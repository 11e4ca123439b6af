"""The agent's Prometheus metrics (the names and labels of ``docs/metrics.md``, "Agent metrics").

Per-GPU series are read from the GPU backend and the energy meter at scrape
time by a custom collector (STYLE.md 8), like NVIDIA's DCGM exporter; only the
heartbeat round-trip histogram is fed as heartbeats happen. The registry is
injected so tests read values with ``registry.get_sample_value(...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from worker_agent.agent import Agent

__all__ = ["AgentCollector", "AgentMetrics", "serve_metrics"]

log = logging.getLogger("rigshift.agent.metrics")

GPU_STATES = ("ai", "mining", "idle", "quarantined")


class AgentCollector(Collector):
    """Reads the agent's GPUs, meter and attempts when Prometheus scrapes."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Every agent series, read now (called by the registry on each scrape)."""
        agent = self._agent
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
        backend, meter, runner, mining = agent.backend, agent.meter, agent.runner, agent.mining
        busy: set[int] = set()
        if runner is not None:
            for run in list(runner.runs.values()):
                if run.started:
                    busy.update(run.assignment.gpu_indices)
        running.add_metric([], len(runner.runs) if runner is not None else 0)
        if backend is not None and meter is not None:
            for gpu in backend.gpus():
                lv = [str(gpu.index), gpu.model]
                try:
                    t = backend.telemetry(gpu.index)
                except Exception as err:  # a sensor failing must not break the scrape
                    log.debug("telemetry of GPU %d failed: %s", gpu.index, err)
                    continue
                power.add_metric(lv, t.power_watts)
                energy.add_metric(lv, meter.counter_millijoules(gpu.index) / 1000.0)
                if t.temperature_celsius is not None:
                    temp.add_metric(lv, t.temperature_celsius)
                if t.utilization_ratio is not None:
                    util.add_metric(lv, t.utilization_ratio)
                if gpu.index in busy:
                    now = "ai"
                elif mining is not None and mining.state(gpu.index) == "mining":
                    now = "mining"
                else:
                    now = "idle"
                for s in GPU_STATES:
                    state.add_metric([*lv, s], 1.0 if s == now else 0.0)
                ask = agent.config.price_micros_per_gpu_hour
                micros = gpu.default_price_micros_per_gpu_hour if ask is None else ask
                price.add_metric(lv, micros / 1_000_000)
        yield from (power, energy, temp, util, state, price, running)


class AgentMetrics:
    """The agent's registry: the scrape-time collector plus the heartbeat histogram."""

    def __init__(self, agent: Agent, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(AgentCollector(agent))
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
