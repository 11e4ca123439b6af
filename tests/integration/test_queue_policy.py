"""``--queue-policy`` through the real broker (gRPC on 127.0.0.1:0, SQLite, a protocol agent)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_harness import RunningBroker, start_broker
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from rigshift.v1 import job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg

State = job_pb2.Job.State


@pytest.fixture(params=["fifo", "short-first"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningBroker]:
    rb = start_broker(tmp_path / "broker", queue_policy=request.param)
    yield rb
    rb.stop()


def test_short_first_gives_a_freed_gpu_to_the_shorter_job(broker: RunningBroker) -> None:
    """One GPU, busy; a long job then a short one queue behind it. When the GPU frees,
    short-first places the short job (submitted second) and fifo the long one."""
    agent = ProtocolAgent(broker.address, create_farm(broker.address).enrollment_token, gpus(1))
    agent.register()
    agent.connect()
    agent.next_of("reconcile")
    with authed_channel(broker.address) as ch:
        jobs = jsg.JobServiceStub(ch)

        def submit(name: str, max_duration_seconds: int) -> str:
            spec = job_pb2.JobSpec(
                command=["python", "train.py"],
                gpu_count=1,
                display_name=name,
                max_duration_seconds=max_duration_seconds,
            )
            return jobs.CreateJob(js.CreateJobRequest(spec=spec)).name

        blocker = submit("blocker", 60)
        first = agent.next_of("assignment")
        assert first.job == blocker
        agent.start(first.job, first.attempt)
        long_job = submit("long", 10 * 3600)
        short_job = submit("short", 600)
        broker.scheduled()  # a completed scheduling pass saw both: they must still wait
        for name in (long_job, short_job):
            assert jobs.GetJob(js.GetJobRequest(name=name)).state == State.PENDING
        agent.finish(first.job, first.attempt)
        expected = short_job if broker.broker.config.queue_policy == "short-first" else long_job
        assert agent.next_of("assignment").job == expected
    agent.close()


def test_an_unknown_queue_policy_is_refused(tmp_path: Path) -> None:
    from broker.server import BrokerConfig

    with pytest.raises(ValueError, match="queue_policy"):
        BrokerConfig(home=str(tmp_path), queue_policy="random")
