"""Mining fallback, the shell: a real miner process, alone and inside an agent that takes
work from a real broker (the pure policy's tables are in tests/unit/test_agent_mining.py)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from harness.agent_fixtures import FakeClock, numeric_integral_j
from worker_agent.config import AgentConfig, MiningConfig
from worker_agent.energy import EnergyMeter
from worker_agent.gpu import Load, SimulatedBackend
from worker_agent.mining import GpuState, MiningSupervisor, read_status
from worker_agent.process import alive as _alive

IDLE, MINING, AI = GpuState.IDLE, GpuState.MINING, GpuState.AI

# --- the shell, with a real miner process ----------------------------------------------

MINER = """
import os, signal, sys, time
path = os.path.join(sys.argv[1], 'miner-' + sys.argv[2] + '.log')
def note(what):
    with open(path, 'a') as f:
        f.write(f"{what} {time.time()} {os.getpid()} {os.environ['CUDA_VISIBLE_DEVICES']}\\n")
def term(*_):
    note('stop')
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
note('start')
while True:
    time.sleep(0.05)
"""


def miner_command(tmp_path: Path) -> tuple[str, ...]:
    script = tmp_path / "miner.py"
    script.write_text(MINER)
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    return (sys.executable, str(script), str(marks), "{gpu}")


def notes(tmp_path: Path, gpu: int) -> list[tuple[str, float, int, str]]:
    path = tmp_path / "marks" / f"miner-{gpu}.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, t, pid, cuda = line.split()
        out.append((what, float(t), int(pid), cuda))
    return out


async def wait_for(predicate, timeout_s: float = 10.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def test_supervisor_mines_an_idle_gpu_and_releases_it_before_an_attempt(tmp_path: Path) -> None:
    """Real miner processes on a 2-GPU simulated rig with a fake clock: a GPU mines after a
    dwell, release() stops only its miner (the tree is gone before it returns), and the
    attempt metered afterwards gets training energy only, the miner its own."""
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x2", clock=clock)
    meter = EnergyMeter(backend, clock=clock)
    cfg = MiningConfig(
        command=miner_command(tmp_path), revenue_micros_per_kwh=200_000, min_dwell_s=30
    )
    asks = {0: 250_000, 1: 250_000}
    sup = MiningSupervisor(
        cfg, backend, meter, asks_micros_per_gpu_hour=asks, state_dir=tmp_path, clock=clock
    )

    async def main() -> None:
        sup.tick(set())
        assert sup.state(0) == IDLE and not notes(tmp_path, 0)  # AI pays more: wait a dwell
        clock.advance(30)
        sup.tick(set())
        assert sup.state(0) == MINING and sup.state(1) == MINING
        await wait_for(lambda: notes(tmp_path, 0) and notes(tmp_path, 1), what="both miners")
        (what, _, pid0, cuda0), *_ = notes(tmp_path, 0)
        assert (what, cuda0, notes(tmp_path, 1)[0][3]) == ("start", "0", "1")  # bound to its GPU
        assert backend.load(0) == Load.MINING
        status = read_status(tmp_path)
        assert status[0]["state"] == "mining" and status[0]["advertise"] is True
        assert status[0]["ai_usd_per_kwh"] == "0.714" and status[0]["mining_usd_per_kwh"] == "0.200"

        clock.advance(10)  # 10 s of mining on GPU 0: 3337.5 J
        await sup.release([0])
        assert [n[0] for n in notes(tmp_path, 0)] == ["start", "stop"]  # SIGTERM, clean exit
        assert not _alive(pid0) and sup.state(0) == AI and sup.state(1) == MINING
        assert backend.load(0) == Load.IDLE and sup.mining_joules(0) == 3337
        # The attempt's energy starts after the miner is gone: training only.
        meter.start(("jobs/j", 1), [0])
        backend.set_load([0], Load.TRAINING)
        clock.advance(10)
        training = numeric_integral_j(backend, 0, Load.TRAINING, clock.t - 10, clock.t)
        assert meter.stop(("jobs/j", 1)) == pytest.approx(training, abs=1)
        assert sup.mining_joules(0) == 3337  # GPU 0 mined no more
        assert sup.mining_joules(1) == 6675  # GPU 1 mined all 20 s
        sup.tick({0})
        assert sup.state(0) == AI and len(notes(tmp_path, 0)) == 2  # held: no miner
        backend.set_load([0], Load.IDLE)
        sup.tick(set())  # the attempt ended: idle for a dwell (AI preferred), then mining
        assert sup.state(0) == IDLE
        clock.advance(30)
        sup.tick(set())
        await wait_for(lambda: len(notes(tmp_path, 0)) == 3, what="the miner to restart")
        await sup.close()
        assert all(n[0] == "stop" for n in (notes(tmp_path, 0)[-1], notes(tmp_path, 1)[-1]))
        assert not any(_alive(n[2]) for g in (0, 1) for n in notes(tmp_path, g))
        assert read_status(tmp_path)[1]["state"] == "idle"

    asyncio.run(main())


def test_a_miner_that_exits_is_retried_after_a_delay(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3060", clock=clock)
    meter = EnergyMeter(backend, clock=clock)
    cfg = MiningConfig(
        command=("no-such-miner-binary",),
        revenue_micros_per_kwh=900_000,  # mining pays more: mine at once
        min_dwell_s=5,
        restart_delay_s=20,
    )
    sup = MiningSupervisor(
        cfg, backend, meter, asks_micros_per_gpu_hour={}, state_dir=tmp_path, clock=clock
    )

    async def main() -> None:
        sup.tick(set())
        assert sup.state(0) == MINING and not sup.gpus[0].arbitration.advertise
        await wait_for(lambda: sup.gpus[0].miner is not None and sup.gpus[0].miner.done.is_set())
        sup.tick(set())
        assert sup.state(0) == IDLE and sup.gpus[0].miner is None  # not found: backoff
        clock.advance(19)
        sup.tick(set())
        assert sup.state(0) == IDLE
        clock.advance(1)
        sup.tick(set())
        assert sup.state(0) == MINING  # tried again
        await sup.close()

    asyncio.run(main())


# --- an agent taking work from a real broker -------------------------------------------


def test_agent_mines_when_idle_and_stops_the_miner_for_an_assignment(tmp_path: Path) -> None:
    """A real broker, an Agent with the LocalExecutor on one simulated RTX 3060: the idle GPU
    starts mining; a job is submitted; the miner is gone before the job's process starts;
    the miner starts again after the attempt ends. Metrics and the status file say mining."""
    from broker_harness import start_broker

    from client.sdk import Client
    from rigshift.v1 import job_pb2
    from worker_agent.agent import Agent
    from worker_agent.executor import LocalExecutor
    from worker_agent.metrics import AgentMetrics

    rb = start_broker(tmp_path / "broker", lease_ttl_s=3.0, heartbeat_interval_s=0.5)
    client = Client(rb.address, api_key=rb.admin_key)
    job_marks = tmp_path / "job.json"
    try:
        token = client.create_farm("farm-m").enrollment_token
        config = AgentConfig(
            broker_address=rb.address,
            enrollment_token=token,
            state_dir=tmp_path / "agent",
            hostname="rig-m",
            heartbeat_interval_s=0.3,
            lease_ttl_s=3.0,
            report_flush_s=0.05,
            reconnect_min_s=0.05,
            reconnect_max_s=0.3,
            drain_grace_s=3.0,
            cancel_grace_s=1.0,
            metrics_listen="127.0.0.1:0",
            mining=MiningConfig(
                command=miner_command(tmp_path),
                revenue_micros_per_kwh=100_000,  # AI pays $0.53/kWh: mining only as a filler
                min_dwell_s=0.3,
                check_interval_s=0.05,
                stop_grace_s=1.0,
            ),
        )
        agent = Agent(
            config,
            backend=SimulatedBackend("RTX3060", seed="m"),
            executor=LocalExecutor(flush_s=0.05, kill_grace_s=1.0),
        )

        def gpu_state(metrics: AgentMetrics, state: str) -> float | None:
            return metrics.registry.get_sample_value(
                "rigshift_gpu_state", {"gpu": "0", "gpu_model": "RTX 3060", "state": state}
            )

        async def main() -> None:
            async with agent:
                metrics = agent.metrics
                assert metrics is not None
                await wait_for(lambda: notes(tmp_path, 0), what="the idle GPU to start mining")
                assert agent.mining is not None and agent.mining.state(0) == MINING
                assert gpu_state(metrics, "mining") == 1.0 and gpu_state(metrics, "idle") == 0.0
                assert read_status(config.state_dir)[0]["state"] == "mining"
                job = await asyncio.to_thread(
                    client.create_job,
                    [
                        sys.executable,
                        "-c",
                        "import json, os, time\n"
                        "t0 = time.time(); time.sleep(0.5)\n"
                        "gpus = os.environ['CUDA_VISIBLE_DEVICES']\n"
                        f"open({str(job_marks)!r}, 'w').write(json.dumps("
                        "{'start': t0, 'end': time.time(), 'gpus': gpus}))",
                    ],
                )

                def done() -> bool:
                    return client.get_job(job.name).state == job_pb2.Job.SUCCEEDED

                await wait_for(done, 20, "the job to succeed")
                await wait_for(lambda: len(notes(tmp_path, 0)) >= 3, 10, "the miner to restart")
                assert gpu_state(metrics, "mining") == 1.0
            # after shutdown: every miner stopped
            assert notes(tmp_path, 0)[-1][0] == "stop"

        asyncio.run(main())
        rec = json.loads(job_marks.read_text())
        first_start, first_stop, second_start = notes(tmp_path, 0)[:3]
        assert [first_start[0], first_stop[0], second_start[0]] == ["start", "stop", "start"]
        assert first_stop[1] < rec["start"]  # the miner was gone before the job began
        assert second_start[1] > rec["end"]  # and came back after it ended
        assert rec["gpus"] == "0" and not _alive(second_start[2])
        (only,) = client.list_jobs().jobs
        attempt = client.get_job(only.name).attempts[-1]
        # The attempt's energy is training and idle draw only (RTX 3060: 13-170 W), never the
        # miner's: it ran ~0.5 s, so a few tens of joules, not the miner's 150 W x its life.
        assert 0 < attempt.energy_joules < 170 * (attempt.gpu_milliseconds / 1000 + 1.5)
    finally:
        client.close()
        rb.stop()


def test_agent_gpus_shows_what_the_running_agent_does(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from worker_agent.cli import agent_group

    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x2", clock=clock)
    cfg = MiningConfig(command=miner_command(tmp_path), revenue_micros_per_kwh=800_000)
    sup = MiningSupervisor(
        cfg,
        backend,
        EnergyMeter(backend, clock=clock),
        asks_micros_per_gpu_hour={0: 250_000, 1: 250_000},
        state_dir=tmp_path,
        clock=clock,
    )

    def gpus(*args: str) -> str:
        result = CliRunner().invoke(
            agent_group, ["gpus", "--simulate", "RTX3090x2", "--state-dir", str(tmp_path), *args]
        )
        assert result.exit_code == 0, result.output
        return result.output

    assert [json.loads(r)["state"] for r in gpus("--json").splitlines()] == ["no agent"] * 2

    async def main() -> None:
        sup.tick({1})  # mining ($0.80/kWh) beats AI ($0.714/kWh) from the start: mine at once
        rows = [json.loads(r) for r in gpus("--json").splitlines()]
        assert [r["state"] for r in rows] == ["mining", "ai"]
        assert rows[0]["power_watts"] == 333.8  # the simulated mining draw
        assert rows[0]["mining_usd_per_kwh"] == "0.800" and rows[0]["ai_usd_per_kwh"] == "0.714"
        assert rows[0]["preference"] == "mining" and rows[0]["advertise"] is False
        text = gpus()
        assert "mining  [AI $0.714/kWh vs mining $0.800/kWh: mining preferred" in text
        await sup.close()

    asyncio.run(main())
