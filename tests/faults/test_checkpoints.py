"""Checkpoints that change every 0.5 s, and a rig that dies: real processes end to end.

A real broker process and real agent processes (``LocalFleet``, simulated one-GPU
rigs, the ``local`` executor, the agent's default checkpoint settings: a scan every
2 s, uploads at least 10 s apart). The job rewrites its checkpoint (two files, each
written atomically) every 0.5 s, so its directory never stays the same for a whole
scan: the old rule never uploaded it. Once the broker holds a checkpoint and the job
is at step 30, rig-a is killed as a rig losing power (the agent and every process it
started, SIGKILL, as ``benchmarks/chaos.py`` does). The lease expires, the broker
requeues the job on rig-b, and attempt 2 resumes from the last checkpoint the broker
got. Two ways: the agent watching the directory, and the job signalling each
checkpoint with ``client.checkpoint.checkpoint_complete()`` (then the restored
checkpoint is also one whole checkpoint: both files of the same step).

How stale the resumed checkpoint was at the kill (seconds and steps) is printed (run
with ``-s``); nothing here is timed against a bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from harness.fleet import LocalFleet, ManagedProcess
from rigshift.v1 import job_pb2

pytestmark = pytest.mark.timeout(120)

PERIOD_S = 0.5
KILL_AT_STEP = 30
TOTAL_STEPS = 60

JOB = r"""
import json, os, sys, time
out, total, period, signalled = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ckpt, attempt = os.environ["RIGSHIFT_CHECKPOINT_DIR"], os.environ["RIGSHIFT_ATTEMPT"]
if signalled == "1":
    from client.checkpoint import checkpoint_complete


def put(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


state_path, weights_path = os.path.join(ckpt, "state.json"), os.path.join(ckpt, "weights.bin")
state, whole = {"step": 0, "time": 0.0}, True
if os.path.exists(state_path):
    state = json.load(open(state_path))
    whole = open(weights_path, "rb").read()[65536:].decode() == str(state["step"])
    print(f"resumed from step {state['step']}", flush=True)
put(os.path.join(out, f"attempt-{attempt}.json"),
    json.dumps({"resumed": state, "whole": whole, "start": time.time()}).encode())
while state["step"] < total:
    time.sleep(period)
    state = {"step": state["step"] + 1, "time": time.time()}
    put(weights_path, os.urandom(65536) + str(state["step"]).encode())
    put(state_path, json.dumps(state).encode())
    if signalled == "1":
        checkpoint_complete()
    put(os.path.join(out, f"attempt-{attempt}.progress"), json.dumps(state).encode())
print(f"done at step {state['step']}", flush=True)
"""


def kill_rig(p: ManagedProcess) -> None:
    """SIGKILL the agent and everything it started, at once (a rig losing power)."""
    p.remember_children()
    for pid in [p.proc.pid, *p.live_tree()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.proc.wait(timeout=10)


def read_json(path: Path) -> dict:  # type: ignore[type-arg]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("signalled", [False, True], ids=["watched", "signalled"])
def test_a_job_checkpointing_every_half_second_resumes_after_its_rig_dies(
    tmp_path: Path, signalled: bool
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "job.py"
    script.write_text(JOB)
    lease = {"lease_ttl_s": 5, "heartbeat_interval_s": 1}
    agent_opts = {**lease, "drain_grace_s": 1, "executor": "local", "simulate": "RTX3090x1"}
    with LocalFleet(tmp_path / "fleet") as fleet:
        fleet.start_broker(**lease)
        client = fleet.client()
        token = client.create_farm("ckpt").enrollment_token
        rig_a = fleet.start_agent("rig-a", token, **agent_opts)
        fleet.wait_workers(1)
        argv = [sys.executable, str(script), str(out), str(TOTAL_STEPS), str(PERIOD_S)]
        job = client.create_job(
            [*argv, "1" if signalled else "0"],
            display_name="every-half-second",
            max_attempts=3,
        )
        wait_for(lambda: (out / "attempt-1.json").exists(), 60, "attempt 1 to start")
        fleet.start_agent("rig-b", token, **agent_opts)
        fleet.wait_workers(2)

        def at_kill_point() -> bool:
            progress = read_json(out / "attempt-1.progress")
            return progress.get("step", 0) >= KILL_AT_STEP and bool(
                client.get_job(job.name).checkpoint_sha256
            )

        wait_for(at_kill_point, 90, f"step {KILL_AT_STEP} and a checkpoint at the broker")
        uploaded = client.get_job(job.name)
        kill_rig(rig_a)
        killed_at = time.time()
        last = read_json(out / "attempt-1.progress")
        time.sleep(1.0)
        assert read_json(out / "attempt-1.progress") == last  # attempt 1 is really gone
        assert uploaded.checkpoint_sha256  # the broker got a checkpoint off the rig

        resumed = wait_for(
            lambda: read_json(out / "attempt-2.json"), 60, "attempt 2 to start on rig-b"
        )
        done = wait_for(
            lambda: (
                (j := client.get_job(job.name)).state in (job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED)
                and j
            ),
            90,
            "the job to end",
        )
    assert done.state == job_pb2.Job.SUCCEEDED, done.status_message
    assert [a.number for a in done.attempts] == [1, 2]
    assert done.attempts[0].worker != done.attempts[1].worker
    assert done.attempts[0].state == job_pb2.Attempt.LOST

    step = resumed["resumed"]["step"]
    assert 1 <= step <= last["step"]  # resumed from a checkpoint, not from scratch
    if signalled:
        assert resumed["whole"]  # weights and state of the same step: one whole checkpoint
    stale_s = killed_at - resumed["resumed"]["time"]
    print(
        f"\n{'signalled' if signalled else 'watched'}: killed at step {last['step']}; "
        f"attempt 2 resumed from step {step}: {last['step'] - step} steps, {stale_s:.1f} s "
        f"stale at the kill (checkpoint whole: {resumed['whole']}); attempt 2 started "
        f"{resumed['start'] - killed_at:.1f} s after the kill"
    )
