"""An agent that lies about its GPU: real broker and agent processes (issue 15).

The rig claims an RTX 3090 (``--simulate RTX3090x1``) but the card measures a third as
fast (``--simulate-fault 0:impostor:0``). The broker judges the GPU from the self-test's
figures, not from the claim: UNVERIFIED with the figures in the reason. A job that did
not accept unverified GPUs stays PENDING with the structured reason; one that did runs
there. The ``local`` executor (no Ray): this is about the broker's judgement.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from harness.fleet import LocalFleet
from rigshift.v1 import farm_pb2, job_pb2

pytestmark = pytest.mark.timeout(120)

S = job_pb2.Job


def test_an_impostor_is_unverified_and_gets_only_jobs_that_accept_it(tmp_path: Path) -> None:
    with LocalFleet(tmp_path) as fleet:
        fleet.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
        client = fleet.client()
        farm = client.create_farm("liars")
        fleet.start_agent(
            "liar",
            farm.enrollment_token,
            "--simulate-fault",
            "0:impostor:0",
            simulate="RTX3090x1",
            executor="local",
            heartbeat_interval_s=1,
            lease_ttl_s=6,
        )
        (worker,) = fleet.wait_workers(1)
        gpu = worker.gpus[0]
        assert gpu.model == "RTX 3090"  # what it claims
        assert gpu.verification == farm_pb2.Gpu.UNVERIFIED
        assert "measures short of its claimed model" in gpu.verification_reason
        assert 25 <= gpu.score <= 40  # a third of an RTX 3090's 100
        assert gpu.measurement.method == "simulated" and gpu.measurement.fp16_gflops > 0

        command = [sys.executable, "-c", "print('trained')"]
        strict = client.create_job(command, gpu_model="RTX 3090").name
        lenient = client.create_job(command, gpu_model="RTX 3090", allow_unverified=True).name

        deadline = time.monotonic() + 60
        while client.get_job(lenient).state != S.SUCCEEDED:
            assert time.monotonic() < deadline, client.get_job(lenient)
            time.sleep(0.1)
        assert client.get_job(lenient).attempts[0].worker == worker.name

        held = client.get_job(strict)
        assert held.state == S.PENDING and held.attempt_count == 0
        (reason,) = held.pending_reasons
        assert reason.resource == "verification" and not reason.resolvable
        assert "allow-unverified" in reason.message, reason.message
