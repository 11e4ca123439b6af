"""Run one job process and turn it into a stream of events; kill its whole tree on demand.

:func:`run_process` is a plain generator so it can run anywhere: inside a Ray
task on the rig's Ray node (the agent's real path, see ``executor.py``) or in a
thread of the agent (``LocalExecutor``, for tests and as the benchmark's
baseline). It yields::

    ProcStarted(pid, node)      right after the process was spawned
    ProcOutput(data)            stdout+stderr, batched for ``flush_s``
    ProcExited(code, message)   once; code < 0 is the signal that ended it

The process gets its own session (process group), so cancelling kills the job
and everything it spawned; on Linux it is started through ``setpriv --pdeathsig
KILL`` (when util-linux has it) so that it dies with the worker that started it
if that worker is killed. When the
generator is closed or interrupted (Ray's cancel raises inside it) the
``finally`` sends SIGTERM to the tree, waits ``kill_grace_s`` and sends SIGKILL.

With an :class:`~worker_agent.sandbox.Isolation` the job runs in a bubblewrap
sandbox and/or as the job user (``sandbox.py``); the pid it reports is then
bwrap's. A cancel sends SIGTERM to the job's processes but not to bwrap (whose
death would end the whole sandbox at once, leaving the job no grace), then
SIGKILL to bwrap, which takes the job's pid namespace with it.

With a ``fence_file`` (the agent's ``state_dir/lease-deadline``) every job gets a lease
fence, a small process of its own that kills the job's tree when the agent's lease
lapses even while the agent itself cannot run (``fence.py``); it runs outside the
sandbox as the caller's user and is killed when the job ends. A job the fence killed
ends with ``ProcExited`` saying "lease lost", never with status 0.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from worker_agent.fence import FENCED_EXIT, FENCED_LINE
from worker_agent.proctree import alive, descendants, kill_tree, process_start, stop_tree
from worker_agent.sandbox import Isolation, exit_status, for_this_host, prepare_dirs, wrap

__all__ = [
    "ProcEvent",
    "ProcExited",
    "ProcOutput",
    "ProcStarted",
    "alive",
    "descendants",
    "kill_tree",
    "process_start",
    "run_process",
    "stop_tree",
]

#: Output is sent at the latest after this many bytes, even inside a flush window.
MAX_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ProcStarted:
    """The job's process exists."""

    pid: int
    node: str


@dataclass(frozen=True, slots=True)
class ProcOutput:
    """Bytes the process wrote to stdout or stderr."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ProcExited:
    """The process ended (or never started: code 127 and a message)."""

    exit_code: int
    message: str = ""


ProcEvent = ProcStarted | ProcOutput | ProcExited


def _setpriv() -> str | None:
    """util-linux ``setpriv``, which can set PR_SET_PDEATHSIG and exec the job.

    The job must die with the worker that started it, but a ``preexec_fn`` would
    run Python in the child of a forked multi-threaded gRPC/Ray process, which
    crashes; ``setpriv --pdeathsig KILL`` does it in a separate binary instead.
    """
    if not sys.platform.startswith("linux"):
        return None
    return shutil.which("setpriv")


_SETPRIV = _setpriv()


def _resolve(argv0: str, env: Mapping[str, str], cwd: str) -> str | None:
    """The executable ``argv0`` names (PATH lookup as exec would do it), or None."""
    if "/" in argv0:
        path = os.path.join(cwd, argv0)
        return path if os.access(path, os.X_OK) and not os.path.isdir(path) else None
    return shutil.which(argv0, path=env.get("PATH", os.defpath))


def run_process(
    argv: list[str],
    env: Mapping[str, str],
    cwd: str,
    *,
    max_duration_s: float = 0,
    flush_s: float = 0.1,
    kill_grace_s: float = 2.0,
    stop: threading.Event | None = None,
    isolation: Isolation | None = None,
    writable: Sequence[str] = (),
    readonly: Sequence[str] = (),
    fence_file: str | None = None,
    container: str = "",
) -> Iterator[ProcEvent]:
    """Spawn ``argv`` and yield its events until it exits (see the module docstring).

    ``stop``, when set, ends the process like a cancel (used by ``LocalExecutor``);
    ``max_duration_s`` > 0 kills it after that long with a "time limit" message.
    ``isolation`` runs it sandboxed (see ``sandbox.py``) with ``cwd`` and the
    ``writable`` directories that exist (its checkpoint directory) writable.
    ``fence_file``: watch the job with a lease fence reading that deadline file.
    ``container``: the job is ``podman run --name <container>`` (``argv[0]`` is podman);
    the fence removes the container too.
    """
    if not argv or _resolve(argv[0], env, cwd) is None:
        yield ProcExited(127, f"failed to start: {argv[:1]} not found or not executable")
        return
    command = list(argv)
    spare_leader = False
    if isolation is not None and isolation.active:
        dirs = [cwd, *(w for w in writable if os.path.isdir(w))]
        try:
            prepare_dirs(isolation, dirs)
        except OSError as err:
            yield ProcExited(127, f"failed to start: cannot prepare the job's directories: {err}")
            return
        command = wrap(
            argv,
            cwd=cwd,
            writable=dirs[1:],
            isolation=for_this_host(isolation),
            readonly=[r for r in readonly if os.path.isdir(r)],
        )
        spare_leader = bool(isolation.bwrap)
    prefix = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
    try:
        proc = subprocess.Popen(
            [*prefix, *command],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as err:
        yield ProcExited(127, f"failed to start {argv[:1]}: {err}")
        return
    boxed = (argv[0], container) if container else None
    fence = (
        _start_fence(fence_file, proc.pid, kill_grace_s, spare_leader, boxed)
        if fence_file
        else None
    )
    chunks: queue.Queue[bytes | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc, chunks), daemon=True)
    reader.start()
    deadline = time.monotonic() + max_duration_s if max_duration_s > 0 else None
    try:
        yield ProcStarted(proc.pid, socket.gethostname())
        message = ""
        eof = False
        while not eof:
            buf, eof = _collect(chunks, flush_s)
            if buf:
                yield ProcOutput(buf)
            if proc.poll() is not None:
                break  # the leader exited; leftovers holding the pipe are killed below
            if stop is not None and stop.is_set():
                kill_tree(proc, kill_grace_s, spare_leader=spare_leader)
                message = "cancelled"
                break
            if deadline is not None and time.monotonic() > deadline:
                kill_tree(proc, kill_grace_s, spare_leader=spare_leader)
                message = f"time limit of {max_duration_s:g} s exceeded"
                break
        code = exit_status(proc.wait(), isolation)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # background leftovers of the job's group
        if fence is not None and _end_fence(fence, kill_grace_s):
            # The agent's lease lapsed and the fence killed the job: whatever its status
            # (a job may exit 0 on SIGTERM), it did not succeed and its copy may run again.
            code = code or -signal.SIGTERM
            message = "lease lost: the lease fence stopped the job (no renewal by its deadline)"
        reader.join(timeout=1.0)
        rest = _drain(chunks)
        if rest:
            yield ProcOutput(rest)
        yield ProcExited(code, message)
    finally:
        if proc.poll() is None:
            kill_tree(proc, kill_grace_s, spare_leader=spare_leader)
        if fence is not None:
            _end_fence(fence, kill_grace_s)
        with contextlib.suppress(OSError):
            proc.stdout.close()  # type: ignore[union-attr]


#: Where ``python -m worker_agent.fence`` finds this package, whatever the cwd.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_fence(
    path: str,
    pid: int,
    grace_s: float,
    spare_leader: bool,
    container: tuple[str, str] | None = None,
) -> subprocess.Popen[bytes] | None:
    """The lease fence of the job ``pid`` (``fence.py``); None when it cannot start (the
    agent's own fence still applies)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "worker_agent.fence", path, str(pid), f"{grace_s:g}"]
    if spare_leader:
        argv.append("--spare-leader")
    if container is not None:
        argv += ["--container", *container]
    prefix = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
    try:
        return subprocess.Popen(
            [*prefix, *argv],
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError:
        return None


def _end_fence(fence: subprocess.Popen[bytes], grace_s: float) -> bool:
    """Stop the fence of a job that has ended; True when the fence had killed it.

    The fence writes its line before its first signal, so once the job is gone the
    line is there if the fence caused it; it is then left to finish its kill.
    """
    if fence.stdout is None or fence.stdout.closed:  # already ended
        return fence.returncode == FENCED_EXIT
    try:
        os.set_blocking(fence.stdout.fileno(), False)
        said = fence.stdout.read() or b""
    except OSError:
        said = b""
    fired = said.startswith(FENCED_LINE)
    if fired:
        with contextlib.suppress(subprocess.TimeoutExpired):
            fence.wait(timeout=grace_s + 1.0)
    if fence.poll() is None:
        with contextlib.suppress(OSError):
            fence.kill()
    fence.wait()
    with contextlib.suppress(OSError):
        fence.stdout.close()
    return fired or fence.returncode == FENCED_EXIT


def _pump(proc: subprocess.Popen[bytes], chunks: queue.Queue[bytes | None]) -> None:
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.put(data)
    except OSError:
        pass
    finally:
        chunks.put(None)


def _collect(chunks: queue.Queue[bytes | None], flush_s: float) -> tuple[bytes, bool]:
    """Wait up to 0.2 s for output, then gather more for ``flush_s``; (bytes, eof)."""
    parts: list[bytes] = []
    size = 0
    try:
        first = chunks.get(timeout=0.2)
    except queue.Empty:
        return b"", False
    if first is None:
        return b"", True
    parts.append(first)
    size += len(first)
    end = time.monotonic() + flush_s
    while size < MAX_CHUNK_BYTES:
        left = end - time.monotonic()
        if left <= 0:
            break
        try:
            item = chunks.get(timeout=left)
        except queue.Empty:
            break
        if item is None:
            return b"".join(parts), True
        parts.append(item)
        size += len(item)
    return b"".join(parts), False


def _drain(chunks: queue.Queue[bytes | None]) -> bytes:
    parts = []
    while True:
        try:
            item = chunks.get_nowait()
        except queue.Empty:
            break
        if item:
            parts.append(item)
    return b"".join(parts)
