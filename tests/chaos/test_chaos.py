"""Chaos: kill -9 the broker and agents while jobs run; nothing is lost, done twice or billed twice.

A real broker process (SQLite), three real agent processes (simulated GPUs,
the `local` executor so the run fits CI's budget; the Ray path is covered by
tests/e2e), 50 one-GPU jobs of 1-3 s. While they run the broker is killed with
SIGKILL twice and restarted on the same database and port, and a rig (the
agent and every process it started, as when a rig loses power) is killed three
times and restarted with its saved identity. At the end:

- every job is final (and, with attempts to spare, SUCCEEDED);
- no job ever ran in two processes at the same time (each job process writes
  its start and a heartbeat every 50 ms; the attempts' intervals must not overlap);
- `rigshift admin verify-ledger` passes: the ledger balances, every ended
  attempt is settled exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import admin_group
from rigshift.v1 import job_pb2
from worker_agent.fleet import LocalFleet

JOBS = 50
AGENTS = 3
BROKER_KILLS = 2
AGENT_KILLS = 3

JOB = r"""
import os, sys, time, pathlib
out = pathlib.Path(sys.argv[1])
seconds = float(sys.argv[2])
tag = f"{os.environ['RIGSHIFT_JOB_ID']}.{os.environ['RIGSHIFT_ATTEMPT']}.{os.getpid()}"
(out / f"{tag}.start").write_text(repr(time.time()))
alive = out / f"{tag}.alive"
end = time.time() + seconds
while time.time() < end:
    alive.write_text(repr(time.time()))
    time.sleep(0.05)
alive.write_text(repr(time.time()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(p) -> None:
    """SIGKILL a process and everything it started, at once (a rig losing power)."""
    pids = [p.proc.pid, *p.live_tree()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.proc.wait(timeout=10)


@pytest.mark.timeout(420)
def test_kill_9_broker_and_rigs_while_jobs_run(tmp_path: Path):
    rnd = random.Random(7)
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "job.py"
    script.write_text(JOB)
    port = _free_port()
    listen = ("--listen", f"127.0.0.1:{port}")
    common = {"heartbeat_interval_s": 1, "lease_ttl_s": 5, "drain_grace_s": 1, "executor": "local"}
    fleet = LocalFleet(tmp_path / "fleet")
    try:
        fleet.start_broker(*listen, lease_ttl_s=5, heartbeat_interval_s=1)
        client = fleet.client()
        token = client.create_farm("chaos").enrollment_token
        agents = {}
        for i in range(AGENTS):
            name = f"rig-{i}"
            agents[name] = fleet.start_agent(name, token, simulate="RTX3090x2", **common)
        fleet.wait_workers(AGENTS)
        names = []
        for i in range(JOBS):
            seconds = 1.0 + (i % 5) * 0.5
            job = client.create_job(
                [sys.executable, str(script), str(out), str(seconds)],
                gpu_count=1,
                max_attempts=20,
                display_name=f"chaos-{i}",
            )
            names.append(job.name)

        # The chaos: interleave broker and rig kills while the queue drains.
        events = ["broker"] * BROKER_KILLS + ["rig"] * AGENT_KILLS
        rnd.shuffle(events)
        for what in events:
            time.sleep(rnd.uniform(1.5, 3.0))
            if what == "broker":
                fleet.broker.proc.send_signal(signal.SIGKILL)
                fleet.broker.proc.wait(timeout=10)
                fleet.processes.remove(fleet.broker)
                time.sleep(rnd.uniform(0.5, 1.5))
                fleet.start_broker(*listen, lease_ttl_s=5, heartbeat_interval_s=1)
            else:
                name = rnd.choice(sorted(agents))
                _kill_tree(agents[name])
                fleet.processes.remove(agents[name])
                time.sleep(rnd.uniform(0.2, 1.0))
                agents[name] = fleet.start_agent(name, token, simulate="RTX3090x2", **common)

        # Everything settles.
        deadline = time.monotonic() + 240
        final = {}
        terminal = {job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED}
        while time.monotonic() < deadline:
            try:
                jobs = {j.name: j for j in client.iter_jobs()}
            except Exception:  # the restarted broker may still be coming up
                time.sleep(0.5)
                continue
            final = {n: jobs[n] for n in names}
            if all(j.state in terminal for j in final.values()):
                break
            time.sleep(0.5)
        states = {job_pb2.Job.State.Name(j.state) for j in final.values()}
        assert states == {"SUCCEEDED"}, {
            n: (job_pb2.Job.State.Name(j.state), j.status_message) for n, j in final.items()
        }
        attempts = sum(len(j.attempts) for j in final.values())
        assert attempts >= JOBS
    finally:
        fleet.stop()
    assert not fleet.leftovers()

    # No job ran in two processes at once.
    runs: dict[str, list[tuple[float, float, str]]] = {}
    for start in out.glob("*.start"):
        job_id, attempt, pid = start.name.split(".")[:3]
        alive = start.with_name(f"{job_id}.{attempt}.{pid}.alive")
        began = float(start.read_text())
        ended = float(alive.read_text()) if alive.exists() else began
        runs.setdefault(job_id, []).append((began, ended, f"attempt {attempt} pid {pid}"))
    assert len(runs) == JOBS
    for job_id, intervals in runs.items():
        intervals.sort()
        for (_, a1, a), (b0, _, b) in itertools.pairwise(intervals):
            assert b0 >= a1, f"job {job_id}: {a} ran until {a1:.2f} but {b} started at {b0:.2f}"

    # The ledger balances and every attempt is settled exactly once.
    result = CliRunner().invoke(
        admin_group, ["verify-ledger", "--home", str(tmp_path / "fleet" / "broker")]
    )
    assert result.exit_code == 0, result.output
    assert "settled exactly once" in result.output
