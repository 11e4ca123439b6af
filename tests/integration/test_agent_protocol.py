"""The agent's session against a scripted broker (``scripted_broker.py``, a real gRPC
server on port 0): registration and identity, jobs with their environment and sequenced
events, report retries with the same numbers, reconcile, cancellation, stale attempts,
re-registration, drain and hand-back. Jobs run through the LocalExecutor on a simulated
rig, so these tests need no Ray; the Ray path is covered in tests/ray and tests/e2e.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from scripted_broker import FakeBroker, run_session, script, until

from harness.agent_fixtures import make_assignment
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.agent import Agent, AgentError
from worker_agent.process import alive as _alive


def test_registers_heartbeats_and_keeps_its_identity(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        await until(lambda: fake.heartbeats >= 2, what="heartbeats")
        assert agent.worker == "workers/w1"
        # broker says 1 s, config 0.3 s: the stricter wins
        assert agent.heartbeat_interval_s == 0.3

    fake = run_session(tmp_path, body)
    reg = fake.registrations[0]
    assert (reg.hostname, reg.worker, len(reg.gpus)) == ("rig-test", "", 4)
    assert reg.gpus[0].model == "RTX 3090" and reg.gpus[0].price_micros_per_gpu_hour == 250_000
    saved = json.loads((tmp_path / "agent" / "identity.json").read_text())
    assert saved["worker"] == "workers/w1" and saved["credential"] == "cred-1"
    assert (tmp_path / "agent" / "identity.json").stat().st_mode & 0o777 == 0o600

    async def again(fake: FakeBroker, agent: Agent) -> None:
        assert agent.worker == "workers/w1"

    fake = run_session(tmp_path, again, price_micros_per_gpu_hour=123)
    assert fake.registrations[0].worker == "workers/w1"  # the same worker after a restart
    assert fake.registrations[0].gpus[0].price_micros_per_gpu_hour == 123


def test_a_refused_enrollment_token_stops_the_agent(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        raise AssertionError("must not get here")

    with pytest.raises(AgentError, match="enrollment token not recognised"):
        run_session(tmp_path, body, enrollment_token="bad")


def test_job_runs_with_its_environment_and_sequenced_events(tmp_path: Path) -> None:
    cmd = script(
        "import os, time",
        "for k in ('RIGSHIFT_JOB_ID','RIGSHIFT_ATTEMPT','CUDA_VISIBLE_DEVICES','FOO'):",
        "    print(k, os.environ.get(k), flush=True)",
        "print('checkpoint dir exists', os.path.isdir(os.environ['RIGSHIFT_CHECKPOINT_DIR']))",
        "print('token hidden', 'RAY_AUTH_TOKEN_PATH' not in os.environ)",
        "time.sleep(1.0)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/j1", gpus=[1, 3], command=cmd, env={"FOO": "x"}))
        await until(lambda: fake.finished("jobs/j1"), what="finished")

    os.environ["RAY_AUTH_TOKEN_PATH"] = "/secret"
    try:
        fake = run_session(tmp_path, body)
    finally:
        del os.environ["RAY_AUTH_TOKEN_PATH"]
    out = fake.output("jobs/j1")
    assert "RIGSHIFT_JOB_ID j1\nRIGSHIFT_ATTEMPT 1\nCUDA_VISIBLE_DEVICES 1,3\nFOO x\n" in out
    assert "checkpoint dir exists True" in out and "token hidden True" in out
    kinds = fake.kinds("jobs/j1")
    assert kinds[:2] == ["preparing", "started"]
    assert kinds[-1] == "finished" and "progress" in kinds
    seqs = [e.sequence for e in fake.applied[("jobs/j1", 1)]]
    assert seqs == list(range(1, len(seqs) + 1))
    finished = fake.finished("jobs/j1")
    assert finished is not None and finished.exit_code == 0
    # two RTX 3090s training for about 1 s: 2 x ~300 W x ~1 s
    assert 300 < finished.energy_joules < 1500
    progress = [
        e.progress.energy_joules for e in fake.applied[("jobs/j1", 1)] if e.HasField("progress")
    ]
    assert progress == sorted(progress) and progress[-1] <= finished.energy_joules


def test_failed_reports_are_retried_with_the_same_numbers(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.fail_reports = 3
        fake.push(assignment=make_assignment("jobs/r", command=script("print('a'); print('b')")))
        await until(lambda: fake.finished("jobs/r"), what="finished")

    fake = run_session(tmp_path, body)
    assert fake.report_calls[0] == fake.report_calls[1] == fake.report_calls[2]
    assert fake.report_calls[3][: len(fake.report_calls[0])] == fake.report_calls[0]
    assert fake.output("jobs/r") == "a\nb\n"
    assert fake.finished("jobs/r").exit_code == 0  # type: ignore[union-attr]


def test_reconcile_starts_missing_and_stops_unlisted(tmp_path: Path) -> None:
    long = script("import time; print('up', flush=True); time.sleep(600)")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/old", command=long))
        await until(lambda: "started" in fake.kinds("jobs/old"), what="old started")
        # The broker restarts: the new stream's reconcile lists only jobs/new.
        fake.reconcile = [make_assignment("jobs/new", gpus=[2], command=script("print('new')"))]
        fake.streams[-1].put_nowait(None)
        await until(lambda: fake.finished("jobs/new") and fake.finished("jobs/old"), what="both")

    fake = run_session(tmp_path, body)
    assert len(fake.streams) >= 2  # reconnected
    assert fake.output("jobs/new") == "new\n"
    old = fake.finished("jobs/old")
    assert old is not None and old.exit_code == -15 and "reconcile" in old.message


def test_a_reconcile_does_not_rerun_a_finished_attempt(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/once", command=script("print('ran')"))
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/once"), what="finished")
        fake.reconcile = [a]  # a broker that has not caught up yet
        fake.streams[-1].put_nowait(None)
        await until(lambda: len(fake.streams) >= 2, what="reconnect")
        # The agent handles a stream's instructions in order and begins attempts in that
        # order (each reports `preparing` as it begins): once an assignment sent after the
        # reconcile has finished and been reported, the reconcile was handled, and a rerun
        # it began has had its `preparing` sent before.
        after = make_assignment("jobs/after", gpus=[1], command=script("print('after')"))
        fake.push(assignment=after)
        await until(lambda: fake.finished("jobs/after"), what="an assignment after the reconcile")

    fake = run_session(tmp_path, body)
    assert fake.output("jobs/once") == "ran\n"
    assert fake.kinds("jobs/once").count("started") == 1
    # A rerun would number its events from 1 again (the finished attempt's counter is
    # released), which the fake drops as duplicates: look at everything the agent sent.
    sent = [
        e.WhichOneof("kind") for call in fake.report_calls for e in call if e.job == "jobs/once"
    ]
    assert sent.count("preparing") == 1


def test_cancellation_kills_the_process_tree_within_5_s(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cmd = script(
        "import os, signal, time",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",  # stubborn: needs SIGKILL
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "time.sleep(600)",
    )
    took: list[float] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/c", command=cmd))
        await until(lambda: pid_file.exists() and pid_file.read_text(), what="pid")
        t0 = time.monotonic()
        fake.push(cancellation=ws.Cancellation(job="jobs/c", attempt=1, reason="by client"))
        await until(lambda: not _alive(int(pid_file.read_text())), timeout=5.0, what="kill")
        took.append(time.monotonic() - t0)
        await until(lambda: fake.finished("jobs/c"), what="finished")

    fake = run_session(tmp_path, body)
    assert took[0] < 5.0
    f = fake.finished("jobs/c")
    assert f is not None and f.exit_code == -9 and f.message == "cancelled: by client"


def test_stale_attempts_are_stopped(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.stale = [ws.Cancellation(job="jobs/s", attempt=1, reason="attempt LOST")]
        fake.push(
            assignment=make_assignment("jobs/s", command=script("import time; time.sleep(600)"))
        )
        await until(lambda: fake.finished("jobs/s"), what="stopped")

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/s").message == "stale: attempt LOST"  # type: ignore[union-attr]


def test_credential_refused_registers_again_as_the_same_worker(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.credential = "cred-2"  # e.g. the broker lost its credential table
        await until(lambda: len(fake.registrations) >= 2, what="re-registration")
        fake.credential = "cred-1"  # the fake hands out cred-1 on registration
        before = fake.heartbeats
        await until(lambda: fake.heartbeats > before, what="heartbeats again")

    fake = run_session(tmp_path, body)
    assert fake.registrations[1].worker == "workers/w1"


def test_an_unhealthy_rig_has_the_broker_drain_it_and_keeps_running(tmp_path: Path) -> None:
    """AttemptRunner.on_unhealthy (a full state directory) asks the broker to place
    nothing more on the rig, until it takes the request; the agent itself goes on."""
    cmd = script("import time; time.sleep(1.5); print('done')")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/u", command=cmd)
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/u"), what="started")
        fake.fail_drains = 2  # the broker does not take the first two requests
        assert agent.runner is not None and agent.runner.on_unhealthy is not None
        agent.runner.on_unhealthy("the rig's disk is full: ENOSPC")
        await until(lambda: fake.drains, what="DrainWorker")
        await until(lambda: fake.finished("jobs/u"), what="the running job to finish")
        assert agent.state == "online"
        assert fake.drains == ["workers/w1"]  # once taken, not asked again

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/u").exit_code == 0  # type: ignore[union-attr]


def test_drain_lets_running_jobs_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(
            assignment=make_assignment(
                "jobs/d", command=script("import time; time.sleep(1); print('done')")
            )
        )
        await until(lambda: "started" in fake.kinds("jobs/d"), what="started")
        agent.request_shutdown()
        await until(lambda: agent.state == "draining", what="draining")
        fake.push(assignment=make_assignment("jobs/late", gpus=[1]))
        await agent.shutdown()
        agent.request_shutdown()  # twice is fine
        await agent.shutdown()
        assert agent.state == "stopped"

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/d").exit_code == 0  # type: ignore[union-attr]
    assert fake.output("jobs/d") == "done\n"
    assert fake.kinds("jobs/late") == []


def test_drain_hands_back_what_outlives_the_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cmd = script(
        "import os, time",
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "time.sleep(600)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/h", command=cmd))
        await until(lambda: pid_file.exists() and pid_file.read_text(), what="pid")
        t0 = time.monotonic()
        await agent.shutdown()
        assert 0.4 < time.monotonic() - t0 < 5.0
        assert not _alive(int(pid_file.read_text()))

    fake = run_session(tmp_path, body, drain_grace_s=0.5)
    assert "started" in fake.kinds("jobs/h")
    assert "finished" not in fake.kinds("jobs/h")  # handed back: the broker requeues it
