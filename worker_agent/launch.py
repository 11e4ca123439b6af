"""What an executor launches, the protocol every executor follows, and the LocalExecutor.

An :class:`Executor` (``start``, ``launch``, ``close``) runs :class:`LaunchSpec` s; each
launch is an :class:`Execution` whose events are :func:`worker_agent.process.run_process`'s
(started, output chunks, exactly one exit). :func:`job_environment` is the job's
environment on every executor. The Ray executor, the agent's real path, is in
``executor.py``.

:class:`LocalExecutor` runs the same generator in a thread of the agent, without
Ray: the agent's unit tests use it, and the benchmark uses it as the baseline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from worker_agent.process import ProcEvent, ProcExited, run_process
from worker_agent.sandbox import Isolation, SandboxPolicy, resolve

__all__ = [
    "SECRET_ENV",
    "Execution",
    "Executor",
    "LaunchSpec",
    "LocalExecutor",
    "job_environment",
    "resolve_isolation",
    "writable_dirs",
]

log = logging.getLogger("rigshift.agent.executor")

#: Environment variables a job never inherits from the agent.
SECRET_ENV = (
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RIGSHIFT_ENROLLMENT_TOKEN",
    "RIGSHIFT_API_KEY",
    "RIGSHIFT_CREDENTIAL",
)


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """One attempt to start: what, where, on which GPUs."""

    job: str
    attempt: int
    argv: list[str]
    env: Mapping[str, str]
    cwd: str
    gpu_indices: list[int]
    max_duration_s: float = 0
    labels: dict[str, str] = field(default_factory=dict)
    readonly: tuple[str, ...] = ()
    """Directories the job reads from the agent's state directory (environment, inputs)."""
    container: str = ""
    """The container's name when the process is ``podman run`` (``containers.py``): it
    runs outside the sandbox, the container being the isolation."""


def job_environment(
    base: Mapping[str, str],
    extra: Mapping[str, str],
    *,
    job: str,
    attempt: int,
    checkpoint_dir: str,
    gpu_indices: list[int],
) -> dict[str, str]:
    """The job's environment: the agent's minus secrets, the job's own, then Rigshift's.

    Rigshift's variables come last so that a job cannot override its GPU binding.
    """
    env = {k: v for k, v in base.items() if k not in SECRET_ENV and not k.startswith("RAY_AUTH")}
    env.update(extra)
    env.update(
        {
            "RIGSHIFT_JOB_ID": job.rpartition("/")[2],
            "RIGSHIFT_ATTEMPT": str(attempt),
            "RIGSHIFT_CHECKPOINT_DIR": checkpoint_dir,
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_indices),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "PYTHONUNBUFFERED": env.get("PYTHONUNBUFFERED", "1"),
        }
    )
    return env


def writable_dirs(spec: LaunchSpec) -> tuple[str, ...]:
    """Directories besides the working directory a job may write: its checkpoint and
    output directories."""
    names = ("RIGSHIFT_CHECKPOINT_DIR", "RIGSHIFT_OUTPUT_DIR")
    return tuple(spec.env[n] for n in names if spec.env.get(n))


async def resolve_isolation(policy: SandboxPolicy | None) -> Isolation | None:
    """Check what isolation this rig gives (runs bwrap once) and log it."""
    if policy is None:
        return None
    isolation = await asyncio.to_thread(resolve, policy)
    for note in isolation.notes:
        log.warning("%s", note)
    log.info("%s", isolation.describe())
    return isolation


class Execution(Protocol):
    """A launched attempt."""

    def events(self) -> AsyncIterator[ProcEvent]:
        """Started, output chunks, then exactly one ProcExited."""
        ...

    async def cancel(self, reason: str) -> None:
        """Stop the process tree (SIGTERM, SIGKILL after the grace); returns at once."""
        ...


class Executor(Protocol):
    """Where attempts run."""

    name: str

    async def start(self) -> None:
        """Prepare (start Ray, warm workers)."""
        ...

    def launch(self, spec: LaunchSpec) -> Execution:
        """Start one attempt."""
        ...

    async def close(self) -> None:
        """Stop everything this executor started."""
        ...


# --- LocalExecutor ---------------------------------------------------------------------


class _ThreadExecution:
    def __init__(
        self,
        spec: LaunchSpec,
        flush_s: float,
        kill_grace_s: float,
        isolation: Isolation | None,
        fence_file: str | None = None,
    ) -> None:
        self._stop = threading.Event()
        self._queue: asyncio.Queue[ProcEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        gen = run_process(
            spec.argv,
            spec.env,
            spec.cwd,
            max_duration_s=spec.max_duration_s,
            flush_s=flush_s,
            kill_grace_s=kill_grace_s,
            stop=self._stop,
            isolation=None if spec.container else isolation,
            writable=writable_dirs(spec),
            readonly=spec.readonly,
            fence_file=fence_file,
            container=spec.container,
        )

        def pump() -> None:
            for event in gen:
                loop.call_soon_threadsafe(self._queue.put_nowait, event)

        self._thread = threading.Thread(target=pump, name=f"attempt-{spec.job}", daemon=True)
        self._thread.start()

    async def events(self) -> AsyncIterator[ProcEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, ProcExited):
                return

    async def cancel(self, reason: str) -> None:
        self._stop.set()


class LocalExecutor:
    """Runs attempts as plain subprocesses of the agent (tests and the benchmark baseline)."""

    name = "local"

    def __init__(
        self,
        *,
        flush_s: float = 0.1,
        kill_grace_s: float = 2.0,
        sandbox: SandboxPolicy | None = None,
    ) -> None:
        self._flush_s = flush_s
        self._kill_grace_s = kill_grace_s
        self._sandbox = sandbox
        self.isolation: Isolation | None = None
        self.fence_file: str | None = None
        """The agent's lease-deadline file: each job gets a lease fence (``fence.py``)."""

    async def start(self) -> None:
        """Resolve the job isolation (nothing else to start)."""
        self.isolation = await resolve_isolation(self._sandbox)

    def launch(self, spec: LaunchSpec) -> Execution:
        """Spawn the process from a thread of the agent."""
        return _ThreadExecution(
            spec, self._flush_s, self._kill_grace_s, self.isolation, self.fence_file
        )

    async def close(self) -> None:
        """Nothing to stop (attempts are cancelled by the agent)."""
