"""A local marketplace made of real processes: one broker, some agents, on loopback.

``rigshift demo``, the end-to-end tests and ``benchmarks/dispatch_bench.py``
all need the same thing: start ``rigshift broker serve`` and a few ``rigshift
agent run`` processes, wait until they serve, and at the end stop every process
they started, Ray's included::

    with LocalFleet(root) as fleet:
        broker = fleet.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
        token = fleet.client().create_farm("farm-a").enrollment_token
        fleet.start_agent("rig-a", token, simulate="RTX3090x4")
        fleet.wait_workers(1)

Every process gets its own session and, through ``setpriv --pdeathsig TERM``,
a SIGTERM if the process that started the fleet dies; stopping sends SIGTERM
(the graceful drain), waits, then SIGKILLs whatever is left of each process
tree, including Ray processes that outlived their agent.

Agents run their jobs without job isolation (``--sandbox none``, as the user
who runs the fleet) unless ``start_agent`` is told otherwise: the jobs of the
tests, the demo and the benchmarks are the caller's own code, run with the
caller's Python and writing into shared directories the caller then reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker_agent.process import descendants

__all__ = [
    "MARKER_JOB",
    "FleetError",
    "LocalFleet",
    "ManagedProcess",
    "marker_runs",
    "rigshift_argv",
    "start_time",
]

#: A job for the chaos benchmark and the fault tests (``python job.py OUT SECONDS``): it
#: records its start, then a heartbeat every 50 ms until its time is up, so the runs of
#: one job can be checked for overlap (:func:`marker_runs`). Markers are written by
#: rename, so a process killed while writing leaves no empty file.
MARKER_JOB = r"""
import os, sys, time, pathlib
out = pathlib.Path(sys.argv[1])
seconds = float(sys.argv[2])
tag = f"{os.environ['RIGSHIFT_JOB_ID']}.{os.environ['RIGSHIFT_ATTEMPT']}.{os.getpid()}"

def mark(name):
    tmp = out / f".{tag}.{name}.tmp"
    tmp.write_text(repr(time.time()))
    os.replace(tmp, out / f"{tag}.{name}")

mark("start")
end = time.time() + seconds
while time.time() < end:
    mark("alive")
    time.sleep(0.05)
mark("alive")
"""


def marker_runs(out: Path) -> dict[str, list[tuple[float, float, str]]]:
    """Each job's runs as (began, last heartbeat, label), from :data:`MARKER_JOB`'s files."""
    runs: dict[str, list[tuple[float, float, str]]] = {}
    for start in out.glob("*.start"):
        job_id, attempt, pid = start.name.split(".")[:3]
        alive = start.with_name(f"{job_id}.{attempt}.{pid}.alive")
        began = float(start.read_text())
        ended = float(alive.read_text()) if alive.exists() else began
        runs.setdefault(job_id, []).append((began, ended, f"attempt {attempt} pid {pid}"))
    return runs


class FleetError(RuntimeError):
    """A process of the fleet did not start or did not become ready."""


def rigshift_argv() -> list[str]:
    """How to run the ``rigshift`` CLI of this installation."""
    script = Path(sys.executable).with_name("rigshift")
    if script.exists():
        return [str(script)]
    found = shutil.which("rigshift")
    if found:
        return [found]
    return [sys.executable, "-c", "from rigshift_cli import main; main()"]


@dataclass
class ManagedProcess:
    """A process of the fleet, its log file and every process it was seen to start."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time (clock ticks)
    address: str = ""

    def remember_children(self) -> None:
        """Record the current process tree (Ray's processes may outlive their parent)."""
        if self.proc.poll() is None:
            for pid in descendants(self.proc.pid):
                start = start_time(pid)
                if start is not None:
                    self.seen.setdefault(pid, start)

    def live_tree(self) -> list[int]:
        """Pids of this process and of the processes it started that still run (same pid,
        same start time: a reused pid is never mistaken for ours)."""
        out = [self.proc.pid] if self.proc.poll() is None else []
        out += [pid for pid, start in self.seen.items() if start_time(pid) == start]
        return out

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalFleet:
    """Start and stop a broker and agents as subprocesses under ``root``."""

    def __init__(self, root: Path, *, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # Its own RIGSHIFT_HOME: the broker writes its admin key there, never into the user's.
        self.env = {**os.environ, "RIGSHIFT_HOME": str(root / "home"), **(env or {})}
        self.env.pop("RIGSHIFT_API_KEY", None)
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[ManagedProcess] = []
        self.broker: ManagedProcess | None = None
        self._broker_args: tuple[tuple[str, ...], dict[str, object]] = ((), {})
        self._client: Any = None
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._watch_stop.wait(1.0):
            for p in list(self.processes):
                p.remember_children()

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        # If whoever runs the fleet dies (a test runner killed by a timeout), its broker and
        # agents get SIGTERM and shut down gracefully instead of living on as orphans.
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if name == "broker" else log_file,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.root,
                start_new_session=True,
            )
        managed = ManagedProcess(name, proc, log_path)
        self.processes.append(managed)
        return managed

    # --- broker ---------------------------------------------------------------------

    def start_broker(
        self, *extra: str, listen: str = "127.0.0.1:0", timeout_s: float = 30.0, **options: object
    ) -> str:
        """``rigshift broker serve`` (a free port by default) with SQLite under root; its address.

        Keyword options become ``--key-with-dashes VALUE`` flags.
        """
        argv = [
            *rigshift_argv(),
            "broker",
            "serve",
            "--listen",
            listen,
            "--home",
            str(self.root / "broker"),
            *_flags(options),
            *extra,
        ]
        self._broker_args = (extra, options)
        broker = self._spawn("broker", argv)
        self.broker = broker
        deadline = time.monotonic() + timeout_s
        line = ""
        assert broker.proc.stdout is not None
        while time.monotonic() < deadline:
            raw = broker.proc.stdout.readline()
            if not raw:
                break
            line = raw.decode().strip()
            if line.startswith("rigshift broker listening on "):
                broker.address = line.rsplit(" ", 1)[1]
                threading.Thread(target=_drain_pipe, args=(broker,), daemon=True).start()
                return broker.address
        raise FleetError(f"the broker did not start ({line!r}):\n{broker.log_tail()}")

    def restart_broker(self, *, kill: bool = True, timeout_s: float = 30.0) -> str:
        """Stop the broker (``kill -9`` by default) and start it again on the same address
        and database, as after a crash."""
        old = self.broker
        if old is None:
            raise FleetError("start_broker() first")
        if kill:
            old.proc.kill()
            old.proc.wait()
        else:
            self.stop_process(old)
        self.processes.remove(old)
        extra, options = self._broker_args
        deadline = time.monotonic() + timeout_s
        while True:  # the port may linger for a moment after the old process is gone
            try:
                return self.start_broker(*extra, listen=old.address, timeout_s=timeout_s, **options)
            except FleetError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    @property
    def broker_address(self) -> str:
        """``host:port`` of the broker."""
        if self.broker is None or not self.broker.address:
            raise FleetError("start_broker() first")
        return self.broker.address

    def client(self) -> Any:
        """A :class:`client.sdk.Client` with the broker's admin key (written on its first start)."""
        if self._client is None:
            from client.sdk import Client
            from rigshift.credentials import lookup_api_key

            old = os.environ.get("RIGSHIFT_HOME")
            os.environ["RIGSHIFT_HOME"] = self.env["RIGSHIFT_HOME"]
            try:
                key = lookup_api_key(self.broker_address)
            finally:
                if old is None:
                    os.environ.pop("RIGSHIFT_HOME", None)
                else:
                    os.environ["RIGSHIFT_HOME"] = old
            self._client = Client(self.broker_address, api_key=key)
        return self._client

    # --- agents ---------------------------------------------------------------------

    def start_agent(
        self,
        name: str,
        token: str,
        *extra: str,
        broker: str = "",
        wrap: Sequence[str] = (),
        **options: object,
    ) -> ManagedProcess:
        """``rigshift agent run`` with its state under root/agents/NAME; returns at once.

        Jobs run unsandboxed as the caller (see the module docstring); pass e.g.
        ``sandbox="auto", job_user=""`` for the isolation of a real rig. ``wrap`` goes
        before the agent's argv and must exec it (so the managed pid stays the agent's),
        e.g. ``["ip", "netns", "exec", "rig-ns"]`` to run the agent in a network namespace.
        """
        options = {"sandbox": "none", "job_user": _current_user(), **options}
        argv = [
            *wrap,
            *rigshift_argv(),
            "agent",
            "run",
            "--broker",
            broker or self.broker_address,
            "--token",
            token,
            "--state-dir",
            str(self.root / "agents" / name),
            "--hostname",
            name,
            *_flags(options),
            *extra,
        ]
        return self._spawn(name, argv)

    def start_one_rig(self, name: str) -> Any:
        """The broker and one simulated rig (``RTX3090x2``, heartbeat 1 s, lease 6 s) in a
        farm called ``name`` (the benchmarks' fleet); the SDK client once it is ONLINE."""
        self.start_broker(lease_ttl_s=6, heartbeat_interval_s=1)
        client = self.client()
        farm = client.create_farm(name)
        self.start_agent(
            f"{name}-rig",
            farm.enrollment_token,
            simulate="RTX3090x2",
            heartbeat_interval_s=1,
            lease_ttl_s=6,
            drain_grace_s=5,
        )
        self.wait_workers(1, timeout_s=120)
        return client

    def wait_workers(self, count: int, *, timeout_s: float = 90.0) -> list[Any]:
        """Wait until ``count`` workers are ONLINE; returns them."""
        from rigshift.v1 import farm_pb2

        deadline = time.monotonic() + timeout_s
        online: list[Any] = []
        while time.monotonic() < deadline:
            for p in self.processes:
                if p.name != "broker" and p.proc.poll() is not None:
                    raise FleetError(f"agent {p.name} exited:\n{p.log_tail()}")
            workers = list(self.client().iter_workers())
            online = [w for w in workers if w.state == farm_pb2.Worker.ONLINE]
            if len(online) >= count:
                return online
            time.sleep(0.25)
        raise FleetError(f"only {len(online)} of {count} workers came online")

    # --- stopping -------------------------------------------------------------------

    def stop_process(self, p: ManagedProcess, *, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the rest of its tree; its exit status."""
        p.remember_children()
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait()
        for pid in p.live_tree():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return p.proc.returncode

    def stop(self) -> None:
        """Stop the agents (in parallel, gracefully), then the broker."""
        self._watch_stop.set()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        agents = [p for p in self.processes if p is not self.broker]
        threads = [threading.Thread(target=self.stop_process, args=(p,)) for p in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.broker is not None:
            self.stop_process(self.broker)

    def leftovers(self) -> list[int]:
        """Pids the fleet started (or saw started) that still run: should be empty after stop."""
        return [pid for p in self.processes for pid in p.live_tree()]


def _drain_pipe(p: ManagedProcess) -> None:
    """Copy the broker's stdout to its log after the ready line (so the pipe never fills)."""
    assert p.proc.stdout is not None
    with open(p.log_path, "ab") as f:
        for raw in p.proc.stdout:
            f.write(raw)
            f.flush()


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return ""


def _flags(options: dict[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks since boot, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])
