"""The lease fence (``worker_agent/fence.py``): a process of its own that kills a job's
tree once the deadline the agent wrote has passed, and nothing else, ever.

Real processes and process groups; deadlines are written on the fence's clock
(CLOCK_BOOTTIME) far in the past or future, so no assertion depends on how fast the
machine is (waits are bounded by generous timeouts, never asserted as durations).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker_agent.fence import FENCED_EXIT, FENCED_LINE, clock, read_deadline, write_deadline
from worker_agent.lease import Lease
from worker_agent.process import (
    ProcExited,
    ProcOutput,
    ProcStarted,
    alive,
    descendants,
    process_start,
    run_process,
    stop_tree,
)
from worker_agent.sandbox import SandboxError, SandboxPolicy, resolve

SH = "/bin/sh"
#: A job in its own process group: a child in the group and a setsid grandchild, both
#: ignoring SIGTERM (only SIGKILL ends them), then it waits (no short-lived processes).
TREE = (
    "sh -c 'trap \"\" TERM; sleep 600' & "
    "setsid sh -c 'trap \"\" TERM; sleep 600' & "
    "echo ready; exec sleep 600"
)


def wait_until(cond, timeout_s: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture
def job() -> Iterator[subprocess.Popen[bytes]]:
    """The TREE job, started in a session of its own; whatever is left is killed after."""
    proc = subprocess.Popen(
        [SH, "-c", TREE], stdout=subprocess.PIPE, start_new_session=True, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    assert wait_until(lambda: len(descendants(proc.pid)) >= 3)  # both sh and their sleeps
    tree = [proc.pid, *descendants(proc.pid)]
    yield proc
    for pid in tree:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def fence(path: Path, pid: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker_agent.fence", str(path), str(pid), "0.5", *extra],
        stdout=subprocess.PIPE,
    )


def test_fence_at_is_the_stop_time_on_the_other_clock() -> None:
    lease = Lease(ttl_s=15.0, grace_s=15.0, stop_lead_s=2.5, renewed_at=100.0)
    # stop_at = 100 + 15 - 2.5 = 112.5, i.e. 11.5 s after monotonic 101 = boot time 5001
    assert lease.fence_at(101.0, 5001.0) == 5012.5
    lease.failed(102.0, refused=True)  # a refusing broker: 100 + 15 + 15 = 130
    assert lease.fence_at(101.0, 5001.0) == 5030.0


def test_deadline_file_round_trip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "lease-deadline"
    assert read_deadline(path) is None  # missing
    write_deadline(path, 1234.5)
    assert read_deadline(path) == 1234.5
    assert [p.name for p in tmp_path.iterdir()] == ["lease-deadline"]  # no temporary left
    for garbage in ("", "soon", "nan", "inf", "\xff"):
        path.write_text(garbage, encoding="latin-1")
        assert read_deadline(path) is None, garbage


def test_the_clock_is_shared_with_other_processes() -> None:
    before = clock()
    out = subprocess.run(
        [sys.executable, "-c", "from worker_agent.fence import clock; print(clock())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert before <= float(out) <= clock()


def test_a_passed_deadline_kills_the_whole_tree(tmp_path: Path, job) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "lease-deadline"
    write_deadline(path, clock() - 60)
    tree = [job.pid, *descendants(job.pid)]
    f = fence(path, job.pid)
    out, _ = f.communicate(timeout=30)
    assert f.returncode == FENCED_EXIT
    assert out == FENCED_LINE
    job.wait(timeout=5)
    assert job.returncode == -signal.SIGTERM  # the job got SIGTERM first
    # The children ignoring SIGTERM (one of them setsid) got SIGKILL after the grace.
    assert wait_until(lambda: not any(alive(p) for p in tree)), [p for p in tree if alive(p)]


def test_a_future_deadline_waits_and_a_later_one_moves_it(tmp_path: Path, job) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "lease-deadline"
    write_deadline(path, clock() + 3600)
    f = fence(path, job.pid)
    try:
        time.sleep(1.0)  # five polls
        assert f.poll() is None and job.poll() is None
        write_deadline(path, clock() - 1)  # the agent stopped renewing long ago
        assert f.wait(timeout=30) == FENCED_EXIT
        assert job.wait(timeout=5) == -signal.SIGTERM
    finally:
        f.kill()
        f.wait()
        f.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("content", [None, "garbage", ""])
def test_no_readable_deadline_means_no_fence(tmp_path: Path, job, content: str | None) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "lease-deadline"
    if content is not None:
        path.write_text(content)
    f = fence(path, job.pid)
    try:
        time.sleep(1.0)
        assert f.poll() is None and job.poll() is None
        os.killpg(job.pid, signal.SIGKILL)  # the job ends on its own: the fence goes too
        job.wait()
        # (a reaped leader: its pid is gone, the fence exits without a signal sent)
        assert f.wait(timeout=30) == 0
        assert f.stdout.read() == b""  # type: ignore[union-attr]
    finally:
        f.kill()
        f.wait()
        f.stdout.close()  # type: ignore[union-attr]


def test_another_process_on_the_pid_is_never_signalled(job) -> None:  # type: ignore[no-untyped-def]
    born = process_start(job.pid)
    assert born is not None
    # As if the job's pid now belonged to a process started at another time.
    tree = descendants(job.pid)
    stop_tree(job.pid, born + 1, 0.2)
    time.sleep(0.3)
    assert job.poll() is None and all(alive(p) for p in tree)
    stop_tree(job.pid, born, 0.2)
    assert job.wait(timeout=10) == -signal.SIGTERM


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK),
    reason="reusing a chosen pid needs root (/proc/sys/kernel/ns_last_pid)",
)
def test_a_reused_pid_is_not_killed() -> None:
    """A real pid reuse: the job is gone, another process got its pid, then the deadline
    passes. ns_last_pid is system-wide, so another process may take the pid first: tried
    a few times."""
    for _ in range(20):
        old = subprocess.Popen(["sleep", "600"], start_new_session=True)
        born = process_start(old.pid)
        assert born is not None
        old.kill()
        old.wait()
        time.sleep(0.05)  # start times count clock ticks (10 ms): reuse in a later one
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(old.pid - 1))
        new = subprocess.Popen(["sleep", "600"], start_new_session=True)
        if new.pid == old.pid:
            break
        new.kill()
        new.wait()
    else:
        pytest.skip("the pid was taken by another process every time")
    try:
        assert process_start(new.pid) != born
        stop_tree(new.pid, born, 0.2)
        time.sleep(0.3)
        assert new.poll() is None  # the new process on the old pid was left alone
    finally:
        new.kill()
        new.wait()


# --- run_process with a fence ------------------------------------------------------------


def test_run_process_fenced_job_is_lost_not_succeeded(tmp_path: Path) -> None:
    """A job that saves on SIGTERM and exits 0 does not read as a success when the fence
    stopped it: its status is -SIGTERM and the message says the lease was lost."""
    path = tmp_path / "lease-deadline"
    write_deadline(path, clock() + 3600)
    gen = run_process(
        [SH, "-c", "trap 'echo saved; exit 0' TERM; echo ready; while true; do sleep 0.1; done"],
        dict(os.environ),
        str(tmp_path),
        kill_grace_s=1.0,
        fence_file=str(path),
    )
    started = next(gen)
    assert isinstance(started, ProcStarted)
    output = b""
    for event in gen:
        if isinstance(event, ProcOutput):
            output += event.data
            if b"ready" in output:
                break
    fences = [p for p in descendants(os.getpid()) if _is_fence(p)]
    assert len(fences) == 1
    write_deadline(path, clock() - 1)
    rest = list(gen)
    output += b"".join(e.data for e in rest if isinstance(e, ProcOutput))
    exited = rest[-1]
    assert isinstance(exited, ProcExited)
    assert b"saved" in output  # it got its SIGTERM and exited 0 ...
    assert exited.exit_code == -signal.SIGTERM  # ... yet it did not succeed
    assert exited.message.startswith("lease lost")
    assert not alive(fences[0])


def test_run_process_unfenced_job_ends_normally_and_its_fence_goes(tmp_path: Path) -> None:
    path = tmp_path / "lease-deadline"
    write_deadline(path, clock() + 3600)
    seen: list[int] = []

    def look() -> None:  # the fence exists while the job runs
        wait_until(lambda: bool([p for p in descendants(os.getpid()) if _is_fence(p)]))
        seen.extend(p for p in descendants(os.getpid()) if _is_fence(p))

    t = threading.Thread(target=look)
    t.start()
    events = list(
        run_process(
            [SH, "-c", "sleep 1; echo done"], dict(os.environ), str(tmp_path), fence_file=str(path)
        )
    )
    t.join()
    assert events[-1] == ProcExited(0, "")
    assert len(seen) == 1 and not alive(seen[0])


def _is_fence(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"worker_agent.fence" in f.read()
    except OSError:
        return False


# --- bubblewrap ---------------------------------------------------------------------------


def test_a_sandboxed_job_is_fenced_with_its_sandbox(tmp_path: Path) -> None:
    """Under bwrap the fence runs outside the sandbox: SIGTERM to the job's processes
    (it saves), then SIGKILL to bwrap, which takes the pid namespace with it."""
    state = tmp_path / "state"
    cwd = state / "attempts" / "job"
    cwd.mkdir(parents=True)
    try:
        isolation = resolve(SandboxPolicy(mode="bwrap", hide=(str(state),)))
    except SandboxError as err:
        pytest.skip(f"no working bubblewrap here: {err}")
    path = tmp_path / "lease-deadline"
    write_deadline(path, clock() + 3600)
    gen = run_process(
        [
            SH,
            "-c",
            "trap 'echo saved > saved; exit 0' TERM; setsid sleep 600 & "
            "echo ready; while true; do sleep 0.1; done",
        ],
        dict(os.environ),
        str(cwd),
        isolation=isolation,
        kill_grace_s=1.0,
        fence_file=str(path),
    )
    started = next(gen)
    assert isinstance(started, ProcStarted)
    for event in gen:
        if isinstance(event, ProcOutput) and b"ready" in event.data:
            break
    tree = [started.pid, *descendants(started.pid)]
    assert not any(_is_fence(p) for p in tree)  # the fence is not inside the sandbox
    write_deadline(path, clock() - 1)
    rest = list(gen)
    exited = rest[-1]
    assert isinstance(exited, ProcExited) and exited.message.startswith("lease lost")
    assert exited.exit_code != 0
    assert (cwd / "saved").read_text() == "saved\n"  # the job got SIGTERM before bwrap died
    assert wait_until(lambda: not any(alive(p) for p in tree)), [p for p in tree if alive(p)]
