"""The agent's setup phase against the scripted broker of ``scripted_broker``: a
cancel that arrives while the environment is being built stops the build at once, and
a build that fails because of the rig is reported with that cause."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

from scripted_broker import FakeBroker, run_session, until

from harness.agent_fixtures import make_assignment
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.agent import Agent
from worker_agent.config import EnvironmentsConfig

REQS = "humanize==4.9.0\n"
SHA = hashlib.sha256(REQS.encode()).hexdigest()


class SilentIndex:
    """A package index that accepts connections and never answers (a hung mirror)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/simple"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_cancel_while_the_environment_builds_stops_it_at_once(tmp_path: Path, monkeypatch) -> None:
    index = SilentIndex()
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    timing: dict[str, float] = {}

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(
            assignment=make_assignment(
                "jobs/e",
                command=["python", "-c", "print(1)"],
                python_requirements=REQS,
                requirements_sha256=SHA,
            )
        )
        await until(lambda: "installing" in fake.output("jobs/e"), what="the build to start")
        timing["cancel"] = time.monotonic()
        fake.push(cancellation=ws.Cancellation(job="jobs/e", attempt=1, reason="client"))
        await until(lambda: fake.finished("jobs/e"), timeout=30, what="the attempt to end")
        timing["ended"] = time.monotonic()

    try:
        fake = run_session(
            tmp_path,
            body,
            environments=EnvironmentsConfig(index_url=index.url, max_setup_s=300),
        )
    finally:
        index.close()
    finished = fake.finished("jobs/e")
    assert finished.exit_code == -15 and finished.cause == ws.Finished.CAUSE_UNSPECIFIED
    assert "started" not in fake.kinds("jobs/e")
    # No half-built environment is left behind to look ready.
    envs = tmp_path / "agent" / "environments"
    assert not [p for p in envs.iterdir() if p.is_dir()] if envs.exists() else True
    print(f"cancel during setup took {timing['ended'] - timing['cancel']:.2f} s")


def test_an_unreachable_index_is_the_rigs_fault(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(
            assignment=make_assignment(
                "jobs/r",
                command=["python", "-c", "print(1)"],
                python_requirements=REQS,
                requirements_sha256=SHA,
            )
        )
        await until(lambda: fake.finished("jobs/r"), timeout=90, what="the attempt to end")

    fake = run_session(
        tmp_path,
        body,
        environments=EnvironmentsConfig(index_url=f"http://127.0.0.1:{port}/simple"),
    )
    finished = fake.finished("jobs/r")
    assert finished.cause == ws.Finished.SETUP_RIG, finished
    assert finished.exit_code == 127 and "unreachable" in finished.message
    assert finished.setup_milliseconds > 0
    assert fake.kinds("jobs/r")[0] == "preparing" and "started" not in fake.kinds("jobs/r")
