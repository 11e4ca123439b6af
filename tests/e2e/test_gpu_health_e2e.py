"""One GPU falls off the bus mid-run: real broker, real agents on Ray (issue 15).

A rig of two simulated RTX 3090s (``--simulate-fault 1:xid79:AFTER``) runs two
checkpointing jobs, one per GPU. When XID 79 strikes GPU 1, the agent quarantines that
GPU only: its job goes back to PENDING and resumes from its checkpoint on a second rig,
while the neighbour on GPU 0 keeps running and finishes on the same rig with a single
attempt. The GPU shows QUARANTINED with its reason, and the ledger balances.

The jobs wait for a file the test writes, never for a time, so nothing here races a
clock except the fault itself, which strikes ``FAULT_AFTER_S`` after the agent starts:
by then both jobs have long been running with a checkpoint on the broker (they are
queued before the rig exists and placed the moment it registers).
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
FAULT_AFTER_S = 40

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


def _gpu(fleet: LocalFleet, hostname: str, index: int) -> farm_pb2.Gpu:
    for worker in fleet.client().list_workers().workers:
        if worker.hostname == hostname:
            return next(g for g in worker.gpus if g.index == index)
    raise AssertionError(f"no worker {hostname}")


def test_xid79_quarantines_one_gpu_its_job_resumes_elsewhere_the_neighbour_finishes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text("[health]\ninterval_s = 0.5\nprobation_s = 3600\n")
    common = {"heartbeat_interval_s": 1, "lease_ttl_s": 6, "drain_grace_s": 5}
    with LocalFleet(tmp_path / "fleet") as fleet:
        fleet.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
        client = fleet.client()
        farm = client.create_farm("riser-farm")
        command = [sys.executable, "-c", "\n".join(JOB)]
        env = {"E2E_OUT": str(out)}
        jobs = [client.create_job(command, env=env, gpu_model="RTX 3090").name for _ in range(2)]

        fleet.start_agent(
            "sick",
            farm.enrollment_token,
            "--simulate-fault",
            f"1:xid79:{FAULT_AFTER_S}",
            simulate="RTX3090x2",
            config=str(config),
            **common,
        )
        wait_until(
            lambda: all(len(client.get_job(j).checkpoint_sha256) == 64 for j in jobs),
            FAULT_AFTER_S,
            "both jobs running on the sick rig with a checkpoint on the broker",
        )
        placed = {client.get_job(j).attempts[0].gpu_indices[0]: j for j in jobs}
        assert sorted(placed) == [0, 1], placed
        faulted, neighbour = placed[1], placed[0]
        sick = client.get_job(neighbour).attempts[0].worker

        # The second rig is where the faulted job can go (same model, nothing else free).
        fleet.start_agent("spare", farm.enrollment_token, simulate="RTX3090x1", **common)

        moved = _wait_state(client, faulted, S.SUCCEEDED, timeout_s=FAULT_AFTER_S + 90)
        first, second = moved.attempts
        assert first.worker == sick and first.gpu_indices == [1]
        assert second.worker != sick
        seen = json.loads((out / f"{faulted.split('/')[1]}-2").read_text())["seen"]
        assert seen == {"step": 1}  # it resumed from the checkpoint written on GPU 1
        kinds = {e.kind for e in moved.sla_events}
        assert job_pb2.SlaEvent.INTERRUPTION in kinds, moved.sla_events

        gpu1 = _gpu(fleet, "sick", 1)
        assert gpu1.state == farm_pb2.Gpu.QUARANTINED
        assert "XID 79" in gpu1.quarantine_reason and gpu1.quarantine_time.seconds > 0
        # The neighbour never stopped: still its first attempt, on GPU 0 of the sick rig.
        still = client.get_job(neighbour)
        assert still.state == S.RUNNING and still.attempt_count == 1, still
        assert _gpu(fleet, "sick", 0).state == farm_pb2.Gpu.LEASED

        (out / "release").write_text("")
        done = _wait_state(client, neighbour, S.SUCCEEDED, timeout_s=60)
        assert done.attempt_count == 1 and done.attempts[0].worker == sick
        assert done.attempts[0].gpu_indices == [0]

        ledger = subprocess.run(
            [*rigshift_argv(), "admin", "verify-ledger", "--db", _db(fleet), "--json"],
            env={**os.environ, **fleet.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ledger.returncode == 0, ledger.stdout + ledger.stderr
        assert json.loads(ledger.stdout)["ok"] is True


def _db(fleet: LocalFleet) -> str:
    return f"sqlite:///{fleet.root / 'broker' / 'broker.db'}"


def _wait_state(client: object, job: str, state: int, timeout_s: float) -> job_pb2.Job:
    got: list[job_pb2.Job] = []

    def reached() -> bool:
        got[:] = [client.get_job(job)]  # type: ignore[attr-defined]
        return got[0].state == state or got[0].state in (S.FAILED, S.CANCELLED)

    wait_until(reached, timeout_s, f"{job} to reach {S.State.Name(state)}")
    assert got[0].state == state, got[0]
    return got[0]
