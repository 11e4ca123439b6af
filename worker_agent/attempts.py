"""The attempts running on this rig: prepare, launch, meter, stop, and say what happened.

One :class:`AttemptRunner` per agent. For each assignment it

1. reports ``preparing`` and sets the attempt up, every step's output going to the
   job's logs: the job's image (pulled unless held, ``images.py``; held in use until
   the attempt ends; the process is then ``podman run``, ``containers.py``), its
   Python environment (for an image job, its requirements installed for the image's own
   Python, ``image_python.py``) (built or reused by
   :class:`~worker_agent.environments.EnvironmentCache`; held in use until the attempt
   ends), its inputs (each archive fetched and extracted once per rig into
   ``inputs/<sha256>``, linked read-only as ``$RIGSHIFT_INPUT_DIR/<name>``), a fresh
   working directory filled from the job's archive (sha256-verified, safely
   extracted), an empty ``$RIGSHIFT_OUTPUT_DIR``, and a checkpoint restored into
   ``$RIGSHIFT_CHECKPOINT_DIR`` when the broker names one and the directory is empty.
   A setup that fails ends the attempt with ``finished`` carrying its cause (the
   client's spec, or the rig) so that the broker fails or requeues the job;
   a full disk (``ENOSPC``/``EDQUOT``) is the rig's;
2. launches the process through the executor with the job's environment, and reports
   ``started`` with how long setup took;
3. turns process events into job events in the :class:`~worker_agent.outbox.Outbox`
   (``started``, ``log``, periodic ``progress``, ``finished``) and switches the
   GPUs' load so the simulated power model follows the job;
4. meters the energy of its GPUs from the assignment until the process has ended
   (the attempt holds them all that time; they draw idle power until it starts);
5. uploads consistent snapshots of the checkpoint directory at a bounded rate
   (``checkpoints.py``);
6. when the process has ended, whatever its outcome, archives ``$RIGSHIFT_OUTPUT_DIR``
   and uploads it (``output`` event before ``finished``); an archive over the
   assignment's ``max_output_bytes`` is not uploaded at all and the event says so.

Stopping an attempt (cancel, reconcile, stale, drain hand-back) asks the executor
to kill the process tree; whether a ``finished`` event is reported depends on why:
a hand-back or a lost lease reports nothing, so the broker requeues the attempt.

**A full state directory makes the rig unhealthy.** When the disk under the agent's
state directory is full while an attempt is set up (``ENOSPC``/``EDQUOT`` from its
environment, inputs, working directory, output or checkpoint directory), or a job
that failed leaves less than :data:`DISK_FULL_BELOW_BYTES` free there, the runner
sets :attr:`AttemptRunner.unhealthy` to the reason and calls
:attr:`AttemptRunner.on_unhealthy` once with it: the agent has the broker drain the
worker and ends every assignment that arrives afterwards at once as a setup failure
of the rig's (:meth:`AttemptRunner.refuse`), so the broker requeues it elsewhere. It
stays so until the agent restarts.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
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

from rigshift.archive import ArchiveError, pack_directory, safe_extract
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.checkpoints import CheckpointWatcher
from worker_agent.checkpoints import baseline as checkpoint_baseline
from worker_agent.config import AgentConfig
from worker_agent.containers import container_launch, container_name
from worker_agent.diskspace import DISK_FULL_BELOW_BYTES
from worker_agent.diskspace import disk_full as _disk_full
from worker_agent.diskspace import disk_full_message as _disk_full_message
from worker_agent.diskspace import free_bytes as _free_bytes
from worker_agent.diskspace import read_only as _read_only
from worker_agent.diskspace import remove_tree as _remove_tree
from worker_agent.energy import EnergyMeter
from worker_agent.environments import Environment, EnvironmentCache, SetupError
from worker_agent.gpu import GpuBackend, Load
from worker_agent.image_python import InstallTarget, install_target
from worker_agent.images import ImageCache
from worker_agent.launch import Execution, Executor, LaunchSpec, job_environment
from worker_agent.outbox import AttemptKey, Outbox
from worker_agent.process import ProcExited, ProcOutput, ProcStarted
from worker_agent.workdir import Workspace, directory_bytes, save_verified

__all__ = ["AttemptRunner"]

log = logging.getLogger("rigshift.agent.attempts")

Downloader = Callable[[str], AsyncIterator[bytes]]
OutputUploader = Callable[[str, bytes], Coroutine[Any, Any, None]]
"""``upload(sha256, data)``: store an attempt's output archive in the broker's artifact store."""

#: Tries (with 1, 2 s pauses) to upload an output archive before reporting it as not kept.
OUTPUT_UPLOAD_TRIES = 3

#: Exit status reported for an attempt whose setup failed (its process never ran).
SETUP_FAILED_EXIT = 127


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
    output_dir: Path | None = None
    cwd: Path | None = None
    watch: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    held: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    preparing: asyncio.Task[LaunchSpec] | None = None


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
        environments: EnvironmentCache | None = None,
        upload_output: OutputUploader | None = None,
        images: ImageCache | None = None,
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
        self.environments = environments
        self.upload_output = upload_output
        self.images = images
        """Pulled container images (``images.py``); None: this rig runs no image jobs."""
        self.runs: dict[AttemptKey, _Run] = {}
        self.unhealthy = ""
        """Why this rig takes no more work (its state directory's disk is full); "" while
        healthy. Set once, by the runner; see the module docstring."""
        self.on_unhealthy: Callable[[str], None] | None = None
        """Called once, with the reason, when the rig becomes unhealthy (the agent refuses
        new work and has the broker drain the worker)."""
        self.on_started: Callable[[AttemptKey], None] | None = None
        """Called when an attempt's process has started."""
        self.on_ended: Callable[[AttemptKey], None] | None = None
        """Called when an attempt has ended and left :attr:`runs`."""
        self.started_total = 0
        self._gpu_indices = {g.index for g in backend.gpus()}
        self._background: set[asyncio.Task[None]] = set()
        self._download_locks: dict[str, asyncio.Lock] = {}

    # --- control ------------------------------------------------------------------------

    def start(self, assignment: ws.Assignment) -> None:
        """Run an assignment unless it already runs here (whether it should run at all is
        the agent's decision: ``state_machine.py``)."""
        key = (assignment.job, assignment.attempt)
        if key in self.runs:
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
            if self.images is not None and run.assignment.spec.image:
                grace = self.config.cancel_grace_s
                self._spawn(self.images.stop_container(container_name(*key), grace))
        elif run.preparing is not None:
            run.preparing.cancel()  # an environment build or a download: stop it now

    async def stop_all(self, reason: str, *, report: bool, wait: bool) -> None:
        """Stop every attempt; with ``wait``, until their processes are gone."""
        for run in list(self.runs.values()):
            self.stop(run.key, reason, report=report)
        if wait:
            await self.wait_all()

    async def wait_all(self) -> None:
        """Wait until the attempts running now have ended (at most the kill grace + 3 s)."""
        runs = list(self.runs.values())
        if runs:
            waits = [asyncio.create_task(r.done.wait()) for r in runs]
            await asyncio.wait(waits, timeout=self.config.cancel_grace_s + 3.0)
            for w in waits:
                w.cancel()

    def refuse(self, key: AttemptKey, why: str) -> None:
        """End an assignment at once as a setup failure of the rig's (the broker requeues)."""
        log.warning("%s attempt %d refused: %s", key[0], key[1], why)
        now = time.time()
        self.outbox.preparing(key, now)
        self.outbox.log(key, f"[rigshift-agent] setup failed: {why}\n", now)
        self.outbox.finished(key, SETUP_FAILED_EXIT, 0, why, now, cause=ws.Finished.SETUP_RIG)
        self.wake.set()

    def _mark_unhealthy(self, reason: str) -> None:
        """The rig cannot take more work (see the module docstring); once."""
        if self.unhealthy:
            return
        self.unhealthy = reason
        log.error("rig unhealthy, taking no more work: %s", reason)
        if self.on_unhealthy is not None:
            try:
                self.on_unhealthy(reason)
            except Exception:
                log.exception("on_unhealthy failed")

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

    async def _fetch(self, sha256: str, into: Path, max_bytes: int = 0) -> None:
        archive = self.workspace.archive_path(sha256)
        # Attempts that need the same archive at once wait for one download.
        async with self._download_locks.setdefault(sha256, asyncio.Lock()):
            if not archive.exists():
                await save_verified(
                    self.download(sha256),
                    sha256,
                    archive,
                    max_bytes=max_bytes or self.config.max_working_dir_bytes,
                )
        await asyncio.to_thread(safe_extract, archive, into)

    def _setup_log(self, key: AttemptKey) -> Callable[[str], None]:
        def emit(text: str) -> None:
            self.outbox.log(key, text, time.time())
            self.wake.set()

        return emit

    async def _inputs(self, run: _Run) -> tuple[Path | None, list[str]]:
        """Fetch each input once per rig and link it into a fresh ``$RIGSHIFT_INPUT_DIR``;
        returns that directory (None without inputs) and the directories to bind read-only."""
        a = run.assignment
        if not a.spec.inputs:
            return None, []
        view = self.workspace.input_view(a.job, a.attempt)
        readonly = [str(view.resolve())]
        for name, sha256 in sorted(a.spec.inputs.items()):
            if not name or "/" in name or name in (".", ".."):
                raise _Refused(f"bad input name {name!r}")
            cache = self.workspace.input_cache(sha256)
            async with self._download_locks.setdefault(f"input:{sha256}", asyncio.Lock()):
                if not cache.is_dir():
                    t0 = time.monotonic()
                    part = cache.with_name(f"{cache.name}.part")
                    shutil.rmtree(part, ignore_errors=True)
                    try:
                        await self._fetch(sha256, part, max_bytes=1 << 62)
                        await asyncio.to_thread(_read_only, part)
                        os.replace(part, cache)
                    except BaseException:
                        # Half an input is of no use, and on a full disk it holds the space.
                        await asyncio.to_thread(_remove_tree, part)
                        raise
                    # Extracted once for good: the archive would only take the disk twice.
                    self.workspace.archive_path(sha256).unlink(missing_ok=True)
                    self._setup_log(run.key)(
                        f"[rigshift-agent] input {name}: {sha256[:12]} fetched in "
                        f"{time.monotonic() - t0:.1f} s\n"
                    )
                else:
                    self._setup_log(run.key)(
                        f"[rigshift-agent] input {name}: {sha256[:12]} cached on this rig\n"
                    )
            os.utime(cache)  # its last use: the cache drops the least recently used first
            (view / name).symlink_to(cache.resolve(), target_is_directory=True)
            readonly.append(str(cache.resolve()))
        in_use = {sha for r in self.runs.values() for sha in r.assignment.spec.inputs.values()}
        limit = int(self.config.environments.max_cache_gb * 1e9)
        removed = await asyncio.to_thread(self.workspace.evict_inputs, limit, in_use)
        if removed:
            log.info("input cache over %d bytes: removed %d input(s)", limit, len(removed))
        return view, readonly

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
        image = None
        if a.spec.image:
            if self.images is None:
                raise SetupError("this rig runs no containers (podman missing or off)", "rig")
            image = await run.held.enter_async_context(
                self.images.use(a.spec.image, a.spec.registry_auth, self._setup_log(run.key))
            )
        venv: Environment | None = None
        site: Environment | None = None
        target: InstallTarget | None = None
        image_path = ""
        if a.spec.python_requirements:
            if self.environments is None:
                raise SetupError("this agent does not build Python environments", "rig")
            if image is not None and self.images is not None:
                # On top of the image's own Python: installed here, mounted there.
                python = await self.images.python(image, self._setup_log(run.key))
                target = install_target(a.spec.image, image.digest_ref, python)
                image_path = python.path
            built = await run.held.enter_async_context(
                self.environments.use(
                    a.spec.requirements_sha256,
                    a.spec.python_requirements,
                    self._setup_log(run.key),
                    target,
                )
            )
            site, venv = (built, None) if target is not None else (None, built)
        input_dir, readonly = await self._inputs(run)
        if venv is not None:
            readonly.append(str(venv.path))
        run.output_dir = self.workspace.output_dir(a.job, a.attempt)
        run.cwd = cwd = self.workspace.attempt_dir(a.job, a.attempt)
        if a.spec.working_dir_sha256:
            await self._fetch(a.spec.working_dir_sha256, cwd)
        checkpoint_dir = self.workspace.checkpoint_dir(a.job)
        if a.checkpoint_sha256 and not any(checkpoint_dir.iterdir()):
            try:
                await self._fetch(a.checkpoint_sha256, checkpoint_dir)
            except (ArchiveError, OSError, grpc.aio.AioRpcError) as err:
                # Never half a checkpoint: the next attempt here would resume from it.
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
                if _disk_full(err) is not None:
                    raise  # not the checkpoint's fault: the rig cannot set the attempt up
                # Starting over beats failing the job: say so in its output.
                why = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
                note = (
                    f"[rigshift-agent: checkpoint {a.checkpoint_sha256[:12]} not restored: {why}]\n"
                )
                self.outbox.log(run.key, note, time.time())
                log.warning("%s attempt %d: %s", run.key[0], run.key[1], note.strip())
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
        env["RIGSHIFT_OUTPUT_DIR"] = str(run.output_dir.resolve())
        if input_dir is not None:
            env["RIGSHIFT_INPUT_DIR"] = str(input_dir.resolve())
        if venv is not None:
            env = venv.env_vars(env)
        spec = LaunchSpec(
            job=a.job,
            attempt=a.attempt,
            argv=list(a.spec.command),
            env=env,
            cwd=str(cwd.resolve()),
            gpu_indices=indices,
            max_duration_s=float(a.spec.max_duration_seconds),
            readonly=tuple(readonly),
        )
        if image is None or self.images is None:
            return spec
        return container_launch(
            spec,
            podman=self.images.runtime.path,
            image=image.image_id,
            network=self.config.containers.network,
            nvml=getattr(self.backend, "name", "") == "nvml",
            job_env=a.spec.env,
            agent_env=os.environ,
            rig=self.images.rig,
            site=str(site.path) if site is not None else "",
            image_path=image_path,
        )

    async def _run(self, run: _Run) -> None:
        key = run.key
        indices = list(run.assignment.gpu_indices)
        code, message = 127, ""
        cause, setup_ms = 0, 0
        # The attempt holds its GPUs from the assignment on: their energy is its energy.
        self.meter.start(key, [i for i in indices if i in self._gpu_indices])
        t_setup = time.monotonic()
        self.outbox.preparing(key, time.time())
        self.wake.set()
        try:
            run.preparing = asyncio.create_task(self._prepare(run))
            try:
                spec = await run.preparing
            except asyncio.CancelledError:
                if not run.stop_reason:
                    raise  # the agent itself is being stopped
                code = -signal.SIGTERM  # cancelled while preparing: nothing ran
                return
            except (OSError, ArchiveError) as err:
                full = _disk_full(err)
                if full is None:
                    raise
                raise SetupError(_disk_full_message(full), "rig") from err
            setup_ms = int((time.monotonic() - t_setup) * 1000)
            if run.stop_reason:
                code = -signal.SIGTERM
                return
            # The watcher starts with the process; what the directory held before is taken now.
            start = None
            if self.checkpoints is not None and run.checkpoint_dir is not None:
                start = await asyncio.to_thread(checkpoint_baseline, run.checkpoint_dir)
            run.execution = execution = self.executor.launch(spec)
            if run.stop_reason:  # stopped while launching
                self._spawn(execution.cancel(run.stop_reason))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            async for event in execution.events():
                if isinstance(event, ProcStarted):
                    run.started = True
                    if self.checkpoints is not None and run.checkpoint_dir is not None:
                        run.watch = asyncio.create_task(
                            self.checkpoints.watch(
                                key,
                                run.checkpoint_dir,
                                min_interval_s=self.config.checkpoint_min_interval_s,
                                start=start,
                            )
                        )
                    self.backend.set_load(indices, Load.TRAINING)
                    self.outbox.started(key, time.time(), setup_ms)
                    self.wake.set()
                    if self.on_started is not None:
                        self.on_started(key)
                    log.info("%s attempt %d started (pid %d on GPUs %s)", *key, event.pid, indices)
                elif isinstance(event, ProcOutput):
                    self.outbox.log(key, decoder.decode(event.data), time.time())
                    self.wake.set()
                elif isinstance(event, ProcExited):
                    code, message = event.exit_code, event.message
            self.outbox.log(key, decoder.decode(b"", final=True), time.time())
            if code != 0 and not run.stop_reason:
                message = await self._disk_full_after(run, code, message)
            await self._upload_output(run)
        except SetupError as err:
            code, message = SETUP_FAILED_EXIT, err.message
            cause = ws.Finished.SETUP_CLIENT if err.cause == "client" else ws.Finished.SETUP_RIG
            setup_ms = int((time.monotonic() - t_setup) * 1000)
            self.outbox.log(key, f"[rigshift-agent] setup failed: {message}\n", time.time())
            log.warning("%s attempt %d setup failed (%s): %s", key[0], key[1], err.cause, message)
            if err.cause == "rig" and (
                _disk_full(err) is not None or message.startswith("disk full")
            ):
                self._mark_unhealthy(message)
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
            if self.images is not None and run.execution is not None and run.assignment.spec.image:
                await self.images.remove_container(container_name(*key))  # gone, whatever the end
            with contextlib.suppress(Exception):
                await run.held.aclose()  # the environment is no longer in use
            self._finish(run, code, message, cause, setup_ms)

    async def _disk_full_after(self, run: _Run, code: int, message: str) -> str:
        """The finished message of a failed process; when its directories' disk is full,
        it says so (the job may have failed writing its outputs) and the rig is unhealthy."""
        dirs = [d for d in (run.cwd, run.output_dir, run.checkpoint_dir) if d is not None]
        free = await asyncio.to_thread(_free_bytes, dirs)
        if free >= DISK_FULL_BELOW_BYTES:
            return message
        why = (
            f"the rig's disk is full: ENOSPC, {free} bytes free under the agent's state "
            f"directory when the job ended with status {code}"
        )
        self.outbox.log(run.key, f"[rigshift-agent] {why}\n", time.time())
        self._mark_unhealthy(why)
        return f"{message}; {why}" if message else why

    async def _upload_output(self, run: _Run) -> None:
        """Archive ``$RIGSHIFT_OUTPUT_DIR`` and upload it; the ``output`` event says what was
        kept. Nothing is sent for an attempt handed back (it is not reported at all)."""
        limit = run.assignment.spec.max_output_bytes
        out = run.output_dir
        if not limit or out is None or self.upload_output is None or not run.report:
            return
        key = run.key
        try:
            data = await asyncio.to_thread(pack_directory, out, max_bytes=limit)
        except ArchiveError:
            size = await asyncio.to_thread(directory_bytes, out)
            why = (
                f"output directory holds {size} bytes, over the limit of {limit} bytes "
                "per attempt: nothing was kept"
            )
            self.outbox.output(key, "", size, time.time(), over_limit=True, message=why)
            self.outbox.log(key, f"[rigshift-agent] {why}\n", time.time())
            return
        sha256 = hashlib.sha256(data).hexdigest()
        for attempt in range(OUTPUT_UPLOAD_TRIES):
            try:
                await self.upload_output(sha256, data)
                break
            except grpc.aio.AioRpcError as err:
                why = f"output not uploaded: {err.code().name} {err.details()}"
                if attempt + 1 == OUTPUT_UPLOAD_TRIES:
                    self.outbox.output(key, "", len(data), time.time(), message=why)
                    log.warning("%s attempt %d: %s", key[0], key[1], why)
                    return
                await asyncio.sleep(1.0 + attempt)
        self.outbox.output(key, sha256, len(data), time.time())
        log.info("%s attempt %d: output %s… uploaded (%d bytes)", *key, sha256[:12], len(data))

    def _finish(
        self, run: _Run, code: int, message: str, cause: int = 0, setup_ms: int = 0
    ) -> None:
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
            self.outbox.finished(
                key, code, energy, message, time.time(), cause=cause, setup_ms=setup_ms
            )
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
        if self.on_ended is not None:
            self.on_ended(key)
