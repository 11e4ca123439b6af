"""A frozen agent (issue 12): SIGSTOP for longer than the lease TTL, then SIGCONT.

The signal goes to the agent's main process only, as when a stalled kernel or an
operator's debugger stops it: its job's process (a child in a session of its own, with
``--executor local``) is not stopped, and the code of the agent that would stop it cannot
run. The job's lease fence (``worker_agent/fence.py``, a process of its own) kills it
at the deadline the agent last wrote, before the broker expires the lease at the TTL and
starts the job again on another rig: the two copies never overlap. Once it runs again,
the agent must find on its own (monotonic) clock that the lease ran out, not report the
old attempt, and stay in the market; the ledger settles each attempt once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from netfaults import FaultFleet

from rigshift.v1 import farm_pb2, job_pb2

S = job_pb2.Job.State
A = job_pb2.Attempt.State


@pytest.mark.timeout(120)
def test_a_frozen_agent_stops_its_requeued_attempt_when_it_resumes(faults: FaultFleet) -> None:
    faults.start_broker()
    token = faults.client().create_farm("faults").enrollment_token
    rig_a = faults.start_agent("rig-a", token)
    faults.fleet.wait_workers(1)
    job = faults.submit(20.0, max_attempts=3)
    faults.wait([job], lambda j: j.state == S.RUNNING, 60, "the job to run on rig-a")
    rig_b = faults.start_agent("rig-b", token)
    faults.fleet.wait_workers(2)
    time.sleep(1.0)

    frozen = time.time()
    os.kill(rig_a.proc.pid, signal.SIGSTOP)
    try:
        faults.wait(
            [job],
            lambda j: len(j.attempts) >= 2 and j.attempts[1].state == A.RUNNING,
            60,
            "the job to run again on rig-b",
        )
        while time.time() < frozen + 10.0:  # frozen for 10 s, past the TTL of 6 s
            time.sleep(0.2)
    finally:
        resumed = time.time()
        os.kill(rig_a.proc.pid, signal.SIGCONT)
    stopped = faults.wait_log(rig_a, r"before the broker may requeue", resumed, 30) - resumed
    back = faults.wait_log(rig_a, r"broker reachable again", resumed, 30) - resumed
    jobs = faults.wait([job], lambda j: j.state == S.SUCCEEDED, 60, "the job to succeed")

    names = {w.hostname: w.name for w in faults.client().iter_workers()}
    first, second = jobs[job].attempts
    assert (first.worker, first.state) == (names["rig-a"], A.LOST)  # never SUCCEEDED
    assert (second.worker, second.state) == (names["rig-b"], A.SUCCEEDED)
    runs = sorted(faults.runs()[job.split("/")[1]])
    assert len(runs) == 2
    (old_start, old_end, _), (new_start, new_end, _) = runs
    assert old_end < new_end  # the old copy was stopped, it did not run to its end
    assert old_end - old_start < 19.0
    # Never two live copies: the fence stopped the old one while its agent was frozen,
    # before the broker requeued the job.
    assert not faults.overlaps(), faults.overlaps()
    assert old_end < resumed
    gap = new_start - old_end
    assert gap > 0
    ok, out = faults.verify_ledger()
    assert ok, out
    # rig-a stayed up and is back in the market.
    assert rig_a.proc.poll() is None, rig_a.log_tail()
    assert not faults.log_lines(rig_a, r"shutdown requested|draining|drained")
    deadline = time.monotonic() + 30
    while not any(
        w.hostname == "rig-a" and w.state == farm_pb2.Worker.ONLINE
        for w in faults.client().iter_workers()
    ):
        assert time.monotonic() < deadline, "rig-a did not come back online"
        time.sleep(0.2)
    assert rig_b.proc.poll() is None

    print(
        f"\nagent frozen (SIGSTOP) 10 s, TTL 6 s:"
        f"\n  broker requeued, copy on rig-b began      {new_start - frozen:5.2f} s after the stop"
        f"\n  the old copy's last heartbeat (fenced)     {old_end - frozen:5.2f} s after the stop"
        f"\n  gap: old copy's last heartbeat to the new copy's start {gap:5.2f} s (no overlap)"
        f"\n  rig-a stopped its attempt (log)            {stopped:5.2f} s after SIGCONT"
        f"\n  heartbeats answered again                  {back:5.2f} s after SIGCONT"
    )
