"""Run attempts on Ray: a local head advertising exactly the rig's GPUs, or an existing cluster.

Which Ray path, and why
-----------------------
Each attempt runs as a **Ray task wrapping a subprocess** on warm Ray workers,
not as a Ray job through the Jobs API. Measured on the 2-core development
machine (``benchmarks/dispatch_bench.py --ray-paths``), submission to the job's
process running, idle machine, median of 20:

================================  ========
bare ``subprocess.Popen``           ~20 ms
Ray task wrapping a subprocess      ~25 ms   (warm worker; ~0.2 s for a cold one)
Ray Jobs API (``submit_job``)      ~1100 ms  (starts a supervisor actor per job)
================================  ========

The task is a streaming generator (:func:`worker_agent.process.run_process`):
it yields "started", batched output and the exit status, so logs reach the
agent while the job runs. GPUs are bound through Ray resources: the head
advertises ``GPU: n`` plus one custom resource ``rigshift_gpu_<i>`` per GPU, an
attempt asks for ``num_gpus=k`` and exactly the ``rigshift_gpu_<i>`` the broker
assigned, so Ray never runs two attempts on one GPU, and the process gets
``CUDA_VISIBLE_DEVICES`` = those indices (with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
the order NVML enumerates). Cancel is ``ray.cancel``: the task's ``finally``
sends SIGTERM to the process tree and SIGKILL after ``cancel_grace_s``; for a
local head the agent also checks the pid and kills the group itself if needed.

With ``--ray-address`` (a site cluster) the agent joins instead of starting a
head; GPUs are pinned the same way when the cluster's nodes advertise
``rigshift_gpu_<i>`` (otherwise Ray picks them and the job sees Ray's choice),
and the working directory travels with the task as a tar.gz argument, unpacked
on whichever node Ray chose.

Ray token authentication (on by default since Ray 2.5x) stays on: the agent
sets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` to a 0600 file in its
state directory (created for a local head), refreshes Ray's cached config if
Ray was already imported, and removes the token variables from the jobs'
environment. ``ray`` is imported only when an executor starts.

Job isolation: an executor given a :class:`~worker_agent.sandbox.SandboxPolicy`
resolves it when it starts (logging what is in effect) and every attempt runs
through :func:`worker_agent.sandbox.wrap`, with its working directory and its
``$RIGSHIFT_CHECKPOINT_DIR`` writable. Without a policy jobs run unwrapped.

Lease fence: with ``fence_file`` set (the agent sets its ``state_dir/lease-deadline``),
every attempt's process gets a lease fence (``fence.py``); a RayExecutor passes it to
a local head's tasks only (a site cluster's node may be another machine).

What every executor shares (:class:`LaunchSpec`, the ``Executor`` and ``Execution``
protocols, :func:`job_environment`) and the :class:`LocalExecutor`, which runs the
same generator in a thread of the agent without Ray, are in ``launch.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rigshift.archive import pack_directory
from worker_agent.launch import (
    SECRET_ENV,
    Execution,
    Executor,
    LaunchSpec,
    LocalExecutor,
    job_environment,
    resolve_isolation,
    writable_dirs,
)
from worker_agent.process import ProcEvent, ProcExited, ProcStarted, descendants, run_process
from worker_agent.sandbox import Isolation, SandboxPolicy

# The base of every executor lives in ``launch.py``; these names are re-exported so
# ``worker_agent.executor`` stays the one import for callers.
__all__ = [
    "SECRET_ENV",
    "Execution",
    "Executor",
    "LaunchSpec",
    "LocalExecutor",
    "RayExecutor",
    "ensure_token_file",
    "job_environment",
]

log = logging.getLogger("rigshift.agent.executor")

GPU_RESOURCE = "rigshift_gpu_{}"

#: How often a local Ray head is tried before the agent gives up.
HEAD_START_ATTEMPTS = 3

#: Largest working directory shipped to a site-cluster node with the task.
MAX_SHIPPED_BYTES = 512 << 20


# --- RayExecutor -----------------------------------------------------------------------


def ensure_token_file(path: Path) -> Path:
    """Create a random Ray auth token at ``path`` (mode 0600) unless one is there."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def _use_token_auth(token_path: Path | None) -> None:
    """Token mode for this process and the Ray processes it starts."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if token_path is not None:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        os.environ.pop("RAY_AUTH_TOKEN", None)
    if "ray" in sys.modules:
        # Ray caches its config at import: make an already imported Ray see token mode.
        with contextlib.suppress(Exception):
            from ray._raylet import (  # type: ignore[attr-defined]
                AuthenticationTokenLoader,
                Config,
            )

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()


class _NoSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _ray_entry(
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    max_duration_s: float,
    flush_s: float,
    kill_grace_s: float,
    ray_binds_gpus: bool,
    archive: bytes | None = None,
    isolation: Isolation | None = None,
    writable: tuple[str, ...] = (),
    readonly: tuple[str, ...] = (),
    fence_file: str | None = None,
    container: str = "",
) -> Any:
    """Body of the Ray task: run the process where Ray placed us, yield its events.

    ``cwd`` is a directory of the agent's machine (local head). On a site cluster
    it is None and ``archive`` (a tar.gz of the working directory, or None) is
    unpacked into a fresh directory on whichever node Ray chose.
    """
    if ray_binds_gpus:  # a site cluster without rigshift_gpu_<i>: keep Ray's choice
        env = {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    if cwd is not None:
        yield from run_process(
            argv,
            env,
            cwd,
            max_duration_s=max_duration_s,
            flush_s=flush_s,
            kill_grace_s=kill_grace_s,
            isolation=isolation,
            writable=writable,
            readonly=readonly,
            fence_file=fence_file,
            container=container,
        )
        return
    with tempfile.TemporaryDirectory(prefix="rigshift-attempt-") as work:
        if archive:
            from rigshift.archive import safe_extract

            path = Path(work) / "archive.tar.gz"
            path.write_bytes(archive)
            safe_extract(path, Path(work) / "wd")
            path.unlink()
        (Path(work) / "wd").mkdir(exist_ok=True)
        yield from run_process(
            argv,
            env,
            str(Path(work) / "wd"),
            max_duration_s=max_duration_s,
            flush_s=flush_s,
            kill_grace_s=kill_grace_s,
            isolation=isolation,
            writable=writable,
            readonly=readonly,
        )


def _pack(directory: str) -> bytes | None:
    """A tar.gz of a working directory (None when it is empty)."""
    if not any(Path(directory).iterdir()):
        return None
    return pack_directory(Path(directory), max_bytes=MAX_SHIPPED_BYTES)


class _RayExecution:
    def __init__(self, executor: RayExecutor, spec: LaunchSpec) -> None:
        self._executor = executor
        self._spec = spec
        self._cancel_reason = ""
        self._pid = 0
        self._node = ""
        self._guard: asyncio.Task[None] | None = None
        self._gen: Any = executor._submit(spec)
        executor._executions.add(self)

    async def events(self) -> AsyncIterator[ProcEvent]:
        ray = self._executor._ray
        try:
            async for ref in self._gen:
                event = await ref
                del ref  # no ObjectRef may stay in this frame while it is suspended
                if isinstance(event, ProcStarted):
                    self._pid, self._node = event.pid, event.node
                yield event
                if isinstance(event, ProcExited):
                    return
        except (ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError) as err:
            if self._cancel_reason or isinstance(err, ray.exceptions.TaskCancelledError):
                yield ProcExited(-signal.SIGTERM, f"cancelled: {self._cancel_reason}")
                return
            yield ProcExited(-1, f"ray task failed: {str(err).splitlines()[0][:300]}")
            return
        except ray.exceptions.RayError as err:  # worker died, node lost, …
            yield ProcExited(-1, f"ray: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            return
        finally:
            self.release()
        yield ProcExited(-1, "ray task ended without an exit status")

    def release(self) -> None:
        """Drop this attempt's Ray object references (see ``RayExecutor.close``)."""
        self._gen = None

    async def cancel(self, reason: str) -> None:
        if self._cancel_reason:
            return
        self._cancel_reason = reason or "cancelled"
        if self._gen is not None:
            self._executor._ray.cancel(self._gen)
        if self._pid and self._executor.is_local and self._node == socket.gethostname():
            self._guard = asyncio.get_running_loop().create_task(self._make_sure(self._pid))

    async def _make_sure(self, pid: int) -> None:
        """Local head: if the tree is still there after the grace, kill the group ourselves."""
        await asyncio.sleep(self._executor.kill_grace_s + 0.5)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


class RayExecutor:
    """Attempts as Ray tasks (see the module docstring for the measurements behind it)."""

    name = "ray"

    def __init__(
        self,
        gpu_count: int,
        *,
        address: str = "",
        token_path: Path | None = None,
        dashboard: bool = False,
        flush_s: float = 0.1,
        kill_grace_s: float = 2.0,
        temp_dir: str | None = None,
        sandbox: SandboxPolicy | None = None,
    ) -> None:
        self.gpu_count = gpu_count
        self.address = address
        self.token_path = token_path
        self.dashboard = dashboard
        self.flush_s = flush_s
        self.kill_grace_s = kill_grace_s
        self.temp_dir = temp_dir
        self.sandbox = sandbox
        self.isolation: Isolation | None = None
        self.fence_file: str | None = None
        """The agent's lease-deadline file: each job of a local head gets a lease fence."""
        self.dashboard_url = ""
        self._ray: Any = None
        self._remote: Any = None
        self._pinned = True
        self._started = False
        self._executions: weakref.WeakSet[_RayExecution] = weakref.WeakSet()

    @property
    def is_local(self) -> bool:
        """True when the agent started the Ray head itself."""
        return not self.address

    async def start(self) -> None:
        """Resolve the job isolation, start (or join) Ray with token auth, warm the workers."""
        self.isolation = await resolve_isolation(self.sandbox)
        t0 = time.monotonic()
        await asyncio.to_thread(self._start_blocking)
        await self._warm()
        log.info(
            "ray %s ready in %.1f s (%s, GPUs bound by %s)",
            "local head" if self.is_local else f"cluster {self.address}",
            time.monotonic() - t0,
            f"dashboard {self.dashboard_url}" if self.dashboard_url else "no dashboard",
            "rigshift_gpu_<i> resources" if self._pinned else "Ray's own GPU choice",
        )

    def _start_blocking(self) -> None:
        # Ray's C++ core would print a stack dump on every SIGTERM (our drain signal).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        if self.is_local:
            _use_token_auth(ensure_token_file(self.token_path or Path("ray_auth_token")))
        elif self.token_path is not None or os.environ.get("RAY_AUTH_MODE") is None:
            _use_token_auth(self.token_path)
        import ray

        # ray.init runs in a thread on purpose: in the main thread it would replace the
        # agent's SIGTERM handler (the drain) with sys.exit. Its warning about that is noise.
        logging.getLogger("ray._private.worker").addFilter(_NoSigtermWarning())
        self._ray = ray
        common: dict[str, Any] = {
            "log_to_driver": False,
            "configure_logging": False,
            "namespace": "rigshift",
        }
        if self.is_local:
            ctx = self._start_local_head(ray, common)
        else:
            ctx = ray.init(address=self.address, **common)
            self._pinned = GPU_RESOURCE.format(0) in ray.cluster_resources()
            if not self._pinned:
                log.warning(
                    "cluster %s has no %s resources: Ray picks the GPUs of each attempt",
                    self.address,
                    GPU_RESOURCE.format("<i>"),
                )
        self.dashboard_url = getattr(ctx, "dashboard_url", "") or ""
        self._remote = ray.remote(num_cpus=0, max_retries=0)(_ray_entry)
        self._started = True

    def _start_local_head(self, ray: Any, common: dict[str, Any]) -> Any:
        """``ray.init`` of a head with exactly this rig's GPUs, retried when it times out.

        Ray gives a new head 30 s to register (hard-coded); on an overloaded machine
        (several agents starting at once on two cores) that can pass. The processes of
        a failed try are killed before the next one.
        """
        for attempt in range(1, HEAD_START_ATTEMPTS + 1):
            before = set(descendants(os.getpid()))
            try:
                return ray.init(
                    address="local",
                    num_cpus=max(1, self.gpu_count),
                    num_gpus=self.gpu_count,
                    resources={GPU_RESOURCE.format(i): 1 for i in range(self.gpu_count)},
                    include_dashboard=self.dashboard,
                    dashboard_host="127.0.0.1",
                    dashboard_port=0 if self.dashboard else None,
                    object_store_memory=100 << 20,
                    _temp_dir=self.temp_dir,
                    **common,
                )
            except Exception as err:  # Ray raises a bare Exception when its head times out
                if attempt == HEAD_START_ATTEMPTS:
                    raise
                log.warning(
                    "the Ray head did not start (%s); trying again (%d/%d)",
                    str(err).splitlines()[0],
                    attempt + 1,
                    HEAD_START_ATTEMPTS,
                )
                with contextlib.suppress(Exception):
                    ray.shutdown()
                for pid in set(descendants(os.getpid())) - before:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(random.uniform(1.0, 3.0))
        raise AssertionError("unreachable")

    async def _warm(self) -> None:
        """Run ``true`` on every GPU at once, so the first attempts find warm workers
        that have already imported the task's code."""

        async def drain(run: _RayExecution) -> None:
            async for _ in run.events():
                pass

        with tempfile.TemporaryDirectory(prefix="rigshift-warm-") as empty:
            runs = [
                _RayExecution(self, LaunchSpec("jobs/warm", i + 1, ["true"], {}, empty, [i]))
                for i in range(self.gpu_count)
            ]
            await asyncio.gather(*(drain(r) for r in runs))

    def _submit(self, spec: LaunchSpec) -> Any:
        k = len(spec.gpu_indices)
        options: dict[str, Any] = {"num_gpus": k, "name": f"{spec.job}#{spec.attempt}"}
        if self._pinned:
            options["resources"] = {GPU_RESOURCE.format(i): 1 for i in spec.gpu_indices}
        cwd: str | None = spec.cwd
        archive = None
        if not self.is_local:  # the node Ray picks may be another machine: ship the directory
            archive = _pack(spec.cwd)
            cwd = None
        return self._remote.options(**options).remote(
            list(spec.argv),
            dict(spec.env),
            cwd,
            spec.max_duration_s,
            self.flush_s,
            self.kill_grace_s,
            not self._pinned,
            archive,
            None if spec.container else self.isolation,
            writable_dirs(spec),
            spec.readonly,
            self.fence_file if self.is_local else None,
            spec.container,
        )

    def launch(self, spec: LaunchSpec) -> Execution:
        """Submit the attempt as a Ray task; its events stream back as it runs."""
        if not self._started:
            raise RuntimeError("RayExecutor.start() first")
        return _RayExecution(self, spec)

    async def close(self) -> None:
        """Disconnect from Ray; a local head and its workers are shut down."""
        if self._started:
            self._started = False
            # An ObjectRef freed after ray.shutdown() makes Ray's core worker end the whole
            # process with exit code 1 and no message ("already been shutdown"); refs in
            # reference cycles are freed whenever the GC runs. So drop them all first.
            for execution in list(self._executions):
                execution.release()
            gc.collect()
            await asyncio.to_thread(self._ray.shutdown)
