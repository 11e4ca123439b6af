"""The agent's metrics (``worker_agent/metrics.py``) show the snapshot the event loop
published: built from plain values here, no agent, no scrape server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from worker_agent.energy import EnergyMeter
from worker_agent.gpu import SimulatedBackend
from worker_agent.metrics import GPU_STATES, AgentMetrics, AgentSnapshot, GpuReading, read_sensors


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_collector_shows_the_current_snapshot_and_nothing_else() -> None:
    backend = SimulatedBackend("RTX3090x2,RTX3060", seed="m")
    gpus = backend.gpus()
    readings = {
        0: GpuReading(300.0, 1500.0, 70.0, 0.9),
        1: GpuReading(25.0, 100.0),  # no temperature, no utilisation
        # GPU 2's sensors could not be read: it is left out
    }
    current = [AgentSnapshot()]
    metrics = AgentMetrics(lambda: current[0], CollectorRegistry())
    assert sample(metrics, "rigshift_agent_jobs_running") == 0
    assert sample(metrics, "rigshift_gpu_power_watts", gpu="0", gpu_model="RTX 3090") is None

    current[0] = AgentSnapshot.build(
        gpus,
        readings,
        ai={0},
        mining={0, 1},  # a started attempt wins over a miner still being stopped
        asks={0: 250_000, 1: 1_500_000, 2: 90_000},
        jobs_running=1,
    )
    g0 = {"gpu": "0", "gpu_model": "RTX 3090"}
    g1 = {"gpu": "1", "gpu_model": "RTX 3090"}
    assert sample(metrics, "rigshift_agent_jobs_running") == 1
    assert sample(metrics, "rigshift_gpu_power_watts", **g0) == 300.0
    assert sample(metrics, "rigshift_gpu_energy_joules_total", **g0) == 1500.0
    assert sample(metrics, "rigshift_gpu_temperature_celsius", **g0) == 70.0
    assert sample(metrics, "rigshift_gpu_utilization_ratio", **g0) == 0.9
    assert sample(metrics, "rigshift_gpu_temperature_celsius", **g1) is None
    assert sample(metrics, "rigshift_gpu_ask_price_usd_per_gpu_hour", **g0) == 0.25
    assert sample(metrics, "rigshift_gpu_ask_price_usd_per_gpu_hour", **g1) == 1.5
    states = {
        (gpu, s): sample(metrics, "rigshift_gpu_state", **labels, state=s)
        for gpu, labels in (("0", g0), ("1", g1))
        for s in GPU_STATES
    }
    assert states == {
        ("0", "ai"): 1.0,
        ("0", "mining"): 0.0,
        ("0", "idle"): 0.0,
        ("0", "quarantined"): 0.0,
        ("1", "ai"): 0.0,
        ("1", "mining"): 1.0,
        ("1", "idle"): 0.0,
        ("1", "quarantined"): 0.0,
    }
    assert GPU_STATES == ("ai", "mining", "idle", "quarantined")
    assert sample(metrics, "rigshift_gpu_power_watts", gpu="2", gpu_model="RTX 3060") is None


def test_a_quarantined_gpu_shows_as_quarantined_whatever_else_holds_it() -> None:
    backend = SimulatedBackend("RTX3090x2", seed="q")
    current = AgentSnapshot.build(
        backend.gpus(),
        {0: GpuReading(25.0, 1.0), 1: GpuReading(25.0, 1.0)},
        ai={1},  # an attempt still stopping on the quarantined GPU
        mining=set(),
        asks={},
        jobs_running=1,
        quarantined={1},
    )
    metrics = AgentMetrics(lambda: current, CollectorRegistry())
    g1 = {"gpu": "1", "gpu_model": "RTX 3090"}
    shown = {s: sample(metrics, "rigshift_gpu_state", **g1, state=s) for s in GPU_STATES}
    assert shown == {"ai": 0.0, "mining": 0.0, "idle": 0.0, "quarantined": 1.0}
    g0 = {"gpu": "0", "gpu_model": "RTX 3090"}
    assert sample(metrics, "rigshift_gpu_state", **g0, state="idle") == 1.0


def test_sensors_are_read_into_readings() -> None:
    backend = SimulatedBackend("RTX3060", seed="r")
    readings = read_sensors(backend, EnergyMeter(backend))
    assert list(readings) == [0]
    assert readings[0].power_watts > 0 and readings[0].energy_joules >= 0
