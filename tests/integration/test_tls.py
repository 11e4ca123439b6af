"""TLS on the gRPC port, and mutual TLS when a client CA is configured (certificates made here)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from broker_harness import start_broker
from pki import make_pki

from client import Client
from client.errors import RigshiftError


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path / "pki")


def tls_broker(pki: Path, home: Path, **extra: str):  # type: ignore[no-untyped-def]
    """A real broker serving TLS on localhost with the test CA's server certificate."""
    return start_broker(
        home,
        listen="localhost:0",
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
        **extra,
    )


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(pki: Path, tmp_path: Path):
    rb = tls_broker(pki, tmp_path / "b")
    try:
        with Client(rb.address, tls_ca=str(pki / "ca.crt"), api_key=rb.admin_key) as rs:
            assert rs.list_jobs().jobs == []
        plain = Client(rb.address, tls_ca="", api_key=rb.admin_key, timeout_s=3)
        with plain, pytest.raises(RigshiftError):
            plain.list_jobs()
    finally:
        rb.stop()


def test_mutual_tls_requires_a_client_certificate(pki: Path, tmp_path: Path):
    rb = tls_broker(pki, tmp_path / "b", tls_client_ca=str(pki / "ca.crt"))
    try:
        ca = (pki / "ca.crt").read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, (pki / "client.key").read_bytes(), (pki / "client.crt").read_bytes()
        )
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.secure_channel(rb.address, with_cert) as ch:
            ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.secure_channel(rb.address, grpc.ssl_channel_credentials(ca)) as ch:
            with pytest.raises(grpc.RpcError) as exc:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        rb.stop()


def test_an_agent_dials_a_tls_broker_with_its_ca_and_runs_a_job(pki: Path, tmp_path: Path):
    """The real agent (simulated GPUs, plain subprocesses) over TLS, as `--tls-ca` sets it up."""
    import asyncio
    import sys
    import time

    from rigshift.v1 import job_pb2
    from worker_agent.agent import Agent
    from worker_agent.config import AgentConfig
    from worker_agent.executor import LocalExecutor
    from worker_agent.gpu import SimulatedBackend

    rb = tls_broker(pki, tmp_path / "b")
    try:
        with Client(rb.address, tls_ca=str(pki / "ca.crt"), api_key=rb.admin_key) as rs:
            farm = rs.create_farm("tls-farm")
            config = AgentConfig(
                broker_address=rb.address,
                enrollment_token=farm.enrollment_token,
                tls_ca=pki / "ca.crt",
                state_dir=tmp_path / "agent",
                sandbox="none",
                heartbeat_interval_s=0.5,
            )

            async def main() -> int:
                agent = Agent(
                    config,
                    backend=SimulatedBackend("RTX3090x1", seed="t"),
                    executor=LocalExecutor(flush_s=0.05, kill_grace_s=1.0),
                )
                async with agent:
                    job = await asyncio.to_thread(
                        rs.create_job, [sys.executable, "-c", "print('over tls')"]
                    )
                    deadline = time.monotonic() + 30
                    while True:
                        got = await asyncio.to_thread(rs.get_job, job.name)
                        if got.state == job_pb2.Job.State.SUCCEEDED:
                            return len(list(rs.iter_workers()))
                        assert time.monotonic() < deadline, got
                        await asyncio.sleep(0.1)

            assert asyncio.run(main()) == 1
    finally:
        rb.stop()


def test_an_agent_with_a_client_certificate_passes_mutual_tls(pki: Path, tmp_path: Path):
    """A broker requiring client certificates: the agent presents tls_cert/tls_key."""
    import asyncio

    import grpc

    from worker_agent.channel import broker_channel
    from worker_agent.config import AgentConfig

    rb = tls_broker(pki, tmp_path / "b", tls_client_ca=str(pki / "ca.crt"))

    async def check(**tls: Path) -> bool:
        config = AgentConfig(broker_address=rb.address, enrollment_token="t", **tls)  # type: ignore[arg-type]
        async with broker_channel(config) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), 3)
            except TimeoutError:
                return False
            return channel.get_state() == grpc.ChannelConnectivity.READY

    try:
        ca = pki / "ca.crt"
        assert asyncio.run(
            check(tls_ca=ca, tls_cert=pki / "client.crt", tls_key=pki / "client.key")
        )
        assert not asyncio.run(check(tls_ca=ca))  # no client certificate: refused
    finally:
        rb.stop()
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        AgentConfig(broker_address="a:1", enrollment_token="t", tls_ca=ca, tls_cert=ca)
