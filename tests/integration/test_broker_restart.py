"""The store is the source of truth: a restarted broker continues where it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker_harness import start_broker
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from rigshift.v1 import farm_service_pb2, farm_service_pb2_grpc, job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg

State = job_pb2.Job.State


def test_restart_on_same_database_keeps_jobs_workers_and_running_attempts(tmp_path: Path):
    home = tmp_path / "b"
    rb = start_broker(home, lease_ttl_s=6.0, heartbeat_interval_s=1.0)
    farm = create_farm(rb.address)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(2))
    agent.register()
    agent.connect()
    with authed_channel(rb.address) as ch:
        jobs = jsg.JobServiceStub(ch)
        running = jobs.CreateJob(
            js.CreateJobRequest(spec=job_pb2.JobSpec(command=["a"], gpu_count=2), request_id="k1")
        )
        a = agent.next_of("assignment")
        agent.start(a.job, a.attempt)
        queued = jobs.CreateJob(
            js.CreateJobRequest(spec=job_pb2.JobSpec(command=["b"], gpu_count=1))
        )
    agent.close()
    rb.stop()

    rb2 = start_broker(home, lease_ttl_s=6.0, heartbeat_interval_s=1.0)
    try:
        with authed_channel(rb2.address) as ch:
            jobs = jsg.JobServiceStub(ch)
            got = jobs.GetJob(js.GetJobRequest(name=running.name))
            assert got.state == State.RUNNING
            assert [h.to_state for h in got.history] == [
                State.PENDING,
                State.SCHEDULED,
                State.RUNNING,
            ]
            assert jobs.GetJob(js.GetJobRequest(name=queued.name)).state == State.PENDING
            # The idempotency key survived too.
            again = jobs.CreateJob(
                js.CreateJobRequest(
                    spec=job_pb2.JobSpec(command=["a"], gpu_count=1), request_id="k1"
                )
            )
            assert again.name == running.name
            workers = farm_service_pb2_grpc.FarmServiceStub(ch).ListWorkers(
                farm_service_pb2.ListWorkersRequest()
            )
            assert [w.name for w in workers.workers] == [agent.worker]
        # The agent reconnects with its old credential; the reconcile lists its running attempt.
        back = ProtocolAgent(rb2.address, farm.enrollment_token, gpus(2))
        back.worker, back.credential = agent.worker, agent.credential
        back.heartbeat()
        back.connect()
        reconcile = back.next_of("reconcile")
        assert [(x.job, x.attempt) for x in reconcile.assignments] == [(running.name, 1)]
        back.seq[(running.name, 1)] = 1  # it had sent "started" as sequence 1
        back.finish(running.name, 1)
        with authed_channel(rb2.address) as ch:
            jobs = jsg.JobServiceStub(ch)
            deadline = time.monotonic() + 10
            while jobs.GetJob(js.GetJobRequest(name=running.name)).state != State.SUCCEEDED:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        back.close()
    finally:
        rb2.stop()


def test_broker_serve_process_answers_health_and_stops_on_sigterm(tmp_path: Path):
    exe = Path(sys.executable).parent / "rigshift"
    proc = subprocess.Popen(
        [str(exe), "broker", "serve", "--listen", "127.0.0.1:0", "--home", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("rigshift broker listening on 127.0.0.1:"), line
        address = line.split()[-1]
        with authed_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert (tmp_path / "broker.db").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
