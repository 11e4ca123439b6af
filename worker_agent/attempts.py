"""The attempts running on this rig: prepare, launch, meter, stop, and say what happened.

One :class:`AttemptRunner` per agent. For each assignment it

1. makes a fresh working directory and fills it from the job's archive
   (sha256-verified, safely extracted), restores a checkpoint into
   ``$RIGSHIFT_CHECKPOINT_DIR`` when the broker names one and the directory is empty;
2. launches the process through the executor with the job's environment;
3. turns process events into job events in the :class:`~worker_agent.outbox.Outbox`
   (``started``, ``log``, periodic ``progress``, ``finished``) and switches the
   GPUs' load so the simulated power model follows the job;
4. meters the energy of its GPUs from the assignment until the process has ended
   (the attempt holds them all that time; they draw idle power until it starts);
5. uploads the checkpoint directory whenever it changes (``checkpoints.py``).

Stopping an attempt (cancel, reconcile, stale, drain hand-back) asks the executor
to kill the process tree; whether a ``finished`` event is reported depends on why:
a hand-back or a lost lease reports nothing, so the broker requeues the attempt.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.checkpoints import CheckpointWatcher
from worker_agent.config import AgentConfig
from worker_agent.energy import EnergyMeter
from worker_agent.executor import Execution, Executor, LaunchSpec, job_environment
from worker_agent.gpu import GpuBackend, Load
from worker_agent.outbox import AttemptKey, Outbox
from worker_agent.process import ProcExited, ProcOutput, ProcStarted
from worker_agent.workdir import ArchiveError, Workspace, safe_extract, save_verified

__all__ = ["AttemptRunner"]

log = logging.getLogger("rigshift.agent.attempts")

Downloader = Callable[[str], AsyncIterator[bytes]]


class _Refused(Exception):
    """The assignment cannot run here; reported as exit status 127 with the reason."""


@dataclass(slots=True, eq=False)
class _Run:
    key: AttemptKey
    assignment: ws.Assignment
    task: asyncio.Task[None] | None = None
    execution: Execution | None = None
    stop_reason: str = ""
    report: bool = True
    started: bool = False
    checkpoint_dir: Path | None = None
    watch: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class AttemptRunner:
    """Starts and stops the rig's attempts; ``runs`` holds the live ones by (job, attempt)."""

    def __init__(
        self,
        config: AgentConfig,
        backend: GpuBackend,
        meter: EnergyMeter,
        executor: Executor,
        outbox: Outbox,
        workspace: Workspace,
        download: Downloader,
        wake: asyncio.Event,
        checkpoints: CheckpointWatcher | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.meter = meter
        self.executor = executor
        self.outbox = outbox
        self.workspace = workspace
        self.download = download
        self.wake = wake
        self.checkpoints = checkpoints
        self.runs: dict[AttemptKey, _Run] = {}
        self.accepting = True
        self.started_total = 0
        self._gpu_indices = {g.index for g in backend.gpus()}
        self._background: set[asyncio.Task[None]] = set()
        self._download_locks: dict[str, asyncio.Lock] = {}

    # --- control ------------------------------------------------------------------------

    def start(self, assignment: ws.Assignment) -> None:
        """Run an assignment unless it already runs here or the agent is draining."""
        key = (assignment.job, assignment.attempt)
        if key in self.runs:
            return
        if not self.accepting:
            log.info("draining: not starting %s attempt %d", *key)
            return
        run = _Run(key, assignment)
        self.runs[key] = run
        self.started_total += 1
        run.task = asyncio.create_task(self._run(run), name=f"{key[0]}#{key[1]}")

    def stop(self, key: AttemptKey, reason: str, *, report: bool) -> None:
        """Kill an attempt's process tree; a no-op for an attempt not running here."""
        run = self.runs.get(key)
        if run is None or run.stop_reason:
            return
        log.info("stopping %s attempt %d: %s", key[0], key[1], reason)
        run.stop_reason = reason
        run.report = report
        if run.execution is not None:
            self._spawn(run.execution.cancel(reason))

    async def stop_all(self, reason: str, *, report: bool, wait: bool) -> None:
        """Stop every attempt; with ``wait``, until their processes are gone."""
        runs = list(self.runs.values())
        for run in runs:
            self.stop(run.key, reason, report=report)
        if wait and runs:
            waits = [asyncio.create_task(r.done.wait()) for r in runs]
            await asyncio.wait(waits, timeout=self.config.cancel_grace_s + 3.0)
            for w in waits:
                w.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def report_progress(self) -> None:
        """Queue a cumulative-energy progress event for every started attempt."""
        now = time.time()
        for run in self.runs.values():
            if run.started and not run.stop_reason:
                self.outbox.progress(run.key, self.meter.joules(run.key), now)
        self.wake.set()

    # --- one attempt -------------------------------------------------------------------

    async def _fetch(self, sha256: str, into: Path) -> None:
        archive = self.workspace.archive_path(sha256)
        # Attempts that need the same archive at once wait for one download.
        async with self._download_locks.setdefault(sha256, asyncio.Lock()):
            if not archive.exists():
                await save_verified(
                    self.download(sha256),
                    sha256,
                    archive,
                    max_bytes=self.config.max_working_dir_bytes,
                )
        await asyncio.to_thread(safe_extract, archive, into)

    async def _prepare(self, run: _Run) -> LaunchSpec:
        a = run.assignment
        indices = list(a.gpu_indices)
        if (
            not indices
            or not set(indices) <= self._gpu_indices
            or len(set(indices)) != len(indices)
        ):
            raise _Refused(
                f"GPU indices {indices} do not match this rig's {sorted(self._gpu_indices)}"
            )
        if not a.spec.command:
            raise _Refused("the job has no command")
        cwd = self.workspace.attempt_dir(a.job, a.attempt)
        if a.spec.working_dir_sha256:
            await self._fetch(a.spec.working_dir_sha256, cwd)
        checkpoint_dir = self.workspace.checkpoint_dir(a.job)
        if a.checkpoint_sha256 and not any(checkpoint_dir.iterdir()):
            try:
                await self._fetch(a.checkpoint_sha256, checkpoint_dir)
            except (ArchiveError, OSError, grpc.aio.AioRpcError) as err:
                # Starting over beats failing the job: say so in its output.
                why = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
                note = (
                    f"[rigshift-agent: checkpoint {a.checkpoint_sha256[:12]} not restored: {why}]\n"
                )
                self.outbox.log(run.key, note, time.time())
                log.warning("%s attempt %d: %s", run.key[0], run.key[1], note.strip())
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
                checkpoint_dir.mkdir(parents=True)
        run.checkpoint_dir = checkpoint_dir
        env = job_environment(
            os.environ,
            a.spec.env,
            job=a.job,
            attempt=a.attempt,
            checkpoint_dir=str(checkpoint_dir.resolve()),
            gpu_indices=indices,
        )
        return LaunchSpec(
            job=a.job,
            attempt=a.attempt,
            argv=list(a.spec.command),
            env=env,
            cwd=str(cwd.resolve()),
            gpu_indices=indices,
            max_duration_s=float(a.spec.max_duration_seconds),
        )

    async def _run(self, run: _Run) -> None:
        key = run.key
        indices = list(run.assignment.gpu_indices)
        code, message = 127, ""
        # The attempt holds its GPUs from the assignment on: their energy is its energy.
        self.meter.start(key, [i for i in indices if i in self._gpu_indices])
        try:
            spec = await self._prepare(run)
            if run.stop_reason:
                code = -signal.SIGTERM
                return
            run.execution = execution = self.executor.launch(spec)
            if run.stop_reason:  # stopped while launching
                self._spawn(execution.cancel(run.stop_reason))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            async for event in execution.events():
                if isinstance(event, ProcStarted):
                    run.started = True
                    if self.checkpoints is not None and run.checkpoint_dir is not None:
                        run.watch = asyncio.create_task(
                            self.checkpoints.watch(key, run.checkpoint_dir)
                        )
                    self.backend.set_load(indices, Load.TRAINING)
                    self.outbox.started(key, time.time())
                    self.wake.set()
                    log.info("%s attempt %d started (pid %d on GPUs %s)", *key, event.pid, indices)
                elif isinstance(event, ProcOutput):
                    self.outbox.log(key, decoder.decode(event.data), time.time())
                    self.wake.set()
                elif isinstance(event, ProcExited):
                    code, message = event.exit_code, event.message
            self.outbox.log(key, decoder.decode(b"", final=True), time.time())
        except (_Refused, ArchiveError, OSError, ValueError) as err:
            message = f"failed to start: {err}"
            log.warning("%s attempt %d %s", key[0], key[1], message)
        except grpc.aio.AioRpcError as err:
            message = (
                f"failed to start: cannot download an archive: {err.code().name} {err.details()}"
            )
            log.warning("%s attempt %d %s", key[0], key[1], message)
        except asyncio.CancelledError:
            if run.execution is not None:
                with contextlib.suppress(Exception):
                    await run.execution.cancel("agent stopped")
            raise
        finally:
            self._finish(run, code, message)

    def _finish(self, run: _Run, code: int, message: str) -> None:
        key = run.key
        if run.watch is not None:
            run.watch.cancel()
        indices = list(run.assignment.gpu_indices)
        if run.started:
            self.backend.set_load(indices, Load.IDLE)
        energy = self.meter.stop(key)
        if run.stop_reason:
            message = run.stop_reason
        if run.report:
            self.outbox.finished(key, code, energy, message, time.time())
        else:
            self.outbox.forget(key)
        self.wake.set()
        self.runs.pop(key, None)
        with contextlib.suppress(OSError, ValueError):
            self.workspace.clean_attempt(key[0], key[1], succeeded=code == 0 and run.report)
        log.info(
            "%s attempt %d ended: exit %d, %d J%s%s",
            key[0],
            key[1],
            code,
            energy,
            f" ({message})" if message else "",
            "" if run.report else " [not reported: handed back]",
        )
        run.done.set()
