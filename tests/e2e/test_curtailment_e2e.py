"""A grid curtailment end to end: real broker, real agents on Ray (issue 16).

Farm A's rig runs a checkpointing spot job. ``rigshift farm curtail A --start now
--duration 10m``: the agent is told to stop it (SIGTERM within its grace), the job goes
back to PENDING with a CURTAILED SLA event, is placed on farm B and resumes from its
checkpoint there. While the window is on, a job that finds B full stays PENDING and its
pending reasons name the curtailed farm; A's GPU holds no job. The ledger balances.

The jobs wait for a file the test writes, never for a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_cluster import wait_until

from harness.fleet import LocalFleet, rigshift_argv
from rigshift.v1 import farm_pb2, job_pb2

pytestmark = pytest.mark.timeout(240)

S = job_pb2.Job
A = job_pb2.Attempt

# Resume: report what the checkpoint held and finish. Fresh: save step 1, then "train"
# until the test says so (a file in E2E_OUT).
JOB = [
    "import json, os, sys, time",
    "d, out = os.environ['RIGSHIFT_CHECKPOINT_DIR'], os.environ['E2E_OUT']",
    "me = os.environ['RIGSHIFT_JOB_ID'] + '-' + os.environ['RIGSHIFT_ATTEMPT']",
    "path = os.path.join(d, 'state.json')",
    "seen = json.load(open(path)) if os.path.exists(path) else None",
    "open(os.path.join(out, me), 'w').write(json.dumps({'seen': seen}))",
    "print('resumed from', seen, flush=True)",
    "if seen is not None:",
    "    sys.exit(0)",
    "open(path + '.tmp', 'w').write(json.dumps({'step': 1}))",
    "os.replace(path + '.tmp', path)",
    "while not os.path.exists(os.path.join(out, 'release')):",
    "    time.sleep(0.2)",
]


def _rs(fleet: LocalFleet, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*rigshift_argv(), *args],
        env={**os.environ, **fleet.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _job(client: object, job: str) -> job_pb2.Job:
    return client.get_job(job)  # type: ignore[attr-defined, no-any-return]


def test_a_curtailment_moves_a_spot_job_to_another_farm_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    common = {"heartbeat_interval_s": 1, "lease_ttl_s": 6, "drain_grace_s": 5}
    with LocalFleet(tmp_path / "fleet") as fleet:
        fleet.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
        client = fleet.client()
        farm_a = client.create_farm("farm-a")
        farm_b = client.create_farm("farm-b")
        command = [sys.executable, "-c", "\n".join(JOB)]
        env = {"E2E_OUT": str(out)}
        spot = client.create_job(command, env=env, gpu_model="RTX 3090", tier="spot").name
        fleet.start_agent("rig-a", farm_a.enrollment_token, simulate="RTX3090x1", **common)
        wait_until(
            lambda: len(_job(client, spot).checkpoint_sha256) == 64,
            60,
            "the spot job running on farm A with a checkpoint on the broker",
        )
        on_a = _job(client, spot).attempts[0].worker
        fleet.start_agent("rig-b", farm_b.enrollment_token, simulate="RTX3090x1", **common)
        wait_until(lambda: len(client.list_workers().workers) == 2, 60, "rig-b registered")

        farm_id = farm_a.name.removeprefix("farms/")
        made = _rs(
            fleet,
            "farm",
            "--broker",
            fleet.broker_address,
            "curtail",
            farm_id,
            "--start",
            "now",
            "--duration",
            "10m",
            "--reason",
            "grid event",
        )
        assert "ACTIVE" in made.stdout, made.stdout

        def succeeded() -> bool:
            return _job(client, spot).state in (S.SUCCEEDED, S.FAILED, S.CANCELLED)

        wait_until(succeeded, 90, "the spot job to finish on farm B")
        job = _job(client, spot)
        assert job.state == S.SUCCEEDED, job
        first, *_, last = job.attempts
        assert first.worker == on_a and first.state == A.PREEMPTED
        assert last.worker != on_a and last.state == A.SUCCEEDED
        seen = json.loads((out / f"{spot.split('/')[1]}-{last.number}").read_text())["seen"]
        assert seen == {"step": 1}  # resumed from the checkpoint written on farm A
        kinds = [e.kind for e in job.sla_events]
        assert job_pb2.SlaEvent.CURTAILED in kinds and job_pb2.SlaEvent.INTERRUPTION not in kinds

        # B busy, A curtailed: a new job waits, and says why.
        blocker = client.create_job(command, env=env, gpu_model="RTX 3090").name
        wait_until(lambda: _job(client, blocker).state == S.RUNNING, 60, "the blocker running on B")
        assert _job(client, blocker).attempts[0].worker != on_a
        waiting = client.create_job(command, env=env, gpu_model="RTX 3090").name
        wait_until(
            lambda: any(
                "curtailed until" in r.message for r in _job(client, waiting).pending_reasons
            ),
            30,
            "the waiting job's pending reasons to name the curtailed farm",
        )
        reasons = [r.message for r in _job(client, waiting).pending_reasons]
        assert any(farm_id in m for m in reasons), reasons
        assert _job(client, waiting).state == S.PENDING
        (rig_a,) = [w for w in client.list_workers().workers if w.name == on_a]
        assert all(g.state != farm_pb2.Gpu.LEASED and not g.job for g in rig_a.gpus), rig_a

        listed = _rs(fleet, "farm", "--broker", fleet.broker_address, "curtailments", farm_id)
        assert "ACTIVE" in listed.stdout and "grid event" in listed.stdout

        (out / "release").write_text("")
        wait_until(lambda: _job(client, blocker).state == S.SUCCEEDED, 60, "the blocker to finish")
        db = f"sqlite:///{fleet.root / 'broker' / 'broker.db'}"
        ledger = _rs(fleet, "admin", "verify-ledger", "--db", db, "--json")
        assert json.loads(ledger.stdout)["ok"] is True
