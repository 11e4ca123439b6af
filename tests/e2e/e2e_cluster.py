"""Helpers of the end-to-end tests: the :class:`Cluster` they share, and polling."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.agent_fixtures import TcpProxy
from harness.fleet import LocalFleet, ManagedProcess
from rigshift.v1 import job_pb2

TERMINAL = {job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED}


@dataclass
class Cluster:
    """What the e2e tests get: the fleet, its client, the proxy in front of rig-b."""

    fleet: LocalFleet
    client: Any
    proxy: TcpProxy
    out: Path
    rig_a: ManagedProcess
    rig_b: ManagedProcess

    @property
    def address(self) -> str:
        """The broker's address."""
        return self.fleet.broker_address

    def submit(self, lines: list[str], **kw: Any) -> str:
        """Submit ``python -c <lines>`` with ``E2E_OUT`` in its environment; the job name."""
        env = {"E2E_OUT": str(self.out), **kw.pop("env", {})}
        job = self.client.create_job([sys.executable, "-c", "\n".join(lines)], env=env, **kw)
        return str(job.name)

    def wait(self, job: str, states: set[int] | None = None, timeout_s: float = 60.0) -> Any:
        """Poll until the job reaches one of ``states`` (default: any final state)."""
        states = states or TERMINAL
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.client.get_job(job)
            if got.state in states:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{job} is {job_pb2.Job.State.Name(got.state)} after {timeout_s} s: "
                    f"{got.status_message}\n--- rig-a ---\n{self.rig_a.log_tail()}"
                    f"\n--- rig-b ---\n{self.rig_b.log_tail()}"
                )
            time.sleep(0.1)


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll a condition every 20 ms."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
