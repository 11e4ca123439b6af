"""A real agent that is asked to stop drains itself on the broker: no new work lands on it."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from broker_harness import start_broker

from client import Client
from rigshift.v1 import farm_pb2, job_pb2
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig
from worker_agent.executor import LocalExecutor
from worker_agent.gpu import SimulatedBackend


def test_a_stopping_agent_drains_itself_and_gets_no_new_work(tmp_path: Path) -> None:
    rb = start_broker(tmp_path / "b")
    try:
        with Client(rb.address, api_key=rb.admin_key) as rs:
            farm = rs.create_farm("drain-farm")
            config = AgentConfig(
                broker_address=rb.address,
                enrollment_token=farm.enrollment_token,
                state_dir=tmp_path / "agent",
                sandbox="none",
                heartbeat_interval_s=0.5,
                drain_grace_s=10.0,
            )

            async def main() -> tuple[int, int]:
                agent = Agent(
                    config,
                    backend=SimulatedBackend("RTX3090x1", seed="t"),
                    executor=LocalExecutor(flush_s=0.05, kill_grace_s=1.0),
                )
                async with agent:
                    slow = await asyncio.to_thread(
                        rs.create_job, [sys.executable, "-c", "import time; time.sleep(1.5)"]
                    )
                    while (await asyncio.to_thread(rs.get_job, slow.name)).state != (
                        job_pb2.Job.State.RUNNING
                    ):
                        await asyncio.sleep(0.05)
                    agent.request_shutdown()  # what SIGTERM does
                    (worker,) = await asyncio.to_thread(lambda: list(rs.iter_workers()))
                    deadline = time.monotonic() + 10
                    while worker.state != farm_pb2.Worker.State.DRAINING:
                        assert time.monotonic() < deadline, worker
                        await asyncio.sleep(0.05)
                        (worker,) = await asyncio.to_thread(lambda: list(rs.iter_workers()))
                    later = await asyncio.to_thread(rs.create_job, ["true"])
                    await agent.shutdown()  # waits for the drain: the running job finishes
                got_slow = await asyncio.to_thread(rs.get_job, slow.name)
                got_later = await asyncio.to_thread(rs.get_job, later.name)
                return got_slow.state, got_later.state

            slow_state, later_state = asyncio.run(main())
        # The running job finished within the drain grace; the new one was never placed there.
        assert slow_state == job_pb2.Job.State.SUCCEEDED
        assert later_state == job_pb2.Job.State.PENDING
    finally:
        rb.stop()
